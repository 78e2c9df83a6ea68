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

from lbi_fx.choices import RegionChoices
from lbi_fx.errors import HigherOrderError, InternalError, LBIError, NonFiniteError
from lbi_fx.failures import classify, region_of, without_fx_dumps

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
    params: list[tuple[int, torch.Tensor]]  # (index into chain params, the region's alias of it)
    replay: Callable[[torch.Tensor], list[torch.Tensor]] | None = None  # rerun from m_k
    kept: bool = True                       # ``outs`` carry the forward graph
    # Leading rows of m_{k+1} that depend on m_k alone, not on the region (a causal
    # interface's row 0 pools an empty prefix): their Jacobian rows come from this small
    # function of m_k instead of VJPs through the region.
    head: int = 0
    head_rows: Callable[[torch.Tensor], torch.Tensor] | None = None


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
    record: dict | None = None       # J_k and suffix products of this backward (spectra)
    retain: bool = False             # the outer backward's retain_graph: keep region graphs
    choices: RegionChoices | None = None  # owner of ``choice`` and ``batched_ok`` (the module's)

    def __post_init__(self) -> None:
        # One place for the per-region decisions: ``choice``/``batched_ok`` are the dicts
        # of ``choices`` (the module's ``RegionChoices``, cleared by .to()/.train()/...).
        if self.choices is None:
            self.choices = RegionChoices(jacobian=self.choice, batched=self.batched_ok)
        self.choice, self.batched_ok = self.choices.jacobian, self.choices.batched

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
    basis = _basis(out.shape[-1], out)[cache.head:]
    rows = None
    if state.batched_ok.get(k, True):
        try:
            rows = torch.autograd.grad(out, m_in, basis, retain_graph=True,
                                       is_grads_batched=True, allow_unused=True)[0]
            state.batched_ok[k] = True
        except _AD_ERRORS as exc:  # CUDA out-of-memory included: rows for good, reported
            state.batched_ok[k] = False
            state.choices.fell_back(k, "reuse-batched", exc)
    if not state.batched_ok[k]:
        rows = torch.stack([
            _zeros_if_none(torch.autograd.grad(out, m_in, b, retain_graph=True,
                                               allow_unused=True)[0], m_in)
            for b in basis
        ])
    rows = _zeros_if_none(rows, m_in.expand(basis.shape[0], *m_in.shape))
    return _with_head(cache, rows).permute(1, 0, 2)


def _with_head(cache: RegionCache, rows: torch.Tensor) -> torch.Tensor:
    """Prepend the rows of J_k that ``cache.head_rows`` gives without the region."""
    if not cache.head:
        return rows
    m = cache.m_in.detach().requires_grad_(True)
    with torch.enable_grad():
        top = cache.head_rows(m)
        head = torch.stack([torch.autograd.grad(top, m, b, retain_graph=True)[0]
                            for b in _basis(cache.head, top)])
    return torch.cat([head, rows])


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
    for i in range(cache.head, r_out, chunk):
        c = min(chunk, r_out - i)
        reps = m.unsqueeze(0).expand(c, *m.shape).clone().requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            # ops without a vmap batching rule fall back to a loop: slower, still exact
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            out = torch.func.vmap(lambda mm: cache.replay(mm)[0], randomness="same")(reps)
            (g,) = torch.autograd.grad(out, reps, basis[i: i + c], allow_unused=True)
        rows.append(_zeros_if_none(g, reps))
    return _with_head(cache, torch.cat(rows)).permute(1, 0, 2)


_JACOBIANS = {"reuse": _jac_reuse, "forward": _jac_forward, "recompute": _jac_recompute}


def _probe(state: ChainState, k: int) -> tuple[str, torch.Tensor]:
    """``auto``'s probe of region k. What fails while it runs is a finding (a strategy
    unsupported here, e.g. forward mode through CPU flash attention), not a fallback:
    ``explain()`` lists it, no ``FallbackWarning`` is raised."""
    state.choices.probing = True
    try:
        return _probe_all(state, k)
    finally:
        state.choices.probing = False


def _probe_all(state: ChainState, k: int) -> tuple[str, torch.Tensor]:
    """``auto``: time forward mode, batched VJPs and one VJP per row; keep the fastest
    that works (on CPU, batching r small VJPs often gains nothing). Each is timed on its
    faster of two calls: the first call of a strategy in a process pays one-off set-up
    (forward mode's first ``jvp`` under ``vmap`` takes seconds), which would otherwise
    decide region 0's choice."""
    best = None
    state.choices.probe_runs += 1
    timings = state.choices.probes.setdefault(k, {})
    for name, batched in (("forward", None), ("reuse", True), ("reuse", False)):
        label = name if batched is None else f"reuse-{'batched' if batched else 'rows'}"
        if batched is not None:
            state.batched_ok[k] = batched
        dt = float("inf")
        try:
            # FX prints the failing line of generated code to stderr before re-raising;
            # a failed probe is expected (an op without a forward-mode rule), so hush it.
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(2):
                    t0 = time.perf_counter()
                    jac = _JACOBIANS[name](state, k)
                    dt = min(dt, time.perf_counter() - t0)
        except _AD_ERRORS as exc:  # muted above, listed by explain()
            timings[label] = "failed"
            state.choices.fell_back(k, label, exc)
            continue
        if batched is not None and not state.batched_ok[k] and batched:
            timings[label] = "failed"
            continue  # batched VJPs failed and fell back to rows: timed below
        timings[label] = dt
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
        with without_fx_dumps():  # a failure becomes a refusal or an InternalError below
            return _JACOBIANS[strategy](state, k)
    except _AD_ERRORS as exc:
        raise classify(exc, state.caches[k], f"region {k} (jacobian={strategy!r})",
                       strategy) from exc


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
    state.choices.flush(k)  # a fallback decided above: one FallbackWarning per cause
    if state.check_finite and not torch.isfinite(jac).all():
        raise NonFiniteError(
            f"interface Jacobian J_{k} of region {k} has NaN or Inf entries: look for "
            f"overflow or a division by zero inside region {k}")
    if state.record is not None:
        state.record.setdefault("J", {})[k] = jac.detach()
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
                                        allow_unused=True, retain_graph=state.retain)
        # None (not zeros) when the last region ignores m_{K-1}: autograd gives earlier
        # regions no gradient at all then, and neither may we.
        return (grads[0], *_scatter(cache, grads[1:]))


