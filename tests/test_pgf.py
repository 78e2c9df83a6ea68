"""Tiled exact SSM differentiation (``lbi_fx.pgf``, issue 13): every figure against plain
autograd (or ``torch.func.jvp``) of the per-step reference on the same inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import lbi_fx
from lbi_fx import pgf
from lbi_fx.bench import pgf as bench_pgf
from lbi_fx.models import hybrid, mamba2
from lbi_fx.models import transformer as gpt

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


pytestmark = pytest.mark.usefixtures("one_thread")


def scan_inputs(b=2, d=3, n=4, length=37, dtype=torch.float64, seed=0, full=True,
                decay=2.0):
    """Leaves (u, delta, A, B, C, D, z, delta_bias); D, z, delta_bias None unless ``full``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    A = -decay * torch.rand(d, n, generator=g, dtype=torch.float64).to(dtype)
    ins = [r(b, d, length), r(b, d, length, scale=0.5), A, r(b, n, length), r(b, n, length),
           r(d), r(b, d, length), r(d)]
    if not full:
        ins[5:] = [None, None, None]
    return tuple(None if t is None else t.requires_grad_() for t in ins)


def run_both(ins, softplus, tile):
    """(ours, reference): each ((out, last state), input gradients) for one random cotangent."""
    u, delta, A, B, C, D, z, bias = ins
    ours = pgf.selective_scan(u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=softplus,
                              tile=tile, return_last_state=True)
    ref = pgf.selective_scan_ref(u, delta, A, B, C, D, z, bias, softplus, True)
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in ref]
    leaves = [t for t in ins if t is not None]
    return [(outs, torch.autograd.grad(outs, leaves, cot)) for outs in (ours, ref)]


def max_err(a, b) -> float:
    return float((a - b).detach().abs().max())


def rel_err(a, b) -> float:
    return max_err(a, b) / float(b.detach().abs().max())


@pytest.mark.parametrize("tile", [1, 5, 37])
@pytest.mark.parametrize("full", [True, False], ids=["D-z-bias-softplus", "bare"])
def test_forward_and_every_gradient_match_autograd_of_reference_fp64(tile, full):
    ins = scan_inputs(full=full)
    (outs, grads), (ref_outs, ref_grads) = run_both(ins, softplus=full, tile=tile)
    assert outs[0].dtype == torch.float64 and outs[1].dtype == torch.float64
    assert max_err(outs[0], ref_outs[0]) <= 1e-10
    assert max_err(outs[1], ref_outs[1]) <= 1e-10
    names = [n for n, t in zip(NAMES, ins) if t is not None]
    assert len(grads) == (8 if full else 5)
    for name, g, r in zip(names, grads, ref_grads):
        assert max_err(g, r) <= 1e-10, name


def test_fp32_matches_autograd_of_reference():
    ins = scan_inputs(dtype=torch.float32, length=300, d=4, n=8)
    (outs, grads), (ref_outs, ref_grads) = run_both(ins, softplus=True, tile=64)
    assert outs[0].dtype == torch.float32
    assert rel_err(outs[0], ref_outs[0]) <= 1e-5
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert rel_err(g, r) <= 1e-5, name


def _ref_fn(softplus):
    return lambda *p: pgf.selective_scan_ref(*p[:7], p[7], softplus)


@pytest.mark.parametrize("tile", [1, 6, 37])
def test_jvp_matches_torch_func_jvp_of_reference_fp64(tile):
    primals = tuple(t.detach() for t in scan_inputs())
    g = torch.Generator().manual_seed(3)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) for p in primals)
    y, y_dot = pgf.selective_scan_jvp(primals, tangents, tile=tile, delta_softplus=True)
    ref_y, ref_dot = torch.func.jvp(_ref_fn(True), primals, tangents)
    assert max_err(y, ref_y) <= 1e-10
    assert max_err(y_dot, ref_dot) <= 1e-10


