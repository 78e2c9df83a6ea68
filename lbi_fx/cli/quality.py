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
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lbi_fx
from lbi_fx.cli.quality_table import (  # noqa: F401  (reuse_rows: tests import it here)
    _backward_text,
    _protocol_text,
    format_table,
    plot,
    reuse_rows,
)
from lbi_fx.models.training import RunConfig
from lbi_fx.passes.decode_at_blocks import DECODER_AT
from lbi_fx.report import describe_width
from lbi_fx.testing import prefix_loss


@dataclass(frozen=True)
class Variant:
    """One row: dense (``pool=None``, ``layers`` blocks: None = all), an LBI model with
    ``segments`` rows of ``rank`` (``decoder_init`` as ``transform`` takes it), or
    stage-partitioned learning on the same partition (``pool="spl"``: relay lambda 0)."""

    pool: str | None = None
    rank: int = 0
    segments: int = 1
    layers: int | None = None
    decoder_init: str = "default"
    norm: str = "layer"
    canvas: str = "shared"  # transform(canvas_weights=...)
    summary: str = "prefix"  # transform(summary=...)
    interface_lr: float = 1.0  # the interface modules' learning rate / the model's
    decoder_window: int = 1  # transform(decoder_window=...)
    decoder_at: str = "first"  # transform(decoder_at=...)
    encoder: str = "mlp"  # transform(encoder=...)

    @property
    def scalars(self) -> int:
        return self.rank * self.segments

    @property
    def model(self) -> str:
        return "dense" if self.pool is None else "spl" if self.pool == "spl" else "lbi"

    @property
    def name(self) -> str:
        if self.pool is None:
            return "dense" if self.layers is None else f"dense {self.layers} layers"
        if self.pool == "spl":
            return "spl (detach, shared head)"
        zero = ", zero decoders" if self.decoder_init == "zero" else ""
        norm = "" if self.norm == "layer" else f", {self.norm} norm"
        canvas = "" if self.canvas == "shared" else f", {self.canvas.replace('_', '-')} canvas"
        summary = "" if self.summary == "prefix" else f", {self.summary} summary"
        lr = "" if self.interface_lr == 1.0 else f", interface lr x{self.interface_lr:g}"
        window = "" if self.decoder_window == 1 else f", decoder window {self.decoder_window}"
        at = "" if self.decoder_at == "first" else f", decoders at {self.decoder_at} block"
        enc = "" if self.encoder == "mlp" else f", {self.encoder} encoder/decoder"
        return (f"{self.pool} {describe_width(self.rank, self.segments)}{zero}{norm}{canvas}"
                f"{summary}{lr}{window}{at}{enc}")


