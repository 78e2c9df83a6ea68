"""Run-time of the LBI chain: the ``autograd.Function`` and the phase operations that
the generated backward graph calls.

Forward runs region programs one after another on *detached* copies of m_k and the
static inputs. What it keeps per region (the forward cache C_k) depends on the Jacobian
strategy:

* ``reuse``     the region's autograd graph; J_k from r batched VJPs over it
  (``is_grads_batched``), no recomputation, memory as in autograd;
* ``forward``   the graph too (for the local VJP); J_k by forward mode, ``jvp`` under
  ``vmap`` with the r tangents in a batch axis, one primal recomputation;
* ``recompute`` only m_k, the static inputs and the RNG state; J_k from reruns of the
  region on c replicas at a time (``vmap``, same dropout masks in every replica) and one
  VJP per chunk, the paper's method; the local VJP reruns the region once more. Memory:
  one region's activations x c;
* ``auto``      keeps the graph, probes forward mode and batched VJPs once per region and
  caches the faster one that works (CPU flash attention, for one, has no forward-mode rule).

Backward is ``backward_graph``: phase 1 builds J_k per region, phase 2 seeds mbar_{K-1}
from the last region and runs the suffix scan, phase 3 runs one VJP per region seeded
with mbar_{k+1}. Region caches never touch each other, so phases 1 and 3 are independent
across regions. Every strategy is exact, dropout included: reruns replay the RNG state
the region saw in the forward.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lbi_fx.errors import NonFiniteError, RewriteError

STRATEGIES = ("auto", "reuse", "forward", "recompute")
_AD_ERRORS = (RuntimeError, NotImplementedError)


@dataclass
class RngSnapshot:
    """RNG and autocast state a region saw in the forward, so reruns draw the same
    dropout masks and compute in the same dtypes."""

    cpu: torch.Tensor
    cuda: tuple[int, torch.Tensor] | None = None
    autocast: dict = field(default_factory=dict)  # device type -> (enabled, dtype)

    @staticmethod
    def take(device: torch.device) -> RngSnapshot:
        cuda = None
        if device.type == "cuda":
            idx = device.index if device.index is not None else torch.cuda.current_device()
            cuda = (idx, torch.cuda.get_rng_state(idx))
        amp = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
               for d in {"cpu", device.type}}
        return RngSnapshot(torch.get_rng_state(), cuda, amp)

    @contextmanager
    def replay(self):
        devices = [self.cuda[0]] if self.cuda else []
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            for dev, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])
            yield


@dataclass
class RegionCache:
    """C_k: what region k's backward needs, all local to region k."""

    m_in: torch.Tensor                      # leaf (B, r_k)
    outs: list[torch.Tensor]                # m_{k+1} (k < K-1) or the last region's outputs
    static: list[tuple[int, torch.Tensor]]  # (index into chain statics, leaf)
    params: list[tuple[int, torch.Tensor]]  # (index into chain params, parameter)
    replay: Callable[[torch.Tensor], list[torch.Tensor]] | None = None  # rerun from m_k
    kept: bool = True                       # ``outs`` carry the forward graph


@dataclass
class ChainState:
    """Everything ``backward_graph`` reads: one object, passed as its first input."""

    caches: list[RegionCache]
    ranks: list[int]                        # widths of m_0 .. m_{K-1}
    n_static: int
    n_params: int
    jacobian: str = "auto"
    chunk: int | None = None
    scan_backend: str = "auto"
    check_finite: bool = False
    batched_ok: dict = field(default_factory=dict)   # region -> batched VJPs work
    choice: dict = field(default_factory=dict)       # region -> strategy picked by auto
    timings: dict | None = None                      # phase -> seconds, when profiling
    backward_program: object = None  # the generated backward fx.GraphModule
    where: str = ""                  # the region a phase is working on (for error messages)

    @property
    def r_max(self) -> int:
        return max(self.ranks)


@contextmanager
def _clock(state: ChainState, key: str):
    if state.timings is None:
        yield
        return
    t0 = time.perf_counter()
    yield
    state.timings.setdefault(key, []).append(time.perf_counter() - t0)


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


