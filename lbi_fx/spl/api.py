"""Entry points: the compositions of L layers (the configuration space C(L)) and
``stage_partition``, which captures and partitions a model with the same front end as
``lbi_fx.transform`` (``lbi_fx.analysis.analyze``) and cuts it into stages.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

from torch import nn

from lbi_fx.analysis import analyze
from lbi_fx.errors import InputError
from lbi_fx.regions import RegionSpec
from lbi_fx.spl.cut import _CutBuilder
from lbi_fx.spl.module import SPLModule
from lbi_fx.spl.relays import _normalize_relay

HEADS = ("shared", "per-stage")


def compositions(n: int, parts: int | None = None) -> list[tuple[int, ...]]:
    """Every composition of ``n`` (Def. 2.1), or those with ``parts`` parts.

    A composition is the set of its internal boundaries, a subset of {1..n-1}, so there
    are 2^(n-1) of them (Prop. 2.2) and C(n-1, K-1) with K parts.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"compositions(n={n!r}): n must be an int >= 1")
    counts = range(n) if parts is None else [parts - 1]
    out = []
    for k in counts:
        for cuts in itertools.combinations(range(1, n), k):
            ends = (0, *cuts, n)
            out.append(tuple(b - a for a, b in zip(ends, ends[1:])))
    return out


def stage_partition(
    model: nn.Module,
    regions: RegionSpec,
    *,
    example_inputs: Sequence[object],
    heads: str = "shared",
    relay: float | Sequence[float] = 0.0,
    alpha: float = 1.0,
    leaf_modules: Iterable[type | str] = (),
) -> SPLModule:
    """Stage-partitioned learning on ``model``: ``regions`` are the K stages (e.g.
    ``lbi_fx.composition((1, 3, 2), "layers")``; one region is backprop itself).

    ``heads``: ``"shared"`` (every stage uses the model's epilogue, Eq. 4 with H = sh) or
    ``"per-stage"`` (plus a zero-initialised delta per stage on the epilogue's parameters,
    H = ps). ``relay``: lambda in [0, 1], one for all boundaries or one per boundary.
    ``alpha``: the total loss is sum_k loss_k / K^(1 - alpha). Parameters are shared
    with ``model``.
    """
    if heads not in HEADS:
        raise InputError(f"heads={heads!r}: choose one of {', '.join(HEADS)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"alpha={alpha!r}: a finite number (1: sum of stage losses, 0: mean)")
    a = analyze(model, regions, example_inputs, leaf_modules=leaf_modules, min_regions=1)
    lams = _normalize_relay(relay, a.num_regions)
    if not any(p.dtype.is_floating_point for p in a.gm.parameters()):
        raise InputError("the model has no floating-point parameters; nothing to train")
    builder = _CutBuilder(a.gm, a.regions, lams, heads)
    builder.build()
    info = getattr(a.gm.graph._codegen, "pytree_info", None)
    return SPLModule(a.gm, builder, alpha=alpha, capture=a.gm.meta.get("lbi_capture", ""),
                     pytree_info=info)
