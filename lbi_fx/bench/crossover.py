"""``lbi-fx bench crossover``: the link rate below which LBI region parallelism beats
torch's pipeline schedules, timed over a loopback shaped to each rate.

For each rate in ``--rates`` the loopback is shaped with ``tc`` (``lbi_fx.bench.link``:
MTU 1500, tbf burst 16kb, limit 16mb; needs root) around one spawn of ``--world`` gloo
ranks on 127.0.0.1 (one torch thread each), which build the demo GPT (6 layers, width 64,
4 heads, seq 64, batch 16, regions of 2 layers, interface rank 4) and time ``--steps``
steps of each method, the first ``--warmup`` excluded:

* ``gpipe`` / ``1f1b``: ``torch.distributed.pipelining`` schedules via
  ``lbi_fx.pipelining.PipelineRunner``, for each M in ``--microbatches`` (1F1B: M >= stages);
* ``lbi_shared``: ``lbi_fx.distributed.RegionParallel`` on ``lbi_fx.transform``'s model
  (for each M when RegionParallel takes ``microbatches=``; otherwise M = 1 only);
* ``lbi_per_region``: the same with ``transform(..., canvas_weights="per_region")``
  (skipped, with a note, where transform does not take it).

A step's time is the wall from a barrier to the step's end, the max over ranks; a
method's time is the median over the timed steps, and its row shows the best M. Bytes per
step are ``Comm.totals()`` of one steady-state step (without ``pipe_meta`` and
``init_broadcast``); "total" is their logical payload, "wire" what the ranks sent
(``CommRecord.wire``, summed over ranks: sends and broadcasts once per receiver, each
part of an all-gather W - 1 times, an all-reduce 2 (W - 1) times as gloo's ring runs it).

``--modeled`` shapes nothing: it measures unshaped once and predicts each rate's step as
``t_unshaped + 8 * wire_bytes / rate``: every exchange of these steps is waited for, so
all of it is charged, on one link shared by both directions as the shaped loopback is;
it ignores micro-batch transfers overlapping compute (pessimistic for GPipe/1F1B at
M > 1), TCP/IP headers (~3% at MTU 1500) and latency. Its output says "modeled, not
measured". The crossover is the highest rate at which the best LBI row beats the best
pipeline row; the "break-even" is the same model solved for the rate from the unshaped
times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from lbi_fx.bench import standalone
from lbi_fx.bench.link import (
    UNSHAPED,
    LinkShapingUnavailable,
    format_rate,
    parse_rate,
    probe,
    shaped_loopback,
)
from lbi_fx.cli.common import int_list
from lbi_fx.errors import InputError

METHODS = ("gpipe", "1f1b", "lbi_shared", "lbi_shared_relay", "lbi_per_region",
           "lbi_per_region_relay")
PIPELINES, LBIS = METHODS[:2], METHODS[2:]
LABELS = {"gpipe": "GPipe", "1f1b": "1F1B", "lbi_shared": "LBI shared canvas",
          "lbi_shared_relay": "LBI shared canvas, relay",
          "lbi_per_region": "LBI per-region canvas",
          "lbi_per_region_relay": "LBI per-region canvas, relay"}
COLUMNS = {"gpipe": "GPipe", "1f1b": "1F1B", "lbi_shared": "LBI shared",
           "lbi_shared_relay": "shared, relay", "lbi_per_region": "LBI per-region",
           "lbi_per_region_relay": "per-region, relay"}  # table headings
SKIP_PHASES = ("pipe_meta", "init_broadcast")  # once per run, not per step
DEFAULT_RATES = "unshaped,1gbit,100mbit,10mbit"
DTYPE_BYTES = 4  # fp32


def plan(cfg: dict) -> tuple[list[tuple[str, int]], list[dict]]:
    """(method, M) configurations to run, and the ones skipped with their reason."""
    runs, skipped = [], []
    B, W = cfg["batch"], cfg["world"]
    for method in METHODS:
        for m in cfg["microbatches"]:
            if B % m:
                skipped.append(dict(method=method, microbatches=m,
                                    reason=f"batch {B} does not split into {m} micro-batches"))
            elif method == "1f1b" and m < W:
                skipped.append(dict(method=method, microbatches=m,
                                    reason=f"1F1B over {W} stages needs M >= {W}"))
            else:
                runs.append((method, m))
    return runs, skipped


# -- the ranks -------------------------------------------------------------------------

def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             target.reshape(-1))


def _gpt(cfg: dict):
    from lbi_fx.models.transformer import build

    model, (idx,) = build(n_layer=cfg["layers"], n_embd=cfg["width"], n_head=cfg["heads"],
                          block_size=cfg["seq"], batch=cfg["batch"], seq=cfg["seq"], seed=0)
    tgt = torch.randint(0, model.cfg.vocab_size, idx.shape,
                        generator=torch.Generator().manual_seed(1))
    return model, idx, tgt


def stage_regions(cfg: dict) -> list[list[int]]:
    n, s = cfg["layers"], cfg["region_size"]
    return [list(range(i, min(i + s, n))) for i in range(0, n, s)]


def _lbi(cfg: dict, canvas: str):
    import lbi_fx

    model, idx, tgt = _gpt(cfg)
    torch.manual_seed(0)  # interface modules draw from the global RNG: the same on every rank
    lbi = lbi_fx.transform(model, lbi_fx.every(cfg["region_size"], "layers"),
                           rank=cfg["rank"], example_inputs=(idx,), canvas_weights=canvas)
    return lbi, idx, tgt


def _wire(records) -> int:
    """Bytes this rank sent on the wire in ``records`` (``CommRecord.wire``: by the
    algorithm gloo runs each call with), setup phases left out."""
    return sum(r.wire for r in records if r.phase not in SKIP_PHASES)


def _time(cfg: dict, method: str, m: int, lbis: dict) -> dict:
    import torch.distributed as dist

    from lbi_fx.distributed import Comm, RegionParallel
    from lbi_fx.pipelining import PipelineRunner

    world = cfg["world"]
    if method in PIPELINES:
        model, idx, tgt = _gpt(cfg)
        runner = PipelineRunner(model, stage_regions(cfg), schedule=method, microbatches=m,
                                loss_fn=_loss, comm=Comm(None), sync_params=False)
        module, comm = model, runner.comm

        def step():
            return runner.step(idx, tgt)
    else:
        canvas = "shared" if method.startswith("lbi_shared") else "per_region"
        if canvas not in lbis:
            lbis[canvas] = _lbi(cfg, canvas)
        lbi, idx, tgt = lbis[canvas]
        exchange = "relay" if method.endswith("_relay") else "allgather"
        # same seeds on every rank: the models are equal without a broadcast
        rp = RegionParallel(lbi, None, timeout=cfg["timeout"], sync_params=False,
                            microbatches=m, exchange=exchange)
        module, comm = lbi, rp.comm

        def step():
            return rp.step((idx,), _loss, target=tgt)
    times, loss = [], float("nan")
    for _ in range(cfg["steps"]):
        module.zero_grad(set_to_none=True)
        comm.records.clear()  # what is left after the loop: the last step's
        dist.barrier()
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    records = list(comm.records)
    parts = {k: v for k, v in comm.totals().items() if k not in SKIP_PHASES}
    every: list = [None] * world
    dist.all_gather_object(every, dict(times=times, own=_wire(records)))
    steps = [max(e["times"][i] for e in every) for i in range(len(times))]
    width = next((list(r.shape) for r in records if r.phase == "forward_m"), None)
    return dict(method=method, microbatches=m, steps_s=steps,
                per_rank_s=[e["times"] for e in every],
                median_s=statistics.median(steps[cfg["warmup"]:]),
                bytes=dict(total=sum(parts.values()), parts=parts,
                           wire=sum(e["own"] for e in every)),
                loss=loss, **({"forward_m_shape": width} if width else {}))


def _worker(rank: int, world: int, port: int, cfg: dict, out: str, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=cfg["timeout"]))
    try:
        rows, lbis = [], {}
        for method, m in cfg["plan"]:
            try:
                rows.append(_time(cfg, method, m, lbis))
            except Exception as exc:
                raise RuntimeError(f"{LABELS[method]} M={m} on rank {rank}: "
                                   f"{type(exc).__name__}: {exc}") from exc
            if rank == 0 and queue is not None:
                queue.put((method, m))
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
        dist.barrier()  # nobody tears down the store (hosted by rank 0) while others use it
    finally:
        dist.destroy_process_group()


def spawn_run(cfg: dict, progress=None) -> list[dict]:
    """One spawn of ``cfg['world']`` ranks over every configuration of ``cfg['plan']``;
    returns rank 0's rows. A rank's exception is raised here as a RuntimeError whose
    first line is its message (the rank's traceback goes to stderr)."""
    import torch.multiprocessing as mp

    from lbi_fx.distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        pc = mp.start_processes(_worker, args=(cfg["world"], free_port(), cfg, out, queue),
                                nprocs=cfg["world"], join=False, start_method="spawn")

        def drain():
            while not queue.empty():
                queue.get()
                if progress is not None:
                    progress.update(1)
        try:
            while not pc.join(timeout=0.2):
                drain()
            drain()
        except mp.ProcessRaisedException as exc:
            text = str(exc)
            print(f"lbi-fx bench crossover: rank {exc.error_index} failed:\n{text.strip()}",
                  file=sys.stderr)
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if ln.startswith("RuntimeError: ")
                          and " M=" in ln), lines[-1] if lines else "")
            cause = cause.removeprefix("RuntimeError: ")
            raise RuntimeError(f"rank {exc.error_index} failed: {cause}") from None
        except mp.ProcessExitedException as exc:
            raise RuntimeError(f"rank {exc.error_index} died (exit code {exc.exit_code}, "
                               f"signal {exc.signal_name}) before reporting an error") from None
        except BaseException:
            for p in pc.processes:  # Ctrl-C / SIGTERM: take the ranks down with us
                if p.is_alive():
                    p.terminate()
            for p in pc.processes:
                p.join(5)
            raise
        return json.loads(Path(out).read_text())


