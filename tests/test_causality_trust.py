"""Causality you can trust (issue #22, items 3 and 4): the sequence axis comes from the
graph, the probe covers every cut, ``transform`` checks what it builds, ``auto`` never
picks a leaky pool silently, and no interface is constant."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lbi_fx
from lbi_fx.causality import causal_leak, probe_causal
from lbi_fx.models.transformer import build
from lbi_fx.testing import gradient_parity
from tests.models import CausalConv, ToChannelsFirst


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, lbi_fx.CausalityWarning)]


def _ids(batch=2, seq=16, vocab=32, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))




class ChannelsFirstLM(nn.Module):
    """Activations (B, D, L) between blocks: the sequence is axis 2, not axis 1. The
    canvas is (B, D, L) too, or (B, L, D) when ``layers.0`` transposes (``mixed``);
    ``fixed_len`` adds a (D, L) table, so the model runs at one length only."""

    def __init__(self, vocab: int = 32, d: int = 16, n_layer: int = 4, mixed: bool = False,
                 fixed_len: int | None = None):
        super().__init__()
        self.mixed = mixed
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList((ToChannelsFirst if mixed and i == 0 else CausalConv)(d)
                                    for i in range(n_layer))
        self.head = nn.Linear(d, vocab)
        self.table = nn.Parameter(torch.randn(d, fixed_len) / 4) if fixed_len else None

    def forward(self, idx):
        x = self.emb(idx) if self.mixed else self.emb(idx).transpose(1, 2)
        if self.table is not None:
            x = x + self.table
        for layer in self.layers:
            x = layer(x)
        return self.head(x.transpose(1, 2))


class PerPosition(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class ReadsAhead(nn.Module):
    """Position 3 reads position 5 (and nothing else reads the future)."""

    def forward(self, x):
        return x + torch.cat([x[:, :3], x[:, 5:6], x[:, 4:]], dim=1)


class FutureAt3(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([PerPosition(d), ReadsAhead(), PerPosition(d), PerPosition(d)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class ShiftMix(nn.Module):
    """Causal: position t adds a map of position t - 1."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        prev = F.pad(x, (0, 0, 1, 0))[:, :-1]
        return x + torch.tanh(self.fc(prev))


class FloatSeries(nn.Module):
    """A float (B, L) series in, (B, L) out: causal along axis 1."""

    def __init__(self, d: int = 8, n_layer: int = 4):
        super().__init__()
        self.inp = nn.Linear(1, d)
        self.layers = nn.ModuleList(ShiftMix(d) for _ in range(n_layer))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.inp(x.unsqueeze(-1))
        for layer in self.layers:
            h = layer(h)
        return self.head(h).squeeze(-1)


