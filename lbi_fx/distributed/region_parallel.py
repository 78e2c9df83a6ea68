"""``RegionParallel``: one ``LBIModule`` trained with its K regions spread over the ranks
of a group, so that no rank ever sends an activation or activation-gradient of the hidden
size - only m_k and r-sized exchanges cross ranks.

One training step (:meth:`RegionParallel.step`), regions placed by
:func:`~lbi_fx.distributed.mesh.placement`:

forward   every rank has the inputs and runs the prologue itself (canvas, m_0, masks come
          from the inputs alone); rank j receives m_k (B x r) from rank j-1, runs its
          regions in order and sends m_{k+1} (B x r) to rank j+1. The last rank runs the
          epilogue and the loss.
          Algorithm 2 (App. C): right after sending m_{k+1}, rank j builds J_k for its own
          regions while later ranks are still running their forward. On CPU ranks this is
          the whole overlap: it falls out of the placement, no threads or streams needed.
backward  the last rank seeds: epilogue backward, then one VJP through region K-1 gives
          mbar_{K-1} and that region's local gradients. The exchanges
          (:mod:`~lbi_fx.distributed.exchange`) give each rank mbar at its boundaries; it
          runs its region-local VJPs and sends the canvas / m_0 gradients back through its
          own copy of the prologue. Exchange 3 (:mod:`~lbi_fx.distributed.grads`) sums
          the gradients of parameters used on more than one rank; none with
          ``transform(..., canvas_weights="per_region")``, where each region has its own
          copy of the canvas weights (``LBIModule.prologue_param_users`` says who uses what).

Every rank runs its regions with the single-process runtime itself
(``LBIModule.run_regions`` / ``chain_state``, ``lbi_fx.runtime``): only the exchanges
are this package's.

Data parallelism: with ``mesh=`` (a ``DeviceMesh`` with dims ``("dp", "region")``) each dp
replica runs the chain above over its ``mesh["region"]`` ranks on its own shard of the
batch (:func:`shard_batch`), and gradients are averaged over ``mesh["dp"]`` as DDP does.

Micro-batches (``microbatches=M``): the step's rows are cut into M micro-batches that
flow through the chain one after another, so rank j runs micro-batch i+1 (and builds its
J_k for micro-batch i right after that forward, Algorithm 2) while rank j+1 runs i; the
last rank seeds each micro-batch's backward as soon as its loss is known.

Failures are published through :class:`~lbi_fx.distributed.watch.Watch`: a rank whose
step raises tells the others, which end theirs with ``PeerFailedError``.

Dropout: ranks draw their own RNG streams, so masks differ from a single-process run;
gradients are still exact for the masks drawn (each region replays its own RNG state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.distributed.comm import Comm, broadcast_held
from lbi_fx.distributed.exchange import ADJOINTS, EXCHANGES, row_slices
from lbi_fx.distributed.grads import (
    _add_grad,
    _restore_grads,
    _take_grads,
    finish_dp,
    launch_dp,
    reduce_dp,
    reduce_shared,
)
from lbi_fx.distributed.mesh import Placement, check_crossings, mesh_groups
from lbi_fx.distributed.ownership import (
    META,
    held_bytes,
    holders,
    init_weights,
    materialize,
    named_tensors,
    prologue_needs,
    release,
)
from lbi_fx.distributed.params import param_layout
from lbi_fx.distributed.traffic import _Timer
from lbi_fx.distributed.watch import Watch
from lbi_fx.errors import DistributedTimeout, InputError, PeerFailedError
from lbi_fx.runtime import last_region_vjp, region_jacobian, region_local_vjp


def shard_batch(batch: Any, rp: RegionParallel) -> Any:
    """This rank's share of a global batch, as DDP users feed it: rows
    ``[i * B/dp, (i+1) * B/dp)`` (dim 0) of every tensor in ``batch`` (a tensor or a nested
    tuple / list / dict) for dp replica i. Ranks of one replica get the same rows."""
    dp, i = rp.dp_size, rp.dp_rank

    def cut(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.dim() == 0 or t.shape[0] % dp:
            raise InputError(f"a batch of {tuple(t.shape)} does not split over dp={dp} replicas "
                             "along dim 0: use a global batch size divisible by the mesh's "
                             "'dp' dim")
        n = t.shape[0] // dp
        return t[i * n: (i + 1) * n]

    return pytree.tree_map(cut, batch)


def split_microbatches(inputs: Sequence, loss_fn: Callable, target, M: int
                       ) -> list[tuple[tuple, Callable]]:
    """A step's ``M`` micro-batches: (inputs, loss) pairs whose losses, summed, are the
    mean loss over the batch (each micro-batch's mean weighted by its share of rows)."""
    if target is None:
        if M > 1:
            raise InputError(
                f"microbatches={M}: pass the targets as step(inputs, loss_fn, target=...) "
                "and a loss_fn(output, target), so each micro-batch scores its own rows "
                "(as torch.distributed.pipelining's schedules take them)")
        return [(tuple(inputs), loss_fn)]
    rows = [t.shape[0] for t in pytree.tree_leaves((tuple(inputs), target))
            if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not rows or len(set(rows)) != 1:
        raise InputError(f"inputs and target must share their batch size on dim 0, got {rows}")
    B = rows[0]
    if B < M:
        raise InputError(f"a batch of {B} rows does not fill microbatches={M}: use at most "
                         f"{B} micro-batches")

    def cut(i: int):
        def part(t):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                return torch.tensor_split(t, M)[i]
            return t
        return part

    out = []
    for i in range(M):
        inp_i, tgt_i = pytree.tree_map(cut(i), (tuple(inputs), target))
        n = pytree.tree_leaves(tgt_i)[0].shape[0] if M > 1 else B
        out.append((inp_i, lambda o, t=tgt_i, w=n / B: loss_fn(o, t) * w if w != 1.0
                    else loss_fn(o, t)))
    return out


def _prologue_backward(f: dict, mbar0: torch.Tensor | None, sl: slice) -> None:
    """A micro-batch's canvas / m_0 gradients back through this rank's copy of the
    prologue: the static inputs' summed gradients, and mbar_0 (rows ``sl``) on the rank
    of region 0 (``mbar0``: None elsewhere)."""
    roots, grads = [], []
    for s, g in zip(f["statics"], f["static_grads"]):
        if g is not None and s is not None and s.requires_grad:
            roots.append(s)
            grads.append(g)
    m0 = f["m0"]
    if m0.requires_grad and mbar0 is not None:
        roots.append(m0)
        grads.append(mbar0[sl])
    if roots:
        torch.autograd.backward(roots, grads)


def _rows(inputs) -> int:
    """The batch size of a call (dim 0 of its first tensor, as transform reads it)."""
    for t in pytree.tree_leaves(tuple(inputs)):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    raise InputError("the step's inputs hold no tensor with a batch axis")


class RegionParallel:
    """Runs one ``LBIModule`` with its regions spread over a process group, or over the
    ``"region"`` dim of a ``("dp", "region")`` device mesh with data parallelism over
    ``"dp"``.

    Each rank holds only what it runs (:mod:`~lbi_fx.distributed.ownership`): its
    regions with their interface modules, the prologue outputs they read (its own canvas
    copy under ``canvas_weights="per_region"``) and, on the last rank, the epilogue. The
    rest of ``lbi`` is released to the meta device at construction (names and shapes
    stay, storage goes), so train with ``rp.parameters()`` / ``rp.named_parameters()``,
    not ``lbi.parameters()``. A model built on the meta device stays there until
    :meth:`to_empty` allocates this rank's share; :meth:`init_weights` (or
    ``lbi_fx.checkpoint.load``) fills it. Tensors several ranks hold are broadcast from
    their first holder before the first step, so ranks agree.

    Each dp replica is fed its own shard of the batch (the caller passes the
    local shard, as with DDP; :func:`shard_batch` cuts one from a global batch). After
    :meth:`step` each rank's ``.grad`` holds the gradient of the mean loss over the
    global batch for the parameters it uses (:attr:`used`), added to what it held before
    (steps without ``zero_grad`` accumulate, as under autograd); parameters of other
    ranks' regions keep ``grad = None``. What ``lbi`` trains is read at every step, so
    freezing or replacing parameters between steps (the same on every rank) is seen.

    Attributes: ``lbi``, ``mesh`` (or None), ``dp_group`` (None without a mesh),
    ``region_group``, ``rank`` (this rank's position in the region group, i.e. which
    regions it runs), ``dp_rank``, ``dp_size``, ``global_rank``, ``used``, ``timeout``.
    """

    # names this object's store keys, with its ranks: the ranks of one group construct
    # their RegionParallels in the same order
    _instances = 0
    # shared matrices with at least this many rows reduce only the rows a batch touched
    row_sparse_min_rows = 1024

    def __init__(self, lbi: nn.Module, group=None, *, mesh=None, timeout: float = 60.0,
                 comm: Comm | None = None, sync_params: bool = True, microbatches: int = 1,
                 exchange: str = "allgather"):
        if not hasattr(lbi, "run_regions"):
            raise InputError(f"RegionParallel needs an LBIModule (lbi_fx.transform's result), "
                             f"got {type(lbi).__name__}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise InputError(f"timeout={timeout!r}: seconds a rank waits for its peers, > 0")
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise InputError(f"microbatches={microbatches!r}: micro-batches per step, an int >= 1")
        if exchange not in EXCHANGES:
            raise InputError(f"exchange={exchange!r}: choose one of {', '.join(EXCHANGES)}")
        self.microbatches, self.exchange = microbatches, exchange
        self.lbi, self.mesh, self.timeout = lbi, mesh, float(timeout)
        self.K = lbi.num_regions
        self.dp_group, self.region_group = mesh_groups(mesh, group, self.K)
        self.comm = comm or Comm(self.region_group)
        if mesh is not None:
            self.comm.group = self.region_group
        self.rank, self.world = self.comm.rank, self.comm.world
        self.global_rank = dist.get_rank()
        self.dp_size = 1 if self.dp_group is None else dist.get_world_size(self.dp_group)
        if self.dp_size == 1:  # a (1, n) mesh: nothing to average, so nothing to send
            self.dp_group = None
        self.dp_rank = 0 if self.dp_group is None else dist.get_rank(self.dp_group)
        # the parameters several region ranks use are summed over this group (whole mesh)
        self.world_group = self.region_group if mesh is None else dist.group.WORLD
        self.seat = seat = Placement.of(self.K, self.world, self.rank)  # who runs what
        self.place, self.owner, self.slot, self.mine, self.last = (
            seat.place, seat.owner, seat.slot, seat.mine, seat.last)
        self._layout()
        check_crossings(lbi.program_spec, self.owner, self.last)
        # ownership: who holds which tensor (from the programs' graphs), then release
        # everything this rank does not run
        self.holders = holders(lbi, self.place)
        self.held = {n for n, h in self.holders.items() if self.rank in h}
        self._check_whole()
        lbi.keep_prologue_outputs(prologue_needs(lbi, self.mine, self.rank == self.last))
        release(lbi, self.held)
        self._synced = not sync_params
        self.timings: dict[str, float] = {}
        RegionParallel._instances += 1
        members = self.comm._ranks(self.world_group)
        self.watch = Watch(dist.distributed_c10d._get_default_store(),
                           f"lbi_fx/rp{RegionParallel._instances}/{'-'.join(map(str, members))}",
                           self.global_rank, self.timeout, self._roles())
        if self.comm.watch is None:
            self.comm.watch = self.watch
        if sync_params and not self.on_meta():
            self._sync()

    # ownership ----------------------------------------------------------------------
    def _check_whole(self) -> None:
        """A module another RegionParallel already split lacks what this one may need."""
        named = self._named_tensors()
        gone = sorted(n for n in self.held if named[n].device == META)
        if gone and any(t.device != META for t in named.values()):
            raise InputError(
                f"RegionParallel: {gone[0]!r}{f' and {len(gone) - 1} more' if len(gone) > 1 else ''}"
                " of the regions this rank runs is on the meta device while other tensors are "
                "not: the LBI module was split by another RegionParallel already (each keeps "
                "only its rank's share). Build each RegionParallel on its own module "
                "(transform again, or copy.deepcopy(lbi) before the first)")

    def on_meta(self) -> bool:
        """Whether some tensor this rank holds is still on the meta device (call
        :meth:`to_empty`)."""
        return any(t.device == META for n, t in self._named_tensors().items() if n in self.held)

    def _named_tensors(self) -> dict:
        return named_tensors(self.lbi)

    def named_parameters(self):
        """This rank's trainable parameters, under the LBI module's own names: exactly the
        ones a step gives gradients to here (build the optimizer on them)."""
        used = set(self.used)
        for n, p in self.lbi.named_parameters():
            if n in used and p.device != META:
                yield n, p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def held_bytes(self) -> int:
        """Bytes of parameters and buffers this rank holds (with storage)."""
        return held_bytes(self.lbi)

    def to_empty(self, *, device: torch.device | str) -> RegionParallel:
        """Allocate this rank's share of a model built on the meta device, uninitialised
        (as ``nn.Module.to_empty``), and initialise lbi-fx's own interface modules (the same
        values at any world size: :func:`~lbi_fx.distributed.ownership.init_weights`).
        Then fill the model's own tensors: :meth:`init_weights`, your own code over
        :meth:`named_parameters` / ``lbi.named_buffers()``, or ``lbi_fx.checkpoint.load``."""
        materialize(self.lbi, self.held, device)
        ours = {n for n in self.held if n.startswith("lbi.")}
        init_weights(self.lbi, self.init_seed, only=ours)
        self._synced = False  # the broadcast runs before the first step, once filled
        return self

    @property
    def init_seed(self) -> int:
        return getattr(self.lbi, "init_seed", 0)

    def init_weights(self, seed: int | None = None, fn=None) -> RegionParallel:
        """Initialise every tensor this rank holds, module by module, each from an RNG
        seeded by ``seed`` (default ``lbi.init_seed``) and its module path: the values do
        not depend on the world size, and a per-region canvas copy starts equal to the
        module it copies. A module is reset by ``fn(path, module)`` when given, else by
        its ``reset_parameters()``. Raises ``InputError`` naming tensors neither covers."""
        seed = self.init_seed if seed is None else seed
        left = init_weights(self.lbi, seed, fn=fn, only=self.held,
                            origin=getattr(self.lbi, "canvas_origin", None))
        if left:
            raise InputError(
                f"init_weights: {len(left)} tensor(s) this rank holds belong to modules with "
                f"no reset_parameters(): {', '.join(left[:5])}{' ...' if len(left) > 5 else ''};"
                " pass fn=lambda path, module: ... that initialises them")
        self._synced = False
        return self

    def _sync(self) -> None:
        """Make the ranks agree on every tensor held by more than one of them (the prologue,
        a tied head, dp replicas): each is broadcast from its first holder in dp replica 0,
        one tensor at a time (phase ``init_broadcast``); a rank that does not hold it lends
        a temporary buffer for the collective."""
        ranks = self._global_ranks()
        broadcast_held(self.comm, self._named_tensors(), self.holders, ranks,
                       self.world_group, self.dp_group, self.device())
        self._synced = True

    def _global_ranks(self) -> list[list[int]]:
        """Global rank of (dp replica d, region rank j), as ``[d][j]``."""
        if self.mesh is None:
            return [self.comm._ranks(self.region_group)]
        return self.mesh.mesh.tolist()

    def device(self) -> torch.device:
        """Where this rank's tensors live."""
        for t in self._named_tensors().values():
            if t.device != META:
                return t.device
        return torch.device("cpu")

    def _m_like(self, rows: int, width: int) -> torch.Tensor:
        """A zero (rows, width) tensor of the interfaces' dtype on this rank's device (for
        ranks that do not compute m_0 themselves)."""
        progs = self.lbi.programs["regions"]
        dtype = next((p.dtype for p in progs[self.mine[0]].parameters()
                      if p.dtype.is_floating_point), torch.get_default_dtype())
        return torch.zeros(rows, width, dtype=dtype, device=self.device())

    def _layout(self) -> None:
        """Which rank uses which trainable parameter (:func:`param_layout`), read afresh
        from ``lbi`` at every step (what it trains may have changed)."""
        lbi = self.lbi
        progs = lbi.programs
        named = dict(lbi.named_parameters())
        lay = param_layout(progs, named, self._prologue_reach(progs), self.seat,
                           self.dp_group is not None)
        self._row_sparse, self.n_params, self.users = lay.row_sparse, lay.n_params, lay.users
        self.shared, self.used, self.own_late, self.own = (
            lay.shared, lay.used, lay.own_late, lay.own)

    def _prologue_reach(self, progs) -> dict:
        """``lbi.prologue_param_users()``, walked once per prologue program (the module
        rebuilds it when parameters are replaced, frozen or unfrozen)."""
        if getattr(self, "_reach_of", None) is not progs["prologue"]:
            self._reach_of, self._reach = progs["prologue"], self.lbi.prologue_param_users()
        return self._reach

    def _roles(self) -> dict[int, dict]:
        """Every rank's regions and dp replica, by global rank (for failure messages)."""
        if self.mesh is None:
            ranks = self.comm._ranks(self.region_group)
            return {g: dict(regions=self.place[j], dp=0) for j, g in enumerate(ranks)}
        grid = self.mesh.mesh.tolist()
        return {g: dict(regions=self.place[j], dp=d)
                for d, row in enumerate(grid) for j, g in enumerate(row)}

    # forward ------------------------------------------------------------------------
    def _chunks(self, inputs: Sequence, loss_fn: Callable, target) -> list[tuple[tuple, Callable]]:
        """The step's micro-batches (:func:`split_microbatches`)."""
        return split_microbatches(inputs, loss_fn, target, self.microbatches)

    def _forward(self, inputs: Sequence, loss_fn: Callable, prev: dict, T: _Timer,
                 first: bool) -> dict:
        """One micro-batch through this rank's regions. The first one fills ``prev`` with
        the reduced parameters' earlier gradients (:func:`_take_grads`); the forward itself
        touches no ``.grad``, but the last rank seeds its backward right after each
        micro-batch's loss (the earlier ranks are still busy with later micro-batches)."""
        lbi, comm, K, W = self.lbi, self.comm, self.K, self.watch
        W.enter("forward")
        with torch.enable_grad(), T("prologue"):
            pro_env = lbi.run_prologue(tuple(inputs))
        if first:
            # after the prologue: lbi rebuilds its programs there when parameters were
            # replaced, frozen or unfrozen, so what it trains now is read from fresh programs
            self._layout()
            dp = self.own + self.own_late if self.dp_group is not None else []
            prev.update(_take_grads(self.shared + dp))
        m0, statics = lbi.chain_inputs(pro_env)
        env = lbi.chain_env(pro_env, statics)
        widths = [lbi.ranks[0], *lbi.ranks]
        if m0 is None:  # m_0 is region 0's: other ranks keep its shape and dtype only
            m0 = self._m_like(_rows(inputs), widths[0])
        k0, k1 = self.mine[0], self.mine[-1] + 1
        if k0 == 0:
            m = m0.detach().requires_grad_(True)
        else:
            with T("recv_m"):
                m = comm.recv(m0.new_empty(m0.shape[0], widths[k0]), self.rank - 1, "forward_m")
            m.requires_grad_(True)
        with T("forward"):
            caches: list = [None] * K
            caches[k0:k1] = lbi.run_regions(env, m, k0, k1)
        sent = None
        if k1 < K:
            sent = comm.isend(caches[k1 - 1].outs[0].detach(), self.rank + 1, "forward_m")
        state = lbi.chain_state(caches, len(statics), self.n_params)
        # Algorithm 2, line 3: J_k as soon as region k's forward is done; the next rank
        # already has m_{k+1} and runs its forward meanwhile.
        W.enter("jacobian")
        with T("jacobian"):
            jac = {k: region_jacobian(state, k) for k in self.mine if k < K - 1}
        f = dict(state=state, jac=jac, statics=statics, m0=m0, loss=None, widths=widths,
                 static_grads=[None] * len(statics), mbar_last=None)
        if self.rank == self.last:
            W.enter("epilogue")
            names = [n for n in lbi.program_spec.regions[K - 1].outputs
                     if isinstance(env[n], torch.Tensor)]
            # a region run without its graph (jacobian="recompute") returns outputs that do
            # not require grad: the epilogue's gradient must still reach them
            rerun = not caches[K - 1].kept
            leaves = [o.detach().requires_grad_(o.requires_grad or (rerun and o.is_floating_point()))
                      for o in caches[K - 1].outs]
            # the prologue's own outputs (not the chain's leaves): the epilogue's gradient
            # to them flows back through the prologue with the loss's backward
            epi_env = {**env, **pro_env, **dict(zip(names, leaves))}
            with torch.enable_grad(), T("epilogue"):
                f["loss"] = loss_fn(lbi.run_epilogue(epi_env))
            W.enter("backward-seed")
            with T("seed"):
                # retain: the epilogue may read prologue outputs, backwarded again below
                f["loss"].backward(retain_graph=True)
                seed = last_region_vjp(state, *[leaf.grad for leaf in leaves])
                self._apply(f, K - 1, seed[1:])
            if seed[0] is not None:
                f["mbar_last"] = seed[0].detach().to(m0.dtype)
        if sent is not None:
            with T("send_wait"):
                comm.wait_send(sent, self.rank + 1, "forward_m")
        return f

    def _apply(self, f: dict, k: int, grads: Sequence) -> None:
        """Region k's share of a micro-batch's gradients: static inputs (summed for the
        prologue backward) and parameters (into ``.grad``)."""
        cache = f["state"].caches[k]
        ns, static_grads = len(cache.static), f["static_grads"]
        for (s, _), g in zip(cache.static, grads[:ns]):
            if g is not None:
                static_grads[s] = g if static_grads[s] is None else static_grads[s] + g
        params = self.lbi._build()["params"]  # cache.params holds the region's aliases
        for (i, _), g in zip(cache.params, grads[ns:]):
            _add_grad(params[i], g)

    # backward -----------------------------------------------------------------------
    def _backward(self, fs: list[dict], prev: dict, T: _Timer) -> None:
        """``prev``: the gradients of the reduced parameters before this step
        (:func:`_take_grads`), added back once this step's part is reduced."""
        comm, K, W = self.comm, self.K, self.watch
        mbar = ADJOINTS[self.exchange](comm, W, self.seat, fs, T)
        rows = row_slices(fs)
        W.enter("local")
        with T("local"):
            for f, sl in zip(fs, rows):
                for k in self.mine:
                    if k < K - 1:
                        g = mbar[k + 1]
                        self._apply(f, k, region_local_vjp(f["state"], k,
                                                           None if g is None else g[sl]))
        # the parameters only this region rank uses are final: average them over dp now,
        # while the prologue backward runs (gloo reduces on its own thread)
        dp = launch_dp(comm, self.own, self.dp_group) if self.dp_group is not None else []
        W.enter("prologue-backward")
        with T("prologue_bwd"):
            mbar0 = mbar.get(0) if self.mine[0] == 0 else None
            for f, sl in zip(fs, rows):
                _prologue_backward(f, mbar0, sl)
        W.enter("allreduce")
        scale = 1.0 / self.dp_size
        with T("allreduce"):
            reduce_shared(comm, self.shared, self.world_group, scale, prev,
                          self.row_sparse_min_rows, self._row_sparse)
            if self.dp_group is not None:  # this rank's own canvas copies (per_region)
                reduce_dp(comm, self.own_late, self.dp_group, scale, prev)
        with T("dp_wait"):  # what the overlap did not hide
            finish_dp(comm, dp, scale, prev)

    def step(self, inputs: Sequence, loss_fn: Callable, target=None) -> float:
        """Forward + backward on this replica's shard ``inputs``; adds the gradient of the
        mean loss over the global batch to ``.grad`` (steps without ``zero_grad``
        accumulate, as autograd does); returns that loss on every rank. Without
        ``target`` the loss is ``loss_fn(output)``; with it ``loss_fn(output, target)``
        per micro-batch (rows of ``target`` follow the inputs' rows), which
        ``microbatches > 1`` needs. A failure here is published to the other ranks before
        it is raised (see the module docstring)."""
        W = self.watch
        if not self._synced:
            if self.on_meta():
                raise InputError(
                    "RegionParallel holds tensors on the meta device: call "
                    "rp.to_empty(device=...) and fill them (rp.init_weights(), your own "
                    "init over rp.named_parameters(), or lbi_fx.checkpoint.load) first")
            self._sync()
        W.step += 1
        prev: dict = {}
        T = _Timer()
        try:
            try:
                chunks = self._chunks(inputs, loss_fn, target)
                fs = [self._forward(inp, lf, prev, T, i == 0)
                      for i, (inp, lf) in enumerate(chunks)]
                self._backward(fs, prev, T)
                W.enter("loss")
                return self._loss(fs, T)
            except (PeerFailedError, DistributedTimeout):
                raise  # a peer's failure, or a timeout this rank already published
            except BaseException as exc:
                W.fail(exc)
                raise
        except BaseException:
            _restore_grads(prev)  # what was accumulated before is not lost with the step
            raise

    def _loss(self, fs: list[dict], T: _Timer) -> float:
        """The global mean loss: the dp mean of the replicas' losses, summed over the mesh
        in float64 with each replica's batch size and its square, which are equal across
        ranks iff every replica got the same number of samples (DDP's averaging needs it)."""
        m0 = fs[0]["m0"]
        B = float(sum(f["m0"].shape[0] for f in fs))
        val = m0.new_zeros(3, dtype=torch.float64)
        if fs[0]["loss"] is not None:
            val[0] = sum(f["loss"].detach().double() for f in fs) / self.dp_size
        val[1], val[2] = B, B * B
        self.comm.all_reduce(val, "loss", self.world_group)
        self.timings = T.t
        n = self.world * self.dp_size
        if float(val[1]) != n * B or float(val[2]) != n * B * B:
            raise InputError(
                f"dp replicas were fed different batch sizes (this one {int(B)}, mean "
                f"{float(val[1]) / n:g}): averaging gradients over dp gives the mean loss only "
                "for equal shards; cut them with lbi_fx.distributed.shard_batch")
        return float(val[0])

