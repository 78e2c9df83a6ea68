"""Tiled exact differentiation of selective state space models (``lbi_fx.pgf``).

Phase Gradient Flow (``../shared/seeds/003_…txt``) in lbi-fx terms: a tile of time steps
is a region and the SSM state it hands to the next tile is its interface. The state
separates the past from the future, so a backward pass can run tile by tile in reverse
from the states saved at tile boundaries, and a forward-mode pass can stream tile by
tile keeping only the current state and its tangent.

Selective scan (mamba-ssm's ``selective_scan_ref`` semantics, real ``A``, input-dependent
``B`` and ``C``)::

    dt_t = softplus(delta_t + delta_bias)   (or delta_t + delta_bias)    (b, d, l)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t u_t B_t                           (b, d, n)
    y_t  = sum_n C_t h_t;   out_t = (y_t + D u_t) * silu(z_t)

* :func:`selective_scan`: a custom ``autograd.Function``. Forward saves the inputs and one
  state per tile; backward recomputes each tile, in reverse, and runs the adjoint
  recurrence ``lam_t = C_t g_t + exp(a_{t+1}) lam_{t+1}`` analytically, so no autograd
  graph of a tile is ever built.
* :func:`selective_scan_jvp`: forward-mode sensitivities streamed tile by tile.
* :func:`selective_scan_ref`: a per-step reference loop, the ground truth of the tests
  and the paper's autograd baseline.
* :func:`tile_ssm`: swaps a tiled, reverse-recomputing backward into every Mamba-2 mixer
  of a model (conv tail and SSD state carried across tiles); the tiled mixer is an FX
  leaf for ``lbi_fx.transform``.

Inside a tile every recurrence runs as a log-depth (Hillis-Steele) scan over cumulative
log-decays: each level multiplies by ``exp`` of a *sum* of ``dt A`` over a window, never
by the exponential of a difference of prefix sums, so strong decay underflows to an
exact 0 instead of overflowing as ``exp(-cumsum)`` would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from lbi_fx.errors import InputError, RewriteError

__all__ = [
    "TiledMamba2Mixer",
    "linear_scan",
    "selective_scan",
    "selective_scan_jvp",
    "selective_scan_ref",
    "ssd_with_state",
    "tile_forward",
    "tile_ssm",
]

DEFAULT_TILE = 256
_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: identity above it


# --------------------------------------------------------------------------------------
# shared pieces


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 (mamba-ssm's reference upcasts half inputs), but fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Shapes of the supported case; an ``InputError`` naming the argument otherwise."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("z", z), ("delta_bias", delta_bias)):
        if t is None and name in ("D", "z", "delta_bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise InputError(f"selective_scan: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InputError(f"selective_scan: {name} has dtype {t.dtype}; only real floating "
                             "point inputs are supported (complex A is not)")
    if u.dim() != 3:
        raise InputError(f"selective_scan: u has shape {tuple(u.shape)}; expected (batch, dim, "
                         "seqlen)")
    b, d, length = u.shape
    if A.dim() != 2 or A.size(0) != d:
        raise InputError(f"selective_scan: A has shape {tuple(A.shape)}; expected (dim, d_state) "
                         f"with dim = {d} from u")
    n = A.size(1)
    want = {"delta": (b, d, length), "z": (b, d, length), "B": (b, n, length),
            "C": (b, n, length), "D": (d,), "delta_bias": (d,)}
    for name, t in (("delta", delta), ("z", z), ("B", B), ("C", C), ("D", D),
                    ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != want[name]:
            hint = (" (only input-dependent B/C of shape (batch, d_state, seqlen) are "
                    "supported: expand a constant or grouped B/C to that shape)"
                    if name in ("B", "C") else "")
            raise InputError(f"selective_scan: {name} has shape {tuple(t.shape)}; expected "
                             f"{want[name]}{hint}")


def _check_tile(tile, length: int | None = None) -> int:
    if tile is None:
        return DEFAULT_TILE if length is None else max(1, min(DEFAULT_TILE, length))
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise InputError(f"tile={tile!r}: the tile is a number of time steps, an int >= 1")
    return tile


def _softplus_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d softplus(x) applied to ``grad``, exactly as autograd does it (threshold included)."""
    return torch.ops.aten.softplus_backward(grad, x, 1.0, _SOFTPLUS_THRESHOLD)


