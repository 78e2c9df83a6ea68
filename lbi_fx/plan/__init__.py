"""``lbi-fx plan``: predict which parallel step is fastest on a given link, from a short
single-process profile of the model, without spawning ranks or shaping a network.

Why: ``lbi-fx bench crossover`` measures GPipe, 1F1B and LBI region parallelism over a
loopback shaped with ``tc``; that needs root, minutes, and the machine it will run on.
``plan`` answers the same question for any rate in seconds, and ``--validate`` holds its
answer against a crossover run.

Profile (one process, one torch thread as each rank of the bench has, medians of
``--reps`` passes after ``--warmup``): for the GPT of the bench (``--layers --width --heads
--seq --batch --vocab``; regions of ``--region-size`` layers, interface rank ``--rank``) and
every micro-batch size b = B / M:

* LBI, per rank of ``placement(K, world)`` and per canvas (``shared`` / ``per_region``),
  the phases ``RegionParallel`` runs, through the same calls (``run_prologue``,
  ``run_regions``, ``region_jacobian``, epilogue + ``last_region_vjp``,
  ``region_local_vjp``, the prologue backward; per-region splits from ``lbi.profile()``),
  and the suffix scan at the full batch;
* pipeline, per stage (``lbi_fx.pipelining``'s stages: the same blocks, stage 0 with the
  embeddings, the last with ``ln_f`` + head + loss): forward and backward at b, and the
  schedule's own cost per action (a one-rank ``PipelineRunner`` minus plain compute);
* dense: forward + loss + backward of the whole model at B on one device.

Compute is timed in CPU seconds of the profiling process (what a dedicated core needs).
By default every rank has a core of its own. ``--contention auto`` measures what a
shared machine gives instead: W spawned processes run a small torch kernel 1, 2, .. W at
a time, and the speed each gets with n running (CPU seconds of the kernel alone / wall
seconds beside n - 1 others) is what the simulator gives n busy ranks (a fair-share
scheduler may give our ranks one core between them while another job holds the other).
The probe's kernel runs without pause; a scheduler favours short bursts after a wait,
so it overstates the slowdown of short phases (pipeline micro-batches) more than of long
ones (LBI's J_k).

Bytes: every exchange's payload from the profiled shapes, with ``Comm``'s accounting
(:func:`lbi_bytes`, :func:`pipeline_bytes`: logical payloads, ``Comm.totals()``'s
accounting) and on the wire (:func:`lbi_wire_bytes`, :func:`pipeline_wire_bytes`:
``step_bytes``' accounting, what the simulated link carries and the report prints);
``tests/test_plan.py`` holds both equal to a real 2-rank run's.

Prediction (:func:`simulate`): a discrete-event simulation of single-threaded ranks
running their op lists in the schedule's order (``gpipe_program``, ``one_f_one_b_program``
follow torch 2.13's ``ScheduleGPipe`` / ``Schedule1F1B``; ``lbi_program`` follows
``RegionParallel.step``) over ONE shared FIFO link, as ``tc tbf`` on ``lo`` queues both
directions in one qdisc. Sends are rendezvous (gloo sends only once the receiver has
posted its receive), a message pays a fixed latency before it queues, and occupies the link
for its wire bytes / rate; a token bucket (``--burst``) lets a burst through at loopback
speed. Collectives: an all-gather of W x n moves W (W - 1) n bytes, a broadcast (W - 1) n,
a ring all-reduce 2 (W - 1) n. With ``--contention``, while n ranks compute each runs at
the speed measured for n (processor sharing).

Left out: a background load that changes between the profile and the run, the probe's
kernel standing for every phase, RegionParallel's own per-phase costs (store writes,
waiter threads: only the per-message latency stands for them), TCP slow start and the tbf
queue limit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from lbi_fx.bench.link import UNSHAPED, parse_rate
from lbi_fx.cli.common import int_list
from lbi_fx.errors import InputError
from lbi_fx.plan.prediction import (
    LABELS,
    LBIS,
    METHODS,
    PIPELINES,
    config_from_crossover,
    crossover,
    method_bytes,
    predict,
    predict_cell,
    programs_for,
    read_crossover,
    validate,
)
from lbi_fx.plan.profiling import (
    Config,
    pipeline_overhead,
    profile,
    profile_dense,
    profile_lbi,
    profile_pipeline,
)
from lbi_fx.plan.reporting import _validation_lines as _validation_lines
from lbi_fx.plan.reporting import report
from lbi_fx.plan.schedules import (
    LBIRank,
    dense_program,
    gpipe_program,
    lbi_program,
    one_f_one_b_program,
)
from lbi_fx.plan.simulator import (
    Collective,
    Compute,
    Link,
    Op,
    Recv,
    Send,
    Simulation,
    Wait,
    simulate,
)
from lbi_fx.plan.testbed import DEFAULT_LATENCY_S, Testbed, contention_probe, parse_size
from lbi_fx.plan.traffic import (
    LOSS_LBI_BYTES,
    LOSS_PIPE_BYTES,
    lbi_bytes,
    lbi_shared_params,
    lbi_widths,
    lbi_wire_bytes,
    pipeline_bytes,
    pipeline_shared_params,
    pipeline_wire_bytes,
)

__all__ = [
    "DEFAULT_LATENCY_S", "DEFAULT_LOOPBACK", "DEFAULT_RATES", "LABELS", "LBIS", "LOSS_LBI_BYTES",
    "LOSS_PIPE_BYTES", "METHODS", "PIPELINES", "UNSHAPED", "Collective", "Compute", "Config",
    "LBIRank", "Link", "Op", "Recv", "Send", "Simulation", "Testbed", "Wait", "add_arguments",
    "config", "config_from_crossover", "contention_probe", "crossover", "dense_program",
    "gpipe_program", "lbi_bytes", "lbi_program", "lbi_shared_params", "lbi_widths",
    "lbi_wire_bytes", "main", "method_bytes", "one_f_one_b_program", "parse_size",
    "pipeline_bytes", "pipeline_overhead", "pipeline_shared_params", "pipeline_wire_bytes", "predict", "predict_cell", "profile", "profile_dense",
    "profile_lbi", "profile_pipeline", "programs_for", "read_crossover", "report", "run",
    "simulate", "validate",
]

DEFAULT_RATES = "unshaped,1gbit,100mbit,10mbit"
DEFAULT_LOOPBACK = "20gbit"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of ``lbi-fx plan`` (the model flags are the crossover bench's)."""
    ap.add_argument("--layers", type=int, default=6, help="GPT layers (default 6)")
    ap.add_argument("--width", type=int, default=64, help="GPT width D (default 64)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--seq", type=int, default=64, help="sequence length L (default 64)")
    ap.add_argument("--batch", type=int, default=16, help="batch B (default 16)")
    ap.add_argument("--vocab", type=int, default=256, help="tokens (default 256)")
    ap.add_argument("--region-size", type=int, default=None,
                    help="layers per region (default 2, or layers / --k)")
    ap.add_argument("--k", type=int, default=None,
                    help="regions K (default: layers / region size)")
    ap.add_argument("--rank", type=int, default=4, help="interface rank r (default 4)")
    ap.add_argument("--world", type=int, default=2, help="ranks / pipeline stages (default 2)")
    ap.add_argument("--microbatches", default=None,
                    help="micro-batch counts M to consider, each dividing the batch (default: "
                         "those of 1,2,4,8 that divide it)")
    ap.add_argument("--rates", default=DEFAULT_RATES,
                    help=f"comma-separated tc rates or 'unshaped' (default {DEFAULT_RATES})")
    ap.add_argument("--latency", type=float, default=DEFAULT_LATENCY_S,
                    help=f"seconds each message waits before it queues (default "
                         f"{DEFAULT_LATENCY_S:g})")
    ap.add_argument("--loopback", default=DEFAULT_LOOPBACK,
                    help=f"the unshaped loopback's rate (default {DEFAULT_LOOPBACK})")
    ap.add_argument("--burst", default="16kb", help="tc tbf burst (default 16kb, the bench's)")
    ap.add_argument("--mtu", type=int, default=1500,
                    help="MTU while shaped, for header overhead (default 1500, the bench's)")
    ap.add_argument("--contention", default="none",
                    help="speed of a rank while 1, 2, .. ranks compute: none (a core per "
                         "rank, default), auto (measured here by spawned processes: for a "
                         "shared machine), or comma-separated fractions, e.g. 1,0.6")
    ap.add_argument("--reps", type=int, default=5, help="timed passes per phase (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    ap.add_argument("--validate", metavar="CROSSOVER.json", default=None,
                    help="compare with a `lbi-fx bench crossover --json` run (its model "
                         "config replaces the model flags)")
    ap.add_argument("--json", action="store_true", help="print everything as JSON")


