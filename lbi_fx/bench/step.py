"""``lbi-fx bench step``: where the time and memory of one LBI training step go.

Every figure is measured in one run against plain autograd on the *same* module
(``lbi.backward = "autograd"``), so ratios do not depend on the machine:

* forward time, and per phase of the LBI backward: Jacobians (per region), seed VJP,
  scan, local VJPs (per region);
* eta = T_J / (r x T_forward_of_region), the Jacobian's efficiency against r forwards;
* step ratio = LBI step / autograd step, and the work bound (r + 3) / 3 at eta = 1;
* the scan's share of the LBI backward;
* peak memory of both steps (CUDA allocator on GPU; on CPU the peak of live tensor
  storages, tracked op by op with a dispatch mode);
* the span of a region-parallel execution from the measured phase times,
  max_k T_J,k + T_scan + max_k T_local,k, against the sequential autograd backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lbi_fx
from lbi_fx.bench import standalone
from lbi_fx.cli.factory import add_factory_kw
from lbi_fx.interfaces import NORMS, SUMMARIES
from lbi_fx.kernels import suffix_scan
from lbi_fx.report import describe_width
from lbi_fx.runtime import STRATEGIES

MODELS = ("transformer", "mamba2", "hybrid")


def _model_spec(text: str) -> str:
    """``--model``: a shipped model's name, or any ``pkg.module:factory``."""
    if text in MODELS or ":" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r}: choose one of {', '.join(MODELS)} or give a pkg.module:factory")


