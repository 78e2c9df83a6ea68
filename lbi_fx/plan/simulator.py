"""The simulator of ``lbi-fx plan``: single-threaded ranks running op lists over ONE
shared FIFO link (as ``tc tbf`` on ``lo`` queues both directions in one qdisc).

Why a module of its own: it is pure (no torch, no measurement), the part the tests check
against hand-computed cases, and what every schedule program is written in.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Compute:
    """The rank is busy for ``seconds``."""

    seconds: float
    label: str = ""


@dataclass(frozen=True)
class Send:
    """Post a send of ``nbytes`` to rank ``dst`` (returns at once; ``Wait`` on ``tag``)."""

    tag: str
    dst: int
    nbytes: float


@dataclass(frozen=True)
class Recv:
    """Post a receive of message ``tag`` from rank ``src`` (``Wait`` on it)."""

    tag: str
    src: int


@dataclass(frozen=True)
class Wait:
    """Block until every message in ``tags`` (posted by this rank) has crossed the link."""

    tags: tuple[str, ...]


@dataclass(frozen=True)
class Collective:
    """Every rank blocks until all have arrived and ``nbytes`` (what crosses the link,
    all ranks together) has crossed, after ``rounds`` latencies."""

    tag: str
    nbytes: float
    rounds: int = 1


Op = Compute | Send | Recv | Wait | Collective


@dataclass(frozen=True)
class Link:
    """One FIFO queue shared by every message. ``rate``: bytes/s while shaped;
    ``burst``: a token bucket of that many bytes (``tc tbf burst``) whose tokens pass at
    ``line_rate`` (None: instantly); ``overhead``: wire bytes per payload byte (TCP/IP
    headers, ACKs); ``latency``: seconds a message waits before it queues (gloo's
    rendezvous and the waiting thread), paid once per message, ``rounds`` times per
    collective."""

    rate: float
    latency: float = 0.0
    burst: float | None = None
    line_rate: float | None = None
    overhead: float = 1.0

    def wire(self, nbytes: float) -> float:
        return nbytes * self.overhead


@dataclass
class Simulation:
    """``step_s``: when the last rank finishes; ``end_s`` / ``busy_s`` per rank;
    ``link_busy_s``: seconds the link carried bytes; ``wire_bytes``: what it carried."""

    step_s: float
    end_s: list[float]
    busy_s: list[float]
    link_busy_s: float
    wire_bytes: float
    messages: int


class _LinkState:
    def __init__(self, link: Link):
        self.link, self.free, self.busy, self.bytes = link, 0.0, 0.0, 0.0
        self.tokens = link.burst or 0.0
        self.tok_t = 0.0

    def transmit(self, t: float, nbytes: float) -> float:
        """When a job entering the queue at ``t`` has crossed (FIFO behind earlier ones)."""
        link = self.link
        wire = link.wire(nbytes)
        start = max(t, self.free)
        line = link.line_rate or math.inf
        if link.burst is None:
            dur = wire / link.rate
        else:  # fluid token bucket: tokens pass at line rate, the rest at the rate
            tokens = min(link.burst, self.tokens + (start - self.tok_t) * link.rate)
            if wire <= tokens:
                dur, self.tokens = wire / line, tokens - wire
            else:
                dur, self.tokens = tokens / line + (wire - tokens) / link.rate, 0.0
            self.tok_t = start + dur
        self.free = start + dur
        self.busy += dur
        self.bytes += wire
        return self.free


def simulate(programs: Sequence[Sequence[Op]], link: Link,
             speeds: Sequence[float] | None = None) -> Simulation:
    """Run every rank's op list (rank i = ``programs[i]``) against one shared link; pure.

    Events are processed in time order, so the link sees messages in the order they
    become ready (both ends posted, plus the latency): FIFO. With ``speeds``, while n
    ranks compute each progresses at ``speeds[n - 1]`` (beyond the table: its last entry
    x len / n), as ranks sharing a small machine do; ``Compute`` seconds are then
    dedicated-core seconds. A program that can never finish (a receive without its send,
    a collective some rank skips) is a ValueError naming what each stuck rank waits for."""
    n = len(programs)
    heap: list = []
    seq = itertools.count()
    ENTER, DONE, RUN = 0, 1, 2  # at equal times: queue, then complete, then run

    def push(t: float, kind: int, data) -> None:
        heapq.heappush(heap, (t, kind, next(seq), data))

    pc = [0] * n
    end: list[float | None] = [None] * n
    busy = [0.0] * n
    sends: dict[str, tuple[int, float, int]] = {}   # tag -> (rank, bytes, dst)
    recvs: dict[str, tuple[int, int]] = {}          # tag -> (rank, src)
    done: set[str] = set()
    arrived: dict[str, dict[int, float]] = {}
    blocked: dict[int, set[str]] = {}
    link_state = _LinkState(link)
    messages = 0
    working: dict[int, list[float]] = {}  # rank -> [dedicated seconds left]
    version = [0] * n
    settled = [0.0]

    def speed() -> float:
        n_busy = len(working)
        if speeds is None or n_busy == 0:
            return 1.0
        if n_busy <= len(speeds):
            return speeds[n_busy - 1]
        return speeds[-1] * len(speeds) / n_busy

    def settle(t: float) -> None:  # advance every running compute to t at the current speed
        k = speed()
        for w in working.values():
            w[0] -= (t - settled[0]) * k
        settled[0] = t

    def reschedule(t: float, ranks) -> None:
        k = speed()
        for r in ranks:
            version[r] += 1
            push(t + max(working[r][0], 0.0) / k, RUN, (r, version[r]))

    def post(t: float, tag: str) -> None:
        nonlocal messages
        s, r = sends[tag], recvs[tag]
        if s[2] != r[0] or r[1] != s[0]:
            raise ValueError(f"message {tag!r}: rank {s[0]} sends to {s[2]}, rank {r[0]} "
                             f"receives from {r[1]}")
        messages += 1
        push(t + link.latency, ENTER, (tag, s[1]))

    def advance(r: int, t: float) -> None:
        nonlocal messages
        prog = programs[r]
        while pc[r] < len(prog):
            op = prog[pc[r]]
            pc[r] += 1
            if isinstance(op, Compute):
                busy[r] += op.seconds
                settle(t)
                working[r] = [op.seconds]
                # a new worker slows the others only when they share the machine
                reschedule(t, list(working) if speeds is not None else [r])
                return
            if isinstance(op, Send):
                if op.tag in sends:
                    raise ValueError(f"message {op.tag!r} sent twice")
                sends[op.tag] = (r, op.nbytes, op.dst)
                if op.tag in recvs:
                    post(t, op.tag)
            elif isinstance(op, Recv):
                if op.tag in recvs:
                    raise ValueError(f"message {op.tag!r} received twice")
                recvs[op.tag] = (r, op.src)
                if op.tag in sends:
                    post(t, op.tag)
            elif isinstance(op, Wait):
                for tag in op.tags:
                    mine = sends.get(tag, (None,))[0] == r or recvs.get(tag, (None,))[0] == r
                    if not mine:
                        raise ValueError(f"rank {r} waits for {tag!r}, which it did not post")
                pend = {tag for tag in op.tags if tag not in done}
                if pend:
                    blocked[r] = pend
                    return
            elif isinstance(op, Collective):
                got = arrived.setdefault(op.tag, {})
                if r in got:
                    raise ValueError(f"rank {r} enters collective {op.tag!r} twice")
                got[r] = t
                blocked[r] = {op.tag}
                if len(got) == n:
                    messages += 1
                    push(t + op.rounds * link.latency, ENTER, (op.tag, op.nbytes))
                return
            else:
                raise ValueError(f"rank {r}: {op!r} is not an op")
        end[r] = t

    for r in range(n):
        push(0.0, RUN, (r, None))
    while heap:
        t, kind, _, data = heapq.heappop(heap)
        if kind == ENTER:
            tag, nbytes = data
            push(link_state.transmit(t, nbytes), DONE, tag)
        elif kind == DONE:
            done.add(data)
            for r in [r for r, pend in blocked.items() if data in pend]:
                blocked[r].discard(data)
                if not blocked[r]:
                    del blocked[r]
                    push(t, RUN, (r, None))
        else:
            r, v = data
            if v is not None:  # a compute finishing, unless rescheduled since
                if v != version[r] or r not in working:
                    continue
                settle(t)
                del working[r]
                if speeds is not None:
                    reschedule(t, list(working))
            advance(r, t)
    stuck = {r: sorted(blocked.get(r, ())) for r in range(n) if end[r] is None}
    if stuck:
        raise ValueError("the programs deadlock: " + "; ".join(
            f"rank {r} waits for {tags or 'nothing'}" for r, tags in stuck.items()))
    ends = [float(e) for e in end]
    return Simulation(max(ends, default=0.0), ends, busy, link_state.busy, link_state.bytes,
                      messages)
