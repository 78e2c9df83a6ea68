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
    with pytest.raises(lbi_fx.InputError, match="'last' is not one of prefix, latest, recent, inclusive"):
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("segment_len, rank, norm", [(1, 1, "none"), (4, 4, "layer"),
                                                     (3, 4, "layer")])
def test_inclusive_summaries_are_exact_and_leak_free(segment_len, rank, norm, dtype):
    """Row s reads up to and including segment s's first position (segment_len 1: every
    position its own state); zero decoders, as the depth runs use them. segment_len 3: a
    ragged last segment."""
    model, idx = _gpt(dtype)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=rank, example_inputs=(idx,),
                           summary="inclusive", segment_len=segment_len, interface_norm=norm,
                           decoder_init="zero")
    with torch.no_grad():  # move off the zero start, so the scan has something to carry
        for n, p in lbi.named_parameters():
            if n.startswith("lbi.dec_"):
                p.add_(0.05 * torch.randn_like(p))
    from lbi_fx.interfaces import InterfaceEncoder

    encoders = [m for m in lbi.modules() if isinstance(m, InterfaceEncoder)]
    assert encoders and all(e.summary == "inclusive" for e in encoders)
    assert all(e.net_in == 2 * sum(e.in_features) for e in encoders)  # the mean, the position
    assert lbi.ranks == [rank * -(-idx.shape[1] // segment_len)] * 2
    report = gradient_parity(lbi, (idx,))
    assert report.ok, str(report)
    assert causal_leak(lbi, (idx,), cuts=range(1, idx.shape[1])) == 0.0
    short = idx[:, :11]
    assert causal_leak(lbi, (short,), cuts=range(1, short.shape[1])) == 0.0


def test_inclusive_pool_reads_each_rows_first_position():
    from lbi_fx.interfaces import Segments, causal_summary, inclusive_pool

    seg = Segments.make(6, 2)  # 3 segments of 2 positions: first positions 0, 2, 4
    x = torch.arange(1.0, 7.0).reshape(1, 6, 1)
    rows = causal_summary(x, seg, "inclusive")
    assert rows[0].tolist() == [[1.0, 1.0], [2.0, 3.0], [3.0, 5.0]]  # mean up to p_s, x[p_s]
    assert inclusive_pool(x[:, :3], seg)[0].tolist() == [[1.0, 1.0], [2.0, 3.0], [0.0, 0.0]]
    own = inclusive_pool(x, Segments.make(6, 1))  # segment_len 1: row t is position t
    assert own[0, :, 1].tolist() == x[0, :, 0].tolist()


def test_inclusive_jacobians_are_block_lower_triangular_with_the_region_on_the_diagonal():
    """Row s of m_{k+1} now reads segment s's first position, which reads row s of m_k:
    nothing lies above the diagonal blocks, and block (0, 0) moves with the region's
    weights (a prefix interface's row 0 pools an empty prefix: its block is the residual
    alone, which the backward takes from the encoder)."""
    model, idx = _gpt(torch.float64)
    S, r = 4, 3

    def blocks(m):
        m.zero_grad()
        m(idx).pow(2).mean().backward()
        return {k: j.reshape(j.shape[0], S, r, S, r).clone() for k, j in m._record["J"].items()}

    for summary in ("inclusive", "prefix"):
        lbi = lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(2, "layers"), rank=r,
                               example_inputs=(idx,), summary=summary)
        lbi.backward = "scan"
        assert (lbi._head_rows(0, None) == {}) == (summary == "inclusive")
        before = blocks(lbi)
        for jac in before.values():
            for s in range(S):
                for t in range(s + 1, S):
                    assert float(jac[:, s, :, t].abs().max()) == 0.0, (summary, s, t)
        with torch.no_grad():  # region 0 and region 1 change, the interfaces do not
            for n, p in lbi.named_parameters():
                if n.startswith("layers."):
                    p.mul_(1.5)
        after = blocks(lbi)
        moved = [float((after[k][:, 0, :, 0] - before[k][:, 0, :, 0]).abs().max()) for k in before]
        if summary == "inclusive":
            assert min(moved) > 1e-6, moved
        else:
            assert max(moved) < 1e-12, moved


def test_long_runs_decay_the_learning_rate_and_score_on_more_batches():
    """--long: 100 warm-up steps, cosine down to lr / 10 at the last step, the score on 64
    held-out batches; the rate reaches every parameter group (the interface's keeps its
    factor)."""
    from lbi_fx.cli.quality import Config

    cfg = Config.long()
    assert (cfg.schedule, cfg.warmup, cfg.final_eval_batches) == ("cosine", 100, 64)
    assert cfg.lr_at(1) == pytest.approx(cfg.lr / 100)
    assert cfg.lr_at(100) == pytest.approx(cfg.lr)
    assert cfg.lr_at(cfg.steps) == pytest.approx(cfg.lr * cfg.min_lr)
    rates = [cfg.lr_at(s) for s in range(100, cfg.steps + 1, 500)]
    assert rates == sorted(rates, reverse=True)
    assert Config().lr_at(5000) == Config().lr  # the 600-step table keeps a constant rate


def test_final_score_uses_its_own_batches_and_old_tables_are_not_reused(tmp_path):
    import json
    import unittest.mock

    from lbi_fx.cli import quality
    from lbi_fx.cli.quality import Config, run_table

    cfg = Config.quick()
    cfg.steps, cfg.eval_every, cfg.leaky, cfg.designs, cfg.spl, cfg.ranks = 2, 2, False, False, False, (4,)
    cfg.schedule, cfg.final_eval_batches = "cosine", 3
    seen = []
    real = quality.evaluate

    def spy(model, batches):
        seen.append(len(batches))
        return real(model, batches)

    with unittest.mock.patch.object(quality, "evaluate", spy):
        rows, curves = run_table(cfg, progress=False)
    assert seen == [cfg.eval_batches, 3] * len(rows)  # the curve's batches, then the score's
    assert all(r["final_eval_batches"] == 3 and r["schedule"] == "cosine" for r in rows)
    assert curves["dense"][-1]["final_eval_batches"] == 3
    old = tmp_path / "old.json"  # a table from before the protocol: constant rate, 4 batches
    old.write_text(json.dumps([{"model": "dense", "name": "dense", "steps": 6000, "seeds": 1,
                                "seed": 0}]))
    with pytest.raises(lbi_fx.InputError, match="has schedule constant, this run cosine"):
        quality.main(["--long", "--seeds", "1", "--reuse-dense", str(old)])
    with pytest.raises(lbi_fx.InputError, match="'half' is not one of default, zero"):
        quality.main(["--quick", "--decoder-inits", "zero,half"])
    with pytest.raises(lbi_fx.InputError, match="--decoder-windows '4,x': comma-separated ints"):
        quality.main(["--quick", "--decoder-windows", "4,x"])
    with pytest.raises(lbi_fx.InputError, match="'last' is not one of first, every"):
        quality.main(["--quick", "--decoders-at", "last"])
    with pytest.raises(lbi_fx.InputError, match="'conv' is not one of mlp, linear"):
        quality.main(["--quick", "--encoders", "conv"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("segment_len, rank, norm, window, at", [
    (1, 1, "none", 4, "first"), (4, 4, "layer", 2, "first"), (1, 1, "none", 1, "every"),
    (3, 4, "layer", 2, "every")])
def test_decoder_windows_and_every_block_decoders_are_exact_and_leak_free(
        segment_len, rank, norm, window, at, dtype):
    model, idx = _gpt(dtype)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=rank, example_inputs=(idx,),
                           summary="inclusive", segment_len=segment_len, interface_norm=norm,
                           decoder_window=window, decoder_at=at)
    from lbi_fx.interfaces import InterfaceDecoder

    decoders = {n: m for n, m in lbi.lbi.named_children() if isinstance(m, InterfaceDecoder)}
    assert all(d.window == window and d.net[0].in_features == rank * window
               for d in decoders.values())
    # a decoder per region start, plus one before the second block of each region
    assert sorted(decoders) == sorted(["dec_0_0", "dec_1_0", "dec_2_0"]
                                      + (["dec_0_b1", "dec_1_b1", "dec_2_b1"] if at == "every" else []))
    report = gradient_parity(lbi, (idx,))
    assert report.ok, str(report)
    assert causal_leak(lbi, (idx,), cuts=range(1, idx.shape[1])) == 0.0
    short = idx[:, :11]
    assert causal_leak(lbi, (short,), cuts=range(1, short.shape[1])) == 0.0


def test_row_window_reads_only_earlier_rows():
    from lbi_fx.interfaces import row_window

    rows = torch.arange(1.0, 5.0).reshape(1, 4, 1)
    assert row_window(rows, 3)[0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert torch.equal(row_window(rows, 1), rows)


def test_every_block_decoders_feed_the_block_they_precede():
    """Zero-initialised, they change nothing; once a block's own decoder moves, the
    output moves, and the entry decoders did not."""
    model, idx = _gpt(torch.float64)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                           decoder_at="every", decoder_init="zero")
    first = lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(2, "layers"), rank=4,
                             example_inputs=(idx,), decoder_init="zero")
    shared = {k: v for k, v in lbi.state_dict().items() if "_b1" not in k
              and not k.endswith("_extra_state")}  # the layouts differ: unchecked on purpose
    with pytest.warns(UserWarning, match="no lbi._extra_state"):
        first.load_state_dict(shared, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(lbi(idx), first(idx), rtol=0, atol=0)
        lbi.lbi.dec_2_b1.net[-1].bias.copy_(0.1 * torch.randn(16))  # not constant: LN removes that
        assert not torch.allclose(lbi(idx), first(idx), atol=1e-6)


def test_decoder_window_and_place_are_checked_and_recorded():
    model, idx = _gpt(torch.float64)
    with pytest.raises(lbi_fx.InputError, match="decoder_window=0"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                         decoder_window=0)
    with pytest.raises(lbi_fx.InputError, match="decoder_window=2 reads earlier causal rows"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                         decoder_window=2, pool="mean")
    with pytest.raises(lbi_fx.InputError, match="decoder_at='last'"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                         decoder_at="last")
    every = lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(2, "layers"), rank=4,
                             example_inputs=(idx,), decoder_at="every")
    plain = lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(2, "layers"), rank=4,
                             example_inputs=(idx,))
    with pytest.raises(lbi_fx.LBIError, match="decoders at: the state dict has 'every'"):
        plain.load_state_dict(every.state_dict())


