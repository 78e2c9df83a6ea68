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
    loss: float = float("nan")

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra and math.isfinite(self.rel_l2)

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
        if problems:
            raise AssertionError("gradient parity failed: " + "; ".join(problems) + f"\n{self}")

    def __str__(self) -> str:
        worst = ", ".join(f"{n}={e:.2e}" for n, e in self.worst[:3])
        return (f"ParityReport(max_abs={self.max_abs:.3e}, rel_l2={self.rel_l2:.3e}, "
                f"cosine={self.cosine:.12f}, params={self.n_params}, worst: {worst})")


def default_loss(out) -> torch.Tensor:
    """A fixed random projection of every floating output, plus a quadratic term.

    Each element gets its own Gaussian weight (a plain sum, or a smooth ramp, would give
    a cotangent that normalisation layers mostly project away, hiding real errors and
    inflating rounding ones); the weights depend only on the output's shape.
    """
    leaves = [o for o in torch.utils._pytree.tree_leaves(out)
              if isinstance(o, torch.Tensor) and o.dtype.is_floating_point]
    total = 0
    for i, o in enumerate(leaves):
        gen = torch.Generator().manual_seed(1234 + i)
        w = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
        total = total + (o * w).sum() / max(o.numel(), 1) ** 0.5 + 0.5 * (o * o).mean()
    return total


def _grads(module: nn.Module, inputs, loss_fn, seed: int, mode: str):
    module.backward = mode
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss = loss_fn(module(*inputs))
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return [n for n, _ in params], grads, float(loss.detach())


def gradient_parity(
    lbi: nn.Module,
    example_inputs: Sequence[object],
    loss_fn: Callable[[object], torch.Tensor] | None = None,
    *,
    seed: int = 0,
) -> ParityReport:
    """Compare ``lbi.backward = "scan"`` against ``"autograd"`` on the same module.

    Both passes run with the same RNG seed, so dropout masks agree. Returns max |dg|,
    ||dg||_2 / ||g||_2 and cosine over the full parameter-gradient vector, and the
    worst parameters.
    """
    if not hasattr(lbi, "backward") or not hasattr(lbi, "lbi_verify"):
        raise LBIError("gradient_parity takes a module returned by lbi_fx.transform")
    loss_fn = loss_fn or default_loss
    inputs = tuple(example_inputs)
    before = lbi.backward
    try:
        names, ref, loss = _grads(lbi, inputs, loss_fn, seed, "autograd")
        _, got, _ = _grads(lbi, inputs, loss_fn, seed, "scan")
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
    return ParityReport(max_abs=max_abs, rel_l2=rel, cosine=cos, worst=worst, missing=missing,
                        extra=extra, n_params=len(pairs), loss=loss)


def assert_separated(model: nn.Module, regions=None, *, example_inputs, rank=None,
                     interfaces=None, failing: Sequence[int] = ()) -> None:
    """Assert the separator check holds at every boundary except ``failing`` ones."""
    from lbi_fx.api import verify

    report = verify(model, regions, example_inputs=example_inputs, rank=rank,
                    interfaces=interfaces)
    bad = sorted(b.index for b in report.failing())
    if bad != sorted(failing):
        raise AssertionError(f"expected failing boundaries {sorted(failing)}, got {bad}\n{report}")
