"""Hugging Face encoder-decoders as they come (issue 37): T5, BART and a Whisper-style
audio encoder with a text decoder, in training mode with ``use_cache`` at its default.

Capture turns the cache off in every config the model holds (T5's decoder stack keeps its
own copy of the config, so ``model.config.use_cache = False`` alone still returned an
``EncoderDecoderCache`` that torch.export refused); the LBI model returns the model's own
``Seq2SeqLMOutput``, and its scan gradients match autograd with regions across the decoder
layers and with regions across both stacks. Nothing lbi-fx reads from a model output
triggers transformers' "past_key_values/cache_params are deprecated" log line.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers  # part of the test extra: a missing one fails the suite, never skips

import lbi_fx
from lbi_fx.testing import gradient_parity

VOCAB = 64
TOL = {torch.float64: dict(rel_l2=1e-10, cosine=1 - 1e-10),
       torch.float32: dict(rel_l2=1e-6, cosine=0.999999)}

# T5 computes its layer norms and attention in float32 whatever the parameters' dtype (the
# report's note names them), so fp64 carries float32 rounding: measured up to 1.1e-10 per
# tensor, held to 1e-8 (as the README's Llama numbers, a model's own casts, not the scan)
T5_FP64 = dict(rel_l2=1e-8, cosine=1 - 1e-8)

pytestmark = pytest.mark.usefixtures("quiet_transformers")


def _t5():
    cfg = transformers.T5Config(d_model=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                                d_kv=16, d_ff=64, vocab_size=VOCAB)
    return transformers.T5ForConditionalGeneration(cfg), "encoder.block", "decoder.block"


def _bart():
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2,
                                  decoder_layers=2, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    return (transformers.BartForConditionalGeneration(cfg), "model.encoder.layers",
            "model.decoder.layers")


def _whisper():
    cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=32,
                                     encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     max_source_positions=8, max_target_positions=16,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=1)
    return (transformers.WhisperForConditionalGeneration(cfg), "model.encoder.layers",
            "model.decoder.layers")


def _inputs(make, dtype):
    """(encoder input, None for its attention mask, decoder ids) and LM targets."""
    g = torch.Generator().manual_seed(1)
    if make is _whisper:  # log-mel features (B, mel bins, 2 x max_source_positions)
        enc = torch.randn(2, 8, 16, generator=g).to(dtype)
    else:
        enc = torch.randint(3, VOCAB, (2, 8), generator=g)
    dec = torch.randint(3, VOCAB, (2, 6), generator=g)
    return (enc, None, dec), torch.randint(0, VOCAB, (2, 6), generator=g)


@pytest.fixture
def deprecations(monkeypatch):
    """transformers' deprecation log lines for old cache names, as lbi-fx triggers them
    (``logger.warning_once`` would say each once per process; recorded here every time)."""
    from transformers.utils import generic

    said: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    return said


def _cache_flags(model) -> list:
    return [getattr(getattr(m, "config", None), "use_cache", None) for m in model.modules()]


CASES = [(_t5, torch.float64), (_t5, torch.float32), (_bart, torch.float64),
         (_bart, torch.float32), (_whisper, torch.float32)]


@pytest.mark.parametrize("across", ["decoder", "both"])
@pytest.mark.parametrize("make,dtype", CASES,
                         ids=[f"{m.__name__[1:]}-{str(d)[-2:]}" for m, d in CASES])
def test_encoder_decoder_as_it_comes_transforms_and_is_exact(make, dtype, across,
                                                             deprecations):
    torch.manual_seed(0)
    model, enc_layers, dec_layers = make()
    model = model.to(dtype)
    assert model.training and model.config.use_cache  # the defaults this test is about
    inputs, targets = _inputs(make, dtype)
    before = _cache_flags(model)
    regions = [[f"{dec_layers}.{i}"] for i in range(2)]
    if across == "both":
        regions = [[f"{enc_layers}.{i}"] for i in range(2)] + regions
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lbi = lbi_fx.transform(model, regions, rank=8, example_inputs=inputs, pool="mean")
    said = [str(w.message) for w in seen if "use_cache=False" in str(w.message)]
    assert len(said) == 1 and type(model).__name__ in said[0], [str(w.message) for w in seen]
    assert _cache_flags(model) == before  # every config is left as it was
    with torch.no_grad():
        ref_type = type(model(*inputs, use_cache=False))
    out = lbi(*inputs)
    assert type(out) is ref_type and out.logits.shape == (2, 6, VOCAB)
    assert out.logits.dtype == dtype

    def loss_fn(o):
        return F.cross_entropy(o.logits.flatten(0, 1), targets.flatten())

    tol = T5_FP64 if (make is _t5 and dtype == torch.float64) else TOL[dtype]
    gradient_parity(lbi, inputs, loss_fn).assert_close(**tol)
    assert deprecations == []  # lbi-fx's own reads never use the deprecated cache names


def test_t5_with_use_cache_off_by_hand_transforms():
    """The case of the issue: the top-level config off by hand, the decoder's copy still on
    (it builds an EncoderDecoderCache that torch.export cannot flatten)."""
    torch.manual_seed(0)
    model, _, dec_layers = _t5()
    model.config.use_cache = False
    assert model.decoder.config.use_cache and model.decoder.config is not model.config
    inputs, _ = _inputs(_t5, torch.float32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lbi = lbi_fx.transform(model, lbi_fx.every(1, dec_layers), rank=8,
                               example_inputs=inputs, pool="mean")
    said = [str(w.message) for w in seen if isinstance(w.message, lbi_fx.CaptureWarning)]
    assert len(said) == 1 and "decoder.config.use_cache=True" in said[0], said
    assert not model.config.use_cache and model.decoder.config.use_cache  # as they were
    assert lbi(*inputs).logits.shape == (2, 6, VOCAB)


def test_reading_a_cache_from_an_output_never_uses_the_old_names(deprecations):
    from lbi_fx.passes.capture import holds_cache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    assert holds_cache(CausalLMOutputWithPast(logits=torch.zeros(1), cache=object()))
    assert not holds_cache(CausalLMOutputWithPast(logits=torch.zeros(1)))
    assert not holds_cache(torch.zeros(1)) and not holds_cache((torch.zeros(1),))
    assert deprecations == []
