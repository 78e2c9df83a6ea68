"""A strict harness: gradient_parity judges every tensor, not one global number; ``ok`` and
``assert_close`` agree; the printed report says what was judged. State dicts carry the
interface layout, so weights of another pool / segment layout / encoder are refused."""

from __future__ import annotations

import warnings

import pytest
import torch

import lbi_fx
from lbi_fx.errors import CheckpointError
from lbi_fx.models.transformer import build
from lbi_fx.testing import default_loss, gradient_parity

SMALL = "layers.0.attn.c_attn.bias"  # ~2e-5 of the gradient norm under the default loss


def _gpt(dtype: torch.dtype = torch.float32, **kw):
    torch.manual_seed(0)  # interface modules draw from the global RNG
    model, (idx,) = build(n_layer=2, n_embd=16, n_head=2, batch=2, seq=8, seed=0)
    lbi = lbi_fx.transform(model.to(dtype), lbi_fx.every(1, "layers"), rank=4,
                           example_inputs=(idx,), **kw)
    return lbi, idx


@pytest.fixture(scope="module")
def gpts():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {dt: _gpt(dt) for dt in (torch.float32, torch.float64)}


def _off(lbi, name: str, factor: float):
    """The autograd reference of ``name`` scaled by 1 / factor: scan is then ``factor - 1``
    off it. (The reference side, because a parameter hook also fires inside the scan's
    own VJPs.)"""
    p = dict(lbi.named_parameters())[name]
    return p.register_hook(lambda g: g / factor if lbi.backward == "autograd" else None)


@pytest.mark.parametrize("name, rtol", [(SMALL, None), ("layers.0.ln_2.bias", 1e-6)])
def test_small_tensor_35_percent_wrong_is_caught(gpts, name, rtol):
    """One small tensor 35% wrong: the global rel-l2 stays within rtol (the old verdict),
    the per-tensor check fails it by >10x."""
    lbi, idx = gpts[torch.float32]
    h = _off(lbi, name, 1.35)
    try:
        report = gradient_parity(lbi, (idx,), rel_l2=rtol)  # the old name of rtol
    finally:
        h.remove()
    tol = report.tol_rel_l2
    assert report.rel_l2 <= tol, f"global {report.rel_l2:.2e}"  # a global-only check passes
    assert not report.ok, str(report)
    with pytest.raises(AssertionError, match=rf"tensor\(s\) over rtol.*{name}"):
        report.assert_close()
    assert tol == (1e-5 if rtol is None else rtol)
    bad = next(t for t in report.tensors if t.name == name)
    numbers = f"global rel_l2 {report.rel_l2:.2e}, {name} rel {bad.rel:.2e}, rtol {tol:.0e}"
    assert bad.rel > 10 * tol, numbers          # the per-tensor check fails it by >10x
    assert abs(bad.plain_rel - 0.35) < 1e-4 and report.worst[0][0] == name, numbers


class _ZeroUnderScan(torch.nn.Module):
    """Stands in for an LBI module whose scan gives an unused parameter a zero gradient
    where autograd gives it none."""

    def __init__(self):
        super().__init__()
        self.lin, self.spare = torch.nn.Linear(4, 3).double(), torch.nn.Parameter(torch.ones(2))
        self.backward = "scan"

    def lbi_verify(self, **_):
        raise NotImplementedError

    def forward(self, x):
        y = self.lin(x)
        return y + 0 * self.spare.sum() if self.backward == "scan" else y


def test_none_vs_zero_gradient_fails():
    report = gradient_parity(_ZeroUnderScan(), (torch.randn(5, 4, dtype=torch.float64),))
    assert report.extra == ["spare"] and report.rel_l2 == 0, report
    assert not report.complete and not report.ok
    assert "no grad under autograd: ['spare']" in str(report)
    with pytest.raises(AssertionError, match="a scan gradient but none under autograd"):
        report.assert_close()


def _reports(gpts) -> dict:
    out = {}
    for dt, (lbi, idx) in gpts.items():
        out[f"{dt} clean"] = gradient_parity(lbi, (idx,))
        for factor in (1 + 1e-8, 1 + 3e-6, 1.35):  # fp64 rounding < 1e-8 < fp32 tolerance
            h = _off(lbi, "layers.1.mlp.c_fc.weight", factor)
            try:
                out[f"{dt} x{factor}"] = gradient_parity(lbi, (idx,))
            finally:
                h.remove()
    return out