class _Two(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, a, b):
        return self.lin(a) + b


class _SkipInRegion(nn.Module):
    """Block 2 reads two tensors of the blocks before it: no single block input."""

    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Embedding(16, d)
        self.layers = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), _Two(d), nn.Linear(d, d)])

    def forward(self, idx):
        x = self.emb(idx)
        h0 = self.layers[0](x)
        h1 = self.layers[1](h0)
        h2 = self.layers[2](h1, h0)
        return self.layers[3](h2)


def test_every_block_decoders_refuse_a_block_with_two_inputs_by_name():
    model = _SkipInRegion().double()
    idx = torch.randint(0, 16, (2, 8))
    regions = [["layers.0", "layers.1", "layers.2"], ["layers.3"]]
    with pytest.raises(lbi_fx.InputError, match="block 'layers.2' of region 0 .* reads "):
        lbi_fx.transform(model, regions, rank=4, example_inputs=(idx,), pool="mean",
                         decoder_at="every")
    lbi = lbi_fx.transform(model, regions, rank=4, example_inputs=(idx,), pool="mean")
    assert gradient_parity(lbi, (idx,)).ok


def test_per_position_preset_is_the_design_the_long_table_runs():
    """lbi_fx.per_position() is what --long trains beside the default, and it transforms
    a model into an exact, leak-free one of one row per position."""
    from lbi_fx.cli.quality import Config, variants

    p = lbi_fx.per_position()
    assert p == {"pool": "causal", "rank": 1, "segment_len": 1, "summary": "inclusive",
                 "decoder_window": 4, "decoder_init": "zero", "interface_norm": "none"}
    assert lbi_fx.per_position(rank=4)["interface_norm"] == "layer"
    cfg = Config.long()
    rows = variants(cfg.budgets, cfg.seq, cfg.layers, cfg.region_size, cfg.leaky, False, False,
                    cfg.ranks, per_position=cfg.per_position)
    lbi_rows = [v for v in rows if v.model == "lbi"]
    assert [(v.rank, v.segments) for v in lbi_rows] == [(16, 4), (1, 64)]
    pp = lbi_rows[-1]
    assert (pp.norm, pp.summary, pp.decoder_init, pp.decoder_window) == (
        p["interface_norm"], p["summary"], p["decoder_init"], p["decoder_window"])
    model, idx = _gpt(torch.float64)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), example_inputs=(idx,), **p)
    assert lbi.ranks == [idx.shape[1]] * 2 and lbi.segments.length == 1
    with torch.no_grad():
        for n, q in lbi.named_parameters():
            if n.startswith("lbi.dec_"):
                q.add_(0.05 * torch.randn_like(q))
    assert gradient_parity(lbi, (idx,)).ok
    assert causal_leak(lbi, (idx,), cuts=range(1, idx.shape[1])) == 0.0



