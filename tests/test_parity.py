"""Gradient parity: scan backward vs plain autograd on the same LBI module.

The grid of the rewrite issue: K in {2,3,6}, r in {3,4,16} (r = 1, 2 give constant
interfaces and are refused), region sizes 1-3, batch 1 and 4, tied and untied
embeddings, dropout on and off, fp64 and fp32. Every (K, r, dtype) cell runs; the other
axes are cycled so each value appears with each K.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import lbi_fx
from lbi_fx.models.transformer import build
from lbi_fx.testing import default_loss, gradient_parity

TOL = {torch.float64: dict(rel_l2=1e-12, cosine=1 - 1e-12),
       torch.float32: dict(cosine=0.999999)}  # fp32: the default rtol 1e-5, per tensor too
GLOBAL = {torch.float64: 1e-12, torch.float32: 1e-6}  # the whole gradient vector, tighter

CELLS = list(itertools.product([2, 3, 6], [3, 4, 16]))  # r < 3: LayerNorm carries nothing
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
    assert report.rel_l2 <= GLOBAL[dtype], str(report)
    assert report.n_params == sum(1 for p in lbi.parameters() if p.requires_grad)


# Rank lists with a causal pool (issue 35 item 9): interfaces of different widths make a
# causal encoder truncate (r_k > r_{k+1}) or zero-pad (r_k < r_{k+1}) the residual m_k, and
# row 0 of m_{k+1} (``first_row``, the Jacobian's head rows) must cut the same end.
RANK_LISTS = [[6, 4, 3], [3, 6, 4], [4, 4, 6]]


@pytest.mark.parametrize("jacobian", ["reuse", "recompute"])
@pytest.mark.parametrize("ranks", RANK_LISTS, ids=lambda r: "-".join(map(str, r)))
def test_parity_rank_lists_with_a_causal_pool(ranks, jacobian):
    model, (idx,) = build(n_layer=4, n_embd=16, n_head=2, batch=2, seq=8, seed=1)
    torch.manual_seed(0)
    lbi = lbi_fx.transform(model.double(), lbi_fx.every(1, "layers"), rank=ranks,
                           example_inputs=(idx,), pool="causal", segment_len=2,
                           jacobian=jacobian)
    assert lbi.pool == "causal" and lbi.rank_per_row == ranks and lbi.segments.count == 4
    report = gradient_parity(lbi, (idx,))
    report.assert_close(**TOL[torch.float64])
    assert report.rel_l2 <= GLOBAL[torch.float64], str(report)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_dropout_changes_gradients_but_stays_exact(dtype):
    """Dropout is live (two seeds give different grads) and each seed is exact."""
    model, (idx,) = build(n_layer=4, n_embd=16, n_head=2, batch=4, seq=8, dropout=0.3)
    model = model.to(dtype).train()
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,))
    a = gradient_parity(lbi, (idx,), seed=1)
    b = gradient_parity(lbi, (idx,), seed=2)
    for rep in (a, b):
        rep.assert_close(**TOL[dtype])
        assert rep.rel_l2 <= GLOBAL[dtype], str(rep)
    ga, gb = _scan_grads(lbi, idx, seed=1), _scan_grads(lbi, idx, seed=2)
    for name in ("layers.0.mlp.c_fc.weight", "layers.3.attn.c_attn.weight"):  # both regions
        rel = float((ga[name] - gb[name]).norm() / ga[name].norm())
        assert rel > 1e-2, f"{name}: dropout masks of two seeds change its gradient by {rel:.1e}"


def _scan_grads(lbi, idx, seed: int) -> dict:
    named = [(n, p) for n, p in lbi.named_parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grads = torch.autograd.grad(default_loss(lbi(idx)), [p for _, p in named])
    return {n: g for (n, _), g in zip(named, grads)}


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
    assert report.complete and not report.ok  # ok means "within tolerance", not "complete"


class _Faulty(torch.nn.Module):
    """Stands in for an LBI module whose "scan" mode is wrong in one chosen place only."""

    def __init__(self, fault: str):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3).double()
        self.fault, self.backward = fault, "scan"

    def lbi_verify(self, **_):
        raise NotImplementedError

    def forward(self, x):
        if self.backward == "scan" and self.fault == "input":
            x = _ScaleGrad.apply(x)  # same value, input gradient off by 1e-3
        y = self.lin(x)
        return y + 1e-3 if self.backward == "scan" and self.fault == "loss" else y


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * (1 + 1e-3)


def _linear_loss(y):  # parameter gradients do not see a constant shift of y
    return (y * torch.arange(1.0, 4.0, dtype=y.dtype)).sum()


@pytest.mark.parametrize("fault", ["input", "loss"])
def test_parity_compares_input_gradients_and_losses(fault):
    """A wrong input gradient or a different loss (same parameter gradients) fails."""
    x = torch.randn(5, 4, dtype=torch.float64)
    report = gradient_parity(_Faulty(fault), (x,), _linear_loss)
    assert report.n_params == 2 and report.n_inputs == 1
    assert not report.ok, report
    with pytest.raises(AssertionError, match="input 0" if fault == "input" else "loss"):
        report.assert_close(**TOL[torch.float64])
    assert gradient_parity(_Faulty("none"), (x,), _linear_loss).ok


class _Unused(torch.nn.Module):
    """Stands in for an LBI module where one mode gives a parameter no gradient at all."""

    def __init__(self, mode_without: str):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3).double()
        self.mode_without, self.backward = mode_without, "scan"

    def lbi_verify(self, **_):
        raise NotImplementedError

    def forward(self, x):
        bias = self.lin.bias.detach() if self.backward == self.mode_without else self.lin.bias
        return torch.nn.functional.linear(x, self.lin.weight, bias)


@pytest.mark.parametrize("mode_without, field, words", [
    ("scan", "missing", "none under scan"), ("autograd", "extra", "none under autograd")])
def test_parity_lists_a_tensor_one_mode_gives_no_gradient(mode_without, field, words):
    """Issue 35 item 9: a tensor with a gradient under one mode only is listed by name and
    fails the verdict, though every gradient both modes give agrees."""
    x = torch.randn(5, 4, dtype=torch.float64)
    report = gradient_parity(_Unused(mode_without), (x,), _linear_loss)
    assert getattr(report, field) == ["lin.bias"], str(report)
    assert not report.ok and not report.complete, str(report)
    with pytest.raises(AssertionError, match=rf"{words}: \['lin.bias'\]"):
        report.assert_close()
    assert report.rel_l2 == 0.0  # what both modes give is identical