def _basis(r: int, like: torch.Tensor) -> torch.Tensor:
    """(r, *like.shape): direction i is e_i for every sample."""
    eye = torch.eye(r, dtype=like.dtype, device=like.device)
    return eye[:, None, :].expand(r, *like.shape).contiguous()


def _jac_reuse(state: ChainState, k: int) -> torch.Tensor:
    """Rows of J_k by r VJPs over the saved graph, batched when the ops allow it."""
    cache = state.caches[k]
    out, m_in = cache.outs[0], cache.m_in
    basis = _basis(out.shape[-1], out)
    rows = None
    if state.batched_ok.get(k, True):
        try:
            rows = torch.autograd.grad(out, m_in, basis, retain_graph=True,
                                       is_grads_batched=True, allow_unused=True)[0]
            state.batched_ok[k] = True
        except _AD_ERRORS:
            state.batched_ok[k] = False
    if not state.batched_ok[k]:
        rows = torch.stack([
            _zeros_if_none(torch.autograd.grad(out, m_in, b, retain_graph=True,
                                               allow_unused=True)[0], m_in)
            for b in basis
        ])
    rows = _zeros_if_none(rows, m_in.expand(basis.shape[0], *m_in.shape))
    return rows.permute(1, 0, 2)


def _jac_forward(state: ChainState, k: int) -> torch.Tensor:
    """Columns of J_k by forward mode: ``jvp`` under ``vmap`` over the r tangents."""
    cache = state.caches[k]
    m = cache.m_in.detach()

    def column(t):
        return torch.func.jvp(lambda mm: cache.replay(mm)[0], (m,), (t,))[1]

    with torch.no_grad():
        cols = torch.func.vmap(column, randomness="same")(_basis(m.shape[-1], m))
    return cols.permute(1, 2, 0)


