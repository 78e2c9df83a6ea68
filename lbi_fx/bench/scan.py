"""``lbi-fx bench scan``: time the suffix-scan backends against the sequential loop.

The sequential baseline is measured in the same run and on the same inputs as the other
backends, so the speed-up column is immune to machine-to-machine drift. Medians (not means)
because the first calls after a shape change can hit allocator or JIT stalls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from lbi_fx.bench import standalone
from lbi_fx.kernels import suffix_scan, triton_available

FULL_GRID = {"K": (7, 16, 64, 256), "r": (16, 64), "N": (1, 8, 64)}
QUICK_GRID = {"K": (7, 64), "r": (16,), "N": (1, 8)}
NO_CUDA = "n/a (no CUDA)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``lbi-fx bench scan``."""
    p.add_argument("--json", action="store_true", help="print a JSON list of row dicts")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to time on (default: cuda if available)",
    )
    p.add_argument("--repeat", type=int, default=5, help="timed calls per backend (default 5)")
    p.add_argument("--quick", action="store_true", help="K in {7, 64}, r = 16, N in {1, 8}")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for the run (default: torch's); 1 gives stable timings on a "
        "shared machine, where intra-op threads of tiny GEMMs stall when cores are busy",
    )


def _chain(N: int, K: int, r: int, device: str) -> torch.Tensor:
    """Orthogonal Jacobians: long products stay O(1), so no denormal slow paths on CPU."""
    gen = torch.Generator().manual_seed(N * 100003 + K * 101 + r)
    Q, _ = torch.linalg.qr(torch.randn(N, K, r, r, generator=gen))
    return Q.contiguous().to(device)


def _median_ms(fn: Callable[[], object], repeat: int, device: str) -> float:
    """Median wall time of ``fn`` in ms after two warm-up calls (Triton compiles on the first)."""
    for _ in range(2):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeat):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_grid(device: str, repeat: int, quick: bool) -> list[dict]:
    """Time every grid point; return one dict per (K, r, N)."""
    grid = QUICK_GRID if quick else FULL_GRID
    with_triton = device == "cuda" and triton_available()
    rows = []
    for r in grid["r"]:
        for K in grid["K"]:
            for N in grid["N"]:
                J = _chain(N, K, r, device)
                seq = _median_ms(lambda J=J: suffix_scan(J, "sequential"), repeat, device)
                tch = _median_ms(lambda J=J: suffix_scan(J, "torch"), repeat, device)
                tri = (
                    _median_ms(lambda J=J: suffix_scan(J, "triton"), repeat, device)
                    if with_triton
                    else None
                )
                rows.append(
                    {
                        "K": K,
                        "r": r,
                        "N": N,
                        "dtype": "float32",
                        "device": device,
                        "repeat": repeat,
                        "threads": torch.get_num_threads(),
                        "sequential_ms": seq,
                        "torch_ms": tch,
                        "triton_ms": tri,
                        "torch_speedup": seq / tch,
                        "triton_speedup": seq / tri if tri is not None else None,
                    }
                )
    return rows


def format_table(rows: list[dict]) -> str:
    """Fixed-width table; speed-ups are sequential time / backend time (>1 is faster)."""
    head = f"{'K':>4} {'r':>3} {'N':>3} | {'seq ms':>9} | {'torch ms':>9} {'x seq':>6} | {'triton ms':>13} {'x seq':>6}"
    lines = [head, "-" * len(head)]
    for row in rows:
        if row["triton_ms"] is None:
            tri = f"{NO_CUDA if row['device'] != 'cuda' else 'n/a (no triton)':>13} {'':>6}"
        else:
            tri = f"{row['triton_ms']:>13.3f} {row['triton_speedup']:>5.2f}x"
        lines.append(
            f"{row['K']:>4} {row['r']:>3} {row['N']:>3} | {row['sequential_ms']:>9.3f} | "
            f"{row['torch_ms']:>9.3f} {row['torch_speedup']:>5.2f}x | {tri}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: parse ``argv`` with :func:`add_arguments`, then :func:`run`."""
    return standalone(sys.modules[__name__], "scan", argv)


def run(args: argparse.Namespace) -> int:
    """``lbi-fx bench scan``; returns the process exit status."""
    if args.repeat < 1:
        print("lbi-fx bench scan: --repeat must be >= 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lbi-fx bench scan: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("lbi-fx bench scan: --threads must be >= 1", file=sys.stderr)
        return 2
    saved_threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        rows = measure_grid(args.device, args.repeat, args.quick)
    finally:
        torch.set_num_threads(saved_threads)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        threads = rows[0]["threads"] if rows else saved_threads
        print(
            f"suffix_scan fp32 on {args.device}, median of {args.repeat} calls, "
            f"{threads} torch thread(s); 'x seq' = sequential ms / backend ms"
        )
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
