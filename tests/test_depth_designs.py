"""Interface designs meant to keep depth (issue #23): each is exact (scan vs autograd,
per parameter, fp64 and fp32) and leak-free (causal audit over every cut)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import lbi_fx
from lbi_fx.causality import causal_leak
from lbi_fx.models import transformer
from lbi_fx.testing import gradient_parity


def _gpt(dtype):
    model, (idx,) = transformer.build(n_layer=6, n_embd=16, n_head=2, block_size=16, seq=16,
                                      batch=2)
    return model.to(dtype), idx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_zero_init_decoders_are_exact_and_leak_free(dtype):
    model, idx = _gpt(dtype)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                           decoder_init="zero")
    with torch.no_grad():  # move off the zero start, so the scan has something to carry
        for n, p in lbi.named_parameters():
            if n.startswith("lbi.dec_"):
                p.add_(0.05 * torch.randn_like(p))
    report = gradient_parity(lbi, (idx,))
    assert report.ok, str(report)
    assert lbi.pool == "causal"
    assert causal_leak(lbi, (idx,), cuts=range(1, idx.shape[1])) == 0.0


def test_zero_init_decoders_start_as_the_last_region_alone():
    """Dec_k(m) = 0 at init: the LBI model is then its last region on the raw canvas, i.e.
    the dense model at the depth of one region (same weights)."""
    model, idx = _gpt(torch.float64)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                           decoder_init="zero")
    shallow = copy.deepcopy(model)
    shallow.layers = nn.ModuleList(list(shallow.layers)[4:])
    with torch.no_grad():
        torch.testing.assert_close(lbi(idx), shallow(idx), rtol=1e-12, atol=1e-12)
    default = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,))
    with torch.no_grad():
        assert not torch.allclose(default(idx), shallow(idx), atol=1e-6)


def test_unknown_decoder_init_is_refused():
    model, idx = _gpt(torch.float64)
    with pytest.raises(lbi_fx.InputError, match="decoder_init"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                         decoder_init="ones")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("norm, rank", [("rms", 2), ("none", 1), ("none", 4)])
def test_interface_norms_are_exact_and_leak_free(norm, rank, dtype):
    """RMSNorm keeps r - 1 of a row's scalars, no norm all r: both stay exact and causal,
    down to the smallest rank each admits."""
    model, idx = _gpt(dtype)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=rank, example_inputs=(idx,),
                           interface_norm=norm)
    from lbi_fx.interfaces import InterfaceEncoder

    encoders = [m for m in lbi.modules() if isinstance(m, InterfaceEncoder)]
    assert encoders and all(e.norm_kind == norm for e in encoders)
    want = nn.RMSNorm if norm == "rms" else nn.Identity
    assert all(isinstance(e.norm, want) for e in encoders)
    report = gradient_parity(lbi, (idx,))
    assert report.ok, str(report)
    assert causal_leak(lbi, (idx,), cuts=range(1, idx.shape[1])) == 0.0


def test_interface_norm_degrees_of_freedom():
    """What each norm leaves of a row of r scalars: the rank of d m_1 / d (encoder input)
    is r - 2 (LayerNorm), r - 1 (RMSNorm), r (none), up to the norms' eps (~1e-5 of
    the other singular values: below rtol 1e-3)."""
    from lbi_fx.interfaces import InterfaceEncoder

    torch.manual_seed(0)
    r, d = 5, 8
    for norm, dof in (("layer", r - 2), ("rms", r - 1), ("none", r)):
        enc = InterfaceEncoder([d], r, 16, pool="mean", residual=False, norm=norm).double()
        x = torch.randn(1, 3, d, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(functools.partial(enc, None), x).reshape(r, -1)
        assert int(torch.linalg.matrix_rank(J, rtol=1e-3)) == dof, norm


def test_interface_norm_ranks_are_checked():
    model, idx = _gpt(torch.float64)
    with pytest.raises(lbi_fx.InputError, match="interface_norm"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                         interface_norm="batch")
    with pytest.raises(lbi_fx.InputError, match="RMSNorm"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=1, example_inputs=(idx,),
                         interface_norm="rms")
    with pytest.raises(lbi_fx.InputError, match="interface_norm='rms'"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=2, example_inputs=(idx,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("summary, segment_len", [("recent", 4), ("recent", 3), ("latest", 3)])
def test_recent_summaries_are_exact_and_leak_free(summary, segment_len, dtype):
    """segment_len 3: a last segment past the input's end."""
    model, idx = _gpt(dtype)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                           summary=summary, segment_len=segment_len)
    from lbi_fx.interfaces import InterfaceEncoder

    encoders = [m for m in lbi.modules() if isinstance(m, InterfaceEncoder)]
    assert encoders and all(e.summary == summary for e in encoders)
    # the prefix mean plus segment_len positions (recent) or one (latest) per crossing tensor
    per_row = 1 + (segment_len if summary == "recent" else 1)
    assert all(e.net_in == sum(e.in_features) * per_row for e in encoders)
    report = gradient_parity(lbi, (idx,))
    assert report.ok, str(report)
    assert causal_leak(lbi, (idx,), cuts=range(1, idx.shape[1])) == 0.0
    short = idx[:, :11]  # a shorter input sees a prefix of the same segments
    assert causal_leak(lbi, (short,), cuts=range(1, short.shape[1])) == 0.0


