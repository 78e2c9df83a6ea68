"""Region parallelism for LBI models, one module per concept:

``region_parallel``  :class:`RegionParallel`: one training step of an ``LBIModule`` whose
                     regions are spread over ranks (and replicated over a dp mesh dim)
``mesh``             where each region runs: :func:`placement`, the ("dp", "region") mesh
``exchange``         the backward's r-sized exchanges: all-gather of J_k, or the mbar relay
``grads``            gradient reductions: shared parameters (row-sparse where smaller) and
                     data-parallel averages, without touching earlier steps' ``.grad``
``params``           which rank uses which parameter, hence which reduction it takes
``comm``             :class:`Comm`: every ``torch.distributed`` call, counted and watched
``traffic``          what the bytes are: :func:`step_bytes` (on the wire, per rank, beside the
                     logical payload), :func:`wire_bytes`, :data:`PHASE_KINDS`, :data:`KINDS`
``watch``            the failure side channel: ``PeerFailedError`` / ``DistributedTimeout``
                     instead of a hang
``checkpoint``       distributed checkpoints over DCP (also ``lbi_fx.checkpoint``)
``pipelining``       the torch.distributed.pipelining baseline (also ``lbi_fx.pipelining``)
``ownership``        what each rank holds: holders from the programs' graphs, release to
                     meta, to_empty of a share, world-size-independent init_weights

The names below are this package's public surface, as they were when it was one module.
"""

from lbi_fx.distributed.checkpoint import load, save
from lbi_fx.distributed.comm import Comm, sync_from_rank0
from lbi_fx.distributed.exchange import EXCHANGES, LBI_BACKWARD_PHASES
from lbi_fx.distributed.exchange import row_slices as _row_slices  # noqa: F401
from lbi_fx.distributed.grads import (  # noqa: F401  (private helpers, kept importable)
    _add_grad,
    _flat_by_dtype,
    _reduce_touched_rows,
    _restore_grads,
    _sum_shared,
    _take_grads,
    _unflatten_into,
)
from lbi_fx.distributed.mesh import MESH_DIMS, free_port, mesh_groups, placement
from lbi_fx.distributed.ownership import held_bytes, holders, init_weights, materialize, release
from lbi_fx.distributed.params import _trainable  # noqa: F401
from lbi_fx.distributed.region_parallel import RegionParallel, shard_batch
from lbi_fx.distributed.traffic import (  # noqa: F401
    _PER_RANK_OPS,
    KINDS,
    PHASE_KINDS,
    CommRecord,
    _Timer,
    step_bytes,
    wire_bytes,
    wire_total,
)
from lbi_fx.distributed.watch import STEP_PHASES, Watch, _waiter  # noqa: F401
from lbi_fx.errors import DistributedError, DistributedTimeout, PeerFailedError  # noqa: F401

__all__ = [
    "EXCHANGES", "KINDS", "LBI_BACKWARD_PHASES", "MESH_DIMS", "PHASE_KINDS", "STEP_PHASES",
    "Comm", "CommRecord", "RegionParallel", "Watch",
    "free_port", "held_bytes", "holders", "init_weights", "load", "materialize", "mesh_groups",
    "placement", "release", "save", "shard_batch", "step_bytes",
    "sync_from_rank0", "wire_bytes", "wire_total",
]
