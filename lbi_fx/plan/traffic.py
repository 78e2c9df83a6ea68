"""Bytes per step of each parallel method, from the profiled shapes: the logical payloads
with ``Comm.totals()``'s accounting (sends summed over ranks, collectives once), and the
bytes on the wire (``step_bytes``' accounting: what all ranks send, an all-reduce over W
ranks 2 (W - 1) times its buffer, :func:`~lbi_fx.distributed.traffic.wire_total`), which
the schedule programs put on the simulated link; ``tests/test_plan.py`` holds both equal to
a real run's.

Why a module of its own: the payload formulas and the shared-parameter accounting (which
parameters a runner all-reduces) are shared by the byte report and the schedule programs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lbi_fx.distributed.traffic import wire_total

LOSS_LBI_BYTES = 3 * 8   # RegionParallel._loss: (loss, B, B^2) in float64
LOSS_PIPE_BYTES = 8      # PipelineRunner.step: the loss broadcast, float64


def bucket_bytes(buckets: Sequence[Sequence[int]]) -> int:
    """``_flat_by_dtype``'s buffers: (numel, params, bytes per element) per dtype; one flag
    element per parameter."""
    return sum((numel + count) * es for numel, count, es in buckets)


# the collective (or send) each phase is, for its bytes on the wire
LBI_PHASE_OPS = {"forward_m": "send", "mbar_relay": "send", "scan_allgather": "all_gather",
                 "mbar_broadcast": "broadcast", "grad_allreduce": "all_reduce",
                 "grad_rows": "all_reduce", "loss": "all_reduce"}
PIPE_PHASE_OPS = {"pipe_forward_act": "send", "pipe_backward_grad": "send",
                  "grad_allreduce": "all_reduce", "loss": "broadcast"}


def on_wire(phases: dict, world: int, ops: dict) -> dict:
    """Logical bytes per phase -> what all ``world`` ranks send for them (every collective
    over all the ranks, as ``RegionParallel`` and ``PipelineRunner`` run them)."""
    return {ph: wire_total(ops[ph], b, world) for ph, b in phases.items()}


def lbi_wire_bytes(B: int, widths: Sequence[int], r_max: int, place: Sequence[Sequence[int]],
                   exchange: str, shared: Sequence[Sequence[int]] = (), elem: int = 4) -> dict:
    """:func:`lbi_bytes` on the wire (``step_bytes(...)["by_phase"]``)."""
    return on_wire(lbi_bytes(B, widths, r_max, place, exchange, shared, elem), len(place),
                   LBI_PHASE_OPS)


def pipeline_wire_bytes(B: int, act_per_row: int, world: int,
                        shared: Sequence[Sequence[int]] = (), elem: int = 4) -> dict:
    """:func:`pipeline_bytes` on the wire (``step_bytes(...)["by_phase"]``)."""
    return on_wire(pipeline_bytes(B, act_per_row, world, shared, elem), world, PIPE_PHASE_OPS)


def lbi_bytes(B: int, widths: Sequence[int], r_max: int, place: Sequence[Sequence[int]],
              exchange: str, shared: Sequence[Sequence[int]] = (), elem: int = 4) -> dict:
    """Bytes per phase of one ``RegionParallel`` step as ``Comm.totals()`` counts them
    (sends summed over ranks, collectives once). ``widths``: m_0 .. m_{K-1};
    ``shared``: (numel, params, bytes per element) per dtype of the parameters used on
    more than one rank. The totals do not depend on the micro-batch count."""
    W, K = len(place), len(widths)
    out: dict[str, int] = {}
    fwd = sum(B * widths[place[j][-1] + 1] * elem for j in range(W - 1))
    if fwd:
        out["forward_m"] = fwd
    if exchange == "allgather":
        slots = max(len(p) for p in place)
        out["scan_allgather"] = W * B * slots * r_max * r_max * elem
        out["mbar_broadcast"] = B * widths[K - 1] * elem
    else:
        relay = sum(B * (widths[place[j][0]] + 1) * elem for j in range(1, W))
        if relay:
            out["mbar_relay"] = relay
    grads = bucket_bytes(shared)
    if grads:
        out["grad_allreduce"] = grads
    out["loss"] = LOSS_LBI_BYTES
    return out


def pipeline_bytes(B: int, act_per_row: int, world: int, shared: Sequence[Sequence[int]] = (),
                   elem: int = 4) -> dict:
    """Bytes per phase of one ``PipelineRunner`` step (``pipe_meta`` left out: once per
    schedule): the (B, L, D) activations forward and their gradients back across each of
    the W - 1 boundaries, whatever the micro-batch count; the tied-weight all-reduce; the
    loss broadcast."""
    if world == 1:
        return {}
    out = {"pipe_forward_act": (world - 1) * B * act_per_row * elem,
           "pipe_backward_grad": (world - 1) * B * act_per_row * elem}
    grads = bucket_bytes(shared)
    if grads:
        out["grad_allreduce"] = grads
    out["loss"] = LOSS_PIPE_BYTES
    return out


def _trainable(gm: torch.nn.Module) -> list:
    return [p for p in dict.fromkeys(gm.parameters()) if p.requires_grad]


def _buckets(params: Sequence[torch.nn.Parameter]) -> list[tuple[int, int, int]]:
    by: dict = {}
    for p in params:
        n, c, _ = by.get(p.dtype, (0, 0, 0))
        by[p.dtype] = (n + p.numel(), c + 1, p.element_size())
    return list(by.values())


def lbi_shared_params(lbi, world: int) -> list[tuple[int, int, int]]:
    """Buckets of the parameters ``RegionParallel`` all-reduces on ``world`` ranks (no dp):
    those whose users (prologue reach, epilogue = last rank, regions = their owner) span
    more than one rank, as ``RegionParallel._layout`` finds them."""
    from lbi_fx.distributed import placement

    place = placement(lbi.num_regions, world)
    owner = {k: j for j, ks in enumerate(place) for k in ks}
    last = world - 1
    progs = lbi.programs
    names = {id(p): n for n, p in lbi.named_parameters()}
    reach = lbi.prologue_param_users()
    users: dict[int, set[int]] = {}
    for p in _trainable(progs["prologue"]):
        who = reach.get(names.get(id(p)))
        ranks = (set(range(world)) if who is None else
                 {last if k == "epilogue" else owner[k] for k in who})
        users.setdefault(id(p), set()).update(ranks)
    for p in _trainable(progs["epilogue"]):
        users.setdefault(id(p), set()).add(last)
    for k, rgm in enumerate(progs["regions"]):
        for p in _trainable(rgm):
            users.setdefault(id(p), set()).add(owner[k])
    byid = {id(p): p for _, p in lbi.named_parameters()}
    return _buckets([byid[i] for i, u in users.items() if i in names and len(u) > 1])


def pipeline_shared_params(model, stage_layers: Sequence[Sequence[int]]) -> list:
    """Buckets of the parameters on several pipeline stages (the tied head), as
    ``PipelineRunner`` sums them."""
    from lbi_fx.pipelining import _Stage

    W = len(stage_layers)
    uses: dict[int, set[int]] = {}
    for j, layers in enumerate(stage_layers):
        for p in _Stage(model, layers, j == 0, j == W - 1).parameters():
            uses.setdefault(id(p), set()).add(j)
    return _buckets([p for p in dict.fromkeys(model.parameters()) if len(uses.get(id(p), ())) > 1])


def lbi_widths(lbi) -> tuple[list[int], int]:
    """(widths of m_0 .. m_{K-1}, r_max) as ``RegionParallel`` lays them out."""
    widths = [lbi.ranks[0], *lbi.ranks]
    return widths, max(widths)
