"""One tile of the selective scan from its boundary state: the forward, and the exact
backward that recomputes the tile and reads every gradient off the adjoint recurrence.
The tiled autograd op, the forward-mode pass and the benchmark's baselines all repeat
this unit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lbi_fx.pgf.scan import _adjoint_scan, _records, _scan_owned, linear_scan

_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: identity above it


def _softplus_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d softplus(x) applied to ``grad``, exactly as autograd does it (threshold included)."""
    return torch.ops.aten.softplus_backward(grad, x, 1.0, _SOFTPLUS_THRESHOLD)


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


def tile_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                 delta_bias: torch.Tensor | None = None, softplus: bool = False,
                 h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
