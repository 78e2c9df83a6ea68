"""Small hand-written models shared by the tests (no test functions here).

Each model documents the separator facts the tests assert about it. Every ``*_factory``
returns ``(model, example_inputs)`` for the CLI (``tests.models:bypass_factory``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tokens(batch: int = 2, seq: int = 8, vocab: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _seeded(cls, *args, seed: int = 0, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(*args, **kwargs)


class ChainBlock(nn.Module):
    """``m -> up -> (+ canvas, + extra) -> body -> tanh -> iface``: returns (m_next, hidden).

    ``up`` decodes the previous interface (absent in block 0, which reads the canvas
    alone); ``iface`` (D -> r) is the block's only dynamic output on the main path.
    """

    def __init__(self, d: int, r: int, first: bool):
        super().__init__()
        self.up = None if first else nn.Linear(r, d)
        self.body = nn.Linear(d, d)
        self.iface = nn.Linear(d, r)

    def forward(self, m, canvas, extra=None):
        h = canvas if self.up is None else canvas + self.up(m)
        if extra is not None:
            h = h + extra
        h = torch.tanh(self.body(h))
        return self.iface(h), h


class BoundedChain(nn.Module):
    """Bounded-interface model: canvas ``emb(idx)`` (static) -> ``blocks.0..n-1`` -> head.

    With one region per block and ``interfaces=["blocks.0.iface", "blocks.1.iface", ...]``
    every boundary holds and the min cut at every boundary is ``seq * r`` per sample.
    ``bypass=True`` adds ONE skip: the hidden state of ``blocks.1`` (before its iface)
    goes through the top-level Linear ``skip`` (which joins region 1) into ``blocks.2``.
    That breaks exactly boundary 2 (between region 1 and region 2); its min cut becomes
    ``seq * (d + r)``: the skip and the interface both leave region 1.
    """

    def __init__(self, n_blocks: int = 4, d: int = 12, r: int = 3, vocab: int = 32,
                 bypass: bool = False):
        super().__init__()
        self.bypass = bypass
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(ChainBlock(d, r, i == 0) for i in range(n_blocks))
        self.skip = nn.Linear(d, d) if bypass else None
        self.head = nn.Linear(r, vocab)

    def forward(self, idx):
        canvas = self.emb(idx)
        m, saved = None, None
        for i, block in enumerate(self.blocks):
            extra = self.skip(saved) if self.bypass and i == 2 else None
            m, h = block(m, canvas, extra)
            if i == 1:
                saved = h
        return self.head(m)


def chain_interfaces(n_blocks: int = 4) -> list[str]:
    return [f"blocks.{i}.iface" for i in range(n_blocks - 1)]


def chain_regions(n_blocks: int = 4) -> list[list[str]]:
    return [[f"blocks.{i}"] for i in range(n_blocks)]


def bounded_factory():
    return _seeded(BoundedChain), (tokens(),)


def bypass_factory():
    return _seeded(BoundedChain, bypass=True), (tokens(),)


class TinyMLP(nn.Module):
    """(B, d) -> ``layers.0..n-1`` (Linear + ReLU) -> head; min cut per boundary is d."""

    def __init__(self, d: int = 6, n_layers: int = 4, out: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(n_layers))
        self.head = nn.Linear(d, out)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class StaticTablesBlock(nn.Module):
    """Attention-like block; block 0 builds a causal mask and a rotary-like cos/sin table
    from shapes and a buffer, and hands them on to every later block."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.register_buffer("inv_freq", 1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d)))

    def tables(self, x):
        T = x.size(1)
        pos = torch.arange(T, device=x.device)
        mask = pos[None, :] <= pos[:, None]  # (T, T) causal
        ang = torch.outer(pos.float(), self.inv_freq)
        return mask, torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def forward(self, x, tables=None):
        if tables is None:
            tables = self.tables(x)
        mask, cos, sin = tables
        a, b = x.chunk(2, dim=-1)
        rot = x * cos + torch.cat([-b, a], -1) * sin
        att = (rot @ rot.transpose(-2, -1)).masked_fill(~mask, float("-inf")).softmax(-1)
        return x + self.proj(att @ x), tables


