"""Prediction and validation for ``lbi-fx plan``: a profile
(:func:`~lbi_fx.plan.profiling.profile`) turned into each method's op lists, simulated at
every (rate, M); the fastest method per rate and the crossover rate; and the same
predictions held against a ``lbi-fx bench crossover`` run (:func:`validate`).

Why a module of its own: it is where profile, schedules, bytes and testbed meet; it reads
only the profile's plain dict, so it runs on a profile loaded from JSON as well.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

from lbi_fx.bench.link import UNSHAPED, format_rate, parse_rate
from lbi_fx.errors import InputError
from lbi_fx.plan.profiling import Config, median
from lbi_fx.plan.schedules import (
    LBIRank,
    dense_program,
    gpipe_program,
    lbi_program,
    one_f_one_b_program,
)
from lbi_fx.plan.simulator import Op, Simulation
from lbi_fx.plan.testbed import Testbed
from lbi_fx.plan.traffic import bucket_bytes, lbi_wire_bytes, pipeline_wire_bytes

METHODS = ("dense", "gpipe", "1f1b", "lbi_shared", "lbi_shared_relay", "lbi_per_region",
           "lbi_per_region_relay")
PIPELINES = ("gpipe", "1f1b")
LBIS = METHODS[3:]
LABELS = {"dense": "dense (1 device)", "gpipe": "GPipe", "1f1b": "1F1B",
          "lbi_shared": "LBI shared", "lbi_shared_relay": "LBI shared relay",
          "lbi_per_region": "LBI per-region", "lbi_per_region_relay": "LBI per-region relay"}


def programs_for(prof: dict, method: str, M: int) -> list[list[Op]] | None:
    """The op lists of ``method`` at M micro-batches from a :func:`profile`; None where the
    method cannot run (1F1B with M < world)."""
    cfg = prof["config"]
    B, W = cfg["batch"], cfg["world"]
    b = B // M
    if method == "dense":
        return dense_program(prof["dense_s"])
    if method in PIPELINES:
        p = prof["pipeline"]
        t = _per_b(p["per_b"], b)
        act = b * p["act_per_row"] * p["elem"]
        grad = bucket_bytes(p["shared"])
        # the schedule's own cost per action, measured on one stage holding the whole
        # model: each stage pays its share, in proportion to its compute
        oh = _per_b(p.get("overhead") or {}, b, 0.0)
        work = [f + g for f, g in zip(t["fwd"], t["bwd"])]
        share = [w / sum(work) if sum(work) else 1 / W for w in work]
        fwd = [x + oh * s for x, s in zip(t["fwd"], share)]
        bwd = [x + oh * s for x, s in zip(t["bwd"], share)]
        if method == "gpipe":
            return gpipe_program(fwd, bwd, M, act, grad)
        if M < W:
            return None
        return one_f_one_b_program(fwd, bwd, M, act, grad)
    canvas, exchange = _lbi_variant(method)
    p = prof["lbi"][canvas]
    t = _per_b(p["per_b"], b)
    ranks = [LBIRank(**r) for r in t["ranks"]]
    return lbi_program(ranks, p["place"], p["widths"], p["r_max"], B, M, exchange,
                       bucket_bytes(p["shared"]), p["elem"])


def _lbi_variant(method: str) -> tuple[str, str]:
    """(canvas, exchange) of an LBI method's name."""
    return ("per_region" if "per_region" in method else "shared",
            "relay" if method.endswith("_relay") else "allgather")


def _per_b(per: dict, b: int, default=None):
    """``per[b]``, also after a JSON round trip turned the keys into strings."""
    return per[b] if b in per else per.get(str(b), default)


def method_bytes(prof: dict, method: str) -> dict:
    """Bytes per phase of one step of ``method`` on the wire, all ranks (``step_bytes``'
    accounting: what the simulated link carries)."""
    cfg = prof["config"]
    if method == "dense":
        return {}
    if method in PIPELINES:
        p = prof["pipeline"]
        return pipeline_wire_bytes(cfg["batch"], p["act_per_row"], cfg["world"], p["shared"],
                                   p["elem"])
    canvas, exchange = _lbi_variant(method)
    p = prof["lbi"][canvas]
    return lbi_wire_bytes(cfg["batch"], p["widths"], p["r_max"], p["place"], exchange,
                          p["shared"], p["elem"])


def predict_cell(prof: dict, method: str, M: int, tb: Testbed,
                 rate: str | float) -> Simulation | None:
    """One (method, M) at one rate; None where the method cannot run."""
    progs = programs_for(prof, method, M)
    return None if progs is None else tb.simulate(progs, rate)


