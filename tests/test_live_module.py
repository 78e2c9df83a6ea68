"""A transformed model is a live ``nn.Module``: what users do between steps keeps the
scan backward exact, or is refused by name at the call that would break it.

Each test is one row of issue #22's table: train/eval (BatchNorm, dropout under fx and
torch.export), freezing and unfreezing after transform, ``load_state_dict(assign=True)``
and ``.to(dtype)`` on exported Hugging Face models. Every exactness claim compares the
scan backward with plain autograd through the same module, per parameter.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lbi_fx
from lbi_fx.checks import default_loss
from lbi_fx.models import transformer
from tests.models import BatchNormNet

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _grads(lbi, inputs, mode: str, seed: int = 5) -> dict:
    """Parameter gradients of one forward/backward (same RNG: same dropout masks)."""
    before = lbi.backward
    lbi.backward = mode
    lbi.zero_grad(set_to_none=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            default_loss(lbi(*inputs)).backward()
    finally:
        lbi.backward = before
    out = {n: None if p.grad is None else p.grad.detach().clone() for n, p in lbi.named_parameters()}
    lbi.zero_grad(set_to_none=True)
    return out


def assert_exact(lbi, inputs, dtype=torch.float64, seed: int = 5) -> dict:
    """Scan and autograd give the same gradient for every parameter (None where None)."""
    scan, ref = _grads(lbi, inputs, "scan", seed), _grads(lbi, inputs, "autograd", seed)
    tol = TOL[dtype]
    for name in ref:
        assert (scan[name] is None) == (ref[name] is None), (
            f"{name}: scan grad {'None' if scan[name] is None else 'set'}, autograd "
            f"{'None' if ref[name] is None else 'set'}")
        if ref[name] is None:
            continue
        err = float((scan[name] - ref[name]).norm())
        scale = float(ref[name].norm()) + 1e-30
        assert err <= tol * scale + 1e-14, f"{name}: rel error {err / scale:.2e} > {tol:g}"
    return ref


def _gpt(dtype=torch.float64, dropout: float = 0.0, export: bool = False):
    build = transformer.build_export if export else transformer.build
    model, (idx,) = build(n_layer=4, n_embd=16, n_head=2, block_size=16, seq=8, batch=2,
                          dropout=dropout)
    return model.to(dtype), idx


def _transform(model, idx, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export fallback, fallbacks: not what is tested
        return lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                                **kw)


# -- train / eval ---------------------------------------------------------------------
def test_train_turning_batchnorm_batch_mixing_is_refused_at_the_call_and_undone():
    model = BatchNormNet().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "blocks"), rank=3, example_inputs=(x,))
    with pytest.raises(lbi_fx.BatchMixingError, match=r"lbi\.train\(\).*blocks\.0\.bn"):
        lbi.train()
    assert not any(m.training for m in lbi.modules()), "the refused .train() was not undone"
    assert_exact(lbi, (x,))


def test_submodule_batchnorm_switched_to_train_is_refused_at_the_next_forward():
    model = BatchNormNet().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "blocks"), rank=3, example_inputs=(x,))
    lbi.get_submodule("blocks.1.bn").train()
    with pytest.raises(lbi_fx.BatchMixingError, match=r"blocks\.1\.bn"):
        lbi(x)


def test_training_everything_but_frozen_batchnorm_stays_exact():
    model = BatchNormNet().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "blocks"), rank=3, example_inputs=(x,))
    for m in lbi.modules():
        m.training = not isinstance(m, nn.modules.batchnorm._BatchNorm)
    assert_exact(lbi, (x,))


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_dropout_follows_eval_and_train(export):
    model, idx = _gpt(dropout=0.2, export=export)
    lbi = _transform(model, idx)
    assert lbi.capture.startswith("export" if export else "symbolic_trace")
    lbi.eval()
    with torch.no_grad():
        a, b = lbi(idx), lbi(idx)
    assert torch.equal(a, b), "dropout still on after lbi.eval()"
    with torch.no_grad():  # eval output = the same model without dropout
        ref = copy.deepcopy(model)
        for m in ref.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if hasattr(m, "dropout") and isinstance(m.dropout, float):
                m.dropout = 0.0
        plain = _transform(ref.eval(), idx)
        plain.load_state_dict(lbi.state_dict())
        torch.testing.assert_close(a, plain(idx), rtol=1e-12, atol=1e-12)
    lbi.train()
    assert _drops_out(lbi, idx), "dropout off after lbi.train()"
    assert_exact(lbi, (idx,))


def _drops_out(lbi, idx) -> bool:
    """Two forwards from different seeds differ: dropout is on."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        c = lbi(idx)
        torch.manual_seed(2)
        return not torch.equal(c, lbi(idx))