def test_jvp_with_one_direction_and_fp32():
    """dy/du alone (the paper's use): None tangents are zero; fp32 to 1e-5."""
    primals = tuple(t.detach() for t in scan_inputs(dtype=torch.float32, length=200))
    du = torch.randn(primals[0].shape, generator=torch.Generator().manual_seed(4))
    _, y_dot = pgf.selective_scan_jvp(primals, (du,) + (None,) * 7, tile=32,
                                      delta_softplus=True)
    zeros = tuple(torch.zeros_like(p) for p in primals[1:])
    _, ref_dot = torch.func.jvp(_ref_fn(True), primals, (du, *zeros))
    assert y_dot.dtype == torch.float32
    assert rel_err(y_dot, ref_dot) <= 1e-5


@pytest.mark.parametrize("name", ["u", "delta", "B", "C", "z"])
def test_y_dot_is_causal(name):
    """A perturbation at step t0 moves no output before t0, and moves the one at t0."""
    primals = tuple(t.detach() for t in scan_inputs(length=40))
    t0 = 22  # inside the third tile of 8
    i = NAMES.index(name)
    tangents = [None] * 8
    tangents[i] = torch.zeros_like(primals[i])
    tangents[i][..., t0] = 1.0
    _, y_dot = pgf.selective_scan_jvp(primals, tangents, tile=8, delta_softplus=True)
    assert torch.count_nonzero(y_dot[..., :t0]) == 0
    assert y_dot[..., t0].abs().max() > 0


def strong_decay_inputs(dtype):
    """Per-step log-decays down to about -2e4, then a stretch of weak decay (dt ~ 1e-3)."""
    u, delta, A, B, C, D, z, bias = (t.detach() for t in scan_inputs(length=48, dtype=dtype))
    A = -torch.logspace(1, 4, A.numel(), dtype=dtype).view(A.shape)  # -10 .. -1e4
    delta = delta.clone() + 2.0
    delta[..., 30:] = -7.0  # softplus(-7) ~ 1e-3: weak decay after a strong prefix
    return tuple(t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias))


def test_strong_decay_is_safe_and_exact():
    ins = strong_decay_inputs(torch.float64)
    with torch.no_grad():
        a = F.softplus(ins[1] + ins[7][:, None]).unsqueeze(-1) * ins[2][:, None]
        # the naive closed form exp(S_t) * cumsum(exp(-S_s) x_s) overflows on these inputs
        assert torch.isinf(torch.exp(-a.cumsum(2))).any()
    (outs, grads), (ref_outs, ref_grads) = run_both(ins, softplus=True, tile=16)
    assert all(torch.isfinite(t).all() for t in (*outs, *grads))
    assert max_err(outs[0], ref_outs[0]) <= 1e-10
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert max_err(g, r) <= 1e-10 * max(1.0, float(r.abs().max())), name
    primals = tuple(t.detach() for t in ins)
    tangents = tuple(torch.randn_like(p) for p in primals)
    _, y_dot = pgf.selective_scan_jvp(primals, tangents, tile=16, delta_softplus=True)
    _, ref_dot = torch.func.jvp(_ref_fn(True), primals, tangents)
    assert torch.isfinite(y_dot).all() and rel_err(y_dot, ref_dot) <= 1e-10

    ins32 = strong_decay_inputs(torch.float32)
    (outs, grads), (ref_outs, ref_grads) = run_both(ins32, softplus=True, tile=16)
    assert all(torch.isfinite(t).all() for t in (*outs, *grads))
    assert rel_err(outs[0], ref_outs[0]) <= 1e-5
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert rel_err(g, r) <= 1e-5, name


def _saved(fn_name, length, d, n=16, tile=256):
    ins = scan_inputs(b=1, d=d, n=n, length=length, dtype=torch.float32)
    u, delta, A, B, C, D, z, bias = ins
    if fn_name == "pgf":
        def fn():
            return pgf.selective_scan(u, delta, A, B, C, D, z, delta_bias=bias,
                                      delta_softplus=True, tile=tile)
    else:
        def fn():
            return pgf.selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
    total, of_inputs, _ = bench_pgf.saved_bytes(fn, ins)
    return total, of_inputs, sum(t.nbytes for t in ins)


