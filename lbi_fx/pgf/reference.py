"""The per-step reference loop: the ground truth of the tests and the paper's autograd
baseline, kept as plain autograd code so that it shares no recurrence with the tiled
passes it checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lbi_fx.pgf.inputs import _check_scan_inputs, _compute_dtype, _to
from lbi_fx.pgf.tile import _dt


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