def test_model_transformed_in_eval_mode_gets_dropout_back_in_train():
    model, idx = _gpt(dropout=0.2)
    lbi = _transform(model.eval(), idx)
    assert not lbi.training
    with torch.no_grad():
        assert torch.equal(lbi(idx), lbi(idx))
    lbi.train()
    assert _drops_out(lbi, idx), "a model transformed in eval mode never drops out"
    assert_exact(lbi, (idx,))


class _Branchy(nn.Module):
    """Adds noise in training mode through a Python branch: no constant can follow it."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.emb = nn.Linear(3, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(2))

    def forward(self, x):
        h = self.emb(x)
        for blk in self.blocks:
            h = h + torch.tanh(blk(h))
            if self.training:
                h = h * 0.5
        return h


def test_mode_change_a_capture_cannot_follow_is_refused_by_name():
    model = _Branchy().double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "blocks"), rank=3, example_inputs=(x,),
                           pool="mean")
    with pytest.raises(lbi_fx.ModeError, match="self.training"):
        lbi.eval()
    assert all(m.training for m in lbi.modules())
    assert_exact(lbi, (x,))


# -- freezing, unfreezing, replacing parameters ---------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_parameters_unfrozen_after_transform_get_exact_gradients(dtype):
    model, idx = _gpt(dtype)
    for p in model.get_submodule("layers.0").parameters():
        p.requires_grad_(False)
    lbi = _transform(model, idx)
    for p in lbi.parameters():
        p.requires_grad_(True)
    ref = assert_exact(lbi, (idx,), dtype)
    assert all(ref[n] is not None for n in ref if n.startswith("layers.0."))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_parameters_frozen_after_transform_are_skipped_exactly(dtype):
    model, idx = _gpt(dtype)
    lbi = _transform(model, idx)
    for p in lbi.get_submodule("layers.1").parameters():
        p.requires_grad_(False)
    ref = assert_exact(lbi, (idx,), dtype)
    assert all(ref[n] is None for n in ref if n.startswith("layers.1."))
    assert all(ref[n] is not None for n in ref if n.startswith("layers.2."))


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_load_state_dict_assign_replaces_what_the_programs_use(export):
    model, idx = _gpt(export=export)
    lbi = _transform(model, idx)
    with torch.no_grad():
        lbi(idx)  # programs built with the old parameters
    gen = torch.Generator().manual_seed(3)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
          if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else copy.deepcopy(v)
          for k, v in lbi.state_dict().items()}
    lbi.load_state_dict(sd, assign=True)
    twin = _transform(copy.deepcopy(model), idx)
    twin.load_state_dict(sd)  # copied in place: the programs' own tensors
    with torch.no_grad():
        torch.testing.assert_close(lbi(idx), twin(idx), rtol=1e-12, atol=1e-12)
    ref = assert_exact(lbi, (idx,))
    assert all(g is not None for n, g in ref.items() if n.startswith("layers."))


# -- dtype of exported models -----------------------------------------------------------
def _hf(kind: str):
    import transformers  # test extra: a missing one fails the suite (test_suite_policy)

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2,
                                      n_head=2)
        return transformers.GPT2LMHeadModel(cfg), "transformer.h"
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32)
    return transformers.Qwen2ForCausalLM(cfg), "model.layers"


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_exported_hf_model_follows_to_dtype_and_stays_exact(kind):
    model, layers = _hf(kind)
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lbi = lbi_fx.transform(model, lbi_fx.every(1, layers), rank=4, example_inputs=(idx,))
    assert lbi.capture.startswith("export")
    lbi.double()
    out = lbi(idx).logits
    assert out.dtype == torch.float64
    lbi.eval()  # dropout off (GPT-2): compare with the fp32 model's logits
    with torch.no_grad():
        lbi.to(torch.bfloat16)
        assert lbi(idx).logits.dtype == torch.bfloat16
        lbi.float()
        f32 = lbi(idx).logits
        lbi.double()
        torch.testing.assert_close(lbi(idx).logits.float(), f32, rtol=1e-4, atol=1e-4)
    lbi.train()

    scan = _hf_grads(lbi, idx, "scan")
    ref = _hf_grads(lbi, idx, "autograd")
    for name in ref:
        assert (scan[name] is None) == (ref[name] is None), name
        if ref[name] is not None:
            err = float((scan[name] - ref[name]).norm() / (ref[name].norm() + 1e-30))
            assert err <= 1e-9, f"{name}: {err:.2e}"


def _hf_grads(lbi, idx, mode):
    lbi.backward = mode
    lbi.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        default_loss(lbi(idx).logits).backward()
    out = {n: None if p.grad is None else p.grad.clone() for n, p in lbi.named_parameters()}
    lbi.zero_grad(set_to_none=True)
    lbi.backward = "scan"
    return out


# -- hooks ----------------------------------------------------------------------------
def test_parameter_hooks_run_once_as_under_autograd():
    """A tensor hook that rescales a parameter's gradient ran twice under the scan (once in
    the region's own VJP, once when the chain handed the gradient to autograd): 2x."""
    model, idx = _gpt()
    lbi = _transform(model, idx)
    p = lbi.get_parameter("layers.0.mlp.c_fc.weight")
    calls: list[str] = []
    p.register_hook(lambda g: (calls.append("hook"), g * 3)[1])
    p.register_post_accumulate_grad_hook(lambda t: calls.append("post"))
    grads = {}
    for mode in ("autograd", "scan"):
        calls.clear()
        grads[mode] = _grads(lbi, (idx,), mode)["layers.0.mlp.c_fc.weight"]
        assert calls == ["hook", "post"], (mode, calls)
    torch.testing.assert_close(grads["scan"], grads["autograd"], rtol=1e-10, atol=0)


