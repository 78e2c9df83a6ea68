"""``lbi_fx.pgf`` against independently written references (issue 22, item 6).

Nothing here is shared with ``lbi_fx/pgf.py``: the selective scan reference below is a
plain step-by-step transcription of mamba-ssm's ``selective_scan_ref`` (variable, grouped
and constant B/C included), and the Mamba-2 mixer reference is a step-by-step recurrence
over the mixer's own parameters (the conv through ``nn.Conv1d`` itself, as mamba-ssm's
non-fused path does). Gradients of the reference come from plain autograd, its forward
sensitivities from ``torch.func.jvp``.

``lbi_fx.pgf.selective_scan`` takes B and C of shape (batch, d_state, L) only; grouped
(batch, G, d_state, L) and constant (dim, d_state) B/C are refused by name, and the
recipes that reach them through the supported form (one call per group of channels /
per channel) are checked against the reference's own grouped / constant semantics.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lbi_fx
from lbi_fx import pgf
from lbi_fx.models import mamba2

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
F64 = dict(atol=1e-10, rtol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the references

def ref_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """mamba-ssm's ``selective_scan_ref``, written out one time step at a time.

    u, delta: (b, d, L); A: (d, n) real; B, C: (b, n, L) variable, (b, G, n, L) grouped
    (group g drives channels g*d/G .. (g+1)*d/G - 1) or (d, n) constant; D, delta_bias:
    (d,); z: (b, d, L). Computed in fp64 for fp64 inputs and in fp32 otherwise (mamba-ssm
    upcasts to fp32; the fp64 case is kept in fp64 so the test can be tight); the output
    is returned in u's dtype, the last state in the compute dtype.
    """
    dtype_in = u.dtype
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    dstate = A.shape[1]

    def per_channel(M):  # -> a function of the step giving (b or 1, d, n)
        if M.dim() == 2:  # constant (d, n)
            return lambda t: M[None]
        if M.dim() == 3:  # variable (b, n, L), one for every channel
            return lambda t: M[:, None, :, t]
        groups = M.shape[1]  # grouped (b, G, n, L)
        full = M.repeat_interleave(dim // groups, dim=1)  # (b, d, n, L)
        return lambda t: full[:, :, :, t]

    B_at, C_at = per_channel(B), per_channel(C)
    x = u.new_zeros(batch, dim, dstate)
    ys = []
    for t in range(length):
        dt_t = delta[:, :, t, None]  # (b, d, 1)
        x = torch.exp(dt_t * A) * x + dt_t * B_at(t) * u[:, :, t, None]
        ys.append((x * C_at(t)).sum(-1))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def ref_mixer(m, u):
    """The Mamba-2 mixer (mamba-ssm's ``Mamba2`` semantics, non-fused path) from ``m``'s
    parameters, its SSD recurrence run one step at a time."""
    b, T, _ = u.shape
    H, P, N, G = m.nheads, m.headdim, m.d_state, m.ngroups
    d_inner = H * P
    zxbcdt = F.linear(u, m.in_proj.weight, m.in_proj.bias)
    z = zxbcdt[..., :d_inner]
    xBC = zxbcdt[..., d_inner:2 * d_inner + 2 * G * N]
    dt = zxbcdt[..., 2 * d_inner + 2 * G * N:]
    assert dt.shape[-1] == H
    xBC = F.silu(m.conv1d(xBC.transpose(1, 2))[..., :T].transpose(1, 2))
    x = xBC[..., :d_inner].reshape(b, T, H, P)
    Bg = xBC[..., d_inner:d_inner + G * N].reshape(b, T, G, N)
    Cg = xBC[..., d_inner + G * N:].reshape(b, T, G, N)
    Bh = Bg.repeat_interleave(H // G, dim=2)  # head h reads group h // (H / G)
    Ch = Cg.repeat_interleave(H // G, dim=2)
    dt = F.softplus(dt + m.dt_bias)
    lo, hi = m.dt_limit
    if (lo, hi) != (0.0, float("inf")):
        dt = dt.clamp(lo, hi)
    A = -torch.exp(m.A_log)
    h = u.new_zeros(b, H, P, N)
    ys = []
    for t in range(T):
        dA = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, H, 1, 1)
        h = dA * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1) + m.D[:, None] * x[:, t])
    y = torch.stack(ys, 1).reshape(b, T, d_inner)
    # RMSNormGated, norm_before_gate=False, one norm per group of d_inner / G channels
    g = (y * F.silu(z)).reshape(b, T, G, d_inner // G)
    g = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + m.norm.eps)
    y = g.reshape(b, T, d_inner) * m.norm.weight
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


# ------------------------------------------------------------------ helpers

def make_inputs(b=2, d=4, n=3, L=23, dtype=torch.float64, seed=0, D=True, z=True,
                bias=True, decay=2.0, growth=0.0, bc="variable", groups=2):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    A = (-decay * torch.rand(d, n, generator=g, dtype=torch.float64)
         + growth * torch.rand(d, n, generator=g, dtype=torch.float64)).to(dtype)
    shape = {"variable": (b, n, L), "grouped": (b, groups, n, L), "constant": (d, n)}[bc]
    ins = {"u": r(b, d, L), "delta": r(b, d, L, scale=0.5), "A": A, "B": r(*shape),
           "C": r(*shape), "D": r(d) if D else None, "z": r(b, d, L) if z else None,
           "delta_bias": r(d, scale=0.5) if bias else None}
    return {k: None if v is None else v.requires_grad_() for k, v in ins.items()}


def ours(ins, softplus, tile, last=True):
    return pgf.selective_scan(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], ins["D"],
                              ins["z"], delta_bias=ins["delta_bias"], delta_softplus=softplus,
                              tile=tile, return_last_state=last)


def theirs(ins, softplus, last=True):
    return ref_selective_scan(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], ins["D"],
                              ins["z"], ins["delta_bias"], softplus, last)


def cotangents(outs, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in outs]


def assert_all_close(got, want, names, **tol):
    assert len(got) == len(want) == len(names)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tol)


def check_forward_and_grads(ins, softplus, tile, **tol):
    tol = tol or F64
    out, last = ours(ins, softplus, tile)
    r_out, r_last = theirs(ins, softplus)
    assert_all_close([out, last], [r_out, r_last], ["out", "last state"], **tol)
    names = [k for k, v in ins.items() if v is not None]
    leaves = [ins[k] for k in names]
    cot = cotangents([r_out, r_last])
    got = torch.autograd.grad([out, last], leaves, cot)
    want = torch.autograd.grad([r_out, r_last], leaves, cot)
    assert_all_close(got, want, names, **tol)


# ------------------------------------------------------------------ the reference itself

def test_reference_is_mamba_ssm_semantics_on_a_hand_computed_case():
    """One channel, one state, three steps, every option: the recurrence by hand."""
    u = torch.tensor([[[1.0, -2.0, 0.5]]], dtype=torch.float64)
    delta = torch.tensor([[[0.3, -0.1, 0.7]]], dtype=torch.float64)
    A = torch.tensor([[-0.8]], dtype=torch.float64)
    B = torch.tensor([[[0.5, 1.5, -1.0]]], dtype=torch.float64)
    C = torch.tensor([[[2.0, -1.0, 0.25]]], dtype=torch.float64)
    D, bias = torch.tensor([0.4], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    z = torch.tensor([[[0.1, -0.3, 2.0]]], dtype=torch.float64)
    out, last = ref_selective_scan(u, delta, A, B, C, D, z, bias, True, True)
    x, want = 0.0, []
    for t in range(3):
        dt = math.log1p(math.exp(delta[0, 0, t].item() + 0.2))
        x = math.exp(dt * -0.8) * x + dt * B[0, 0, t].item() * u[0, 0, t].item()
        y = x * C[0, 0, t].item() + 0.4 * u[0, 0, t].item()
        zt = z[0, 0, t].item()
        want.append(y * zt / (1 + math.exp(-zt)))
    assert torch.allclose(out[0, 0], torch.tensor(want, dtype=torch.float64), rtol=1e-14)
    assert abs(last.item() - x) <= 1e-14
    # grouped B/C with one group and constant B/C collapse to the variable form
    ins = make_inputs(bc="grouped", groups=1)
    a = ref_selective_scan(*(ins[k] for k in NAMES[:5]))
    b = ref_selective_scan(*(ins[k][:, 0] if k in ("B", "C") else ins[k] for k in NAMES[:5]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ selective_scan

L = 23
TILES = [1, 2, 5, 7, 22, L, L + 9]  # 5 and 7 do not divide 23; 22 leaves a 1-step tail


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("D,z,bias,softplus",
                         list(itertools.product([False, True], repeat=4)),
                         ids=lambda v: "1" if v is True else "0" if v is False else str(v))
def test_forward_last_state_and_every_gradient_fp64(tile, D, z, bias, softplus):
    ins = make_inputs(L=L, D=D, z=z, bias=bias, seed=tile)
    check_forward_and_grads(ins, softplus, tile)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 3, 2), (3, 1, 5, 9)])
@pytest.mark.parametrize("tile", [1, 2, 4])
def test_small_and_degenerate_shapes_fp64(shape, tile):
    b, d, n, length = shape
    check_forward_and_grads(make_inputs(b=b, d=d, n=n, L=length), True, tile)


def test_default_tile_and_a_sequence_longer_than_it():
    """tile=None (256 steps) on L = 300: two tiles, the second a 44-step tail."""
    ins = make_inputs(b=1, d=2, n=2, L=300, seed=3)
    check_forward_and_grads(ins, True, None)


@pytest.mark.parametrize("tile", [1, 6, 40])
def test_strong_decay_and_growing_modes(tile):
    """exp(dt A) underflowing to 0 (A ~ -300) and A > 0 somewhere (mamba-ssm accepts any
    real A): the tiled log-depth scan must still be the step-by-step recurrence."""
    strong = make_inputs(L=40, decay=300.0, seed=1)
    check_forward_and_grads(strong, True, tile)
    grow = make_inputs(L=40, decay=0.5, growth=0.6, seed=2)
    check_forward_and_grads(grow, False, tile)


def test_fp32_against_the_reference():
    ins = make_inputs(b=2, d=4, n=8, L=200, dtype=torch.float32, seed=5)
    check_forward_and_grads(ins, True, 48, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_compute_in_fp32_like_mamba_ssm():
    ins = make_inputs(L=30, dtype=torch.bfloat16, seed=6)
    out, last = ours(ins, True, 7)
    r_out, r_last = theirs(ins, True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    torch.testing.assert_close(last, r_last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, r_out, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("which", ["out", "last"])
def test_cotangent_on_one_output_only(which):
    """Only the output or only the last state is used: the other cotangent is zero."""
    ins = make_inputs(L=19, seed=8)
    leaves = list(ins.values())
    pick = 0 if which == "out" else 1
    got = torch.autograd.grad(ours(ins, True, 4)[pick].square().sum(), leaves,
                              materialize_grads=True)
    want = torch.autograd.grad(theirs(ins, True)[pick].square().sum(), leaves,
                               materialize_grads=True)  # the last state reads no C, D, z
    assert_all_close(got, want, NAMES, **F64)


def test_gradient_for_a_subset_of_inputs():
    ins = make_inputs(L=17, seed=9)
    for k in ("u", "delta", "B", "z"):
        ins[k] = ins[k].detach()
    names = [k for k, v in ins.items() if v.requires_grad]
    leaves = [ins[k] for k in names]
    out = ours(ins, True, 5, last=False)
    r_out = theirs(ins, True, last=False)
    (cot,) = cotangents([r_out])
    assert_all_close(torch.autograd.grad(out, leaves, cot),
                     torch.autograd.grad(r_out, leaves, cot), names, **F64)


def test_non_contiguous_inputs():
    """(b, L, d)-major tensors handed over transposed, as a model's activations are."""
    g = torch.Generator().manual_seed(10)
    b, d, n, length = 2, 3, 4, 17

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    stored = {"u": leaf(b, length, d), "delta": leaf(b, length, d, scale=0.5),
              "B": leaf(b, length, n), "C": leaf(b, length, n), "z": leaf(b, length, d)}
    A = (-torch.rand(d, n, generator=g, dtype=torch.float64)).requires_grad_()
    ins = {k: stored[k].transpose(1, 2) if k in stored else None for k in NAMES}
    ins.update(A=A, D=leaf(d), delta_bias=leaf(d))
    assert not ins["u"].is_contiguous()
    leaves = [*stored.values(), A, ins["D"], ins["delta_bias"]]
    for tile in (1, 5, 17):
        out, last = ours(ins, True, tile)
        r_out, r_last = theirs(ins, True)
        assert_all_close([out, last], [r_out, r_last], ["out", "last"], **F64)
        cot = cotangents([r_out, r_last])
        assert_all_close(torch.autograd.grad([out, last], leaves, cot),
                         torch.autograd.grad([r_out, r_last], leaves, cot),
                         [*stored, "A", "D", "delta_bias"], **F64)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), d=st.integers(1, 4), n=st.integers(1, 4), length=st.integers(1, 30),
       tile=st.integers(1, 35), opts=st.tuples(*[st.booleans()] * 4), seed=st.integers(0, 99))
