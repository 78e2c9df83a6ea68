"""The relay D_lambda (Eq. 26) on every edge a stage boundary cuts, and its factors.

This is the one place stage-partitioned learning departs from backprop: lambda = 0
detaches (stage k learns from loss k alone, Prop. 4.7), lambda = 1 is plain backprop, and
an edge that crosses several boundaries gets the product of their lambdas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils import _pytree as pytree

from lbi_fx.errors import InputError


class _Scale(torch.autograd.Function):
    """Identity forward, ``lambda * grad`` backward: D_lambda for 0 < lambda < 1."""

    @staticmethod
    def forward(ctx, t, lam):
        ctx.lam = lam
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.lam, None


def relay(value: object, lam: float) -> object:
    """D_lambda (Eq. 26) on every floating tensor in ``value``: the value unchanged, its
    gradient scaled by ``lam``. ``lam = 0`` is ``detach`` (no gradient edge at all)."""

    def one(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or lam == 1.0:
            return t
        return t.detach() if lam == 0.0 else _Scale.apply(t, lam)

    return pytree.tree_map(one, value)


def _edge_lambda(lams: Sequence[float], src_place: int, k: int) -> float:
    """Gradient factor of an edge from ``src_place`` into stage k: the product of the
    relays of every boundary it crosses (so a hard vertex of the relaxed space is exactly
    a coarser composition, Prop. 9.4)."""
    out = 1.0
    for i in range(max(src_place, 0) + 1, k + 1):
        out *= lams[i - 1]
    return out


def _normalize_relay(relay_: object, K: int) -> list[float]:
    vals = list(relay_) if isinstance(relay_, (list, tuple)) else [relay_] * (K - 1)
    if len(vals) != K - 1:
        raise InputError(f"relay has {len(vals)} entries but {K} stages have {K - 1} boundaries")
    out = []
    for i, v in enumerate(vals):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise InputError(f"relay for boundary {i + 1} must be a number in [0, 1], got {v!r} "
                             "(0 detaches, 1 passes the gradient unchanged)")
        out.append(float(v))
    return out
