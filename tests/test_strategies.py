"""Jacobian strategies (reuse, forward, recompute, auto): all exact, dropout included."""

from __future__ import annotations

import json

import pytest
import torch

import lbi_fx
from examples.transformer import build
from lbi_fx.testing import gradient_parity
from tests.test_rewrite import LongSkip, _idx

TOL = {torch.float64: dict(rel_l2=1e-12, cosine=1 - 1e-12),
       torch.float32: dict(rel_l2=1e-6, cosine=0.999999)}
STRATEGIES = [("reuse", None), ("forward", None), ("recompute", None), ("recompute", 3),
              ("recompute", 1), ("auto", None)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("strategy,chunk", STRATEGIES)
def test_strategies_exact_with_dropout(strategy, chunk, dtype):
    # dropout > 0 in training puts attention on the math path, which has forward-mode rules
    model, (idx,) = build(n_layer=4, n_embd=16, n_head=2, batch=3, seq=8, dropout=0.2)
    model = model.to(dtype).train()
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=5, example_inputs=(idx,),
                           jacobian=strategy, chunk=chunk)
    for seed in (0, 1):
        gradient_parity(lbi, (idx,), seed=seed).assert_close(**TOL[dtype])


@pytest.mark.parametrize("strategy,chunk", STRATEGIES)
def test_strategies_exact_long_skip(strategy, chunk):
    idx = _idx()
    lbi = lbi_fx.transform(LongSkip().double(), lbi_fx.every(1, "blocks"), rank=4,
                           example_inputs=(idx,), jacobian=strategy, chunk=chunk)
    gradient_parity(lbi, (idx,)).assert_close(**TOL[torch.float64])


def test_forward_mode_refused_where_an_op_has_no_rule_and_auto_falls_back():
    model, (idx,) = build(n_layer=2, n_embd=16, n_head=2, seq=8)  # eval: CPU flash attention
    with pytest.raises(lbi_fx.RewriteError, match="region 0.*forward AD"):
        lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=4, example_inputs=(idx,),
                         jacobian="forward")
    lbi = lbi_fx.transform(model.double(), lbi_fx.every(1, "layers"), rank=4,
                           example_inputs=(idx,), jacobian="auto")
    assert lbi._jacobian_choice == {0: "reuse"}  # probed once at transform time
    gradient_parity(lbi, (idx,)).assert_close(**TOL[torch.float64])


def test_auto_can_pick_forward_mode():
    idx = _idx()
    lbi = lbi_fx.transform(LongSkip(), lbi_fx.every(1, "blocks"), rank=4, example_inputs=(idx,))
    assert set(lbi._jacobian_choice) == {0, 1, 2}
    assert set(lbi._jacobian_choice.values()) <= {"forward", "reuse"}


def test_recompute_keeps_no_region_graph():
    """recompute's forward keeps m_k, statics and the RNG state, not activations."""
    from tests.models import backward_states

    model, (idx,) = build(n_layer=3, n_embd=16, n_head=2, seq=8)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=4, example_inputs=(idx,),
                           jacobian="recompute", chunk=2)
    caches = backward_states(lbi, idx)[0].caches
    assert all(not c.kept and c.outs[0].grad_fn is None for c in caches)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "4", True])
def test_chunk_and_strategy_validation(bad):
    model, (idx,) = build(n_layer=2, n_embd=16, n_head=2, seq=8)
    with pytest.raises(lbi_fx.InputError, match="chunk"):
        lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=4, example_inputs=(idx,),
                         jacobian="recompute", chunk=bad)
    with pytest.raises(lbi_fx.InputError, match="jacobian"):
        lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=4, example_inputs=(idx,),
                         jacobian="fastest")


def test_bench_step_json(capsys):
    from lbi_fx.cli import main

    assert main(["bench", "step", "--model", "transformer", "--rank", "4", "--layers", "4",
                 "--width", "16", "--batch", "2", "--seq", "8", "--steps", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("strategy", "eta", "step_ratio", "scan_share", "peak_memory_ratio",
                "span_parallel_s", "jacobian_s", "local_s"):
        assert key in out
    assert out["strategy"].startswith("auto") and len(out["jacobian_s"]) == 1
    assert out["eta"] > 0 and 0 < out["scan_share"] < 1 and out["peak_memory_autograd"] > 0