class LossOnly(FutureAt3):
    """A causal LM whose forward returns the loss: no per-position output to probe."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([ShiftMix(16) for _ in range(4)])

    def forward(self, idx, targets):
        return F.cross_entropy(super().forward(idx).flatten(0, 1), targets.flatten())


# -- the sequence axis is a fact of the graph -------------------------------------------

@pytest.mark.parametrize("mixed", [False, True], ids=["canvas-BDL", "canvas-BLD"])
def test_channels_first_with_d_equal_l_is_causal_and_leaks_nothing(mixed):
    torch.manual_seed(0)
    model = ChannelsFirstLM(mixed=mixed).double()
    ex = (_ids(seq=16),)  # D == L == 16: sizes cannot tell the axes apart
    lbi, warned = _caught(lambda: lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4,
                                                   example_inputs=ex))
    assert not warned and lbi.pool == "causal"
    assert causal_leak(lbi, ex) == 0.0
    # other sequence lengths run (the decoders follow the sequence on axis 2), still causal
    short = (ex[0][:, :11],)
    assert lbi(short[0]).shape == (2, 11, 32)
    assert causal_leak(lbi, short) == 0.0
    gradient_parity(lbi, ex).assert_close(rel_l2=1e-10, cosine=1 - 1e-10)
    # a mean pool (asked for knowingly) pools over L and encodes D: other lengths run too
    with pytest.warns(lbi_fx.CausalityWarning):
        mean = lbi_fx.transform(ChannelsFirstLM(mixed=mixed).double(), lbi_fx.every(2, "layers"),
                                rank=4, example_inputs=ex, pool="mean")
    assert mean(short[0]).shape == (2, 11, 32)
    assert lbi_fx.verify(mean, example_inputs=ex).causality.lbi_causal is False


def test_sequence_axis_the_graph_cannot_tell_is_refused_by_name():
    """A model fixed to one length cannot show its sequence axis; with D == L the sizes
    cannot either: causal interfaces are refused by name, auto warns and says why."""
    torch.manual_seed(0)
    ex = (_ids(seq=16),)
    with pytest.raises(lbi_fx.RewriteError, match=r"cannot tell which axis of the canvas.*"
                                                  r"pool='mean' knowingly"):
        lbi_fx.transform(ChannelsFirstLM(fixed_len=16), lbi_fx.every(2, "layers"), rank=4,
                         example_inputs=ex, pool="causal")
    lbi, warned = _caught(lambda: lbi_fx.transform(
        ChannelsFirstLM(fixed_len=16), lbi_fx.every(2, "layers"), rank=4, example_inputs=ex))
    assert lbi.pool == "mean" and len(warned) == 1
    assert "cannot tell which axis" in str(warned[0].message)


def test_future_read_between_probe_points_is_found():
    torch.manual_seed(0)
    model = FutureAt3().eval()
    ex = (_ids(seq=16),)
    causal, leak, _ = probe_causal(model, ex)
    assert causal is False and leak > 1e-3
    lbi, warned = _caught(lambda: lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4,
                                                   example_inputs=ex))
    assert lbi.pool == "mean" and lbi.model_causal is False and not warned


def test_float_series_is_probed_along_its_sequence():
    torch.manual_seed(0)
    model = FloatSeries().double()
    ex = (torch.randn(2, 12, dtype=torch.float64),)
    # the graph says axis 1 of the float (B, L) input is the sequence (it runs at L + 1)
    assert lbi_fx.verify(model, lbi_fx.every(2, "layers"), example_inputs=ex).causality.model_causal
    lbi, warned = _caught(lambda: lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4,
                                                   example_inputs=ex))
    assert not warned and lbi.pool == "causal" and causal_leak(lbi, ex) == 0.0


def test_auto_warns_when_the_probe_cannot_decide():
    torch.manual_seed(0)
    model = LossOnly()
    ex = (_ids(seq=12), _ids(seq=12, seed=1))
    lbi, warned = _caught(lambda: lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4,
                                                   example_inputs=ex))
    assert lbi.pool == "mean" and lbi.model_causal is None
    assert len(warned) == 1
    msg = str(warned[0].message)
    assert "pool='causal'" in msg and "pool='mean'" in msg


# -- transform checks what it builds ----------------------------------------------------

def test_causal_pool_on_a_model_that_reads_ahead_is_refused_by_name():
    torch.manual_seed(0)
    with pytest.raises(lbi_fx.RewriteError, match=r"leak.*pool='mean'"):
        lbi_fx.transform(FutureAt3().eval(), lbi_fx.every(2, "layers"), rank=4,
                         example_inputs=(_ids(seq=16),), pool="causal")


def test_a_leaking_causal_rewrite_is_an_internal_error(monkeypatch):
    from lbi_fx import interfaces

    good = interfaces.prefix_pool

    def inclusive(x, seg):  # row s also sees segment s: a rewrite bug
        rows = good(x, seg)
        return rows + x.mean(dim=1, keepdim=True)

    monkeypatch.setattr(interfaces, "prefix_pool", inclusive)
    model, ex = build(n_layer=2, n_embd=16, n_head=2, seq=8, batch=2)
    with pytest.raises(lbi_fx.InternalError, match="leak"):
        lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=4, example_inputs=ex)


# -- verify never calls a pooling interface causal --------------------------------------

def test_verify_calls_a_mean_pooled_causal_lm_leaky_even_when_the_probe_sees_nothing():
    model, ex = build(n_layer=2, n_embd=16, n_head=2, seq=8, batch=2)
    with pytest.warns(lbi_fx.CausalityWarning):
        lbi = lbi_fx.transform(copy.deepcopy(model), lbi_fx.every(1, "layers"), rank=4,
                               example_inputs=ex, pool="mean")
    with torch.no_grad():  # the encoders' outputs vanish: numerically no leak
        for name in ("enc_in", "enc_0"):
            lbi.lbi[name].net[-1].weight.zero_()
            lbi.lbi[name].net[-1].bias.zero_()
    rep = lbi_fx.verify(lbi, example_inputs=ex)
    assert rep.causality.lbi_leak == 0.0
    assert rep.causality.leaks == ["lbi.enc_in", "lbi.enc_0"]
    assert rep.causality.lbi_causal is False


# -- interfaces that carry something ------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 2, [4, 1]])
def test_ranks_whose_layernorm_carries_nothing_are_refused(rank):
    model, ex = build(n_layer=3, n_embd=16, n_head=2, seq=8, batch=2)
    which = 2 if isinstance(rank, list) else 1
    with pytest.raises(lbi_fx.InputError, match=rf"interface {which}.*rank >= 3"):
        lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=rank, example_inputs=ex)


def test_smallest_rank_has_live_jacobians():
    model, ex = build(n_layer=3, n_embd=16, n_head=2, seq=8, batch=2)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=3, example_inputs=ex).double()
    lbi._record = {}
    lbi(ex[0]).pow(2).mean().backward()
    assert all(float(j.abs().max()) > 1e-2 for j in lbi._record["J"].values())


@pytest.mark.parametrize("segment_len", [16, 32])
def test_a_single_causal_segment_is_refused_by_name(segment_len):
    """One segment: its row pools the empty prefix, so m_{k+1} ignores region k (the trial
    backward used to die with an IndexError reported as lbi-fx's own bug)."""
    from lbi_fx.models import transformer

    model, (idx,) = transformer.build(n_layer=4, n_embd=16, n_head=2, seq=16, batch=2)
    with pytest.raises(lbi_fx.InputError, match="single causal segment"):
        lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                         pool="causal", segment_len=segment_len)


def test_a_non_causal_block_no_output_reads_is_named_not_called_a_bug():
    """Found by the long fuzz: block 1 means over the sequence but the model returns block
    0's output, so the model is causal; the interfaces would still pool block 1's output.
    auto keeps the mean pool with a warning naming it; pool='causal' refuses by name (it
    was an InternalError blaming lbi-fx)."""
    from tests import fuzz_models as fm

    B = fm.BlockGenome
    genome = fm.ModelGenome(
        blocks=(B(("linear",), residual=False), B(("mean", "linear"), residual=False, reduce_dim=1),
                B(("linear",), residual=False)),
        d=4, seq=3, batch=1, embed=False, untraceable=True, outputs=(0,))
    model, inputs = fm.build(genome)
    with pytest.warns(lbi_fx.CausalityWarning, match=r"blocks\.1.*reads later positions"):
        lbi = lbi_fx.transform(model, lbi_fx.every(1, "blocks"), 3, example_inputs=inputs)
    assert lbi.pool == "mean"
    with pytest.raises(lbi_fx.RewriteError, match=r"blocks\.1.*reads later positions"):
        lbi_fx.transform(model, lbi_fx.every(1, "blocks"), 3, example_inputs=inputs, pool="causal")
