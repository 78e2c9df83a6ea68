"""The sequence axis of every input is a fact of the graph or named by the user (issue
#35, item 0): never axis 1 by position. A channels-first signal (B, 4, L) read by a
Conv1d carries its sequence on axis 2; images have none, so nothing causal is said."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lbi_fx
import lbi_fx.testing
from lbi_fx.causality import causal_leak
from tests.models import CausalConv


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, lbi_fx.CausalityWarning)]




class Signal(nn.Module):
    """(B, 4, L) in, (B, L, 4) out: channels first, Conv1d blocks, causal."""

    def __init__(self, c: int = 4, d: int = 16, n: int = 4):
        super().__init__()
        self.stem = nn.Conv1d(c, d, 1)
        self.layers = nn.ModuleList(CausalConv(d) for _ in range(n))
        self.head = nn.Conv1d(d, c, 1)

    def forward(self, x):
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h).transpose(1, 2)


class Mixer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, h):
        return h + torch.tanh(torch.einsum("bdl,de->bel", h, self.w))


class OpaqueSignal(nn.Module):
    """(B, 4, L) read by an einsum only: no op says which axis is the sequence."""

    def __init__(self, c: int = 4, n: int = 4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, c) / 2)
        self.layers = nn.ModuleList(Mixer(c) for _ in range(n))

    def forward(self, x):
        h = torch.einsum("bcl,cd->bdl", x, self.w)
        for layer in self.layers:
            h = layer(h)
        return h


class PatchViT(nn.Module):
    """An image (B, 3, 8, 8) -> patches (B, 16, D) -> Linear blocks -> (B, 10)."""

    def __init__(self, d: int = 16, n: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 16, d) / 4)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh())
                                    for _ in range(n))
        self.head = nn.Linear(d, 10)

    def forward(self, img):
        h = self.patch(img).flatten(2).transpose(1, 2) + self.pos
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h.mean(dim=1))


class ConvNet(nn.Module):
    """U-Net-like stack of residual Conv2d blocks, (B, 3, 8, 8) -> (B, 3, 8, 8)."""

    def __init__(self, d: int = 8, n: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, d, 3, padding=1)
        self.layers = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1) for _ in range(n))
        self.head = nn.Conv2d(d, 3, 1)

    def forward(self, img):
        h = self.stem(img)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.head(h)


def _signal(length=48):
    return (torch.randn(2, 4, length, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0)),)


def test_channels_first_signal_is_causal_along_its_length_not_its_channels():
    torch.manual_seed(0)
    ex = _signal()
    lbi = lbi_fx.transform(Signal().double(), lbi_fx.every(2, "layers"), rank=4,
                           example_inputs=ex, pool="causal")
    assert lbi.input_seq_axes == [2] and lbi.segments.max_len == 48
    x = ex[0]
    later = x.clone()
    later[..., 47] += 1.0
    with torch.no_grad():
        assert torch.equal(lbi(later)[:, :47], lbi(x)[:, :47])  # position 47 reaches no earlier
    assert causal_leak(lbi, ex) == 0.0
    assert lbi_fx.testing.causal_leak(Signal().double(), ex) == 0.0  # the dense model, too
    rep = lbi_fx.verify(Signal().double(), lbi_fx.every(2, "layers"), example_inputs=ex)
    assert rep.causality.model_causal is True
    assert "unknown" not in str(rep.causality)
    assert lbi_fx.verify(lbi, example_inputs=ex).causality.lbi_causal is True
    # auto: causal, no warning about a "sequence axis (length 4)"
    auto, warned = _caught(lambda: lbi_fx.transform(Signal().double(), lbi_fx.every(2, "layers"),
                                                    rank=4, example_inputs=ex))
    assert auto.pool == "causal" and not warned


def test_max_len_bounds_the_signal_length():
    with pytest.raises(lbi_fx.InputError, match="sequence length 48 exceeds max_len=32"):
        lbi_fx.transform(Signal().double(), lbi_fx.every(2, "layers"), rank=4,
                         example_inputs=_signal(), pool="causal", max_len=32)
    lbi = lbi_fx.transform(Signal().double(), lbi_fx.every(2, "layers"), rank=4,
                           example_inputs=_signal(32), pool="causal", max_len=32)
    with pytest.raises(lbi_fx.InputError, match="sequence length 48 exceeds max_len=32"):
        lbi(_signal(48)[0])
    assert lbi(_signal(20)[0]).shape == (2, 20, 4)


def test_an_axis_no_op_names_is_refused_by_name_and_seq_dim_names_it():
    torch.manual_seed(0)
    ex = _signal(12)
    with pytest.raises(lbi_fx.SequenceAxisError, match=r"input 'x' \(2, 4, 12\).*seq_dim="):
        lbi_fx.transform(OpaqueSignal().double(), lbi_fx.every(2, "layers"), rank=3,
                         example_inputs=ex, pool="causal")
    lbi, warned = _caught(lambda: lbi_fx.transform(
        OpaqueSignal().double(), lbi_fx.every(2, "layers"), rank=3, example_inputs=ex))
    assert lbi.pool == "mean" and len(warned) == 1
    msg = str(warned[0].message)
    assert "input 'x'" in msg and "seq_dim=" in msg and "length 4" not in msg
    named = lbi_fx.transform(OpaqueSignal().double(), lbi_fx.every(2, "layers"), rank=3,
                             example_inputs=ex, pool="causal", seq_dim=2)
    assert named.input_seq_axes == [2] and causal_leak(named, ex) == 0.0
    assert lbi_fx.verify(named, example_inputs=ex).causality.lbi_causal is True


@pytest.mark.parametrize("make", [PatchViT, ConvNet], ids=["vit", "convnet"])
def test_images_get_no_causal_wording(make):
    torch.manual_seed(0)
    ex = (torch.randn(2, 3, 8, 8),)
    lbi, warned = _caught(lambda: lbi_fx.transform(make(), lbi_fx.every(2, "layers"), rank=4,
                                                   example_inputs=ex))
    assert lbi.pool == "mean" and not warned and lbi.input_seq_axes == [None]
    for rep in (lbi_fx.verify(make(), lbi_fx.every(2, "layers"), example_inputs=ex),
                lbi_fx.verify(lbi, example_inputs=ex)):
        assert "causal" not in str(rep).lower()
        assert rep.causality.sequence is False
    with pytest.raises(lbi_fx.RewriteError, match="no sequence axis"):
        lbi_fx.transform(make(), lbi_fx.every(2, "layers"), rank=4, example_inputs=ex,
                         pool="causal")
