"""Public suffix-scan API, input validation, backend dispatch and ``torch.library`` ops.

Each public function is one call of a custom op (``lbi_fx::suffix_scan``,
``lbi_fx::suffix_adjoints``) so that FX graphs, ``torch.export`` and ``torch.compile`` see a
single opaque node instead of K unrolled GEMMs. Validation runs inside the op (real and
fake implementations) so that it also fires on meta/fake tensors during tracing.

Triton is imported only when a Triton backend is actually needed, so that the torch paths
work without it and so that ``TRITON_INTERPRET`` is read at launch time, not import time.
"""

from __future__ import annotations

import warnings

import torch

from lbi_fx.errors import InputError

from .scan_torch import (
    adjoints_backward,
    adjoints_sequential,
    scan_backward,
    scan_chunked,
    scan_sequential,
)

__all__ = ["BACKENDS", "TritonFallbackWarning", "suffix_adjoints", "suffix_scan",
           "triton_available"]


class TritonFallbackWarning(UserWarning):
    """``backend="triton"`` was asked for and a torch path ran instead (float64)."""

BACKENDS = ("auto", "triton", "torch", "sequential")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_triton_mod = None
_triton_err: str | None = None


def _load_triton():
    """Import ``scan_triton`` once; remember the failure instead of raising."""
    global _triton_mod, _triton_err
    if _triton_mod is None and _triton_err is None:
        try:
            from . import scan_triton
        except Exception as exc:  # ImportError, or a broken triton install
            _triton_err = f"{type(exc).__name__}: {exc}"
        else:
            _triton_mod = scan_triton
    return _triton_mod


def triton_available() -> bool:
    """Whether the Triton backend can be imported in this process."""
    return _load_triton() is not None


def _check_backend(backend: object) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_J(J: object) -> None:
    if not isinstance(J, torch.Tensor):
        raise InputError(f"J must be a torch.Tensor of shape (N, K, r, r), got {type(J).__name__}")
    if J.dim() != 4:
        raise InputError(f"J must have shape (N, K, r, r) (rank 4), got shape {tuple(J.shape)}")
    _, K, r, r2 = J.shape
    if r != r2:
        raise InputError(
            f"J must be square in its last two dims, shape (N, K, r, r), got {tuple(J.shape)}"
        )
    if K < 1 or r < 1:
        raise InputError(
            f"J must have shape (N, K, r, r) with K >= 1, r >= 1, got {tuple(J.shape)}"
        )
    if J.dtype not in _FLOAT_DTYPES:
        raise InputError(
            f"J must be float16, bfloat16, float32 or float64 (shape (N, K, r, r)), got {J.dtype}"
        )


def _check_g(J: torch.Tensor, g: object) -> None:
    N, _, r, _ = J.shape
    if not isinstance(g, torch.Tensor):
        raise InputError(
            f"g must be a torch.Tensor of shape (N, r) = ({N}, {r}), got {type(g).__name__}"
        )
    if g.dim() != 2 or g.shape[0] != N or g.shape[1] != r:
        raise InputError(f"g must have shape (N, r) = ({N}, {r}) to match J, got {tuple(g.shape)}")
    if g.dtype != J.dtype:
        raise InputError(f"g must have J's dtype {J.dtype} (shape ({N}, {r})), got {g.dtype}")
    if g.device != J.device:
        raise InputError(f"g must be on J's device {J.device}, got {g.device}")


def _resolve(backend: str, J: torch.Tensor) -> str:
    """Map ``backend`` to the path that runs: "triton", "torch" or "sequential"."""
    if J.dtype == torch.float64:
        if backend == "triton":  # asked for by name: say what runs instead
            warnings.warn("lbi-fx: backend='triton' has no float64 kernel; this float64 scan "
                          "runs the torch chunked scan (exact in float64) instead",
                          TritonFallbackWarning, stacklevel=2)
        return "sequential" if backend == "sequential" else "torch"  # exact fp64 in torch
    if backend == "auto":
        if J.device.type == "cuda" and triton_available():
            return "triton"
        # CPU: the chunked scan pays off only while per-op overhead dominates (long chains
        # of small matrices); compute-bound shapes run faster sequentially (bench scan).
        N, K, r = J.shape[0], J.shape[1], J.shape[2]
        return "torch" if K >= 32 and N * r * r <= 4096 else "sequential"
    if backend == "triton":
        mod = _load_triton()
        if mod is None:
            raise InputError(f"backend='triton' needs an importable triton ({_triton_err})")
        if J.device.type != "cuda" and not mod.interpret_enabled():
            raise InputError(
                f"backend='triton' got J on {J.device}; Triton runs CPU tensors only in its "
                "interpreter: set TRITON_INTERPRET=1, or use backend='torch' / 'auto'"
            )
    return backend


