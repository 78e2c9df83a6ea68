"""Newcomer papercuts, round 2 (issue 25): warnings that fire for choices made by design,
a Hugging Face warning that cannot be filtered, calls that do not take the original
signature, ``recompute`` refused on exported blocks, keyword mismatches in ``pgf``, and a
parity report silent about float32 inside a float64 model.

Hugging Face models use tiny configs, as in ``tests/test_huggingface.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import lbi_fx
from lbi_fx import pgf
from lbi_fx.testing import DEFAULT_TOL, gradient_parity
from tests.test_bad_inputs import net, x64

VOCAB = 128


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def _tokens(seed: int = 0, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _recorded(fn):
    """Run ``fn`` with every warning recorded; return (result, warnings)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn()
    return out, list(seen)


def _ours(seen, category=lbi_fx.FallbackWarning) -> list:
    return [w for w in seen if issubclass(w.category, category)]



def small_net():
    """CLI factory: three blocks on (B, D) inputs, two interface Jacobians."""
    return net(), (x64(),)


# --------------------------------------------------------------------- 3. FallbackWarning


def _oom_in_batched_vjps(monkeypatch) -> None:
    """Batched VJPs raise CUDA out-of-memory; per-row VJPs work (a real fallback). Defined
    here, not imported: the warning must name this file's line as the caller."""
    real = torch.autograd.grad

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)

def test_auto_on_cpu_attention_is_explained_not_warned():
    """CPU flash attention has no forward-mode rule: auto uses VJPs by design. No
    FallbackWarning at transform or at a training step; explain() says why."""
    model, (idx,) = lbi_fx.models.gpt(n_layer=2, n_embd=32, seq=16)
    lbi, seen = _recorded(lambda: lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=3,
                                                   example_inputs=(idx,)))
    _, later = _recorded(lambda: lbi(idx).float().pow(2).mean().backward())
    assert _ours(seen) == [] and _ours(later) == [], [str(w.message) for w in seen + later]
    row = lbi.explain()[0]
    assert row.jacobian == "reuse" and "forward unsupported" in row.why and not row.fallbacks
    assert "flash_attention" in row.unsupported["forward"]
    assert "auto's probe: forward-mode Jacobian" in str(lbi.explain())


def test_a_real_fallback_warns_once_per_model_at_the_users_line(monkeypatch):
    """Batched VJPs that fail where jacobian="reuse" asked for them cost r per-row VJPs:
    worth one warning for the model (not one per region), on this file's line."""
    _oom_in_batched_vjps(monkeypatch)
    lbi, seen = _recorded(lambda: lbi_fx.transform(net(), lbi_fx.every(1, "blocks"), 3,
                                                   example_inputs=(x64(),), jacobian="reuse"))
    ours = _ours(seen)
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert ours[0].filename == __file__
    text = str(ours[0].message)
    assert "OutOfMemoryError" in text and "once per model" in text and "lbi.explain()" in text
    assert lbi.region_choices.batched == {0: False, 1: False}
    assert str(lbi.explain()).count("fallback: batched VJPs") == 2


def test_from_the_cli_a_fallback_points_to_inspect_explain(monkeypatch, capsys):
    """On the command line there is no ``lbi`` to call explain() on: the warning names
    ``lbi-fx inspect ... --explain``, which prints the same listing."""
    from lbi_fx.cli import main

    _oom_in_batched_vjps(monkeypatch)
    _, seen = _recorded(lambda: main(["inspect", "tests.test_papercuts_runtime:small_net",
                                      "--regions", "blocks.0;blocks.1;blocks.2", "--rank", "3",
                                      "--jacobian", "reuse", "--explain"]))
    out = capsys.readouterr().out
    ours = _ours(seen)
    assert len(ours) == 1 and "lbi-fx inspect" in str(ours[0].message), [
        str(w.message) for w in seen]
    assert "--explain" in str(ours[0].message) and "lbi.explain()" not in str(ours[0].message)
    assert "per-region choices" in out and out.count("fallback: batched VJPs") == 2
    assert "rewritten forward graph" not in out  # --explain alone: the listing only


# ------------------------------------------------------------- 4. the use_cache warning

@pytest.fixture(scope="module")
def bert():
    """A tiny BertModel (config.use_cache is True, but BERT never caches), captured with
    its attention mask; transform's warnings recorded."""
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    lbi, seen = _recorded(lambda: lbi_fx.transform(
        model, lbi_fx.every(1, "encoder.layer"), rank=3, example_inputs=(_tokens(), mask)))
    return model, lbi, mask, seen


@pytest.fixture(scope="module")
def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                  n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    lbi, seen = _recorded(lambda: lbi_fx.transform(
        model, lbi_fx.every(1, "transformer.h"), rank=3, example_inputs=(_tokens(),)))
    return model, lbi, seen


def test_bert_has_no_cache_to_warn_about(bert):
    model, _, _, seen = bert
    assert model.config.use_cache  # on in the config: the case this is about
    said = [str(w.message) for w in seen if "cache" in str(w.message)]
    assert said == [] and _ours(seen, lbi_fx.CaptureWarning) == []


def test_a_cached_lm_says_so_once_with_its_own_class(gpt2):
    model, _, seen = gpt2
    ours = _ours(seen, lbi_fx.CaptureWarning)
    assert len(ours) == 1 and "use_cache=False" in str(ours[0].message)
    assert "GPT2LMHeadModel" in str(ours[0].message) and ours[0].filename == __file__
    assert issubclass(lbi_fx.CaptureWarning, UserWarning)
    assert [w for w in seen if "use_cache" in str(w.message)] == ours  # nothing else says it
    assert model.config.use_cache
    with warnings.catch_warnings():  # the class makes it filterable
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=lbi_fx.CaptureWarning)
        warnings.filterwarnings("ignore", category=lbi_fx.CausalityWarning)
        lbi_fx.transform(model, lbi_fx.every(1, "transformer.h"), rank=3,
                         example_inputs=(_tokens(),))