def _jac_recompute(state: ChainState, k: int) -> torch.Tensor:
    """Rows of J_k from reruns on c replicas of the batch and one VJP per chunk."""
    cache = state.caches[k]
    m = cache.m_in.detach()
    r_out = state.ranks[k + 1]
    # Default c: one region x c replicas stays under the K regions autograd keeps alive.
    chunk = max(1, min(state.chunk or len(state.caches) // 2, r_out))
    basis = _basis(r_out, m.new_empty(m.shape[0], r_out))
    rows = []
    for i in range(0, r_out, chunk):
        c = min(chunk, r_out - i)
        reps = m.unsqueeze(0).expand(c, *m.shape).clone().requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            # ops without a vmap batching rule fall back to a loop: slower, still exact
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            out = torch.func.vmap(lambda mm: cache.replay(mm)[0], randomness="same")(reps)
            (g,) = torch.autograd.grad(out, reps, basis[i: i + c], allow_unused=True)
        rows.append(_zeros_if_none(g, reps))
    return torch.cat(rows).permute(1, 0, 2)


_JACOBIANS = {"reuse": _jac_reuse, "forward": _jac_forward, "recompute": _jac_recompute}


def _probe(state: ChainState, k: int) -> tuple[str, torch.Tensor]:
    """``auto``: time forward mode, batched VJPs and one VJP per row once; keep the
    fastest that works (on CPU, batching r small VJPs often gains nothing)."""
    best = None
    for name, batched in (("forward", None), ("reuse", True), ("reuse", False)):
        if batched is not None:
            state.batched_ok[k] = batched
        t0 = time.perf_counter()
        try:
            # FX prints the failing line of generated code to stderr before re-raising;
            # a failed probe is expected (an op without a forward-mode rule), so hush it.
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                jac = _JACOBIANS[name](state, k)
        except _AD_ERRORS:
            continue
        dt = time.perf_counter() - t0
        if batched is not None and not state.batched_ok[k] and batched:
            continue  # batched VJPs failed and fell back to rows: timed below
        if best is None or dt < best[0]:
            best = (dt, name, jac, batched)
    if best is None:  # nothing works: let reuse raise its own error
        return "reuse", _explicit(state, k, "reuse")
    state.choice[k] = best[1]
    if best[3] is not None:
        state.batched_ok[k] = best[3]
    return best[1], best[2]


def _explicit(state: ChainState, k: int, strategy: str) -> torch.Tensor:
    try:
        return _JACOBIANS[strategy](state, k)
    except _AD_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RewriteError(
            f"jacobian={strategy!r} cannot differentiate region {k}: {first}. Use "
            "jacobian='auto' (falls back per region) or 'reuse'") from exc


def region_jacobian(state: ChainState, k: int) -> torch.Tensor:
    """Phase 1: J_k = dm_{k+1}/dm_k per sample, (B, r_{k+1}, r_k), zero-padded to r_max."""
    state.where = f"region {k} (Jacobian)"
    with _clock(state, f"jacobian_{k}"):
        strategy = state.jacobian
        if strategy == "auto" and k in state.choice:
            strategy = state.choice[k]
        if strategy == "auto":
            _, jac = _probe(state, k)
        else:
            jac = _explicit(state, k, strategy)
    if state.check_finite and not torch.isfinite(jac).all():
        raise NonFiniteError(
            f"interface Jacobian J_{k} of region {k} has NaN or Inf entries: look for "
            f"overflow or a division by zero inside region {k}")
    return _pad(jac, state.r_max)


def _graph_outs(cache: RegionCache, m: torch.Tensor) -> list[torch.Tensor]:
    """The region's outputs with an autograd graph: the saved one, or a rerun from m."""
    if cache.kept:
        return cache.outs
    with torch.enable_grad():
        return cache.replay(m)


def last_region_vjp(state: ChainState, *grad_outs: torch.Tensor) -> tuple:
    """Phase 2 seed: one VJP through the last region with the epilogue's gradient. It
    gives mbar_{K-1} and, in the same pass, the last region's local gradients."""
    state.where = f"region {len(state.caches) - 1} (seed VJP)"
    with _clock(state, "seed"):
        cache = state.caches[-1]
        outs = _graph_outs(cache, cache.m_in)
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if o.requires_grad and g is not None]
        inputs = _inputs_of(cache, True)
        if not pairs:
            grads = [None] * len(inputs)
        else:
            grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                        allow_unused=True)
        # None (not zeros) when the last region ignores m_{K-1}: autograd gives earlier
        # regions no gradient at all then, and neither may we.
        return (grads[0], *_scatter(cache, grads[1:]))


def stack_jacobians(jacobians: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, K-1, r, r): the scan's input layout, one chain per sample."""
    return torch.stack(list(jacobians), dim=1)


def interface_adjoints(state: ChainState, suffix: torch.Tensor, mbar_last: torch.Tensor) -> list:
    """mbar_k = P_k mbar_{K-1} for k = 0..K-1, each cut back to its width r_k."""
    if mbar_last is None:
        return [None] * len(state.ranks)
    g = _pad(mbar_last, state.r_max).to(suffix.dtype)
    allm = torch.matmul(suffix, g[:, None, :, None]).squeeze(-1)  # (B, K, r)
    return [allm[:, k, : state.ranks[k]] for k in range(allm.shape[1])]


def region_local_vjp(state: ChainState, k: int, mbar_next: torch.Tensor) -> tuple:
    """Phase 3: region k's parameter and static-input gradients, seeded with mbar_{k+1}."""
    state.where = f"region {k} (local VJP)"
    with _clock(state, f"local_{k}"):
        cache = state.caches[k]
        inputs = _inputs_of(cache, False)
        if not inputs or mbar_next is None:
            return _scatter(cache, [None] * len(inputs))
        (out,) = _graph_outs(cache, cache.m_in)[:1]
        grads = torch.autograd.grad(out, inputs, mbar_next, allow_unused=True)
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
            state, outs = runner.run_chain(call, m0, static, params)
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
        try:
            return tuple(program(state, *grad_outs))
        except RuntimeError as exc:
            where = state.where or "the chain"
            raise RewriteError(
                f"the scan backward failed in {where}: {str(exc).strip().splitlines()[0]}. "
                "An in-place op on a tensor the region saved for backward is the usual cause: "
                "use the out-of-place op in that region") from exc
