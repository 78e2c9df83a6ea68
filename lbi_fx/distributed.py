"""Region parallelism for LBI models, and a pipeline-parallel baseline for comparison.

The K regions of an ``LBIModule`` are placed on the ranks of a process group in
contiguous groups (:func:`placement`). One training step (:meth:`RegionParallel.step`):

forward   every rank has the inputs and runs the prologue itself (canvas, m_0, masks come
          from the inputs alone); rank j receives m_k (B x r) from rank j-1, runs its
          regions in order and sends m_{k+1} (B x r) to rank j+1. The last rank runs the
          epilogue and the loss.
          Algorithm 2 (App. C): right after sending m_{k+1}, rank j builds J_k for its own
          regions while later ranks are still running their forward. On CPU ranks this is
          the whole overlap: it falls out of the placement, no threads or streams needed.
backward  the last rank seeds: epilogue backward, then one VJP through region K-1 gives
          mbar_{K-1} and that region's local gradients.
          Exchange 1: ONE all-gather of every rank's J_k, zero-padded to a common
          (B, slots, r, r) - the scan payload.
          Exchange 2: a broadcast of mbar_{K-1} (B x r) from the last rank.
          Each rank then runs ``suffix_scan`` over J_{k0} .. J_{K-2} (k0 = its first region),
          takes mbar_{k+1} = P_{k+1} mbar_{K-1}, runs its region-local VJPs, and sends the
          canvas / m_0 gradients back through its own copy of the prologue.
          Exchange 3: an all-reduce (sum) of the gradients of parameters used on more than
          one rank (the prologue and embedding, a tied head, ...).
          No rank ever sends an activation or activation-gradient of the hidden size.

:class:`Comm` wraps every send and collective and records its payload bytes per phase.
:class:`PipelineBaseline` runs ordinary backprop over the same placement, sending the
(B, L, D) hidden state forward and its gradient backward at every rank boundary.

Dropout: ranks draw their own RNG streams, so masks differ from a single-process run;
gradients are still exact for the masks drawn (each region replays its own RNG state).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.errors import InputError
from lbi_fx.kernels import suffix_scan
from lbi_fx.module import _leaf, _replayer
from lbi_fx.runtime import (
    ChainState,
    RegionCache,
    RngSnapshot,
    last_region_vjp,
    region_jacobian,
    region_local_vjp,
)

LBI_BACKWARD_PHASES = ("scan_allgather", "mbar_broadcast")
PIPELINE_BACKWARD_PHASES = ("pipe_backward_grad",)


def placement(K: int, world: int) -> list[list[int]]:
    """Contiguous region groups, one per rank; the first ``K % world`` ranks get one more
    (the last rank also runs the epilogue, so it gets the lighter share)."""
    if K < 1 or world < 1:
        raise InputError(f"placement needs K >= 1 and world >= 1, got K={K}, world={world}")
    if K < world:
        raise InputError(f"{K} regions cannot fill {world} ranks: use world size <= K")
    base, extra = divmod(K, world)
    out, k = [], 0
    for j in range(world):
        n = base + (1 if j < extra else 0)
        out.append(list(range(k, k + n)))
        k += n
    return out


# -- communication with byte accounting -----------------------------------------------

@dataclass
class CommRecord:
    """One send or collective as this rank saw it. ``bytes`` is the logical payload: a
    send's tensor, a broadcast's tensor, an all-reduce's buffer, an all-gather's full
    gathered result (what every rank ends up holding)."""

    phase: str
    op: str
    numel: int
    bytes: int
    shape: tuple


@dataclass
class Comm:
    """``torch.distributed`` calls that record their payload bytes per phase."""

    group: object = None
    records: list[CommRecord] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def _peer(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _log(self, phase: str, op: str, t: torch.Tensor, numel: int | None = None) -> None:
        n = t.numel() if numel is None else numel
        self.records.append(CommRecord(phase, op, n, n * t.element_size(), tuple(t.shape)))

    def isend(self, t: torch.Tensor, dst: int, phase: str):
        self._log(phase, "send", t)
        return dist.isend(t.contiguous(), self._peer(dst), group=self.group)

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Not recorded: the sender counts the transfer once."""
        dist.recv(t, self._peer(src), group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, phase: str) -> torch.Tensor:
        """(world, *t.shape)."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._log(phase, "all_gather", t, t.numel() * self.world)
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out)

    def broadcast(self, t: torch.Tensor, src: int, phase: str) -> torch.Tensor:
        self._log(phase, "broadcast", t)
        dist.broadcast(t, self._peer(src), group=self.group)
        return t

    def all_reduce(self, t: torch.Tensor, phase: str) -> torch.Tensor:
        self._log(phase, "all_reduce", t)
        dist.all_reduce(t, group=self.group)
        return t

    def local_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.phase] = out.get(r.phase, 0) + r.bytes
        return out

    def totals(self) -> dict[str, int]:
        """Bytes per phase over the whole group (collective): sends summed over senders,
        each collective counted once."""
        mine = {"p2p": {}, "coll": {}}
        for r in self.records:
            d = mine["p2p" if r.op == "send" else "coll"]
            d[r.phase] = d.get(r.phase, 0) + r.bytes
        every: list = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        out: dict[str, int] = dict(every[0]["coll"])
        for e in every:
            for ph, b in e["p2p"].items():
                out[ph] = out.get(ph, 0) + b
        return out


def _sum_shared(comm: Comm, params: Sequence[nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of parameters several ranks contribute to: one flat
    buffer per dtype. A rank that did not touch one contributes zeros."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in ps])
        comm.all_reduce(flat, "grad_allreduce")
        i = 0
        for p in ps:
            p.grad = flat[i: i + p.numel()].view_as(p).clone()
            i += p.numel()


def sync_from_rank0(comm: Comm, module: nn.Module) -> None:
    """Broadcast every parameter and buffer from rank 0 (phase ``init_broadcast``), as DDP
    does: the interface modules ``transform`` adds draw from the global RNG, so ranks that
    did not seed identically would otherwise hold different models."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            comm.broadcast(t.data, 0, "init_broadcast")