# -- summary ----------------------------------------------------------------------------

def best_rows(rows: list[dict], method: str) -> dict | None:
    timed = [r for r in rows if r["method"] == method and "median_s" in r]
    return min(timed, key=lambda r: r["median_s"]) if timed else None


def break_even(rows: list[dict]) -> float | None:
    """The highest link rate (bits/s) at which, under ``t0 + 8 * wire / rate``, the best LBI
    configuration beats every pipeline one; ``inf`` when it does at any rate, None when at
    none. ``rows``: the unshaped measurements."""
    lbi = [r for r in rows if r["method"] in LBIS and "median_s" in r]
    pipe = [r for r in rows if r["method"] in PIPELINES and "median_s" in r]
    if not lbi or not pipe:
        return None
    best = None
    for a in lbi:
        lo, hi = 0.0, math.inf
        for p in pipe:
            dt = a["median_s"] - p["median_s"]
            db = 8.0 * (p["bytes"]["wire"] - a["bytes"]["wire"])  # bits LBI saves
            if dt < 0 and db >= 0:
                continue
            if dt < 0:  # faster but more bytes: wins above a rate
                lo = max(lo, db / dt)
            elif db > 0:  # slower but fewer bytes: wins below a rate
                hi = min(hi, db / dt if dt > 0 else math.inf)
            else:
                hi = 0.0
        if lo < hi:
            best = hi if best is None else max(best, hi)
    return best