def _build(name: str, layers: int, width: int, batch: int, seq: int):
    import importlib

    mod = importlib.import_module(f"lbi_fx.models.{name}")
    import inspect

    params = inspect.signature(mod.build).parameters
    kw = {"n_layer": layers, "batch": batch, "seq": seq}
    kw["n_embd" if "n_embd" in params else "d_model"] = width
    if "block_size" in params:
        kw["block_size"] = max(seq, 64)
    model, example = mod.build(**kw)
    kwargs = {"leaf_modules": mod.leaf_modules(model)} if hasattr(mod, "leaf_modules") else {}
    return model, example, kwargs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _LiveBytes(TorchDispatchMode):
    """Live and peak bytes of CPU tensor storages created while active.

    CPU tensors have no allocator statistics, and the profiler attributes frees to the
    enclosing op, so a running sum of its events is not a timeline. This mode sees every
    op's outputs (the autograd engine runs CPU backward ops in the calling thread) and
    learns of each storage's release through a weakref finalizer.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.cur = self.peak = 0

    def _free(self, key: int) -> None:
        self.cur -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's storage (a view, an in-place or out= result) is not
        # an allocation: without this, slicing a tensor made before the mode counted it
        inputs = {id(a.untyped_storage()) for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type == "cpu"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                if id(st) not in self.live and id(st) not in inputs and st.nbytes() > 0:
                    self.live[id(st)] = st.nbytes()
                    self.cur += st.nbytes()
                    self.peak = max(self.peak, self.cur)
                    weakref.finalize(st, self._free, id(st))
        return out


def _peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``step``, above what was live before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _LiveBytes() as tracker:
        step()
    return tracker.peak


def measure(lbi, inputs: tuple, targets: torch.Tensor | None = None, *, steps: int = 5,
            warmup: int = 2, loss: Callable | None = None) -> dict:
    """Time ``steps`` training steps of each backward mode on the same module, under
    cross-entropy against ``targets`` or, for any other model, ``loss(output)``."""
    device = next(lbi.parameters()).device

    def loss_of(out):
        if loss is not None:
            return loss(out)
        return F.cross_entropy(out.flatten(0, 1).float(), targets.flatten())

    def step():
        loss = loss_of(lbi(*inputs))
        loss.backward()

    def timed(mode: str) -> tuple[list[float], list[float], dict]:
        lbi.backward = mode
        for _ in range(warmup):
            lbi.zero_grad(set_to_none=True)
            step()
        fwd, bwd, phases = [], [], {}
        for _ in range(steps):
            lbi.zero_grad(set_to_none=True)
            with lbi.profile() as t:
                _sync(device)
                t0 = time.perf_counter()
                loss = loss_of(lbi(*inputs))
                _sync(device)
                t1 = time.perf_counter()
                loss.backward()
                _sync(device)
                t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            for key, vals in t.items():
                phases.setdefault(key, []).append(sum(vals))
        return fwd, bwd, {k: statistics.median(v) for k, v in phases.items()}

    a_fwd, a_bwd, _ = timed("autograd")
    s_fwd, s_bwd, ph = timed("scan")
    K, r = lbi.num_regions, max(lbi.ranks)
    B = next(x for x in tree_leaves(inputs) if isinstance(x, torch.Tensor)).shape[0]
    rows = lbi.segments.count if getattr(lbi, "segments", None) is not None else 1
    J = torch.randn(B, K - 1, r, r, device=device, dtype=next(lbi.parameters()).dtype) / r**0.5
    for _ in range(3):
        suffix_scan(J, lbi.scan_backend)
    scan_times = []
    for _ in range(20):
        _sync(device)
        t0 = time.perf_counter()
        suffix_scan(J, lbi.scan_backend)
        _sync(device)
        scan_times.append(time.perf_counter() - t0)
    t_scan = statistics.median(scan_times)
    med = statistics.median
    t_jac = [ph[f"jacobian_{k}"] for k in range(K - 1)]
    t_fwd_region = [ph[f"forward_{k}"] for k in range(K - 1)]
    t_local = [ph[f"local_{k}"] for k in range(K - 1)] + [ph["seed"]]
    eta_k = [tj / (lbi.ranks[k] * tf) for k, (tj, tf) in enumerate(zip(t_jac, t_fwd_region))]
    auto_step, lbi_step = med(a_fwd) + med(a_bwd), med(s_fwd) + med(s_bwd)
    lbi.backward = "scan"
    peak_lbi = _peak_memory(step, device)
    lbi.backward = "autograd"
    peak_auto = _peak_memory(step, device)
    lbi.backward = "scan"
    strategy = lbi.jacobian
    if strategy == "auto":
        picked = sorted({v if v != "reuse" else
                         ("reuse" if lbi.region_choices.batched.get(k, True) else "reuse-rows")
                         for k, v in lbi.region_choices.jacobian.items()})
        strategy = "auto(" + ",".join(picked) + ")" if picked else "auto"
    span = max(t_jac) + t_scan + max(t_local)
    return {
        "strategy": strategy,
        "regions": K,
        "rank": r,  # scalars per sample crossing a boundary: the side w of J_k
        "rank_per_segment": r // rows,
        "segments": rows,
        "width": describe_width(r // rows, rows),
        "batch": B,
        "autograd_forward_s": med(a_fwd),
        "autograd_backward_s": med(a_bwd),
        "lbi_forward_s": med(s_fwd),
        "lbi_backward_s": med(s_bwd),
        "forward_region_s": t_fwd_region,
        "jacobian_s": t_jac,
        "seed_s": ph["seed"],
        "scan_s": t_scan,
        "local_s": t_local[:-1],
        "eta": sum(t_jac) / sum(lbi.ranks[k] * t for k, t in enumerate(t_fwd_region)),
        "eta_per_region": eta_k,
        "step_ratio": lbi_step / auto_step,
        "work_bound": (r + 3) / 3,
        "scan_share": t_scan / med(s_bwd),
        "peak_memory_autograd": peak_auto,
        "peak_memory_lbi": peak_lbi,
        "peak_memory_ratio": peak_lbi / peak_auto if peak_auto else float("nan"),
        "span_parallel_s": span,
        "span_ratio": span / med(a_bwd),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def format_report(m: dict) -> str:
    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    lines = [
        f"lbi-fx bench step: {m.get('model', 'model')}, {m['regions']} regions, interfaces of "
        f"{m['width']} (w = {m['rank']}), batch {m['batch']}, jacobian={m['strategy']}, "
        f"{m['device']}, {m['threads']} thread(s)",
        f"  forward        autograd {ms(m['autograd_forward_s'])}   lbi {ms(m['lbi_forward_s'])}",
        f"  backward       autograd {ms(m['autograd_backward_s'])}   lbi {ms(m['lbi_backward_s'])}",
        "  lbi backward phases:",
        "    phase 1 J_k   " + ", ".join(ms(t) for t in m["jacobian_s"]),
        f"    phase 2 seed  {ms(m['seed_s'])}   scan {ms(m['scan_s'])}",
        "    phase 3 local " + ", ".join(ms(t) for t in m["local_s"]),
        "  eta = T_J / (w T_fwd_region): " + f"{m['eta']:.2f}  (per region: "
        + ", ".join(f"{e:.2f}" for e in m["eta_per_region"]) + ")",
        f"  step ratio lbi / autograd: {m['step_ratio']:.2f}x   (work bound (w+3)/3 = "
        f"{m['work_bound']:.2f}x)",
        f"  scan share of the lbi backward: {100 * m['scan_share']:.2f}%",
        f"  peak memory: autograd {m['peak_memory_autograd'] / 2**20:.2f} MiB, lbi "
        f"{m['peak_memory_lbi'] / 2**20:.2f} MiB, ratio {m['peak_memory_ratio']:.2f}",
        f"  region-parallel span max J + scan + max local: {ms(m['span_parallel_s'])} vs "
        f"sequential backward {ms(m['autograd_backward_s'])} ({m['span_ratio']:.2f}x)",
    ]
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of ``lbi-fx bench step``."""
    ap.add_argument("--model", default="transformer", type=_model_spec,
                    metavar="{" + ",".join(MODELS) + "} or pkg.module:factory",
                    help="an example model from lbi_fx.models, sized by --layers, --width, "
                         "--batch, --seq (default transformer), or any factory returning "
                         "(model, example_inputs), sized by --factory-kw")
    add_factory_kw(ap)
    ap.add_argument("--regions", default=None,
                    help="region spec, e.g. 'layers:2' or 'a,b;c,d' (default: groups of "
                         "--region-size children of 'layers')")
    ap.add_argument("--rank", type=int, default=16, help="interface rank r per row (default 16)")
    ap.add_argument("--pool", default="auto", choices=["auto", "causal", "mean", "last"],
                    help="interface pool (default auto: causal for these causal LMs, S = 4 "
                         "segments of RANK scalars, so w = 4 RANK and J is w x w; mean: the "
                         "paper's one row, w = RANK)")
    ap.add_argument("--segment-len", type=int, default=None,
                    help="positions per causal segment (default seq / 4)")
    ap.add_argument("--summary", default="prefix", choices=list(SUMMARIES),
                    help="what a causal row reads (default prefix; inclusive: up to and "
                         "including its segment's first position)")
    ap.add_argument("--interface-norm", default="layer", choices=list(NORMS),
                    help="per-row norm of m_k (default layer; rank 1 needs none)")
    ap.add_argument("--jacobian", default="auto", choices=list(STRATEGIES),
                    help="how region Jacobians are computed (default auto)")
    ap.add_argument("--chunk", type=int, default=None, help="rows per rerun for recompute")
    ap.add_argument("--layers", type=int, default=6, help="blocks in the model (default 6)")
    ap.add_argument("--region-size", type=int, default=2, help="blocks per region (default 2)")
    ap.add_argument("--width", type=int, default=64, help="model width (default 64)")
    ap.add_argument("--batch", type=int, default=8, help="default 8")
    ap.add_argument("--seq", type=int, default=64, help="sequence length (default 64)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda if available")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print the measurements as JSON")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: parse ``argv`` with :func:`add_arguments`, then :func:`run`."""
    return standalone(sys.modules[__name__], "step", argv)


