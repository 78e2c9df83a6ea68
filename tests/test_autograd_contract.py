"""The scan backward keeps PyTorch's autograd contract (issue 18).

Every pattern a user may run on a transformed model - retain_graph, several losses on
one forward, two forwards and one backward, gradient accumulation, ``autograd.grad`` on
a subset, ``backward(inputs=...)``, checkpointing around the module, input gradients,
create_graph - is run under ``backward="scan"`` and ``backward="autograd"`` on the same
module (fp64, same RNG) and must give the same gradients. The chain state (region
graphs) must live exactly as long as the outer graph needs it.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lbi_fx
from lbi_fx.bench.step import _LiveBytes
from lbi_fx.models.transformer import build
from lbi_fx.testing import default_loss

TOL = 1e-12  # fp64, relative l2 per tensor


class Residual(nn.Module):
    """Float input (B, L, D) -> tanh residual blocks -> head: smooth, so plain autograd
    can differentiate it twice, and ``x`` gets a gradient through the canvas."""

    def __init__(self, d: int = 8, n: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


@pytest.fixture(scope="module")
def gpt():
    model, (idx,) = build(n_layer=3, n_embd=16, n_head=2, batch=2, seq=8, seed=3)
    lbi = lbi_fx.transform(model.double(), lbi_fx.every(1, "layers"), rank=4,
                           example_inputs=(idx,))
    return lbi, idx


@pytest.fixture(scope="module")
def residual():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Residual().double()
        x = torch.randn(3, 5, 8, dtype=torch.float64)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=3, example_inputs=(x,))
    return lbi, x


def _run(lbi, mode: str, pattern, *args) -> dict:
    """Run ``pattern(lbi, *args)`` from zeroed grads under one backward mode, same seed."""
    lbi.backward = mode
    lbi.zero_grad(set_to_none=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            got = pattern(lbi, *args)
    finally:
        lbi.backward = "scan"
    grads = {n: p.grad for n, p in lbi.named_parameters() if p.grad is not None}
    lbi.zero_grad(set_to_none=True)
    if isinstance(got, dict):
        grads.update(got)
    return grads


def _assert_same(scan: dict, ref: dict, tol: float = TOL) -> None:
    assert scan.keys() == ref.keys(), (sorted(scan.keys() ^ ref.keys()))
    assert ref, "the pattern produced no gradient at all"
    for name, a in ref.items():
        b = scan[name]
        err = float((b - a).norm()) / max(float(a.norm()), 1e-300)
        assert err <= tol, f"{name}: rel-l2 {err:.2e} > {tol:.0e}"


def _both(lbi, pattern, *args, tol: float = TOL) -> dict:
    ref = _run(lbi, "autograd", pattern, *args)
    _assert_same(_run(lbi, "scan", pattern, *args), ref, tol)
    return ref


def _params(lbi) -> list:
    return [p for p in lbi.parameters() if p.requires_grad]


# -- retain_graph ---------------------------------------------------------------------------


def _retain_twice(lbi, idx):
    loss = default_loss(lbi(idx))
    loss.backward(retain_graph=True)
    loss.backward()


def _retain_thrice(lbi, idx):
    loss = default_loss(lbi(idx))
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()


def _once(lbi, idx):
    default_loss(lbi(idx)).backward()


def test_retain_graph_twice_accumulates_twice(gpt):
    lbi, idx = gpt
    twice = _both(lbi, _retain_twice, idx)
    once = _run(lbi, "scan", _once, idx)
    _assert_same(twice, {n: 2 * g for n, g in once.items()})
    _both(lbi, _retain_thrice, idx)


@pytest.mark.parametrize("strategy", ["reuse", "forward", "recompute", "auto"])
def test_retain_graph_every_jacobian_strategy(residual, strategy):
    lbi, x = residual
    before = lbi.jacobian
    lbi.jacobian = strategy
    try:
        _both(lbi, _retain_twice, x)
    finally:
        lbi.jacobian = before


def _shared_forward_two_losses(lbi, idx):
    out = lbi(idx)
    (out.square().mean()).backward(retain_graph=True)
    default_loss(out).backward()


def test_several_losses_on_one_forward(gpt):
    lbi, idx = gpt
    _both(lbi, _shared_forward_two_losses, idx)


def test_second_backward_without_retain_fails_as_autograd_does(gpt):
    lbi, idx = gpt
    messages = []
    for mode in ("autograd", "scan"):
        lbi.backward = mode
        loss = default_loss(lbi(idx))
        loss.backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time") as e:
            loss.backward()
        messages.append(type(e.value))
    lbi.backward = "scan"
    lbi.zero_grad(set_to_none=True)
    assert messages[0] is messages[1]


# -- patterns that need no retained state ---------------------------------------------------


def _two_forwards_one_backward(lbi, idx):
    (default_loss(lbi(idx)) + default_loss(lbi(idx.flip(0)))).backward()


def _accumulate(lbi, idx):
    for part in idx.split(1):
        default_loss(lbi(part)).backward()


def _grad_subset(lbi, idx):
    names = [n for n, _ in lbi.named_parameters()][::3]
    loss = default_loss(lbi(idx))
    grads = torch.autograd.grad(loss, [lbi.get_parameter(n) for n in names])
    return {f"grad:{n}": g for n, g in zip(names, grads)}


def _backward_inputs(lbi, idx):
    names = [n for n, _ in lbi.named_parameters()][1::4]
    default_loss(lbi(idx)).backward(inputs=[lbi.get_parameter(n) for n in names])
    assert {n for n, p in lbi.named_parameters() if p.grad is not None} == set(names)


def _checkpointed(lbi, idx):
    default_loss(checkpoint(lbi, idx, use_reentrant=False)).backward()


@pytest.mark.parametrize("pattern", [
    _two_forwards_one_backward, _accumulate, _grad_subset, _backward_inputs, _checkpointed,
], ids=["two-forwards", "accumulation", "grad-subset", "backward-inputs", "checkpoint"])
def test_usage_pattern_matches_autograd(gpt, pattern):
    lbi, idx = gpt
    _both(lbi, pattern, idx)


def _checkpointed_reentrant(lbi, x):
    """Reentrant checkpointing reruns the module inside the backward; it needs an input
    that requires grad (plain PyTorch returns no gradients otherwise)."""
    x = x.clone().requires_grad_(True)
    default_loss(checkpoint(lbi, x, use_reentrant=True)).backward()
    return {"x": x.grad}


def test_reentrant_checkpoint_matches_autograd(residual):
    lbi, x = residual
    _both(lbi, _checkpointed_reentrant, x)


def _input_grad(lbi, x):
    x = x.clone().requires_grad_(True)
    loss = default_loss(lbi(x))
    (gx,) = torch.autograd.grad(loss, [x], retain_graph=True)
    loss.backward(inputs=[x, *list(lbi.parameters())[:2]])
    return {"x(grad)": gx, "x(backward)": x.grad}


def test_input_gradients_match_autograd(residual):
    lbi, x = residual
    got = _both(lbi, _input_grad, x)
    assert float(got["x(grad)"].abs().max()) > 0


# -- create_graph ---------------------------------------------------------------------------


def _first_order_with_graph(lbi, x):
    loss = default_loss(lbi(x))
    grads = torch.autograd.grad(loss, _params(lbi), create_graph=True)
    return {f"g{i}": g.detach() for i, g in enumerate(grads)}


def _head_penalty(lbi, x):
    """A second order that never differentiates the chain's own backward: the head's
    gradient depends on the chain's output, which the chain's first-order backward
    differentiates."""
    loss = default_loss(lbi(x))
    (gw,) = torch.autograd.grad(loss, [lbi.get_parameter("head.weight")], create_graph=True)
    (gw.square().sum() + loss).backward()


def test_create_graph_first_order_and_penalties_outside_the_chain(residual):
    lbi, x = residual
    _both(lbi, _first_order_with_graph, x)
    got = _both(lbi, _head_penalty, x)
    assert "layers.0.weight" in got  # the penalty reached the regions, to first order


def _full_penalty(lbi, x):
    loss = default_loss(lbi(x))
    grads = torch.autograd.grad(loss, _params(lbi), create_graph=True)
    sum(g.square().sum() for g in grads).backward()


def _input_penalty(lbi, x):
    x = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(default_loss(lbi(x)), [x], create_graph=True)
    gx.square().sum().backward()


@pytest.mark.parametrize("pattern", [_full_penalty, _input_penalty], ids=["params", "input"])
def test_double_backward_through_the_chain_is_refused_by_name(residual, pattern):
    """A second order through the chain is refused (an LBIError saying what to do), never
    silently dropped; the advice works: backward="autograd" computes it."""
    lbi, x = residual
    ref = _run(lbi, "autograd", pattern, x)
    assert ref and all(torch.isfinite(g).all() for g in ref.values())
    with pytest.raises(lbi_fx.HigherOrderError, match="lbi.backward = 'autograd'"):
        _run(lbi, "scan", pattern, x)


# -- lifetime of the chain state ------------------------------------------------------------


def _track(lbi) -> list:
    """Weak references to every tensor the next forwards put in a ChainState."""
    refs: list = []
    real = type(lbi).run_chain

    def spy(self, *args, **kwargs):
        state, outs = real(self, *args, **kwargs)
        refs.append(weakref.ref(state))
        for c in state.caches:
            refs.extend(weakref.ref(t) for t in (c.m_in, *c.outs))
        return state, outs

    lbi.run_chain = spy.__get__(lbi)
    return refs


def _alive(refs: list) -> int:
    gc.collect()
    return sum(r() is not None for r in refs)


@pytest.fixture()
def tracked(gpt):
    lbi, idx = gpt
    refs = _track(lbi)
    yield lbi, idx, refs
    del lbi.run_chain
    lbi.zero_grad(set_to_none=True)


def test_state_released_by_a_normal_backward_while_the_loss_lives(tracked):
    lbi, idx, refs = tracked
    loss = default_loss(lbi(idx))
    assert _alive(refs) == len(refs) > 1
    loss.backward()
    assert _alive(refs) == 0
    assert loss.grad_fn is not None  # the outer graph is still there


def test_state_kept_by_retain_graph_until_the_last_backward(tracked):
    lbi, idx, refs = tracked
    loss = default_loss(lbi(idx))
    loss.backward(retain_graph=True)
    assert _alive(refs) == len(refs)
    loss.backward()
    assert _alive(refs) == 0


def test_state_released_with_the_graph(tracked):
    lbi, idx, refs = tracked
    loss = default_loss(lbi(idx))
    loss.backward(retain_graph=True)
    assert _alive(refs) == len(refs)
    del loss
    assert _alive(refs) == 0
    default_loss(lbi(idx))  # a forward whose graph is dropped without any backward
    assert _alive(refs) == 0


def _live_after_backward(lbi, idx, mode: str, retain: bool) -> tuple[int, int]:
    """(bytes live after the step with the loss still referenced, peak bytes)."""
    lbi.backward = mode
    lbi.zero_grad(set_to_none=True)
    with _LiveBytes() as t:
        loss = default_loss(lbi(idx))
        loss.backward(retain_graph=retain)
        gc.collect()
        # parameter grads, and the J_k / P_k the module keeps of its last scan backward
        # (B K r^2 numbers, for spectra), are meant to outlive the step
        kept = [p.grad for p in lbi.parameters() if p.grad is not None]
        kept += [x for x in torch.utils._pytree.tree_leaves(getattr(lbi, "_record", {}))
                 if isinstance(x, torch.Tensor)]
        live = t.cur - sum(t.live.get(s, 0) for s in {id(x.untyped_storage()) for x in kept})
    del loss
    lbi.backward = "scan"
    lbi.zero_grad(set_to_none=True)
    return live, t.peak


def test_live_memory_after_backward_is_autograds(gpt):
    """Without retain_graph nothing of the chain outlives the backward: what stays live
    (the outer graph's outputs) is what plain autograd keeps, within 1%; with
    retain_graph the region graphs stay (more than autograd's retained graph would
    need to be absent)."""
    lbi, idx = gpt
    ref, _ = _live_after_backward(lbi, idx, "autograd", False)
    got, _ = _live_after_backward(lbi, idx, "scan", False)
    kept, _ = _live_after_backward(lbi, idx, "scan", True)
    assert got <= 1.01 * ref, (got, ref)
    assert kept > 2 * ref, (kept, ref)