def crossover(table: dict, rates: list[str]) -> dict:
    """From ``table[rate][method] = {median_s, microbatches}``: the highest rate at which
    the best LBI beats the best pipeline, and where it loses."""
    wins, loses, rows = [], [], []
    for rate in sorted(rates, key=parse_rate, reverse=True):
        t = table[rate]
        lbi = [(t[m]["median_s"], m) for m in LBIS if t.get(m)]
        pipe = [(t[m]["median_s"], m) for m in PIPELINES if t.get(m)]
        if not lbi or not pipe:
            continue
        (tl, ml), (tp, mp_) = min(lbi), min(pipe)
        (wins if tl < tp else loses).append(rate)
        rows.append(dict(rate=rate, lbi=ml, lbi_s=tl, pipeline=mp_, pipeline_s=tp,
                         lbi_wins=tl < tp))
    rate = wins[0] if wins else None
    if rate is None:
        text = ("LBI loses at every measured rate (" + ", ".join(loses) + "): the best "
                "pipeline schedule is faster everywhere" if loses else "nothing to compare")
    else:
        r = next(x for x in rows if x["rate"] == rate)
        text = (f"crossover at {rate}: the highest measured rate at which the best LBI "
                f"({LABELS[r['lbi']]}, {r['lbi_s']:.3f} s) beats the best pipeline "
                f"({LABELS[r['pipeline']]}, {r['pipeline_s']:.3f} s)")
        above = [x for x in loses if parse_rate(x) > parse_rate(rate)]
        below = [x for x in loses if parse_rate(x) < parse_rate(rate)]
        if above:
            text += "; LBI loses at " + ", ".join(above)
        if below:
            text += "; it also loses at the slower " + ", ".join(below) + " (not monotone)"
        if not loses:
            text += "; LBI wins at every measured rate"
    return dict(rate=rate, lbi_wins=wins, lbi_loses=loses, per_rate=rows, text=text)