def test_saved_bytes_at_4k_tile_256_are_under_10_percent_of_reference():
    ours, _, _ = _saved("pgf", 4096, d=64)
    ref, _, _ = _saved("ref", 4096, d=64)
    assert ours <= 0.10 * ref, (ours, ref)


def test_saved_bytes_grow_only_with_inputs_and_one_state_per_tile():
    """From L = 4k to 16k: everything saved beyond the inputs is the boundary states,
    one (b, d, n) state per 256 steps, under 2% of the inputs' own growth."""
    d, n = 16, 16
    beyond = {}
    for length in (4096, 16384):
        total, of_inputs, input_bytes = _saved("pgf", length, d=d, n=n)
        assert of_inputs == input_bytes  # every input is saved, none copied
        beyond[length] = total - input_bytes
        assert beyond[length] == pgf.n_tiles(length, 256) * d * n * 4
    input_growth = (16384 - 4096) * (3 * d + 2 * n) * 4
    assert beyond[16384] - beyond[4096] <= 0.02 * input_growth


def test_bad_inputs_are_refused_by_name():
    u, delta, A, B, C, *_ = (t.detach() for t in scan_inputs())
    with pytest.raises(lbi_fx.InputError, match="B has shape"):
        pgf.selective_scan(u, delta, A, B[:, :, :-1], C)
    with pytest.raises(lbi_fx.InputError, match="A has shape"):
        pgf.selective_scan(u, delta, A[:-1], B, C)
    with pytest.raises(lbi_fx.InputError, match="complex A"):
        pgf.selective_scan(u, delta, A.to(torch.complex128), B, C)
    with pytest.raises(lbi_fx.InputError, match="tile=0"):
        pgf.selective_scan(u, delta, A, B, C, tile=0)
    with pytest.raises(lbi_fx.InputError, match="tangent of u"):
        pgf.selective_scan_jvp((u, delta, A, B, C), (u[:, :1], None, None, None, None))
    model, _ = gpt.build(n_layer=1)
    with pytest.raises(lbi_fx.InputError, match="no Mamba2Mixer"):
        pgf.tile_ssm(model)


