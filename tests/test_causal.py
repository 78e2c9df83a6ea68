"""Causal interfaces (pool="causal"), the causality audit, leak-free scoring, interface
spectra and whole-module save/load."""

from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lbi_fx
from lbi_fx.causality import causal_leak
from lbi_fx.interfaces import Segments, prefix_pool, spread
from lbi_fx.models.transformer import GPT, GPTConfig, build
from lbi_fx.testing import gradient_parity, prefix_loss


def gpt(n_layer=4, n_embd=32, seq=16, batch=2, dropout=0.0, seed=0):
    return build(n_layer=n_layer, n_embd=n_embd, seq=seq, batch=batch, block_size=64,
                 dropout=dropout, seed=seed)


class Bidirectional(nn.Module):
    """An encoder whose attention sees every position: not causal along axis 1."""

    def __init__(self, n_layer=4, d=16):
        super().__init__()
        self.emb = nn.Embedding(32, d)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 2, 32, 0.0, batch_first=True)
                                    for _ in range(n_layer))
        self.head = nn.Linear(d, 32)

    def forward(self, idx):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def no_causality_warning(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    assert not [w for w in caught if issubclass(w.category, lbi_fx.CausalityWarning)]
    return out


# -- the layout -------------------------------------------------------------------------

def test_prefix_pool_rows_see_only_earlier_segments():
    seg = Segments.make(10, 3)  # S = 4 segments: [0,3) [3,6) [6,9) [9,12)
    assert (seg.count, seg.length) == (4, 3)
    x = torch.randn(2, 10, 5, dtype=torch.float64)
    rows = prefix_pool(x, seg)
    assert torch.equal(rows[:, 0], torch.zeros(2, 5, dtype=torch.float64))
    for s in range(1, 4):
        torch.testing.assert_close(rows[:, s], x[:, : min(3 * s, 10)].mean(1))
    # a shorter input sees the same (absolute) segments
    torch.testing.assert_close(prefix_pool(x[:, :7], seg)[:, :3], rows[:, :3])
    d = torch.arange(4.0).reshape(1, 4, 1)
    assert spread(d, 10, seg).flatten().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_segments_refuse_bad_sizes():
    with pytest.raises(lbi_fx.InputError, match="segment_len"):
        Segments.make(16, 0)
    with pytest.raises(lbi_fx.InputError, match="max_len"):
        Segments.make(0)
    with pytest.raises(lbi_fx.InputError, match="max_len=16"):
        Segments.make(16).check(17)


# -- the default on a causal model ------------------------------------------------------

def test_default_on_a_causal_gpt_is_causal_and_leaks_nothing():
    model, ex = gpt()
    lbi = no_causality_warning(
        lambda: lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(2, "layers"), rank=4,
                                 example_inputs=ex))
    assert lbi.pool == "causal" and lbi.model_causal is True
    assert lbi.segments == Segments(4, 4, 16) and lbi.ranks == [16]
    assert causal_leak(lbi, ex) <= 1e-6
    # earlier logits unchanged when later tokens change, position by position
    x = ex[0].clone()
    y = x.clone()
    y[:, 9:] = (y[:, 9:] + 7) % 256
    with torch.no_grad():
        a, b = lbi(x), lbi(y)
    assert (a[:, :9] - b[:, :9]).abs().max() <= 1e-6 * a.abs().max()
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # and later ones do change


def test_explicit_leaky_pool_on_a_causal_model_warns_and_leaks():
    model, ex = gpt()
    for pool in ("mean", "last"):
        with pytest.warns(lbi_fx.CausalityWarning, match=f"pool='{pool}'"):
            lbi = lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(2, "layers"), rank=4,
                                   example_inputs=ex, pool=pool)
        assert lbi.pool == pool and lbi.ranks == [4]
        assert causal_leak(lbi, ex) > 1e-4


def test_bidirectional_encoder_gets_mean_without_a_warning():
    torch.manual_seed(0)
    model = Bidirectional().eval()
    ex = (torch.randint(0, 32, (2, 12)),)
    assert causal_leak(model, ex) > 1e-3
    lbi = no_causality_warning(
        lambda: lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=ex))
    assert lbi.pool == "mean" and lbi.model_causal is False and lbi.segments is None


