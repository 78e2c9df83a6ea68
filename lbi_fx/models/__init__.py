"""Example models that ship with lbi-fx, so the CLI, benches and parity table work from an
installed package: a GPT, a pure-PyTorch Mamba-2 (SSD) LM and a Mamba-2/attention hybrid.

Each factory returns ``(model, example_inputs)``, the shape ``lbi-fx verify`` expects::

    lbi-fx verify lbi_fx.models:gpt --regions layers:2 --rank 16

Keyword arguments go to the model file's ``build`` (sizes, ``batch``, ``seq``, ``seed``).

``mamba2`` and ``hybrid`` are both the factory and the model file: a plain function of that
name would replace the submodule attribute, so ``import lbi_fx.models.mamba2 as m`` would
hand back the function. Instead the submodules are made callable (calling one calls its
``build``), and ``lbi_fx.models.mamba2.Mamba2Mixer`` and ``lbi_fx.models.mamba2()`` both work.
"""

from __future__ import annotations

import types

import torch.nn as nn

from lbi_fx.models import hybrid, mamba2, transformer
from lbi_fx.models.transformer import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "gpt", "hybrid", "mamba2"]


class _FactoryModule(types.ModuleType):
    """A model file that is also its factory: ``module(**kw)`` is ``module.build(**kw)``."""

    def __call__(self, **kwargs) -> tuple[nn.Module, tuple]:
        return self.build(**kwargs)


for _module in (hybrid, mamba2):
    _module.__class__ = _FactoryModule


def gpt(**kwargs) -> tuple[nn.Module, tuple]:
    """A 4-layer GPT (fx-traceable); see :func:`lbi_fx.models.transformer.build`."""
    return transformer.build(**kwargs)