# -- the depth designs (#23) follow the same changes ----------------------------------
@pytest.mark.parametrize("design", [
    lbi_fx.per_position(),
    {"pool": "causal", "rank": 4, "segment_len": 2, "summary": "inclusive",
     "decoder_window": 2, "decoder_at": "every"},
], ids=["per_position", "inclusive_window_every_block"])
def test_depth_designs_stay_exact_through_what_users_do_between_steps(design):
    """Dropout train/eval, freezing and unfreezing, load_state_dict(assign=True) and
    .to(float32) on the interfaces that per_position() and decoder_at="every" add."""
    model, idx = _gpt(dropout=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), example_inputs=(idx,), **design)
    with torch.no_grad():  # non-zero decoders: the interface carries something
        for n, p in lbi.named_parameters():
            if n.startswith("lbi.dec_"):
                p.add_(0.05 * torch.randn_like(p))
    assert_exact(lbi.train(), (idx,))
    assert_exact(lbi.eval(), (idx,))
    lbi.train()
    for p in lbi.get_submodule("layers.1").parameters():
        p.requires_grad_(False)
    ref = assert_exact(lbi, (idx,))
    assert all(ref[n] is None for n in ref if n.startswith("layers.1."))
    for p in lbi.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
          if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else copy.deepcopy(v)
          for k, v in lbi.state_dict().items()}
    lbi.load_state_dict(sd, assign=True)
    ref = assert_exact(lbi, (idx,))
    assert all(ref[n] is not None for n in ref if n.startswith(("layers.", "lbi.dec_")))
    assert_exact(lbi.to(torch.float32), (idx,), torch.float32)