def predict(prof: dict, rates: Sequence[str], tb: Testbed,
            methods: Sequence[str] = METHODS) -> dict:
    """Every (rate, method, M) cell, the best M per rate and method, the fastest method per
    rate, and the crossover: the highest listed rate at which the best LBI beats the best
    pipeline, with the break-even rate between listed rates found by bisection."""
    cfg = prof["config"]
    cells = []
    table: dict = {}
    for rate in rates:
        table[rate] = {}
        for method in methods:
            best = None
            for M in _microbatches(cfg, method):
                sim = predict_cell(prof, method, M, tb, rate)
                if sim is None:
                    continue
                cell = dict(rate=rate, method=method, microbatches=M, step_s=sim.step_s,
                            link_busy_s=sim.link_busy_s, messages=sim.messages,
                            busy_s=sim.busy_s)
                cells.append(cell)
                if best is None or sim.step_s < best["step_s"]:
                    best = dict(step_s=sim.step_s, microbatches=M)
            table[rate][method] = best
    fastest = {rate: min((m for m in methods if table[rate][m]),
                         key=lambda m: table[rate][m]["step_s"]) for rate in rates}
    cross = crossover(prof, table, rates, tb)
    return dict(rates=list(rates), methods=list(methods), cells=cells, table=table,
                fastest=fastest, crossover=cross,
                bytes={m: method_bytes(prof, m) for m in methods})


def _microbatches(cfg: dict, method: str) -> list[int]:
    """The M a method is tried at: dense runs the whole batch at once."""
    return [1] if method == "dense" else list(cfg["microbatches"])


def _best(prof: dict, family: Sequence[str], tb: Testbed, bps: float) -> tuple[float, str, int]:
    out = (math.inf, "", 0)
    for method in family:
        for M in prof["config"]["microbatches"]:
            sim = predict_cell(prof, method, M, tb, bps)
            if sim is not None and sim.step_s < out[0]:
                out = (sim.step_s, method, M)
    return out


def crossover(prof: dict, table: dict, rates: Sequence[str], tb: Testbed) -> dict:
    """Where the best LBI starts beating the best pipeline, from fast links to slow."""
    order = sorted(rates, key=lambda r: math.inf if r == UNSHAPED else parse_rate(r), reverse=True)
    rows = []
    for rate in order:
        lbi = [(table[rate][m]["step_s"], m) for m in LBIS if table[rate].get(m)]
        pipe = [(table[rate][m]["step_s"], m) for m in PIPELINES if table[rate].get(m)]
        if lbi and pipe:
            (tl, ml), (tp, mp) = min(lbi), min(pipe)
            rows.append(dict(rate=rate, lbi=ml, lbi_s=tl, pipeline=mp, pipeline_s=tp,
                             lbi_wins=tl < tp))
    wins = [r["rate"] for r in rows if r["lbi_wins"]]
    rate = wins[0] if wins else None
    # break-even: bisect (log rate) between the fastest win and the next faster loss
    be = None
    if rate is not None:
        i = [r["rate"] for r in rows].index(rate)
        if i == 0:
            be = math.inf
        else:
            hi_rate = rows[i - 1]["rate"]
            lo = parse_rate(rate)
            hi = tb.loopback * 8 if hi_rate == UNSHAPED else parse_rate(hi_rate)

            def lbi_ahead(bps: float) -> bool:
                return _best(prof, LBIS, tb, bps)[0] < _best(prof, PIPELINES, tb, bps)[0]

            if lbi_ahead(hi):
                be = hi
            else:
                for _ in range(30):
                    mid = math.sqrt(lo * hi)
                    lo, hi = (mid, hi) if lbi_ahead(mid) else (lo, mid)
                be = lo
    if rate is None:
        text = ("LBI is predicted to lose at every rate (" + ", ".join(order) + ")"
                if rows else "nothing to compare")
    else:
        r = next(x for x in rows if x["rate"] == rate)
        text = (f"predicted crossover at {rate}: the highest listed rate at which the best LBI "
                f"({LABELS[r['lbi']]}, {r['lbi_s']:.3f} s) beats the best pipeline "
                f"({LABELS[r['pipeline']]}, {r['pipeline_s']:.3f} s)")
        if be is not None and be != math.inf:
            text += f"; break-even near {format_rate(be)}"
        loses = [x["rate"] for x in rows if not x["lbi_wins"]]
        if loses:
            text += "; LBI loses at " + ", ".join(loses)
    return dict(rate=rate, break_even_bps=be, per_rate=rows, text=text)