def _shift(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t`` moved k steps later along dim -2 (zeros enter at the start)."""
    return F.pad(t[..., : t.size(-2) - k, :], (0, 0, k, 0))


def _records(*ts) -> bool:
    """Whether autograd would record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states of ``h_t = exp(a_t) h_{t-1} + x_t`` along dim -2, with ``h_{-1} = h0``.

    a, x: (..., T, n); h0: (..., n). Hillis-Steele: log2(T) vectorised steps. After level
    j, ``acc_t`` is the log-decay over the window of 2^j steps ending at t, built as a sum
    of its own terms, and ``exp`` is only ever taken of such a window sum (<= 0 when A <= 0).
    Out of place where autograd records (the benchmark's baselines differentiate it), in
    place on a fresh buffer otherwise.
    """
    if not _records(a, x, h0):
        return _scan_owned(a, x.clone(), h0)
    if h0 is not None:
        first = x[..., :1, :] + torch.exp(a[..., :1, :]) * h0.unsqueeze(-2)
        x = torch.cat([first, x[..., 1:, :]], dim=-2)
    h, acc, step, T = x, a, 1, x.size(-2)
    while step < T:
        h = h + torch.exp(acc) * _shift(h, step)
        acc = acc + _shift(acc, step)
        step *= 2
    return h


def _scan_owned(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """:func:`linear_scan` in place on ``h`` (holding x on entry), no graph; a level only
    touches the steps it changes."""
    T = h.size(-2)
    if h0 is not None:
        h[..., 0, :] += torch.exp(a[..., 0, :]) * h0
    acc, step = (a.clone() if T > 2 else a), 1
    while step < T:
        h[..., step:, :] += torch.exp(acc[..., step:, :]) * h[..., :-step, :]
        if 2 * step < T:
            acc[..., step:, :] = acc[..., step:, :] + acc[..., :-step, :]
        step *= 2
    return h


def _adjoint_scan(a: torch.Tensor, lam: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The adjoint recurrence ``lam_t = x_t + exp(a_{t+1}) lam_{t+1}``, ``lam_{T-1} = x_{T-1}
    + mu``, in place on ``lam`` (holding x on entry): the same log-depth scan run from the
    end, ``acc_t`` the log-decay over the window after step t."""
    T = lam.size(-2)
    lam[..., -1, :] += mu
    acc, step = (a[..., 1:, :].clone() if T > 2 else a[..., 1:, :]), 1
    while step < T:
        lam[..., : T - step, :] += torch.exp(acc[..., : T - step, :]) * lam[..., step:, :]
        if 2 * step < T:
            acc[..., : T - 1 - step, :] = acc[..., : T - 1 - step, :] + acc[..., step:, :]
        step *= 2
    return lam


def _dt(delta, delta_bias, softplus: bool):
    """(pre-activation, dt) for a tile."""
    pre = delta if delta_bias is None else delta + delta_bias.unsqueeze(-1)
    return pre, (F.softplus(pre) if softplus else pre)


def _states(u, delta, A, B, C, delta_bias, softplus, h0):
    """Recompute one tile: dt, log-decays a, inputs x and all states h (b, d, T, n)."""
    pre, dt = _dt(delta, delta_bias, softplus)
    a = dt.unsqueeze(-1) * A.unsqueeze(1)  # (b, d, T, n)
    Bt = B.transpose(1, 2).unsqueeze(1)  # (b, 1, T, n)
    x = (dt * u).unsqueeze(-1) * Bt
    h = linear_scan(a, x, h0) if _records(a, x, h0) else _scan_owned(a, x, h0)
    return pre, dt, a, h


def tile_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, h0=None):
    """One tile of the scan from state ``h0`` (zeros if None): ``(out, h_last)``.

    Differentiable plain tensor code (the benchmark's autograd and checkpoint baselines
    differentiate it); inputs already in the compute dtype.
    """
    if h0 is None:
        h0 = u.new_zeros(u.size(0), u.size(1), A.size(1))
    _, _, _, h = _states(u, delta, A, B, C, delta_bias, softplus, h0)
    y = (h * C.transpose(1, 2).unsqueeze(1)).sum(-1)
    out = y if D is None else y + D.unsqueeze(-1) * u
    if z is not None:
        out = out * F.silu(z)
    return out, h[..., -1, :].clone()  # a view would keep the whole tile's states alive


def _tile_backward(u, delta, A, B, C, D, z, delta_bias, softplus, h0, g_out, mu):
    """Exact gradients of one tile given its output cotangent and the adjoint ``mu`` of its
    last state; returns (g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias, g_h0).

    Recomputes the tile's states, runs the adjoint scan, and reads every gradient off the
    adjoints ``lam_t = dL/dh_t``: dL/dx_t = lam_t, dL/da_t = lam_t exp(a_t) h_{t-1}.
    Buffers of shape (b, d, T, n) are reused in place: about six live at the peak.
    """
    pre, dt, a, h = _states(u, delta, A, B, C, delta_bias, softplus, h0)
    Bt, Ct = B.transpose(1, 2).unsqueeze(1), C.transpose(1, 2).unsqueeze(1)  # (b, 1, T, n)
    g_o, g_z = g_out, None
    if z is not None:
        y = (h * Ct).sum(-1)
        o = y if D is None else y + D.unsqueeze(-1) * u
        s = torch.sigmoid(z)
        g_o = g_out * (z * s)
        g_z = g_out * o * s * (1 + z * (1 - s))
    g_D = None if D is None else (g_o * u).sum((0, 2))
    g_u = torch.zeros_like(u) if D is None else g_o * D.unsqueeze(-1)
    lam = _adjoint_scan(a, g_o.unsqueeze(-1) * Ct, mu)
    g_C = (h * g_o.unsqueeze(-1)).sum(1).transpose(1, 2)
    g_a = a.exp_()  # a is not needed any more: its buffer becomes dL/da
    g_h0 = g_a[..., 0, :] * lam[..., 0, :]
    g_a[..., 1:, :] *= h[..., :-1, :]
    g_a[..., 0, :] *= h0
    del h
    g_a *= lam
    # (elementwise products and sums: einsum would become many tiny CPU matmuls here)
    lam_B = (lam * Bt).sum(-1)  # dL/d(dt u)
    g_B = (lam * (dt * u).unsqueeze(-1)).sum(1).transpose(1, 2)
    del lam
    g_A = (g_a * dt.unsqueeze(-1)).sum((0, 2))
    g_dt = (g_a * A.unsqueeze(1)).sum(-1) + lam_B * u
    g_u = g_u + lam_B * dt
    g_pre = _softplus_grad(g_dt, pre) if softplus else g_dt
    g_bias = None if delta_bias is None else g_pre.sum((0, 2))
    return g_u, g_pre, g_A, g_B, g_C, g_D, g_z, g_bias, g_h0


def _tiles(length: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, length)) for s in range(0, length, tile)]


