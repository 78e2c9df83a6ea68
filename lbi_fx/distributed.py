"""Region parallelism for LBI models.

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
          one rank (the prologue and embedding, a tied head, ...); none with
          ``transform(..., canvas_weights="per_region")``, where each region has its own
          copy of the canvas weights (``LBIModule.prologue_param_users`` says who uses what).
          No rank ever sends an activation or activation-gradient of the hidden size.

Every rank runs its regions with the single-process runtime itself
(``LBIModule.run_regions`` / ``chain_state``, ``lbi_fx.runtime``): only the exchanges
are this module's.

Data parallelism: with ``mesh=`` (a ``DeviceMesh`` with dims ``("dp", "region")``) each dp
replica runs the chain above over its ``mesh["region"]`` ranks on its own shard of the
batch, and gradients are averaged over ``mesh["dp"]`` as DDP does: one flat all-reduce per
dtype over the parameters only this region rank uses, launched asynchronously right
after the last local VJP, so it runs on gloo's worker thread while the prologue backward
computes; the parameters several region ranks use (embeddings, a tied head) are summed
over the whole mesh and divided by the dp size in the all-reduce they need anyway.

Failures: every wait polls its ``torch.distributed`` work and the process group's store.
A rank whose step raises writes a record there (rank, regions, phase, error) before
re-raising; every other rank then ends its step with :class:`PeerFailedError`, or, when a
peer does not arrive within ``timeout`` seconds, with :class:`DistributedTimeout` naming
the ranks that did not arrive and where they were last seen. Neither relies on the
transport noticing a dead socket. After either error the process group is unusable: end
the process (as ``torchrun`` does with a failed worker).

:class:`Comm` wraps every send and collective and records its payload bytes per phase;
:func:`step_bytes` turns a step's records into its total and its parts by kind. The
pipeline-parallel baseline is torch.distributed.pipelining itself (``lbi_fx.pipelining``).

Micro-batches (``microbatches=M``): the step's rows are cut into M micro-batches that
flow through the chain one after another, so rank j runs micro-batch i+1 (and builds its
J_k for micro-batch i right after that forward, Algorithm 2) while rank j+1 runs i; the
last rank seeds each micro-batch's backward as soon as its loss is known. The backward
exchanges then carry every micro-batch at once (one all-gather or one relay message).

Exchanges (``exchange=``): ``"allgather"`` as above (every rank gets every J_k: the
backward needs no rank to wait for another beyond one collective); ``"relay"`` keeps the
J_k on their rank and passes mbar back rank to rank instead: rank j receives mbar at its
right boundary (B x r), turns it into mbar at each of its boundaries with its own suffix
scan, and sends mbar at its left boundary on. The relay is sequential over ranks, but a
hop costs a few r x r products, and its bytes are B x r per boundary, independent of K.

Dropout: ranks draw their own RNG streams, so masks differ from a single-process run;
gradients are still exact for the masks drawn (each region replays its own RNG state).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.errors import (
    DistributedError,
    DistributedTimeout,
    InputError,
    PeerFailedError,
)
from lbi_fx.kernels import suffix_scan
from lbi_fx.runtime import (
    interface_adjoints,
    last_region_vjp,
    region_jacobian,
    region_local_vjp,
)

LBI_BACKWARD_PHASES = ("scan_allgather", "mbar_broadcast", "mbar_relay")
# how the backward's r-sized exchange runs (RegionParallel(exchange=...))
EXCHANGES = ("allgather", "relay")
# What a step is doing, in order: named by failure records and timeouts.
STEP_PHASES = ("forward", "jacobian", "epilogue", "backward-seed", "scan-exchange", "scan",
               "local", "prologue-backward", "allreduce", "loss")


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


# -- failure side channel ----------------------------------------------------------------

class Watch:
    """Failure records and progress over a ``torch.distributed`` store.

    ``fail`` writes the first failure of the job (rank, regions, phase, error); ``wait``
    polls a work's completion and that record, and gives up after ``timeout`` seconds
    naming the peers that have not reached the caller's phase. The store is served by a
    thread of rank 0's process, so a peer stuck in Python still answers; a store that
    cannot be reached means rank 0's process is gone."""

    POLL_S = 0.02  # how often a waiting rank reads the store

    def __init__(self, store, prefix: str, rank: int, timeout: float, roles: dict):
        self.store, self.prefix, self.rank, self.timeout = store, prefix, rank, timeout
        self.roles = roles  # global rank -> {"regions": [...], "dp": replica}, for messages
        self.step, self.phase = 0, "init"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _store(self, fn: str, *args):
        try:
            return getattr(self.store, fn)(*args)
        except Exception as exc:  # noqa: BLE001 - any store failure means its host is gone
            raise PeerFailedError(
                f"rank {self.rank} (phase {self.phase!r}) cannot reach the process group's "
                f"store, which rank 0's process serves: rank 0 has died ({exc})",
                rank=0, phase=self.phase) from exc

    def enter(self, phase: str) -> None:
        """Record that this rank reached ``phase`` of the current step."""
        self.phase = phase
        self._store("set", self._key(f"at/{self.rank}"),
                    f"{self.step}:{STEP_PHASES.index(phase)}:{phase}")

    def fail(self, exc: BaseException, culprit: int | None = None, kind: str = "error") -> None:
        """Publish this rank's failure (first writer wins); never raises."""
        who = self.rank if culprit is None else culprit
        rec = dict(rank=who, seen_by=self.rank, phase=self.phase, step=self.step, kind=kind,
                   error=f"{type(exc).__name__}: {exc}"[:2000], **self.roles.get(who, {}))
        try:
            if self.store.add(self._key("nfail"), 1) == 1:
                self.store.set(self._key("failed"), json.dumps(rec))
        except Exception:  # noqa: BLE001 - the store's host is gone: peers time out instead
            pass

    def failure(self) -> dict | None:
        if not self._store("check", [self._key("failed")]):
            return None
        return json.loads(self._store("get", self._key("failed")))

    def raise_failure(self, rec: dict, op: str):
        who = rec["rank"]
        regions = rec.get("regions", [])
        if rec["kind"] == "timeout":
            raise DistributedTimeout(
                f"rank {who} (regions {regions}) did not arrive: rank {rec['seen_by']} gave up "
                f"waiting for it after {self.timeout:g} s ({rec['error']}); rank {self.rank} "
                f"stopped in phase {self.phase!r} ({op})",
                rank=who, regions=regions, phase=rec["phase"])
        raise PeerFailedError(
            f"rank {who} (regions {regions}, dp replica {rec.get('dp', 0)}) failed in phase "
            f"{rec['phase']!r} of step {rec['step']}: {rec['error']}. Rank {self.rank} stopped "
            f"waiting in phase {self.phase!r} ({op}). The process group is unusable now: end "
            "this process and restart the job (from a checkpoint)",
            rank=who, regions=regions, phase=rec["phase"])

    def progress(self, peers: Sequence[int]) -> dict[int, tuple]:
        """(step, phase index, phase) each peer last recorded; (-1, -1, 'nothing') if none."""
        out = {}
        for r in peers:
            key = self._key(f"at/{r}")
            if self._store("check", [key]):
                s, i, ph = self._store("get", key).decode().split(":", 2)
                out[r] = (int(s), int(i), ph)
            else:
                out[r] = (-1, -1, "nothing")
        return out

    def wait(self, done: threading.Event, op: str, peers: Sequence[int]) -> None:
        """Block until ``done`` is set (it wakes this thread at once); every ``POLL_S`` a
        peer's failure record or the ``timeout`` raises."""
        t0 = time.monotonic()
        while not done.wait(self.POLL_S):
            rec = self.failure()
            if rec is not None:
                self.raise_failure(rec, op)
            if time.monotonic() - t0 > self.timeout:
                self._timeout(op, peers)

    def _timeout(self, op: str, peers: Sequence[int]):
        me = (self.step, STEP_PHASES.index(self.phase) if self.phase in STEP_PHASES else -1)
        seen = self.progress([r for r in peers if r != self.rank])
        late = {r: v for r, v in seen.items() if v[:2] < me} or seen
        names = ", ".join(f"rank {r} (regions {self.roles.get(r, {}).get('regions', '?')}; "
                          f"last seen in step {v[0]} phase {v[2]!r})" for r, v in late.items())
        exc = DistributedTimeout(
            f"rank {self.rank} waited {self.timeout:g} s in phase {self.phase!r} of step "
            f"{self.step} ({op}) for: {names}. A peer is stuck, dead, or slower than "
            "timeout= allows (raise it if one phase legitimately takes longer)",
            rank=min(late, default=None), phase=self.phase)
        self.fail(exc, culprit=min(late, default=None), kind="timeout")
        raise exc


