"""Forward mode: sensitivities streamed tile by tile, keeping only the state, its tangent
and one tile's work alive, so a directional derivative costs no memory in the sequence
length (the paper's use at genomic lengths).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lbi_fx.errors import InputError
from lbi_fx.pgf.inputs import _check_scan_inputs, _check_tile, _compute_dtype, _tiles, _to
from lbi_fx.pgf.scan import linear_scan
from lbi_fx.pgf.tile import _softplus_grad, _states

_PRIMAL_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _jvp_tile(p, t, softplus, h0, hd0):
    """One tile of the tangent recurrence
    ``hd_t = exp(a_t) hd_{t-1} + ad_t exp(a_t) h_{t-1} + xd_t``; returns
    (out, out_dot, h_last, hd_last)."""
    u, delta, A, B, C, D, z, bias = p
    ud, deltad, Ad, Bd, Cd, Dd, zd, biasd = t
    pre, dt, a, h = _states(u, delta, A, B, C, bias, softplus, h0)
    Bt = B.transpose(1, 2).unsqueeze(1)
    pred = deltad if biasd is None else deltad + biasd.unsqueeze(-1)
    dtd = _softplus_grad(pred, pre) if softplus else pred
    ad = dtd.unsqueeze(-1) * A.unsqueeze(1) + dt.unsqueeze(-1) * Ad.unsqueeze(1)
    xd = (dtd * u + dt * ud).unsqueeze(-1) * Bt + (dt * u).unsqueeze(-1) * Bd.transpose(
        1, 2).unsqueeze(1)
    h_prev = torch.cat([h0.unsqueeze(-2), h[..., :-1, :]], dim=-2)
    hd = linear_scan(a, ad * torch.exp(a) * h_prev + xd, hd0)
    Ct, Cdt = C.transpose(1, 2).unsqueeze(1), Cd.transpose(1, 2).unsqueeze(1)
    o = (h * Ct).sum(-1)
    od = (hd * Ct + h * Cdt).sum(-1)
    if D is not None:
        o = o + D.unsqueeze(-1) * u
        od = od + Dd.unsqueeze(-1) * u + D.unsqueeze(-1) * ud
    last, last_d = h[..., -1, :].clone(), hd[..., -1, :].clone()
    if z is None:
        return o, od, last, last_d
    s = torch.sigmoid(z)
    return o * (z * s), od * (z * s) + o * s * (1 + z * (1 - s)) * zd, last, last_d


@torch.no_grad()
def selective_scan_jvp(
    primals: Sequence[torch.Tensor | None],
    tangents: Sequence[torch.Tensor | None],
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    tile: int | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-mode sensitivities ``(y, y_dot)`` of :func:`selective_scan`, streamed tile
    by tile: only the state, its tangent and one tile's work are alive at a time.

    primals: ``(u, delta, A, B, C[, D[, z[, delta_bias]]])`` in that order (None for an
    absent D, z or delta_bias); tangents: the same length, None for a zero tangent.
    ``D``, ``z`` and ``delta_bias`` may be keywords instead, as for :func:`selective_scan`,
    so one call's arguments serve both; their tangents are then zero, or given in an
    8-long ``tangents`` at their place in the order above.
    This is the paper's use, e.g. dy/du for one input direction at genomic lengths.
    """
    primals, tangents = list(primals), list(tangents)
    if not 5 <= len(primals) <= 8 or len(tangents) not in (len(primals), 8):
        raise InputError(f"selective_scan_jvp: primals ({len(primals)}) and tangents "
                         f"({len(tangents)}) must be tuples of equal length 5..8 in the order "
                         f"{', '.join(_PRIMAL_NAMES)} (tangents may have all 8)")
    primals += [None] * (8 - len(primals))
    tangents += [None] * (8 - len(tangents))
    for name, value in (("D", D), ("z", z), ("delta_bias", delta_bias)):
        if value is not None:
            i = _PRIMAL_NAMES.index(name)
            if primals[i] is not None:
                raise InputError(f"selective_scan_jvp: {name} given twice, in primals and as "
                                 f"{name}=; pass one")
            primals[i] = value
    _check_scan_inputs(*primals)
    for name, p, t in zip(_PRIMAL_NAMES, primals, tangents):
        if t is not None and (p is None or t.shape != p.shape):
            raise InputError(f"selective_scan_jvp: tangent of {name} has shape "
                             f"{None if t is None else tuple(t.shape)}, primal "
                             f"{None if p is None else tuple(p.shape)}")
    u = primals[0]
    ct = _compute_dtype(u.dtype)
    p = [_to(x, ct) for x in primals]
    t = [None if x is None else (torch.zeros_like(x) if tg is None else tg.to(ct))
         for x, tg in zip(p, tangents)]
    b, d, length = u.shape
    n = p[2].size(1)
    tile = _check_tile(tile, length)
    out, out_d = p[0].new_empty(b, d, length), p[0].new_empty(b, d, length)
    h, hd = p[0].new_zeros(b, d, n), p[0].new_zeros(b, d, n)
    timed = {0, 1, 3, 4, 6}  # indices of primals with a time axis
    for s, e in _tiles(length, tile):
        ps = [x if x is None or i not in timed else x[..., s:e] for i, x in enumerate(p)]
        ts = [x if x is None or i not in timed else x[..., s:e] for i, x in enumerate(t)]
        out[..., s:e], out_d[..., s:e], h, hd = _jvp_tile(ps, ts, delta_softplus, h, hd)
    return out.to(u.dtype), out_d.to(u.dtype)
