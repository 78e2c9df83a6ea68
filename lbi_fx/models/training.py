"""Minimal, model-agnostic language-model training loop for the lbi-fx demo.

Works with anything that maps ``idx (B, T) int64 -> logits (B, T, V)``: the eager GPT of
:mod:`lbi_fx.models.transformer` and the LBI-rewritten module produced by lbi-fx alike,
or a model whose output holds the logits (a Hugging Face ``ModelOutput``, a dict, a
tuple): ``logits=`` picks them (a key or attribute name, an index or a callable; default
the output itself, its ``logits``, or a tuple's first element, as
:func:`lbi_fx.outputs.select_output` reads them). Batches
come from a generator seeded by ``seed``, so two models trained with the same seed see the
exact same byte windows in the same order; that is what makes ``train_side_by_side`` a
fair comparison. Validation always uses the same fixed val batches, for the same reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lbi_fx.models.data import ByteCorpus
from lbi_fx.outputs import Selector, select_output


@dataclass
class RunConfig:
    """What every side-by-side training comparison (``lbi-fx quality``, ``lbi-fx spl``)
    shares: the byte GPT's shape, the corpus, the optimiser and the evaluation cadence.
    Each comparison adds its own fields; all rows of one run use the same values."""

    layers: int = 6
    width: int = 64
    seq: int = 64
    batch: int = 16
    steps: int = 600
    lr: float = 3e-3
    eval_every: int = 100
    eval_batches: int = 4
    corpus_bytes: int = 4_000_000
    seed: int = 0


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
            logits: Selector = None) -> torch.Tensor:
    """Mean next-byte cross-entropy of ``model(x)``'s logits (``logits=`` picks them from a
    ``ModelOutput``, dict or tuple) against targets ``y``."""
    scores = select_output(model(x), logits, who="lm_loss")
    return F.cross_entropy(scores.reshape(-1, scores.size(-1)), y.reshape(-1))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    corpus: ByteCorpus,
    *,
    batch_size: int = 8,
    seq_len: int = 64,
    eval_batches: int = 4,
    seed: int = 0,
    logits: Selector = None,
) -> float:
    """Mean val loss over ``eval_batches`` fixed batches; restores the model's train mode.
    ``logits=`` picks the logits from the model's output (:func:`lm_loss`)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    g = torch.Generator().manual_seed(seed + 1)  # same val batches at every evaluation
    losses = []
    for _ in range(eval_batches):
        x, y = corpus.get_batch("val", batch_size, seq_len, g)
        losses.append(lm_loss(model, x.to(device), y.to(device), logits=logits).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def train_lm(
    model: nn.Module,
    corpus: ByteCorpus,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    batch_size: int = 8,
    seq_len: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    warmup: int = 0,
    eval_every: int = 50,
    eval_batches: int = 4,
    seed: int = 0,
    log: Callable[[str], object] | None = print,
    logits: Selector = None,
) -> list[dict]:
    """Train with AdamW until ``steps`` or ``seconds`` (of training time) runs out.

    ``logits=`` picks the logits from a model whose output is not the logits tensor itself
    (a Hugging Face ``ModelOutput`` works with the default: its ``logits``).

    LR is constant after an optional linear ``warmup`` (a cosine needs a known horizon,
    which a wall-clock budget does not give). Returns one dict per step with ``step``,
    ``time_s`` (cumulative training time, evaluation excluded), ``lr`` and ``train_loss``;
    evaluated steps (every ``eval_every`` and the last) add ``val_loss`` and
    ``train_loss_avg`` (mean train loss since the previous evaluation).
    """
    if steps is None and seconds is None:
        raise ValueError("give steps=, seconds=, or both")
    device = _device_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    model.train()
    history: list[dict] = []
    window: list[float] = []
    train_time = 0.0
    step = 0
    while True:
        step += 1
        t0 = time.perf_counter()
        step_lr = lr * min(1.0, step / warmup) if warmup > 0 else lr
        for group in opt.param_groups:
            group["lr"] = step_lr
        x, y = corpus.get_batch("train", batch_size, seq_len, g)
        loss = lm_loss(model, x.to(device), y.to(device), logits=logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        loss_val = loss.item()  # also synchronises an accelerator before timing
        train_time += time.perf_counter() - t0
        rec = {"step": step, "time_s": train_time, "lr": step_lr, "train_loss": loss_val}
        history.append(rec)
        window.append(loss_val)
        diverged = not math.isfinite(loss_val)
        last = (
            diverged
            or (steps is not None and step >= steps)
            or (seconds is not None and train_time >= seconds)
        )
        if step % eval_every == 0 or last:
            rec["train_loss_avg"] = sum(window) / len(window)
            rec["val_loss"] = evaluate(
                model,
                corpus,
                batch_size=batch_size,
                seq_len=seq_len,
                eval_batches=eval_batches,
                seed=seed,
                logits=logits,
            )
            window = []
            if log is not None:
                log(
                    f"step {step:5d} | train {rec['train_loss_avg']:.4f} | "
                    f"val {rec['val_loss']:.4f} | {train_time:7.1f}s"
                )
            if diverged and log is not None:
                log(f"non-finite loss at step {step}; stopping")
        if last:
            break
    return history


def format_table(histories: dict[str, list[dict]]) -> str:
    """One row per evaluated step, train/val loss of every model side by side."""
    names = list(histories)
    evals = {n: {r["step"]: r for r in h if "val_loss" in r} for n, h in histories.items()}
    rows = sorted(set().union(*(e.keys() for e in evals.values())))
    width = max(12, *(len(n) + 6 for n in names))
    head = f"{'step':>6} | " + " | ".join(
        f"{n + ' train':>{width}} {n + ' val':>{width}}" for n in names
    )
    lines = [head, "-" * len(head)]
    for s in rows:
        cells = []
        for n in names:
            r = evals[n].get(s)
            tr = f"{r['train_loss_avg']:.4f}" if r else ""
            va = f"{r['val_loss']:.4f}" if r else ""
            cells.append(f"{tr:>{width}} {va:>{width}}")
        lines.append(f"{s:>6} | " + " | ".join(cells))
    lines.append("-" * len(head))
    for n, h in histories.items():
        if h:
            t = h[-1]["time_s"]
            lines.append(f"{n}: {len(h)} steps in {t:.1f}s ({len(h) / max(t, 1e-9):.1f} steps/s)")
    return "\n".join(lines)


def train_side_by_side(
    models: dict[str, nn.Module],
    corpus: ByteCorpus,
    *,
    steps: int | None = None,
    seconds_each: float | None = None,
    seed: int = 0,
    log: Callable[[str], object] | None = print,
    logits: Selector | dict[str, Selector] = None,
    **train_kwargs,
) -> dict[str, list[dict]]:
    """Train each model in turn on the same batch sequence, then print one loss table.

    ``train_kwargs`` go to :func:`train_lm` (batch_size, seq_len, lr, eval_every, ...).
    ``logits=`` picks each model's logits from its output (one selector for all, or a
    dict by model name: a plain model beside the Hugging Face one it was rewritten from).
    The global torch seed is reset before each model so dropout masks match as well.
    """
    histories: dict[str, list[dict]] = {}
    for name, model in models.items():
        torch.manual_seed(seed)
        histories[name] = train_lm(
            model,
            corpus,
            steps=steps,
            seconds=seconds_each,
            seed=seed,
            log=None,
            logits=logits.get(name) if isinstance(logits, dict) else logits,
            **train_kwargs,
        )
        if log is not None:
            last = histories[name][-1]
            log(
                f"trained {name}: {last['step']} steps, val {last.get('val_loss', float('nan')):.4f}"
            )
    if log is not None:
        log(format_table(histories))
    return histories