def _add_grad(p: torch.Tensor, g: torch.Tensor | None) -> None:
    if g is not None:
        p.grad = g.detach().clone() if p.grad is None else p.grad + g


def _trainable(gm: nn.Module) -> list[nn.Parameter]:
    return [p for p in dict.fromkeys(gm.parameters()) if p.requires_grad]


class _Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def __call__(self, key: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[key] = timer.t.get(key, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


# -- region parallelism ---------------------------------------------------------------

class RegionParallel:
    """Runs one ``LBIModule`` with its regions spread over a process group.

    Every rank holds the full module (same initialisation); rank j only computes with
    its own regions, the prologue, and (last rank) the epilogue. After :meth:`step` each
    rank's ``.grad`` is exact for the parameters it uses (:attr:`used`); parameters of
    other ranks' regions keep ``grad = None``.
    """

    def __init__(self, lbi: nn.Module, group=None, comm: Comm | None = None,
                 sync_params: bool = True):
        self.lbi = lbi
        self.comm = comm or Comm(group)
        self.rank, self.world = self.comm.rank, self.comm.world
        self.K = lbi.num_regions
        self.place = placement(self.K, self.world)
        self.owner = {k: j for j, ks in enumerate(self.place) for k in ks}
        self.slot = {k: i for ks in self.place for i, k in enumerate(ks)}
        self.mine = self.place[self.rank]
        self.last = self.world - 1
        c = lbi._build()
        names = {id(p): n for n, p in lbi.named_parameters()}
        users: dict[int, set[int]] = {}
        for p in _trainable(c["prologue"]):
            users.setdefault(id(p), set()).update(range(self.world))
        for p in _trainable(c["epilogue"]):
            users.setdefault(id(p), set()).add(self.last)
        for k, rgm in enumerate(c["regions"]):
            for p in _trainable(rgm):
                users.setdefault(id(p), set()).add(self.owner[k])
        self.users = {names[i]: sorted(u) for i, u in users.items()}
        params = dict(lbi.named_parameters())
        self.shared = [params[n] for n, u in self.users.items() if len(u) > 1]
        self.used = sorted(n for n, u in self.users.items() if self.rank in u)
        self._check_crossings()
        self.timings: dict[str, float] = {}
        if sync_params:
            sync_from_rank0(self.comm, lbi)

    def _check_crossings(self) -> None:
        """Only m_k may cross between ranks; anything else a region (or the epilogue)
        reads from another rank's region would need a hidden-size transfer."""
        spec = self.lbi._programs_spec
        made = {n: k for k, p in enumerate(spec.regions) for n in p.outputs}
        readers = [(k, p, self.owner[k]) for k, p in enumerate(spec.regions)]
        readers.append(("epilogue", spec.epilogue, self.last))
        for who, prog, rank in readers:
            for n in prog.inputs:
                src = made.get(n)
                if src is None or self.owner[src] == rank:
                    continue
                if who != "epilogue" and n == spec.m_nodes[who]:
                    continue
                raise InputError(
                    f"region {who} reads {n!r} from region {src} on another rank; only the "
                    "interface m_k may cross ranks")

    # forward ------------------------------------------------------------------------
    def _forward(self, inputs: Sequence, loss_fn: Callable) -> dict:
        lbi, comm, K, T = self.lbi, self.comm, self.K, _Timer()
        c, spec = lbi._build(), lbi._programs_spec
        with torch.enable_grad(), T("prologue"):
            pro = c["prologue"](*lbi._flatten(tuple(inputs), {}))
        pro_env = dict(zip(spec.prologue.outputs, pro))
        statics = [pro_env[n] for n in c["static_names"]]
        env = dict(pro_env)
        env.update(zip(c["static_names"], [_leaf(s) for s in statics]))
        m0 = pro_env[spec.m_nodes[0]]
        widths = [lbi.ranks[0], *lbi.ranks]
        keep = lbi.jacobian != "recompute"
        caches: list[RegionCache | None] = [None] * K
        k0 = self.mine[0]
        if k0 == 0:
            m = _leaf(m0, force=True)
        else:
            with T("recv_m"):
                m = comm.recv(m0.new_empty(m0.shape[0], widths[k0]), self.rank - 1)
            m.requires_grad_(True)
        with T("forward"):
            for k in self.mine:
                prog, rgm = spec.regions[k], c["regions"][k]
                env[spec.m_nodes[k]] = m
                args = [env[n] for n in prog.inputs]
                m_slot = prog.inputs.index(spec.m_nodes[k]) if spec.m_nodes[k] in prog.inputs else None
                rng = RngSnapshot.take(m.device)
                with torch.set_grad_enabled(keep):
                    res = rgm(*args)
                env.update(zip(prog.outputs, res))
                picks = ([prog.outputs.index(spec.m_nodes[k + 1])] if k < K - 1 else
                         [i for i, r in enumerate(res) if isinstance(r, torch.Tensor)])
                slots, names = lbi._static_slots(k)
                caches[k] = RegionCache(
                    m_in=m, outs=[res[i] for i in picks],
                    static=[(s, env[n]) for s, n in zip(slots, names)],
                    params=[(i, c["params"][i]) for i in c["region_params"][k]],
                    replay=_replayer(rgm, args, m_slot, picks, rng), kept=keep)
                if k < K - 1:
                    m = _leaf(caches[k].outs[0].detach(), force=True)
        sent = comm.isend(m.detach(), self.rank + 1, "forward_m") if self.mine[-1] < K - 1 else None
        state = ChainState(
            caches=caches, ranks=widths, n_static=len(statics), n_params=len(c["params"]),
            jacobian=lbi.jacobian, chunk=lbi.chunk, scan_backend=lbi.scan_backend,
            batched_ok=lbi._batched_ok, choice=lbi._jacobian_choice)
        # Algorithm 2, line 3: J_k as soon as region k's forward is done; the next rank
        # already has m_{k+1} and runs its forward meanwhile.
        with T("jacobian"):
            jac = {k: region_jacobian(state, k) for k in self.mine if k < K - 1}
        loss = None
        if self.rank == self.last:
            last_prog = spec.regions[K - 1]
            tensor_names = [n for n in last_prog.outputs if isinstance(env[n], torch.Tensor)]
            leaves = [o.detach().requires_grad_(o.requires_grad) for o in caches[K - 1].outs]
            epi_env = {**env, **pro_env, **dict(zip(tensor_names, leaves))}
            with torch.enable_grad(), T("epilogue"):
                out = c["epilogue"](*[epi_env[n] for n in spec.epilogue.inputs])
                info = lbi._pytree_info
                if info is not None and info.out_spec is not None:
                    out = pytree.tree_unflatten(list(out), info.out_spec)
                loss = loss_fn(out)
        else:
            leaves = []
        if sent is not None:
            with T("send_wait"):
                sent.wait()
        return dict(state=state, jac=jac, statics=statics, m0=m0, leaves=leaves, loss=loss,
                    widths=widths, timer=T)

    # backward -----------------------------------------------------------------------
    def _backward(self, f: dict) -> None:
        comm, K, T, state, widths = self.comm, self.K, f["timer"], f["state"], f["widths"]
        m0 = f["m0"]
        B, dtype, r = m0.shape[0], m0.dtype, state.r_max
        static_grads: list[torch.Tensor | None] = [None] * len(f["statics"])

        def apply(k: int, grads: Sequence) -> None:
            cache = state.caches[k]
            ns = len(cache.static)
            for (s, _), g in zip(cache.static, grads[:ns]):
                if g is not None:
                    static_grads[s] = g if static_grads[s] is None else static_grads[s] + g
            for (_, p), g in zip(cache.params, grads[ns:]):
                _add_grad(p, g)

        mbar_last = m0.new_zeros(B, widths[K - 1])
        if self.rank == self.last:
            with T("seed"):
                # retain: the epilogue may read prologue outputs, backwarded again below
                f["loss"].backward(retain_graph=True)
                seed = last_region_vjp(state, *[leaf.grad for leaf in f["leaves"]])
                mbar_last = seed[0].detach().to(dtype)
                apply(K - 1, seed[1:])
        payload = m0.new_zeros(B, max(len(p) for p in self.place), r, r)
        for k, J in f["jac"].items():
            payload[:, self.slot[k]] = J
        with T("allgather"):
            gathered = comm.all_gather(payload, "scan_allgather")
        with T("broadcast"):
            comm.broadcast(mbar_last, self.last, "mbar_broadcast")
        k0 = self.mine[0]
        mbar = {K - 1: mbar_last}
        if k0 < K - 1:
            with T("scan"):
                J = torch.stack([gathered[self.owner[k], :, self.slot[k]] for k in range(k0, K - 1)], 1)
                P = suffix_scan(J, state.scan_backend)           # P_k = J_k^T ... J_{K-2}^T
                g = F.pad(mbar_last, (0, r - mbar_last.shape[-1])).to(P.dtype)
                allm = torch.matmul(P, g[:, None, :, None]).squeeze(-1)
                for i, k in enumerate(range(k0, K - 1)):
                    mbar[k] = allm[:, i, : widths[k]].to(dtype)
        with T("local"):
            for k in self.mine:
                if k < K - 1:
                    apply(k, region_local_vjp(state, k, mbar[k + 1]))
        with T("prologue_bwd"):
            roots, grads = [], []
            for s, g in zip(f["statics"], static_grads):
                if g is not None and s.requires_grad:
                    roots.append(s)
                    grads.append(g)
            if k0 == 0 and m0.requires_grad:
                roots.append(m0)
                grads.append(mbar[0])
            if roots:
                torch.autograd.backward(roots, grads)
        with T("allreduce"):
            _sum_shared(comm, self.shared)

    def step(self, inputs: Sequence, loss_fn: Callable) -> float:
        """Forward + backward; fills ``.grad``; returns the loss (broadcast to every rank).
        Zero the gradients before calling (``optimizer.zero_grad()``)."""
        f = self._forward(inputs, loss_fn)
        self._backward(f)
        loss = f["loss"]
        val = (loss.detach().reshape(1).double() if loss is not None
               else f["m0"].new_zeros(1, dtype=torch.float64))
        self.comm.broadcast(val, self.last, "loss")
        self.timings = f["timer"].t
        return float(val)


# -- pipeline-parallel baseline ---------------------------------------------------------

class PipelineBaseline:
    """Ordinary backprop over the same placement, for a GPT-like model (``wte``, ``wpe``,
    ``drop``, ``layers``, ``ln_f``, ``head``, as in ``lbi_fx.models.transformer``): rank j
    receives the (B, L, D) hidden state, runs its blocks, sends it on; backward receives
    the (B, L, D) activation gradient and sends its own back. Parameters on several ranks
    (a tied head) are all-reduced like in :class:`RegionParallel`."""

    def __init__(self, model: nn.Module, regions: Sequence[Sequence[int]], group=None,
                 comm: Comm | None = None, sync_params: bool = True):
        self.model = model
        self.comm = comm or Comm(group)
        self.rank, self.world = self.comm.rank, self.comm.world
        self.place = placement(len(regions), self.world)
        self.layers = [i for k in self.place[self.rank] for i in regions[k]]
        self.last = self.world - 1
        uses: dict[int, set[int]] = {}
        stages = [(0, [model.wte, model.wpe]), (self.last, [model.ln_f, model.head])]
        for j, ks in enumerate(self.place):
            stages.append((j, [model.layers[i] for k in ks for i in regions[k]]))
        for j, mods in stages:
            for mod in mods:
                for p in mod.parameters():
                    uses.setdefault(id(p), set()).add(j)
        self.shared = [p for p in dict.fromkeys(model.parameters()) if len(uses.get(id(p), ())) > 1]
        self.timings: dict[str, float] = {}
        if sync_params:
            sync_from_rank0(self.comm, model)

    def step(self, idx: torch.Tensor, loss_fn: Callable, sync: bool = False) -> float:
        """``sync``: barrier between forward and backward, so ``timings['backward']`` on
        rank 0 is the wall time of the whole sequential backward chain."""
        m, comm, T = self.model, self.comm, _Timer()
        B, L, D = idx.shape[0], idx.shape[1], m.wte.embedding_dim
        dtype = m.wte.weight.dtype
        with T("forward"):
            if self.rank == 0:
                pos = torch.arange(L, device=idx.device)
                x_in = None
                x = m.drop(m.wte(idx) + m.wpe(pos))
            else:
                x_in = comm.recv(torch.empty(B, L, D, dtype=dtype, device=idx.device), self.rank - 1)
                x_in.requires_grad_(True)
                x = x_in
            for i in self.layers:
                x = m.layers[i](x)
            if self.rank < self.last:
                comm.isend(x.detach(), self.rank + 1, "pipe_forward_act").wait()
                loss = None
            else:
                loss = loss_fn(m.head(m.ln_f(x)))
        if sync:
            dist.barrier(group=comm.group)
        with T("backward"):
            if self.rank == self.last:
                loss.backward()
            else:
                g = comm.recv(torch.empty(B, L, D, dtype=dtype, device=idx.device), self.rank + 1)
                x.backward(g)
            if x_in is not None:
                comm.isend(x_in.grad, self.rank - 1, "pipe_backward_grad").wait()
        with T("allreduce"):
            _sum_shared(comm, self.shared)
        val = (loss.detach().reshape(1).double() if loss is not None
               else torch.zeros(1, dtype=torch.float64, device=idx.device))
        comm.broadcast(val, self.last, "loss")
        self.timings = T.t
        return float(val)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for spawning loopback process groups)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
