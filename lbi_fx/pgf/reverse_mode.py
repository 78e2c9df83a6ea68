"""Reverse mode: ``selective_scan``, a custom autograd op that saves only the inputs and
one state per tile, and in backward recomputes the tiles in reverse, so no per-step
activation and no autograd graph of a tile is ever kept.
"""

from __future__ import annotations

import torch

from lbi_fx.pgf.inputs import _check_scan_inputs, _check_tile, _compute_dtype, _tiles, _to
from lbi_fx.pgf.tile import _tile_backward, tile_forward


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
