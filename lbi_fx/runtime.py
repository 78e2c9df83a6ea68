"""Run-time of the LBI chain: the ``autograd.Function`` and the phase operations that
the generated backward graph calls.

Forward runs region programs one after another on *detached* copies of m_k and the
static inputs, keeping each region's graph as its forward cache C_k (the ``reuse``
Jacobian strategy: no recomputation). Backward is ``backward_graph``: phase 1 builds
J_k per region, phase 2 seeds mbar_{K-1} from the last region and runs the suffix scan,
phase 3 runs one VJP per region seeded with mbar_{k+1}. Region caches never touch each
other, so phases 1 and 3 are independent across regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lbi_fx.errors import NonFiniteError


@dataclass
class RegionCache:
    """C_k: what region k's backward needs, all local to region k."""

    m_in: torch.Tensor                      # leaf (B, r_k)
    outs: list[torch.Tensor]                # m_{k+1} (k < K-1) or the last region's outputs
    static: list[tuple[int, torch.Tensor]]  # (index into chain statics, leaf)
    params: list[tuple[int, torch.Tensor]]  # (index into chain params, parameter)


@dataclass
class ChainState:
    """Everything ``backward_graph`` reads: one object, passed as its first input."""

    caches: list[RegionCache]
    ranks: list[int]                        # widths of m_0 .. m_{K-1}
    n_static: int
    n_params: int
    jacobian: str = "auto"
    scan_backend: str = "auto"
    check_finite: bool = False
    batched_ok: dict = field(default_factory=dict)
    backward_program: object = None  # the generated backward fx.GraphModule

    @property
    def r_max(self) -> int:
        return max(self.ranks)


def _inputs_of(cache: RegionCache, with_m: bool) -> list[torch.Tensor]:
    xs = [t for _, t in cache.static if t.requires_grad] + [p for _, p in cache.params]
    return ([cache.m_in] if with_m else []) + xs


def _scatter(cache: RegionCache, grads: Sequence[torch.Tensor | None]) -> tuple:
    """Map grads of ``_inputs_of(cache, False)`` back to (static..., param...) slots."""
    it = iter(grads)
    out = []
    for _, t in cache.static:
        out.append(next(it) if t.requires_grad else None)
    for _ in cache.params:
        out.append(next(it))
    return tuple(out)


def region_jacobian(state: ChainState, k: int) -> torch.Tensor:
    """Phase 1: J_k = dm_{k+1}/dm_k per sample, (B, r_{k+1}, r_k), zero-padded to r_max.

    r batched VJPs over the saved region graph (``is_grads_batched``); regions whose ops
    lack batching rules (custom autograd Functions) fall back to one VJP per row.
    """
    cache = state.caches[k]
    out, m_in = cache.outs[0], cache.m_in
    r_out = out.shape[-1]
    basis = torch.eye(r_out, dtype=out.dtype, device=out.device)
    basis = basis[:, None, :].expand(r_out, *out.shape).contiguous()
    rows = None
    if state.batched_ok.get(k, True):
        try:
            rows = torch.autograd.grad(out, m_in, basis, retain_graph=True,
                                       is_grads_batched=True, allow_unused=True)[0]
            state.batched_ok[k] = True
        except (RuntimeError, NotImplementedError):
            state.batched_ok[k] = False
    if rows is None and not state.batched_ok.get(k, True):
        rows = torch.stack([
            _zeros_if_none(torch.autograd.grad(out, m_in, basis[i], retain_graph=True,
                                               allow_unused=True)[0], m_in)
            for i in range(r_out)
        ])
    rows = _zeros_if_none(rows, m_in.expand(r_out, *m_in.shape))
    jac = rows.permute(1, 0, 2)
    if state.check_finite and not torch.isfinite(jac).all():
        raise NonFiniteError(f"interface Jacobian J_{k} of region {k} has NaN or Inf entries")
    return _pad(jac, state.r_max)


def last_region_vjp(state: ChainState, *grad_outs: torch.Tensor) -> tuple:
    """Phase 2 seed: one VJP through the last region with the epilogue's gradient. It
    gives mbar_{K-1} and, in the same pass, the last region's local gradients."""
    cache = state.caches[-1]
    pairs = [(o, g) for o, g in zip(cache.outs, grad_outs) if o.requires_grad and g is not None]
    inputs = _inputs_of(cache, True)
    if not pairs:
        grads = [None] * len(inputs)
    else:
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                    allow_unused=True)
    mbar = _zeros_if_none(grads[0], cache.m_in)
    return (mbar, *_scatter(cache, grads[1:]))


def stack_jacobians(jacobians: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, K-1, r, r): the scan's input layout, one chain per sample."""
    return torch.stack(list(jacobians), dim=1)


def interface_adjoints(state: ChainState, suffix: torch.Tensor, mbar_last: torch.Tensor) -> list:
    """mbar_k = P_k mbar_{K-1} for k = 0..K-1, each cut back to its width r_k."""
    g = _pad(mbar_last, state.r_max)
    allm = torch.matmul(suffix, g[:, None, :, None]).squeeze(-1)  # (B, K, r)
    return [allm[:, k, : state.ranks[k]] for k in range(allm.shape[1])]


def region_local_vjp(state: ChainState, k: int, mbar_next: torch.Tensor) -> tuple:
    """Phase 3: region k's parameter and static-input gradients, seeded with mbar_{k+1}."""
    cache = state.caches[k]
    inputs = _inputs_of(cache, False)
    if not inputs:
        return _scatter(cache, [])
    grads = torch.autograd.grad(cache.outs[0], inputs, mbar_next, allow_unused=True)
    return _scatter(cache, grads)


def accumulate(*shares: torch.Tensor | None) -> torch.Tensor | None:
    """Sum the regions' shares of one shared input (tied weights, the canvas)."""
    total = None
    for s in shares:
        if s is not None:
            total = s if total is None else total + s
    return total


def _pad(x: torch.Tensor, r: int) -> torch.Tensor:
    pads = []
    for d in (x.shape[-1], x.shape[-2] if x.dim() == 3 else None):
        if d is not None:
            pads += [0, r - d]
    return F.pad(x, pads) if any(pads) else x


def _zeros_if_none(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if x is None else x


class LBIChain(torch.autograd.Function):
    """The interface chain m_0 -> region 0 -> ... -> region K-1 as one autograd node.

    Inputs: (runner, call, m_0, *static tensors, *parameters). Its backward runs the
    generated ``backward_graph`` instead of reverse mode through the regions.
    """

    @staticmethod
    def forward(ctx, runner, call, m0, *flat):
        static, params = flat[: runner.n_static], flat[runner.n_static:]
        with torch.enable_grad():
            state, outs = runner.run_chain(call, m0, static, params, keep=True)
        ctx.state = state
        # Fresh tensors: the epilogue may modify them without touching the saved graphs.
        result = tuple(o.detach().clone() for o in outs)
        ctx.mark_non_differentiable(*[o for o in result if not o.dtype.is_floating_point])
        return result

    @staticmethod
    def backward(ctx, *grad_outs):
        state = ctx.state
        del ctx.state
        grads = ctx_runner_backward(state, grad_outs)
        return (None, None, *grads)


def ctx_runner_backward(state: ChainState, grad_outs: Sequence[torch.Tensor]) -> tuple:
    program = state.backward_program  # set by the runner: an fx.GraphModule
    with torch.enable_grad():
        return tuple(program(state, *grad_outs))