# -- validation against a crossover run --------------------------------------------------------

def read_crossover(path: str) -> dict:
    """A ``lbi-fx bench crossover --json`` result; InputError when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"--validate {path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"--validate {path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not {"config", "runs", "rates"} <= set(data):
        raise InputError(f"--validate {path}: not a `lbi-fx bench crossover --json` result "
                         "(needs its config, rates and runs)")
    return data


def config_from_crossover(data: dict) -> Config:
    """The run's model and sizes; M the batch does not split into (the bench skipped
    them) are dropped."""
    c = data["config"]
    try:
        ms = tuple(m for m in c["microbatches"] if m >= 1 and c["batch"] % m == 0)
        return Config(layers=c["layers"], width=c["width"], heads=c["heads"], seq=c["seq"],
                      batch=c["batch"], region_size=c["region_size"], rank=c["rank"],
                      vocab=c.get("vocab", 256), world=c["world"], microbatches=ms)
    except (KeyError, TypeError) as exc:
        raise InputError(f"crossover JSON config lacks {exc}: cannot rebuild its model") from None


def _method_of(name: str, exchange: str | None) -> str | None:
    """Our method for a bench row's name (``lbi_shared`` runs the config's exchange)."""
    if name in PIPELINES:
        return name
    if not name.startswith("lbi_"):
        return None
    canvas = "per_region" if "per_region" in name else "shared"
    relay = name.endswith("_relay") or (not name.endswith("_allgather") and exchange == "relay")
    return f"lbi_{canvas}" + ("_relay" if relay else "")


def validate(prof: dict, data: dict, tb: Testbed, threshold: float = 0.25) -> dict:
    """Predicted vs measured for every timed (rate, method, M) row of a crossover run, the
    relative error (predicted / measured - 1), its max, the cells beyond ``threshold``;
    rows the bench modeled rather than measured are kept apart. Also the per-message
    latency that fits the unshaped pipeline rows best, and every error with it."""
    exchange = data["config"].get("exchange")
    rows = []
    for rate, runs in data["runs"].items():
        for r in runs:
            ours = _method_of(r.get("method", ""), exchange)
            if ours is None or "median_s" not in r:
                continue
            modeled = bool(r.get("modeled")) or (data.get("mode") == "modeled"
                                                  and rate != UNSHAPED)
            rows.append(dict(rate=rate, method=r["method"], ours=ours,
                             microbatches=r["microbatches"], measured_s=r["median_s"],
                             modeled=modeled))

    def score(latency: float) -> list[dict]:
        at = dataclasses.replace(tb, latency=latency)
        out = []
        for row in rows:
            sim = predict_cell(prof, row["ours"], row["microbatches"], at, row["rate"])
            pred = math.nan if sim is None else sim.step_s
            out.append(dict(row, predicted_s=pred, rel_error=pred / row["measured_s"] - 1))
        return out

    def summary(cells: list[dict]) -> dict:
        real = [c for c in cells if not c["modeled"] and math.isfinite(c["rel_error"])]
        worst = max(real, key=lambda c: abs(c["rel_error"]), default=None)
        return dict(cells=cells, max_abs_rel_error=None if worst is None else abs(worst["rel_error"]),
                    worst=worst, over=[c for c in real if abs(c["rel_error"]) > threshold],
                    median_abs_rel_error=median([abs(c["rel_error"]) for c in real]))

    base = summary(score(tb.latency))
    # the latency is fitted where it shows: the unshaped pipeline rows (2M messages of
    # little compute each); LBI's rows are compute-bound and would make it absorb the
    # compute error instead
    fit_rows = [r for r in rows if r["rate"] == UNSHAPED and r["ours"] in PIPELINES] or \
        [r for r in rows if r["rate"] == UNSHAPED]
    fitted = None
    if fit_rows:
        keys = {(r["rate"], r["method"], r["microbatches"]) for r in fit_rows}

        def err(lat: float) -> float:
            return median([abs(c["rel_error"]) for c in score(lat)
                            if (c["rate"], c["method"], c["microbatches"]) in keys
                            and math.isfinite(c["rel_error"])])
        grid = [i * 5e-5 for i in range(41)]  # 0 .. 2 ms
        lat = min(grid, key=err)
        fitted = dict(latency_s=lat, fitted_on=len(keys), **summary(score(lat)))
    return dict(threshold=threshold, mode=data.get("mode"), default=base, fitted_latency=fitted)
