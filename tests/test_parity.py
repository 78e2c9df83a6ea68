"""Gradient parity: scan backward vs plain autograd on the same LBI module.

The grid of the rewrite issue: K in {2,3,6}, r in {1,4,16}, region sizes 1-3, batch 1
and 4, tied and untied embeddings, dropout on and off, fp64 and fp32. Every (K, r,
dtype) cell runs; the other axes are cycled so each value appears with each K.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import lbi_fx
from examples.transformer import build
from lbi_fx.testing import gradient_parity

TOL = {torch.float64: dict(rel_l2=1e-12, cosine=1 - 1e-12),
       torch.float32: dict(rel_l2=1e-6, cosine=0.999999)}

CELLS = list(itertools.product([2, 3, 6], [1, 4, 16]))
OTHER = list(itertools.product([1, 2, 3], [1, 4], [True, False], [0.0, 0.1]))


def _case(i: int):
    size, batch, tie, drop = OTHER[(i * 5) % len(OTHER)]
    return size, batch, tie, drop


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cell", range(len(CELLS)))
def test_parity_grid(cell, dtype):
    K, r = CELLS[cell]
    size, batch, tie, drop = _case(cell + (dtype == torch.float32) * 3)
    if K == 6:
        size = min(size, 2)  # keep the suite fast: 12 layers at most
    model, (idx,) = build(n_layer=K * size, n_embd=16, n_head=2, batch=batch, seq=8,
                          tie_weights=tie, dropout=drop, seed=cell)
    model = model.to(dtype).train(drop > 0)
    lbi = lbi_fx.transform(model, lbi_fx.every(size, "layers"), rank=r, example_inputs=(idx,))
    assert lbi.num_regions == K
    report = gradient_parity(lbi, (idx,), seed=cell)
    report.assert_close(**TOL[dtype])
    assert report.n_params == sum(1 for p in lbi.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_dropout_changes_gradients_but_stays_exact(dtype):
    """Dropout is live (two seeds give different grads) and each seed is exact."""
    model, (idx,) = build(n_layer=4, n_embd=16, n_head=2, batch=4, seq=8, dropout=0.3)
    model = model.to(dtype).train()
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,))
    a = gradient_parity(lbi, (idx,), seed=1)
    b = gradient_parity(lbi, (idx,), seed=2)
    a.assert_close(**TOL[dtype])
    b.assert_close(**TOL[dtype])
    assert a.loss != b.loss


def test_parity_detects_a_wrong_gradient():
    """The harness itself can fail: corrupt one Jacobian and parity must break."""
    from lbi_fx import runtime

    model, (idx,) = build(n_layer=3, n_embd=16, n_head=2, batch=2, seq=8)
    lbi = lbi_fx.transform(model.double(), lbi_fx.every(1, "layers"), rank=4,
                           example_inputs=(idx,))
    good = runtime.region_jacobian

    def bad(state, k):
        return good(state, k) * (1.0 + 1e-3)

    runtime.region_jacobian = bad
    try:
        lbi._compiled = None  # rebuild the backward graph with the corrupted op
        report = gradient_parity(lbi, (idx,))
    finally:
        runtime.region_jacobian = good
        lbi._compiled = None
    with pytest.raises(AssertionError):
        report.assert_close(**TOL[torch.float64])