class StaticTables(nn.Module):
    """Causal mask / rotary table computed inside ``blocks.0`` and reused by later blocks:
    they are static, so the min cut per boundary stays ``seq * d``."""

    def __init__(self, d: int = 8, n_blocks: int = 3, vocab: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(StaticTablesBlock(d) for _ in range(n_blocks))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x, tables = self.emb(idx), None
        for block in self.blocks:
            x, tables = block(x, tables)
        return self.head(x)


class SplitBlock(nn.Module):
    """``proj`` (d -> 3d) then ``split([d, 2d])``: returns the split node itself (a tuple)."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, 3 * d)
        self.d = d

    def forward(self, x):
        return self.proj(x).split([self.d, 2 * self.d], dim=-1)


class SplitConsumer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(3 * d, d)

    def forward(self, parts):
        a, b = parts
        return self.lin(torch.cat([torch.tanh(a), b * 2], -1))


class SplitModel(nn.Module):
    """(B, d) -> ``first`` (one split node with outputs of widths d, 2d) -> ``second``.

    With regions [["first"], ["second"]] the only crossing node is the split, which holds
    3d scalars per sample; x is static, so the min cut is 3d (12 by default). Counting
    only the split's first output would give d.
    """

    def __init__(self, d: int = 4):
        super().__init__()
        self.first = SplitBlock(d)
        self.second = SplitConsumer(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.second(self.first(x)))


class TwoWidths(nn.Module):
    def __init__(self, d: int, wa: int, wb: int):
        super().__init__()
        self.fa = nn.Linear(d, wa)
        self.fb = nn.Linear(d, wb)

    def forward(self, x):
        return torch.tanh(self.fa(x)), torch.sigmoid(self.fb(x))


class Merge(nn.Module):
    def __init__(self, wa: int, wb: int, d: int):
        super().__init__()
        self.lin = nn.Linear(wa + wb, d)

    def forward(self, a, b):
        return self.lin(torch.cat([a, b], -1))


class MultiCross(nn.Module):
    """(B, d) -> ``enc`` emits tensors of widths wa and wb -> ``dec`` merges them -> head.

    Regions [["enc"], ["dec"]]: both tensors cross; x is static, so the min cut is
    wa + wb per sample (3 + 5 = 8 by default) - counting only one would give 3 or 5.
    """

    def __init__(self, d: int = 16, wa: int = 3, wb: int = 5):
        super().__init__()
        self.enc = TwoWidths(d, wa, wb)
        self.dec = Merge(wa, wb, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        a, b = self.enc(x)
        return self.head(self.dec(a, b))


class BNBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x):
        return x + F.relu(self.bn(self.lin(x)))


class BatchNormNet(nn.Module):
    """(B, d) -> ``blocks.0..n-1`` each with a BatchNorm1d -> head; min cut per boundary d."""

    def __init__(self, d: int = 6, n_blocks: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(BNBlock(d) for _ in range(n_blocks))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def not_a_tuple_factory():
    return _seeded(TinyMLP)


def not_a_module_factory():
    return "model", (torch.randn(2, 6),)


def backward_states(lbi, *inputs) -> list:
    """Run one scan step and return the ChainState(s) its backward program saw."""
    from lbi_fx import runtime

    seen = []
    real = runtime.region_jacobian
    runtime.region_jacobian = lambda state, k: seen.append(state) or real(state, k)
    try:
        lbi._compiled = None  # rebuild the backward graph around the spy
        lbi(*inputs).sum().backward()
    finally:
        runtime.region_jacobian = real
        lbi._compiled = None
    return seen


# channels-first signal blocks (test_decoder_axes, test_causality_trust, test_sequence_axes)
class CausalConv(nn.Module):
    """(B, D, L) -> (B, D, L): a left-padded conv and a per-channel mix, residual."""

    def __init__(self, d: int, k: int = 3):
        super().__init__()
        self.k = k
        self.conv = nn.Conv1d(d, d, k)
        self.mix = nn.Conv1d(d, d, 1)

    def forward(self, x):
        return x + self.mix(torch.tanh(self.conv(F.pad(x, (self.k - 1, 0)))))


class ToChannelsFirst(CausalConv):
    def forward(self, x):
        return super().forward(x.transpose(1, 2))
