"""Every ``torch.distributed`` call region parallelism and its baseline make, in one place,
so that each is both counted and watched.

:class:`Comm` records the payload of every send and collective (a
:class:`~lbi_fx.distributed.traffic.CommRecord` per call) and, with a
:class:`~lbi_fx.distributed.watch.Watch`, waits for it by polling for a peer's failure
instead of blocking in the transport. :func:`sync_from_rank0` makes every rank start from
rank 0's model through it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lbi_fx.distributed.traffic import _PER_RANK_OPS, CommRecord, wire_bytes
from lbi_fx.distributed.watch import Watch, _waiter
from lbi_fx.errors import DistributedError


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

    def _log(self, phase: str, op: str, t: torch.Tensor, numel: int | None = None,
             group=None, root: int = 0) -> None:
        """Record one call: its logical payload, and what this rank sends for it on the
        wire (:func:`~lbi_fx.distributed.traffic.wire_bytes`) on ``group`` (default the
        comm's), by the backend that runs it. ``root``: a broadcast's source, group rank."""
        n = t.numel() if numel is None else numel
        nbytes = n * t.element_size()
        size = 1
        wire, msgs = nbytes, 1
        if op != "send":
            g = self.group if group is None else group
            size, me = dist.get_world_size(g), dist.get_rank(g)
            wire, msgs = wire_bytes(op, nbytes, size, me, root, t.element_size(),
                                    _backend(g, t))
        self.records.append(CommRecord(phase, op, n, nbytes, tuple(t.shape), size, wire, msgs))

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
        self._log(phase, "broadcast", t, group=group, root=src)
        g = self.group if group is None else group
        work = dist.broadcast(t, self._peer(src, group), group=g, async_op=True)
        self.wait(work, f"broadcast {phase}", self._ranks(group))
        return t

    def all_reduce_async(self, t: torch.Tensor, phase: str, group=None, op: str = "all_reduce"):
        """Launch an all-reduce (sum); :meth:`finish` waits for it."""
        self._log(phase, op, t, group=group)
        g = self.group if group is None else group
        return dist.all_reduce(t, group=g, async_op=True), f"all-reduce {phase}", self._ranks(group)

    def finish(self, handle) -> None:
        self.wait(*handle)

    def all_reduce(self, t: torch.Tensor, phase: str, group=None) -> torch.Tensor:
        self.finish(self.all_reduce_async(t, phase, group))
        return t

    def local_bytes(self, wire: bool = False) -> dict[str, int]:
        """This rank's records per phase: logical payloads, or with ``wire`` the bytes this
        rank itself sent on the wire (not collective: no other rank is asked)."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.phase] = out.get(r.phase, 0) + (r.wire if wire else r.bytes)
        return out

    def totals(self) -> dict[str, int]:
        """Logical payload bytes per phase over the whole group (collective): sends and
        dp all-reduces summed over the group's ranks (each has its own), other collectives
        counted once. Not what the wire carries: see :meth:`traffic`."""
        return self.traffic()["logical"]

    def traffic(self) -> dict:
        """The group's account of the records (collective over the group): ``logical``
        as :meth:`totals`; ``wire`` and ``messages``: per rank of the group, the bytes
        and transport messages it sent per phase
        (:func:`~lbi_fx.distributed.traffic.wire_bytes`).
        :func:`~lbi_fx.distributed.traffic.step_bytes` turns it into a step's account."""
        mine: dict = {"per_rank": {}, "coll": {}, "wire": {}, "messages": {}}
        for r in self.records:
            d = mine["per_rank" if r.op in _PER_RANK_OPS else "coll"]
            d[r.phase] = d.get(r.phase, 0) + r.bytes
            mine["wire"][r.phase] = mine["wire"].get(r.phase, 0) + r.wire
            mine["messages"][r.phase] = mine["messages"].get(r.phase, 0) + r.messages
        every: list = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        out: dict[str, int] = dict(every[0]["coll"])
        for e in every:
            for ph, b in e["per_rank"].items():
                out[ph] = out.get(ph, 0) + b
        return {"logical": out, "wire": [e["wire"] for e in every],
                "messages": [e["messages"] for e in every]}


def _backend(group, t: torch.Tensor) -> str:
    """The backend that runs a collective on ``t`` over ``group``: ``nccl`` for a CUDA
    tensor on a group that has it, else ``gloo`` (whose algorithms
    :func:`~lbi_fx.distributed.traffic.wire_bytes` also assumes for any other backend)."""
    try:
        name = str(dist.get_backend(group))
    except (RuntimeError, ValueError):
        return "gloo"
    return "nccl" if "nccl" in name and t.is_cuda else "gloo"


def sync_from_rank0(comm: Comm, module: nn.Module, group=None) -> None:
    """Broadcast every parameter and buffer from rank 0 of ``group`` (default: the comm's)
    (phase ``init_broadcast``), as DDP does: the interface modules ``transform`` adds draw
    from the global RNG, so ranks that did not seed identically would otherwise hold
    different models."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            comm.broadcast(t.data, 0, "init_broadcast", group=group)


def broadcast_held(comm: Comm, named: dict[str, torch.Tensor], holders: dict[str, set[int]],
                   grid: list[list[int]], group, dp_group=None,
                   device: torch.device | str = "cpu") -> None:
    """Make ranks agree on what they hold, one tensor at a time (phase ``init_broadcast``):
    a tensor several region ranks hold is broadcast over ``group`` (every rank of
    ``grid``) from its first holder in dp replica 0, a rank that does not hold it lending
    a temporary buffer; one a single region rank holds goes over that rank's ``dp_group``
    alone, and nowhere without data parallelism. ``grid[d][j]``: the global rank of
    region rank j in dp replica d; ``holders``: tensor name -> region ranks."""
    me = dist.get_rank()
    col = next(j for row in grid for j, g in enumerate(row) if g == me)
    seen: set[int] = set()
    with torch.no_grad():
        for name, t in named.items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            h = sorted(holders.get(name, {0}))
            if len(h) > 1:
                src, g = grid[0][h[0]], group
            elif len(grid) > 1 and col == h[0]:
                src, g = grid[0][col], dp_group
            else:
                continue
            buf = t.data if t.device.type != "meta" else torch.empty(
                t.shape, dtype=t.dtype, device=device)
            comm._log("init_broadcast", "broadcast", buf, group=g,
                      root=dist.get_group_rank(g, src) if g is not None else src)
            work = dist.broadcast(buf, src, group=g, async_op=True)
            comm.wait(work, "broadcast init_broadcast", comm._ranks(g))
