"""Log-depth (Hillis-Steele) scans of the linear recurrence inside a tile, forward and
adjoint.

Each level multiplies by ``exp`` of a *sum* of ``dt A`` over a window, never by the
exponential of a difference of prefix sums, so strong decay underflows to an exact 0
instead of overflowing as ``exp(-cumsum)`` would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
