"""Test harness for compiler passes: gradient parity and separator checks.

Usable from any project's pytest suite::

    from lbi_fx.testing import gradient_parity, assert_separated
    report = gradient_parity(lbi, (tokens,), loss_fn)
    report.assert_close(rel_l2=1e-6, cosine=0.999999)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lbi_fx.checks import default_loss  # public here too: the harness API
from lbi_fx.errors import LBIError


@dataclass
class ParityReport:
    """Scan backward vs plain autograd on the same module, same inputs, same RNG."""

    max_abs: float
    rel_l2: float
    cosine: float
    worst: list[tuple[str, float]] = field(default_factory=list)  # (param, rel error), worst first
    missing: list[str] = field(default_factory=list)  # grad under autograd, none under scan
    extra: list[str] = field(default_factory=list)    # grad under scan, none under autograd
    n_params: int = 0
    loss: float = float("nan")        # under autograd
    loss_scan: float = float("nan")   # under scan: the same forward, so the same value
    n_inputs: int = 0                 # floating inputs whose gradients are compared too
    tol_rel_l2: float = 1e-6          # what ``ok`` holds the report to
    tol_cosine: float = 0.999999

    @property
    def complete(self) -> bool:
        """Both modes give a gradient to the same tensors, and the errors are finite."""
        return not self.missing and not self.extra and math.isfinite(self.rel_l2)

    @property
    def loss_error(self) -> float:
        return abs(self.loss_scan - self.loss) / max(abs(self.loss), 1e-300)

    @property
    def ok(self) -> bool:
        """Complete, and rel-l2, cosine and the loss within the report's tolerances."""
        return (self.complete and self.rel_l2 <= self.tol_rel_l2
                and self.cosine >= self.tol_cosine and self.loss_error <= self.tol_rel_l2)

    def assert_close(self, rel_l2: float = 1e-6, cosine: float = 0.999999,
                     max_abs: float | None = None) -> None:
        problems = []
        if self.missing:
            problems.append(f"parameters with an autograd gradient but none under scan: {self.missing[:5]}")
        if self.extra:
            problems.append(f"parameters with a scan gradient but none under autograd: {self.extra[:5]}")
        if not self.rel_l2 <= rel_l2:
            problems.append(f"rel_l2 {self.rel_l2:.3e} > {rel_l2:.1e}")
        if not self.cosine >= cosine:
            problems.append(f"cosine {self.cosine:.9f} < {cosine}")
        if max_abs is not None and not self.max_abs <= max_abs:
            problems.append(f"max_abs {self.max_abs:.3e} > {max_abs:.1e}")
        if not self.loss_error <= rel_l2:
            problems.append(f"loss {self.loss_scan!r} under scan, {self.loss!r} under autograd")
        if problems:
            raise AssertionError("gradient parity failed: " + "; ".join(problems) + f"\n{self}")

    def __str__(self) -> str:
        worst = ", ".join(f"{n}={e:.2e}" for n, e in self.worst[:3])
        return (f"ParityReport(max_abs={self.max_abs:.3e}, rel_l2={self.rel_l2:.3e}, "
                f"cosine={self.cosine:.12f}, params={self.n_params}, worst: {worst})")


# rel-l2 and cosine that ``ParityReport.ok`` asks for, by gradient dtype (the least
# precise one present): fp64 as the fuzzer, fp32 as the parity grid, 16-bit as the paper's
# worst bf16 figure
DEFAULT_TOL = {torch.float64: (1e-10, 1 - 1e-10), torch.float32: (1e-6, 0.999999),
               torch.float16: (1.4e-2, 0.9999), torch.bfloat16: (1.4e-2, 0.9999)}