def test_ok_agrees_with_assert_close(gpts):
    reports = _reports(gpts)
    verdicts = {}
    for key, r in reports.items():
        try:
            r.assert_close()
            raised = False
        except AssertionError:
            raised = True
        assert r.ok == (not raised), (key, str(r))
        verdicts[key] = r.ok
    # dtype defaults: fp64 1e-10 catches a 1e-8 error, fp32 1e-5 lets it through
    assert verdicts == {"torch.float32 clean": True, "torch.float32 x1.00000001": True,
                        "torch.float32 x1.000003": True, "torch.float32 x1.35": False,
                        "torch.float64 clean": True, "torch.float64 x1.00000001": False,
                        "torch.float64 x1.000003": False, "torch.float64 x1.35": False}, verdicts
    r = reports["torch.float64 x1.00000001"]
    assert (r.tol_rel_l2, r.dtype) == (1e-10, "float64")
    r.assert_close(rel_l2=1e-6)  # explicit tolerances still override
    r.assert_close(rtol=1e-6)
    assert reports["torch.float32 clean"].tol_rel_l2 == 1e-5
    lbi, idx = gpts[torch.float64]
    assert gradient_parity(lbi, (idx,), rtol=1e-6, cosine=0.5).tol_rel_l2 == 1e-6


def test_report_prints_verdict_tolerances_losses_and_worst(gpts):
    lbi, idx = gpts[torch.float32]
    h = _off(lbi, SMALL, 1.35)
    try:
        report = gradient_parity(lbi, (idx,))
    finally:
        h.remove()
    text = str(report)
    assert "ok=False" in text and "rtol 1.0e-05" in text and "cosine >= 0.999999" in text, text
    assert f"autograd {report.loss!r}, scan {report.loss_scan!r}" in text, text
    assert f"rel_l2 {report.rel_l2:.3e}" in text and f"{SMALL} {report.tensor_rel:.2e}" in text
    assert "ok=True" in str(gradient_parity(lbi, (idx,)))


# -- state dicts carry the interface layout ------------------------------------------------

def _lm(**kw):
    """K = 2, rank 4, sequence 32: pool/segment variants with the same tensor shapes."""
    torch.manual_seed(0)
    model, (idx,) = build(n_layer=2, n_embd=16, n_head=2, block_size=32, batch=2, seq=32, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lbi_fx.CausalityWarning)
        return lbi_fx.transform(model, [["layers.0"], ["layers.1"]], rank=4,
                                example_inputs=(idx,), jacobian="reuse", **kw)


@pytest.fixture(scope="module")
def layouts():
    return {"causal16": _lm(pool="causal", segment_len=16),
            "causal8": _lm(pool="causal", segment_len=8),
            "mean": _lm(pool="mean"), "last": _lm(pool="last"),
            "linear": _lm(pool="causal", segment_len=16, encoder="linear")}


@pytest.mark.parametrize("into, field, saved, now", [
    ("causal8", "segment layout", "2 segments of 16 positions, max_len 32",
     "4 segments of 8 positions, max_len 32"),
    ("mean", "pool", "'causal'", "'mean'"),
    ("linear", "encoder kind", "'mlp'", "'linear'"),
])
def test_state_dict_of_another_layout_is_refused(layouts, into, field, saved, now):
    sd = layouts["causal16"].state_dict()
    user = {k for k in sd if not k.startswith("lbi.")}
    assert user == {k for k in layouts["mean"].state_dict() if not k.startswith("lbi.")}
    with pytest.raises(CheckpointError, match=(f"{field}: the state dict has {saved}, this "
                                               f"model {now}.*pool='causal', segment_len=16")):
        layouts[into].load_state_dict(sd)


