"""Pure-torch suffix scans: the reference, the sequential baseline and the chunked scan.

All functions take already-validated tensors. ``J`` is ``(N, K, r, r)`` with
``J[n, k] = dm_{k+1}/dm_k``; the scans return ``P`` of shape ``(N, K+1, r, r)`` with
``P[:, k] = J_k^T J_{k+1}^T ... J_{K-1}^T`` and ``P[:, K] = I``.

Schedule of :func:`scan_chunked` (the ``"torch"`` backend). It is the same schedule as the
Triton kernel in ``scan_triton.py`` so that the cheap torch tests exercise the kernel's
arithmetic order, chunk boundaries and ragged last chunk:

1. split K into ``nc`` chunks of ``C = chunk_size(K)`` steps; inside every chunk run the
   running product from the chunk's end backwards (``C`` batched GEMMs over ``N * nc``);
2. Hillis-Steele suffix scan over the ``nc`` chunk totals (``ceil(log2 nc)`` levels, one
   batched GEMM per level) gives the carry entering each chunk from the right;
3. one batched GEMM multiplies every local product by its chunk's carry.

``C = ceil(sqrt K)`` balances the sequential depth inside chunks against the log-depth
combine: ``C = 1`` would be a pure Hillis-Steele scan (K log K work), ``C = K`` the
sequential loop (depth K). With ``C ~ sqrt K`` the work stays about ``2K`` products and the
depth ``~ 2 sqrt K + log2 K``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "accumulation_dtype",
    "adjoints_backward",
    "adjoints_sequential",
    "chunk_size",
    "scan_backward",
    "scan_chunked",
    "scan_sequential",
    "suffix_scan_reference",
]


def chunk_size(K: int) -> int:
    """Steps per chunk, ``ceil(sqrt(K))`` for K >= 1; shared with the Triton launcher."""
    return math.isqrt(max(K, 1) - 1) + 1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays exact; every narrower float accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eye_like(J: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Batch of identities ``(N, 1, r, r)`` for the ``P[:, K] = I`` slot."""
    N, _, r, _ = J.shape
    return torch.eye(r, dtype=dtype, device=J.device).expand(N, 1, r, r)


def suffix_scan_reference(J: torch.Tensor) -> torch.Tensor:
    """Plain sequential loop accumulating in fp64; the independent oracle for tests.

    Returns float64 on ``J``'s device (not the input dtype) so that comparisons measure the
    error of the implementation under test, not of the reference.
    """
    Jd = J.detach().to(torch.float64)
    N, K, r, _ = Jd.shape
    out = torch.empty(N, K + 1, r, r, dtype=torch.float64, device=J.device)
    acc = torch.eye(r, dtype=torch.float64, device=J.device).expand(N, r, r).clone()
    out[:, K] = acc
    for k in range(K - 1, -1, -1):
        acc = Jd[:, k].transpose(-1, -2) @ acc
        out[:, k] = acc
    return out


def scan_sequential(J: torch.Tensor) -> torch.Tensor:
    """Sequential baseline: K dependent batched GEMMs, fp32 (or fp64) accumulation."""
    acc_dtype = accumulation_dtype(J.dtype)
    Jt = J.to(acc_dtype).transpose(-1, -2)
    N, K, r, _ = J.shape
    out = torch.empty(N, K + 1, r, r, dtype=acc_dtype, device=J.device)
    acc = _eye_like(J, acc_dtype)[:, 0]
    out[:, K] = acc
    for k in range(K - 1, -1, -1):
        acc = Jt[:, k] @ acc
        out[:, k] = acc
    return out.to(J.dtype)