def variants(budgets: tuple[int, ...], seq: int, layers: int = 6, region_size: int = 2,
             leaky: bool = True, designs: bool = True, spl: bool = True,
             ranks: tuple[int, ...] = (4, 16),
             norms: tuple[str, ...] = ("layer",),
             canvases: tuple[str, ...] = ("shared",),
             summaries: tuple[str, ...] = ("prefix",),
             interface_lrs: tuple[float, ...] = (1.0,),
             decoder_inits: tuple[str, ...] = ("default",),
             decoder_windows: tuple[int, ...] = (1,),
             decoders_at: tuple[str, ...] = ("first",),
             encoders: tuple[str, ...] = ("mlp",),
             per_position: bool = False) -> list[Variant]:
    """Dense at full depth, at the depth of one region and of K-1 regions (the honest
    baselines: an LBI model that does not beat one region trained alone has thrown the
    earlier regions away); then per budget b: mean and last with r = b (``leaky``),
    causal with r in {4, 16} and S = b / r segments (S = 1 would carry nothing causal; S
    must divide the sequence), each causal row also with zero-initialised decoders
    (``designs``), with every interface norm of ``norms``, canvas weights of
    ``canvases``, causal summary of ``summaries``, interface learning-rate factor of
    ``interface_lrs``, decoder init of ``decoder_inits``, decoder window of
    ``decoder_windows``, decoder place of ``decoders_at`` and encoder kind of ``encoders``;
    then, with ``per_position``, the design of :func:`lbi_fx.per_position` at each budget
    (rows of its rank, budget / rank of them); then SPL on the same partition."""
    rows = [Variant()]
    for depth in dict.fromkeys((region_size, layers - region_size)):
        if 0 < depth < layers:
            rows.append(Variant(layers=depth))
    for b in budgets:
        if leaky:
            rows += [Variant("mean", b), Variant("last", b)]
        for r in ranks:
            if b % r == 0 and 1 < b // r <= seq and seq % (b // r) == 0:
                for norm, canvas, summary, lr, init, window, at, enc in itertools.product(
                        norms, canvases, summaries, interface_lrs, decoder_inits,
                        decoder_windows, decoders_at, encoders):
                    rows.append(Variant("causal", r, b // r, norm=norm, canvas=canvas,
                                        summary=summary, interface_lr=lr, decoder_init=init,
                                        decoder_window=window, decoder_at=at, encoder=enc))
                if designs and "zero" not in decoder_inits:
                    rows.append(Variant("causal", r, b // r, decoder_init="zero"))
        if per_position:
            p = lbi_fx.per_position()
            S = b // p["rank"]
            if b % p["rank"] == 0 and 1 < S <= seq and seq % S == 0:
                rows.append(Variant("causal", p["rank"], S, norm=p["interface_norm"],
                                    summary=p["summary"], decoder_init=p["decoder_init"],
                                    decoder_window=p["decoder_window"]))
    if spl:
        rows.append(Variant("spl"))
    return list(dict.fromkeys(rows))


@dataclass
class Config(RunConfig):
    heads: int = 4
    region_size: int = 2
    budgets: tuple[int, ...] = (16, 64)
    backward: str = "scan"  # LBI backward after the timed steps ("autograd": same gradients)
    timed_steps: int = 15   # the first steps always run the scan backward and are timed
    seeds: int = 1          # each row trained from this many seeds (init and batch order)
    leaky: bool = True      # the mean / last rows (they measure the leak)
    designs: bool = True    # the zero-decoder rows
    spl: bool = True        # the stage-partitioned learning row
    ranks: tuple[int, ...] = (4, 16)  # per-row ranks of the causal rows
    norms: tuple[str, ...] = ("layer",)  # interface norms of the causal rows
    canvases: tuple[str, ...] = ("shared",)  # canvas weights of the causal rows
    summaries: tuple[str, ...] = ("prefix",)  # causal summaries of the causal rows
    interface_lrs: tuple[float, ...] = (1.0,)  # interface lr factors of the causal rows
    decoder_inits: tuple[str, ...] = ("default",)  # decoder inits of the causal rows
    decoder_windows: tuple[int, ...] = (1,)  # decoder windows of the causal rows
    decoders_at: tuple[str, ...] = ("first",)  # where the causal rows' decoders enter
    encoders: tuple[str, ...] = ("mlp",)  # encoder / decoder kind of the causal rows
    per_position: bool = False  # the lbi_fx.per_position() row at each budget
    # dense rows taken from an earlier run of the same config and seeds (name -> row):
    # dense training is deterministic per seed and thread count, so it need not rerun
    reuse_dense: dict | None = None
    # A fixed Jacobian strategy: "auto" picks per region by timing, so two runs of one seed
    # could round differently, and 6000 steps amplify it (0.013 CE measured, #23)
    jacobian: str = "reuse"
    # The learning rate: "constant" (after ``warmup`` steps) or "cosine" (down to
    # ``min_lr`` x lr at the last step). At a constant rate the last iterate is a noisy
    # sample of the model: the score of one checkpoint moves by as much as depth buys.
    schedule: str = "constant"
    warmup: int = 0
    min_lr: float = 0.1
    # The final score on this many held-out batches (a fresh draw, the same for every row
    # and seed) instead of the ``eval_batches`` of the curve: 4 batches are 4096 bytes.
    final_eval_batches: int = 0

    @staticmethod
    def long() -> Config:
        """Long enough that depth matters, measured so that one row is worth reading: 6000
        steps, a cosine learning rate (100 warm-up steps, down to lr / 10) and the final
        score on 64 held-out batches (65,536 bytes)."""
        return Config(steps=6000, eval_every=1000, seeds=2, budgets=(64,), leaky=False,
                      backward="autograd", schedule="cosine", warmup=100,
                      final_eval_batches=64, ranks=(16,), per_position=True)

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (1-based)."""
        lr = self.lr * min(1.0, step / self.warmup) if self.warmup > 0 else self.lr
        if self.schedule == "cosine" and step > self.warmup:
            done = (step - self.warmup) / max(1, self.steps - self.warmup)
            lr = self.lr * (self.min_lr + (1 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * done)))
        return lr

    @property
    def protocol(self) -> dict:
        """What makes two runs' scores comparable beyond steps and seeds."""
        return {"schedule": self.schedule, "warmup": self.warmup, "min_lr": self.min_lr,
                "final_eval_batches": self.final_eval_batches, "lr": self.lr}

    @property
    def recorded(self) -> dict:
        """Everything else a row's numbers depend on (the model's shape, the data, the
        evaluation set, the thread count dense training is deterministic for); every row
        records it, and ``--reuse-dense`` refuses rows that differ."""
        return {"model_layers": self.layers, "width": self.width, "heads": self.heads,
                "seq": self.seq, "batch": self.batch, "corpus_bytes": self.corpus_bytes,
                "eval_batches": self.eval_batches, "region_size": self.region_size,
                "threads": torch.get_num_threads()}

    @staticmethod
    def quick() -> Config:
        return Config(layers=4, width=32, seq=32, batch=8, steps=30, eval_every=15,
                      eval_batches=1, corpus_bytes=400_000, budgets=(16,))


def build(cfg: Config, v: Variant, dense: torch.nn.Module, example: tuple):
    """A copy of the dense model, rewritten as ``v`` asks (the same initial weights; a
    shallow dense row keeps the first ``v.layers`` blocks)."""
    model = copy.deepcopy(dense)
    if v.pool is None:
        if v.layers is not None:
            model.layers = torch.nn.ModuleList(list(model.layers)[: v.layers])
        return model
    regions = lbi_fx.every(cfg.region_size, "layers")
    if v.pool == "spl":
        return lbi_fx.stage_partition(model, regions, example_inputs=example)
    kw = {"segment_len": cfg.seq // v.segments} if v.pool == "causal" else {}
    with warnings.catch_warnings():
        if v.pool in ("mean", "last"):  # leaky on purpose: these rows measure the leak
            warnings.simplefilter("ignore", lbi_fx.CausalityWarning)
        return lbi_fx.transform(model, regions, rank=v.rank, example_inputs=example, pool=v.pool,
                                decoder_init=v.decoder_init, interface_norm=v.norm,
                                canvas_weights=v.canvas, summary=v.summary,
                                decoder_window=v.decoder_window, decoder_at=v.decoder_at,
                                encoder=v.encoder,
                                jacobian=cfg.jacobian, **kw)


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


def train_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The LM loss; for a stage-partitioned model the sum of its stage losses (Eq. 5)."""
    if hasattr(model, "stage_loss"):
        return model.stage_loss(x, lambda z: F.cross_entropy(z.flatten(0, 1), y.flatten()))[0]
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def train(cfg: Config, v: Variant, model, corpus, val, progress: bool = True,
          final: list | None = None) -> dict:
    """AdamW on the shared batch sequence; evaluation and interface spectra logged."""
    from tqdm.auto import tqdm

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # the interface modules (lbi.enc_*, lbi.dec_*) may learn at their own rate
    iface = [p for n, p in named if n.startswith("lbi.")]
    rest = [p for n, p in named if not n.startswith("lbi.")]
    groups = [{"params": rest, "lr": cfg.lr}]
    if iface:
        groups.append({"params": iface, "lr": cfg.lr * v.interface_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    curve, times = [], []
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{v.name[:40]:>40}", disable=not progress,
               leave=False, file=sys.stderr)
    model.train()
    for step in bar:
        if hasattr(model, "backward"):
            model.backward = "scan" if step <= cfg.timed_steps else cfg.backward
        for group, factor in zip(opt.param_groups, (1.0, v.interface_lr)):
            group["lr"] = cfg.lr_at(step) * factor
        x, y = corpus.get_batch("train", cfg.batch, cfg.seq, gen)
        t0 = time.perf_counter()
        loss = train_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step <= cfg.timed_steps:
            times.append(time.perf_counter() - t0)
        loss = loss.detach()  # a number from here on: no requires_grad scalar conversion
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
    if final:  # the row's score: a larger held-out set than the curve's
        ce, free = evaluate(model, final)
        curve[-1] = dict(curve[-1], ce=ce, ce_leak_free=free, final_eval_batches=len(final))
    warm = times[min(5, len(times) - 1):]  # scan steps only, after warm-up
    return {"curve": curve, "step_s": statistics.median(warm)}


def run_table(cfg: Config, progress: bool = True) -> tuple[list[dict], dict]:
    """Train every variant from every seed; return the table rows (seed means, spread,
    depth recovery) and the curves of seed 0 by variant name."""
    from lbi_fx.models.data import load_corpus
    from lbi_fx.models.transformer import GPT, GPTConfig

    corpus = load_corpus(max_bytes=cfg.corpus_bytes)
    gval = torch.Generator().manual_seed(1)  # the same held-out batches for every seed
    val = [corpus.get_batch("val", cfg.batch, cfg.seq, gval) for _ in range(cfg.eval_batches)]
    gfinal = torch.Generator().manual_seed(2)  # the final score's batches, also shared
    final = [corpus.get_batch("val", cfg.batch, cfg.seq, gfinal)
             for _ in range(cfg.final_eval_batches)]
    example = (torch.randint(0, 256, (2, cfg.seq), generator=torch.Generator().manual_seed(0)),)
    table = variants(cfg.budgets, cfg.seq, cfg.layers, cfg.region_size, cfg.leaky,
                     cfg.designs, cfg.spl, cfg.ranks, cfg.norms,
                     cfg.canvases, cfg.summaries, cfg.interface_lrs, cfg.decoder_inits,
                     cfg.decoder_windows, cfg.decoders_at, cfg.encoders, cfg.per_position)
    runs: dict[Variant, list[dict]] = {v: [] for v in table}
    curves = {}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        run_cfg = dataclasses.replace(cfg, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dense = GPT(GPTConfig(block_size=cfg.seq, n_layer=cfg.layers, n_head=cfg.heads,
                                  n_embd=cfg.width))
        for v in table:
            if v.model == "dense" and v.name in (cfg.reuse_dense or {}):
                continue
            res = train(run_cfg, v, build(run_cfg, v, dense, example), corpus, val, progress,
                        final)
            runs[v].append(res)
            if seed == cfg.seed:
                curves[v.name] = res["curve"]
            if progress:
                last = res["curve"][-1]
                print(f"seed {seed} {v.name:>40}: CE {last['ce']:.3f}, leak-free "
                      f"{last['ce_leak_free']:.3f}", file=sys.stderr)
    reused = cfg.reuse_dense or {}
    base_step = (reused[table[0].name]["step_ms"] / 1e3 if table[0].name in reused
                 else statistics.median(r["step_s"] for r in runs[table[0]]))
    rows = []
    for v in table:
        if not runs[v]:
            rows.append(dict(reused[v.name], reused=True))
            continue
        finals = [r["curve"][-1] for r in runs[v]]
        free = [f["ce_leak_free"] for f in finals]
        step_s = statistics.median(r["step_s"] for r in runs[v])
        rows.append({
            "model": v.model, "name": v.name, "layers": v.layers or cfg.layers,
            "pool": v.pool if v.model == "lbi" else None, "rank": v.rank or None,
            "segments": v.segments if v.model == "lbi" else None, "scalars": v.scalars or None,
            "decoder_init": v.decoder_init if v.model == "lbi" else None,
            "ce": round(statistics.fmean(f["ce"] for f in finals), 4),
            "ce_leak_free": round(statistics.fmean(free), 4),
            "ce_leak_free_seeds": [round(x, 4) for x in free],
            "spread": round((max(free) - min(free)) / 2, 4),
            "bpb_leak_free": round(statistics.fmean(free) / math.log(2), 4),
            "norm": v.norm if v.model == "lbi" else None,
            "canvas_weights": v.canvas if v.model == "lbi" else None,
            "summary": v.summary if v.model == "lbi" else None,
            "interface_lr": v.interface_lr if v.model == "lbi" else None,
            "decoder_window": v.decoder_window if v.model == "lbi" else None,
            "decoder_at": v.decoder_at if v.model == "lbi" else None,
            "encoder": v.encoder if v.model == "lbi" else None,
            "steps": cfg.steps, "seeds": cfg.seeds, "seed": cfg.seed, **cfg.protocol,
            **cfg.recorded,
            "step_ratio": round(step_s / base_step, 2),
            "step_ms": round(1e3 * step_s, 1),
        })
    dense_free = rows[0]["ce_leak_free"]
    shallow = next((r for r, v in zip(rows, table) if v.layers == cfg.region_size), None)
    for r in rows:
        r["leak"] = round(r["ce_leak_free"] - r["ce"], 4)
        r["gap_leak_free"] = round(r["ce_leak_free"] - dense_free, 4)
        r["depth_recovery"] = depth_recovery(r, rows[0], shallow)
    return rows, curves


def depth_recovery(row: dict, deep: dict, shallow: dict | None) -> float | None:
    """(CE(dense at one region's depth) - CE(row)) / (CE(dense one region) - CE(dense)),
    leak-free: 1 keeps all that depth buys, 0 is no better than one region alone. None
    without a shallow row or where dense depth buys nothing (the ratio means nothing)."""
    if shallow is None:
        return None
    margin = shallow["ce_leak_free"] - deep["ce_leak_free"]
    if margin <= 0:
        return None
    return round((shallow["ce_leak_free"] - row["ce_leak_free"]) / margin, 3)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 4 layers, width 32, 30 steps, budget 16 only")
    p.add_argument("--long", action="store_true",
                   help="where depth matters: 6000 steps, a cosine learning rate, the score "
                        "on 64 held-out batches, 2 seeds, budget 64, causal rows only: the "
                        "default 16 x 4 segments and lbi_fx.per_position() (dense 6 beats "
                        "dense 2 by ~0.075 there); about 30 CPU-minutes per seed with "
                        "--no-spl --no-designs")
    p.add_argument("--seeds", type=int, help="seeds per row (default 1; --long 2)")
    p.add_argument("--seed", type=int, help="first seed (default 0): runs seeds seed .. seed+seeds-1")
    p.add_argument("--ranks", help="per-row ranks of the causal rows, comma-separated "
                   "(default 4,16; none: no rows of the rank grid)")
    p.add_argument("--no-leaky", action="store_true", help="leave out the mean / last rows")
    p.add_argument("--no-designs", action="store_true", help="leave out the zero-decoder rows")
    p.add_argument("--no-spl", action="store_true", help="leave out the SPL row")
    p.add_argument("--per-position", action=argparse.BooleanOptionalAction, default=None,
                   help="add the lbi_fx.per_position() row at each budget (default: only "
                        "with --long)")
    p.add_argument("--norms", help="interface norms of the causal rows, comma-separated "
                                   "(layer, rms, none; default layer)")
    p.add_argument("--canvas-weights", default=None,
                   help="canvas weights of the causal rows, comma-separated (shared, per_region; "
                        "default shared)")
    p.add_argument("--summaries", default=None,
                   help="causal summaries of the causal rows, comma-separated: prefix (default), "
                        "latest (also the last position before the row), recent (also the "
                        "whole segment before it, position by position), inclusive (up to "
                        "and including the segment's first position, and that position)")
    p.add_argument("--interface-lrs", default=None,
                   help="learning-rate factors of the interface modules for the causal rows, "
                        "comma-separated (default 1)")
    p.add_argument("--reuse-dense", metavar="JSON",
                   help="take the dense rows from an earlier --json run of the same config "
                        "and seeds (dense training is deterministic per seed and thread count)")
    p.add_argument("--decoder-inits", default=None,
                   help="decoder inits of the causal rows, comma-separated (default, zero; "
                        "default: default)")
    p.add_argument("--decoder-windows", default=None,
                   help="decoder windows of the causal rows, comma-separated ints (rows each "
                        "decoder reads; default 1)")
    p.add_argument("--decoders-at", default=None,
                   help="where the causal rows' decoders enter each region, comma-separated: "
                        "first (default; the region's start), every (before every block)")
    p.add_argument("--encoders", default=None,
                   help="encoder / decoder kind of the causal rows, comma-separated: mlp "
                        "(default), linear")
    p.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                   help="learning rate: constant, or cosine down to lr / 10 (default constant; "
                        "--long cosine)")
    p.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps of the learning rate (default 0; --long 100)")
    p.add_argument("--final-eval-batches", type=int, default=None,
                   help="score each row on this many held-out batches at the end (default: the "
                        "curve's batches; --long 64)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations")
    p.add_argument("--steps", type=int, help="training steps per model (default 600)")
    p.add_argument("--budgets", help="scalar budgets per sample, comma-separated (default 16,64)")
    p.add_argument("--layers", type=int, help="GPT blocks (default 6; --quick 4)")
    p.add_argument("--width", type=int, help="model width (default 64; --quick 32)")
    p.add_argument("--seq", type=int, help="bytes per training sequence (default 64; --quick 32)")
    p.add_argument("--batch", type=int, help="sequences per batch (default 16; --quick 8)")
    p.add_argument("--backward", choices=["scan", "autograd"], default=None,
                   help="LBI backward after the first --timed-steps (always scan, timed): "
                        "'autograd' trains faster with the same gradients (to rounding)")
    p.add_argument("--timed-steps", type=int, default=15,
                   help="steps that run the scan backward and give step / dense")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of leak-free curves and spectra")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def run(args: argparse.Namespace) -> int:
    if args.quick and args.long:
        raise lbi_fx.InputError("--quick and --long: choose one")
    cfg = Config.quick() if args.quick else Config.long() if args.long else Config()
    for key in ("steps", "layers", "width", "seq", "batch", "seeds", "eval_every",
                "final_eval_batches"):
        if getattr(args, key) is not None:
            least = 0 if key == "final_eval_batches" else 1  # 0: score on the curve's batches
            if getattr(args, key) < least:
                raise lbi_fx.InputError(f"--{key.replace('_', '-')} {getattr(args, key)}: "
                                        f"an integer >= {least}")
            setattr(cfg, key, getattr(args, key))
    cfg.leaky = cfg.leaky and not args.no_leaky
    cfg.designs = cfg.designs and not args.no_designs
    cfg.spl = cfg.spl and not args.no_spl
    if args.per_position is not None:
        cfg.per_position = args.per_position
    if args.seed is not None:
        cfg.seed = args.seed
    if args.ranks == "none":  # no causal rows of the rank grid (dense, SPL, per-position)
        cfg.ranks = ()
    for key in ("budgets", "ranks", "decoder_windows"):
        text = getattr(args, key)
        if text and not (key == "ranks" and text == "none"):
            try:
                setattr(cfg, key, tuple(int(b) for b in text.split(",")))
            except ValueError:
                flag = key.replace("_", "-")
                raise lbi_fx.InputError(f"--{flag} {text!r}: comma-separated ints") from None
    for flag, field, allowed in (("norms", "norms", lbi_fx.interfaces.NORMS),
                                 ("canvas-weights", "canvases", ("shared", "per_region")),
                                 ("summaries", "summaries", lbi_fx.interfaces.SUMMARIES),
                                 ("decoder-inits", "decoder_inits", lbi_fx.interfaces.DECODER_INITS),
                                 ("decoders-at", "decoders_at", DECODER_AT),
                                 ("encoders", "encoders", ("mlp", "linear"))):
        text = getattr(args, flag.replace("-", "_"))
        if text:
            setattr(cfg, field, _choices(flag, text, allowed))
    if args.interface_lrs:
        try:
            lrs = tuple(float(x) for x in args.interface_lrs.split(","))
        except ValueError:
            lrs = ()
        if not lrs or not all(math.isfinite(x) and x > 0 for x in lrs):
            raise lbi_fx.InputError(f"--interface-lrs {args.interface_lrs!r}: comma-separated "
                                    "positive numbers")
        cfg.interface_lrs = lrs
    if args.schedule is not None:
        cfg.schedule = args.schedule
    if args.warmup is not None:
        if args.warmup < 0:
            raise lbi_fx.InputError(f"--warmup {args.warmup}: a number of steps >= 0")
        cfg.warmup = args.warmup
    if args.reuse_dense:  # after every flag of the protocol: the rows must match it
        cfg.reuse_dense = reuse_rows(args.reuse_dense, cfg)
    cfg.eval_every = min(cfg.eval_every, cfg.steps)
    cfg.backward = args.backward or cfg.backward
    cfg.timed_steps = max(1, min(args.timed_steps, cfg.steps))
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
              f"{cfg.region_size}, batch {cfg.batch} x {cfg.seq} bytes, {cfg.steps} steps x "
              f"{cfg.seeds} seed(s), {_protocol_text(cfg)} "
              f"({_backward_text(cfg)}), "
              f"{len(rows)} models in {time.perf_counter() - t0:.0f}s")
        print(format_table(rows))
    return 0


def _choices(flag: str, text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated flag value, each item one of ``allowed`` (else named)."""
    values = tuple(v.strip() for v in text.split(","))
    bad = [v for v in values if v not in allowed]
    if bad:
        raise lbi_fx.InputError(f"--{flag} {text!r}: {bad[0]!r} is not one of "
                                f"{', '.join(allowed)}")
    return values


def main(argv: list[str] | None = None) -> int:
    from lbi_fx.cli.common import standalone

    return standalone(sys.modules[__name__], "lbi-fx quality", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