def summarize(cfg: dict, runs: dict[str, list[dict]], skipped: list[dict],
              modeled: bool) -> dict:
    """``runs``: rows per measured rate (with --modeled, only "unshaped")."""
    rates = cfg["rates"]
    per_rate: dict[str, list[dict]] = {}
    if modeled:
        base = runs[UNSHAPED]
        for rate in rates:
            bps = parse_rate(rate)
            per_rate[rate] = [dict(r, median_s=r["median_s"] + 8 * r["bytes"]["wire"] / bps,
                                   measured_unshaped_s=r["median_s"], modeled=rate != UNSHAPED)
                              if "median_s" in r else r for r in base]
    else:
        per_rate = {rate: runs[rate] for rate in rates}
    table = {}
    for rate in rates:
        table[rate] = {}
        for m in METHODS:
            b = best_rows(per_rate[rate], m)
            table[rate][m] = None if b is None else dict(median_s=b["median_s"],
                                                         microbatches=b["microbatches"])
    ref = runs.get(UNSHAPED) or next(iter(runs.values()))
    nbytes: dict = {}
    for r in ref:
        if "bytes" in r:
            nbytes.setdefault(r["method"], {})[str(r["microbatches"])] = r["bytes"]
    skipped = skipped + [dict(method=r["method"], microbatches=r["microbatches"],
                              reason=r["skipped"]) for r in ref if "skipped" in r]
    cross = crossover(table, rates)
    be = break_even(runs[UNSHAPED]) if UNSHAPED in runs else None
    cross["break_even_bps"] = be
    cross["break_even"] = None if be is None else format_rate(be)
    B, L, D = cfg["batch"], cfg["seq"], cfg["width"]
    return dict(
        mode="modeled" if modeled else "measured",
        config={k: cfg[k] for k in ("layers", "width", "heads", "seq", "batch", "region_size",
                                    "rank", "world", "steps", "warmup", "microbatches",
                                    "mtu", "burst", "limit")},
        stages=stage_regions(cfg),
        boundary_bytes_per_direction=B * L * D * DTYPE_BYTES,
        rates=rates, rate_bps={r: (None if r == UNSHAPED else parse_rate(r)) for r in rates},
        methods=list(METHODS),
        table=table, bytes=nbytes, crossover=cross, skipped=skipped,
        runs={rate: rows for rate, rows in per_rate.items()},
    )


def _fmt_bytes(b: dict) -> str:
    parts = " + ".join(f"{k} {v:,}" for k, v in sorted(b["parts"].items(), key=lambda kv: -kv[1]))
    return f"total {b['total']:>10,}  wire {b['wire']:>10,}  ({parts})"


