"""Encoder/decoder interface modules (Eq. 4-5 of the LBI paper).

They are ordinary ``nn.Module``s - optimizers, ``state_dict`` and ``.to()`` see them -
and each appears as a single ``call_module`` node in the rewritten graph, so the
interface m_k is one node of r scalars per sample: the separator the check counts.
"""

from __future__ import annotations

import torch
from torch import nn


def _mlp(d_in: int, hidden: int, d_out: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


def pool(x: torch.Tensor, how: str) -> torch.Tensor:
    """(B, ..., D) -> (B, D): never pools over the batch axis.

    ``"mean"`` averages every axis but batch and features; ``"last"`` takes the last
    position (a causal choice: position t never sees later tokens through m_k).
    """
    if x.dim() == 1:
        return x.unsqueeze(-1)
    if x.dim() == 2:
        return x
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return flat.mean(dim=1) if how == "mean" else flat[:, -1]


class InterfaceEncoder(nn.Module):
    """m_{k+1} = LN(m_k + tanh(a_k) * Enc_k(cat(pool(y) for y in crossing outputs))).

    Without ``m`` (the entry interface) it is m_0 = LN(Enc_in(pool(canvas))).
    """

    def __init__(self, in_features: list[int], rank: int, hidden: int, *, kind: str = "mlp",
                 pool: str = "mean", residual: bool = True, in_rank: int | None = None):
        super().__init__()
        self.rank = rank
        self.in_rank = rank if in_rank is None else in_rank
        self.in_features = list(in_features)
        self.pool = pool
        self.residual = residual
        self.net = _mlp(sum(in_features), hidden, rank, kind) if in_features else None
        self.alpha = nn.Parameter(torch.tensor(0.5)) if residual else None
        self.norm = nn.LayerNorm(rank)

    def forward(self, m: torch.Tensor | None, *ys: torch.Tensor) -> torch.Tensor:
        z = None
        if self.net is not None:
            z = self.net(torch.cat([pool(y, self.pool) for y in ys], dim=-1))
        if not self.residual:
            return self.norm(z)
        if self.in_rank != self.rank:  # interfaces of different widths: truncate or zero-pad
            m = m[:, : self.rank] if self.in_rank > self.rank else torch.nn.functional.pad(
                m, (0, self.rank - self.in_rank))
        return self.norm(m if z is None else m + torch.tanh(self.alpha) * z)


class InterfaceDecoder(nn.Module):
    """x_hat = canvas + Dec_k(m_k), broadcast over every axis but batch and features.

    ``shape`` says how to build the target shape at run time: each entry is either
    ``("canvas", j)`` (take ``canvas.shape[j]``, so batch and sequence stay dynamic) or
    ``("const", n)``. A crossing tensor whose shape differs from the canvas gets a zero
    canvas (``use_canvas=False``).
    """

    def __init__(self, rank: int, hidden: int, out_features: int, shape: list[tuple[str, int]],
                 *, kind: str = "mlp", use_canvas: bool = True):
        super().__init__()
        self.shape = [tuple(s) for s in shape]
        self.use_canvas = use_canvas
        self.net = _mlp(rank, hidden, out_features, kind)

    def forward(self, m: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        d = self.net(m)
        shape = [canvas.shape[v] if how == "canvas" else v for how, v in self.shape]
        if len(shape) == 1:
            d = d.reshape(shape)
        else:
            d = d.reshape(d.shape[0], *([1] * (len(shape) - 2)), d.shape[-1]).expand(shape)
        return canvas + d if self.use_canvas else d.contiguous()