def _parsed(monkeypatch, argv: list[str]):
    """The Config ``lbi-fx quality ARGV`` would run (nothing trains)."""
    from lbi_fx.cli import quality

    seen = {}

    def fake_run_table(cfg, progress=True):
        seen["cfg"] = cfg
        return [], {}

    monkeypatch.setattr(quality, "run_table", fake_run_table)
    quality.main(argv)
    return seen["cfg"]


def test_ranks_none_leaves_only_the_baselines_and_spl(monkeypatch):
    """`--ranks none` (the SPL run of benchmarks/depth_runs.sh): dense rows and SPL, no
    causal row of the rank grid."""
    from lbi_fx.cli.quality import variants

    cfg = _parsed(monkeypatch, ["--long", "--seeds", "1", "--ranks", "none",
                                "--no-per-position", "--json"])
    assert cfg.ranks == () and cfg.spl
    rows = variants(cfg.budgets, cfg.seq, cfg.layers, cfg.region_size, cfg.leaky,
                    cfg.designs, cfg.spl, cfg.ranks, per_position=cfg.per_position)
    assert [v.model for v in rows] == ["dense", "dense", "dense", "spl"]


def test_the_earlier_long_protocol_can_be_asked_for(monkeypatch):
    """The constant-rate tables of docs/depth.md (2026-12-02): --long with a constant rate and
    the final score on the curve's 4 batches."""
    from lbi_fx.cli.quality import Config

    cfg = _parsed(monkeypatch, ["--long", "--schedule", "constant", "--warmup", "0",
                                "--final-eval-batches", "0", "--json"])
    assert cfg.protocol == Config().protocol and cfg.steps == 6000 and cfg.eval_batches == 4
    with pytest.raises(lbi_fx.InputError, match="--final-eval-batches -1"):
        _parsed(monkeypatch, ["--quick", "--final-eval-batches", "-1"])