def report(s: dict) -> str:
    c = s["config"]
    tag = " [modeled, not measured]" if s["mode"] == "modeled" else ""
    lines = [
        f"GPT {c['layers']} layers, width {c['width']}, {c['heads']} heads, seq {c['seq']}, "
        f"batch {c['batch']}, fp32; regions of {c['region_size']} layers, interface rank "
        f"{c['rank']}; {c['world']} gloo ranks, pipeline stages "
        f"{' | '.join(f'layers {st[0]}-{st[-1]}' for st in _stages(s))}",
    ]
    if s["mode"] == "modeled":
        lines.append("modeled, not measured: step = unshaped median + 8 x wire bytes / rate "
                     "(no overlap, no headers, no latency)")
    else:
        lines.append(f"loopback shaped with tc tbf (MTU {c['mtu']}, burst {c['burst']}, "
                     f"limit {c['limit']}; both directions share the rate)")
    lines.append(f"median step seconds (max over ranks; {c['steps'] - c['warmup']} timed steps "
                 f"after {c['warmup']} warm-up), best M{tag}")
    cols = list(METHODS)
    lines.append(f"{'rate':<10}" + "".join(f"{COLUMNS[m]:>19}" for m in cols))
    for rate in s["rates"]:
        cells = []
        for m in cols:
            t = s["table"][rate][m]
            cells.append("skipped" if t is None else f"{t['median_s']:.3f} (M={t['microbatches']})")
        lines.append(f"{rate:<10}" + "".join(f"{x:>19}" for x in cells))
    lines.append("bytes per step (all ranks; wire = estimated bytes on the link)")
    for m in METHODS:
        per_m = s["bytes"].get(m)
        if not per_m:
            continue
        vals = list(per_m.items())
        if all(v == vals[0][1] for _, v in vals):
            lines.append(f"  {LABELS[m]:<30} {_fmt_bytes(vals[0][1])}"
                         + ("  (every M)" if len(vals) > 1 else ""))
        else:
            for mm, b in vals:
                lines.append(f"  {LABELS[m] + f' M={mm}':<30} {_fmt_bytes(b)}")
    cross = s["crossover"]
    lines.append(cross["text"] + tag)
    if cross["break_even"] is not None:
        lines.append(f"model break-even from the unshaped times: LBI wins below "
                     f"{cross['break_even']}" if cross["break_even_bps"] != math.inf else
                     "model break-even from the unshaped times: LBI wins at any rate")
    for sk in s["skipped"]:
        ms = sk["microbatches"]
        lines.append(f"note: {LABELS[sk['method']]}" + (f" M={ms}" if ms is not None else "")
                     + f" skipped: {sk['reason']}")
    return "\n".join(lines)


def _stages(s: dict) -> list[list[int]]:
    from lbi_fx.distributed import placement

    regions = s["stages"]
    return [[i for k in ks for i in regions[k]] for ks in placement(len(regions),
                                                                    s["config"]["world"])]