def test_causal_layout_refused_by_name_without_a_sequence_axis():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, x):
            x = self.inp(x)
            for lin in self.layers:
                x = torch.tanh(lin(x))
            return x

    ex = (torch.randn(3, 6),)
    with pytest.raises(lbi_fx.RewriteError, match="no sequence axis"):
        lbi_fx.transform(MLP(), lbi_fx.every(1, "layers"), rank=3, example_inputs=ex,
                         pool="causal")
    lbi = lbi_fx.transform(MLP(), lbi_fx.every(1, "layers"), rank=3, example_inputs=ex)
    assert lbi.pool == "mean"


def test_pool_arguments_are_checked():
    model, ex = gpt(n_layer=2)
    with pytest.raises(lbi_fx.InputError, match="pool="):
        lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=3, example_inputs=ex, pool="max")
    with pytest.raises(lbi_fx.InputError, match="segment_len"):
        lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=3, example_inputs=ex,
                         pool="mean", segment_len=4)


# -- exact gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("regions,rank,segment_len,max_len", [
    (2, 4, None, None),     # K = 2, S = 4 (default)
    (1, 3, 5, None),        # K = 4, S = ceil(16 / 5) = 4, last segment partial
    (1, 3, 2, 20),          # K = 4, S = 10, max_len beyond the example
])
def test_causal_interface_gradients_equal_autograd(dtype, tol, regions, rank, segment_len,
                                                   max_len):
    model, ex = gpt(dropout=0.1)
    y = torch.randint(0, 256, ex[0].shape)
    lbi = lbi_fx.transform(model, lbi_fx.every(regions, "layers"), rank=rank, example_inputs=ex,
                           pool="causal", segment_len=segment_len, max_len=max_len).to(dtype)

    def loss(logits):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    rep = gradient_parity(lbi, ex, loss)
    rep.assert_close(rel_l2=tol, cosine=1 - tol)
    assert not rep.missing and not rep.extra
    # a sequence shorter than the example (same absolute segments) is exact too
    rep = gradient_parity(lbi, (ex[0][:, :11],), lambda out: out.double().pow(2).mean())
    rep.assert_close(rel_l2=tol, cosine=1 - tol)


@pytest.mark.parametrize("jacobian", ["reuse", "recompute", "auto"])
def test_causal_interface_under_every_jacobian_strategy(jacobian):
    model, ex = gpt(dropout=0.1)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=3, example_inputs=ex,
                           pool="causal", jacobian=jacobian).double()
    gradient_parity(lbi, ex).assert_close(rel_l2=1e-10, cosine=1 - 1e-10)


def test_inputs_longer_than_max_len_are_refused_by_name():
    model, ex = gpt()
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=ex)
    with pytest.raises(lbi_fx.InputError, match="max_len=16"):
        lbi(torch.randint(0, 256, (2, 17)))


def test_shorter_inputs_score_like_the_prefix_of_longer_ones():
    model, ex = gpt()
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=ex)
    with torch.no_grad():
        full = lbi(ex[0])
        for t in (1, 5, 8, 13):
            torch.testing.assert_close(lbi(ex[0][:, :t]), full[:, :t], rtol=1e-5, atol=1e-6)


# -- the audit ----------------------------------------------------------------------------

def test_verify_reports_causality_for_dense_and_lbi_models():
    model, ex = gpt()
    dense = lbi_fx.verify(model, lbi_fx.every(2, "layers"), example_inputs=ex)
    assert dense.causality.model_causal is True and dense.causality.lbi_causal is None
    assert dense.causality.leaks == []
    causal = lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(2, "layers"), rank=4,
                              example_inputs=ex)
    rep = lbi_fx.verify(causal, example_inputs=ex)
    assert rep.ok and rep.causality.lbi_causal is True and rep.causality.leaks == []
    assert [b.min_cut_scalars for b in rep.boundaries] == [16]  # S x r = 4 x 4
    with pytest.warns(lbi_fx.CausalityWarning):
        mean = lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(2, "layers"), rank=4,
                                example_inputs=ex, pool="mean")
    rep = lbi_fx.verify(mean, example_inputs=ex)
    assert rep.causality.model_causal is True and rep.causality.lbi_causal is False
    assert rep.causality.leaks == ["lbi.enc_in", "lbi.enc_0"]
    data = json.loads(rep.to_json())
    assert data["causality"]["model_causal"] is True
    assert data["causality"]["lbi_causal"] is False
    assert data["causality"]["leaks"] == ["lbi.enc_in", "lbi.enc_0"]
    assert "LBI causal: NO" in str(rep) and "lbi.enc_in" in str(rep)


