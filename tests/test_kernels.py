"""Tests of ``lbi_fx.kernels``: every backend against the independent fp64 sequential loop.

Triton runs on CPU through its interpreter. ``TRITON_INTERPRET`` is set only for the tests
that need it (module-scoped fixture), not at import: other test files in the same process may
have imported triton already, and a global setting would also push real GPU kernels into
the interpreter. The launcher reads the flag at launch time, so the fixture takes effect.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lbi_fx.kernels import (
    TritonFallbackWarning,
    chunk_size,
    suffix_adjoints,
    suffix_scan,
    suffix_scan_reference,
    triton_available,
)

from lbi_fx.errors import InputError

NS = (1, 3, 8)
KS = (1, 2, 7, 9, 33, 64)
RS = (1, 4, 16, 17, 32, 64)
LOW = (torch.float32, torch.float16, torch.bfloat16)
# Max over (n, k) of ||P_k - P_ref_k||_F / ||P_ref_k||_F, by input dtype.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float64: 1e-12}



def test_triton_imports():
    """triton is a dependency of lbi-fx: if it stops importing, the suite fails here
    (and in every Triton test below) instead of skipping them."""
    from lbi_fx.kernels import ops

    assert triton_available(), f"triton does not import: {ops._triton_err}"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def make_chain(N: int, K: int, r: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Orthogonal-plus-noise Jacobians scaled to spectral norm 1: products neither blow up
    nor vanish over K = 64, and J is far from symmetric so a transpose bug shows."""
    gen = torch.Generator().manual_seed(1000003 * seed + 1009 * K + 17 * r + N)
    Q, _ = torch.linalg.qr(torch.randn(N, K, r, r, generator=gen, dtype=torch.float64))
    J = Q + (0.1 / math.sqrt(r)) * torch.randn(N, K, r, r, generator=gen, dtype=torch.float64)
    J = J / torch.linalg.matrix_norm(J, ord=2, keepdim=True)
    return J.to(dtype)


def make_g(N: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7 * N + r)
    return torch.randn(N, r, generator=gen, dtype=torch.float64).to(dtype)


def rel_err(x: torch.Tensor, ref: torch.Tensor, dims: tuple[int, ...]) -> float:
    """Worst relative error of one slice; ``ref`` is fp64 from the sequential loop."""
    d = torch.linalg.vector_norm(x.double().cpu() - ref.cpu(), dim=dims)
    n = torch.linalg.vector_norm(ref.cpu(), dim=dims).clamp_min(1e-300)
    return (d / n).max().item()


def check_against_reference(J: torch.Tensor, backend: str) -> None:
    """P and M = P g of ``backend`` against fp64 reference built from the same (cast) J."""
    N, K, r, _ = J.shape
    ref = suffix_scan_reference(J)  # fp64, from the already-rounded J
    P = suffix_scan(J, backend=backend)
    assert P.shape == (N, K + 1, r, r) and P.dtype == J.dtype and P.device == J.device
    tol = TOL[J.dtype]
    err = rel_err(P, ref, (-2, -1))
    assert err <= tol, f"P: {backend} {J.dtype} N={N} K={K} r={r}: rel err {err:.3e}"
    eye = torch.eye(r, dtype=J.dtype, device=J.device).expand(N, r, r)
    assert torch.equal(P[:, K], eye), "P[:, K] must be exactly I"

    g = make_g(N, r, J.dtype).to(J.device)
    M = suffix_adjoints(J, g, backend=backend)
    assert M.shape == (N, K + 1, r) and M.dtype == J.dtype
    M_ref = (ref @ g.double()[:, None, :, None]).squeeze(-1)
    err = rel_err(M, M_ref, (-1,))
    assert err <= tol, f"M: {backend} {J.dtype} N={N} K={K} r={r}: rel err {err:.3e}"
    assert torch.equal(M[:, K], g)


# ---------------------------------------------------------------- reference self-check


def test_reference_matches_explicit_products():
    J = make_chain(2, 3, 5, torch.float64)
    ref = suffix_scan_reference(J)
    Jt = J.transpose(-1, -2)
    torch.testing.assert_close(ref[:, 0], Jt[:, 0] @ Jt[:, 1] @ Jt[:, 2], rtol=0, atol=1e-14)
    torch.testing.assert_close(ref[:, 1], Jt[:, 1] @ Jt[:, 2], rtol=0, atol=1e-14)
    torch.testing.assert_close(ref[:, 2], Jt[:, 2], rtol=0, atol=0)
    assert torch.equal(ref[:, 3], torch.eye(5, dtype=torch.float64).expand(2, 5, 5))


def test_chunk_size_is_ceil_sqrt():
    assert [chunk_size(K) for K in (1, 2, 4, 5, 9, 33, 64, 256)] == [1, 2, 2, 3, 3, 6, 8, 16]


# ---------------------------------------------------------------- torch backends