def _waiter(work) -> tuple[threading.Event, list]:
    """(done, errors): a daemon thread blocks in ``work.wait()`` (``is_completed`` cannot
    be trusted: gloo's send/recv never report completion) and sets ``done``. If the peer
    never comes, the thread stays blocked until the process ends."""
    ev, box = threading.Event(), []

    def run():
        try:
            work.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the polling thread
            box.append(exc)
        ev.set()

    threading.Thread(target=run, daemon=True).start()
    return ev, box


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


# What each phase's bytes are, for a step's account (``step_bytes``): "setup" is not part
# of a training step (the initial parameter broadcast, pipelining's first-step shape vote).
PHASE_KINDS = {
    "forward_m": "activations", "mbar_broadcast": "activations", "mbar_relay": "activations",
    "pipe_forward_act": "activations", "pipe_backward_grad": "activations",
    "scan_allgather": "jacobians",
    "grad_allreduce": "param_grads", "grad_rows": "param_grads",
    "dp_allreduce": "dp_grads",
    "loss": "control",
    "init_broadcast": "setup", "pipe_meta": "setup",
}
KINDS = ("activations", "jacobians", "param_grads", "dp_grads", "control")


def step_bytes(totals: dict[str, int]) -> dict:
    """A step's bytes from :meth:`Comm.totals` of that step: the total first, then by kind
    (activations / interface, Jacobians, parameter-gradient reductions, data-parallel
    reductions, control) and by phase. Setup traffic is reported apart, never in the
    total. An unknown phase is an error here, so nothing sent goes uncounted."""
    unknown = sorted(set(totals) - set(PHASE_KINDS))
    if unknown:
        raise DistributedError(f"phases {unknown} have no kind in PHASE_KINDS (a bug in lbi-fx: "
                               "every exchange must be accounted for; please report it)")
    kinds = {k: 0 for k in KINDS}
    setup = 0
    for phase, b in totals.items():
        if PHASE_KINDS[phase] == "setup":
            setup += b
        else:
            kinds[PHASE_KINDS[phase]] += b
    return {"total": sum(kinds.values()), "by_kind": kinds,
            "by_phase": {p: b for p, b in totals.items() if PHASE_KINDS[p] != "setup"},
            "setup": setup}


