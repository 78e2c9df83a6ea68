"""Triton kernels for the suffix scan ``P_k = J_k^T P_{k+1}`` and its fused adjoint ``P_k g``.

Schedule: chunked reduce-then-scan, the same as ``scan_torch.scan_chunked``.

* ``_scan_local`` (grid ``N x nc``): each program owns one chunk of ``C = ceil(sqrt K)``
  steps of one chain and walks it backwards with a running ``R x R`` fp32 product in
  registers (one ``tl.dot`` per step), storing the chunk-local suffix products.
* ``_scan_combine`` (grid ``N x nc``, ``ceil(log2 nc)`` launches): Hillis-Steele suffix
  scan over the chunk totals, ping-ponging between two small buffers.
* ``_scan_fixup`` (grid ``N x (nc-1)``): multiplies every local product by the carry of
  the chunks to its right; independent products, so loads pipeline.

Why this schedule: K is small (2..256), r is 16..64 and N is 1..64, so one program per
chain would leave most SMs idle and serialise K dependent products, while a full
Hillis-Steele scan over K costs K log K products and holds a whole chain in registers
(64 x 64 x 256 fp32 does not fit). Chunks of ~sqrt(K) give ``N * sqrt(K)`` programs, about
2K products of work, depth ~``2 sqrt K + log2 K``, and only one or two ``R x R`` tiles
live per program, so register pressure stays that of a single GEMM tile even at r = 64.

The adjoint ``M_k = P_k g`` never materialises P: ``_adj_totals`` forms the chunk totals
(one product per step, grid ``N x (nc-1)``), then ``_adj_local`` (grid ``N x nc``) pushes
``g`` through the totals of the chunks on its right (mat-vecs, at most nc - 1) and walks its
own chunk by mat-vecs ``v <- J_k^T v``. Two launches, O(K r^3 + K r^2 sqrt K) work. Mat-vecs
are ``tl.dot`` on an ``R x 16`` tile holding the vector in column 0.

Numerics: loads are cast to fp32, products use ``input_precision="ieee"`` (TF32 would miss
the fp32 1e-5 target), intermediates are stored in fp32 and cast once at the end. ``r`` is
padded with masked loads to ``R = max(16, next_pow2(r))`` because ``tl.dot`` needs
power-of-two tiles of at least 16; the zero padding leaves the top-left block exact.

Kernels are kept as plain functions and passed to ``triton.jit`` on first use for each
interpreter mode: ``triton.jit`` picks interpreter or compiler when it decorates, so
decorating at import would freeze whatever ``TRITON_INTERPRET`` was when this module loaded.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from .scan_torch import chunk_size

__all__ = ["interpret_enabled", "suffix_adjoints_triton", "suffix_scan_triton"]


def interpret_enabled() -> bool:
    """Whether Triton would run kernels in its CPU interpreter right now."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _scan_local(J, P, T, K, C, NC, r, R: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rows = tl.arange(0, R)
    cols = tl.arange(0, R)
    mask = (rows[:, None] < r) & (cols[None, :] < r)
    offs = rows[:, None] * r + cols[None, :]
    offs_t = rows[:, None] + cols[None, :] * r
    rr = r * r
    eye = tl.where((rows[:, None] == cols[None, :]) & mask, 1.0, 0.0).to(tl.float32)
    j_base = J + n * K * rr
    p_base = P + n * (K + 1) * rr
    start = c * C
    stop = tl.minimum(start + C, K)
    acc = eye
    for i in range(0, stop - start):
        k = stop - 1 - i
        jt = tl.load(j_base + k * rr + offs_t, mask=mask, other=0.0).to(tl.float32)
        acc = tl.dot(jt, acc, input_precision="ieee")
        tl.store(p_base + k * rr + offs, acc, mask=mask)
    tl.store(T + (n * NC + c) * rr + offs, acc, mask=mask)
    if c == NC - 1:
        tl.store(p_base + K * rr + offs, eye, mask=mask)


