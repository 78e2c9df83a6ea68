"""``lbi-fx spl``: stage-partitioned learning against backprop and LBI on one model.

The paper's root-bottleneck table (seed 002, §8.3) scaled to this machine: a byte-level
GPT with L = 6 layers on the CPython standard library, K = 3 stages with per-stage heads
along the Stage 0 depth axis - compositions (1,3,2) (2,2,2) (3,2,1) (3,1,2) (4,1,1) -
plus plain backprop and LBI with causal interfaces on the same regions. Every model
starts from the same weights and sees the same batches in the same order. Each row
gives held-out bits per byte under the three scorers ("last", "mean-stage",
"sum-logits"), the causal leak of the trained model (0 for causal models, so the
one-forward score is leak-free), the step time relative to backprop's, and the peak
activation memory of one training step, joint and interleaved, relative to backprop's.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import lbi_fx
from lbi_fx.models.training import RunConfig
from lbi_fx.report import describe_width
from lbi_fx.spl import SCORERS, SPLModule, bits_per_byte, stage_nats, stage_partition

PAPER_AXIS = ((1, 3, 2), (2, 2, 2), (3, 2, 1), (3, 1, 2), (4, 1, 1))


@dataclass
class Config(RunConfig):
    n_head: int = 4
    steps: int = 1000
    eval_batches: int = 8
    compositions: tuple[tuple[int, ...], ...] = PAPER_AXIS
    heads: str = "per-stage"
    lbi: tuple[tuple[int, ...], ...] = ((2, 2, 2),)   # compositions that get an LBI row
    rank: int = 8
    segments: int = 4
    timing_rounds: int = 7

    @staticmethod
    def quick() -> Config:
        return Config(width=32, seq=32, batch=8, steps=30, eval_every=15, eval_batches=1,
                      corpus_bytes=400_000, timing_rounds=3)


@dataclass(frozen=True)
class Row:
    kind: str                      # "bp", "spl" or "lbi"
    sizes: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        if self.kind == "bp":
            return "BP"
        return f"{self.kind.upper()} ({','.join(map(str, self.sizes))})"


def rows_of(cfg: Config) -> list[Row]:
    return ([Row("bp", (cfg.layers,))] + [Row("spl", s) for s in cfg.compositions]
            + [Row("lbi", s) for s in cfg.lbi])


def build(cfg: Config, row: Row, dense: torch.nn.Module, example: tuple) -> torch.nn.Module:
    """A copy of the dense model (same initial weights) as the row asks."""
    model = copy.deepcopy(dense)
    regions = lbi_fx.composition(row.sizes, "layers")
    if row.kind == "spl":
        return stage_partition(model, regions, example_inputs=example, heads=cfg.heads)
    if row.kind == "lbi":
        return lbi_fx.transform(model, regions, rank=cfg.rank, example_inputs=example,
                                pool="causal", segment_len=cfg.seq // cfg.segments)
    return model


def _ce(y: torch.Tensor):
    return lambda z: F.cross_entropy(z.flatten(0, 1), y.flatten())


def train_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. (5) for a stage-partitioned model, the LM loss otherwise."""
    if isinstance(model, SPLModule):
        return model.stage_loss(x, _ce(y))[0]
    return _ce(y)(model(x))


@torch.no_grad()
def evaluate(model, batches) -> dict:
    """Held-out bits per byte under every scorer (and each stage's own), one forward per
    batch: every model here is causal, so this is the leak-free score."""
    was = model.training
    model.eval()
    try:
        sums = {s: 0.0 for s in SCORERS}
        stages: list[float] = []
        for x, y in batches:
            outs = model.stage_outputs(x) if isinstance(model, SPLModule) else [model(x)]
            for s in SCORERS:
                sums[s] += float(stage_nats(outs, y, s))
            per = [float(stage_nats([z], y)) for z in outs]
            stages = [a + b for a, b in zip(stages, per)] if stages else per
    finally:
        model.train(was)
    n = len(batches)
    out = {s: bits_per_byte(v / n) for s, v in sums.items()}
    out["stages"] = [bits_per_byte(v / n) for v in stages]
    return out