def test_recent_segment_reads_the_previous_segment_position_by_position():
    from lbi_fx.interfaces import Segments, causal_summary, recent_segment

    seg = Segments.make(6, 2)  # 3 segments of 2 positions
    x = torch.arange(1.0, 7.0).reshape(1, 6, 1)
    rows = recent_segment(x, seg)
    assert rows.tolist() == [[[0.0, 0.0], [1.0, 2.0], [3.0, 4.0]]]
    both = causal_summary(x, seg, "recent")
    assert both[0, :, 0].tolist() == [0.0, 1.5, 2.5]  # the prefix means come first
    assert torch.equal(both[..., 1:], rows)
    latest = causal_summary(x, seg, "latest")
    assert latest[0].tolist() == [[0.0, 0.0], [1.5, 2.0], [2.5, 4.0]]
    assert recent_segment(x[:, :5], seg)[0, 2].tolist() == [3.0, 4.0]


def test_recent_summary_is_refused_without_causal_segments():
    model, idx = _gpt(torch.float64)
    with pytest.raises(lbi_fx.InputError, match="summary"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                         summary="newest")
    with pytest.raises(lbi_fx.InputError, match="pool='mean'"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                         summary="recent", pool="mean")


def test_a_checkpoint_names_a_summary_mismatch():
    model, idx = _gpt(torch.float64)
    recent = lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(2, "layers"), rank=4,
                              example_inputs=(idx,), summary="recent")
    prefix = lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(2, "layers"), rank=4,
                              example_inputs=(idx,))
    with pytest.raises(lbi_fx.LBIError, match="summary='recent'"):
        prefix.load_state_dict(recent.state_dict())


def test_quality_flags_for_the_designs_refuse_bad_values(tmp_path):
    """--norms, --canvas-weights, --summaries and --reuse-dense name the bad value before any training."""
    import json

    from lbi_fx.cli import quality

    with pytest.raises(lbi_fx.InputError, match="'batch' is not one of layer, rms, none"):
        quality.main(["--quick", "--norms", "layer,batch"])
    with pytest.raises(lbi_fx.InputError, match="'tied' is not one of shared, per_region"):
        quality.main(["--quick", "--canvas-weights", "tied"])
    with pytest.raises(lbi_fx.InputError, match="'last' is not one of prefix, latest, recent"):
        quality.main(["--quick", "--summaries", "recent,last"])
    with pytest.raises(lbi_fx.InputError, match="--interface-lrs '1,-3'"):
        quality.main(["--quick", "--interface-lrs", "1,-3"])
    with pytest.raises(lbi_fx.InputError, match="cannot read a JSON table"):
        quality.main(["--quick", "--reuse-dense", str(tmp_path / "missing.json")])
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"model": "dense", "name": "dense", "steps": 6000, "seeds": 1}]))
    with pytest.raises(lbi_fx.InputError, match="has steps 6000, this run 30"):
        quality.main(["--quick", "--reuse-dense", str(other)])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(lbi_fx.InputError, match="no dense rows"):
        quality.main(["--quick", "--reuse-dense", str(empty)])


def test_reused_dense_rows_stand_in_for_training_them(tmp_path):
    """A table built with --reuse-dense carries the given dense rows verbatim (marked
    reused) and scores depth recovery against them."""
    from lbi_fx.cli.quality import Config, run_table

    cfg = Config.quick()
    cfg.steps, cfg.eval_every, cfg.leaky, cfg.designs, cfg.spl, cfg.ranks = 2, 2, False, False, False, (4,)
    fake = {"dense": dict(model="dense", name="dense", ce=3.0, ce_leak_free=3.0, step_ms=10.0),
            "dense 2 layers": dict(model="dense", name="dense 2 layers", ce=4.0,
                                   ce_leak_free=4.0, step_ms=5.0)}
    cfg.reuse_dense = fake
    rows, _ = run_table(cfg, progress=False)
    assert [r["name"] for r in rows[:2]] == ["dense", "dense 2 layers"]
    assert rows[0]["reused"] and rows[1]["reused"]
    lbi = rows[-1]
    assert lbi["model"] == "lbi" and "reused" not in lbi
    assert lbi["depth_recovery"] == pytest.approx((4.0 - lbi["ce_leak_free"]) / 1.0, abs=1e-3)


def test_quality_rows_use_a_fixed_jacobian_strategy():
    """auto picks a strategy by timing, which would make two runs of one seed differ."""
    from lbi_fx.cli.quality import Config, Variant, build
    from lbi_fx.models.transformer import GPT, GPTConfig

    cfg = Config.quick()
    dense = GPT(GPTConfig(block_size=cfg.seq, n_layer=cfg.layers, n_head=cfg.heads,
                          n_embd=cfg.width))
    example = (torch.randint(0, 256, (2, cfg.seq)),)
    lbi = build(cfg, Variant("causal", 4, 4), dense, example)
    assert cfg.jacobian != "auto" and lbi.jacobian == cfg.jacobian


def test_interface_lr_factor_reaches_the_interface_modules_only():
    from lbi_fx.cli.quality import Config, variants

    rows = variants((16,), 32, 4, 2, leaky=False, designs=False, spl=False, ranks=(4,),
                    interface_lrs=(1.0, 3.0))
    assert [v.interface_lr for v in rows if v.pool == "causal"] == [1.0, 3.0]
    assert rows[-1].name.endswith("interface lr x3")
    cfg = Config.quick()
    cfg.steps, cfg.eval_every, cfg.leaky, cfg.designs, cfg.spl, cfg.ranks = 1, 1, False, False, False, (4,)
    seen = []
    real = torch.optim.AdamW

    def spy(groups, **kw):
        seen.append([(len(g["params"]), g["lr"]) for g in groups])
        return real(groups, **kw)

    import unittest.mock

    cfg.interface_lrs = (3.0,)
    with unittest.mock.patch("torch.optim.AdamW", spy):
        from lbi_fx.cli.quality import run_table

        run_table(cfg, progress=False)
    lbi_groups = [g for g in seen if len(g) == 2]
    assert lbi_groups and lbi_groups[0][1][1] == pytest.approx(3 * lbi_groups[0][0][1])