def stack_jacobians(jacobians: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, K-1, r, r): the scan's input layout, one chain per sample."""
    return torch.stack(list(jacobians), dim=1)


def interface_adjoints(state: ChainState, suffix: torch.Tensor, mbar_last: torch.Tensor | None,
                       start: int = 0) -> list:
    """mbar_k = P_k mbar_{K-1} for k = start.., each cut back to its width r_k. ``start``:
    the suffix products begin at P_start (a rank of ``RegionParallel`` scans only the
    Jacobians from its first region on). None throughout when mbar_{K-1} is None (the last
    region ignores m_{K-1}): earlier regions get no gradient, as under autograd."""
    if state.record is not None:
        state.record["P"] = suffix.detach()
    if mbar_last is None:
        return [None] * (len(state.ranks) - start)
    g = _pad(mbar_last, state.r_max).to(suffix.dtype)
    allm = torch.matmul(suffix, g[:, None, :, None]).squeeze(-1)  # (B, K - start, r)
    return [allm[:, i, : state.ranks[start + i]] for i in range(allm.shape[1])]


def region_local_vjp(state: ChainState, k: int, mbar_next: torch.Tensor) -> tuple:
    """Phase 3: region k's parameter and static-input gradients, seeded with mbar_{k+1}."""
    state.where = f"region {k} (local VJP)"
    with _clock(state, f"local_{k}"):
        cache = state.caches[k]
        inputs = _inputs_of(cache, False)
        if not inputs or mbar_next is None:
            return _scatter(cache, [None] * len(inputs))
        (out,) = _graph_outs(cache, cache.m_in)[:1]
        grads = torch.autograd.grad(out, inputs, mbar_next, allow_unused=True,
                                    retain_graph=state.retain)
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
        # Saved only so autograd owns their lifetime: a second backward without
        # retain_graph then fails with PyTorch's own message, as plain autograd does.
        ctx.save_for_backward(m0, *flat)
        # Fresh tensors: the epilogue may modify them without touching the saved graphs.
        result = tuple(o.detach().clone() for o in outs)
        ctx.mark_non_differentiable(*[o for o in result if not o.dtype.is_floating_point])
        # An output the loss never reaches gets None, not zeros: a zero cotangent would give
        # the parameters behind it zero gradients where plain autograd gives None (and
        # optimizers treat the two differently: AdamW decays and steps a zero gradient).
        ctx.set_materialize_grads(False)
        return result

    @staticmethod
    def backward(ctx, *grad_outs):
        inputs = ctx.saved_tensors
        state = ctx.state
        # retain_graph=True (or create_graph=True): the region graphs must survive this
        # pass; otherwise they go now, as the outer graph's saved tensors do.
        state.retain = torch._C._autograd._get_current_graph_task_keep_graph()
        if not state.retain:
            ctx.state = None
        grads = ctx_runner_backward(state, grad_outs)
        if torch.is_grad_enabled():  # create_graph=True
            grads = _first_order_only(grads, [*inputs, *grad_outs])
        return (None, None, *grads)


class _RefuseHigherOrder(torch.autograd.Function):
    """Passes the scan backward's gradients through; differentiating them raises.

    The generated backward is exact to first order only: its region graphs are built on
    detached copies of m_k, so a second-order term through the chain would be silently
    dropped. Like ``once_differentiable``, but the error is an ``LBIError`` that says
    what to do, and it is raised only if a second backward actually reaches the chain.
    """

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise HigherOrderError(
            "the scan backward of an LBI module gives first-order gradients only, and a "
            "gradient of its gradients (create_graph=True, then a backward through them: "
            "gradient penalties, Hessian-vector products) reached its interface chain. Set "
            "lbi.backward = 'autograd' for such steps: same modules and parameters, plain "
            "reverse mode, any order")


def _first_order_only(grads: Sequence[torch.Tensor | None], anchors: Sequence) -> tuple:
    """Under create_graph=True: tie the gradients to a node that refuses a second order."""
    anchors = [a for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad]
    present = [i for i, g in enumerate(grads) if g is not None]
    if not anchors or not present:
        return tuple(grads)
    guarded = _RefuseHigherOrder.apply(len(present), *[grads[i] for i in present], *anchors)
    out = list(grads)
    for i, g in zip(present, guarded):
        out[i] = g
    return tuple(out)


def ctx_runner_backward(state: ChainState, grad_outs: Sequence[torch.Tensor]) -> tuple:
    program = state.backward_program  # set by the runner: an fx.GraphModule
    with torch.enable_grad():
        try:
            return tuple(program(state, *grad_outs))
        except (LBIError, InternalError):
            raise
        except Exception as exc:  # noqa: BLE001 - a refusal only if plain PyTorch fails too
            k = region_of(state.where)
            cache = state.caches[k] if k is not None and k < len(state.caches) else None
            strategy = "reuse"
            if "Jacobian" in state.where:
                strategy = state.choice.get(k, state.jacobian)
                strategy = "reuse" if strategy == "auto" else strategy
            raise classify(exc, cache, f"the scan backward in {state.where or 'the chain'}",
                           strategy) from exc
