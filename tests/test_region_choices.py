"""Per-region choices of the scan backward (issue 16): one ``RegionChoices`` object per
module, cleared when dtype, device or train/eval mode change; fallbacks a failure forced
are reported once per region and cause (``FallbackWarning``) and listed by ``explain()``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lbi_fx.kernels import TritonFallbackWarning

import lbi_fx
from lbi_fx.testing import gradient_parity
from tests.test_bad_inputs import net, x64
from tests.test_bad_inputs import transform as tf
from tests.test_rewrite import Opaque, OpaqueNet, _idx

FP64 = dict(rel_l2=1e-12, cosine=1 - 1e-12)


def _fallbacks(fn):
    """Run ``fn``; return its result and the FallbackWarnings it raised (every one)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in seen if issubclass(w.category, lbi_fx.FallbackWarning)]


def _transform(model, **kw):
    """``lbi_fx.transform`` of a test_bad_inputs model with its warnings left visible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return lbi_fx.transform(model, lbi_fx.every(1, "blocks"), 3, example_inputs=(x64(),),
                                **kw)


def _step(lbi) -> None:
    lbi(x64().to(next(lbi.parameters()).dtype)).sum().backward()


def test_the_backward_reads_and_writes_the_modules_choices():
    """ChainState's dicts are the module's ``region_choices``, not copies."""
    from tests.models import backward_states

    lbi = tf(net())
    choices = lbi.region_choices
    assert choices.jacobian.keys() == {0, 1} and choices.probe_runs == 2  # at transform
    state = backward_states(lbi, x64())[-1]
    assert state.choices is choices
    assert state.choice is choices.jacobian and state.batched_ok is choices.batched
    assert lbi._jacobian_choice is choices.jacobian and lbi._batched_ok is choices.batched


@pytest.mark.parametrize("change", [
    lambda m: m.float(), lambda m: m.to(torch.float32), lambda m: m.half(),
    lambda m: m.eval(), lambda m: m.train(False),
], ids=["float", "to-float32", "half", "eval", "train-false"])
def test_dtype_and_mode_changes_clear_the_choices(change):
    lbi = tf(net())  # fp64, training mode
    assert lbi.region_choices.jacobian and lbi.region_choices.probes
    change(lbi)
    assert not lbi.region_choices.jacobian and not lbi.region_choices.batched
    assert not lbi.region_choices.probes


@pytest.mark.parametrize("change, again", [
    (lambda m: m.float(), lambda m: m.double()),
    (lambda m: m.eval(), lambda m: m.train()),
], ids=["float-then-double", "eval-then-train"])
def test_the_probe_runs_again_after_a_change_and_stays_exact(change, again):
    lbi = tf(net())
    runs = lbi.region_choices.probe_runs
    _step(lbi)
    assert lbi.region_choices.probe_runs == runs  # no change: the choice is kept
    for fn in (change, again):
        fn(lbi)
        _step(lbi)
        runs += lbi.num_regions - 1
        assert lbi.region_choices.probe_runs == runs and lbi.region_choices.jacobian.keys() == {0, 1}
    gradient_parity(lbi, (x64(),)).assert_close(**FP64)


@pytest.mark.parametrize("same", [lambda m: m.double(), lambda m: m.to("cpu"),
                                  lambda m: m.train()], ids=["double", "to-cpu", "train"])
def test_a_change_to_the_same_state_keeps_the_choices(same):
    lbi = tf(net())
    before = dict(lbi.region_choices.jacobian)
    same(lbi)
    assert lbi.region_choices.jacobian == before and before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_clears_the_choices():
    lbi = tf(net())
    lbi.cuda()
    assert not lbi.region_choices.jacobian


def test_an_op_without_forward_or_batching_rule_is_explained_not_warned():
    """A custom autograd.Function with neither a jvp nor a vmap rule: auto's forward-mode
    probe and its batched-VJP probe fail in regions 0 and 1. Auto chooses per-row VJPs by
    design (issue 25): no FallbackWarning, at transform or later; explain() names both
    findings per region."""
    idx = _idx(vocab=10)
    lbi, said = _fallbacks(lambda: lbi_fx.transform(
        OpaqueNet().double(), lbi_fx.every(1, "blocks"), rank=3, example_inputs=(idx,),
        leaf_modules=[Opaque]))
    assert said == []
    _, again = _fallbacks(lambda: [lbi(idx).sum().backward() for _ in range(2)])
    assert again == []
    runs = lbi.region_choices.probe_runs
    _, again = _fallbacks(lambda: [(lbi.eval(), lbi.train(), lbi(idx).sum().backward())
                                   for _ in range(2)])
    assert again == [] and lbi.region_choices.probe_runs == runs + 4  # probed, not repeated
    text = str(lbi.explain())
    assert text.count("auto's probe: forward-mode Jacobian") == 2 and "autograd.Function" in text
    assert text.count("auto's probe: batched VJPs") == 2 and "Batching rule" in text
    assert "fallback:" not in text
    rows = lbi.explain()
    assert [r.vjps for r in rows] == ["per-row", "per-row", "-"]
    assert [r.jacobian for r in rows] == ["reuse", "reuse", "-"]
    assert "forward unsupported" in rows[0].why and "reuse-rows" in rows[0].why
    assert not rows[0].fallbacks and set(rows[0].unsupported) == {"forward", "reuse-batched"}
    gradient_parity(lbi, (idx,)).assert_close(**FP64)


def test_batched_vjps_failing_where_asked_for_warn_once_per_model():
    """jacobian="reuse" asks for batched VJPs: where they fail the backward runs r per-row
    VJPs, a cost the user did not choose: one FallbackWarning for the model (not one per
    region), none at later steps; explain() lists it for both regions."""
    idx = _idx(vocab=10)
    lbi, said = _fallbacks(lambda: lbi_fx.transform(
        OpaqueNet().double(), lbi_fx.every(1, "blocks"), rank=3, example_inputs=(idx,),
        leaf_modules=[Opaque], jacobian="reuse"))
    assert len(said) == 1 and said[0].startswith("lbi-fx: region 0: batched VJPs"), said
    assert "per-row" in said[0] and "Batching rule" in said[0] and "lbi.explain()" in said[0]
    _, again = _fallbacks(lambda: [(lbi.eval(), lbi.train(), lbi(idx).sum().backward())
                                   for _ in range(2)])
    assert again == []
    assert str(lbi.explain()).count("fallback: batched VJPs") == 2


def oom_in_batched_vjps(monkeypatch) -> None:
    """Batched VJPs raise CUDA out-of-memory; per-row VJPs work (a real fallback)."""
    real = torch.autograd.grad

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)


def test_out_of_memory_in_batched_vjps_switches_to_rows_with_one_warning(monkeypatch):
    """A RuntimeError in batched VJPs (here a simulated CUDA out-of-memory) moves the
    region to per-row VJPs for good: said once, listed by explain(), still exact."""
    oom_in_batched_vjps(monkeypatch)
    lbi, said = _fallbacks(lambda: _transform(net(), jacobian="reuse"))
    assert lbi.region_choices.batched == {0: False, 1: False}
    assert len(said) == 1 and all("OutOfMemoryError: CUDA out of memory" in m
                                  and "per-row VJPs from now on" in m for m in said), said
    _, again = _fallbacks(lambda: _step(lbi))
    assert again == []
    rows = lbi.explain()
    assert [(r.jacobian, r.why, r.vjps) for r in rows[:2]] == [("reuse", "asked", "per-row")] * 2
    assert "OutOfMemoryError" in rows[1].fallbacks["reuse-batched"]
    gradient_parity(lbi, (x64(),)).assert_close(**FP64)


def test_explain_lists_every_region():
    lbi = tf(net(), rank=[3, 4], jacobian="recompute")
    rows = lbi.explain()
    assert [(r.region, r.modules, r.width_in, r.width_out) for r in rows] == [
        (0, ["blocks.0"], 3, 3), (1, ["blocks.1"], 3, 4), (2, ["blocks.2"], 4, None)]
    assert [(r.jacobian, r.why, r.vjps) for r in rows[:2]] == [("recompute", "asked", "-")] * 2
    text = str(rows)
    assert text.startswith("LBIModule: 3 regions, interfaces of rank [3, 4] x 1 segment = "
                           "[3, 4] scalars per sample") and "scan backend" in text
    auto = tf(net()).explain()
    assert all("picked by auto's probe: forward" in r.why and " ms" in r.why for r in auto[:2])
    assert all(r.vjps in ("batched", "per-row", "-") for r in auto)


def test_triton_asked_for_in_fp64_warns_inside_a_full_backward():
    """backend='triton' has no float64 kernel: the LBI backward says which scan runs."""
    lbi = tf(net(), scan_backend="triton")
    with pytest.warns(TritonFallbackWarning, match="no float64 kernel"):
        _step(lbi)
    gradient_parity(lbi, (x64(),)).assert_close(**FP64)


def test_a_loaded_module_decides_afresh():
    """torch.load may put the tensors on another device without ``.to()``: the saved
    choices are not carried over; the first backward after loading probes again."""
    import io

    lbi = tf(net())
    buf = io.BytesIO()
    torch.save(lbi, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert lbi.region_choices.jacobian and not back.region_choices.jacobian
    _step(back)
    assert back.region_choices.probe_runs == back.num_regions - 1
    assert back.region_choices.jacobian.keys() == {0, 1}


def test_fallback_warning_points_at_the_callers_line():
    """The warning names the user's line (here: the transform call), not lbi-fx's runtime
    or the generated backward program."""
    idx = _idx(vocab=10)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lbi_fx.transform(OpaqueNet().double(), lbi_fx.every(1, "blocks"), rank=3,
                         example_inputs=(idx,), leaf_modules=[Opaque], jacobian="reuse")
    ours = [w for w in seen if issubclass(w.category, lbi_fx.FallbackWarning)]
    assert ours and {w.filename for w in ours} == {__file__}, [w.filename for w in ours]