def test_ssd_with_state_matches_the_recurrence_under_strong_decay():
    """The Mamba-2 tile kernel from a nonzero state, against the step-by-step recurrence."""
    g = torch.Generator().manual_seed(0)
    b, T, gr, k, p, n = 2, 21, 2, 2, 3, 4
    x = torch.randn(b, T, gr, k, p, generator=g, dtype=torch.float64)
    dt = torch.rand(b, T, gr, k, generator=g, dtype=torch.float64) * 2
    A = -torch.tensor([[1.0, 5e3], [0.1, 30.0]], dtype=torch.float64)  # strong and weak
    B, C = (torch.randn(b, T, gr, n, generator=g, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(b, gr, k, p, n, generator=g, dtype=torch.float64)
    y, h_last = pgf.ssd_with_state(x, dt, A, B, C, chunk_size=8, h0=h0)
    h, ys = h0, []
    for t in range(T):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + torch.einsum(
            "bgk,bgkp,bgn->bgkpn", dt[:, t], x[:, t], B[:, t])
        ys.append(torch.einsum("bgkpn,bgn->bgkp", h, C[:, t]))
    assert torch.isfinite(y).all()
    assert max_err(y, torch.stack(ys, 1)) <= 1e-10
    assert max_err(h_last, h) <= 1e-10


def _lm_grads(model, idx):
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    loss = F.cross_entropy(logits.flatten(0, 1), torch.roll(idx, -1, 1).flatten())
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _small_mamba2(seq, dtype=torch.float64):
    model, (idx,) = mamba2.build(n_layer=2, d_model=32, d_state=8, headdim=8, chunk_size=8,
                                 batch=2, seq=seq, backend="torch")
    return model.to(dtype), idx


@pytest.mark.parametrize("tile,seq", [(1, 12), (7, 40), (64, 40)])
def test_tile_ssm_mamba2_gets_the_same_gradients_fp64(tile, seq):
    model, idx = _small_mamba2(seq)
    tiled = pgf.tile_ssm(copy.deepcopy(model), tile=tile)
    assert sum(isinstance(m, pgf.TiledMamba2Mixer) for m in tiled.modules()) == 2
    loss, grads = _lm_grads(model, idx)
    tiled_loss, tiled_grads = _lm_grads(tiled, idx)
    assert abs(float(loss - tiled_loss)) <= 1e-10
    assert grads.keys() == tiled_grads.keys()
    for name, g in grads.items():
        assert max_err(tiled_grads[name], g) <= 1e-10, name


def test_tile_ssm_mamba2_fp32_and_hybrid():
    model, idx = _small_mamba2(40, torch.float32)
    tiled = pgf.tile_ssm(copy.deepcopy(model), tile=16)
    _, grads = _lm_grads(model, idx)
    _, tiled_grads = _lm_grads(tiled, idx)
    for name, g in grads.items():
        assert rel_err(tiled_grads[name], g) <= 1e-5, name
    hyb, (hidx,) = hybrid.build(n_layer=4, d_model=32, n_head=2, d_state=8, headdim=8,
                                chunk_size=8, seq=24, backend="torch")
    hyb = hyb.double()
    tiled = pgf.tile_ssm(copy.deepcopy(hyb), tile=5)
    assert sum(isinstance(m, pgf.TiledMamba2Mixer) for m in tiled.modules()) == 3
    _, grads = _lm_grads(hyb, hidx)
    _, tiled_grads = _lm_grads(tiled, hidx)
    for name, g in grads.items():
        assert max_err(tiled_grads[name], g) <= 1e-10, name


def test_tile_ssm_keeps_parameters_and_state_dict():
    model, _ = _small_mamba2(8)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert pgf.tile_ssm(model, tile=4) is model
    assert list(model.state_dict()) == keys
    assert all(p is params[k] for k, p in model.named_parameters())
    pgf.tile_ssm(model, tile=9)  # re-tiling updates the tile
    assert {m.tile for m in model.modules() if isinstance(m, pgf.TiledMamba2Mixer)} == {9}


def test_tiled_mixers_are_fx_leaves_under_transform():
    """lbi_fx.transform keeps every tiled mixer one node, and the LBI model's scan backward
    equals autograd on the same LBI model."""
    from lbi_fx.testing import gradient_parity

    model, idx = _small_mamba2(16)
    pgf.tile_ssm(model, tile=8)
    lbi = lbi_fx.transform(model, lbi_fx.every(1, "layers"), rank=4, example_inputs=(idx,))
    assert lbi.capture == "symbolic_trace"  # no torch.export fallback
    leaves = [n.target for n in lbi.rewritten_graph.graph.nodes if n.op == "call_module"]
    assert {"layers.0.mixer", "layers.1.mixer"} <= set(leaves)
    targets = torch.roll(idx, -1, 1)

    def loss_fn(logits):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    gradient_parity(lbi, (idx,), loss_fn).assert_close(rel_l2=1e-10, cosine=1 - 1e-10)


def test_bench_pgf_runs_and_reports_every_method(capsys, tmp_path):
    argv = ["--lengths", "32,64", "--tile", "16", "--dim", "4", "--d-state", "4",
            "--mamba2-lengths", "32", "--repeat", "1", "--json", "--threads", "1"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png = None
    else:
        png = tmp_path / "mem.png"
        argv += ["--plot", str(png)]
    assert bench_pgf.main(argv) == 0
    assert png is None or png.stat().st_size > 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["L"], r["method"]) for r in result["scan"]] == [
        (L, m) for L in (32, 64) for m in bench_pgf.METHODS]
    for r in result["scan"]:
        assert r["peak_bytes"] > 0 and r["saved_bytes"] > 0
        assert r["max_rel_grad_diff_vs_loop"] <= 1e-5
    assert [r["method"] for r in result["mamba2"]] == ["autograd", "tile_ssm"]
    assert result["mamba2"][1]["max_rel_grad_diff"] <= 1e-5