def plot(s: dict, path: str) -> None:
    """Step time against link rate (log x), one line per method at its best M; the
    unshaped point sits a decade right of the fastest shaped rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [b for b in s["rate_bps"].values() if b is not None]
    top = 10 * max(finite) if finite else 1e10
    xs = {r: (top if b is None else b) for r, b in s["rate_bps"].items()}
    order = sorted(s["rates"], key=lambda r: xs[r])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in METHODS:
        pts = [(xs[r], s["table"][r][m]) for r in order if s["table"][r][m]]
        if pts:
            ax.plot([x for x, _ in pts], [t["median_s"] for _, t in pts], marker="o",
                    label=LABELS[m])
            for x, t in pts:
                ax.annotate(f"M={t['microbatches']}", (x, t["median_s"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xticks([xs[r] for r in order], order)
    ax.set_xlabel("link rate")
    ax.set_ylabel("median step (s)")
    ax.set_title("step time vs link rate" + (" (modeled, not measured)"
                                             if s["mode"] == "modeled" else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------

def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of ``lbi-fx bench crossover``."""
    ap.add_argument("--rates", default=DEFAULT_RATES,
                    help=f"comma-separated tc rates or 'unshaped' (default {DEFAULT_RATES})")
    ap.add_argument("--microbatches", default="1,2,4,8",
                    help="micro-batch counts M to try (default 1,2,4,8)")
    ap.add_argument("--layers", type=int, default=6, help="GPT layers (default 6)")
    ap.add_argument("--width", type=int, default=64, help="GPT width D (default 64)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--seq", type=int, default=64, help="sequence length L (default 64)")
    ap.add_argument("--batch", type=int, default=16, help="batch B (default 16)")
    ap.add_argument("--region-size", type=int, default=2, help="layers per region (default 2)")
    ap.add_argument("--rank", type=int, default=4, help="interface rank r (default 4)")
    ap.add_argument("--world", type=int, default=2, help="ranks / pipeline stages (default 2)")
    ap.add_argument("--steps", type=int, default=6, help="steps per method (default 6)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="first steps left out of the median (default 2)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds a rank waits for a peer (default 600)")
    ap.add_argument("--modeled", action="store_true",
                    help="do not shape: measure unshaped once and model each rate as "
                         "t + 8 x wire bytes / rate (labelled modeled, not measured)")
    ap.add_argument("--json", action="store_true", help="print every number as JSON")
    ap.add_argument("--plot", metavar="PATH", default=None,
                    help="save step time vs link rate (needs matplotlib: lbi-fx[plot])")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def config(a: argparse.Namespace) -> dict:
    rates = list(dict.fromkeys(x.strip() for x in a.rates.split(",") if x.strip()))
    if not rates:
        raise InputError("--rates is empty: give e.g. unshaped,100mbit,10mbit")
    for r in rates:
        parse_rate(r)
    cfg = dict(rates=rates, microbatches=int_list(a.microbatches, "--microbatches"),
               layers=a.layers, width=a.width, heads=a.heads, seq=a.seq, batch=a.batch,
               region_size=a.region_size, rank=a.rank, world=a.world, steps=a.steps,
               warmup=a.warmup, timeout=a.timeout,
               mtu=1500, burst="16kb", limit="16mb")
    for k in ("layers", "width", "heads", "seq", "batch", "region_size", "rank", "steps"):
        if cfg[k] < 1:
            raise InputError(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    if not 0 <= a.warmup < a.steps:
        raise InputError(f"--warmup {a.warmup} must be >= 0 and below --steps {a.steps}: "
                         "at least one step is timed")
    if a.width % a.heads:
        raise InputError(f"--width {a.width} must be a multiple of --heads {a.heads}")
    K = len(stage_regions(cfg))
    if K < 2:
        raise InputError(f"{a.layers} layers in regions of {a.region_size}: LBI needs at least "
                         "2 regions (one boundary)")
    if not 2 <= a.world <= K:
        raise InputError(f"--world {a.world}: needs 2 <= world <= {K} regions")
    if not a.timeout > 0:
        raise InputError(f"--timeout {a.timeout}: seconds, > 0")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: parse ``argv`` with :func:`add_arguments`, then :func:`run`."""
    return standalone(sys.modules[__name__], "crossover", argv)


def run(a: argparse.Namespace) -> int:
    """``lbi-fx bench crossover``; returns the process exit status."""
    cfg = config(a)
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib: pip install 'lbi-fx[plot]' "
                             "(or drop --plot)") from None
    cfg["plan"], skipped = plan(cfg)
    shaped = [r for r in cfg["rates"] if r != UNSHAPED]
    if a.modeled:
        spawns = [UNSHAPED]
    else:
        spawns = cfg["rates"]
        if shaped:
            try:
                probe()
            except LinkShapingUnavailable as exc:
                raise LinkShapingUnavailable(f"{exc}. `--modeled` predicts the rates from an "
                                             "unshaped run instead") from None
    from tqdm import tqdm

    runs: dict[str, list[dict]] = {}
    with tqdm(total=len(spawns) * len(cfg["plan"]), file=sys.stderr, disable=a.no_progress,
              unit="config", leave=False) as bar:
        for rate in spawns:
            bar.set_description(rate)
            with shaped_loopback(None if a.modeled else rate, mtu=cfg["mtu"],
                                 burst=cfg["burst"], limit=cfg["limit"]):
                runs[rate] = spawn_run(cfg, bar)
    s = summarize(cfg, runs, skipped, a.modeled)
    if a.plot:
        plot(s, a.plot)
    if a.json:
        print(json.dumps(s, indent=1))
    else:
        print(report(s))
        if a.plot:
            print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

