"""Causality along the sequence axis, measured rather than assumed.

A model is causal along axis 1 (batch first) when its outputs at positions < t do not
change when its inputs at positions >= t do. lbi-fx probes that numerically: it perturbs
the later positions of every sequence input (integer ids are replaced by other ids,
float inputs get Gaussian noise), reruns the model with the same RNG state, and
measures how far earlier outputs moved. The same probe decides ``pool="auto"`` at
transform time and tells ``verify`` whether an LBI model leaks the future.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.errors import InputError

CAUSAL_TOL = 1e-6  # relative change of earlier outputs below which a model counts as causal


class CausalityWarning(UserWarning):
    """A causal model gets an interface that lets earlier positions see later ones."""


@dataclass
class Causality:
    """What ``verify`` reports: is the model causal, is its LBI rewrite, and which
    interface modules pool across positions (the leaks)."""

    model_causal: bool | None
    lbi_causal: bool | None = None
    leaks: list[str] = field(default_factory=list)
    model_leak: float | None = None  # causal_leak of the model (relative)
    lbi_leak: float | None = None    # causal_leak of the LBI module
    note: str = ""

    def to_dict(self) -> dict:
        return {"model_causal": self.model_causal, "lbi_causal": self.lbi_causal,
                "leaks": list(self.leaks), "model_leak": self.model_leak,
                "lbi_leak": self.lbi_leak, "note": self.note}

    def __str__(self) -> str:
        def yn(v: bool | None) -> str:
            return "unknown" if v is None else "yes" if v else "NO"

        text = f"causality (axis 1): model causal: {yn(self.model_causal)}"
        if self.model_leak is not None:
            text += f" (leak {self.model_leak:.1e})"
        if self.lbi_causal is not None:
            text += f"; LBI causal: {yn(self.lbi_causal)}"
            if self.lbi_leak is not None:
                text += f" (leak {self.lbi_leak:.1e})"
        if self.leaks:
            text += f"; interfaces pooling across positions: {', '.join(self.leaks)}"
        if self.note:
            text += f"; {self.note}"
        return text


def _is_sequence(x: object) -> bool:
    """Ids (B, L, ...) or features (B, L, ..., D): a float (B, D) has no sequence axis."""
    if not isinstance(x, torch.Tensor):
        return False
    floating = x.dtype.is_floating_point or x.dtype.is_complex
    return x.dim() >= (3 if floating else 2)


def _sequence_length(inputs: Sequence[object]) -> int:
    for x in pytree.tree_leaves(list(inputs)):
        if _is_sequence(x):
            return x.shape[1]
    raise InputError("no example input has a sequence axis (ids of shape (B, L) or features of "
                     "shape (B, L, ..., D)); causality is measured along axis 1")


def _perturb(inputs: Sequence[object], t: int, length: int, gen: torch.Generator) -> list:
    """Inputs with every position >= t of every sequence input changed."""
    def change(x):
        if not _is_sequence(x) or x.shape[1] != length:
            return x
        x = x.clone()
        tail = x[:, t:]
        if x.dtype == torch.bool:
            x[:, t:] = ~tail
        elif x.dtype.is_floating_point or x.dtype.is_complex:
            scale = float(x.detach().abs().amax()) or 1.0
            noise = torch.randn(tail.shape, generator=gen, dtype=torch.float64)
            x[:, t:] = tail + (scale * noise).to(x.dtype)
        else:  # ids: another id from the range the input already uses
            hi = max(int(x.max()), 1) + 1
            shift = torch.randint(1, hi, tail.shape, generator=gen).to(x.dtype)
            x[:, t:] = (tail + shift) % hi
        return x

    return pytree.tree_map(change, list(inputs))


def _sequence_outputs(out, length: int) -> list[torch.Tensor]:
    return [o for o in pytree.tree_leaves(out)
            if isinstance(o, torch.Tensor) and o.dtype.is_floating_point and o.dim() >= 2
            and o.shape[1] == length]


def _restore_buffers(model: nn.Module):
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}

    def restore():
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in saved and b.shape == saved[k].shape:
                    b.copy_(saved[k])

    return restore


def causal_leak(model: nn.Module, example_inputs: Sequence[object], *,
                cuts: Sequence[int] | None = None, seed: int = 0) -> float:
    """Max change of outputs at positions < t when inputs at positions >= t change,
    relative to the output scale, over a few cut points t. 0.0 for a causal model.

    Every float output whose axis 1 is the sequence is compared; the model runs under
    ``no_grad`` with the same RNG seed for every run (same dropout masks) and its
    buffers are restored afterwards. Raises ``InputError`` when no input or no output
    has a sequence axis.
    """
    inputs = list(example_inputs)
    length = _sequence_length(inputs)
    if length < 2:
        raise InputError("causality needs a sequence of at least 2 positions in example_inputs")
    cuts = sorted({1, length // 2, length - 1} if cuts is None else set(cuts))
    gen = torch.Generator().manual_seed(seed)
    restore = _restore_buffers(model)

    def run(xs):
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _sequence_outputs(model(*xs), length)

    try:
        base = run(inputs)
        if not base:
            raise InputError(
                f"no output of {type(model).__name__} has the sequence axis (axis 1, length "
                f"{length}): causality is defined for per-position outputs")
        scale = max(float(o.detach().abs().amax()) for o in base) or 1.0
        worst = 0.0
        for t in cuts:
            if not 0 < t < length:
                continue
            moved = run(_perturb(inputs, t, length, gen))
            for a, b in zip(base, moved):
                diff = (b[:, :t].double() - a[:, :t].double()).abs()
                if diff.numel():
                    worst = max(worst, float(diff.max()) / scale)
    finally:
        restore()
    return worst


def probe_causal(model: nn.Module, example_inputs: Sequence[object]) -> tuple[bool | None, float | None, str]:
    """(causal?, leak, why unknown): never raises - a model the probe cannot run is
    reported as unknown (None), and ``pool="auto"`` then keeps the paper's mean pool."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leak = causal_leak(model, example_inputs)
    except InputError as exc:
        return None, None, str(exc).split(";")[0]
    except Exception as exc:  # noqa: BLE001 - the probe must not break verify/transform
        return None, None, f"the causality probe could not run the model ({type(exc).__name__}: {exc})"
    return leak <= CAUSAL_TOL, leak, ""


def leaky_interfaces(lbi: nn.Module) -> list[str]:
    """Interface encoders that pool a sequence axis over all positions (mean / last)."""
    from lbi_fx.interfaces import InterfaceEncoder

    out = []
    iface = getattr(lbi, "lbi", None)
    if iface is None:
        return out
    for name, mod in iface.named_children():
        if isinstance(mod, InterfaceEncoder) and mod.segments is None and mod.pool in ("mean", "last"):
            if getattr(mod, "pools_positions", True):
                out.append(f"lbi.{name}")
    return out
