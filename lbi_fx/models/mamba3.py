"""A byte-level Mamba-3 (SISO) language model on mamba-ssm's kernels. GPU only.

Mamba-3 (``mamba_ssm.modules.mamba3.Mamba3``, in recent mamba-ssm releases) has no
pure-PyTorch path here: its SISO scan is a Triton kernel (Hopper TMA) that runs on CUDA
and computes in bfloat16 internally whatever the parameter dtype. So this module imports
mamba-ssm lazily and :func:`build` raises a clear ``RuntimeError`` without CUDA or
without ``mamba_ssm.modules.mamba3``. The blocks are the pre-norm residual blocks and LM
wrapper of :mod:`lbi_fx.models.mamba2`; transform with ``leaf_modules=leaf_modules(model)``
so each ``Mamba3`` stays one opaque node.
"""

from __future__ import annotations

import torch

from lbi_fx.models.mamba2 import LM, Mamba2Config, MambaBlock, leaf_modules, rng_devices

__all__ = ["available", "build", "leaf_modules", "mamba3_class"]


def mamba3_class() -> type:
    """``mamba_ssm.modules.mamba3.Mamba3``, or a ``RuntimeError`` saying what is missing."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "lbi_fx.models.mamba3 needs a CUDA device: Mamba-3's SISO scan exists only as "
            "mamba-ssm's Triton kernel (use lbi_fx.models.mamba2 on CPU)")
    try:
        from mamba_ssm.modules.mamba3 import Mamba3
    except ImportError as exc:
        raise RuntimeError(
            "lbi_fx.models.mamba3 needs mamba-ssm with Mamba-3 (mamba_ssm.modules.mamba3), "
            f"which did not import: {exc}. Install a recent mamba-ssm built for this CUDA "
            "(pip install mamba-ssm --no-build-isolation)") from exc
    return Mamba3


def available() -> bool:
    """True when :func:`build` can run here (CUDA and mamba-ssm's Mamba-3)."""
    try:
        mamba3_class()
    except RuntimeError:
        return False
    return True


def build(
    n_layer: int = 4,
    d_model: int = 128,
    d_state: int = 64,
    headdim: int = 64,
    expand: int = 2,
    chunk_size: int = 64,
    batch: int = 2,
    seq: int = 64,
    tie_weights: bool = True,
    seed: int = 0,
    device: str = "cuda",
) -> tuple[LM, tuple[torch.Tensor]]:
    """Factory (``lbi_fx.models.mamba3:build``): (model, (idx,)) on ``device`` (CUDA).

    The kernel wants power-of-two ``d_state`` and ``headdim``.
    """
    Mamba3 = mamba3_class()
    if torch.device(device).type != "cuda":
        raise RuntimeError(f"lbi_fx.models.mamba3 runs on CUDA only, got device={device!r}")
    cfg = Mamba2Config(n_layer=n_layer, d_model=d_model, d_state=d_state, headdim=headdim,
                       expand=expand, chunk_size=chunk_size, tie_weights=tie_weights)
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        layers = [
            MambaBlock(cfg, Mamba3(d_model, d_state=d_state, expand=expand, headdim=headdim,
                                   chunk_size=chunk_size, is_mimo=False, layer_idx=i,
                                   device=device))
            for i in range(n_layer)
        ]
        model = LM(cfg, layers).to(device)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    return model, (idx,)
