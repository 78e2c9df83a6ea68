"""``lbi-fx bench pgf``: memory and time of the tiled exact SSM backward against three
baselines, all measured in the same run.

For each sequence length L, one forward + backward of the selective scan
(``lbi_fx.pgf.selective_scan``, every input differentiated) by four methods:

* ``loop``: autograd through the per-step reference loop (the paper's baseline);
  ``--indexed-loop`` adds ``loop-indexed``, the same loop slicing each step out of the
  precomputed tensors as mamba-ssm's reference does (its backward is quadratic in L);
* ``vectorised``: autograd through the same tile-vectorised forward as ``pgf`` (its
  log-depth in-tile scan, tile after tile), every tile's graph kept;
* ``checkpoint``: the same tiles under ``torch.utils.checkpoint`` (non-reentrant): each
  tile's graph is rebuilt in backward and differentiated by autograd;
* ``pgf``: the custom op: inputs and one state per tile saved, tiles recomputed in
  reverse with the analytic adjoint recurrence.

Reported per method: peak memory of the step above what was live before (CUDA allocator;
on CPU the peak of live tensor storages, tracked op by op by ``lbi-fx bench step``'s
dispatch mode), median wall time, bytes autograd saves for backward (distinct storages
seen by ``saved_tensors_hooks``, inputs included) and the largest gradient difference
from ``loop``. A second table does the same for a Mamba-2 LM with and without
``tile_ssm``. A baseline whose projected saved bytes exceed ``--max-gib`` is skipped and
says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lbi_fx import pgf
from lbi_fx.bench import standalone
from lbi_fx.bench.step import _peak_memory, _sync
from lbi_fx.cli.common import int_list

METHODS = ("loop", "vectorised", "checkpoint", "pgf")
_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of ``lbi-fx bench pgf``."""
    ap.add_argument("--lengths", default="1024,4096,16384,65536",
                    help="sequence lengths, comma-separated (default 1k,4k,16k,64k)")
    ap.add_argument("--quick", action="store_true",
                    help="L in {1k, 4k}, Mamba-2 at 1k, one timed repeat")
    ap.add_argument("--tile", type=int, default=256, help="time steps per tile (default 256)")
    ap.add_argument("--batch", type=int, default=1, help="default 1")
    ap.add_argument("--dim", type=int, default=64, help="channels d (default 64)")
    ap.add_argument("--d-state", type=int, default=16, help="state size n (default 16)")
    ap.add_argument("--dtype", default="fp32", choices=list(_DTYPES),
                    help="dtype of the inputs (default fp32)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats, median (default 3)")
    ap.add_argument("--max-gib", type=float, default=4.0,
                    help="skip a baseline whose projected saved bytes exceed this (default 4)")
    ap.add_argument("--mamba2-lengths", default="1024,4096,16384",
                    help="lengths for the Mamba-2 LM table (default 1k,4k,16k)")
    ap.add_argument("--no-mamba2", action="store_true", help="skip the Mamba-2 LM table")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="which of loop,vectorised,checkpoint,pgf to run (default all)")
    ap.add_argument("--indexed-loop", action="store_true",
                    help="also time the loop that indexes each step (quadratic backward), "
                         "at L <= 4096 only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda if available")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine, two "
                         "threads make the vectorised methods wait on each other)")
    ap.add_argument("--json", action="store_true", help="print the measurements as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of peak memory against L "
                                                   "(needs matplotlib: pip install 'lbi-fx[plot]')")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: parse ``argv`` with :func:`add_arguments`, then :func:`run`."""
    return standalone(sys.modules[__name__], "pgf", argv)


# --------------------------------------------------------------------------------------
# measuring


def saved_bytes(fn: Callable[[], object], inputs: tuple = ()) -> tuple[int, int, object]:
    """(bytes, of which inputs' bytes, result) autograd saves for backward while ``fn`` runs.

    Distinct storages are counted once, at their full size (a saved view keeps its whole
    storage alive); a storage is an input's when it is one of ``inputs``' storages. The
    result is returned so the graph, and the storages, stay alive while counting.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    ours = {x.untyped_storage().data_ptr() for x in inputs if x is not None}
    return sum(seen.values()), sum(v for k, v in seen.items() if k in ours), out


def _scan_inputs(batch: int, dim: int, n: int, length: int, dtype, device, seed: int = 0):
    """Leaf tensors (u, delta, A, B, C, D, z, delta_bias) with mamba-like scales."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, dtype=dtype) * scale + shift
        return t.to(device).requires_grad_()

    A = (-torch.rand(dim, n, generator=g, dtype=dtype) * 4 - 0.5).to(device).requires_grad_()
    return (r(batch, dim, length), r(batch, dim, length, scale=0.5, shift=-2.0), A,
            r(batch, n, length), r(batch, n, length), r(dim), r(batch, dim, length), r(dim))


def _loop(ins, tile):
    u, delta, A, B, C, D, z, bias = ins
    return pgf.selective_scan_ref(u, delta, A, B, C, D, z, bias, True)


def _loop_indexed(ins, tile):
    """The per-step loop slicing ``decay[:, :, t]`` each step, as mamba-ssm's reference does:
    every slice's backward writes a zero-filled gradient of the whole (b, d, L, n) tensor,
    so the backward is quadratic in L (``--indexed-loop`` measures it)."""
    u, delta, A, B, C, D, z, bias = ins
    dt = F.softplus(delta + bias.unsqueeze(-1))
    decay = torch.exp(dt.unsqueeze(-1) * A.unsqueeze(1))
    inp = (dt * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    h = u.new_zeros(u.size(0), u.size(1), A.size(1))
    ys = []
    for t in range(u.size(-1)):
        h = decay[:, :, t] * h + inp[:, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + u * D.unsqueeze(-1)) * F.silu(z)


def _tiles_autograd(ins, tile, use_checkpoint: bool):
    u, delta, A, B, C, D, z, bias = ins
    outs, h = [], None
    for s in range(0, u.size(-1), tile):
        sl = (..., slice(s, s + tile))
        args = (u[sl], delta[sl], A, B[sl], C[sl], D, z[sl], bias, True, h)
        if use_checkpoint:
            out, h = checkpoint(pgf.tile_forward, *args, use_reentrant=False)
        else:
            out, h = pgf.tile_forward(*args)
        outs.append(out)
    return torch.cat(outs, -1)


def _pgf(ins, tile):
    u, delta, A, B, C, D, z, bias = ins
    return pgf.selective_scan(u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=True,
                              tile=tile)


FORWARDS = {
    "loop": _loop,
    "loop-indexed": _loop_indexed,
    "vectorised": lambda ins, tile: _tiles_autograd(ins, tile, False),
    "checkpoint": lambda ins, tile: _tiles_autograd(ins, tile, True),
    "pgf": _pgf,
}


def _measure_step(step: Callable[[], None], device, repeat: int) -> tuple[int, float]:
    """(peak bytes, median seconds) of ``step``; the memory run doubles as the warm-up."""
    peak = _peak_memory(step, device)
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return peak, statistics.median(times)


def _max_rel_diff(grads, ref) -> float:
    """Largest |g - g_ref| / max|g_ref| over the inputs."""
    return max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
               for g, r in zip(grads, ref))


def _scan_row(method: str, ins: tuple, gy: torch.Tensor, args) -> tuple[dict, list]:
    """Saved bytes, peak memory, median time and the input gradients of one method."""
    fwd = FORWARDS[method]

    def step():
        for x in ins:
            x.grad = None
        fwd(ins, args.tile).backward(gy)

    total, of_inputs, out = saved_bytes(lambda: fwd(ins, args.tile), ins)
    del out
    peak, seconds = _measure_step(step, torch.device(args.device), args.repeat)
    row = {"peak_bytes": peak, "seconds": seconds, "saved_bytes": total,
           "saved_input_bytes": of_inputs}
    return row, [x.grad.detach().clone() for x in ins]


def _methods(args) -> tuple[str, ...]:
    chosen = tuple(m for m in args.methods.split(",") if m)
    unknown = set(chosen) - set(METHODS)
    if unknown:
        raise SystemExit(f"lbi-fx bench pgf: unknown method(s) {sorted(unknown)}; choose from "
                         f"{', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in chosen)


def bench_scan(args, lengths: list[int], progress) -> list[dict]:
    """One row per (L, method) of the selective-scan table."""
    device, dtype = torch.device(args.device), _DTYPES[args.dtype]
    rows: list[dict] = []
    per_step: dict[str, float] = {}  # saved bytes per time step, from the first length
    for length in lengths:
        ins = _scan_inputs(args.batch, args.dim, args.d_state, length, dtype, device)
        gy = torch.randn(args.batch, args.dim, length, dtype=dtype,
                         generator=torch.Generator().manual_seed(1)).to(device)
        ref_grads = None
        extra = ("loop-indexed",) if args.indexed_loop and length <= 4096 else ()
        for method in _methods(args)[:1] + extra + _methods(args)[1:]:
            progress.set_postfix_str(f"L={length} {method}")
            row = {"L": length, "method": method, "input_bytes": sum(x.nbytes for x in ins)}
            projected = per_step.get(method, 0.0) * length
            if projected > args.max_gib * 2**30:
                row["skipped"] = (f"projected {projected / 2**30:.1f} GiB saved for backward "
                                  f"> --max-gib {args.max_gib:g}")
            else:
                measured, grads = _scan_row(method, ins, gy, args)
                per_step.setdefault(method, measured["saved_bytes"] / length)
                if ref_grads is None:  # the first method run (loop, by default)
                    ref_grads = grads
                row.update(measured, max_rel_grad_diff_vs_loop=_max_rel_diff(grads, ref_grads))
            rows.append(row)
            progress.update(1)
        _add_ratios(rows, length)
    return rows


def _add_ratios(rows: list[dict], length: int) -> None:
    """pgf's figures against each baseline of the same length."""
    mine = next((r for r in rows if r["L"] == length and r["method"] == "pgf"), None)
    if mine is None or "skipped" in mine:
        return
    for r in rows:
        if r["L"] == length and "skipped" not in r:
            r["peak_vs_pgf"] = r["peak_bytes"] / mine["peak_bytes"]
            r["time_vs_pgf"] = r["seconds"] / mine["seconds"]
            r["saved_vs_pgf"] = r["saved_bytes"] / mine["saved_bytes"]


def _lm_row(model, idx, args) -> tuple[dict, list]:
    """Peak memory, median time and parameter gradients of one LM training step."""
    targets = torch.roll(idx, -1, 1)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()).backward()

    peak, seconds = _measure_step(step, torch.device(args.device), args.repeat)
    return ({"peak_bytes": peak, "seconds": seconds},
            [p.grad.detach().clone() for p in model.parameters()])


