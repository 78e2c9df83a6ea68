"""Scoring the K stage logits as one model's prediction: the last stage, the mean of the
stage losses, or the softmax of the summed logits (Log-OP, Eq. 17); in bits per byte for
the byte-level comparisons of ``lbi-fx spl``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lbi_fx.errors import InputError
from lbi_fx.spl.module import SPLModule

SCORERS = ("last", "mean-stage", "sum-logits")


def stage_nats(outputs: Sequence[torch.Tensor], targets: torch.Tensor, scorer: str = "last"
               ) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of K stage logits under one scorer:
    ``"last"`` the last stage, ``"mean-stage"`` the mean of the stages' losses,
    ``"sum-logits"`` softmax of the summed stage logits (Log-OP, Eq. 17)."""
    if scorer not in SCORERS:
        raise InputError(f"scorer={scorer!r}: choose one of {', '.join(SCORERS)}")

    def up(z):  # half-precision logits are scored in fp32
        return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z

    def ce(z):
        return F.cross_entropy(up(z).reshape(-1, z.size(-1)), targets.reshape(-1))

    if scorer == "last":
        return ce(outputs[-1])
    if scorer == "mean-stage":
        return torch.stack([ce(z) for z in outputs]).mean()
    return ce(torch.stack([up(z) for z in outputs]).sum(0))


def bits_per_byte(nats: float) -> float:
    """Byte-level models: one token per byte, so BPB = nats / ln 2."""
    return float(nats) / math.log(2)


@torch.no_grad()
def stage_bpb(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Bits per byte under every scorer from one forward; a plain model (one output) gets
    the same number under all three."""
    outs = model.stage_outputs(x) if isinstance(model, SPLModule) else [model(x)]
    return {s: bits_per_byte(stage_nats(outs, y, s)) for s in SCORERS}
