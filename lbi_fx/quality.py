"""``lbi-fx quality``: dense and LBI language models trained side by side, scored honestly.

A small version of the paper's Table 2 on this machine: a byte-level GPT on the CPython
standard library, trained dense and with LBI interfaces of equal scalar budgets (scalars
per sample that cross a boundary): ``pool="mean"`` and ``"last"`` (one row of r) against
``pool="causal"`` (S rows of r). Every model starts from the same weights and sees the
same batches in the same order. Each row reports the one-forward cross-entropy (what a
training loop sees) and the leak-free one (position t scored from a forward over its
prefix alone, ``lbi_fx.testing.prefix_loss``): their difference is what the interface
lets positions see of the future. Step times are ratios to the dense step of the same run,
timed over the first steps, which always use the scan backward; ``--backward autograd``
trains the rest with plain reverse mode on the same module (the same gradients to
rounding, several times faster on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lbi_fx
from lbi_fx.testing import prefix_loss
from lbi_fx.training import RunConfig


@dataclass(frozen=True)
class Variant:
    """One row: dense (``pool=None``) or an LBI model with ``segments`` rows of ``rank``."""

    pool: str | None = None
    rank: int = 0
    segments: int = 1

    @property
    def scalars(self) -> int:
        return self.rank * self.segments

    @property
    def name(self) -> str:
        if self.pool is None:
            return "dense"
        if self.pool == "causal":
            return f"causal S={self.segments} r={self.rank}"
        return f"{self.pool} r={self.rank}"


def variants(budgets: tuple[int, ...], seq: int) -> list[Variant]:
    """Dense, then per budget b: mean and last with r = b, causal with r in {4, 16} and
    S = b / r segments (S = 1 would carry nothing causal; S must divide the sequence)."""
    rows = [Variant()]
    for b in budgets:
        rows += [Variant("mean", b), Variant("last", b)]
        for r in (4, 16):
            if b % r == 0 and 1 < b // r <= seq and seq % (b // r) == 0:
                rows.append(Variant("causal", r, b // r))
    return rows


@dataclass
class Config(RunConfig):
    heads: int = 4
    region_size: int = 2
    budgets: tuple[int, ...] = (16, 64)
    backward: str = "scan"  # LBI backward after the timed steps ("autograd": same gradients)
    timed_steps: int = 15   # the first steps always run the scan backward and are timed

    @staticmethod
    def quick() -> Config:
        return Config(layers=4, width=32, seq=32, batch=8, steps=30, eval_every=15,
                      eval_batches=1, corpus_bytes=400_000, budgets=(16,))


def build(cfg: Config, v: Variant, dense: torch.nn.Module, example: tuple):
    """A copy of the dense model, rewritten as ``v`` asks (the same initial weights)."""
    model = copy.deepcopy(dense)
    if v.pool is None:
        return model
    kw = {"segment_len": cfg.seq // v.segments} if v.pool == "causal" else {}
    return lbi_fx.transform(model, lbi_fx.every(cfg.region_size, "layers"), rank=v.rank,
                            example_inputs=example, pool=v.pool, **kw)


@torch.no_grad()
def evaluate(model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(one-forward CE, leak-free CE) over fixed held-out batches."""
    was = model.training
    model.eval()
    try:
        one = [float(F.cross_entropy(model(x).flatten(0, 1), y.flatten())) for x, y in batches]
        free = [prefix_loss(model, x, y) for x, y in batches]
    finally:
        model.train(was)
    return statistics.fmean(one), statistics.fmean(free)


