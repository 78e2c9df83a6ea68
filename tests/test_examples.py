"""Fast checks of the example model, corpus and training loop used by the demo."""

import math

import pytest
import torch
import torch.fx

from lbi_fx.models.data import SEP, load_corpus
from lbi_fx.models.training import format_table, train_lm, train_side_by_side
from lbi_fx.models.transformer import GPT, GPTConfig, build, build_export

TINY = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


def _idx(b=2, t=16, seed=0):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=300_000)


def test_forward_shape():
    m = GPT(TINY)
    assert m(_idx(3, 20)).shape == (3, 20, 256)


def test_tie_weights():
    m = GPT(TINY)
    assert m.head.weight is m.wte.weight
    untied = GPT(GPTConfig(**{**TINY.__dict__, "tie_weights": False}))
    assert untied.head.weight is not untied.wte.weight
    n_tied = sum(p.numel() for p in m.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 256 * TINY.n_embd


def test_symbolic_trace_matches_eager():
    m = GPT(TINY).eval()
    gm = torch.fx.symbolic_trace(m)
    assert any(n.target is torch.arange for n in gm.graph.nodes)
    for t in (16, 9):  # sequence length stays symbolic in the traced graph
        x = _idx(2, t)
        torch.testing.assert_close(gm(x), m(x))


def test_explicit_mask_needs_export():
    m = GPT(TINY, explicit_mask=True).eval()
    with pytest.raises(TypeError):
        torch.fx.symbolic_trace(m)
    x = _idx(2, 16)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))
    # Same weights through both attention paths give the same logits.
    ref = GPT(TINY).eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(ref(x), m(x), atol=1e-5, rtol=1e-4)


def test_build_factories():
    for fn in (build, build_export):
        model, args = fn(n_layer=2, n_embd=32, n_head=2, batch=3, seq=8)
        assert isinstance(model, GPT) and isinstance(args, tuple) and len(args) == 1
        (idx,) = args
        assert idx.shape == (3, 8) and idx.dtype == torch.int64
        assert model(idx).shape == (3, 8, 256)
    (m1, (a1,)), (m2, (a2,)) = build(seed=1), build(seed=1)
    assert torch.equal(a1, a2) and torch.equal(m1(a1), m2(a2))
    assert build_export(seed=1)[0].layers[0].attn.explicit_mask


def test_corpus_split_by_file(corpus):
    assert corpus.train.dtype == torch.uint8 and corpus.train.numel() > 0
    assert corpus.val.numel() > 0 and corpus.train_files and corpus.val_files
    assert not set(corpus.train_files) & set(corpus.val_files)
    # One separator per file, so the byte streams hold exactly the listed files.
    assert int((corpus.train == SEP[0]).sum()) == len(corpus.train_files)
    assert int((corpus.val == SEP[0]).sum()) == len(corpus.val_files)
    assert corpus.train.numel() + corpus.val.numel() <= 300_000 + len(SEP)
    assert load_corpus(max_bytes=300_000).train_files == corpus.train_files  # deterministic


def test_get_batch(corpus):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        x, y = corpus.get_batch(split, 4, 33, g)
        assert x.shape == y.shape == (4, 33) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
    a = corpus.get_batch("train", 2, 8, torch.Generator().manual_seed(5))
    b = corpus.get_batch("train", 2, 8, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0])


def test_train_lm(corpus):
    torch.manual_seed(0)
    model = GPT(TINY)
    lines = []
    hist = train_lm(
        model, corpus, steps=8, batch_size=4, seq_len=32, eval_every=4, log=lines.append
    )
    assert [r["step"] for r in hist] == list(range(1, 9))
    assert all(math.isfinite(r["train_loss"]) for r in hist)
    evals = [r for r in hist if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and len(lines) == 2
    assert all(math.isfinite(r["val_loss"]) for r in evals)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]  # starts near ln(256)
    assert model.training


def test_train_side_by_side_same_batches(corpus):
    torch.manual_seed(0)
    a = GPT(TINY)
    b = GPT(TINY)
    b.load_state_dict(a.state_dict())
    out = []
    hists = train_side_by_side(
        {"a": a, "b": b}, corpus, steps=3, batch_size=2, seq_len=16, eval_every=3, log=out.append
    )
    # Identical models on identical batches follow identical loss curves.
    assert [r["train_loss"] for r in hists["a"]] == [r["train_loss"] for r in hists["b"]]
    assert format_table(hists) in out