# --------------------------------------------------------------------------------------
# the custom autograd op


class _SelectiveScan(torch.autograd.Function):
    """Forward tile by tile saving one state per tile; backward recomputes tiles in reverse."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, tile):
        b, d, length = u.shape
        spans = _tiles(length, tile)
        starts = u.new_empty(len(spans), b, d, A.size(1))
        out = u.new_empty(b, d, length)
        h = u.new_zeros(b, d, A.size(1))
        for i, (s, e) in enumerate(spans):
            starts[i] = h
            out[..., s:e], h = tile_forward(
                u[..., s:e], delta[..., s:e], A, B[..., s:e], C[..., s:e], D,
                None if z is None else z[..., s:e], delta_bias, softplus, h)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts)
        ctx.softplus, ctx.spans = softplus, spans
        return out, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_last):
        u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_u, g_delta = torch.empty_like(u), torch.empty_like(delta)
        g_B, g_C = torch.empty_like(B), torch.empty_like(C)
        g_z = None if z is None else torch.empty_like(z)
        g_A = torch.zeros_like(A)
        g_D = None if D is None else torch.zeros_like(D)
        g_bias = None if delta_bias is None else torch.zeros_like(delta_bias)
        mu = g_last
        for i in reversed(range(len(ctx.spans))):
            s, e = ctx.spans[i]
            sl = (..., slice(s, e))
            parts = _tile_backward(u[sl], delta[sl], A, B[sl], C[sl], D,
                                   None if z is None else z[sl], delta_bias, ctx.softplus,
                                   starts[i], g_out[sl], mu)
            g_u[sl], g_delta[sl], gA, g_B[sl], g_C[sl], gD, gz, gb, mu = parts
            g_A += gA
            if D is not None:
                g_D += gD
            if z is not None:
                g_z[sl] = gz
            if delta_bias is not None:
                g_bias += gb
        grads = (g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias)
        return (*(g if ok else None for g, ok in zip(grads, need)), None, None)


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    tile: int | None = None,
    return_last_state: bool = False,
):
    """mamba-ssm's ``selective_scan_ref`` with a tiled, recomputing backward.

    u, delta, z: (batch, dim, L); A: (dim, n) real; B, C: (batch, n, L); D, delta_bias:
    (dim,). Computed in ``promote(u.dtype, fp32)`` (fp64 stays fp64), returned in u's dtype;
    the last state (batch, dim, n), when asked for, stays in the compute dtype.
    Saved for backward: the inputs and one (batch, dim, n) state per tile of ``tile``
    steps (default 256), no per-step activation; every input gets its exact gradient
    (not differentiable twice).
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    tile = _check_tile(tile, u.size(-1))
    ct = _compute_dtype(u.dtype)
    out, last = _SelectiveScan.apply(
        u.to(ct), delta.to(ct), A.to(ct), B.to(ct), C.to(ct), _to(D, ct), _to(z, ct),
        _to(delta_bias, ct), bool(delta_softplus), tile)
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """The per-step reference: one Python iteration per time step, plain autograd.

    Same semantics and dtype rule as :func:`selective_scan`. Like mamba-ssm's reference it
    materialises the (batch, dim, L, n) decays and inputs up front, then loops over time.
    The per-step slices come from ``unbind``, whose backward stacks once: indexing
    ``decay[:, :, t]`` instead gives each step's backward a zero-filled gradient of the
    whole (b, d, L, n) tensor, a quadratic backward (see ``lbi-fx bench pgf``).
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    ct = _compute_dtype(u.dtype)
    u_, delta_, A_, B_, C_ = (t.to(ct) for t in (u, delta, A, B, C))
    _, dt = _dt(delta_, _to(delta_bias, ct), delta_softplus)
    decay = torch.exp(dt.unsqueeze(-1) * A_.unsqueeze(1))  # (b, d, L, n)
    inp = (dt * u_).unsqueeze(-1) * B_.transpose(1, 2).unsqueeze(1)
    h = u_.new_zeros(u.size(0), u.size(1), A.size(1))
    ys = []
    for decay_t, inp_t, C_t in zip(decay.unbind(2), inp.unbind(2), C_.unbind(2)):
        h = decay_t * h + inp_t
        ys.append((h * C_t.unsqueeze(1)).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + u_ * D.to(ct).unsqueeze(-1)
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(u.dtype)
    return (out, h) if return_last_state else out


# --------------------------------------------------------------------------------------
# forward mode

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


# --------------------------------------------------------------------------------------
# Mamba-2 (SSD) mixers


def _mamba2():
    """The project's Mamba-2 model module (imported on first use of the Mamba-2 parts)."""
    from lbi_fx.models import mamba2

    return mamba2