def scan_chunked(J: torch.Tensor) -> torch.Tensor:
    """Chunked reduce-then-scan (see module docstring); the ``"torch"`` backend.

    Layout choices avoid hidden copies in ``torch.matmul``: J stays untransposed (``.mT``
    views reach BLAS as a transpose flag), chunks are a contiguous ``(N, nc, C)`` split so
    every step's batch flattens without a copy, and the fix-up treats a chunk's C local
    products as one ``(C r) x r`` matrix, a single GEMM by the carry.
    """
    acc_dtype = accumulation_dtype(J.dtype)
    N, K, r, _ = J.shape
    C = chunk_size(K)
    nc = -(-K // C)
    Ja = J.to(acc_dtype).contiguous()
    if nc * C != K:
        # Identities after the last real step leave every suffix product unchanged.
        padded = torch.empty(N, nc * C, r, r, dtype=acc_dtype, device=J.device)
        padded[:, :K] = Ja
        padded[:, K:] = torch.eye(r, dtype=acc_dtype, device=J.device)
        Ja = padded
    Jt = Ja.view(N, nc, C, r, r).mT

    # 1. local suffix products inside each chunk, all chunks at once.
    local = torch.empty(N, nc, C, r, r, dtype=acc_dtype, device=J.device)
    acc = Jt[:, :, C - 1]
    local[:, :, C - 1] = acc
    for i in range(C - 2, -1, -1):
        acc = Jt[:, :, i] @ acc
        local[:, :, i] = acc

    # 2. Hillis-Steele suffix scan over chunk totals: S[c] = T_c T_{c+1} ... T_{nc-1}.
    S = local[:, :, 0]
    d = 1
    while d < nc:
        S = torch.cat([S[:, :-d] @ S[:, d:], S[:, -d:]], dim=1)
        d *= 2

    # 3. fix-up: chunk c is multiplied by the carry S[c+1] (the last chunk by I, which
    # costs C spare products but keeps the batch contiguous).
    if nc > 1:
        eye = torch.eye(r, dtype=acc_dtype, device=J.device).expand(N, 1, r, r)
        carry = torch.cat([S[:, 1:], eye], dim=1)
        local = (local.view(N, nc, C * r, r) @ carry).view(N, nc, C, r, r)

    out = torch.empty(N, K + 1, r, r, dtype=J.dtype, device=J.device)
    out[:, :K] = local.view(N, nc * C, r, r)[:, :K]
    out[:, K] = torch.eye(r, dtype=J.dtype, device=J.device)
    return out


def adjoints_sequential(J: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``mbar_k = J_k^T mbar_{k+1}`` by vector recursion; never forms a matrix product.

    This is the torch path for :func:`suffix_adjoints`: O(K r^2) work against the scan's
    O(K r^3), so on CPU (and for the small N, K of this project) K cheap batched mat-vecs
    beat any parallel schedule, whose extra r^3 products dominate.
    """
    acc_dtype = accumulation_dtype(J.dtype)
    Jt = J.to(acc_dtype).transpose(-1, -2)
    N, K, r, _ = J.shape
    out = torch.empty(N, K + 1, r, dtype=acc_dtype, device=J.device)
    v = g.to(acc_dtype)
    out[:, K] = v
    for k in range(K - 1, -1, -1):
        v = (Jt[:, k] @ v.unsqueeze(-1)).squeeze(-1)
        out[:, k] = v
    return out.to(J.dtype)


def scan_backward(J: torch.Tensor, P: torch.Tensor, grad_P: torch.Tensor) -> torch.Tensor:
    """Gradient of the suffix scan w.r.t. ``J`` by its adjoint recursion.

    From ``P_k = J_k^T P_{k+1}``: with ``G_0 = dP_0`` and ``G_{k+1} = dP_{k+1} + J_k G_k``,
    ``dJ_k = P_{k+1} G_k^T``. A forward loop of K GEMMs; the backward is not a hot path.
    """
    acc_dtype = accumulation_dtype(J.dtype)
    Ja, Pa, dP = J.to(acc_dtype), P.to(acc_dtype), grad_P.to(acc_dtype)
    K = J.shape[1]
    dJ = torch.empty_like(Ja)
    G = dP[:, 0]
    for k in range(K):
        dJ[:, k] = Pa[:, k + 1] @ G.transpose(-1, -2)
        G = dP[:, k + 1] + Ja[:, k] @ G
    return dJ.to(J.dtype)


def adjoints_backward(
    J: torch.Tensor, M: torch.Tensor, grad_M: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``suffix_adjoints`` w.r.t. ``(J, g)``; vector analogue of ``scan_backward``.

    ``H_0 = dM_0``, ``H_{k+1} = dM_{k+1} + J_k H_k``, ``dJ_k = M_{k+1} H_k^T`` (outer
    product) and ``dg = H_K``.
    """
    acc_dtype = accumulation_dtype(J.dtype)
    Ja, Ma, dM = J.to(acc_dtype), M.to(acc_dtype), grad_M.to(acc_dtype)
    K = J.shape[1]
    dJ = torch.empty_like(Ja)
    H = dM[:, 0]
    for k in range(K):
        dJ[:, k] = Ma[:, k + 1].unsqueeze(-1) * H.unsqueeze(-2)
        H = dM[:, k + 1] + (Ja[:, k] @ H.unsqueeze(-1)).squeeze(-1)
    return dJ.to(J.dtype), H.to(J.dtype)
