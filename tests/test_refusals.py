"""Refusals versus lbi-fx's own bugs (issue 16).

A failure inside lbi-fx is a refusal (an ``LBIError`` naming the region and PyTorch's
cause) only when plain PyTorch fails on the same region too; anything else is an
``lbi_fx.InternalError`` carrying the original exception - not an ``LBIError``, so the
fuzzer's ``check`` and the bad-input catalogue count it as a failure. Bugs are injected here by
replacing one run-time function, the way a real one would show.
"""

from __future__ import annotations

import pytest
import torch

import lbi_fx
from lbi_fx import module as lbi_module
from lbi_fx import runtime
from lbi_fx.models.transformer import build
from tests.test_bad_inputs import Blk, DeadBranchInPlace, TanhInPlace, _dead_side_branch, net, x64
from tests.test_bad_inputs import transform as tf


def test_internal_error_is_not_a_refusal():
    assert not issubclass(lbi_fx.InternalError, lbi_fx.LBIError)
    err = lbi_fx.InternalError("lbi-fx failed in X", ValueError("v"))
    assert "please report" in str(err) and isinstance(err.original, ValueError)


def _broken(name: str, exc: Exception, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(runtime, name, broken)


@pytest.mark.parametrize("name, exc", [
    ("stack_jacobians", RuntimeError("stack expects each tensor to be equal size")),
    ("interface_adjoints", IndexError("list index out of range")),
    ("region_local_vjp", RuntimeError("The size of tensor a (4) must match (5)")),
    ("last_region_vjp", AttributeError("'NoneType' object has no attribute 'grad_fn'")),
], ids=["scan-op", "adjoints", "local-vjp", "seed"])
def test_bug_in_the_scan_backward_is_an_internal_error(name, exc, monkeypatch):
    """Before: a RuntimeError became a RewriteError blaming in-place ops (a 'refusal'),
    any other exception escaped raw."""
    _broken(name, exc, monkeypatch)
    with pytest.raises(lbi_fx.InternalError, match="please report") as info:
        tf(net())
    assert info.value.original is exc and info.value.__cause__ is exc
    assert "plain PyTorch" in str(info.value) or "the chain" in str(info.value)


def test_bug_in_a_jacobian_strategy_is_an_internal_error(monkeypatch):
    """The region differentiates fine under plain autograd, so a failing J_k is ours."""
    monkeypatch.setitem(runtime._JACOBIANS, "reuse", lambda state, k: torch.mm(
        state.caches[k].m_in, state.caches[k].m_in))  # a wrong-shape product
    with pytest.raises(lbi_fx.InternalError, match=r"region 0 \(jacobian='reuse'\).*"
                                                   r"reverse-mode autograd\) runs the same region"):
        tf(net(), rank=4, jacobian="reuse")  # (B, r) @ (B, r) with B = 3 != r


def test_bug_in_the_chain_forward_is_an_internal_error(monkeypatch):
    real = lbi_module.LBIModule.run_chain

    def broken(self, *args, **kwargs):
        if kwargs.get("keep") is None:  # the scan forward, not the probe
            raise RuntimeError("expected scalar type Double but found Float")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lbi_module.LBIModule, "run_chain", broken)
    with pytest.raises(lbi_fx.InternalError, match="plain autograd runs the same"):
        tf(net())


@pytest.mark.parametrize("model, region", [
    (lambda: net(Blk, DeadBranchInPlace, Blk, wire=_dead_side_branch), "region 1 (blocks.1)"),
    (lambda: net(TanhInPlace, Blk, Blk, raw=True), "region 0 (blocks.0)"),
], ids=["dead-branch", "input-only-branch"])
def test_region_plain_autograd_cannot_differentiate_is_a_refusal(model, region):
    with pytest.raises(lbi_fx.RewriteError) as info:
        tf(model())
    msg = str(info.value)
    assert region in msg and "plain PyTorch (reverse-mode autograd) fails on this region too" in msg
    assert "modified by an inplace operation" in msg and "out-of-place" in msg


def test_forward_mode_without_a_rule_is_a_refusal_after_a_plain_jvp():
    model, (idx,) = build(n_layer=2, n_embd=16, n_head=2, seq=8)  # eval: CPU flash attention
    with pytest.raises(lbi_fx.RewriteError,
                       match=r"region 0 \(jacobian='forward'\).*forward-mode AD .*fails on this "
                             r"region too.*forward AD"):
        lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=4, example_inputs=(idx,),
                         jacobian="forward")


def test_scan_failure_at_training_time_is_classified_too(monkeypatch):
    """The same split after transform: a bug injected into a later backward is an
    InternalError, and the model still trains with backward='autograd'."""
    lbi = tf(net())
    _broken("stack_jacobians", RuntimeError("boom"), monkeypatch)
    lbi._compiled = None  # rebuild the backward graph around the broken op
    with pytest.raises(lbi_fx.InternalError, match="boom"):
        lbi(x64()).sum().backward()
    lbi.backward = "autograd"
    lbi(x64()).sum().backward()


def test_the_fuzzers_property_fails_on_an_internal_error(monkeypatch):
    """The fuzzer's ``check`` counts a refusal (an LBIError) as a legitimate outcome; a bug
    of lbi-fx must not pass for one there."""
    from tests.test_fuzz import check

    assert check(net(), (x64(),), lbi_fx.every(1, "blocks"), 3)["outcome"] == "transformed"
    _broken("stack_jacobians", RuntimeError("boom"), monkeypatch)
    with pytest.raises(lbi_fx.InternalError, match="boom"):
        check(net(), (x64(),), lbi_fx.every(1, "blocks"), 3)


def test_bug_in_the_rewritten_graph_is_an_internal_error_naming_the_node(monkeypatch):
    """Issue 35 item 7: shape propagation through the *rewritten* graph wrapped every
    failure as the user's ``InputError``; the model itself ran on the same inputs, so a
    failure there is lbi-fx's own, named by node. The user's own model failing under
    example_inputs is still an ``InputError``."""
    from lbi_fx.interfaces import InterfaceDecoder

    real = InterfaceDecoder.forward
    monkeypatch.setattr(InterfaceDecoder, "forward",
                        lambda self, m, canvas: real(self, m, canvas)[..., :-1])  # the bug
    with pytest.raises(lbi_fx.InternalError, match=r"rewritten graph failed at node '\w+' "
                                                   r".*please report") as info:
        tf(net())
    assert isinstance(info.value.original, RuntimeError), info.value.original
    monkeypatch.undo()
    with pytest.raises(lbi_fx.InputError, match="example_inputs do not run through the model"):
        tf(net(), example_inputs=(torch.randn(3, 7, dtype=torch.float64),))  # wrong width


def test_lbi_verify_blames_lbi_fx_nodes_on_lbi_fx(monkeypatch):
    """``lbi.lbi_verify`` reruns shapes on the user's new inputs: a failing interface node is
    an ``InternalError``."""
    from lbi_fx.interfaces import InterfaceDecoder

    lbi = tf(net())
    real = InterfaceDecoder.forward
    monkeypatch.setattr(InterfaceDecoder, "forward",
                        lambda self, m, canvas: real(self, m, canvas)[..., :-1])
    with pytest.raises(lbi_fx.InternalError, match=r"node '"):
        lbi.lbi_verify(example_inputs=(x64(),))
    # inputs of another width than the model was built with: the user's, even at a decoder
    with pytest.raises(lbi_fx.InputError, match="do not run through the model"):
        lbi.lbi_verify(example_inputs=(torch.randn(3, 7, dtype=torch.float64),))