def ssd_with_state(x, dt, A, B, C, chunk_size: int, h0: torch.Tensor):
    """The model's chunked SSD scan from initial state ``h0``; returns ``(y, h_last)``.

    x: (b, T, g, k, p); dt: (b, T, g, k); A: (g, k); B, C: (b, T, g, n); h0, h_last:
    (b, g, k, p, n). ``y`` adds to the zero-state SSD output the carried-in state read out
    by C_t and decayed by ``exp(sum_{s<=t} dt_s A)``; the last state adds the tile's own
    contributions, each decayed by the sum of the log-decays after it (never a difference
    of prefix sums, so strong decay stays exact).
    """
    y = _mamba2().ssd(x, dt, A, B, C, chunk_size)
    a = dt * A  # (b, T, g, k)
    into = torch.exp(a.cumsum(1))
    y = y + torch.einsum("btgn,bgkpn->btgkp", C, h0) * into.unsqueeze(-1)
    later = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1).flip(1).cumsum(1).flip(1)
    own = torch.einsum("btgk,btgkp,btgn->bgkpn", torch.exp(later) * dt, x, B)
    return y, into[:, -1, :, :, None, None] * h0 + own


def _mixer_tile(m, u, tail, h0):
    """One tile of ``Mamba2Mixer.forward`` from a conv tail and an SSD state.

    tail: the last ``d_conv - 1`` conv inputs before the tile (zeros before the first);
    returns (out, next tail, last state). Same maths as the mixer's own forward.
    """
    g, k = m.ngroups, m.nheads // m.ngroups
    gn = m.ngroups * m.d_state
    z, xBC, dt = m.in_proj(u).split([m.d_inner, m.d_inner + 2 * gn, m.nheads], -1)
    full = torch.cat([tail, xBC], 1)
    next_tail = full[:, full.size(1) - tail.size(1):]
    xBC = F.silu(m._causal_conv(full, full.size(1))[:, tail.size(1):])
    x, B, C = xBC.split([m.d_inner, gn, gn], -1)
    dt = F.softplus(dt + m.dt_bias)
    if m.dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*m.dt_limit)
    A = -torch.exp(m.A_log)
    x = x.unflatten(-1, (g, k, m.headdim))
    y, h = ssd_with_state(x, dt.unflatten(-1, (g, k)), A.view(g, k),
                          B.unflatten(-1, (g, m.d_state)), C.unflatten(-1, (g, m.d_state)),
                          m.chunk_size, h0)
    y = y + x * m.D.view(g, k, 1)
    return m.out_proj(m.norm(y.flatten(-3), z)), next_tail, h