# ops whose payload differs per rank of the region group: summed over it in ``totals``
_PER_RANK_OPS = ("send", "dp_all_reduce")


@dataclass
class Comm:
    """``torch.distributed`` calls that record their payload bytes per phase. With a
    ``watch`` (set by :class:`RegionParallel`) every wait polls for peer failures and
    times out; without one it blocks as ``torch.distributed`` does."""

    group: object = None
    records: list[CommRecord] = field(default_factory=list)
    watch: Watch | None = None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def _peer(self, r: int, group=None) -> int:
        group = self.group if group is None else group
        return r if group is None else dist.get_global_rank(group, r)

    def _ranks(self, group) -> list[int]:
        group = self.group if group is None else group
        return list(range(dist.get_world_size())) if group is None else \
            dist.get_process_group_ranks(group)

    def _log(self, phase: str, op: str, t: torch.Tensor, numel: int | None = None) -> None:
        n = t.numel() if numel is None else numel
        self.records.append(CommRecord(phase, op, n, n * t.element_size(), tuple(t.shape)))

    def wait(self, work, op: str, peers: Sequence[int], p2p: bool = False) -> None:
        """Wait for ``work``; with a watch, through a waiter thread and polling the store
        (``p2p``: gloo's send/recv, whose ``is_completed`` never turns true)."""
        if self.watch is None:
            work.wait()
            return
        try:
            if not p2p and work.is_completed():  # done already: no thread
                work.wait()
            else:
                done, box = _waiter(work)
                self.watch.wait(done, op, peers)
                if box:
                    raise box[0]
        except DistributedError:
            raise
        except Exception as exc:  # noqa: BLE001 - a transport error: is there a reason?
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                rec = self.watch.failure()
                if rec is not None:
                    self.watch.raise_failure(rec, op)
                time.sleep(Watch.POLL_S)
            raise DistributedError(
                f"rank {self.watch.rank}: {op} failed in phase {self.watch.phase!r} with peers "
                f"{list(peers)} and no rank recorded a failure: {exc}",
                phase=self.watch.phase) from exc

    def isend(self, t: torch.Tensor, dst: int, phase: str):
        self._log(phase, "send", t)
        return dist.isend(t.contiguous(), self._peer(dst), group=self.group)

    def wait_send(self, work, dst: int, phase: str) -> None:
        self.wait(work, f"send {phase} to rank {self._peer(dst)}", [self._peer(dst)], p2p=True)

    def recv(self, t: torch.Tensor, src: int, phase: str = "recv") -> torch.Tensor:
        """Not recorded: the sender counts the transfer once."""
        work = dist.irecv(t, self._peer(src), group=self.group)
        self.wait(work, f"recv {phase} from rank {self._peer(src)}", [self._peer(src)], p2p=True)
        return t

    def all_gather(self, t: torch.Tensor, phase: str) -> torch.Tensor:
        """(world, *t.shape)."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._log(phase, "all_gather", t, t.numel() * self.world)
        work = dist.all_gather(out, t, group=self.group, async_op=True)
        self.wait(work, f"all-gather {phase}", self._ranks(None))
        return torch.stack(out)

    def broadcast(self, t: torch.Tensor, src: int, phase: str, group=None) -> torch.Tensor:
        self._log(phase, "broadcast", t)
        g = self.group if group is None else group
        work = dist.broadcast(t, self._peer(src, group), group=g, async_op=True)
        self.wait(work, f"broadcast {phase}", self._ranks(group))
        return t

    def all_reduce_async(self, t: torch.Tensor, phase: str, group=None, op: str = "all_reduce"):
        """Launch an all-reduce (sum); :meth:`finish` waits for it."""
        self._log(phase, op, t)
        g = self.group if group is None else group
        return dist.all_reduce(t, group=g, async_op=True), f"all-reduce {phase}", self._ranks(group)

    def finish(self, handle) -> None:
        self.wait(*handle)

    def all_reduce(self, t: torch.Tensor, phase: str, group=None) -> torch.Tensor:
        self.finish(self.all_reduce_async(t, phase, group))
        return t

    def local_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.phase] = out.get(r.phase, 0) + r.bytes
        return out

    def totals(self) -> dict[str, int]:
        """Bytes per phase over the whole group (collective): sends and dp all-reduces
        summed over the group's ranks (each has its own), other collectives counted once."""
        mine = {"per_rank": {}, "coll": {}}
        for r in self.records:
            d = mine["per_rank" if r.op in _PER_RANK_OPS else "coll"]
            d[r.phase] = d.get(r.phase, 0) + r.bytes
        every: list = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        out: dict[str, int] = dict(every[0]["coll"])
        for e in every:
            for ph, b in e["per_rank"].items():
                out[ph] = out.get(ph, 0) + b
        return out


