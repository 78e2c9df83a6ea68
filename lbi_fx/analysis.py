"""The front half of the pipeline: capture -> shapes -> partition -> dynamic marking.

``analyze`` is shared by ``verify`` and ``transform`` so both see the same graph facts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from lbi_fx.errors import InputError, RegionSpecError
from lbi_fx.passes.capture import CAPTURE_KEY, capture
from lbi_fx.passes.mark_dynamic import mark_dynamic
from lbi_fx.passes.partition import assign_places
from lbi_fx.passes.separator import boundary_reports, graph_summary
from lbi_fx.passes.shape_prop import BATCH_KEY, check_example_inputs, propagate_shapes
from lbi_fx.regions import RegionSpec, normalize_regions
from lbi_fx.report import SeparatorReport


@dataclass
class Analysis:
    gm: fx.GraphModule
    regions: list[list[str]]
    batch: int
    example_inputs: tuple

    @property
    def num_regions(self) -> int:
        return len(self.regions)


def analyze(
    model: nn.Module,
    regions: RegionSpec,
    example_inputs: Sequence[object],
    *,
    leaf_modules: Iterable[type | str] = (),
    min_regions: int = 2,
) -> Analysis:
    example_inputs = check_example_inputs(example_inputs)
    gm = capture(model, example_inputs, leaf_modules=leaf_modules)
    root = model if isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule) else gm
    spec = normalize_regions(regions, root, min_regions=min_regions)
    propagate_shapes(gm, example_inputs)
    assign_places(gm, spec)
    mark_dynamic(gm)
    return Analysis(gm, spec, gm.meta[BATCH_KEY], example_inputs)


def normalize_rank(rank: object, num_boundaries: int) -> list[int] | None:
    """``rank`` as one int per boundary; ``None`` stays ``None``."""
    if rank is None:
        return None
    ranks = list(rank) if isinstance(rank, (list, tuple)) else [rank] * num_boundaries
    if len(ranks) != num_boundaries:
        raise InputError(
            f"rank has {len(ranks)} entries but the spec has {num_boundaries} boundaries "
            "(one per interface)"
        )
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise InputError(f"rank for interface {i + 1} must be an int >= 1, got {r!r}")
    return ranks


def separator_report(
    gm: fx.GraphModule,
    regions: list[list[str]],
    batch: int,
    *,
    rank: object = None,
    interfaces: Sequence | None = None,
) -> SeparatorReport:
    num = len(regions)
    ranks = normalize_rank(rank, num - 1)
    if interfaces is not None:
        if isinstance(interfaces, str):
            interfaces = [s for s in interfaces.split(",") if s]
        if len(interfaces) != num - 1:
            raise RegionSpecError(
                f"interfaces= names {len(interfaces)} interface(s) for {num - 1} boundaries; "
                "give one module path or node per boundary"
            )
    boundaries = boundary_reports(gm, num, batch, rank=ranks, interfaces=interfaces)
    return SeparatorReport(
        regions=regions,
        batch_size=batch,
        boundaries=boundaries,
        rank=ranks,
        interfaces=[[b.interface] if isinstance(b.interface, str) else list(b.interface or [])
                    for b in boundaries] if interfaces is not None else None,
        capture=gm.meta.get(CAPTURE_KEY, ""),
        graph=graph_summary(gm, num),
    )


_CAST_METHODS = {"float": "float32", "half": "float16", "bfloat16": "bfloat16"}


def lower_precision_ops(gm: fx.GraphModule, dtype) -> dict[str, list[str]]:
    """Module path -> the lower-precision dtypes its ops cast to (or assert), for a graph
    whose parameters are ``dtype``: ``x.float()`` inside a float64 model (Hugging Face
    Mamba and Llama do) puts float32 rounding into every gradient, which float64
    tolerances then measure. Read from the graph's dtype constants, nothing is run."""
    import torch

    eps = torch.finfo(dtype).eps
    found: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        names = []
        if node.op == "call_method" and node.target in _CAST_METHODS:
            names.append(_CAST_METHODS[node.target])
        for a in (*node.args, *node.kwargs.values()):
            if (isinstance(a, torch.dtype) and a.is_floating_point
                    and torch.finfo(a).eps > eps):
                names.append(str(a).removeprefix("torch."))
        if names:
            found.setdefault(node.meta.get("lbi_module", "") or "<top level>", set()).update(names)
    return {path: sorted(d) for path, d in found.items()}


def precision_notes(lbi: nn.Module) -> list[str]:
    """Why a parity report of ``lbi`` may sit above its dtype's tolerance: the graph of a
    float64 (or float32) model that computes parts in a lower precision, by module."""
    import torch

    dtypes = [p.dtype for p in lbi.parameters() if p.dtype.is_floating_point]
    if not dtypes or not hasattr(lbi, "rewritten_graph"):
        return []
    top = min(dtypes, key=lambda d: torch.finfo(d).eps)
    if top not in (torch.float64, torch.float32):
        return []
    ops = lower_precision_ops(lbi.rewritten_graph, top)
    if not ops:
        return []
    kinds = sorted({d for ds in ops.values() for d in ds})
    where = ", ".join(list(ops)[:4]) + (f" and {len(ops) - 4} more" if len(ops) > 4 else "")
    return [f"the parameters are {str(top).removeprefix('torch.')}, but the model itself "
            f"computes in {'/'.join(kinds)} in {where} (casts in its own code): both "
            f"backwards carry {'/'.join(kinds)} rounding there, so errors above the "
            f"{str(top).removeprefix('torch.')} level come from the model, not the scan; "
            "the tolerances are not changed for it"]
