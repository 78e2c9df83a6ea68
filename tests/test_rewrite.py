"""The LBI rewrite: interfaces, the generated backward, the module API and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lbi_fx
from lbi_fx.models.transformer import build, build_export
from lbi_fx.testing import gradient_parity

FP64 = dict(rel_l2=1e-12, cosine=1 - 1e-12)
FP32 = dict(rel_l2=1e-6, cosine=0.999999)


class SkipBlock(nn.Module):
    def __init__(self, d: int, skip: bool = False):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.skip_proj = nn.Linear(d, d) if skip else None

    def forward(self, x, skip=None):
        h = x + torch.tanh(self.fc(self.ln(x)))
        if skip is not None:
            h = h + self.skip_proj(skip)
        return h


class LongSkip(nn.Module):
    """Block 0's output feeds block 3 directly: it crosses boundaries 1, 2 and 3."""

    def __init__(self, d: int = 12, vocab: int = 20):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([SkipBlock(d), SkipBlock(d), SkipBlock(d), SkipBlock(d, True)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        h0 = self.blocks[0](x)
        h1 = self.blocks[1](h0)
        h2 = self.blocks[2](h1)
        h3 = self.blocks[3](h2, h0)
        return self.head(h3)


class TwoWidths(nn.Module):
    """Two dynamic tensors of different widths cross every boundary."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(10, d)
        self.a = nn.Linear(d, 3 * d)
        self.b = nn.Linear(3 * d, d)
        self.c = nn.Linear(d, d)
        self.d = nn.Linear(3 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, idx):
        x = self.emb(idx)
        wide = torch.relu(self.a(x))
        x = x + self.b(wide)
        y = self.c(x) + self.d(wide)
        return self.head(y)


def _idx(b=2, t=6, vocab=20):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64), (torch.float32, FP32)])
def test_long_skip_is_recarried_and_exact(dtype, tol):
    idx = _idx()
    model = LongSkip().to(dtype)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "blocks"), rank=4, example_inputs=(idx,))
    # region 1 and 2 each decode h0 again and re-encode it for the next boundary
    decoders = [n for n in lbi.lbi if n.startswith("dec_")]
    assert {"dec_1_0", "dec_2_0", "dec_2_1", "dec_3_0", "dec_3_1"} <= set(decoders)
    assert lbi.lbi.enc_1.in_features == [12, 12] and lbi.lbi.enc_2.in_features == [12, 12]
    report = lbi_fx.verify(lbi, example_inputs=(idx,))
    S = lbi.segments.count  # a causal model: S rows of r = 4 per interface
    assert report.ok and [b.min_cut_scalars for b in report.boundaries] == [4 * S] * 3
    gradient_parity(lbi, (idx,)).assert_close(**tol)


def test_several_crossings_of_different_widths():
    idx = _idx(vocab=10)
    model = TwoWidths().double()
    spec = [["a", "b"], ["c", "d"]]
    dense = lbi_fx.verify(model, spec, example_inputs=(idx,))
    crossing = {c.node: c.scalars for c in dense.boundaries[0].crossing}
    assert sorted(crossing.values()) == [6 * 8, 6 * 24]
    lbi = lbi_fx.transform(model, spec, rank=3, example_inputs=(idx,))
    decs = {n: m for n, m in lbi.lbi.items() if n.startswith("dec_1_")}
    assert sorted(m.net[-1].out_features for m in decs.values()) == [8, 24]
    assert sorted(m.use_canvas for m in decs.values()) == [False, True]
    width = 3 * (lbi.segments.count if lbi.segments else 1)
    assert lbi_fx.verify(lbi, example_inputs=(idx,)).boundaries[0].min_cut_scalars == width
    gradient_parity(lbi, (idx,)).assert_close(**FP64)


@pytest.mark.parametrize("K,r", [(2, 16), (3, 4), (6, 3)])
def test_verify_after_rewrite_holds_at_rank(K, r):
    model, (idx,) = build(n_layer=K, n_embd=16, n_head=2, seq=8)
    before = lbi_fx.verify(model, lbi_fx.every(1, "layers"), example_inputs=(idx,), rank=r)
    assert not before.ok and all(b.min_cut_scalars == 8 * 16 for b in before.boundaries)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=r, example_inputs=(idx,))
    after = lbi_fx.verify(lbi, example_inputs=(idx,))
    assert after.ok
    assert lbi.pool == "causal" and lbi.segments.count == 4  # seq 8 in segments of 2
    assert [b.min_cut_scalars for b in after.boundaries] == [4 * r] * (K - 1)
    assert all(len(b.crossing) == 1 and b.crossing[0].node.startswith("lbi_enc_")
               for b in after.boundaries)


def test_backward_graph_shows_three_phases_and_the_scan():
    model, (idx,) = build(n_layer=6, n_embd=16, n_head=2, seq=8)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,))
    code = lbi.backward_graph.code
    names = [n.name for n in lbi.backward_graph.graph.nodes]
    assert [n for n in names if n.startswith("phase1_jacobian")] == [
        "phase1_jacobian_0", "phase1_jacobian_1"]
    assert "phase2_seed" in names and "phase2_suffix_scan" in names
    assert [n for n in names if n.startswith("phase3_local")] == ["phase3_local_0", "phase3_local_1"]
    assert "torch.ops.lbi_fx.suffix_scan" in code
    order = {n: i for i, n in enumerate(names)}
    assert order["phase1_jacobian_1"] < order["phase2_suffix_scan"] < order["phase3_local_0"]


def test_module_api_double_state_dict_optimizer():
    model, (idx,) = build(n_layer=4, n_embd=16, n_head=2, seq=8)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,))
    keys = set(lbi.state_dict())
    assert "layers.0.attn.c_attn.weight" in keys and "lbi.enc_0.net.0.weight" in keys
    assert any(n.startswith("lbi.") for n, _ in lbi.named_parameters())
    lbi = lbi.double()
    assert lbi(idx).dtype == torch.float64
    gradient_parity(lbi, (idx,)).assert_close(**FP64)
    opt = torch.optim.AdamW(lbi.parameters(), lr=1e-2)
    before = lbi.lbi.enc_0.net[0].weight.detach().clone()
    loss = lbi(idx).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(before, lbi.lbi.enc_0.net[0].weight)
    fresh = lbi_fx.transform(build(n_layer=4, n_embd=16, n_head=2, seq=8, seed=1)[0],
                             lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,)).double()
    fresh.load_state_dict(lbi.state_dict())
    torch.testing.assert_close(fresh(idx), lbi(idx))


@pytest.mark.parametrize("encoder,pool", [("linear", "mean"), ("mlp", "last")])
def test_encoder_and_pool_options_stay_exact(encoder, pool):
    model, (idx,) = build(n_layer=3, n_embd=16, n_head=2, seq=8)
    lbi = lbi_fx.transform(model.double(), lbi_fx.every(1, "layers"), rank=[4, 6],
                           example_inputs=(idx,), encoder=encoder, pool=pool)
    assert [b.min_cut_scalars for b in lbi_fx.verify(lbi, example_inputs=(idx,)).boundaries] == [4, 6]
    gradient_parity(lbi, (idx,)).assert_close(**FP64)


def test_exported_model_transforms_and_runs_other_shapes():
    model, (idx,) = build_export(n_layer=4, n_embd=16, n_head=2, batch=2, seq=8)
    with pytest.warns(UserWarning, match="torch.export"):
        lbi = lbi_fx.transform(model.double(), lbi_fx.every(2, "layers"), rank=4,
                               example_inputs=(idx,))
    other = torch.randint(0, 256, (3, 5))
    assert lbi(other).shape == (3, 5, 256)
    gradient_parity(lbi, (other,)).assert_close(**FP64)


def test_scan_mode_is_default_and_mode_is_validated():
    model, (idx,) = build(n_layer=2, n_embd=16, n_head=2, seq=8)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=3, example_inputs=(idx,))
    assert lbi.backward == "scan"
    with pytest.raises(lbi_fx.InputError, match="backward"):
        lbi.backward = "reverse"
    with torch.no_grad():  # inference runs the plain programs
        assert lbi(idx).shape == (2, 8, 256)


class BatchSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.l0 = nn.Linear(8, 8)
        self.l1 = nn.Linear(8, 8)

    def forward(self, idx):
        x = self.l0(self.emb(idx))
        x = x + x.sum(0)  # mixes samples
        return self.l1(x)


class BatchNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.l0 = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
        self.l1 = nn.Linear(8, 8)

    def forward(self, idx):
        return self.l1(self.l0(self.emb(idx).mean(1)))


def test_batch_mixing_is_refused():
    idx = _idx(b=3, vocab=10)
    with pytest.raises(lbi_fx.BatchMixingError, match="region 0"):
        lbi_fx.transform(BatchSum(), [["l0"], ["l1"]], rank=3, example_inputs=(idx,))
    with pytest.raises(lbi_fx.BatchMixingError, match="BatchNorm"):
        lbi_fx.transform(BatchNormBlock(), [["l0"], ["l1"]], rank=3, example_inputs=(idx,))
    # frozen statistics are per sample: allowed, and exact
    lbi = lbi_fx.transform(BatchNormBlock().eval().double(), [["l0"], ["l1"]], rank=3,
                           example_inputs=(idx,))
    gradient_parity(lbi, (idx,)).assert_close(**FP64)


class _NoVmap(torch.autograd.Function):
    """A custom Function without a vmap rule, like mamba-ssm's fused kernels."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if g.abs().sum().item() < 0:  # data-dependent Python: impossible under vmap
            raise AssertionError
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s))


