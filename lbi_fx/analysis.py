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
