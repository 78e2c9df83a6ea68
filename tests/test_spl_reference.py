"""``lbi_fx.spl`` against hand-written references of seed 002 (issue 22, item 6).

A small model is written out here (embedding, four residual blocks, final LayerNorm, a
linear head; optionally an embedding bus x0 read by every block, a long skip from block 0
into the last block, and a head tied to the embedding). The reference computes the
stage-partitioned loss of Eqs. (4)-(7) by hand, with the soft relay of Eq. (26) written
as ``sg(h) + lambda (h - sg(h))``:

* stage k runs its blocks on the values handed over at boundary k (the running state,
  and for the bus model x0 and the skip), each passed through the relay of that
  boundary, so a value crossing two boundaries is relayed twice;
* stage k's logits are the final norm and head on stage k's output, with the shared
  parameters W (``"shared"``) or W + W_k (``"per-stage"``, W_k one delta per head
  parameter);
* the loss is the sum of the stage losses (scaled by 1 / K^(1 - alpha)).

Its gradients come from plain autograd. Every parameter of the SPL module (the model's
and the per-stage deltas) is compared, for the total loss and for every stage loss alone.
Nothing of ``lbi_fx.spl`` is used by the reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lbi_fx
from lbi_fx.spl import stage_partition

VOCAB, D, N_BLOCKS = 11, 6, 4
TOL = 1e-12


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the model

class Block(nn.Module):
    def __init__(self, d: int, bus: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.tensor(0.7)) if bus else None

    def forward(self, x, x0=None, skip=None):
        if skip is not None:
            x = x + 0.5 * skip
        y = x + torch.tanh(self.fc(self.norm(x)))
        if x0 is not None:
            y = y + self.gate * x0
        return y


class HandNet(nn.Module):
    """emb -> blocks.0..3 -> norm_f -> head. ``bus``: every block also reads x0 = emb(idx)
    and the last block reads block 0's output (a long skip). ``tie``: head.weight is
    emb.weight."""

    def __init__(self, bus: bool = False, tie: bool = False):
        super().__init__()
        self.bus = bus
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(D, bus) for _ in range(N_BLOCKS))
        self.norm_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        x0 = self.emb(idx)
        x, skip = x0, None
        for i, block in enumerate(self.blocks):
            if self.bus:
                x = block(x, x0, skip if i == N_BLOCKS - 1 else None)
            else:
                x = block(x)
            if i == 0:
                skip = x
        return self.head(self.norm_f(x))


def make(kind: str):
    """(model, idx, loss_fn): fp64, every parameter moved off its initial value."""
    bus, tie = {"chain": (False, False), "bus-tied": (True, True),
                "bus-untied": (True, False)}[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HandNet(bus=bus, tie=tie).double()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 5), generator=g)
    target = torch.randint(0, VOCAB, (2, 5), generator=g)

    def loss_fn(z):
        return F.cross_entropy(z.reshape(-1, VOCAB), target.reshape(-1))

    return model, idx, loss_fn


def spl_of(model, idx, sizes, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stage_partition(model, lbi_fx.composition(sizes, "blocks"),
                               example_inputs=(idx,), **kw)


def randomize_deltas(spl, seed=2):
    """Per-stage deltas start at 0; give them values so W + W_k != W."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in spl.spl_heads.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ------------------------------------------------------------------ the reference

def soft_relay(h, lam: float):
    """Eq. (26): the value h, gradient lam times the incoming one."""
    return h.detach() + lam * (h - h.detach())


def head_params(model, spl, k: int, heads: str) -> dict:
    """The head parameters stage k's logits use: W, or W + W_k."""
    W = {"norm_f.weight": model.norm_f.weight, "norm_f.bias": model.norm_f.bias,
         "head.weight": model.head.weight, "head.bias": model.head.bias}
    if heads == "shared":
        return W
    delta = spl.spl_heads[k]
    return {name: w + delta[name.replace(".", "__")] for name, w in W.items()}


def reference_logits(model, spl, idx, sizes, lams, heads):
    """Eqs. (4), (7), (26) by hand: the K stage logits."""
    assert len(lams) == len(sizes) - 1
    x0 = model.emb(idx)
    carried = {"h": x0, "x0": x0, "skip": None}  # what crosses a stage boundary
    logits, i = [], 0
    for k, depth in enumerate(sizes):
        if k > 0:
            carried = {name: None if v is None else soft_relay(v, lams[k - 1])
                       for name, v in carried.items()}
        for _ in range(depth):
            block = model.blocks[i]
            if model.bus:
                skip = carried["skip"] if i == N_BLOCKS - 1 else None
                carried["h"] = block(carried["h"], carried["x0"], skip)
            else:
                carried["h"] = block(carried["h"])
            if i == 0:
                carried["skip"] = carried["h"]
            i += 1
        W = head_params(model, spl, k, heads)
        h = F.layer_norm(carried["h"], (D,), W["norm_f.weight"], W["norm_f.bias"],
                         model.norm_f.eps)
        logits.append(F.linear(h, W["head.weight"], W["head.bias"]))
    return logits