@torch.library.custom_op("lbi_fx::suffix_scan", mutates_args=())
def _suffix_scan_op(J: torch.Tensor, backend: str) -> torch.Tensor:
    _check_backend(backend)
    _check_J(J)
    if J.shape[0] == 0:
        return J.new_empty((0, J.shape[1] + 1, J.shape[2], J.shape[3]))
    path = _resolve(backend, J)
    if path == "triton":
        return _load_triton().suffix_scan_triton(J)
    if path == "sequential":
        return scan_sequential(J)
    return scan_chunked(J)


@_suffix_scan_op.register_fake
def _suffix_scan_fake(J: torch.Tensor, backend: str) -> torch.Tensor:
    _check_backend(backend)
    _check_J(J)
    N, K, r, _ = J.shape
    return J.new_empty((N, K + 1, r, r))


def _scan_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output)


def _scan_grad(ctx, grad_P):
    J, P = ctx.saved_tensors
    return scan_backward(J, P, grad_P), None


_suffix_scan_op.register_autograd(_scan_grad, setup_context=_scan_setup)


@torch.library.custom_op("lbi_fx::suffix_adjoints", mutates_args=())
def _suffix_adjoints_op(J: torch.Tensor, g: torch.Tensor, backend: str) -> torch.Tensor:
    _check_backend(backend)
    _check_J(J)
    _check_g(J, g)
    if J.shape[0] == 0:
        return J.new_empty((0, J.shape[1] + 1, J.shape[2]))
    if _resolve(backend, J) == "triton":
        return _load_triton().suffix_adjoints_triton(J, g)
    return adjoints_sequential(J, g)


@_suffix_adjoints_op.register_fake
def _suffix_adjoints_fake(J: torch.Tensor, g: torch.Tensor, backend: str) -> torch.Tensor:
    _check_backend(backend)
    _check_J(J)
    _check_g(J, g)
    N, K, r, _ = J.shape
    return J.new_empty((N, K + 1, r))


def _adj_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output)


def _adj_grad(ctx, grad_M):
    J, M = ctx.saved_tensors
    dJ, dg = adjoints_backward(J, M, grad_M)
    return dJ, dg, None


_suffix_adjoints_op.register_autograd(_adj_grad, setup_context=_adj_setup)


def _check_arg(name: str, x: object, shape: str) -> None:
    """Reject non-tensors early; FX proxies pass through so symbolic tracing records the op."""
    if not isinstance(x, (torch.Tensor, torch.fx.Proxy)):
        raise InputError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")


def suffix_scan(J: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Suffix products ``P[:, k] = J_k^T ... J_{K-1}^T`` and ``P[:, K] = I``.

    ``J``: (N, K, r, r) float16/bfloat16/float32/float64; returns (N, K+1, r, r) in J's
    dtype, accumulated in fp32 (fp64 for fp64). ``backend``: "auto" (Triton on CUDA, else
    torch), "triton", "torch" (chunked log-depth scan) or "sequential" (baseline loop).
    """
    _check_backend(backend)
    _check_arg("J", J, "(N, K, r, r)")
    return torch.ops.lbi_fx.suffix_scan(J, backend)


def suffix_adjoints(J: torch.Tensor, g: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Adjoints ``M[:, k] = P[:, k] @ g`` for k = 0..K without materialising all of P.

    ``g``: (N, r), the adjoint of the last interface; returns (N, K+1, r) with
    ``M[:, K] = g``. The torch paths use the vector recursion ``M_k = J_k^T M_{k+1}``
    (O(K r^2)); the Triton path is a chunked scan (see ``scan_triton``).
    """
    _check_backend(backend)
    _check_arg("J", J, "(N, K, r, r)")
    _check_arg("g", g, "(N, r)")
    return torch.ops.lbi_fx.suffix_adjoints(J, g, backend)
