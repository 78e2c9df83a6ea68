"""Region specs: the user-facing ways to name K regions by module path.

Forms accepted everywhere a spec is taken:

* a list of lists of module paths: ``[["layers.0", "layers.1"], ["layers.2"]]``;
* ``every(n, "layers")``: consecutive children of a ModuleList/Sequential/ModuleDict in
  groups of ``n``, the last group truncated (as in the paper's Table 6);
* ``composition((1, 3, 2), "layers")``: consecutive children in groups of the given
  sizes, which must cover the container exactly (a composition of its length, as in
  stage-partitioned learning);
* CLI strings: ``"a,b;c,d"`` (regions split by ``;``, paths by ``,``),
  ``"layers:2"`` (same as ``every(2, "layers")``) and ``"layers=1,3,2"`` (same as
  ``composition((1, 3, 2), "layers")``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lbi_fx.errors import RegionSpecError


@dataclass(frozen=True)
class Every:
    """``n`` consecutive children of the container at ``path`` per region."""

    n: int
    path: str

    def resolve(self, root: nn.Module) -> list[list[str]]:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise RegionSpecError(f"every(n={self.n!r}, {self.path!r}): n must be an int >= 1")
        container = _get_submodule(root, self.path)
        names = [name for name, _ in container.named_children()]
        if not names:
            raise RegionSpecError(
                f"every({self.n}, {self.path!r}): module {self.path!r} has no children "
                "to group; name a ModuleList, Sequential or ModuleDict"
            )
        if names and all(n.isdigit() for n in names):
            names.sort(key=int)
        prefix = f"{self.path}." if self.path else ""
        paths = [prefix + n for n in names]
        return [paths[i: i + self.n] for i in range(0, len(paths), self.n)]


def every(n: int, path: str) -> Every:
    """Group the children of ``path`` into regions of ``n`` consecutive modules."""
    return Every(n, path)


def _children(root: nn.Module, path: str, what: str) -> list[str]:
    container = _get_submodule(root, path)
    names = [name for name, _ in container.named_children()]
    if not names:
        raise RegionSpecError(
            f"{what}: module {path!r} has no children to group; name a ModuleList, "
            "Sequential or ModuleDict"
        )
    if all(n.isdigit() for n in names):
        names.sort(key=int)
    prefix = f"{path}." if path else ""
    return [prefix + n for n in names]


class Composition(list):
    """Regions from a composition ``sizes`` of the children of ``path``: a plain list of
    lists (children named ``path.0``, ``path.1``, ...) that also remembers ``sizes`` and
    ``path``, so a model can check that the parts cover its container exactly."""

    def __init__(self, sizes: Sequence[int], path: str):
        sizes = tuple(sizes)
        what = f"composition({sizes}, {path!r})"
        if not sizes:
            raise RegionSpecError(f"{what}: give at least one part, e.g. composition((2, 2), 'layers')")
        for d in sizes:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise RegionSpecError(f"{what}: every part must be an int >= 1, got {d!r}")
        self.sizes, self.path = sizes, path
        prefix = f"{path}." if path else ""
        super().__init__(self._group([f"{prefix}{i}" for i in range(sum(sizes))]))

    def _group(self, paths: list[str]) -> list[list[str]]:
        bounds = [0]
        for d in self.sizes:
            bounds.append(bounds[-1] + d)
        return [paths[a:b] for a, b in zip(bounds, bounds[1:])]

    def resolve(self, root: nn.Module) -> list[list[str]]:
        what = f"composition({self.sizes}, {self.path!r})"
        paths = _children(root, self.path, what)
        if len(paths) != sum(self.sizes):
            raise RegionSpecError(
                f"{what} covers {sum(self.sizes)} modules but {self.path!r} has {len(paths)} "
                f"children; the parts of a composition must sum to {len(paths)}"
            )
        return self._group(paths)


def composition(sizes: Sequence[int], path: str) -> Composition:
    """Regions of ``sizes[k]`` consecutive children of ``path`` each, covering all of them:
    ``composition((1, 3, 2), "layers") == [["layers.0"], ["layers.1", "layers.2",
    "layers.3"], ["layers.4", "layers.5"]]``."""
    return Composition(sizes, path)


RegionSpec = Sequence[Sequence[str]] | Every | str


def parse_region_string(spec: str) -> list[list[str]] | Every:
    """Parse the CLI forms ``"a,b;c,d"`` and ``"layers:2"``."""
    spec = spec.strip()
    if not spec:
        raise RegionSpecError("empty region spec; use e.g. 'layers:2' or 'layers.0,layers.1;layers.2'")
    if "=" in spec and ";" not in spec:
        path, _, parts = spec.partition("=")
        try:
            sizes = tuple(int(p) for p in parts.split(","))
        except ValueError:
            raise RegionSpecError(
                f"region spec {spec!r}: expected PATH=D0,D1,... with integer parts, e.g. "
                "'layers=1,3,2'"
            ) from None
        return Composition(sizes, path.strip())
    if ":" in spec and ";" not in spec and "," not in spec:
        path, _, n = spec.rpartition(":")
        try:
            count = int(n)
        except ValueError:
            raise RegionSpecError(
                f"region spec {spec!r}: expected PATH:N with an integer N, e.g. 'layers:2'"
            ) from None
        return Every(count, path)
    regions = []
    for i, part in enumerate(spec.split(";")):
        paths = [p.strip() for p in part.split(",") if p.strip()]
        if not paths:
            raise RegionSpecError(f"region spec {spec!r}: region {i} is empty")
        regions.append(paths)
    return regions


def _get_submodule(root: nn.Module, path: str) -> nn.Module:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise RegionSpecError(
            f"unknown module path {path!r}{suggest(path, [n for n, _ in root.named_modules()])}"
        ) from None


def suggest(path: str, known: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(path, [k for k in known if k], n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def normalize_regions(spec: RegionSpec, root: nn.Module, *, min_regions: int = 2) -> list[list[str]]:
    """Turn any accepted form into a list of lists of module paths (validated shape).

    LBI needs a boundary (``min_regions=2``); stage-partitioned learning also takes a
    single stage, its backprop endpoint (``min_regions=1``).
    """
    if spec is None:
        raise RegionSpecError(
            "regions= is required: e.g. lbi_fx.every(2, 'layers') or "
            "[['layers.0', 'layers.1'], ['layers.2', 'layers.3']]"
        )
    if isinstance(spec, str):
        spec = parse_region_string(spec)
    if isinstance(spec, (Every, Composition)):
        regions = spec.resolve(root)
    else:
        if not isinstance(spec, (list, tuple)):
            raise RegionSpecError(
                f"regions must be a list of lists of module paths, every(n, path) or a string, "
                f"got {type(spec).__name__}"
            )
        regions = []
        for i, region in enumerate(spec):
            if isinstance(region, str):
                region = [region]
            if not isinstance(region, (list, tuple)) or not all(isinstance(p, str) for p in region):
                raise RegionSpecError(f"region {i} must be a list of module paths, got {region!r}")
            if not region:
                raise RegionSpecError(f"region {i} is empty: give it at least one module path")
            regions.append(list(region))
    if len(regions) < min_regions:
        if min_regions < 2:
            raise RegionSpecError("the spec gives no region; name at least one module path")
        raise RegionSpecError(
            f"the spec gives {len(regions)} region(s); LBI needs at least 2 regions "
            "(one boundary) - use smaller groups"
        )
    return regions
