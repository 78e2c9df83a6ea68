"""Hugging Face causal LMs as they come: ``GPT2LMHeadModel(config)`` / ``LlamaForCausalLM``
with ``use_cache`` at its default (on) and in training mode (dropout on for GPT-2).

Capture runs them with the KV cache off and says so in one warning line; the LBI model
returns the same ``ModelOutput`` class, and its scan gradients match autograd.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers  # part of the test extra: a missing one fails the suite, never skips

import lbi_fx
from lbi_fx.testing import gradient_parity

TOL = {torch.float64: dict(rel_l2=1e-12, cosine=1 - 1e-12),
       torch.float32: dict(rel_l2=1e-6, cosine=0.999999)}
# Llama computes its rotary tables in float32 (`.float()`) whatever the model dtype, so fp64
# carries float32 rounding through the positions (measured 2.6e-12): 1e-10, as in
# tests/test_backends.py's exported Llama.
LLAMA_FP64 = dict(rel_l2=1e-10, cosine=1 - 1e-10)
VOCAB = 128


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                  n_head=4)
    return transformers.GPT2LMHeadModel(cfg), "transformer.h"


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg), "model.layers"


def _tokens(seed: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_hf_model_as_it_comes_transforms_and_is_exact(make, dtype):
    torch.manual_seed(0)
    model, layers = make()
    model = model.to(dtype)
    assert model.config.use_cache and model.training  # the defaults this test is about
    idx, targets = _tokens(1), _tokens(2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lbi = lbi_fx.transform(model, lbi_fx.every(1, layers), rank=8, example_inputs=(idx,))
    said = [str(w.message) for w in seen if "use_cache=False" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0], [str(w.message) for w in seen]
    assert model.config.use_cache  # the user's config is left as it was
    with torch.no_grad():
        ref_type = type(model(idx, use_cache=False))
    out = lbi(idx)
    assert type(out) is ref_type and out.logits.shape == (2, 16, VOCAB)
    assert out.logits.dtype == dtype

    def loss_fn(o):
        return F.cross_entropy(o.logits.flatten(0, 1), targets.flatten())

    tol = LLAMA_FP64 if (make is _llama and dtype == torch.float64) else TOL[dtype]
    gradient_parity(lbi, (idx,), loss_fn).assert_close(**tol)


def test_hf_model_without_example_inputs_says_what_to_pass():
    from lbi_fx.passes.capture import capture

    model, _ = _gpt2()
    with pytest.raises(lbi_fx.TraceError, match=r"GPT2LMHeadModel.*example_inputs="):
        capture(model)


def test_gpt2_as_it_comes_gets_causal_interfaces_without_a_causality_warning():
    """The ids reach the embedding through ``view(-1, L)`` (a reshape to their own shape in
    the exported graph): the sequence axis is still derived, so pool='auto' picks causal."""
    import warnings

    import transformers

    import lbi_fx

    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=4,
                                     n_head=4)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lbi = lbi_fx.transform(transformers.GPT2LMHeadModel(config), lbi_fx.every(2, "transformer.h"),
                               rank=16, example_inputs=(ids,))
    assert lbi.pool == "causal"
    assert not [w for w in caught if issubclass(w.category, lbi_fx.CausalityWarning)]
