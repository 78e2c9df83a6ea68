"""Hooks are run or refused, never ignored (issue #35, item 4). A hook added after
``transform`` to a submodule the capture traced through (a block, attention, MLP) would
never run - its code is inlined in the region programs - so the forward refuses it,
naming the module; a leaf module is called, and its hooks run."""

from __future__ import annotations

import pytest
import torch

import lbi_fx
from lbi_fx.models.transformer import build
from lbi_fx.testing import gradient_parity


def _gpt():
    model, ex = build(n_layer=2, n_embd=16, n_head=2, seq=8, batch=2)
    return model.double(), ex


def _logits(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "logits", out)


HOOKS = {
    "forward": lambda m: m.register_forward_hook(lambda mod, i, o: o * 2),
    "forward pre": lambda m: m.register_forward_pre_hook(lambda mod, i: (i[0] * 2,)),
    "backward": lambda m: m.register_full_backward_hook(lambda mod, gi, go: None),
}


@pytest.mark.parametrize("kind", list(HOOKS))
@pytest.mark.parametrize("on", ["lbi", "model"])
@pytest.mark.parametrize("path", ["layers.0", "layers.1.attn", "layers.0.mlp"])
def test_hook_on_a_traced_through_module_is_refused_by_name(kind, on, path):
    model, ex = _gpt()
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=4, example_inputs=ex)
    handle = HOOKS[kind]((lbi if on == "lbi" else model).get_submodule(path))
    with pytest.raises(lbi_fx.HookError, match=rf"a {kind} hook .*'{path}'.*"
                                               rf"leaf_modules=\['{path}'\]"):
        lbi(ex[0])
    handle.remove()
    lbi(ex[0])  # without it, the model runs again


def test_hooks_present_at_capture_and_on_the_lbi_module_are_fine():
    model, ex = _gpt()
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=4, example_inputs=ex)
    seen = []
    lbi.register_forward_hook(lambda mod, i, o: seen.append(1))
    lbi(ex[0])
    assert seen == [1]


def test_a_hook_on_a_leaf_module_runs():
    model, ex = _gpt()
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=4, example_inputs=ex,
                           leaf_modules=["layers.0.mlp"])
    leaf = lbi.get_submodule("layers.0.mlp")
    with torch.no_grad():
        before = _logits(lbi(ex[0]))
    calls = []
    leaf.register_forward_hook(lambda mod, i, o: (calls.append(1), o * 1.5)[1])
    with torch.no_grad():
        after = _logits(lbi(ex[0]))
    assert calls == [1]
    assert not torch.allclose(before, after)  # the hook's output is the one used
    gradient_parity(lbi, ex).assert_close(rel_l2=1e-10, cosine=1 - 1e-10)
