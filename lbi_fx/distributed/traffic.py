"""A step's account: what every byte sent is (its phase and kind), what it costs on the
wire, and where the seconds went.

Region parallelism is compared with pipelining by what it sends, so nothing may go
uncounted: :class:`~lbi_fx.distributed.comm.Comm` records each send and collective as a
:class:`CommRecord` of its phase, and :func:`step_bytes` refuses a phase that has no kind
in :data:`PHASE_KINDS`.

Two counts per call. The *logical payload* (``CommRecord.bytes``) is the tensor the call
is about: a send's tensor, a broadcast's, an all-reduce's buffer, an all-gather's gathered
result. The *wire bytes* (``CommRecord.wire``) are what this rank itself puts on the
transport for that call, by the algorithm the backend runs (:func:`wire_bytes`): a ring
all-reduce makes every rank send about 2 (n - 1) / n of its buffer, so an all-reduce over
n ranks moves 2 (n - 1) x its payload in all, not 1 x. ``step_bytes`` totals the wire bytes
over the ranks (per rank too) and keeps the logical payload beside them.
``tests/test_wire_bytes.py`` holds the wire total to the loopback interface's own
counters around a real gloo step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from lbi_fx.errors import DistributedError


@dataclass
class CommRecord:
    """One send or collective as this rank saw it. ``bytes`` is the logical payload: a
    send's tensor, a broadcast's tensor, an all-reduce's buffer, an all-gather's full
    gathered result (what every rank ends up holding). ``wire`` / ``messages``: the bytes
    and transport messages this rank sends for the call (:func:`wire_bytes`) on a group
    of ``group_size`` ranks."""

    phase: str
    op: str
    numel: int
    bytes: int
    shape: tuple
    group_size: int = 1
    wire: int = 0
    messages: int = 0


# gloo's ring all-reduce cuts its buffer into segments of at most this many bytes
# (gloo/allreduce.h: AllreduceOptionsImpl::kMaxSegmentSize)
GLOO_MAX_SEGMENT_BYTES = 1024 * 1024


def _gloo_ring_allreduce(nbytes: int, elem: int, n: int, rank: int) -> tuple[int, int]:
    """(bytes, messages) rank ``rank`` sends in gloo's ring all-reduce (gloo/allreduce.cc,
    ``ring``): the buffer is cut into ``numSegments`` (a multiple of n, at least 2n, each at
    most 1 MiB) segments of ``segmentBytes`` (the last ones short or empty); chunk c is
    segments [c p, (c + 1) p) with p = numSegments / n. The reduce-scatter sends every
    segment but chunk ``rank``'s, the all-gather every one but chunk ``rank - 1``'s; an
    empty segment is not sent. In all: each segment n - 1 times per phase, so the ranks
    together send exactly 2 (n - 1) x ``nbytes``."""
    def up(a: int, b: int) -> int:  # a / b rounded up
        return (a + b - 1) // b

    elem = max(1, elem)
    max_seg = elem * max(1, GLOO_MAX_SEGMENT_BYTES // elem)
    num = up(max(up(nbytes, max_seg), 2 * n), n) * n
    per = num // n
    seg = up(up(nbytes, num), elem) * elem
    lengths = [max(0, min(seg, nbytes - s * seg)) for s in range(num)]

    def chunk(c: int) -> tuple[int, int]:
        part = lengths[(c % n) * per:(c % n + 1) * per]
        return sum(part), sum(1 for x in part if x > 0)

    total_msgs = sum(1 for x in lengths if x > 0)
    (rs_b, rs_m), (ag_b, ag_m) = chunk(rank), chunk(rank - 1)
    return 2 * nbytes - rs_b - ag_b, 2 * total_msgs - rs_m - ag_m


def _gloo_binomial_sends(n: int, rank: int, root: int) -> int:
    """How many times rank ``rank`` sends in gloo's broadcast (gloo/broadcast.cc: a
    binomial tree from ``root``; every other rank receives once)."""
    vrank = (rank - root) % n
    dim = max(0, math.ceil(math.log2(n))) if n > 1 else 0
    mask, sends = (1 << dim) - 1, 0
    for i in range(dim):
        mask ^= 1 << i
        if vrank & mask:
            continue
        vpeer = vrank ^ (1 << i)
        if vpeer < n and not vrank & (1 << i):
            sends += 1
    return sends


def wire_bytes(op: str, nbytes: int, n: int, rank: int = 0, root: int = 0, elem: int = 1,
               backend: str = "gloo") -> tuple[int, int]:
    """(bytes, messages) that rank ``rank`` of an ``n``-rank group puts on the transport
    for one call of ``op`` whose logical payload (``CommRecord.bytes``) is ``nbytes``,
    headers and framing left out, as ``backend`` runs it:

    * ``send``: the tensor, one message.
    * ``all_reduce`` / ``dp_all_reduce``: gloo's ring with segments
      (:func:`_gloo_ring_allreduce`; gloo's default: torch's ProcessGroupGloo leaves the
      algorithm unspecified, which is ring; there is no size switch); nccl's ring
      (2 (n - 1) / n x ``nbytes``). In all 2 (n - 1) x ``nbytes`` either way (nccl's tree
      too: n - 1 sends up, n - 1 down).
    * ``all_gather`` (``nbytes``: the gathered result): a ring on both backends, each rank
      passing n - 1 contributions on ((n - 1) / n x ``nbytes``; gloo in two halves, so
      2 (n - 1) messages).
    * ``broadcast``: gloo's binomial tree from ``root`` (the root sends ceil(log2 n)
      copies), nccl's ring (every rank but the last of the chain sends one); (n - 1) x
      ``nbytes`` in all.
    """
    if op == "send":
        return nbytes, 1
    if n <= 1:
        return 0, 0
    rank, root = rank % n, root % n
    if op in ("all_reduce", "dp_all_reduce"):
        if backend == "nccl":  # the 2 (n - 1) nbytes spread evenly over the ranks
            q, rem = divmod(2 * (n - 1) * nbytes, n)
            return q + (rank < rem), 2 * (n - 1)
        return _gloo_ring_allreduce(nbytes, elem, n, rank)
    if op == "all_gather":
        return (n - 1) * (nbytes // n), 2 * (n - 1) if backend != "nccl" else n - 1
    if op == "broadcast":
        if backend == "nccl":
            k = 0 if (rank - root) % n == n - 1 else 1
        else:
            k = _gloo_binomial_sends(n, rank, root)
        return k * nbytes, k
    raise DistributedError(f"no wire model for op {op!r} (a bug in lbi-fx: every exchange must "
                           "be accounted for; please report it)")


def wire_total(op: str, nbytes: int, n: int) -> int:
    """What all ``n`` ranks of the group send together for one call of ``op`` with logical
    payload ``nbytes`` (the sum of :func:`wire_bytes` over the ranks, on gloo and nccl
    alike): a send once, a broadcast n - 1 times, each rank's part of an all-gather n - 1
    times by each of the n ranks ((n - 1) x the gathered result), an all-reduce 2 (n - 1)
    times."""
    if op == "send":
        return nbytes
    if n <= 1:
        return 0
    return {"all_reduce": 2 * (n - 1) * nbytes, "dp_all_reduce": 2 * (n - 1) * nbytes,
            "all_gather": (n - 1) * nbytes, "broadcast": (n - 1) * nbytes}[op]


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


def _account(totals: dict[str, int]) -> dict:
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


def step_bytes(traffic: dict) -> dict:
    """A step's bytes from :meth:`Comm.traffic` of that step, *on the wire*: ``total`` is
    what all the group's ranks send (:func:`wire_bytes`: an all-reduce over n ranks counts
    2 (n - 1) x its buffer), then ``per_rank`` (what each rank sends), by kind
    (activations / interface, Jacobians, parameter-gradient reductions, data-parallel
    reductions, control) and by phase; ``messages`` the transport messages. ``logical``
    holds the same account of the logical payloads (a collective once, sends per rank).
    Headers and framing are not in either (about 66 B per TCP packet plus ~100 B per
    gloo message on loopback). Setup traffic is reported apart, never in the total. An
    unknown phase is an error here, so nothing sent goes uncounted."""
    if not isinstance(traffic, dict) or not {"logical", "wire", "messages"} <= set(traffic):
        raise DistributedError(
            "step_bytes takes Comm.traffic() (bytes on the wire per rank and the logical "
            "payload); Comm.totals() alone is the logical payload, which an all-reduce or "
            "all-gather moves several times over")
    wire_phase: dict[str, int] = {}
    for rank in traffic["wire"]:
        for ph, b in rank.items():
            wire_phase[ph] = wire_phase.get(ph, 0) + b
    out = _account(wire_phase)
    out["per_rank"] = [sum(b for ph, b in rank.items() if PHASE_KINDS.get(ph) != "setup")
                       for rank in traffic["wire"]]
    out["messages"] = sum(m for rank in traffic["messages"] for ph, m in rank.items()
                          if PHASE_KINDS.get(ph) != "setup")
    out["logical"] = _account(traffic["logical"])
    return out


# ops whose payload differs per rank of the region group: summed over it in ``totals``
_PER_RANK_OPS = ("send", "dp_all_reduce")


class _Timer:
    """Seconds per part of a step (``RegionParallel.timings``): each ``with T(key):``
    adds its wall time to ``T.t[key]``."""

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

