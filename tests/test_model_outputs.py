"""Model outputs wherever logits are expected (issue 37): ``train_lm``,
``train_side_by_side``, ``evaluate``, ``prefix_loss`` and the CLI's factory loss take a
model returning a Hugging Face ``ModelOutput``, a dict or a tuple, with ``logits=``
picking the tensor (a key or attribute name, an index, or a callable); one selection
rule (``lbi_fx.outputs.select_output``) for all of them, which never reads transformers'
deprecated cache attributes."""

from __future__ import annotations

import types

import pytest
import torch
import transformers
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

import lbi_fx
from lbi_fx.models.data import ByteCorpus
from lbi_fx.models.training import evaluate, train_lm, train_side_by_side
from lbi_fx.outputs import select_output
from lbi_fx.testing import prefix_loss

pytestmark = pytest.mark.usefixtures("quiet_transformers")

L = torch.randn(2, 5, 7)


@pytest.fixture
def deprecations(monkeypatch):
    from transformers.utils import generic

    said: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    return said


@pytest.mark.parametrize("out, selector", [
    (L, None),
    (CausalLMOutputWithPast(logits=L, cache=object()), None),
    ({"logits": L, "aux": 1.0}, None),
    ((L, torch.zeros(1)), None),
    ([L], None),
    (types.SimpleNamespace(logits=L), None),
    ({"scores": L}, "scores"),
    (CausalLMOutputWithPast(loss=torch.zeros(()), logits=L), "logits"),
    (types.SimpleNamespace(scores=L), "scores"),
    ((torch.zeros(1), L), 1),
    ((torch.zeros(1), L), -1),
    (CausalLMOutputWithPast(loss=torch.zeros(()), logits=L), 1),
    ({"a": 0, "b": L}, 1),
    ({"nested": {"logits": L}}, lambda o: o["nested"]["logits"]),
], ids=["tensor", "model-output", "dict", "tuple", "list", "attribute", "key", "mo-key",
        "attr-name", "index", "negative-index", "mo-index", "dict-index", "callable"])
def test_select_output_finds_the_logits(out, selector, deprecations):
    assert select_output(out, selector) is L
    assert deprecations == []  # a ModelOutput is read by its keys


@pytest.mark.parametrize("out, selector, match", [
    ({"scores": L}, None, r"dict with keys \['scores'\]\): it has no 'logits' key"),
    ({"scores": L}, "logits", r"no key 'logits'"),
    ((L,), "logits", r"no key or attribute 'logits'"),
    ((L,), 3, r"index 3 is out of range"),
    (L, 0, r"logits=0 indexes a tuple or list"),
    ({"logits": [1, 2]}, None, r"gives a list, not a tensor"),
    (object(), None, r"neither a tensor"),
    ((L,), 1.5, r"logits= takes a key or attribute name, an index or a callable"),
])
def test_select_output_says_what_the_output_holds(out, selector, match):
    with pytest.raises(lbi_fx.InputError, match=match):
        select_output(out, selector)


class HFStyle(nn.Module):
    """The byte GPT behind a Hugging Face-style output: a ModelOutput, a dict or a tuple
    with the logits second."""

    def __init__(self, form: str):
        super().__init__()
        self.gpt, _ = lbi_fx.models.gpt(n_layer=2, n_embd=16, n_head=2, seq=8)
        self.form = form

    def forward(self, idx):
        logits = self.gpt(idx)
        if self.form == "model-output":
            return CausalLMOutputWithPast(logits=logits)
        if self.form == "dict":
            return {"hidden": logits.detach(), "scores": logits}
        return (logits.sum(), logits)


def _corpus() -> ByteCorpus:
    g = torch.Generator().manual_seed(0)
    return ByteCorpus(train=torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8),
                      val=torch.randint(0, 256, (1024,), generator=g, dtype=torch.uint8))


TRAIN = dict(steps=2, batch_size=2, seq_len=8, eval_every=2, eval_batches=1, log=None)


@pytest.mark.parametrize("form, selector", [("model-output", None), ("dict", "scores"),
                                            ("tuple", 1), ("tuple", lambda o: o[1])])
def test_train_lm_takes_model_outputs(form, selector):
    corpus = _corpus()
    torch.manual_seed(0)
    model = HFStyle(form)
    plain = lbi_fx.models.gpt(n_layer=2, n_embd=16, n_head=2, seq=8)[0]
    plain.load_state_dict(model.gpt.state_dict())
    got = train_lm(model, corpus, logits=selector, **TRAIN)
    ref = train_lm(plain, corpus, **TRAIN)
    assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in ref])
    assert got[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"])
    assert evaluate(model, corpus, batch_size=2, seq_len=8, eval_batches=1,
                    logits=selector) == pytest.approx(evaluate(plain, corpus, batch_size=2,
                                                               seq_len=8, eval_batches=1))


def test_train_lm_without_a_selector_says_what_to_pass():
    with pytest.raises(lbi_fx.InputError, match=r"lm_loss cannot find the logits.*keys "
                                                 r"\['hidden', 'scores'\].*pass logits="):
        train_lm(HFStyle("dict"), _corpus(), **TRAIN)


@pytest.mark.filterwarnings("ignore::lbi_fx.CaptureWarning")
def test_train_side_by_side_with_a_hugging_face_model_and_its_rewrite():
    """A transformers GPT-2 and its LBI rewrite, both returning CausalLMOutput..., trained
    side by side with no wrapper; a selector per model where their outputs differ."""
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=2,
                                  n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    idx = torch.randint(0, 256, (2, 8))
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "transformer.h"), rank=4,
                           example_inputs=(idx,), pool="mean")
    hist = train_side_by_side({"hf": model, "lbi": lbi, "tuple": HFStyle("tuple")},
                              _corpus(), logits={"tuple": 1}, **TRAIN)
    assert all(len(h) == 2 and h[-1]["val_loss"] > 0 for h in hist.values())


def test_prefix_loss_takes_a_selector():
    torch.manual_seed(0)
    model = HFStyle("dict")
    x = torch.randint(0, 256, (2, 6))
    y = torch.randint(0, 256, (2, 6))
    assert prefix_loss(model, x, y, logits="scores") == pytest.approx(prefix_loss(model.gpt, x, y))
    with pytest.raises(lbi_fx.InputError, match="prefix_loss cannot find the logits"):
        prefix_loss(model, x, y)


def test_the_cli_loss_reads_logits_from_a_model_output():
    from lbi_fx.checks import default_loss
    from lbi_fx.cli.factory import training_loss

    idx = torch.randint(0, 7, (2, 5))
    out = CausalLMOutputWithPast(logits=L.clone().requires_grad_(True))
    loss = training_loss(out, (idx,))
    assert loss is not default_loss
    value = loss(out)
    value.backward()
    assert value.shape == () and out.logits.grad is not None