def test_verify_cli_prints_causality(capsys):
    from lbi_fx.cli import main

    assert main(["verify", "lbi_fx.models:gpt", "--regions", "layers:2", "--json"]) in (0, 1)
    data = json.loads(capsys.readouterr().out)
    assert data["causality"]["model_causal"] is True and data["causality"]["lbi_causal"] is None
    main(["verify", "lbi_fx.models:gpt", "--regions", "layers:2", "--rank", "16"])
    assert "model causal: yes" in capsys.readouterr().out


def test_causal_leak_and_prefix_loss():
    model, ex = gpt(n_layer=2)
    model.eval()
    assert causal_leak(model, ex) == 0.0
    assert lbi_fx.testing.causal_leak(model, ex) == 0.0
    y = torch.randint(0, 256, ex[0].shape)
    with torch.no_grad():
        one = float(F.cross_entropy(model(ex[0]).flatten(0, 1), y.flatten()))
    assert prefix_loss(model, ex[0], y) == pytest.approx(one, rel=1e-5)
    # a model that reads the future: its leak-free loss differs from the one-forward loss
    torch.manual_seed(0)
    bi = Bidirectional(n_layer=1).eval()
    xb, yb = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        one = float(F.cross_entropy(bi(xb).flatten(0, 1), yb.flatten()))
    assert abs(prefix_loss(bi, xb, yb) - one) > 1e-4
    with pytest.raises(lbi_fx.InputError, match="sequence axis"):
        causal_leak(nn.Linear(4, 4), (torch.randn(2, 4),))


# -- spectra ------------------------------------------------------------------------------

def test_spectra_come_from_the_last_backward():
    model, ex = gpt()
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=3, example_inputs=ex).double()
    lbi._record = {}
    with pytest.raises(lbi_fx.InputError, match="scan backward"):
        lbi.spectra()
    lbi(ex[0]).pow(2).mean().backward()
    spec = lbi.spectra()
    assert [s["boundary"] for s in spec] == [1, 2, 3]
    assert all(s["rank"] == 12 for s in spec)
    for s in spec:
        assert 0 < s["jac_fro_rms"] <= s["jac_spectral"] + 1e-12
    # P_{K-2} = J_{K-2}^T, and suffix products are submultiplicative
    assert spec[-1]["suffix_spectral"] == pytest.approx(spec[-1]["jac_spectral"], rel=1e-9)
    J = [lbi._record["J"][k] for k in range(3)]
    P0 = J[0].transpose(1, 2) @ J[1].transpose(1, 2) @ J[2].transpose(1, 2)
    torch.testing.assert_close(lbi._record["P"][:, 0], P0)
    # the Jacobian the backward used is the true dm_1/dm_0 of region 0
    rgm = lbi.programs["regions"][0]
    spec_prog = lbi._programs_spec.regions[0]
    env = {}
    with torch.no_grad():
        flat = lbi._flatten(ex, {})
        env.update(zip(lbi._programs_spec.prologue.outputs, lbi.programs["prologue"](*flat)))
    m0_name, m1_name = lbi._programs_spec.m_nodes[:2]

    def region0(m0):
        env[m0_name] = m0
        out = rgm(*[env[n] for n in spec_prog.inputs])
        return out[spec_prog.outputs.index(m1_name)]

    jac = torch.autograd.functional.jacobian(region0, env[m0_name].detach().clone())
    jac = torch.stack([jac[b, :, b] for b in range(2)])
    torch.testing.assert_close(J[0], jac)


# -- save / load --------------------------------------------------------------------------

def test_torch_save_and_load_of_a_whole_transformed_model():
    model, ex = gpt(n_layer=2)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=3, example_inputs=ex)
    lbi(ex[0]).sum().backward()  # built programs and a recorded backward must not block saving
    buf = io.BytesIO()
    torch.save(lbi, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back.pool == "causal" and back.segments == lbi.segments
    with torch.no_grad():
        torch.testing.assert_close(back(ex[0]), lbi(ex[0]), rtol=0, atol=0)
    for m in (lbi, back):
        m.zero_grad(set_to_none=True)
        m(ex[0]).pow(2).mean().backward()
    for (n, a), (_, b) in zip(lbi.named_parameters(), back.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=n)
    fresh = lbi_fx.transform(GPT(GPTConfig(block_size=64, n_layer=2, n_embd=32)),
                             lbi_fx.every(1, "layers"), rank=3, example_inputs=ex)
    fresh.load_state_dict(back.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ex[0]), lbi(ex[0]), rtol=0, atol=0)