def train(cfg: Config, v: Variant, model, corpus, val, progress: bool = True) -> dict:
    """AdamW on the shared batch sequence; evaluation and interface spectra logged."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    curve, times = [], []
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{v.name:>14}", disable=not progress,
               leave=False, file=sys.stderr)
    model.train()
    for step in bar:
        if hasattr(model, "backward"):
            model.backward = "scan" if step <= cfg.timed_steps else cfg.backward
        x, y = corpus.get_batch("train", cfg.batch, cfg.seq, gen)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step <= cfg.timed_steps:
            times.append(time.perf_counter() - t0)
        if not math.isfinite(float(loss)):
            raise lbi_fx.LBIError(f"{v.name}: non-finite training loss at step {step}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ce, free = evaluate(model, val)
            point = {"step": step, "ce": ce, "ce_leak_free": free, "train": float(loss)}
            if hasattr(model, "spectra"):
                if model.backward != "scan":  # one scan backward for the spectra
                    model.backward = "scan"
                    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
                    opt.zero_grad(set_to_none=True)
                point["spectra"] = model.spectra()
            curve.append(point)
            bar.set_postfix(ce=f"{ce:.3f}", leak_free=f"{free:.3f}")
    warm = times[min(5, len(times) - 1):]  # scan steps only, after warm-up
    return {"curve": curve, "step_s": statistics.median(warm)}


def run_table(cfg: Config, progress: bool = True) -> tuple[list[dict], dict]:
    """Train every variant; return the table rows and the curves by variant name."""
    from lbi_fx.data import load_corpus
    from lbi_fx.models.transformer import GPT, GPTConfig

    corpus = load_corpus(max_bytes=cfg.corpus_bytes)
    gval = torch.Generator().manual_seed(cfg.seed + 1)
    val = [corpus.get_batch("val", cfg.batch, cfg.seq, gval) for _ in range(cfg.eval_batches)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        dense = GPT(GPTConfig(block_size=cfg.seq, n_layer=cfg.layers, n_head=cfg.heads,
                              n_embd=cfg.width))
    example = (torch.randint(0, 256, (2, cfg.seq), generator=torch.Generator().manual_seed(0)),)
    rows, curves = [], {}
    base_step = None
    for v in variants(cfg.budgets, cfg.seq):
        model = build(cfg, v, dense, example)
        res = train(cfg, v, model, corpus, val, progress)
        base_step = res["step_s"] if v.pool is None else base_step
        last = res["curve"][-1]
        rows.append({
            "model": "dense" if v.pool is None else "lbi",
            "pool": v.pool, "rank": v.rank or None, "segments": v.segments if v.pool else None,
            "scalars": v.scalars or None,
            "ce": round(last["ce"], 4), "ce_leak_free": round(last["ce_leak_free"], 4),
            "bpb_leak_free": round(last["ce_leak_free"] / math.log(2), 4),
            "steps": cfg.steps, "step_ratio": round(res["step_s"] / base_step, 2),
            "step_ms": round(1e3 * res["step_s"], 1),
        })
        curves[v.name] = res["curve"]
        if progress:
            r = rows[-1]
            print(f"{v.name:>14}: CE {r['ce']:.3f}, leak-free {r['ce_leak_free']:.3f}, "
                  f"step {r['step_ratio']:.2f}x dense", file=sys.stderr)
    dense_free = rows[0]["ce_leak_free"]
    for r in rows:
        r["leak"] = round(r["ce_leak_free"] - r["ce"], 4)
        r["gap_leak_free"] = round(r["ce_leak_free"] - dense_free, 4)
    return rows, curves


def format_table(rows: list[dict]) -> str:
    head = ("| model | pool | rank x segments | scalars | CE one forward | CE leak-free | leak | "
            "gap to dense (leak-free) | bpb leak-free | steps | step / dense |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        shape = "-" if r["pool"] is None else f"{r['rank']} x {r['segments']}"
        lines.append(
            f"| {r['model']} | {r['pool'] or '-'} | {shape} | {r['scalars'] or '-'} | {r['ce']:.3f} | "
            f"{r['ce_leak_free']:.3f} | {r['leak']:+.3f} | {r['gap_leak_free']:+.3f} | "
            f"{r['bpb_leak_free']:.3f} | {r['steps']} | {r['step_ratio']:.2f}x |")
    return "\n".join(lines)


def plot(curves: dict, path: str) -> None:
    """Leak-free validation curves (left) and the deepest suffix product ||P_0||_2 with
    the mean ||J_k||_2 (right), per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in curves.items():
        steps = [p["step"] for p in curve]
        style = {"color": "black", "lw": 2} if name == "dense" else {}
        (line,) = ax.plot(steps, [p["ce_leak_free"] for p in curve], marker="o", ms=3,
                          label=name, **style)
        if curve and "spectra" in curve[0]:
            bx.plot(steps, [p["spectra"][0]["suffix_spectral"] for p in curve], marker="o", ms=3,
                    color=line.get_color(), label=f"{name}: ||P_0||_2")
            bx.plot(steps, [statistics.fmean(s["jac_spectral"] for s in p["spectra"])
                            for p in curve], ls="--", color=line.get_color(), alpha=0.6)
    ax.set(xlabel="step", ylabel="held-out CE, leak-free (nats/byte)",
           title="leak-free validation loss (same batches)")
    ax.legend(fontsize=8)
    bx.set(xlabel="step", ylabel="spectral norm (batch mean)", yscale="log",
           title="interface spectra: ||P_0||_2 (solid), mean ||J_k||_2 (dashed)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 4 layers, width 32, 30 steps, budget 16 only")
    p.add_argument("--steps", type=int, help="training steps per model (default 600)")
    p.add_argument("--budgets", help="scalar budgets per sample, comma-separated (default 16,64)")
    p.add_argument("--layers", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--backward", choices=["scan", "autograd"], default="scan",
                   help="LBI backward after the first --timed-steps (always scan, timed): "
                        "'autograd' trains faster with the same gradients (to rounding)")
    p.add_argument("--timed-steps", type=int, default=15,
                   help="steps that run the scan backward and give step / dense")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of leak-free curves and spectra")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def run(args: argparse.Namespace) -> int:
    cfg = Config.quick() if args.quick else Config()
    for key in ("steps", "layers", "width", "seq", "batch"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.budgets:
        try:
            cfg.budgets = tuple(int(b) for b in args.budgets.split(","))
        except ValueError:
            raise lbi_fx.InputError(f"--budgets {args.budgets!r}: comma-separated ints") from None
    cfg.eval_every = min(cfg.eval_every, cfg.steps)
    cfg.backward, cfg.timed_steps = args.backward, max(1, min(args.timed_steps, cfg.steps))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise lbi_fx.InputError("--plot needs matplotlib: pip install 'lbi-fx[plot]'") from None
    t0 = time.perf_counter()
    rows, curves = run_table(cfg, progress=not args.no_progress)
    if args.plot:
        plot(curves, args.plot)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"lbi-fx quality: GPT {cfg.layers} layers, width {cfg.width}, regions of "
              f"{cfg.region_size}, batch {cfg.batch} x {cfg.seq} bytes, {cfg.steps} steps "
              f"(LBI backward: scan for {cfg.timed_steps} timed steps, then {cfg.backward}), "
              f"{len(rows)} models in {time.perf_counter() - t0:.0f}s")
        print(format_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lbi-fx quality", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
