"""Stage-partitioned learning (seed 002) as a second rewrite on lbi-fx's front end.

A composition pi = (d_0, ..., d_{K-1}) of the layers makes K stages. Stage k trains on
its own loss through a head - the model's own epilogue program (final norm, LM head)
run on the stage's output (Eq. 4) - and every edge that enters stage k >= 1 passes the
relay D_lambda(h) = sg(h) + lambda (h - sg(h)) (Eq. 26). lambda = 0 detaches, so stage
k's parameters get gradient from loss k alone (Prop. 4.7); lambda = 1 is plain backprop
of the summed loss; one stage with a shared head is backprop itself (Thm. 5.1).

LBI keeps gradients exact across regions, SPL cuts them; both start from the same
captured, partitioned graph (``lbi_fx.analysis.analyze``), so a user can compare them on
one model.

The modules follow a model through it: ``api`` (``compositions``, ``stage_partition``)
captures and partitions; ``cut`` copies the graph with a ``relay`` (``relays``) on every
cut edge and one head per stage; ``programs`` splits it into one program per stage;
``module`` (``SPLModule``) runs them; ``locality`` checks the gradients that run and
fills ``report``; ``scorers`` score the stage logits.
"""

from lbi_fx.spl.api import HEADS, compositions, stage_partition
from lbi_fx.spl.cut import ROLE_KEY, STAGE_KEY
from lbi_fx.spl.locality import gradient_graph, spl_report
from lbi_fx.spl.module import SCHEDULES, SPLConfig, SPLModule
from lbi_fx.spl.programs import StageProgram, split_stages
from lbi_fx.spl.relays import relay
from lbi_fx.spl.report import CutEdge, ParamReach, SPLReport, Violation
from lbi_fx.spl.scorers import SCORERS, bits_per_byte, stage_bpb, stage_nats

__all__ = [
    "HEADS",
    "ROLE_KEY",
    "SCHEDULES",
    "SCORERS",
    "STAGE_KEY",
    "CutEdge",
    "ParamReach",
    "SPLConfig",
    "SPLModule",
    "SPLReport",
    "StageProgram",
    "Violation",
    "bits_per_byte",
    "compositions",
    "gradient_graph",
    "relay",
    "spl_report",
    "split_stages",
    "stage_bpb",
    "stage_nats",
    "stage_partition",
]