@pytest.mark.parametrize("dtype", (*LOW, torch.float64), ids=str)
@pytest.mark.parametrize("backend", ["torch", "sequential"])
def test_torch_backends_grid(backend, dtype):
    for N in NS:
        for K in KS:
            for r in RS:
                check_against_reference(make_chain(N, K, r, dtype), backend)


@pytest.mark.parametrize("backend", ["auto", "triton", "torch", "sequential"])
def test_fp64_is_exact_on_every_backend(backend):
    # fp64 always takes a torch path, so "triton" needs no interpreter here - and says so.
    J = make_chain(3, 33, 17, torch.float64)
    if backend == "triton":
        with pytest.warns(UserWarning, match="backend='triton' has no float64 kernel"):
            P = suffix_scan(J, backend=backend)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", TritonFallbackWarning)
            P = suffix_scan(J, backend=backend)
    assert P.dtype == torch.float64
    assert rel_err(P, suffix_scan_reference(J), (-2, -1)) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "sequential"])
def test_k1_is_transpose(backend):
    J = make_chain(3, 1, 6, torch.float32)
    P = suffix_scan(J, backend=backend)
    assert P.shape == (3, 2, 6, 6)
    torch.testing.assert_close(P[:, 0], J[:, 0].transpose(-1, -2), rtol=0, atol=1e-7)
    assert torch.equal(P[:, 1], torch.eye(6).expand(3, 6, 6))


def test_empty_batch():
    J = torch.zeros(0, 4, 3, 3)
    assert suffix_scan(J, "torch").shape == (0, 5, 3, 3)
    assert suffix_adjoints(J, torch.zeros(0, 3), "torch").shape == (0, 5, 3)


@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(1, 4),
    K=st.integers(1, 40),
    r=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_chunked_scan_fuzz(N, K, r, seed):
    J = make_chain(N, K, r, torch.float64, seed=seed)
    assert rel_err(suffix_scan(J, "torch"), suffix_scan_reference(J), (-2, -1)) <= 1e-12


def test_gradients_match_finite_differences():
    J = make_chain(2, 5, 3, torch.float64).requires_grad_()
    g = make_g(2, 3, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: suffix_scan(a, "torch"), (J,))
    assert torch.autograd.gradcheck(lambda a, b: suffix_adjoints(a, b, "torch"), (J, g))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "J, match",
    [
        (torch.zeros(2, 3, 4), "rank 4"),
        (torch.zeros(2, 3, 4, 5), "square"),
        (torch.zeros(2, 0, 4, 4), "K >= 1"),
        (torch.zeros(2, 3, 0, 0), "r >= 1"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.int32), "float16, bfloat16"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.complex64), "float16, bfloat16"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_bad_J_raises_input_error(J, match):
    with pytest.raises(InputError, match="J must") as info:
        suffix_scan(J, "torch")
    assert match in str(info.value)
    with pytest.raises(InputError, match="J must"):
        suffix_adjoints(J, torch.zeros(2, 4), "torch")


@pytest.mark.parametrize(
    "g, match",
    [
        (torch.zeros(2, 5), r"\(N, r\) = \(2, 4\)"),
        (torch.zeros(3, 4), r"\(N, r\) = \(2, 4\)"),
        (torch.zeros(2, 4, 1), r"\(N, r\) = \(2, 4\)"),
        (torch.zeros(2, 4, dtype=torch.float64), "dtype"),
        (None, "torch.Tensor"),
    ],
)
def test_bad_g_raises_input_error(g, match):
    with pytest.raises(InputError, match="g must") as info:
        suffix_adjoints(torch.zeros(2, 3, 4, 4), g, "torch")
    assert re.search(match, str(info.value))


def test_bad_backend_raises_input_error():
    with pytest.raises(InputError, match="backend"):
        suffix_scan(torch.zeros(1, 2, 3, 3), backend="cuda")
    with pytest.raises(InputError, match="backend"):
        suffix_adjoints(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3), backend="fast")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="TRITON_INTERPRET"):
        suffix_scan(torch.zeros(1, 2, 3, 3), backend="triton")
    with pytest.raises(InputError, match="TRITON_INTERPRET"):
        suffix_adjoints(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3), backend="triton")


# ---------------------------------------------------------------- graph capture


def _scan_then_adjoints(J, g):
    return suffix_scan(J).sum(-1) + suffix_adjoints(J, g)


def test_symbolic_trace_records_one_node_per_op():
    gm = torch.fx.symbolic_trace(_scan_then_adjoints)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.lbi_fx.suffix_scan) == 1
    assert calls.count(torch.ops.lbi_fx.suffix_adjoints) == 1
    J, g = make_chain(2, 9, 4, torch.float32), make_g(2, 4, torch.float32)
    torch.testing.assert_close(gm(J, g), _scan_then_adjoints(J, g))


def test_make_fx_and_export_keep_one_opaque_node():
    from torch.fx.experimental.proxy_tensor import make_fx

    J, g = make_chain(2, 9, 4, torch.float32), make_g(2, 4, torch.float32)
    for graph in (
        make_fx(_scan_then_adjoints)(J, g).graph,
        torch.export.export(_Wrap(), (J, g)).graph,
    ):
        targets = [n.target for n in graph.nodes if n.op == "call_function"]
        assert targets.count(torch.ops.lbi_fx.suffix_scan.default) == 1
        assert targets.count(torch.ops.lbi_fx.suffix_adjoints.default) == 1
        assert not any("mm" in str(t) or "matmul" in str(t) for t in targets), targets