def test_reused_dense_rows_are_checked_against_the_protocol_the_flags_ask_for(tmp_path,
                                                                               monkeypatch):
    """--schedule / --warmup apply before --reuse-dense checks its rows: an old constant-rate
    table is accepted for the old protocol asked by flags, refused for today's --long."""
    import json

    old = tmp_path / "old.json"
    from lbi_fx.cli.quality import Config

    old.write_text(json.dumps([{"model": "dense", "name": "dense", "steps": 6000, "seeds": 1,
                                "seed": 0, "ce_leak_free": 1.5, **Config.long().recorded}]))
    cfg = _parsed(monkeypatch, ["--long", "--seeds", "1", "--schedule", "constant", "--warmup",
                                "0", "--final-eval-batches", "0", "--reuse-dense", str(old),
                                "--json"])
    assert set(cfg.reuse_dense) == {"dense"}
    with pytest.raises(lbi_fx.InputError, match="has warmup 0, this run 100"):
        _parsed(monkeypatch, ["--long", "--seeds", "1", "--schedule", "constant",
                              "--final-eval-batches", "0", "--reuse-dense", str(old)])


@pytest.mark.parametrize("key, value, message", [
    ("width", 64, "row 'dense' has width 64, this run 32"),
    ("seq", 64, "row 'dense' has seq 64, this run 32"),
    ("model_layers", 6, "row 'dense' has model_layers 6, this run 4"),
    ("batch", 16, "row 'dense' has batch 16, this run 8"),
    ("heads", 2, "row 'dense' has heads 2, this run 4"),
    ("corpus_bytes", 4_000_000, "row 'dense' has corpus_bytes 4000000, this run 400000"),
    ("lr", 1e-3, "row 'dense' has lr 0.001, this run 0.003"),
    ("schedule", "cosine", "row 'dense' has schedule cosine, this run constant"),
    ("width", None, "row 'dense' does not record width"),
])
def test_reuse_dense_checks_every_config_field_its_rows_depend_on(tmp_path, monkeypatch, key,
                                                                 value, message):
    """Issue 35 item 6: dense rows of another width / sequence length (or any field the
    numbers depend on) are refused by name; rows that do not record a field are too."""
    from lbi_fx.cli import quality

    cfg = quality.Config.quick()
    row = {"model": "dense", "name": "dense", "steps": cfg.steps, "seeds": cfg.seeds,
           "seed": cfg.seed, **cfg.protocol, **cfg.recorded}
    assert not {"width", "seq", "model_layers", "batch", "lr", "schedule"} - set(row)
    assert quality.reuse_rows(_write(tmp_path, [row]), cfg)["dense"] == row  # matches
    if value is None:
        del row[key]
    else:
        row[key] = value
    with pytest.raises(lbi_fx.InputError, match=message):  # (nothing trains: run_table faked)
        _parsed(monkeypatch, ["--quick", "--reuse-dense", _write(tmp_path, [row])])


def _write(tmp_path, rows) -> str:
    import json

    path = tmp_path / "dense.json"
    path.write_text(json.dumps(rows))
    return str(path)