def test_fuzz_shapes_tiles_and_options(b, d, n, length, tile, opts, seed):
    D, z, bias, softplus = opts
    ins = make_inputs(b=b, d=d, n=n, L=length, D=D, z=z, bias=bias, seed=seed)
    check_forward_and_grads(ins, softplus, tile)


# ------------------------------------------------------------------ grouped and constant B/C

@pytest.mark.parametrize("bc", ["grouped", "constant"])
def test_grouped_and_constant_B_C_are_refused_by_name(bc):
    ins = make_inputs(bc=bc)
    with pytest.raises(lbi_fx.InputError, match=r"B has shape"):
        ours(ins, True, 4)


def _scan_by_blocks(ins, softplus, tile, blocks, take_bc):
    """Run selective_scan on channel blocks ``[s, e)``; B/C for a block from take_bc."""
    outs, lasts = [], []
    for i, (s, e) in enumerate(blocks):
        sub = {k: (None if v is None else
                   v[:, s:e] if k in ("u", "delta", "z") else
                   v[s:e] if k in ("A", "D", "delta_bias") else take_bc(v, i, s, e))
               for k, v in ins.items()}
        out, last = ours(sub, softplus, tile)
        outs.append(out)
        lasts.append(last)
    return torch.cat(outs, 1), torch.cat(lasts, 1)