class _Wrap(torch.nn.Module):
    def forward(self, J, g):
        return _scan_then_adjoints(J, g)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_on_cpu(compile_backend):
    J, g = make_chain(3, 7, 5, torch.float32), make_g(3, 5, torch.float32)
    fn = torch.compile(lambda a: suffix_scan(a, "torch"), backend=compile_backend, fullgraph=True)
    assert rel_err(fn(J), suffix_scan_reference(J), (-2, -1)) <= 1e-5
    fa = torch.compile(lambda a, b: suffix_adjoints(a, b), backend=compile_backend, fullgraph=True)
    M_ref = (suffix_scan_reference(J) @ g.double()[:, None, :, None]).squeeze(-1)
    assert rel_err(fa(J, g), M_ref, (-1,)) <= 1e-5


def test_torch_compile_backward_through_op():
    J = make_chain(2, 6, 3, torch.float64).requires_grad_()
    fn = torch.compile(lambda a: suffix_scan(a, "torch")[:, 0].sum(), backend="aot_eager")
    (grad,) = torch.autograd.grad(fn(J), J)
    (ref,) = torch.autograd.grad(suffix_scan_reference_differentiable(J)[:, 0].sum(), J)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)


def suffix_scan_reference_differentiable(J: torch.Tensor) -> torch.Tensor:
    """Plain autograd-tracked loop, independent of the registered backward formula."""
    K, r = J.shape[1], J.shape[2]
    acc = torch.eye(r, dtype=J.dtype).expand(J.shape[0], r, r)
    out = [acc]
    for k in range(K - 1, -1, -1):
        acc = J[:, k].transpose(-1, -2) @ acc
        out.append(acc)
    return torch.stack(out[::-1], dim=1)


# ---------------------------------------------------------------- optional triton import


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )


def test_import_is_lazy_and_torch_paths_survive_without_triton():
    res = _run_python(
        """
        import sys
        import torch
        import lbi_fx.kernels as k
        # The property under test is that lbi_fx.kernels itself defers Triton; other
        # packages (torch._dynamo) may import triton on their own.
        assert "lbi_fx.kernels.scan_triton" not in sys.modules, "triton backend loaded eagerly"
        for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
            del sys.modules[name]
        sys.modules["triton"] = None  # any later `import triton` raises ImportError
        from lbi_fx.errors import InputError
        J = torch.randn(2, 5, 3, 3)
        ref = k.suffix_scan_reference(J)
        for backend in ("auto", "torch", "sequential"):
            assert (k.suffix_scan(J, backend).double() - ref).abs().max() < 1e-5
        assert not k.triton_available()
        try:
            k.suffix_scan(J, "triton")
        except InputError as exc:
            assert "triton" in str(exc)
        else:
            raise AssertionError("backend='triton' without triton must raise InputError")
        print("OK")
        """
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------- triton (interpreter)


@pytest.fixture(scope="module")
def triton_interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


# The interpreter is slow (~30 s per dtype for the full grid on 2 cores), so fp32 runs the
# full N x K x r grid and fp16/bf16 run every K and r at N = 3 only: the kernels treat the
# chain index as a plain program id, so N adds no code path that fp32 does not cover.
@pytest.mark.parametrize("r", RS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_triton_interpreter_grid(triton_interpreter, dtype, r):
    for N in NS if dtype == torch.float32 else (3,):
        for K in KS:
            check_against_reference(make_chain(N, K, r, dtype), "triton")


def test_triton_interpreter_k1_and_noncontiguous(triton_interpreter):
    J = make_chain(3, 1, 6, torch.float32)
    P = suffix_scan(J, backend="triton")
    torch.testing.assert_close(P[:, 0], J[:, 0].transpose(-1, -2), rtol=0, atol=1e-7)
    Jnc = make_chain(9, 7, 5, torch.float32)[::3]  # non-contiguous view
    check_against_reference(Jnc, "triton")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "torch", "sequential"])
@pytest.mark.parametrize("dtype", (*LOW, torch.float64), ids=str)
def test_cuda_grid(backend, dtype, monkeypatch):
    if backend == "triton" and not triton_available():
        pytest.skip("triton not importable")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for N in NS:
        for K in KS:
            for r in RS:
                check_against_reference(make_chain(N, K, r, dtype).cuda(), backend)


@pytest.mark.gpu
@needs_cuda
def test_cuda_compile_and_larger_shapes(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    J = make_chain(4, 256, 64, torch.float32).cuda()
    check_against_reference(J, "auto")
    fn = torch.compile(lambda a: suffix_scan(a), backend="aot_eager", fullgraph=True)
    assert rel_err(fn(J), suffix_scan_reference(J), (-2, -1)) <= 1e-5