def bench_mamba2(args, lengths: list[int], progress) -> list[dict]:
    """Mamba-2 LM (2 layers, width 64), loss.backward() with and without ``tile_ssm``."""
    from lbi_fx.models import mamba2

    rows: list[dict] = []
    for length in lengths:
        model, (idx,) = mamba2.build(n_layer=2, d_model=64, batch=args.batch, seq=length,
                                     device=args.device, backend="torch")
        model = model.to(_DTYPES[args.dtype])
        progress.set_postfix_str(f"Mamba-2 L={length} autograd")
        base, ref_grads = _lm_row(model, idx, args)
        progress.update(1)
        progress.set_postfix_str(f"Mamba-2 L={length} tile_ssm")
        mine, grads = _lm_row(pgf.tile_ssm(model, tile=args.tile), idx, args)
        progress.update(1)
        base.update(L=length, method="autograd", max_rel_grad_diff=0.0)
        mine.update(L=length, method="tile_ssm",
                    max_rel_grad_diff=_max_rel_diff(grads, ref_grads),
                    peak_vs_autograd=mine["peak_bytes"] / base["peak_bytes"],
                    time_vs_autograd=mine["seconds"] / base["seconds"])
        rows += [base, mine]
    return rows


# --------------------------------------------------------------------------------------
# reporting


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def format_report(result: dict) -> str:
    cfg = result["config"]
    lines = [f"selective scan, b={cfg['batch']} d={cfg['dim']} n={cfg['d_state']} "
             f"{cfg['dtype']}, tile {cfg['tile']}, {cfg['device']}, {cfg['threads']} threads",
             f"{'L':>6} {'method':>12} {'peak MiB':>9} {'x pgf':>6} {'time s':>8} {'x pgf':>6} "
             f"{'saved MiB':>9} {'x pgf':>6} {'max rel dg':>10}"]
    for r in result["scan"]:
        if "skipped" in r:
            lines.append(f"{r['L']:>6} {r['method']:>12}  skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['L']:>6} {r['method']:>12} {_mib(r['peak_bytes']):>9} "
            f"{r.get('peak_vs_pgf', float('nan')):>6.2f} {r['seconds']:>8.3f} "
            f"{r.get('time_vs_pgf', float('nan')):>6.2f} {_mib(r['saved_bytes']):>9} "
            f"{r.get('saved_vs_pgf', float('nan')):>6.2f} {r['max_rel_grad_diff_vs_loop']:>10.1e}")
    if result.get("mamba2"):
        lines.append("Mamba-2 LM (2 layers, width 64), loss.backward()")
        lines.append(f"{'L':>6} {'method':>12} {'peak MiB':>9} {'time s':>8} {'max rel dg':>10}")
        for r in result["mamba2"]:
            lines.append(f"{r['L']:>6} {r['method']:>12} {_mib(r['peak_bytes']):>9} "
                         f"{r['seconds']:>8.3f} {r['max_rel_grad_diff']:>10.1e}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Peak memory against L, log-log: the scan table and, when run, the Mamba-2 table."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("lbi-fx bench pgf --plot needs matplotlib: pip install 'lbi-fx[plot]'"
                         ) from None
    panels = [("scan", "method", "selective scan, fwd + bwd")]
    if result.get("mamba2"):
        panels.append(("mamba2", "method", "Mamba-2 LM (2 layers), fwd + bwd"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (key, by, title) in zip(axes[0], panels):
        rows = [r for r in result[key] if "skipped" not in r]
        for name in dict.fromkeys(r[by] for r in rows):
            pts = [(r["L"], r["peak_bytes"] / 2**20) for r in rows if r[by] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        if key == "scan":  # what the input gradients alone take, for scale
            sizes = sorted({(r["L"], r["input_bytes"] / 2**20) for r in result[key]})
            ax.plot(*zip(*sizes), "k--", lw=1, label="size of the inputs")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("peak memory above inputs (MiB)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    cfg = result["config"]
    fig.suptitle(f"lbi-fx bench pgf: d={cfg['dim']} n={cfg['d_state']} {cfg['dtype']} "
                 f"tile {cfg['tile']} ({cfg['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    """``lbi-fx bench pgf``; returns the process exit status."""
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = int_list(args.lengths, "--lengths")
    m2_lengths = int_list(args.mamba2_lengths, "--mamba2-lengths")
    if args.quick:
        lengths = [x for x in lengths if x <= 4096] or lengths[:1]
        m2_lengths = m2_lengths[:1]
        args.repeat = 1
    if args.no_mamba2:
        m2_lengths = []
    torch.manual_seed(0)
    total = (len(lengths) * len(_methods(args)) + 2 * len(m2_lengths)
             + (sum(x <= 4096 for x in lengths) if args.indexed_loop else 0))
    result = {"config": {"batch": args.batch, "dim": args.dim, "d_state": args.d_state,
                         "dtype": args.dtype, "tile": args.tile, "device": args.device,
                         "threads": torch.get_num_threads(), "repeat": args.repeat,
                         "date": datetime.date.today().isoformat(),
                         "torch": torch.__version__}}
    with tqdm(total=total, desc="bench pgf", file=sys.stderr) as progress:
        result["scan"] = bench_scan(args, lengths, progress)
        result["mamba2"] = bench_mamba2(args, m2_lengths, progress) if m2_lengths else []
    print(json.dumps(result) if args.json else format_report(result))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