def run(args: argparse.Namespace) -> int:
    """``lbi-fx bench step``; returns the process exit status."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if ":" in args.model:  # any factory: its own sizes (--factory-kw), its own inputs
        from lbi_fx.cli.factory import load_factory, parse_factory_kw
        from lbi_fx.models.mamba2 import leaf_modules

        model, inputs = load_factory(args.model, parse_factory_kw(args.factory_kw))
        extra = {"leaf_modules": leaf_modules(model)}
    else:
        model, inputs, extra = _build(args.model, args.layers, args.width, args.batch, args.seq)
    model = model.to(device)
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    regions = args.regions or lbi_fx.every(args.region_size, "layers")
    lbi = lbi_fx.transform(model, regions, rank=args.rank,
                           example_inputs=inputs, jacobian=args.jacobian, chunk=args.chunk,
                           pool=args.pool, segment_len=args.segment_len,
                           summary=args.summary, interface_norm=args.interface_norm, **extra)
    from lbi_fx.cli.factory import training_loss

    with torch.no_grad():
        out = lbi(*inputs)
    loss = training_loss(out, inputs, torch.Generator().manual_seed(0))
    result = measure(lbi, inputs, steps=args.steps, loss=loss)
    result["model"] = args.model
    result["pool"] = lbi.pool
    print(json.dumps(result) if args.json else format_report(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
