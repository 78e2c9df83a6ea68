"""A small GPT-style byte-level language model, written to be rewritten by lbi-fx.

One file, no framework, in the spirit of nanoGPT. The default model is traceable by
``torch.fx.symbolic_trace``: sequence length only flows into ``torch.arange`` (which fx
records as a node) and attention uses ``F.scaled_dot_product_attention(is_causal=True)``.
``GPT(cfg, explicit_mask=True)`` instead builds the causal mask with
``torch.ones(T, T).tril()``; ``torch.ones`` cannot take a size proxy, so symbolic tracing
fails with a TypeError while ``torch.export`` handles it. That variant exists to exercise
the export fallback of the tracer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256  # bytes
    block_size: int = 128  # maximum sequence length (size of the position table)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    tie_weights: bool = True  # share the token embedding with the output head
    bias: bool = True  # biases in Linear and LayerNorm


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    def __init__(self, cfg: GPTConfig, explicit_mask: bool = False):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.explicit_mask = explicit_mask
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Explicit size() calls rather than tuple unpacking keep fx tracing simple.
        B, T = x.size(0), x.size(1)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.explicit_mask:
            # Deliberately data-dependent on T through a factory call fx cannot trace.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            mask = torch.ones(T, T, device=x.device).tril()
            att = att.masked_fill(mask == 0, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        else:
            # self.training is a Python bool, so fx resolves this branch at trace time.
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_embd)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: the residual stream x is only ever added to."""

    def __init__(self, cfg: GPTConfig, explicit_mask: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, explicit_mask=explicit_mask)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """Token + position embeddings, a stack of pre-norm blocks, final LayerNorm, head."""

    def __init__(self, cfg: GPTConfig, explicit_mask: bool = False):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([Block(cfg, explicit_mask) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale residual output projections by 1/sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth at init.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) int64 byte ids -> logits (B, T, vocab_size)."""
        pos = torch.arange(idx.size(1), device=idx.device)  # fx records this as a node
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.layers:
            x = block(x)
        return self.head(self.ln_f(x))


def _build(
    explicit_mask: bool,
    n_layer: int,
    n_embd: int,
    n_head: int,
    block_size: int,
    batch: int,
    seq: int,
    tie_weights: bool,
    dropout: float,
    seed: int,
) -> tuple[GPT, tuple[torch.Tensor]]:
    assert seq <= block_size, f"seq={seq} exceeds block_size={block_size}"
    cfg = GPTConfig(
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        dropout=dropout,
        tie_weights=tie_weights,
    )
    # Seed locally so building a model does not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(cfg, explicit_mask=explicit_mask)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    return model, (idx,)


def build(
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    block_size: int = 64,
    batch: int = 2,
    seq: int = 32,
    tie_weights: bool = True,
    dropout: float = 0.0,
    seed: int = 0,
) -> tuple[GPT, tuple[torch.Tensor]]:
    """Factory for the CLI (``lbi_fx.models.transformer:build``): (model, (idx,)), fx-traceable."""
    return _build(
        False, n_layer, n_embd, n_head, block_size, batch, seq, tie_weights, dropout, seed
    )


def build_export(
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    block_size: int = 64,
    batch: int = 2,
    seq: int = 32,
    tie_weights: bool = True,
    dropout: float = 0.0,
    seed: int = 0,
) -> tuple[GPT, tuple[torch.Tensor]]:
    """Like :func:`build` but with the explicit-mask attention that needs torch.export."""
    return _build(True, n_layer, n_embd, n_head, block_size, batch, seq, tie_weights, dropout, seed)