# ------------------------------------------------------------------ comparison helpers

def all_params(spl, model):
    """Every parameter of the SPL module; the model's are the very same tensors."""
    named = dict(spl.named_parameters())
    model_named = dict(model.named_parameters())
    assert {n for n in named if not n.startswith("spl_heads.")} == set(model_named)
    assert all(named[n] is p for n, p in model_named.items())
    return list(named), list(named.values())


def grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def assert_same_grads(got, want, names, what):
    for name, a, b in zip(names, got, want):
        if b is None or bool((b == 0).all()):
            assert a is None or bool((a == 0).all()), f"{what}: {name} should get no gradient"
            continue
        assert a is not None, f"{what}: {name} gets no gradient, reference {b.abs().max():.3g}"
        err = float((a - b).abs().max()) / float(b.abs().max())
        assert err <= TOL, f"{what}: {name} rel err {err:.3g}"


def check_against_reference(kind, sizes, relay, heads, alpha=1.0, weights=None):
    model, idx, loss_fn = make(kind)
    spl = spl_of(model, idx, sizes, relay=relay, heads=heads, alpha=alpha)
    if heads == "per-stage":
        randomize_deltas(spl)
    K = len(sizes)
    lams = list(relay) if isinstance(relay, (list, tuple)) else [relay] * (K - 1)
    names, params = all_params(spl, model)

    ref_logits = reference_logits(model, spl, idx, sizes, lams, heads)
    got_logits = spl.stage_outputs(idx)
    assert len(got_logits) == K
    for k, (a, b) in enumerate(zip(got_logits, ref_logits)):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=f"stage {k} logits")
    ref_losses = [loss_fn(z) for z in ref_logits]
    w = [1.0] * K if weights is None else weights
    ref_total = sum(wk * lk for wk, lk in zip(w, ref_losses)) / K ** (1.0 - alpha)
    total, losses = spl.stage_loss(idx, loss_fn, weights=weights)
    assert abs(total.item() - ref_total.item()) <= TOL * abs(ref_total.item())
    assert_same_grads(grads(total, params), grads(ref_total, params), names, "total")
    for j, (lj, rj) in enumerate(zip(losses, ref_losses)):
        assert abs(lj.item() - rj.item()) <= TOL * abs(rj.item())
        assert_same_grads(grads(lj, params), grads(rj, params), names, f"loss {j}")
    return model, spl, names, params, losses


# ------------------------------------------------------------------ the reference itself

def test_soft_relay_is_identity_forward_and_scales_the_gradient():
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, dtype=torch.float64)
    for lam in (0.0, 0.5, 1.0):
        r = soft_relay(h, lam)
        assert torch.equal(r, h)
        (gh,) = torch.autograd.grad(r, h, g)
        assert torch.equal(gh, lam * g)


# ------------------------------------------------------------------ K >= 2 against the reference

SIZES = [(2, 2), (1, 3), (1, 2, 1), (2, 1, 1), (1, 1, 1, 1)]
CASES = [(kind, sizes, lam, heads)
         for kind in ("chain", "bus-tied")
         for sizes in SIZES
         for lam in (0.0, 0.5, 1.0)
         for heads in ("shared", "per-stage")
         if not (sizes == (1, 1, 1, 1) and lam == 1.0)]


@pytest.mark.parametrize("kind,sizes,lam,heads", CASES,
                         ids=[f"{c[0]}-{''.join(map(str, c[1]))}-lam{c[2]:g}-{c[3]}" for c in CASES])
def test_every_gradient_matches_the_hand_written_reference(kind, sizes, lam, heads):
    check_against_reference(kind, sizes, lam, heads)


@pytest.mark.parametrize("relay", [[0.5, 0.0], [0.0, 0.5], [1.0, 0.25], [0.3, 0.7]])
@pytest.mark.parametrize("heads", ["shared", "per-stage"])
def test_one_lambda_per_boundary(relay, heads):
    """The skip from block 0 into block 3 crosses both boundaries of (1, 2, 1): its gradient
    factor is the product of the two."""
    check_against_reference("bus-untied", (1, 2, 1), relay, heads)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_alpha_scales_the_total(alpha):
    check_against_reference("bus-tied", (2, 1, 1), 0.5, "per-stage", alpha=alpha)


def test_soft_loss_weights_of_eq_29():
    """tau_k = 1 - lambda_k at the internal termini, 1 at the last (Eq. 29)."""
    relay = [0.3, 0.8]
    check_against_reference("bus-untied", (1, 2, 1), relay, "per-stage", alpha=0.5,
                            weights=[1 - relay[0], 1 - relay[1], 1.0])


# ------------------------------------------------------------------ Props. 4.7, 4.8 by hand

def _hidden(names, sizes, stage):
    """theta_k^hid of Prop. 4.7: the parameters of stage k's blocks, written by hand."""
    first = sum(sizes[:stage])
    blocks = {f"blocks.{i}." for i in range(first, first + sizes[stage])}
    return [n for n in names if any(n.startswith(b) for b in blocks)]