@pytest.mark.parametrize("tile", [1, 6, 23])
def test_grouped_B_C_by_one_call_per_group(tile):
    """(b, G, n, L) B/C: group g drives a contiguous block of d / G channels, so one
    call per block with that group's (b, n, L) slice is the grouped scan."""
    G, d = 3, 6
    ins = make_inputs(d=d, bc="grouped", groups=G, seed=tile)
    blocks = [(g * d // G, (g + 1) * d // G) for g in range(G)]
    out, last = _scan_by_blocks(ins, True, tile, blocks, lambda v, i, s, e: v[:, i])
    r_out, r_last = theirs(ins, True)
    assert_all_close([out, last], [r_out, r_last], ["out", "last"], **F64)
    leaves = list(ins.values())
    cot = cotangents([r_out, r_last])
    assert_all_close(torch.autograd.grad([out, last], leaves, cot),
                     torch.autograd.grad([r_out, r_last], leaves, cot), NAMES, **F64)


@pytest.mark.parametrize("tile", [1, 6, 23])
def test_constant_B_C_by_one_call_per_channel(tile):
    """(d, n) B/C: channel c's B/C row, constant over batch and time, is a (b, n, L)
    expand; one call per channel is the constant-B/C scan."""
    ins = make_inputs(d=3, bc="constant", seed=tile)
    b, length = ins["u"].shape[0], ins["u"].shape[2]
    blocks = [(c, c + 1) for c in range(3)]

    def take(v, i, s, e):
        return v[s][None, :, None].expand(b, -1, length)

    out, last = _scan_by_blocks(ins, False, tile, blocks, take)
    r_out, r_last = theirs(ins, False)
    assert_all_close([out, last], [r_out, r_last], ["out", "last"], **F64)
    leaves = list(ins.values())
    cot = cotangents([r_out, r_last])
    assert_all_close(torch.autograd.grad([out, last], leaves, cot),
                     torch.autograd.grad([r_out, r_last], leaves, cot), NAMES, **F64)


# ------------------------------------------------------------------ selective_scan_jvp

def _jvp_reference(ins, tangents, softplus):
    keys = [k for k, v in ins.items() if v is not None]

    def f(*vals):
        full = dict.fromkeys(NAMES)
        full.update(zip(keys, vals))
        return ref_selective_scan(*(full[k] for k in NAMES), softplus)

    primals = tuple(ins[k].detach() for k in keys)
    tans = tuple(torch.zeros_like(ins[k]) if tangents[i] is None else tangents[i]
                 for i, k in enumerate(NAMES) if ins[k] is not None)
    return torch.func.jvp(f, primals, tans)


@pytest.mark.parametrize("tile", [1, 4, 7, L, L + 5])
@pytest.mark.parametrize("D,z,bias,softplus", [(True, True, True, True),
                                               (False, False, False, False),
                                               (True, False, True, False),
                                               (False, True, False, True)])
def test_jvp_matches_torch_func_jvp_of_the_reference(tile, D, z, bias, softplus):
    ins = make_inputs(L=L, D=D, z=z, bias=bias, seed=tile + 11)
    g = torch.Generator().manual_seed(tile)
    tangents = [None if v is None else torch.randn(v.shape, generator=g, dtype=v.dtype)
                for v in ins.values()]
    primals = [None if v is None else v.detach() for v in ins.values()]
    y, y_dot = pgf.selective_scan_jvp(primals, tangents, tile=tile, delta_softplus=softplus)
    r_y, r_dot = _jvp_reference(ins, tangents, softplus)
    torch.testing.assert_close(y, r_y, **F64)
    torch.testing.assert_close(y_dot, r_dot, **F64)


@pytest.mark.parametrize("name", NAMES)
def test_jvp_one_direction_at_a_time(name):
    """A tangent on one input only (None elsewhere) is the directional derivative along it."""
    ins = make_inputs(L=29, seed=13)
    g = torch.Generator().manual_seed(1)
    tangents = [torch.randn(v.shape, generator=g, dtype=v.dtype) if k == name else None
                for k, v in ins.items()]
    primals = [v.detach() for v in ins.values()]
    _, y_dot = pgf.selective_scan_jvp(primals, tangents, tile=6, delta_softplus=True)
    _, r_dot = _jvp_reference(ins, tangents, True)
    torch.testing.assert_close(y_dot, r_dot, **F64)
    assert y_dot.abs().max() > 0


def test_jvp_short_primal_tuple_and_fp32():
    """(u, delta, A, B, C) alone (no D, z, bias) in fp32, against the reference in fp32
    (softplus keeps dt > 0: with raw delta the states grow to ~1e6 over 150 steps)."""
    ins = make_inputs(L=150, D=False, z=False, bias=False, dtype=torch.float32, seed=14)
    g = torch.Generator().manual_seed(2)
    tangents = [torch.randn(v.shape, generator=g) for v in list(ins.values())[:5]]
    primals = [v.detach() for v in list(ins.values())[:5]]
    y, y_dot = pgf.selective_scan_jvp(primals, tangents, tile=32, delta_softplus=True)
    r_y, r_dot = _jvp_reference(ins, tangents + [None] * 3, True)
    assert y_dot.dtype == torch.float32
    torch.testing.assert_close(y, r_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_dot, r_dot, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ tile_ssm (Mamba-2)

def _mixer(ngroups=2, dt_limit=(0.0, float("inf")), chunk_size=4, bias=False, seed=0):
    cfg = mamba2.Mamba2Config(d_model=8, d_state=4, d_conv=4, expand=2, headdim=4,
                              ngroups=ngroups, chunk_size=chunk_size, dt_limit=dt_limit,
                              bias=bias, A_init_range=(0.5, 4.0), dt_min=0.05, dt_max=0.5)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = mamba2.Mamba2Mixer(cfg).double()
        with torch.no_grad():  # move every parameter off its special initial value
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return m


def _mixer_check(m, tile, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    tiled = pgf.tile_ssm(m, tile=tile)
    assert isinstance(tiled, pgf.TiledMamba2Mixer)
    out = tiled(u)
    ref = ref_mixer(m, u)
    torch.testing.assert_close(out, ref, **F64)
    names = ["u"] + [n for n, _ in m.named_parameters()]
    leaves = [u] + list(m.parameters())
    assert [p for p in tiled.parameters()] == leaves[1:]  # the very same tensors
    cot = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    assert_all_close(torch.autograd.grad(out, leaves, cot),
                     torch.autograd.grad(ref, leaves, cot), names, **F64)


@pytest.mark.parametrize("tile", [1, 2, 5, 13, 20])
def test_tiled_mamba2_mixer_against_the_step_by_step_mixer(tile):
    """T = 13, chunk 4, d_conv 4, 2 groups of 2 heads: tiles of 1 and 2 steps are shorter
    than the conv tail, 5 divides neither T nor the chunk, 13 and 20 cover T."""
    _mixer_check(_mixer(), tile, 13, seed=tile)


def test_tiled_mamba2_mixer_one_group_dt_limit_and_biases():
    _mixer_check(_mixer(ngroups=1, dt_limit=(0.05, 0.4), bias=True, chunk_size=3), 4, 11)


@pytest.mark.parametrize("T,tile", [(1, 1), (2, 1), (3, 2), (3, 4)])
def test_tiled_mamba2_mixer_on_sequences_shorter_than_the_conv(T, tile):
    """T <= d_conv - 1: the conv tail is longer than the sequence; one head per group."""
    _mixer_check(_mixer(ngroups=4), tile, T)


def test_tile_ssm_on_a_model_against_step_by_step_mixers():
    """tile_ssm swaps every mixer of an LM: its loss and every gradient equal the same LM
    whose mixers run the step-by-step reference."""
    model, (idx,) = mamba2.build(n_layer=2, d_model=8, d_state=4, headdim=4, ngroups=2,
                                 chunk_size=4, batch=2, seq=10, backend="torch")
    model = model.double()
    ref = copy.deepcopy(model)
    for layer in ref.layers:
        layer.mixer.forward = (lambda m: lambda x: ref_mixer(m, x))(layer.mixer)
    tiled = pgf.tile_ssm(model, tile=3)
    assert sum(isinstance(m, pgf.TiledMamba2Mixer) for m in tiled.modules()) == 2
    y = torch.roll(idx, -1, 1)
    losses, grads = [], []
    for net in (tiled, ref):
        loss = F.cross_entropy(net(idx).flatten(0, 1), y.flatten())
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    torch.testing.assert_close(losses[0], losses[1], **F64)
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters()]
    assert_all_close(grads[0], grads[1], names, **F64)