def peak_memory(model, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Peak bytes of one training step above what was live before (gradients already
    allocated, so this is activations and temporaries): joint and, for SPL, interleaved."""
    from lbi_fx.bench.step import _peak_memory

    cpu = torch.device("cpu")

    def step(schedule: str) -> None:
        if isinstance(model, SPLModule):
            model.forward_backward(x, _ce(y), schedule=schedule)
        else:
            train_loss(model, x, y).backward()

    step("joint")  # allocate .grad, warm caches
    out = {}
    for schedule in ("joint", "interleaved") if isinstance(model, SPLModule) else ("joint",):
        model.zero_grad(set_to_none=False)
        out[schedule] = _peak_memory(lambda s=schedule: step(s), cpu)
    model.zero_grad(set_to_none=True)
    return out


def train(cfg: Config, row: Row, model, corpus, val, progress: bool = True) -> list[dict]:
    """AdamW on the shared batch sequence, evaluated every ``eval_every`` steps."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    curve = []
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{row.name:>16}", disable=not progress,
               leave=False, file=sys.stderr)
    model.train()
    for step in bar:
        x, y = corpus.get_batch("train", cfg.batch, cfg.seq, gen)
        loss = train_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if not math.isfinite(loss.item()):
            raise lbi_fx.LBIError(f"{row.name}: non-finite training loss at step {step}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            point = {"step": step, **evaluate(model, val)}
            curve.append(point)
            bar.set_postfix(bpb=f"{point['last']:.3f}")
    return curve


def step_times(models: list, x: torch.Tensor, y: torch.Tensor, rounds: int) -> list[float]:
    """Median seconds of one forward + backward per model, timed round-robin so that a
    busy machine slows every model alike."""
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            train_loss(model, x, y).backward()
            times[i].append(time.perf_counter() - t0)
    for model in models:
        model.zero_grad(set_to_none=True)
    return [statistics.median(t[1:]) for t in times]


def run_table(cfg: Config, progress: bool = True) -> tuple[list[dict], dict]:
    """Train every row; return the table rows and the curves by row name."""
    from lbi_fx.causality import causal_leak
    from lbi_fx.models.data import load_corpus
    from lbi_fx.models.transformer import GPT, GPTConfig

    corpus = load_corpus(max_bytes=cfg.corpus_bytes)
    gval = torch.Generator().manual_seed(cfg.seed + 1)
    val = [corpus.get_batch("val", cfg.batch, cfg.seq, gval) for _ in range(cfg.eval_batches)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        dense = GPT(GPTConfig(block_size=cfg.seq, n_layer=cfg.layers, n_head=cfg.n_head,
                              n_embd=cfg.width))
    example = (torch.randint(0, 256, (2, cfg.seq), generator=torch.Generator().manual_seed(0)),)
    xm, ym = val[0]
    plan = rows_of(cfg)
    models, curves = [], {}
    for row in plan:
        model = build(cfg, row, dense, example)
        curves[row.name] = train(cfg, row, model, corpus, val, progress)
        models.append(model)
        if progress:
            last = curves[row.name][-1]
            print(f"{row.name:>16}: BPB " + ", ".join(f"{s} {last[s]:.4f}" for s in SCORERS),
                  file=sys.stderr)
    secs = step_times(models, xm, ym, cfg.timing_rounds)
    rows = []
    for row, model, sec in zip(plan, models, secs):
        mem = peak_memory(model, xm, ym)
        last = curves[row.name][-1]
        model.eval()
        rows.append({
            "row": row.name, "kind": row.kind, "composition": list(row.sizes),
            "d0": row.sizes[0],
            **{f"bpb_{s}": round(last[s], 4) for s in SCORERS},
            "bpb_stages": [round(v, 4) for v in last["stages"]],
            "causal_leak": causal_leak(model, (xm[:2],)),
            "params": sum(p.numel() for p in model.parameters()),
            "steps": cfg.steps, "step_ms": round(1e3 * sec, 1),
            "step_ratio": round(sec / secs[0], 2),
            "peak_mem_joint": mem["joint"],
            "peak_mem_interleaved": mem.get("interleaved"),
        })
    base = rows[0]["peak_mem_joint"]
    for r in rows:
        r["mem_joint_ratio"] = round(r["peak_mem_joint"] / base, 3)
        r["mem_interleaved_ratio"] = (None if r["peak_mem_interleaved"] is None else
                                      round(r["peak_mem_interleaved"] / base, 3))
    return rows, curves


def format_table(rows: list[dict]) -> str:
    head = ("| row | d_0 | BPB last | BPB mean-stage | BPB sum-logits | per-stage BPB | "
            "causal leak | step / BP | peak act. mem / BP (joint) | (interleaved) |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        inter = "-" if r["mem_interleaved_ratio"] is None else f"{r['mem_interleaved_ratio']:.2f}"
        stages = " / ".join(f"{v:.3f}" for v in r["bpb_stages"]) if r["kind"] == "spl" else "-"
        lines.append(
            f"| {r['row']} | {r['d0']} | {r['bpb_last']:.4f} | {r['bpb_mean-stage']:.4f} | "
            f"{r['bpb_sum-logits']:.4f} | {stages} | {r['causal_leak']:.0e} | "
            f"{r['step_ratio']:.2f}x | {r['mem_joint_ratio']:.2f} | {inter} |")
    return "\n".join(lines)


def plot(rows: list[dict], curves: dict, path: str) -> None:
    """Held-out BPB ("last") per step, final BPB under each scorer, and peak activation
    memory relative to BP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, curve in curves.items():
        style = {"color": "black", "lw": 2} if name == "BP" else (
            {"ls": "--", "lw": 2} if name.startswith("LBI") else {})
        ax.plot([p["step"] for p in curve], [p["last"] for p in curve], marker="o", ms=2,
                label=name, **style)
    ax.set(xlabel="step", ylabel="held-out bits per byte (last stage)",
           title="validation BPB, same batches")
    ax.legend(fontsize=8)
    names = [r["row"] for r in rows]
    width = 0.27
    for i, s in enumerate(SCORERS):
        vals = [r[f"bpb_{s}"] for r in rows]
        bx.bar([j + (i - 1) * width for j in range(len(rows))], vals, width, label=s)
    lo = min(r[f"bpb_{s}"] for r in rows for s in SCORERS)
    hi = max(r[f"bpb_{s}"] for r in rows for s in SCORERS)
    bx.set_ylim(lo - 0.1 * (hi - lo) - 0.01, hi + 0.05 * (hi - lo) + 0.01)
    bx.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    bx.set(ylabel="final held-out BPB", title="three scorers (lower is better)")
    bx.legend(fontsize=8)
    joint = [r["mem_joint_ratio"] for r in rows]
    inter = [r["mem_interleaved_ratio"] or float("nan") for r in rows]
    cx.bar([j - 0.2 for j in range(len(rows))], joint, 0.4, label="joint backward")
    cx.bar([j + 0.2 for j in range(len(rows))], inter, 0.4, label="interleaved (SPL)")
    cx.axhline(1.0, color="black", lw=1)
    cx.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    cx.set(ylabel="peak activation memory / BP", title="one training step (CPU storages)")
    cx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _compositions(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(int(d) for d in part.split(",")) for part in text.split(";") if part)
    except ValueError:
        raise lbi_fx.InputError(f"{text!r}: compositions as '1,3,2;2,2,2'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: width 32, sequence 32, 30 steps, one validation batch")
    p.add_argument("--steps", type=int, help="training steps per row (default 1000)")
    p.add_argument("--compositions", help="SPL rows, e.g. '1,3,2;2,2,2' (default: the five of "
                                          "the Stage 0 depth axis)")
    p.add_argument("--lbi", help="compositions that get an LBI row (default '2,2,2'; 'none')")
    p.add_argument("--heads", choices=["shared", "per-stage"],
                   help="stage heads of the SPL rows (default per-stage)")
    p.add_argument("--rank", type=int, help="LBI interface rank per segment (default 8)")
    p.add_argument("--segments", type=int, help="LBI causal segments (default 4)")
    p.add_argument("--width", type=int, help="model width (default 64)")
    p.add_argument("--seq", type=int, help="bytes per sequence (default 64)")
    p.add_argument("--batch", type=int, help="sequences per batch (default 16)")
    p.add_argument("--json", action="store_true", help="print rows, curves and config as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: curves, scorers, memory")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def config_from(args: argparse.Namespace) -> Config:
    cfg = Config.quick() if args.quick else Config()
    for key in ("steps", "heads", "rank", "segments", "width", "seq", "batch"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.compositions:
        cfg.compositions = _compositions(args.compositions)
    if args.lbi:
        cfg.lbi = () if args.lbi == "none" else _compositions(args.lbi)
    for sizes in (*cfg.compositions, *cfg.lbi):
        if sum(sizes) != cfg.layers or min(sizes) < 1:
            raise lbi_fx.InputError(f"composition {sizes} must have positive parts summing to "
                                    f"L = {cfg.layers}")
    if cfg.lbi and (cfg.seq % cfg.segments or cfg.segments < 2):
        raise lbi_fx.InputError(f"--segments {cfg.segments} must be >= 2 and divide the "
                                f"sequence length {cfg.seq}")
    cfg.eval_every = min(cfg.eval_every, cfg.steps)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    rows, curves = run_table(cfg, progress=not args.no_progress)
    meta = {"date": datetime.date.today().isoformat(), "seconds": round(time.perf_counter() - t0),
            "threads": torch.get_num_threads(), "config": asdict(cfg),
            "command": "lbi-fx spl " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])}
    if args.plot:
        plot(rows, curves, args.plot)
    if args.json:
        print(json.dumps({"rows": rows, "curves": curves, "meta": meta}, indent=1))
    else:
        print(format_table(rows))
        print(f"\n{cfg.steps} steps per row, batch {cfg.batch} x {cfg.seq} bytes, width "
              f"{cfg.width}, {cfg.heads} heads, LBI interfaces of "
              f"{describe_width(cfg.rank, cfg.segments)}; {meta['date']}, {meta['seconds']} s "
              f"on {meta['threads']} thread(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from lbi_fx.cli.common import standalone

    return standalone(sys.modules[__name__], "lbi-fx spl", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