@pytest.mark.parametrize("heads", ["shared", "per-stage"])
@pytest.mark.parametrize("kind", ["chain", "bus-untied"])
def test_prop_4_7_and_4_8_at_lambda_zero(kind, heads):
    """lambda = 0: d total / d theta_k^hid = d loss_k / d theta_k^hid exactly, loss j != k
    gives theta_k^hid an exact zero, W_k only gets loss k's gradient (Eq. 10) and the
    shared head W the sum over stages (Eqs. 9, 11). The untied embedding (prologue) is
    trained by loss 0 alone."""
    sizes = (1, 2, 1)
    model, spl, names, params, losses = check_against_reference(kind, sizes, 0.0, heads)
    by_loss = [dict(zip(names, grads(lj, params))) for lj in losses]
    total = dict(zip(names, grads(sum(losses), params)))

    def zero(g):
        return g is None or bool((g == 0).all())

    for k in range(len(sizes)):
        for n in _hidden(names, sizes, k):
            assert torch.equal(total[n], by_loss[k][n]), n
            assert not zero(by_loss[k][n]), n
            assert all(zero(by_loss[j][n]) for j in range(len(sizes)) if j != k), n
    assert all(zero(by_loss[j]["emb.weight"]) for j in (1, 2))
    for n in ("norm_f.weight", "norm_f.bias", "head.weight", "head.bias"):
        want = sum(by_loss[j][n] for j in range(len(sizes)))
        assert float((total[n] - want).abs().max()) <= TOL * float(want.abs().max()), n
        assert all(not zero(by_loss[j][n]) for j in range(len(sizes))), n
        if heads == "per-stage":
            key = n.replace(".", "__")
            for k in range(len(sizes)):
                for j in range(len(sizes)):
                    assert zero(by_loss[j][f"spl_heads.{k}.{key}"]) == (j != k), (n, j, k)


def test_lambda_one_is_backprop_of_the_summed_loss():
    """relay 1 is plain backprop of sum_k loss_k: the model run K times, no relay at all."""
    model, idx, loss_fn = make("bus-tied")
    spl = spl_of(model, idx, (1, 2, 1), relay=1.0)
    names, params = all_params(spl, model)
    total, _ = spl.stage_loss(idx, loss_fn)
    x0 = model.emb(idx)
    x, outs = x0, []
    x = model.blocks[0](x, x0)
    skip = x
    outs.append(x)
    x = model.blocks[2](model.blocks[1](x, x0), x0)
    outs.append(x)
    outs.append(model.blocks[3](x, x0, skip))
    ref = sum(loss_fn(model.head(model.norm_f(h))) for h in outs)
    assert abs(total.item() - ref.item()) <= TOL * ref.item()
    assert_same_grads(grads(total, params), grads(ref, params), names, "total")


# ------------------------------------------------------------------ the BP endpoint

@pytest.mark.parametrize("kind", ["chain", "bus-tied", "bus-untied"])
def test_one_shared_stage_is_plain_backprop_exactly(kind):
    """Thm 5.1: ((L), sh) has the loss and every gradient of plain backprop, bit for bit."""
    model, idx, loss_fn = make(kind)
    spl = spl_of(model, idx, (N_BLOCKS,))
    names, params = all_params(spl, model)
    assert names == [n for n, _ in model.named_parameters()]
    total, (only,) = spl.stage_loss(idx, loss_fn)
    bp = loss_fn(model(idx))
    assert torch.equal(total, bp) and torch.equal(only, bp)
    assert torch.equal(spl(idx), model(idx))
    for n, a, b in zip(names, grads(total, params), grads(bp, params)):
        assert torch.equal(a, b), n


def test_one_per_stage_head_is_backprop_with_the_summed_head():
    """Prop. 5.2 against the reference (K = 1, W + W_0), and W, W_0 get the same gradient."""
    model, spl, names, params, (loss,) = check_against_reference("chain", (N_BLOCKS,), 0.0,
                                                                   "per-stage")
    g = dict(zip(names, grads(loss, params)))
    for n in ("norm_f.weight", "norm_f.bias", "head.weight", "head.bias"):
        assert torch.equal(g[n], g[f"spl_heads.0.{n.replace('.', '__')}"]), n


# ------------------------------------------------------------------ schedules

@pytest.mark.parametrize("heads", ["shared", "per-stage"])
def test_interleaved_schedule_accumulates_the_reference_gradients(heads):
    model, idx, loss_fn = make("bus-tied")
    sizes = (1, 2, 1)
    spl = spl_of(model, idx, sizes, heads=heads)
    if heads == "per-stage":
        randomize_deltas(spl)
    names, params = all_params(spl, model)
    ref = sum(loss_fn(z) for z in reference_logits(model, spl, idx, sizes, [0.0, 0.0], heads))
    want = grads(ref, params)
    spl.zero_grad(set_to_none=True)
    total, _ = spl.forward_backward(idx, loss_fn, schedule="interleaved")
    assert abs(total - ref.item()) <= TOL * ref.item()
    assert_same_grads([p.grad for p in params], want, names, "interleaved")
