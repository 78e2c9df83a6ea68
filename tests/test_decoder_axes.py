"""Every decoder adds m_k along the sequence axis the graph says at its own insertion
point, and the built-model causality probe runs with non-zero interface weights (issue
#35, item 1): a zero-initialised design cannot pass it by being zero."""

from __future__ import annotations

import torch
from torch import nn

import lbi_fx
from lbi_fx import interfaces
from lbi_fx.causality import causal_leak
from lbi_fx.models.transformer import build
from lbi_fx.testing import gradient_parity
from tests.models import CausalConv, ToChannelsFirst


class MixedLM(nn.Module):
    """The canvas is (B, L, D); ``layers.0`` hands ``layers.1`` a (B, D, L) tensor, and
    D == L, so a decoder copying the entry's axis would add rows along the channels."""

    def __init__(self, vocab: int = 32, d: int = 16, n_layer: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList((ToChannelsFirst if i == 0 else CausalConv)(d)
                                    for i in range(n_layer))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.transpose(1, 2))


def _ids(batch=2, seq=16, vocab=32, seed=0):
    return (torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


def test_every_block_decoder_follows_the_blocks_own_sequence_axis():
    torch.manual_seed(0)
    ex = _ids()
    lbi = lbi_fx.transform(MixedLM().double(), lbi_fx.every(2, "layers"), rank=4,
                           example_inputs=ex, pool="causal", decoder_at="every")
    assert lbi.lbi.dec_0_0.seq_axis == 1  # the region starts from (B, L, D)
    assert lbi.lbi.dec_0_b1.seq_axis == 2  # layers.1 reads (B, D, L)
    assert causal_leak(lbi, ex) == 0.0
    gradient_parity(lbi, ex).assert_close(rel_l2=1e-10, cosine=1 - 1e-10)


def test_zero_decoders_at_every_block_stay_causal_after_training():
    torch.manual_seed(0)
    ex = _ids()
    lbi = lbi_fx.transform(MixedLM().double(), lbi_fx.every(2, "layers"), example_inputs=ex,
                           decoder_at="every", **lbi_fx.per_position())
    for name in ("dec_0_0", "dec_0_b1", "dec_1_0", "dec_1_b1"):  # the probe restored them
        last = lbi.lbi[name].net[-1]
        assert not last.weight.any() and not last.bias.any()
    opt = torch.optim.Adam(lbi.parameters(), lr=1e-2)
    for _ in range(5):
        loss = lbi(ex[0]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert causal_leak(lbi, ex) == 0.0


def test_built_model_probe_sees_through_zero_decoders(monkeypatch):
    """A decoder that reads a later row (an injected rewrite bug) is invisible while the
    decoders are zero; transform probes with non-zero interface weights and names it."""
    good = interfaces.spread

    def ahead(d, length, seg):  # position t reads the row of the next segment
        return good(torch.roll(d, -1, dims=1), length, seg)

    monkeypatch.setattr(interfaces, "spread", ahead)
    model, ex = build(n_layer=2, n_embd=16, n_head=2, seq=8, batch=2)
    try:
        lbi_fx.transform(model, lbi_fx.every(1, "layers"), example_inputs=ex,
                         **lbi_fx.per_position())
    except lbi_fx.InternalError as exc:
        assert "non-zero interface weights" in str(exc) and "lbi.dec_" in str(exc)
    else:
        raise AssertionError("a leaking rewrite with zero decoders was accepted")