def _scan_combine(S_in, S_out, NC, d, r, R: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rows = tl.arange(0, R)
    cols = tl.arange(0, R)
    mask = (rows[:, None] < r) & (cols[None, :] < r)
    offs = rows[:, None] * r + cols[None, :]
    rr = r * r
    base = (n * NC + c) * rr
    a = tl.load(S_in + base + offs, mask=mask, other=0.0)
    if c + d < NC:
        b = tl.load(S_in + base + d * rr + offs, mask=mask, other=0.0)
        a = tl.dot(a, b, input_precision="ieee")
    tl.store(S_out + base + offs, a, mask=mask)


def _scan_fixup(P, S, K, C, NC, r, R: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rows = tl.arange(0, R)
    cols = tl.arange(0, R)
    mask = (rows[:, None] < r) & (cols[None, :] < r)
    offs = rows[:, None] * r + cols[None, :]
    rr = r * r
    carry = tl.load(S + (n * NC + c + 1) * rr + offs, mask=mask, other=0.0)
    p_base = P + n * (K + 1) * rr
    start = c * C
    for i in range(0, C):
        k = start + i
        loc = tl.load(p_base + k * rr + offs, mask=mask, other=0.0)
        tl.store(p_base + k * rr + offs, tl.dot(loc, carry, input_precision="ieee"), mask=mask)


def _adj_totals(J, T, K, C, NC, r, R: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) + 1
    rows = tl.arange(0, R)
    cols = tl.arange(0, R)
    mask = (rows[:, None] < r) & (cols[None, :] < r)
    offs = rows[:, None] * r + cols[None, :]
    offs_t = rows[:, None] + cols[None, :] * r
    rr = r * r
    j_base = J + n * K * rr
    start = c * C
    stop = tl.minimum(start + C, K)
    acc = tl.where((rows[:, None] == cols[None, :]) & mask, 1.0, 0.0).to(tl.float32)
    for i in range(0, stop - start):
        k = stop - 1 - i
        jt = tl.load(j_base + k * rr + offs_t, mask=mask, other=0.0).to(tl.float32)
        acc = tl.dot(jt, acc, input_precision="ieee")
    tl.store(T + (n * NC + c) * rr + offs, acc, mask=mask)


def _adj_local(J, T, G, M, K, C, NC, r, R: tl.constexpr, W: tl.constexpr):
    # The vector lives in column 0 of an (R, W) tile so that mat-vecs are tl.dot calls:
    # tl.sum is a jit helper frozen to one interpreter mode when triton is imported.
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rows = tl.arange(0, R)
    cols = tl.arange(0, R)
    wcols = tl.arange(0, W)
    mask = (rows[:, None] < r) & (cols[None, :] < r)
    vmask = (rows[:, None] < r) & (wcols[None, :] == 0)
    voffs = rows[:, None] + wcols[None, :] * 0
    offs = rows[:, None] * r + cols[None, :]
    offs_t = rows[:, None] + cols[None, :] * r
    rr = r * r
    j_base = J + n * K * rr
    m_base = M + n * (K + 1) * r
    v = tl.load(G + n * r + voffs, mask=vmask, other=0.0).to(tl.float32)
    if c == NC - 1:
        tl.store(m_base + K * r + voffs, v, mask=vmask)
    # Carry: v <- T_cc v for the chunks right of this one, rightmost first.
    for i in range(0, NC - 1 - c):
        t = tl.load(T + (n * NC + NC - 1 - i) * rr + offs, mask=mask, other=0.0)
        v = tl.dot(t, v, input_precision="ieee")
    start = c * C
    stop = tl.minimum(start + C, K)
    for i in range(0, stop - start):
        k = stop - 1 - i
        jt = tl.load(j_base + k * rr + offs_t, mask=mask, other=0.0).to(tl.float32)
        v = tl.dot(jt, v, input_precision="ieee")
        tl.store(m_base + k * r + voffs, v, mask=vmask)


_JITTED: dict[bool, SimpleNamespace] = {}


def _kernels() -> SimpleNamespace:
    """The jitted kernels for the current interpreter mode (decorated once per mode)."""
    mode = interpret_enabled()
    ns = _JITTED.get(mode)
    if ns is None:
        ns = SimpleNamespace(
            scan_local=triton.jit(_scan_local),
            scan_combine=triton.jit(_scan_combine),
            scan_fixup=triton.jit(_scan_fixup),
            adj_totals=triton.jit(_adj_totals),
            adj_local=triton.jit(_adj_local),
        )
        _JITTED[mode] = ns
    return ns


def _tile(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def suffix_scan_triton(J: torch.Tensor) -> torch.Tensor:
    """Suffix scan of a validated fp16/bf16/fp32 ``J`` (N, K, r, r) -> (N, K+1, r, r)."""
    J = J.contiguous()
    N, K, r, _ = J.shape
    C = chunk_size(K)
    NC = triton.cdiv(K, C)
    R = _tile(r)
    P = torch.empty(N, K + 1, r, r, dtype=torch.float32, device=J.device)
    T = torch.empty(N, NC, r, r, dtype=torch.float32, device=J.device)
    ks = _kernels()
    ks.scan_local[(N, NC)](J, P, T, K, C, NC, r, R=R)
    if NC > 1:
        S_in, S_out = T, torch.empty_like(T)
        d = 1
        while d < NC:
            ks.scan_combine[(N, NC)](S_in, S_out, NC, d, r, R=R)
            S_in, S_out = S_out, S_in
            d *= 2
        ks.scan_fixup[(N, NC - 1)](P, S_in, K, C, NC, r, R=R)
    return P if J.dtype == torch.float32 else P.to(J.dtype)


def suffix_adjoints_triton(J: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Fused ``M_k = P_k g`` of validated ``J`` (N, K, r, r), ``g`` (N, r) -> (N, K+1, r)."""
    J = J.contiguous()
    g = g.contiguous()
    N, K, r, _ = J.shape
    C = chunk_size(K)
    NC = triton.cdiv(K, C)
    R = _tile(r)
    M = torch.empty(N, K + 1, r, dtype=torch.float32, device=J.device)
    T = torch.empty(N, NC, r, r, dtype=torch.float32, device=J.device)
    ks = _kernels()
    if NC > 1:
        ks.adj_totals[(N, NC - 1)](J, T, K, C, NC, r, R=R)
    ks.adj_local[(N, NC)](J, T, g, M, K, C, NC, r, R=R, W=16)
    return M if J.dtype == torch.float32 else M.to(J.dtype)
