"""Jacobian strategies (reuse, forward, recompute, auto): all exact, dropout included."""

from __future__ import annotations

import json
import types

import pytest
import torch

import lbi_fx
from lbi_fx import runtime
from lbi_fx.models.transformer import build
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


@pytest.mark.parametrize("cost, picked, batched", [
    ({"forward": 3, "batched": 1, "rows": 2}, "reuse", True),
    ({"forward": 1, "batched": 2, "rows": 3}, "forward", None),
    ({"forward": 3, "batched": 2, "rows": 1}, "reuse", False),
    ({"forward": 1, "batched": 2, "rows": 3, "first call": 10}, "forward", None),
], ids=["batched-fastest", "forward-fastest", "rows-fastest", "forward-warm-up"])
def test_auto_keeps_the_fastest_strategy_that_works(cost, picked, batched, monkeypatch):
    """The probe times forward mode, batched VJPs and per-row VJPs per region and keeps
    the fastest. Costs here are on a virtual clock; "first call" is a one-off set-up
    cost of the first call of a strategy (real forward mode pays seconds), which must
    not decide region 0's choice."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(runtime, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    real, seen = dict(runtime._JACOBIANS), set()

    def priced(name):
        def jac(state, k):
            kind = name if name == "forward" else (
                "batched" if state.batched_ok.get(k, True) else "rows")
            clock.now += cost[kind] + (cost.get("first call", 0) if kind not in seen else 0)
            seen.add(kind)
            return real[name](state, k)
        return jac

    for name in ("forward", "reuse"):
        monkeypatch.setitem(runtime._JACOBIANS, name, priced(name))
    idx = _idx()
    lbi = lbi_fx.transform(LongSkip(), lbi_fx.every(1, "blocks"), rank=4, example_inputs=(idx,))
    assert lbi._jacobian_choice == {0: picked, 1: picked, 2: picked}
    if batched is not None:
        assert lbi._batched_ok == {0: batched, 1: batched, 2: batched}
    gradient_parity(lbi, (idx,)).assert_close(**TOL[torch.float32])


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
    # the figures are what their definitions say, from the times reported beside them
    # (one step: every time is that step's, so phases must fit inside their pass)
    close = lambda a, b: a == pytest.approx(b, rel=1e-9)  # noqa: E731
    assert close(out["step_ratio"], (out["lbi_forward_s"] + out["lbi_backward_s"])
                 / (out["autograd_forward_s"] + out["autograd_backward_s"]))
    assert close(out["eta"], sum(out["jacobian_s"]) / (out["rank"] * sum(out["forward_region_s"])))
    assert close(out["peak_memory_ratio"], out["peak_memory_lbi"] / out["peak_memory_autograd"])
    assert close(out["span_parallel_s"], max(out["jacobian_s"]) + out["scan_s"]
                 + max(out["local_s"] + [out["seed_s"]]))
    assert sum(out["jacobian_s"]) + out["seed_s"] + sum(out["local_s"]) < out["lbi_backward_s"]
    assert sum(out["forward_region_s"]) < out["lbi_forward_s"]