class _TiledMixer(torch.autograd.Function):
    """Mixer forward tile by tile; saves u, one conv tail and one SSD state per tile;
    backward reruns each tile under autograd, last tile first, chaining the adjoints of
    the state and the tail into the tile before."""

    @staticmethod
    def forward(ctx, mixer, tile, u, *params):
        b, length, _ = u.shape
        g, k = mixer.ngroups, mixer.nheads // mixer.ngroups
        conv_dim = mixer.conv1d.weight.size(0)
        tail = u.new_zeros(b, mixer.d_conv - 1, conv_dim)
        h = u.new_zeros(b, g, k, mixer.headdim, mixer.d_state)
        outs, tails, states = [], [], []
        for s, e in _tiles(length, tile):
            tails.append(tail)
            states.append(h)
            out, tail, h = _mixer_tile(mixer, u[:, s:e], tail, h)
            outs.append(out)
        ctx.save_for_backward(u, torch.stack(tails), torch.stack(states), *params)
        ctx.mixer, ctx.spans = mixer, _tiles(length, tile)
        ctx.names = [n for n, _ in mixer.named_parameters()]  # the order of ``params``
        ctx.autocast = _autocast_state(u.device.type)
        return torch.cat(outs, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        u, tails, states, *saved = ctx.saved_tensors  # raises if a parameter was modified
        # The reruns read fresh leaves in place of the parameters the forward was given
        # (they may be a caller's aliases, e.g. lbi-fx's region parameters): gradients go
        # to those inputs, and no parameter hook runs inside this backward.
        params = [p.detach().requires_grad_(p.requires_grad) for p in saved]
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        g_params = [None] * len(params)
        g_u = torch.empty_like(u)
        g_h = g_tail = None
        for i in reversed(range(len(ctx.spans))):
            s, e = ctx.spans[i]
            u_i = u[:, s:e].detach().requires_grad_()
            tail = tails[i].detach().requires_grad_()
            h0 = states[i].detach().requires_grad_()
            with torch.enable_grad(), torch.autocast(**ctx.autocast), \
                    _reparametrize_module(ctx.mixer, dict(zip(ctx.names, params))):
                out, next_tail, h = _mixer_tile(ctx.mixer, u_i, tail, h0)
            outs, cots = [out], [g_out[:, s:e]]
            if g_h is not None:
                outs += [h, next_tail]
                cots += [g_h, g_tail]
            grads = torch.autograd.grad(outs, [u_i, tail, h0] + [params[j] for j in trainable],
                                        cots, allow_unused=True)
            g_u[:, s:e], g_tail, g_h = grads[0], _zero_if_none(grads[1], tail), \
                _zero_if_none(grads[2], h0)
            for j, g in zip(trainable, grads[3:]):
                if g is not None:
                    g_params[j] = g if g_params[j] is None else g_params[j] + g
        return (None, None, g_u, *g_params)


def _zero_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _autocast_state(device_type: str) -> dict:
    """Keyword arguments that re-enter the caller's autocast state (for the recompute)."""
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)
    return {"device_type": device_type, "dtype": dtype, "enabled": enabled}


