"""The schedules ``lbi-fx plan`` compares, written as per-rank op lists for
:func:`~lbi_fx.plan.simulator.simulate`.

Why a module of its own: each program restates, op for op, the order in which a real
runner computes, sends, receives and waits (torch 2.13's ``ScheduleGPipe`` /
``Schedule1F1B``, ``RegionParallel.step``); keeping them together keeps them comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lbi_fx.distributed.traffic import wire_total
from lbi_fx.errors import InputError
from lbi_fx.plan.simulator import Collective, Compute, Op, Recv, Send, Wait
from lbi_fx.plan.traffic import LOSS_LBI_BYTES, LOSS_PIPE_BYTES


def dense_program(step_s: float) -> list[list[Op]]:
    """One device: the measured step, nothing sent."""
    return [[Compute(step_s, "dense")]]


def _grad_allreduce(W: int, grad_bytes: float) -> list[Op]:
    """The shared-gradient all-reduce (ring: 2 (W - 1) n bytes on the wire, 2 (W - 1)
    rounds), if any."""
    if not grad_bytes or W == 1:
        return []
    return [Collective("grad_allreduce", wire_total("all_reduce", grad_bytes, W), 2 * (W - 1))]


def gpipe_program(fwd: Sequence[float], bwd: Sequence[float], M: int, act_bytes: float,
                  grad_bytes: float = 0.0) -> list[list[Op]]:
    """torch 2.13 ``ScheduleGPipe``: per micro-batch receive (wait), forward, post the
    send; wait the sends; then the same backward; then ``PipelineRunner``'s tied-weight
    all-reduce and loss broadcast. ``fwd`` / ``bwd``: seconds per micro-batch per stage
    (the last stage's forward includes the loss); ``act_bytes``: one micro-batch's
    activation (= gradient) at a boundary."""
    W = len(fwd)
    progs: list[list[Op]] = []
    for j in range(W):
        ops: list[Op] = []
        sent: list[str] = []
        for i in range(M):
            if j > 0:
                tag = f"act{i}:{j}"
                ops += [Recv(tag, j - 1), Wait((tag,))]
            ops.append(Compute(fwd[j], f"F{i}"))
            if j < W - 1:
                tag = f"act{i}:{j + 1}"
                ops.append(Send(tag, j + 1, act_bytes))
                sent.append(tag)
        if sent:
            ops.append(Wait(tuple(sent)))
        sent = []
        for i in range(M):
            if j < W - 1:
                tag = f"grad{i}:{j}"
                ops += [Recv(tag, j + 1), Wait((tag,))]
            ops.append(Compute(bwd[j], f"B{i}"))
            if j > 0:
                tag = f"grad{i}:{j - 1}"
                ops.append(Send(tag, j - 1, act_bytes))
                sent.append(tag)
        if sent:
            ops.append(Wait(tuple(sent)))
        progs.append(ops + _pipeline_tail(W, grad_bytes))
    return progs


def _pipeline_tail(W: int, grad_bytes: float) -> list[Op]:
    if W == 1:
        return []
    return _grad_allreduce(W, grad_bytes) + [Collective("loss",
                                                        wire_total("broadcast", LOSS_PIPE_BYTES, W))]


def one_f_one_b_program(fwd: Sequence[float], bwd: Sequence[float], M: int,
                        act_bytes: float, grad_bytes: float = 0.0) -> list[list[Op]]:
    """torch 2.13 ``Schedule1F1B``, op for op: W - j warm-up forwards (the last one's send
    left to fire with the first backward's receive), then pairs of (send + receive, wait,
    compute), then the cool-down backwards. Needs M >= W."""
    W = len(fwd)
    if M < W:
        raise InputError(f"1F1B over {W} stages needs M >= {W} micro-batches, got {M}")
    return [_one_f_one_b_stage(j, W, fwd[j], bwd[j], M, act_bytes)
            + _pipeline_tail(W, grad_bytes) for j in range(W)]


def _one_f_one_b_stage(j: int, W: int, fwd: float, bwd: float, M: int,
                       act_bytes: float) -> list[Op]:
    def fwd_send(i: int) -> list[Op]:
        return [Send(f"act{i}:{j + 1}", j + 1, act_bytes)] if j < W - 1 else []

    def fwd_recv(i: int) -> list[Op]:
        return [Recv(f"act{i}:{j}", j - 1)] if j > 0 else []

    def bwd_send(i: int) -> list[Op]:
        return [Send(f"grad{i}:{j - 1}", j - 1, act_bytes)] if j > 0 else []

    def bwd_recv(i: int) -> list[Op]:
        return [Recv(f"grad{i}:{j}", j + 1)] if j < W - 1 else []

    def fire(batch: list[Op]) -> list[Op]:  # _batch_p2p then _wait_batch_p2p
        tags = tuple(o.tag for o in batch)
        return batch + ([Wait(tags)] if tags else [])

    ops: list[Op] = []
    warm = min(M, W - j)
    f = b = 0
    send_work: tuple[str, ...] = ()
    pending: list[Op] = []
    for _ in range(warm):
        ops += fire(fwd_recv(f))
        ops.append(Compute(fwd, f"F{f}"))
        if send_work:
            ops.append(Wait(send_work))
        pending = fwd_send(f)
        if f != warm - 1:  # the last warm-up send fires with the first backward's receive
            ops += pending
            send_work, pending = tuple(o.tag for o in pending), []
        f += 1
    while True:
        ops += fire(pending + bwd_recv(b))
        ops.append(Compute(bwd, f"B{b}"))
        pending = bwd_send(b)
        b += 1
        if f == M:
            break
        ops += fire(pending + fwd_recv(f))
        ops.append(Compute(fwd, f"F{f}"))
        pending = fwd_send(f)
        f += 1
    ops += pending
    send_work = tuple(o.tag for o in pending)
    while b < M:  # cool-down
        ops += fire(bwd_recv(b))
        ops.append(Compute(bwd, f"B{b}"))
        if send_work:
            ops.append(Wait(send_work))
        pending = bwd_send(b)
        ops += pending
        send_work = tuple(o.tag for o in pending)
        b += 1
    if send_work:
        ops.append(Wait(send_work))
    return ops


@dataclass
class LBIRank:
    """One rank's measured seconds in ``RegionParallel.step`` at one micro-batch size:
    per micro-batch ``prologue`` forward, ``forward`` (its regions), ``jacobian`` (its
    J_k), ``seed`` (last rank: epilogue, loss backward, seed VJP), ``local`` (its local
    VJPs), ``prologue_bwd``; per step ``scan`` (its suffix scan over all rows, keyed by
    exchange)."""

    prologue: float
    forward: float
    jacobian: float
    local: float
    prologue_bwd: float
    seed: float = 0.0
    scan: dict = field(default_factory=dict)


def lbi_program(ranks: Sequence[LBIRank], place: Sequence[Sequence[int]],
                widths: Sequence[int], r_max: int, B: int, M: int, exchange: str,
                grad_bytes: float = 0.0, elem: int = 4) -> list[list[Op]]:
    """``RegionParallel.step`` with ``microbatches=M``: per micro-batch prologue, receive
    m_k (wait), forward, post the send of m_{k+1}, J_k, (last rank) epilogue and seed,
    wait the send; then the exchange (``allgather``: J all-gather + mbar broadcast;
    ``relay``: mbar received from the right, scanned, sent left), the local VJPs, the
    prologue backward, the shared-gradient and loss all-reduces."""
    W, K = len(place), len(widths)
    b = B // M
    last = W - 1
    progs = []
    for j, (t, mine) in enumerate(zip(ranks, place)):
        k0, k1 = mine[0], mine[-1] + 1
        ops: list[Op] = []
        for i in range(M):
            ops.append(Compute(t.prologue, f"prologue{i}"))
            if k0 > 0:
                ops += [Recv(f"m{i}:{j}", j - 1), Wait((f"m{i}:{j}",))]
            ops.append(Compute(t.forward, f"forward{i}"))
            if k1 < K:
                ops.append(Send(f"m{i}:{j + 1}", j + 1, b * widths[k1] * elem))
            ops.append(Compute(t.jacobian, f"jacobian{i}"))
            if j == last:
                ops.append(Compute(t.seed, f"seed{i}"))
            if k1 < K:
                ops.append(Wait((f"m{i}:{j + 1}",)))
        if exchange == "allgather":
            slots = max(len(p) for p in place)
            ops.append(Collective("scan_allgather", wire_total(
                "all_gather", W * B * slots * r_max * r_max * elem, W), max(W - 1, 1)))
            ops.append(Collective("mbar_broadcast",
                                  wire_total("broadcast", B * widths[K - 1] * elem, W)))
            if k0 < K - 1:
                ops.append(Compute(t.scan.get("allgather", 0.0), "scan"))
        elif exchange == "relay":
            if j != last:
                ops += [Recv(f"mbar:{j}", j + 1), Wait((f"mbar:{j}",))]
            if any(k < K - 1 for k in mine):
                ops.append(Compute(t.scan.get("relay", 0.0), "scan"))
            if j > 0:
                ops += [Send(f"mbar:{j - 1}", j - 1, B * (widths[k0] + 1) * elem),
                        Wait((f"mbar:{j - 1}",))]
        else:
            raise InputError(f"exchange {exchange!r}: choose allgather or relay")
        ops.append(Compute(M * t.local, "local"))
        ops.append(Compute(M * t.prologue_bwd, "prologue_bwd"))
        ops += _grad_allreduce(W, grad_bytes)
        ops.append(Collective("loss", wire_total("all_reduce", LOSS_LBI_BYTES, W),
                              max(2 * (W - 1), 1)))
        progs.append(ops)
    return progs