# ---------------------------------------------------- 8. the original call signature

def _seeded(fn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fn()


def test_keywords_of_captured_inputs_go_to_their_places(bert):
    """BERT captured with (input_ids, attention_mask): calls by keyword, in any order,
    give what the positional call gives (they used to be flattened in call order)."""
    _, lbi, mask, _ = bert
    idx = _tokens(3)
    ref = _seeded(lambda: lbi(idx, mask).last_hidden_state)
    for call in (lambda: lbi(idx, attention_mask=mask),
                 lambda: lbi(attention_mask=mask, input_ids=idx)):
        torch.testing.assert_close(_seeded(call).last_hidden_state, ref, rtol=0, atol=0)
    with pytest.raises(lbi_fx.InputError, match="attention_mask is missing"):
        lbi(idx)


def test_a_keyword_the_capture_did_not_include_is_refused_by_name(gpt2):
    _, lbi, _ = gpt2
    idx, mask = _tokens(3), torch.ones(2, 16, dtype=torch.long)
    with pytest.raises(lbi_fx.InputError, match=r"attention_mask= was not part of the capture.*"
                       r"example_inputs=\(input_ids, None, attention_mask\)"):
        lbi(idx, attention_mask=mask)
    ref = _seeded(lambda: lbi(idx).logits)
    for call in (lambda: lbi(input_ids=idx), lambda: lbi(idx, use_cache=False),
                 lambda: lbi(idx, attention_mask=None)):  # the defaults, as captured
        torch.testing.assert_close(_seeded(call).logits, ref, rtol=0, atol=0)


# ------------------------------------- 9 and 11. exported Mamba-1: recompute, precision

@pytest.fixture(scope="module")
def mamba_recompute():
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4,
                                   num_hidden_layers=2, expand=2, conv_kernel=4)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lbi_fx.transform(model, lbi_fx.every(1, "backbone.layers"), rank=3,
                                example_inputs=(_tokens(),), jacobian="recompute")


def test_recompute_runs_on_an_exported_ssm_block(mamba_recompute):
    """vmap over the exported block: export's aten.sym_size reads (no batching rule) are
    the tensor's own .size(), which vmaps."""
    lbi = mamba_recompute
    assert lbi.capture == "export" and lbi.jacobian == "recompute"
    targets = {str(n.target) for n in lbi.rewritten_graph.graph.nodes}
    assert not any(t.startswith("aten.sym_") for t in targets)
    report = gradient_parity(lbi, (_tokens(1),), lambda o: o.logits.double().pow(2).mean())
    # HF Mamba computes in float32 inside this float64 model (see the next test): measured
    # 1.2e-11 global, 1.1e-10 worst tensor
    report.assert_close(rtol=1e-8)


def test_parity_report_names_float32_inside_a_float64_model(mamba_recompute):
    report = gradient_parity(mamba_recompute, (_tokens(1),))
    assert report.notes and "float32" in report.notes[0] and "float64" in report.notes[0]
    assert "backbone.layers.0.mixer" in report.notes[0]
    assert "note: the parameters are float64" in str(report)
    # loosen nothing: the tolerances are still those of the report's dtype
    assert (report.tol_rel_l2, report.tol_cosine) == DEFAULT_TOL[getattr(torch, report.dtype)]


def test_a_float64_model_without_casts_has_no_note():
    from tests.test_bad_inputs import transform

    report = gradient_parity(transform(net()), (x64(),))
    assert report.notes == [] and "note:" not in str(report)


# --------------------------------------------------------------- 10. pgf keywords

def _scan_inputs(seed: int = 0, b: int = 2, d: int = 3, n: int = 4, length: int = 11):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return (r(b, d, length), r(b, d, length, scale=0.5), -torch.rand(d, n, generator=g,
            dtype=torch.float64), r(b, n, length), r(b, n, length), r(d), r(b, d, length),
            r(d, scale=0.5))


def test_selective_scan_jvp_takes_the_keywords_of_selective_scan():
    u, delta, A, B, C, D, z, bias = _scan_inputs()
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    tangents = tuple(torch.randn_like(t) for t in (u, delta, A, B, C))
    y, y_dot = pgf.selective_scan_jvp((u, delta, A, B, C), tangents, tile=4, **kw)
    y_pos, y_dot_pos = pgf.selective_scan_jvp((u, delta, A, B, C, D, z, bias),
                                              tangents + (None,) * 3, tile=4,
                                              delta_softplus=True)
    torch.testing.assert_close(y, y_pos, rtol=0, atol=0)
    torch.testing.assert_close(y_dot, y_dot_pos, rtol=0, atol=0)
    torch.testing.assert_close(y, pgf.selective_scan(u, delta, A, B, C, **kw))
    # a keyword primal's tangent at its place in an 8-long tangents tuple
    d_bias = torch.randn_like(bias)
    _, dot_kw = pgf.selective_scan_jvp((u, delta, A, B, C), (None,) * 7 + (d_bias,), **kw)
    _, dot_pos = pgf.selective_scan_jvp((u, delta, A, B, C, D, z, bias), (None,) * 7 + (d_bias,),
                                        delta_softplus=True)
    torch.testing.assert_close(dot_kw, dot_pos, rtol=0, atol=0)
    with pytest.raises(lbi_fx.InputError, match="delta_bias given twice"):
        pgf.selective_scan_jvp((u, delta, A, B, C, D, z, bias), (None,) * 8, delta_bias=bias)