# -- the quality table --------------------------------------------------------------------

def test_quality_command_scores_every_variant_leak_free(capsys, tmp_path):
    from lbi_fx.cli import main

    png = tmp_path / "quality.png"
    assert main(["quality", "--quick", "--steps", "3", "--layers", "4", "--width", "16",
                 "--seq", "16", "--batch", "4", "--json", "--no-progress", "--plot",
                 str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["layers"], r["pool"], r["rank"], r["segments"], r["decoder_init"])
            for r in rows] == [
        ("dense", 4, None, None, None, None), ("dense", 2, None, None, None, None),
        ("lbi", 4, "mean", 16, 1, "default"), ("lbi", 4, "last", 16, 1, "default"),
        ("lbi", 4, "causal", 4, 4, "default"), ("lbi", 4, "causal", 4, 4, "zero"),
        ("spl", 4, None, None, None, None)]
    keys = {"model", "pool", "rank", "segments", "scalars", "ce", "ce_leak_free",
            "bpb_leak_free", "steps", "step_ratio", "depth_recovery", "spread", "seeds"}
    assert all(keys <= set(r) for r in rows)
    assert all(r["scalars"] == 16 for r in rows[2:6]) and rows[0]["step_ratio"] == 1.0
    # dense, causal and SPL models score the same with and without the future
    for r in (rows[0], rows[1], rows[4], rows[5], rows[6]):
        assert abs(r["ce_leak_free"] - r["ce"]) <= 2e-4
    deep, shallow = rows[0]["ce_leak_free"], rows[1]["ce_leak_free"]
    for r in rows:  # the recovery column is what it says, where depth buys anything
        if shallow > deep:
            assert r["depth_recovery"] == pytest.approx((shallow - r["ce_leak_free"])
                                                        / (shallow - deep), abs=2e-3)
        else:
            assert r["depth_recovery"] is None
    for r in rows:
        assert r["bpb_leak_free"] == pytest.approx(r["ce_leak_free"] / 0.6931471805599453,
                                                   abs=1e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_causal_interface_jacobians_are_block_lower_triangular():
    """m_{k+1}[s] reads positions before segment s, which read rows <= s of m_k: the
    Jacobian the backward builds has no block above the diagonal, and row block 0 (an
    empty prefix) depends on m_k[0] alone."""
    model, ex = gpt()
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=3, example_inputs=ex).double()
    lbi(ex[0]).pow(2).mean().backward()
    S, r = lbi.segments.count, 3
    assert lbi._head_rows(0, None)["head"] == r  # row block 0 is taken from the encoder alone
    for k, jac in lbi._record["J"].items():
        blocks = jac.reshape(jac.shape[0], S, r, S, r)
        for s in range(S):
            for t in range(S):
                size = float(blocks[:, s, :, t].abs().max())
                if t > s:
                    assert size == 0.0, (k, s, t)
                elif t < s and s > 0:
                    assert size > 0.0, (k, s, t)  # earlier segments do reach later rows
        assert float(blocks[:, 0, :, 1:].abs().max()) == 0.0


def test_summary_refused_where_auto_chooses_the_mean_pool():
    """summary= shapes causal segments: on a model auto gives pool='mean' it is refused by
    name, never silently dropped."""
    torch.manual_seed(0)
    model = Bidirectional().eval()
    ex = (torch.randint(0, 32, (2, 12)),)
    with pytest.raises(lbi_fx.InputError, match="summary='latest'.*chose 'mean'"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=ex,
                         summary="latest")


class _EvenCutLeak(torch.nn.Module):
    """Output t (odd) reads input t + 1: a leak only a cut at an even position shows."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        nxt = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)
        odd = (torch.arange(x.shape[1]) % 2 == 1).to(x.dtype)[None, :, None]
        return self.lin(x + odd * nxt)


def test_the_causal_probe_checks_every_cut():
    """Issue 35 item 9: a probe over odd cuts only calls this model causal."""
    from lbi_fx.causality import causal_leak, probe_causal

    x = torch.randn(2, 8, 3)
    model = _EvenCutLeak()
    assert causal_leak(model, (x,), cuts=[1, 3, 5, 7]) == 0.0  # odd cuts see nothing
    assert causal_leak(model, (x,)) > 1e-3
    causal, leak, _ = probe_causal(model, (x,))
    assert causal is False and leak > 1e-3