def test_same_shapes_other_pool_refused_and_same_layout_loads(layouts):
    """mean and last have identical tensors: only the record tells them apart."""
    sd = layouts["mean"].state_dict()
    assert {k: v.shape for k, v in sd.items() if torch.is_tensor(v)} == {
        k: v.shape for k, v in layouts["last"].state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(CheckpointError, match="pool: the state dict has 'mean', this model 'last'"):
        layouts["last"].load_state_dict(sd)
    fresh = _lm(pool="causal", segment_len=16)
    fresh.load_state_dict(layouts["causal16"].state_dict())
    x = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(fresh(x), layouts["causal16"](x), rtol=0, atol=0)


def test_state_dict_without_a_record_loads_with_a_warning(layouts):
    """State dicts saved before the record existed still load (strict), and say so."""
    sd = layouts["causal16"].state_dict()
    assert sd["lbi._extra_state"]["pool"] == "causal"
    del sd["lbi._extra_state"]
    with pytest.warns(UserWarning, match="not checked"):
        _lm(pool="causal", segment_len=16).load_state_dict(sd)


def _partition(regions):
    torch.manual_seed(0)
    model, (idx,) = build(n_layer=4, n_embd=16, n_head=2, block_size=16, batch=2, seq=16, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lbi_fx.transform(model, regions, rank=4, example_inputs=(idx,), pool="causal",
                                segment_len=8, jacobian="reuse"), idx


def test_state_dict_of_another_region_partition_is_refused_by_name():
    """Regions (1, 3) and (2, 2) of four blocks: the same keys and shapes, other meanings
    (issue 35 item 3). The record names the regions; the same partition still loads."""
    one_three, idx = _partition([["layers.0"], ["layers.1", "layers.2", "layers.3"]])
    two_two, _ = _partition([["layers.0", "layers.1"], ["layers.2", "layers.3"]])
    sd = one_three.state_dict()
    assert {k: v.shape for k, v in sd.items() if torch.is_tensor(v)} == {
        k: v.shape for k, v in two_two.state_dict().items() if torch.is_tensor(v)}
    assert sd["lbi._extra_state"]["regions"] == [["layers.0"],
                                                 ["layers.1", "layers.2", "layers.3"]]
    with pytest.raises(CheckpointError, match=(
            r"regions: the state dict has \[\['layers.0'\], \['layers.1', 'layers.2', "
            r"'layers.3'\]\], this model \[\['layers.0', 'layers.1'\], \['layers.2', "
            r"'layers.3'\]\].*transform\(\.\.\., regions=\[\['layers.0'\]")):
        two_two.load_state_dict(sd)
    same, _ = _partition([["layers.0"], ["layers.1", "layers.2", "layers.3"]])
    same.load_state_dict(sd)
    torch.testing.assert_close(same(idx), one_three(idx), rtol=0, atol=0)


def test_state_dict_of_another_interface_norm_is_refused_by_name():
    """rms and layer norms: strict=False would load the shared weights silently."""
    a, _ = _partition([["layers.0"], ["layers.1", "layers.2", "layers.3"]])
    torch.manual_seed(0)
    model, (idx,) = build(n_layer=4, n_embd=16, n_head=2, block_size=16, batch=2, seq=16, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = lbi_fx.transform(model, [["layers.0"], ["layers.1", "layers.2", "layers.3"]],
                             rank=4, example_inputs=(idx,), pool="causal", segment_len=8,
                             jacobian="reuse", interface_norm="rms")
    with pytest.raises(CheckpointError, match="interface norm: the state dict has 'rms', "
                                              "this model 'layer'.*interface_norm='rms'"):
        a.load_state_dict(b.state_dict(), strict=False)


# -- the fp32 verdict: a float64 oracle per tensor ------------------------------------------

def test_fp32_whole_weight_one_tenth_percent_off_fails_rounding_passes(gpts):
    """A whole weight matrix 1.001x its true gradient (issue 35 item 5): the old rule's
    per-tensor floor let it through in fp32; the float64 oracle fails it, by name, while
    the clean model (rounding only) passes."""
    name = "layers.0.mlp.c_fc.weight"  # 1.2e-4 of the gradient's norm
    lbi, idx = gpts[torch.float32]
    clean = gradient_parity(lbi, (idx,))
    assert clean.ok and clean.reference == "float64", str(clean)
    assert "float64 oracle" in str(clean)
    p = dict(lbi.named_parameters())[name]  # the scan's side 1.001x (hooks are linear)
    h = p.register_hook(lambda g: g * 1.001 if lbi.backward == "scan" else None)
    try:
        report = gradient_parity(lbi, (idx,))
        old = gradient_parity(lbi, (idx,), reference="none")
    finally:
        h.remove()
    assert old.ok and old.reference == "none", str(old)  # the rtol rules alone pass it
    assert not report.ok, str(report)
    with pytest.raises(AssertionError, match=rf"further from the float64 reference.*{name}"):
        report.assert_close(rtol=1e-3)  # a looser rtol does not loosen the oracle
    bad = next(t for t in report.tensors if t.name == name)
    assert bad.err64 > 100 * bad.autograd_err64, bad
    assert all(t.oracle_ok for t in clean.tensors)


@pytest.mark.parametrize("loss_fn, why", [
    (lambda out: default_loss(out) if out.dtype == torch.float32 else 1 / 0, "does not run"),
    (lambda out: default_loss(out) * (1 if out.dtype == torch.float32 else 2), "from the float64"),
])
def test_fp32_oracle_falls_back_with_a_note_where_float64_is_no_reference(gpts, loss_fn, why):
    """A float64 copy that fails, or that autograd fp32 disagrees with beyond rounding:
    no oracle, the rtol verdict, and a note saying why."""
    lbi, idx = gpts[torch.float32]
    report = gradient_parity(lbi, (idx,), loss_fn)
    assert report.reference == "none" and report.ok, str(report)
    assert any("no float64 oracle" in n and why in n for n in report.notes), report.notes
    with pytest.raises(lbi_fx.LBIError, match="reference='fp64'"):
        gradient_parity(lbi, (idx,), reference="fp64")


def test_cosine_bound_binds_where_a_loose_rtol_would_pass(gpts):
    """One weight's gradient flipped in sign: within rtol=10 everywhere, but the cosine
    bound a caller asks for still fails it (the mutant that drops the cosine check)."""
    lbi, idx = gpts[torch.float64]
    h = _off(lbi, "lbi.enc_in.net.2.bias", -1.0)  # a third of the gradient norm
    try:
        report = gradient_parity(lbi, (idx,), rtol=10.0, cosine=0.999999)
    finally:
        h.remove()
    assert report.rel_l2 <= 10.0 and report.tensor_rel <= 10.0, str(report)
    assert report.cosine < 0.999999 and not report.ok, str(report)
    with pytest.raises(AssertionError, match="cosine"):
        report.assert_close()
