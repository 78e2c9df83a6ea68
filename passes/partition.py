"""Partition: give every node a place - prologue, region k, or epilogue.

Places are integers so that Def. 2.1 is one comparison per edge: ``PROLOGUE = -1``,
regions ``0..K-1``, epilogue ``K``. A node whose module path lies under a listed
module belongs to that region. Other nodes (top-level glue, unlisted modules) join the
place of their latest producer; an unlisted module that runs after the last region
starts the epilogue. ``get_attr`` nodes are free: parameters may be read anywhere.
"""

from __future__ import annotations

import torch.fx as fx

from lbi_fx.errors import RegionSpecError
from lbi_fx.regions import suggest

from .capture import MODULE_KEY

PLACE_KEY = "lbi_place"
PROLOGUE = -1


def place_of(node: fx.Node) -> int:
    return node.meta[PLACE_KEY]


def place_name(place: int, num_regions: int) -> str:
    if place == PROLOGUE:
        return "prologue"
    if place >= num_regions:
        return "epilogue"
    return f"region {place}"


def module_of(node: fx.Node) -> str:
    return node.meta.get(MODULE_KEY, "")


def known_module_paths(gm: fx.GraphModule) -> set[str]:
    """Every module path that names some node: from the module tree and node metadata."""
    paths = {name for name, _ in gm.named_modules() if name}
    for node in gm.graph.nodes:
        path = module_of(node)
        while path:
            paths.add(path)
            path = path.rpartition(".")[0]
    return paths


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _validate(regions: list[list[str]], known: set[str]) -> None:
    owner: dict[str, int] = {}
    for k, region in enumerate(regions):
        for path in region:
            if path not in known:
                raise RegionSpecError(
                    f"region {k}: unknown module path {path!r}{suggest(path, sorted(known))}"
                )
            for other, j in owner.items():
                if j != k and (_under(path, other) or _under(other, path)):
                    raise RegionSpecError(
                        f"regions overlap: {path!r} (region {k}) and {other!r} (region {j}) "
                        "name the same module; each module belongs to one region"
                    )
            owner[path] = k


def region_index(path: str, regions: list[list[str]]) -> int | None:
    """The region whose listed path is the longest prefix of ``path``."""
    best, best_len = None, -1
    for k, region in enumerate(regions):
        for prefix in region:
            if _under(path, prefix) and len(prefix) > best_len:
                best, best_len = k, len(prefix)
    return best


def assign_places(gm: fx.GraphModule, regions: list[list[str]]) -> None:
    """Set ``meta[PLACE_KEY]`` on every node and check Def. 2.1 on every edge."""
    _validate(regions, known_module_paths(gm))
    num = len(regions)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            place = PROLOGUE
        elif node.op == "output":
            place = num
        else:
            path = module_of(node)
            listed = region_index(path, regions) if path else None
            if listed is not None:
                place = listed
            else:
                producers = [place_of(a) for a in node.all_input_nodes if a.op != "get_attr"]
                place = max(producers, default=PROLOGUE)
                if place == num - 1 and path:
                    place = num  # an unlisted module after the last region: epilogue
        node.meta[PLACE_KEY] = place
    _check_nonempty(gm, regions)
    check_topological(gm, num)


def _check_nonempty(gm: fx.GraphModule, regions: list[list[str]]) -> None:
    counts = [0] * len(regions)
    for node in gm.graph.nodes:
        p = place_of(node)
        if node.op not in ("get_attr", "placeholder", "output") and 0 <= p < len(regions):
            counts[p] += 1
    for k, c in enumerate(counts):
        if c == 0:
            raise RegionSpecError(
                f"region {k} ({', '.join(regions[k])}) contains no computation: the "
                "module is never called in forward; drop it from the spec"
            )


def check_topological(gm: fx.GraphModule, num_regions: int) -> None:
    """Def. 2.1: for every edge u -> v, place(u) <= place(v)."""
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            if src.op == "get_attr":
                continue
            if place_of(src) > place_of(node):
                if place_of(src) == num_regions and 0 <= place_of(node) < num_regions:
                    raise RegionSpecError(
                        f"module {module_of(src) or '<top level>'} ({src.name}) is not listed in "
                        f"any region but runs between modules of region {place_of(node)} (it "
                        f"feeds {node.name}, {module_of(node) or '<top level>'}); add it to "
                        f"region {place_of(node)}")
                raise RegionSpecError(
                    "regions out of topological order: edge "
                    f"{src.name} ({module_of(src) or '<top level>'}, "
                    f"{place_name(place_of(src), num_regions)}) -> {node.name} "
                    f"({module_of(node) or '<top level>'}, "
                    f"{place_name(place_of(node), num_regions)}) runs backwards; list the "
                    "regions in the order the model calls them"
                )