def _flat_by_dtype(params: Sequence[nn.Parameter]) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
    """One flat buffer per dtype of the parameters' gradients (zeros where a rank did not
    touch a parameter), in a fixed order that every rank sharing the list agrees on, then
    one 0/1 flag per parameter: "this rank has a gradient". Summed, the flags tell a
    gradient of zero from none at all (autograd's None, which optimizers skip)."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    out = []
    for ps in by_dtype.values():
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
        flags = torch.tensor([p.grad is not None for p in ps], dtype=ps[0].dtype,
                             device=ps[0].device)
        out.append((ps, torch.cat([*grads, flags])))
    return out


def _take_grads(params: Sequence[nn.Parameter]) -> dict[nn.Parameter, torch.Tensor | None]:
    """Detach what ``.grad`` accumulated before this step (``.grad`` becomes None), so that
    only this step's contribution goes through the all-reduce: summing the whole ``.grad``
    would multiply earlier steps' (already reduced) gradients by the number of ranks.
    :func:`_unflatten_into` adds it back; :func:`_restore_grads` after a failure."""
    prev = {}
    for p in params:
        prev[p], p.grad = p.grad, None
    return prev


def _restore_grads(prev: dict[nn.Parameter, torch.Tensor | None]) -> None:
    """After a failed step: the earlier gradients plus this step's local (unreduced) part,
    what plain autograd would have left."""
    for p, old in prev.items():
        if old is not None:
            p.grad = old if p.grad is None else old + p.grad
    prev.clear()


def _unflatten_into(ps: Sequence[nn.Parameter], flat: torch.Tensor, scale: float = 1.0,
                    prev: dict | None = None) -> None:
    """Write a reduced bucket back into ``.grad``, added to ``prev`` (popped: what
    :func:`_take_grads` kept out of the reduction). Where no rank had a gradient this step
    ``.grad`` keeps its earlier value, None included, as autograd leaves it."""
    flags = flat[len(flat) - len(ps):]
    i = 0
    for p, has in zip(ps, flags.tolist()):
        old = None if prev is None else prev.pop(p, None)
        g = flat[i: i + p.numel()].view_as(p)
        if has == 0:
            p.grad = old
        else:
            g = g * scale if scale != 1.0 else g
            p.grad = old + g if old is not None else g if scale != 1.0 else g.clone()
        i += p.numel()


def _sum_shared(comm: Comm, params: Sequence[nn.Parameter], prev: dict | None = None) -> None:
    """All-reduce (sum) the gradients of parameters several ranks contribute to: one flat
    buffer per dtype. A rank that did not touch one contributes zeros. ``prev``: the
    gradients :func:`_take_grads` kept out, added back afterwards."""
    for ps, flat in _flat_by_dtype(params):
        comm.all_reduce(flat, "grad_allreduce")
        _unflatten_into(ps, flat, prev=prev)


def sync_from_rank0(comm: Comm, module: nn.Module, group=None) -> None:
    """Broadcast every parameter and buffer from rank 0 of ``group`` (default: the comm's)
    (phase ``init_broadcast``), as DDP does: the interface modules ``transform`` adds draw
    from the global RNG, so ranks that did not seed identically would otherwise hold
    different models."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            comm.broadcast(t.data, 0, "init_broadcast", group=group)


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


# -- meshes ----------------------------------------------------------------------------

MESH_DIMS = ("dp", "region")


def mesh_groups(mesh, group, K: int) -> tuple:
    """(dp group, region group) for ``RegionParallel``; refuses a bad mesh before any
    collective. Without a mesh: (None, ``group``)."""
    if mesh is None:
        return None, group
    if group is not None:
        raise InputError("RegionParallel got both group= and mesh=: pass the mesh alone (its "
                         "'region' dim is the group the regions are placed over)")
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise InputError(f"mesh= must be a torch.distributed.device_mesh.DeviceMesh, got "
                         f"{type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if names != MESH_DIMS:
        raise InputError(
            f"mesh dims are named {names or 'nothing'}; RegionParallel needs {MESH_DIMS}: "
            "init_device_mesh(device, (dp, region_ranks), mesh_dim_names=('dp', 'region'))")
    n_region = mesh.mesh.shape[1]
    if n_region > K:
        raise InputError(f"mesh dim 'region' has {n_region} ranks but the model has {K} regions: "
                         f"every region rank needs a region, so use at most {K}")
    if mesh.mesh.numel() != dist.get_world_size():
        raise InputError(f"the mesh holds {mesh.mesh.numel()} ranks, the default process group "
                         f"{dist.get_world_size()}: the mesh must span every rank")
    return mesh.get_group("dp"), mesh.get_group("region")


def shard_batch(batch, rp: RegionParallel):
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


# -- region parallelism ---------------------------------------------------------------

class RegionParallel:
    """Runs one ``LBIModule`` with its regions spread over a process group, or over the
    ``"region"`` dim of a ``("dp", "region")`` device mesh with data parallelism over
    ``"dp"``.

    Every rank holds the full module (synchronised from global rank 0); rank j of the
    region group only computes with its own regions, the prologue, and (last rank) the
    epilogue. Each dp replica is fed its own shard of the batch (the caller passes the
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
        self.place = placement(self.K, self.world)
        self.owner = {k: j for j, ks in enumerate(self.place) for k in ks}
        self.slot = {k: i for ks in self.place for i, k in enumerate(ks)}
        self.mine = self.place[self.rank]
        self.last = self.world - 1
        self._layout()
        self._check_crossings()
        self.timings: dict[str, float] = {}
        RegionParallel._instances += 1
        members = self.comm._ranks(self.world_group)
        self.watch = Watch(dist.distributed_c10d._get_default_store(),
                           f"lbi_fx/rp{RegionParallel._instances}/{'-'.join(map(str, members))}",
                           self.global_rank, self.timeout, self._roles())
        if self.comm.watch is None:
            self.comm.watch = self.watch
        if sync_params:
            sync_from_rank0(self.comm, lbi, group=self.world_group)

    def _layout(self) -> None:
        """Which rank uses which trainable parameter, read afresh from ``lbi`` at every
        step: freezing, unfreezing or replacing a parameter (``load_state_dict(assign=True)``)
        rebuilds its programs, and lists kept from an earlier step would reduce stale or
        frozen tensors. Every rank must hold the same trainable set (the flat buffers are
        laid out from it)."""
        lbi = self.lbi
        progs = lbi.programs
        named = dict(lbi.named_parameters())
        names = {id(p): n for n, p in named.items()}
        # insertion order (each program's parameters) lays out the flat buffers: the same
        # on every rank, so never iterate a set of ids here
        users: dict[int, set[int]] = {}
        # a prologue parameter is used by the ranks whose regions (or epilogue) its outputs
        # reach: with canvas_weights="per_region" region k's copy by k's rank alone
        reach = self._prologue_reach(progs)
        for p in _trainable(progs["prologue"]):
            who = reach.get(names.get(id(p)))
            ranks = (set(range(self.world)) if who is None else
                     {self.last if k == "epilogue" else self.owner[k] for k in who})
            users.setdefault(id(p), set()).update(ranks)
        # an embedding's gradient is zero outside the batch's tokens, unless the epilogue
        # reads it too (a tied head: dense)
        self._row_sparse = {id(p) for p in _trainable(progs["prologue"])
                            if "epilogue" not in (reach.get(names.get(id(p))) or {"epilogue"})}
        for p in _trainable(progs["epilogue"]):
            users.setdefault(id(p), set()).add(self.last)
        for k, rgm in enumerate(progs["regions"]):
            for p in _trainable(rgm):
                users.setdefault(id(p), set()).add(self.owner[k])
        self.n_params = len({id(p) for rgm in progs["regions"] for p in _trainable(rgm)})
        # (at construction lbi's programs may predate a replaced parameter: the next
        # step's prologue rebuilds them and this runs again)
        self.users = {names[i]: sorted(u) for i, u in users.items() if i in names}
        # reduced after the prologue's backward, summed over the whole mesh: parameters
        # several region ranks use; with one region rank (dp x 1) all of them in one
        # bucket, as the dp bucket started before that backward would miss the prologue's
        late = set(self.users) if self.dp_group is not None and self.world == 1 else set()
        self.shared = [named[n] for n, u in self.users.items() if len(u) > 1 or n in late]
        self.used = sorted(n for n, u in self.users.items() if self.rank in u)
        # averaged over dp alone: the same list on every rank of this rank's dp group
        own = [n for n in self.used if len(self.users[n]) == 1 and n not in late]
        pro = {id(p) for p in _trainable(progs["prologue"])}
        # final only after the prologue's backward: averaged over dp then, not before
        self.own_late = [named[n] for n in own if id(named[n]) in pro]
        self.own = [named[n] for n in own if id(named[n]) not in pro]

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

    def _check_crossings(self) -> None:
        """Only m_k may cross between ranks; anything else a region (or the epilogue)
        reads from another rank's region would need a hidden-size transfer."""
        spec = self.lbi.program_spec
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
    def _chunks(self, inputs: Sequence, loss_fn: Callable, target) -> list[tuple[tuple, Callable]]:
        """The step's micro-batches: (inputs, loss) pairs whose losses, summed, are the
        mean loss over the batch (each micro-batch's mean weighted by its share of rows)."""
        M = self.microbatches
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
            leaves = [o.detach().requires_grad_(o.requires_grad) for o in caches[K - 1].outs]
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
    def _adjoints_allgather(self, fs: list[dict], T: _Timer) -> dict:
        """The paper's exchange: every rank's J_k (all micro-batches in one payload) to
        every rank, mbar_{K-1} broadcast; each rank scans from its first region on."""
        comm, K, W = self.comm, self.K, self.watch
        state, widths = fs[0]["state"], fs[0]["widths"]
        r, k0 = state.r_max, self.mine[0]
        payload = torch.cat([f["m0"].new_zeros(f["m0"].shape[0], max(map(len, self.place)), r, r)
                             for f in fs])
        mbar_last = torch.cat([f["m0"].new_zeros(f["m0"].shape[0], widths[K - 1]) for f in fs])
        rows = _row_slices(fs)
        for f, sl in zip(fs, rows):
            for k, J in f["jac"].items():
                payload[sl, self.slot[k]] = J
            if f["mbar_last"] is not None:
                mbar_last[sl] = f["mbar_last"]
                # region K-1 has no J: its slot carries "mbar_{K-1} exists" at no extra bytes
                payload[sl, self.slot[K - 1], 0, 0] = 1
        W.enter("scan-exchange")
        with T("allgather"):
            gathered = comm.all_gather(payload, "scan_allgather")
        with T("broadcast"):
            comm.broadcast(mbar_last, self.last, "mbar_broadcast")
        has_mbar = bool(gathered[self.last, 0, self.slot[K - 1], 0, 0] == 1)
        mbar = {K - 1: mbar_last if has_mbar else None}
        if k0 < K - 1:
            W.enter("scan")
            with T("scan"):
                J = torch.stack([gathered[self.owner[k], :, self.slot[k]]
                                 for k in range(k0, K - 1)], 1)
                P = suffix_scan(J, state.scan_backend)           # P_k = J_k^T ... J_{K-2}^T
                adj = interface_adjoints(state, P, mbar[K - 1], start=k0)
                mbar.update({k0 + i: a for i, a in enumerate(adj)})
        return mbar

    def _adjoints_relay(self, fs: list[dict], T: _Timer) -> dict:
        """Bytes at a minimum: the J_k stay on their rank. mbar at this rank's right
        boundary comes from the next rank (B x r, one message for all micro-batches), the
        rank's own suffix scan turns it into mbar for each of its boundaries, and mbar at
        its left boundary goes to the previous rank. The relay is sequential over ranks,
        but each hop is a few r x r products, not a VJP."""
        comm, K, W = self.comm, self.K, self.watch
        state, widths = fs[0]["state"], fs[0]["widths"]
        k0, k1 = self.mine[0], self.mine[-1] + 1
        B = sum(f["m0"].shape[0] for f in fs)
        W.enter("scan-exchange")
        if self.rank == self.last:
            have = [f["mbar_last"] is not None for f in fs]
            nxt = torch.cat([f["mbar_last"] for f in fs]) if all(have) else None
            at = K - 1
        else:
            with T("relay"):
                buf = comm.recv(fs[0]["m0"].new_empty(B, widths[k1] + 1), self.rank + 1,
                                "mbar_relay")
            nxt = buf[:, :-1] if bool(buf[0, -1] == 1) else None
            at = k1
        mbar = {at: nxt}
        ks = [k for k in self.mine if k < K - 1]
        if ks:
            W.enter("scan")
            with T("scan"):
                J = torch.stack([torch.cat([f["jac"][k] for f in fs]) for k in ks], 1)
                P = suffix_scan(J, state.scan_backend)  # P_k = J_k^T ... J_{at-1}^T
                adj = interface_adjoints(state, P, nxt, start=k0)
                mbar.update({k0 + i: a for i, a in enumerate(adj)})
        if self.rank > 0:
            out = fs[0]["m0"].new_zeros(B, widths[k0] + 1)
            if mbar[k0] is not None:
                out[:, :-1] = mbar[k0]
                out[:, -1] = 1
            with T("relay"):
                comm.wait_send(comm.isend(out, self.rank - 1, "mbar_relay"), self.rank - 1,
                               "mbar_relay")
        return mbar

    def _backward(self, fs: list[dict], prev: dict, T: _Timer) -> None:
        """``prev``: the gradients of the reduced parameters before this step
        (:func:`_take_grads`), added back once this step's part is reduced."""
        comm, K, W = self.comm, self.K, self.watch
        mbar = (self._adjoints_relay if self.exchange == "relay" else self._adjoints_allgather)(fs, T)
        rows = _row_slices(fs)
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
        dp = None
        if self.dp_group is not None:
            dp = [(ps, flat, comm.all_reduce_async(flat, "dp_allreduce", self.dp_group,
                                                   op="dp_all_reduce"))
                  for ps, flat in _flat_by_dtype(self.own)]
        W.enter("prologue-backward")
        with T("prologue_bwd"):
            for f, sl in zip(fs, rows):
                roots, grads = [], []
                for s, g in zip(f["statics"], f["static_grads"]):
                    if g is not None and s.requires_grad:
                        roots.append(s)
                        grads.append(g)
                m0 = f["m0"]
                if self.mine[0] == 0 and m0.requires_grad and mbar.get(0) is not None:
                    roots.append(m0)
                    grads.append(mbar[0][sl])
                if roots:
                    torch.autograd.backward(roots, grads)
        W.enter("allreduce")
        with T("allreduce"):
            dense = _reduce_touched_rows(comm, self.shared, self.world_group, 1.0 / self.dp_size,
                                         prev, self.row_sparse_min_rows, self._row_sparse)
            for ps, flat in _flat_by_dtype(dense):
                comm.all_reduce(flat, "grad_allreduce", self.world_group)
                _unflatten_into(ps, flat, 1.0 / self.dp_size, prev)
            if self.dp_group is not None:  # this rank's own canvas copies (per_region)
                for ps, flat in _flat_by_dtype(self.own_late):
                    comm.finish(comm.all_reduce_async(flat, "dp_allreduce", self.dp_group,
                                                      op="dp_all_reduce"))
                    _unflatten_into(ps, flat, 1.0 / self.dp_size, prev)
        with T("dp_wait"):  # what the overlap did not hide
            for ps, flat, handle in dp or ():
                comm.finish(handle)
                _unflatten_into(ps, flat, 1.0 / self.dp_size, prev)

    def step(self, inputs: Sequence, loss_fn: Callable, target=None) -> float:
        """Forward + backward on this replica's shard ``inputs``; adds the gradient of the
        mean loss over the global batch to ``.grad`` (steps without ``zero_grad``
        accumulate, as autograd does); returns that loss on every rank. Without
        ``target`` the loss is ``loss_fn(output)``; with it ``loss_fn(output, target)``
        per micro-batch (rows of ``target`` follow the inputs' rows), which
        ``microbatches > 1`` needs. A failure here is published to the other ranks before
        it is raised (see the module docstring)."""
        W = self.watch
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


def _reduce_touched_rows(comm: Comm, params: Sequence[nn.Parameter], group, scale: float,
                         prev: dict, min_rows: int, sparse: set[int]) -> list[nn.Parameter]:
    """All-reduce only the rows some rank touched of each shared matrix with at least
    ``min_rows`` rows (an embedding's gradient is zero outside the batch's tokens): one
    all-reduce of a row mask (V + 1 elements: the last says "some rank has a gradient"),
    then one of the union's rows, where that is smaller than the whole matrix. Exact:
    the rows left out are zero on every rank. Returns the parameters left for the dense
    all-reduce (every rank decides alike: the shapes and the reduced mask agree).
    ``sparse``: ids of the parameters that may be row-sparse (prologue parameters no
    epilogue reads)."""
    rest = []
    for p in params:
        if p.dim() != 2 or p.shape[0] < min_rows or id(p) not in sparse:
            rest.append(p)
            continue
        g = p.grad
        mask = p.new_zeros(p.shape[0] + 1)
        if g is not None:
            mask[:-1] = (g != 0).any(dim=1).to(mask.dtype)
            mask[-1] = 1
        comm.all_reduce(mask, "grad_rows", group)
        old = prev.pop(p, None)
        if mask[-1] == 0:  # no rank has a gradient: .grad keeps its earlier value
            p.grad = old
            continue
        rows = (mask[:-1] > 0).nonzero().squeeze(1)
        if (rows.numel() + 1) * p.shape[1] >= p.numel():  # not smaller: the whole matrix
            buf = (g if g is not None else torch.zeros_like(p)).contiguous().clone()
            comm.all_reduce(buf, "grad_allreduce", group)
            full = buf
        else:
            buf = g[rows] if g is not None else p.new_zeros(rows.numel(), p.shape[1])
            comm.all_reduce(buf, "grad_allreduce", group)
            full = torch.zeros_like(p)
            full[rows] = buf
        full = full * scale if scale != 1.0 else full
        p.grad = full if old is None else old + full
    return rest


def _row_slices(fs: list[dict]) -> list[slice]:
    """Each micro-batch's rows in the step's concatenated batch."""
    out, at = [], 0
    for f in fs:
        n = f["m0"].shape[0]
        out.append(slice(at, at + n))
        at += n
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for spawning loopback process groups)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


from lbi_fx.checkpoint import load, save  # noqa: E402,F401  (re-exported: rp's checkpoints)
