"""A step's account: what every byte sent is (its phase and kind) and where the seconds
went.

Region parallelism is compared with pipelining by what it sends, so nothing may go
uncounted: :class:`~lbi_fx.distributed.comm.Comm` records each send and collective as a
:class:`CommRecord` of its phase, and :func:`step_bytes` refuses a phase that has no kind
in :data:`PHASE_KINDS`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lbi_fx.errors import DistributedError


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

