"""The machine ``lbi-fx plan`` predicts for: how a tc rate becomes a
:class:`~lbi_fx.plan.simulator.Link`, and how fast a rank computes while others share
the cores (:func:`contention_probe`).

Why a module of its own: the profile says what the ranks need; the testbed says what the
machine and its link give them, and is the one place rates and sizes are parsed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lbi_fx.bench.link import UNSHAPED, parse_rate  # the bench's units: rates mean the same
from lbi_fx.errors import InputError
from lbi_fx.plan.profiling import median
from lbi_fx.plan.simulator import Link, Op, Simulation, simulate

# Measured on this project's 2-core VM (gloo, 127.0.0.1, one thread per rank): a send /
# recv pair costs ~0.05 ms one way, RegionParallel's waiter thread and store calls add about
# as much; 16 MB cross the loopback in ~6 ms.
DEFAULT_LATENCY_S = 1e-4


_SIZE = re.compile(r"^(\d+(?:\.\d*)?)(b|k|kb|m|mb|kib|mib)?$")


def parse_size(text: str) -> float:
    """A ``tc`` size (``16kb`` = 16 x 1024 bytes; ``b``, ``k``/``kb``, ``m``/``mb``)."""
    m = _SIZE.match(str(text).strip().lower())
    if m is None:
        raise InputError(f"size {text!r}: give bytes with a tc unit, e.g. 16kb, 1mb, 1500b")
    mult = {None: 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 2 ** 20, "mb": 2 ** 20,
            "mib": 2 ** 20}[m.group(2)]
    return float(m.group(1)) * mult


@dataclass(frozen=True)
class Testbed:
    """The machine the ranks would run on: how a rate becomes a :class:`Link`
    (``unshaped``: the loopback itself at ``loopback`` bytes/s, 64 KiB MTU so headers are
    negligible; a tc rate: ``burst`` token bucket and ``mtu``-sized packets' TCP/IP
    overhead) and ``speeds``: what a rank gets of a core while n ranks compute
    (:func:`contention_probe`; None: every rank has a core of its own)."""

    latency: float = DEFAULT_LATENCY_S
    loopback: float = 20e9 / 8
    burst: float = 16 * 1024
    mtu: int = 1500
    speeds: tuple[float, ...] | None = None

    @property
    def overhead(self) -> float:
        """Bytes tbf counts per payload byte: MSS = MTU - 52 (IP, TCP with timestamps),
        each segment + 14 bytes of Ethernet header, and one 66-byte ACK per 2 segments."""
        mss = self.mtu - 52
        return (self.mtu + 14 + 33) / mss

    def link(self, rate: str | float) -> Link:
        """``rate``: a tc rate, ``unshaped``, or bits/s."""
        if rate == UNSHAPED:
            return Link(self.loopback, self.latency)
        bps = parse_rate(rate) if isinstance(rate, str) else float(rate)
        return Link(bps / 8, self.latency, self.burst, self.loopback, self.overhead)

    def simulate(self, programs: Sequence[Sequence[Op]], rate: str | float) -> Simulation:
        return simulate(programs, self.link(rate), self.speeds)

    def as_dict(self) -> dict:
        return dict(latency_s=self.latency, loopback_bytes_per_s=self.loopback,
                    burst_bytes=self.burst, mtu=self.mtu, overhead=self.overhead,
                    speeds=None if self.speeds is None else list(self.speeds))


def _probe_kernel(iters: int) -> tuple[float, float]:
    """(wall, CPU) seconds of ``iters`` small forward + backward passes on one thread."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=g, requires_grad=True)
    w = torch.randn(64, 256, generator=g)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(iters):
        (torch.tanh(x @ w) @ w.T).sum().backward()
    return time.perf_counter() - t, time.process_time() - c


def _probe_worker(i: int, world: int, iters: int, barrier, queue) -> None:
    _probe_kernel(max(1, iters // 5))  # warm up
    for n in range(1, world + 1):
        barrier.wait()
        if i < n:
            queue.put((n, *_probe_kernel(iters)))
        barrier.wait()


def contention_probe(world: int, iters: int = 100) -> list[float]:
    """Per-rank speed with n = 1 .. ``world`` ranks computing at once on this machine:
    ``world`` spawned one-thread processes run a small kernel n at a time; speed = the
    kernel's CPU seconds alone / its wall seconds beside n - 1 others (below 1 when
    another job holds cores, or a fair-share scheduler splits one core between ranks)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(world, timeout=120), ctx.SimpleQueue()
    procs = [ctx.Process(target=_probe_worker, args=(i, world, iters, barrier, queue),
                         daemon=True) for i in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    got = [queue.get() for _ in range(world * (world + 1) // 2)] if all(
        p.exitcode == 0 for p in procs) else []
    if not got:
        raise RuntimeError("the contention probe's processes failed: use --contention none "
                           "or give the speeds, e.g. --contention 1,0.6")
    cpu = median([c for n, _, c in got if n == 1])
    return [cpu / median([w for n, w, _ in got if n == k]) for k in range(1, world + 1)]