def _grads(module: nn.Module, inputs, loss_fn, seed: int, mode: str):
    """Gradients of the parameters and of every floating input (fresh leaves per mode)."""
    module.backward = mode
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    inputs = [x.detach().clone().requires_grad_(True)
              if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    named += [(f"input {i}", x) for i, x in enumerate(inputs)
              if isinstance(x, torch.Tensor) and x.requires_grad]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss = loss_fn(module(*inputs))
        grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    return [n for n, _ in named], grads, float(loss.detach())


def gradient_parity(
    lbi: nn.Module,
    example_inputs: Sequence[object],
    loss_fn: Callable[[object], torch.Tensor] | None = None,
    *,
    seed: int = 0,
    rel_l2: float | None = None,
    cosine: float | None = None,
) -> ParityReport:
    """Compare ``lbi.backward = "scan"`` against ``"autograd"`` on the same module.

    Both passes run with the same RNG seed, so dropout masks agree. Returns max |dg|,
    ||dg||_2 / ||g||_2 and cosine over the gradients of every parameter and every
    floating input, the worst of them, and both losses. ``report.ok`` holds them to
    ``rel_l2`` and ``cosine`` (default: by the gradients' dtype, ``DEFAULT_TOL``).
    """
    if not hasattr(lbi, "backward") or not hasattr(lbi, "lbi_verify"):
        raise LBIError("gradient_parity takes a module returned by lbi_fx.transform")
    loss_fn = loss_fn or default_loss
    inputs = tuple(example_inputs)
    before = lbi.backward
    try:
        names, ref, loss = _grads(lbi, inputs, loss_fn, seed, "autograd")
        _, got, loss_scan = _grads(lbi, inputs, loss_fn, seed, "scan")
    finally:
        lbi.backward = before
    missing = [n for n, a, b in zip(names, ref, got) if a is not None and b is None]
    extra = [n for n, a, b in zip(names, ref, got) if a is None and b is not None]
    pairs = [(n, a.double(), b.double()) for n, a, b in zip(names, ref, got)
             if a is not None and b is not None]
    worst = []
    diff_sq = ref_sq = dot = got_sq = 0.0
    max_abs = 0.0
    for n, a, b in pairs:
        d = b - a
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
        diff_sq += float((d * d).sum())
        ref_sq += float((a * a).sum())
        got_sq += float((b * b).sum())
        dot += float((a * b).sum())
        an = float(a.norm())
        worst.append((n, float(d.norm()) / an if an > 0 else float(d.norm())))
    worst.sort(key=lambda t: -t[1])
    rel = math.sqrt(diff_sq) / math.sqrt(ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)
    cos = dot / math.sqrt(ref_sq * got_sq) if ref_sq > 0 and got_sq > 0 else (
        1.0 if diff_sq == 0 else 0.0)
    n_inputs = sum(n.startswith("input ") for n, _, _ in pairs)
    dtype = max((a.dtype for a in ref if a is not None and a.is_floating_point()),
                key=lambda d: torch.finfo(d).eps, default=torch.float32)
    tol_rel, tol_cos = DEFAULT_TOL.get(dtype, DEFAULT_TOL[torch.float16])
    return ParityReport(max_abs=max_abs, rel_l2=rel, cosine=cos, worst=worst, missing=missing,
                        extra=extra, n_params=len(pairs) - n_inputs, loss=loss,
                        loss_scan=loss_scan, n_inputs=n_inputs,
                        tol_rel_l2=tol_rel if rel_l2 is None else rel_l2,
                        tol_cosine=tol_cos if cosine is None else cosine)


def assert_separated(model: nn.Module, regions=None, *, example_inputs, rank=None,
                     interfaces=None, failing: Sequence[int] = ()) -> None:
    """Assert the separator check holds at every boundary except ``failing`` ones."""
    from lbi_fx.api import verify

    report = verify(model, regions, example_inputs=example_inputs, rank=rank,
                    interfaces=interfaces)
    bad = sorted(b.index for b in report.failing())
    if bad != sorted(failing):
        raise AssertionError(f"expected failing boundaries {sorted(failing)}, got {bad}\n{report}")


def _logits(out) -> torch.Tensor:
    """The per-position scores of a model's output: a tensor, ``.logits`` (Hugging Face),
    or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise LBIError(f"cannot find per-position scores in a {type(out).__name__} output; return "
                   "a (B, L, V) tensor, a tuple starting with one, or an object with .logits")


@torch.no_grad()
def prefix_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> float:
    """Leak-free loss: position t is scored from a forward over ``x[:, :t+1]`` alone, so
    nothing after t can reach its prediction - whatever the model (an interface that
    pools the whole sequence included). Mean over positions and batch; L forwards.

    ``loss_fn(scores (B, V), targets (B,))`` defaults to cross-entropy.
    """
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    if x.dim() < 2 or y.shape[:2] != x.shape[:2]:
        raise LBIError(f"prefix_loss takes x and y of shape (B, L, ...) with the same (B, L), "
                       f"got {tuple(x.shape)} and {tuple(y.shape)}")
    total = 0.0
    for t in range(x.shape[1]):
        scores = _logits(model(x[:, : t + 1]))[:, t]
        total += float(loss_fn(scores, y[:, t]))
    return total / x.shape[1]


def causal_leak(model: nn.Module, example_inputs: Sequence[object]) -> float:
    """Max change of earlier outputs when later inputs change, relative to the output
    scale (0.0 for a causal model); see :mod:`lbi_fx.causality`."""
    from lbi_fx.causality import causal_leak as leak

    return leak(model, example_inputs)