def config(a: argparse.Namespace) -> Config:
    """The plan's Config from flags; InputError naming the flag on any bad value."""
    size = a.region_size
    if a.k is not None:
        if a.k < 1:
            raise InputError(f"--k {a.k}: at least 1 region")
        if a.layers % a.k:
            raise InputError(f"--k {a.k} does not divide --layers {a.layers} into equal regions")
        if size is not None and size != a.layers // a.k:
            raise InputError(f"--k {a.k} and --region-size {size} disagree: {a.layers} layers "
                             f"in {a.k} regions are {a.layers // a.k} layers each")
        size = a.layers // a.k
    if a.microbatches is None:
        ms = tuple(m for m in (1, 2, 4, 8) if a.batch >= 1 and a.batch % m == 0)
    else:
        ms = tuple(int_list(a.microbatches, "--microbatches"))
    cfg = Config(layers=a.layers, width=a.width, heads=a.heads, seq=a.seq, batch=a.batch,
                 region_size=2 if size is None else size, rank=a.rank, vocab=a.vocab,
                 world=a.world, microbatches=ms)
    cfg.check()
    return cfg


def _speeds(text: str):
    """``--contention``: "auto", None for "none", or a tuple of speeds in (0, 1.5]."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if not vals or not all(0 < v <= 1.5 for v in vals):
        raise InputError(f"--contention {text!r}: auto, none, or speeds in (0, 1.5] per number "
                         "of busy ranks, e.g. 1,0.6")
    return vals


def _rates(text: str) -> list[str]:
    rates = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not rates:
        raise InputError("--rates is empty: give e.g. unshaped,100mbit,10mbit")
    for r in rates:
        parse_rate(r)
    return rates


def run(a: argparse.Namespace) -> int:
    """``lbi-fx plan``; exit status 0 (validation errors are reported, not failed)."""
    if a.latency < 0:
        raise InputError(f"--latency {a.latency}: seconds, >= 0")
    if a.mtu < 100:
        raise InputError(f"--mtu {a.mtu}: at least 100 bytes")
    loop = parse_rate(a.loopback)
    if loop == math.inf:
        raise InputError(f"--loopback {a.loopback!r}: give a finite rate, e.g. 20gbit")
    burst = parse_size(a.burst)
    speeds = _speeds(a.contention)
    data = None
    if a.validate:
        data = read_crossover(a.validate)
        cfg = config_from_crossover(data)
        cfg.check()
        rates = list(data["rates"])
        for r in rates:
            parse_rate(r)
    else:
        cfg = config(a)
        rates = _rates(a.rates)

    def progress(msg: str) -> None:
        print(f"lbi-fx plan: {msg}", file=sys.stderr, flush=True)

    prof = profile(cfg, a.reps, a.warmup, progress=progress)
    if speeds == "auto":
        progress(f"measuring contention with {cfg.world} processes")
        speeds = tuple(contention_probe(cfg.world))
    tb = Testbed(latency=a.latency, loopback=loop / 8, burst=burst, mtu=a.mtu, speeds=speeds)
    res = dict(config=cfg.as_dict(), link=tb.as_dict(), profile=prof, **predict(prof, rates, tb))
    if data is not None:
        res["validation"] = dict(path=a.validate, **validate(prof, data, tb))
    if a.json:
        print(json.dumps(_finite(res), indent=1))
    else:
        print(report(res))
    return 0


def _finite(x):
    """Strict JSON: inf / nan become None (``crossover.break_even_bps`` None with a
    crossover rate set means LBI wins at every listed rate)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m lbi_fx.plan``)."""
    from lbi_fx.cli.common import standalone

    return standalone(sys.modules[__name__], "lbi-fx plan", argv)
