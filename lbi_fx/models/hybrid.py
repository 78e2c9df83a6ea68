"""A byte-level hybrid language model: Mamba-2 blocks with an attention block in every group.

The stack repeats groups of ``period`` layers, ``period - 1`` Mamba-2 blocks then one
attention block (3 + 1 by default, as in the paper's hybrid backend). The Mamba-2 blocks
and the LM wrapper come from :mod:`lbi_fx.models.mamba2`; the attention block is the GPT
block of :mod:`lbi_fx.models.transformer` (pre-norm causal self-attention + MLP). There is no
position table: the SSM blocks are causal recurrences and give positions to the
attention that follows them.

On CPU the whole model is fx-traceable; with mamba-ssm on CUDA transform it with
``leaf_modules=leaf_modules(model)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lbi_fx.models.mamba2 import (
    LM,
    Mamba2Config,
    MambaBlock,
    leaf_modules,
    make_mixer,
    resolve_backend,
    rng_devices,
)
from lbi_fx.models.transformer import Block, GPTConfig

__all__ = ["build", "hybrid_layers", "leaf_modules"]


def hybrid_layers(cfg: Mamba2Config, n_head: int, period: int = 4, dropout: float = 0.0,
                  use_mamba_ssm: bool = False, device=None) -> list[nn.Module]:
    """``cfg.n_layer`` blocks: layer i is attention when ``(i + 1) % period == 0``."""
    attn_cfg = GPTConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=n_head,
                         n_embd=cfg.d_model, dropout=dropout)
    layers: list[nn.Module] = []
    for i in range(cfg.n_layer):
        if (i + 1) % period == 0:
            layers.append(Block(attn_cfg).to(device))
        else:
            layers.append(MambaBlock(cfg, make_mixer(cfg, use_mamba_ssm, device)).to(device))
    return layers


def build(
    n_layer: int = 4,
    d_model: int = 64,
    n_head: int = 4,
    period: int = 4,
    d_state: int = 16,
    headdim: int = 16,
    expand: int = 2,
    chunk_size: int = 64,
    batch: int = 2,
    seq: int = 32,
    tie_weights: bool = True,
    seed: int = 0,
    device: str = "cpu",
    backend: str = "auto",
) -> tuple[LM, tuple[torch.Tensor]]:
    """Factory for the CLI (``lbi_fx.models.hybrid:build``): (model, (idx,))."""
    cfg = Mamba2Config(n_layer=n_layer, d_model=d_model, d_state=d_state, headdim=headdim,
                       expand=expand, chunk_size=chunk_size, tie_weights=tie_weights)
    use_ssm = resolve_backend(backend, device)
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        layers = hybrid_layers(cfg, n_head, period, use_mamba_ssm=use_ssm, device=device)
        model = LM(cfg, layers).to(device)
        # GPT-2 init for the attention blocks (N(0, 0.02), zero biases, scaled c_proj).
        for block in model.layers:
            if isinstance(block, Block):
                for name, p in block.named_parameters():
                    if p.dim() == 2:
                        std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith("c_proj.weight") else 0.02
                        nn.init.normal_(p, std=std)
                    elif name.endswith("bias"):
                        nn.init.zeros_(p)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    return model, (idx,)