def _mixer_base() -> type:
    return _mamba2().Mamba2Mixer


class TiledMamba2Mixer(_mixer_base()):
    """A ``Mamba2Mixer`` whose backward recomputes ``tile`` steps at a time, in reverse.

    Same parameters (the very same tensors, same names), same outputs; memory kept for
    backward: the input, one SSD state and one conv tail per tile. ``lbi_fx_leaf`` keeps
    it one opaque node when lbi-fx traces a model (its custom autograd op has no FX form).
    """

    lbi_fx_leaf = True

    @classmethod
    def from_mixer(cls, mixer: nn.Module, tile: int) -> TiledMamba2Mixer:
        new = cls.__new__(cls)
        new.__dict__.update(mixer.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            new.__dict__[key] = mixer.__dict__[key].copy()
        new.tile = tile
        return new

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (b, T, d_model) -> (b, T, d_model), tile by tile."""
        if u.dim() != 3:
            raise InputError(f"TiledMamba2Mixer: input has shape {tuple(u.shape)}; expected "
                             "(batch, seqlen, d_model)")
        return _TiledMixer.apply(self, self.tile, u, *self.parameters())

    def extra_repr(self) -> str:
        return f"tile={self.tile}"


def tile_ssm(model: nn.Module, *, tile: int = DEFAULT_TILE) -> nn.Module:
    """Swap :class:`TiledMamba2Mixer` in for every Mamba-2 mixer of ``model`` (in place).

    Parameters are shared, not copied, so optimisers and state dicts are unaffected.
    Returns the model (a new module when ``model`` itself is a mixer). Mixers already
    tiled get the new tile. mamba-ssm's fused ``Mamba2`` cannot be tiled here: build the
    model with ``backend="torch"``.
    """
    tile = _check_tile(tile)
    if not isinstance(model, nn.Module):
        raise InputError(f"tile_ssm: expected an nn.Module, got {type(model).__name__}")
    base = _mixer_base()
    if isinstance(model, base):
        return TiledMamba2Mixer.from_mixer(model, tile)
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, TiledMamba2Mixer):
                child.tile = tile
                swapped += 1
            elif isinstance(child, base):
                setattr(parent, name, TiledMamba2Mixer.from_mixer(child, tile))
                swapped += 1
            elif type(child).__module__.startswith("mamba_ssm") and "Mamba" in type(
                    child).__name__:
                raise RewriteError(
                    f"tile_ssm: {path} is {type(child).__module__}.{type(child).__name__}, "
                    "whose fused kernels cannot be tiled here; build the model with "
                    "backend='torch' (lbi_fx.models.mamba2.Mamba2Mixer)")
    if not swapped:
        raise InputError(f"tile_ssm: {type(model).__name__} has no Mamba2Mixer "
                         "(lbi_fx.models.mamba2) to tile")
    return model


def n_tiles(length: int, tile: int) -> int:
    """Number of tiles (and of saved boundary states) for a sequence of ``length`` steps."""
    return math.ceil(length / tile)
