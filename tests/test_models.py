"""The example models ship in the package (issue 17): ``lbi_fx.models:gpt`` / ``:mamba2`` /
``:hybrid`` are CLI factories, and the model files stay importable as modules."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import lbi_fx
from lbi_fx.cli import load_factory


@pytest.mark.parametrize("name", ["gpt", "mamba2", "hybrid"])
def test_factory_returns_model_and_inputs_the_cli_accepts(name):
    model, example = load_factory(f"lbi_fx.models:{name}")
    assert isinstance(model, nn.Module) and isinstance(example, tuple)
    (idx,) = example
    assert idx.dtype == torch.long and model(idx).shape == (*idx.shape, 256)


def test_factories_take_the_build_keywords():
    model, (idx,) = lbi_fx.models.mamba2(n_layer=2, seq=8, batch=3)
    assert len(model.layers) == 2 and idx.shape == (3, 8)


def test_model_files_stay_modules_when_the_factory_has_their_name():
    # `def mamba2()` in lbi_fx/models/__init__.py would shadow the submodule: the module
    # itself is the factory instead, so both spellings work.
    import lbi_fx.models.hybrid as hybrid_module
    import lbi_fx.models.mamba2 as mamba2_module

    assert mamba2_module is importlib.import_module("lbi_fx.models.mamba2")
    assert hybrid_module is importlib.import_module("lbi_fx.models.hybrid")
    assert callable(mamba2_module) and hasattr(mamba2_module, "Mamba2Mixer")
    a, _ = mamba2_module(n_layer=2, seq=8)
    b, _ = mamba2_module.build(n_layer=2, seq=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_corpus_needs_no_repository(tmp_path, monkeypatch):
    from lbi_fx.models.data import load_corpus

    monkeypatch.chdir(tmp_path)  # the stdlib sources it reads are found from any folder
    corpus = load_corpus(max_bytes=200_000)
    assert corpus.train.numel() + corpus.val.numel() > 190_000
    assert corpus.train_files and corpus.val_files