class Opaque(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + _NoVmap.apply(self.fc(x))


class OpaqueNet(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(10, d)
        self.blocks = nn.ModuleList([Opaque(d) for _ in range(3)])
        self.head = nn.Linear(d, 10)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_custom_function_without_vmap_falls_back_and_stays_exact():
    idx = _idx(vocab=10)
    model = OpaqueNet().double()
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "blocks"), rank=3, example_inputs=(idx,),
                           leaf_modules=[Opaque])
    assert [n.op for n in lbi.rewritten_graph.graph.nodes if "blocks" in str(n.target)] == [
        "call_module"] * 3
    gradient_parity(lbi, (idx,)).assert_close(**FP64)
    from tests.models import backward_states

    seen = backward_states(lbi, idx)
    assert seen and seen[-1].batched_ok == {0: False, 1: False}  # the per-row fallback ran


def test_inspect_cli_prints_graphs(capsys):
    from lbi_fx.cli import main

    assert main(["inspect", "lbi_fx.models.transformer:build", "--regions", "layers:2",
                 "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "rewritten forward graph" in out and "lbi_enc_0" in out
    assert "phase1_jacobian_0" in out and "torch.ops.lbi_fx.suffix_scan" in out
    assert "[ region 1]" in out and "[ prologue]" in out and "[ epilogue]" in out
