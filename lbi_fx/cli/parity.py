"""``lbi-fx parity``: gradient-parity table, the paper's Table 5 for every backend that runs here.

For each backend, N random initialisations x M random batches: build the model, rewrite
it with ``lbi_fx.transform`` (K = 2 regions of 2 layers, rank 8), and compare the
parameter gradients of the generated scan backward with plain autograd on the same LBI
module (``lbi_fx.testing.gradient_parity``: same inputs, same RNG seed), under a
cross-entropy LM loss on random targets. Each row reports the worst case over its
N x M trials: largest ||dg||_inf and ||dg||_2 / ||g||_2, lowest cosine, and the worst
single tensor's error (``ParityReport.tensor_rel``: a small tensor badly wrong hides in
the global number), held to the harness's default rtol for the row's dtype
(``lbi_fx.testing.DEFAULT_TOL``: 1e-5 float32, 2e-2 bfloat16; measured worst ~4e-7 and
~1.2e-2 at K = 4).

Rows: float32, and bfloat16 autocast (``torch.autocast`` around forward and loss, the
backward outside it, as PyTorch recommends). Goals: float32 rel-l2 <= 1e-6 with cosine
>= 0.999999 (paper's worst float32 row: 1.41e-7); bfloat16 rel-l2 <= 1.4e-2 (paper's
worst: 1.37e-2). Mamba-3's kernel computes in bfloat16 whatever the parameter dtype, so
its float32-parameter row is held to the bfloat16 goal and labelled so.

Jacobians use ``jacobian="reuse"`` (batched VJPs over the saved forward graph) unless
``--jacobian`` says otherwise. "forward" and "recompute" re-run regions during the
backward; the reruns re-enter the forward's autocast state, so their bfloat16 rows hold
the same goal (tests/test_backends.py::test_replaying_jacobians_under_autocast).

    lbi-fx parity                      # 20 x 5, CPU backends
    lbi-fx parity --inits 2 --batches 1 --backends mamba2,hybrid --json
    lbi-fx parity --factory mymodels:build --factory-kw n_layer=4 --regions layers:2

``--factory`` checks any model a ``pkg.module:function`` returns with its example inputs
(batch 0; later batches are drawn like them), under cross-entropy for LM logits over ids
and a fixed random projection of the outputs otherwise.

Backends: transformer, mamba2 (pure-torch SSD on CPU; mamba-ssm on CUDA), hybrid (3
Mamba-2 + 1 attention), mamba3 (CUDA with mamba-ssm's Mamba-3 only). Exit status 1 when
a goal is missed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import lbi_fx
from lbi_fx.cli.factory import add_factory_kw
from lbi_fx.report import describe_width
from lbi_fx.testing import DEFAULT_TOL, ParityReport, gradient_parity

FP32_GOAL = dict(rel_l2=1e-6, cosine=0.999999)
BF16_GOAL = dict(rel_l2=1.4e-2, cosine=None)
RANK = 8
REGION_LAYERS = 2
BATCH, SEQ, WIDTH, LAYERS = 2, 16, 32, 4
VOCAB = 256


def _transformer(seed: int, device: str) -> nn.Module:
    from lbi_fx.models.transformer import build

    model, _ = build(n_layer=LAYERS, n_embd=WIDTH, n_head=4, block_size=SEQ, seq=SEQ, seed=seed)
    return model.to(device)


def _mamba2(seed: int, device: str) -> nn.Module:
    from lbi_fx.models.mamba2 import build

    # chunk 8 < seq 16: the inter-chunk state passing of the SSD runs too
    return build(n_layer=LAYERS, d_model=WIDTH, d_state=16, headdim=8, chunk_size=8,
                 seq=SEQ, seed=seed, device=device)[0]


def _hybrid(seed: int, device: str) -> nn.Module:
    from lbi_fx.models.hybrid import build

    return build(n_layer=LAYERS, d_model=WIDTH, n_head=4, d_state=16, headdim=8, chunk_size=8,
                 seq=SEQ, seed=seed, device=device)[0]


def _mamba3(seed: int, device: str) -> nn.Module:
    from lbi_fx.models.mamba3 import build

    return build(n_layer=LAYERS, d_model=128, d_state=64, headdim=64, seq=64, seed=seed,
                 device=device)[0]


def _mamba3_available() -> bool:
    from lbi_fx.models.mamba3 import available

    return available()


@dataclass(frozen=True)
class Backend:
    make: Callable[[int, str], nn.Module]
    seq: int = SEQ
    available: Callable[[], bool] = lambda: True
    bf16_kernel: bool = False  # computes in bfloat16 inside, whatever the parameter dtype


BACKENDS: dict[str, Backend] = {
    "transformer": Backend(_transformer),
    "mamba2": Backend(_mamba2),
    "hybrid": Backend(_hybrid),
    "mamba3": Backend(_mamba3, seq=64, available=_mamba3_available, bf16_kernel=True),
}


@dataclass
class Row:
    backend: str
    dtype: str
    trials: int
    max_abs: float
    rel_l2: float
    cosine: float
    goal_rel_l2: float
    goal_cosine: float | None
    ok: bool
    seconds: float
    note: str = ""
    tensor_rel: float = 0.0  # worst per-tensor error (ParityReport.tensor_rel)
    goal_tensor_rel: float = 0.0
    regions: int = 0   # K of the rewritten model
    rank: int = RANK   # interface rank per row
    segments: int = 1  # rows per interface (causal segments): width = rank x segments


class _Autocast(nn.Module):
    """An LBI module whose forward runs under autocast, for ``gradient_parity``.

    ``gradient_parity`` switches ``.backward`` between "autograd" and "scan" and calls
    the module; both go through to the wrapped module, so only the forward (and, via the
    loss, the loss) sees autocast while both backwards run outside it.
    """

    def __init__(self, lbi: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.lbi = lbi
        self.device_type, self.dtype = device_type, dtype

    @property
    def backward(self) -> str:
        return self.lbi.backward

    @backward.setter
    def backward(self, mode: str) -> None:
        self.lbi.backward = mode

    def lbi_verify(self, **kwargs):
        return self.lbi.lbi_verify(**kwargs)

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.lbi(*args)


def lm_loss(targets: torch.Tensor, autocast: tuple[str, torch.dtype] | None = None):
    """Cross-entropy of logits (B, T, V) against ``targets`` (B, T), under autocast if given."""
    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        if autocast is None:
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        with torch.autocast(autocast[0], dtype=autocast[1]):
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return loss_fn


def transform(model: nn.Module, example: torch.Tensor, seed: int, jacobian: str = "reuse",
              per_region: int = REGION_LAYERS):
    """``lbi_fx.transform`` with every(per_region, "layers"), rank 8; interface init seeded."""
    from lbi_fx.models.mamba2 import leaf_modules, rng_devices

    with torch.random.fork_rng(devices=rng_devices(example.device)):
        torch.manual_seed(seed)
        return lbi_fx.transform(model, lbi_fx.every(per_region, "layers"), rank=RANK,
                                example_inputs=(example,), leaf_modules=leaf_modules(model),
                                jacobian=jacobian)


class _Worst:
    def __init__(self) -> None:
        self.trials, self.max_abs, self.rel_l2, self.cosine = 0, 0.0, 0.0, 1.0
        self.tensor_rel = 0.0
        self.complete = True

    def add(self, r: ParityReport) -> None:
        self.trials += 1
        self.complete &= r.complete  # tolerances: the row's goal, checked below
        self.max_abs = _worst(self.max_abs, r.max_abs, max)
        self.rel_l2 = _worst(self.rel_l2, r.rel_l2, max)
        self.tensor_rel = _worst(self.tensor_rel, r.tensor_rel, max)
        self.cosine = _worst(self.cosine, r.cosine, min)


def _worst(old: float, new: float, pick: Callable[[float, float], float]) -> float:
    """``pick(old, new)``, except that NaN, once seen, stays: it must fail the row."""
    return math.nan if math.isnan(old) or math.isnan(new) else pick(old, new)


def _tokens(g: torch.Generator, seq: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, seq), generator=g).to(device)


def measure(name: str, inits: int, batches: int, device: str = "cpu",
            jacobian: str = "reuse", per_region: int = REGION_LAYERS) -> list[Row]:
    """Worst-case parity of one backend: a float32 row and a bfloat16-autocast row."""
    backend = BACKENDS[name]
    dev = torch.device(device)
    bf16 = (dev.type, torch.bfloat16)
    worst = {"float32": _Worst(), "bfloat16": _Worst()}
    t0 = time.perf_counter()
    for i in range(inits):
        model = backend.make(i, device)
        g = torch.Generator().manual_seed(1_000_003 * (i + 1))
        lbi = transform(model, _tokens(g, backend.seq, dev), seed=i, jacobian=jacobian,
                        per_region=per_region)
        for _ in range(batches):
            idx, targets = _tokens(g, backend.seq, dev), _tokens(g, backend.seq, dev)
            worst["float32"].add(gradient_parity(lbi, (idx,), lm_loss(targets)))
            worst["bfloat16"].add(gradient_parity(_Autocast(lbi, *bf16), (idx,),
                                                  lm_loss(targets, bf16)))
    seconds = time.perf_counter() - t0
    rows = []
    for dtype, w in worst.items():
        bf16_row = dtype == "bfloat16" or backend.bf16_kernel
        goal = BF16_GOAL if bf16_row else FP32_GOAL
        tensor_goal = DEFAULT_TOL[torch.bfloat16 if bf16_row else torch.float32][0]
        ok = (w.complete and w.rel_l2 <= goal["rel_l2"] and w.tensor_rel <= tensor_goal
              and (goal["cosine"] is None or w.cosine >= goal["cosine"]))
        note = "bf16 kernel" if backend.bf16_kernel and dtype == "float32" else ""
        rows.append(Row(name, dtype, w.trials, w.max_abs, w.rel_l2, w.cosine, goal["rel_l2"],
                        goal["cosine"], ok, seconds, note, w.tensor_rel, tensor_goal))
    for row in rows:
        row.regions, row.segments = lbi.num_regions, _segments(lbi)
    return rows


def _segments(lbi) -> int:
    segs = getattr(lbi, "segments", None)
    return segs.count if segs is not None else 1


def _resample(x: object, g: torch.Generator) -> object:
    """A fresh batch shaped like example input ``x``: ids drawn from the example's range,
    floats from N(0, 1); anything else (masks, flags, non-tensors) stays as given."""
    if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.numel() == 0:
        return x
    if x.dtype.is_floating_point:
        return torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)
    lo, hi = int(x.min()), int(x.max()) + 1
    return torch.randint(lo, hi, x.shape, generator=g).to(x.device, x.dtype)


def measure_factory(spec: str, factory_kw: dict | None = None, regions: str | None = None,
                    inits: int = 1, batches: int = 1, device: str = "cpu",
                    jacobian: str = "reuse", rank: int = RANK) -> list[Row]:
    """Worst-case parity of any ``pkg.module:factory`` model (a row in its parameters'
    dtype and a bfloat16-autocast row): init i calls the factory with ``seed=i`` when it
    takes a seed (else under ``torch.manual_seed(i)``); batch 0 is the example inputs, the
    others are drawn like them; the loss is cross-entropy on random targets for LM logits
    over ids, else ``lbi_fx.checks.default_loss``."""
    import inspect

    from lbi_fx.cli.factory import load_factory, resolve_factory, training_loss
    from lbi_fx.models.mamba2 import leaf_modules

    kw = dict(factory_kw or {})
    takes_seed = "seed" not in kw and "seed" in inspect.signature(resolve_factory(spec)).parameters
    dev = torch.device(device)
    bf16 = (dev.type, torch.bfloat16)
    worst: dict[str, _Worst] = {}
    t0 = time.perf_counter()
    for i in range(inits):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            model, example = load_factory(spec, {**kw, "seed": i} if takes_seed else kw)
            model = model.to(dev)
            example = tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in example)
            lbi = lbi_fx.transform(model, regions, rank=rank, example_inputs=example,
                                   leaf_modules=leaf_modules(model), jacobian=jacobian)
        dtype = str(next(lbi.parameters()).dtype).removeprefix("torch.")
        g = torch.Generator().manual_seed(1_000_003 * (i + 1))
        for b in range(batches):
            inputs = example if b == 0 else tuple(_resample(x, g) for x in example)
            with torch.no_grad():
                loss = training_loss(lbi(*inputs), inputs, g)
            worst.setdefault(dtype, _Worst()).add(gradient_parity(lbi, inputs, loss))

            def cast_loss(out, loss=loss):
                with torch.autocast(*bf16):
                    return loss(out)
            worst.setdefault("bfloat16", _Worst()).add(
                gradient_parity(_Autocast(lbi, *bf16), inputs, cast_loss))
    seconds = time.perf_counter() - t0
    rows = []
    for dtype, w in worst.items():
        tol = DEFAULT_TOL[getattr(torch, dtype)]
        goal = (BF16_GOAL if dtype == "bfloat16" else FP32_GOAL if dtype == "float32"
                else dict(rel_l2=tol[0], cosine=tol[1]))
        ok = (w.complete and w.rel_l2 <= goal["rel_l2"] and w.tensor_rel <= tol[0]
              and (goal["cosine"] is None or w.cosine >= goal["cosine"]))
        rows.append(Row(spec, dtype, w.trials, w.max_abs, w.rel_l2, w.cosine, goal["rel_l2"],
                        goal["cosine"], ok, seconds, "", w.tensor_rel, tol[0],
                        lbi.num_regions, rank, _segments(lbi)))
    return rows


def _fmt(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def markdown(rows: list[Row]) -> str:
    lines = ["| backend | dtype | trials | max abs dg | rel-l2 dg | worst tensor | min cosine "
             "| goal rel-l2 | ok | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dtype = r.dtype + (f" ({r.note})" if r.note else "")
        cos = f"{r.cosine:.9f}" if math.isfinite(r.cosine) else str(r.cosine)
        lines.append(f"| {r.backend} | {dtype} | {r.trials} | {_fmt(r.max_abs)} | "
                     f"{_fmt(r.rel_l2)} | {_fmt(r.tensor_rel)} | {cos} | {r.goal_rel_l2:.1e} | "
                     f"{'yes' if r.ok else 'NO'} | {r.seconds:.1f} |")
    return "\n".join(lines)


def default_backends(device: str) -> list[str]:
    return [n for n, b in BACKENDS.items()
            if n != "mamba3" or (torch.device(device).type == "cuda" and b.available())]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of ``lbi-fx parity``."""
    ap.add_argument("--inits", type=int, default=20, help="random initialisations (default 20)")
    ap.add_argument("--batches", type=int, default=5, help="batches per initialisation (5)")
    ap.add_argument("--backends", default=None,
                    help=f"comma-separated subset of {','.join(BACKENDS)} (default: all that run here)")
    ap.add_argument("--factory", metavar="PKG.MODULE:FUNCTION",
                    help="check this model instead of the backends: any factory returning "
                         "(model, example_inputs); sized by --factory-kw, cut by --regions")
    add_factory_kw(ap)
    ap.add_argument("--regions", default=None,
                    help="with --factory: region spec (default 'layers:PER_REGION')")
    ap.add_argument("--rank", type=int, default=RANK,
                    help=f"with --factory: interface rank per row (default {RANK})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda if available")
    ap.add_argument("--jacobian", default="reuse",
                    help="lbi_fx.transform jacobian= strategy (default reuse)")
    ap.add_argument("--per-region", type=int, default=REGION_LAYERS,
                    help=f"layers per region: K = {LAYERS} / this (default {REGION_LAYERS}, "
                         f"K = {LAYERS // REGION_LAYERS}; 1 gives K = {LAYERS}, three Jacobians "
                         "multiplied in the scan)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: these models are tiny, and "
                         "more threads only add synchronisation)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")


def build_parser(prog: str = "lbi-fx parity") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].replace("``", ""))
    add_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: parse ``argv``, then :func:`run`."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """``lbi-fx parity``: exit 0 when every row meets its goal, 1 when one misses, 2 on bad input."""
    if args.factory:
        return _run_factory(args)
    names = args.backends.split(",") if args.backends else default_backends(args.device)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or args.inits < 1 or args.batches < 1 or not 1 <= args.per_region <= LAYERS:
        print(f"lbi-fx parity: unknown backends {unknown} (choose from {', '.join(BACKENDS)})"
              if unknown else "lbi-fx parity: --inits and --batches must be >= 1, --per-region "
              f"in 1..{LAYERS}", file=sys.stderr)
        return 2
    missing = [n for n in names if not BACKENDS[n].available()]
    if missing:
        print(f"lbi-fx parity: {', '.join(missing)} needs CUDA and mamba-ssm's Mamba-3",
              file=sys.stderr)
        return 2
    rows = _with_threads(args.threads, lambda: [
        row for name in names for row in measure(name, args.inits, args.batches, args.device,
                                                 args.jacobian, args.per_region)])
    return _emit(rows, args, lambda: (
        f"{args.inits} inits x {args.batches} batches, K={-(-LAYERS // args.per_region)} "
        f"regions of {args.per_region} layers, interfaces of "
        f"{describe_width(RANK, rows[0].segments if rows else 1)}, batch {BATCH}"))


def _with_threads(n: int, run):
    """``run()`` with ``n`` intra-op threads (at least one), then the caller's again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def _emit(rows: list, args: argparse.Namespace, what) -> int:
    """Print the rows (JSON, or a header line naming ``what()`` and the table); exit code
    1 when any row missed its tolerance."""
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(f"gradient parity, scan backward vs autograd on the same LBI model: {what()}, "
              f"device {args.device}, jacobian={args.jacobian}, {max(1, args.threads)} thread(s)")
        print(markdown(rows))
    return 0 if all(r.ok for r in rows) else 1


def _run_factory(args: argparse.Namespace) -> int:
    """``lbi-fx parity --factory pkg.module:function``: the same table for any model."""
    from lbi_fx.cli.factory import parse_factory_kw

    if args.inits < 1 or args.batches < 1 or args.rank < 1:
        print("lbi-fx parity: --inits, --batches and --rank must be >= 1", file=sys.stderr)
        return 2
    spec = args.regions or f"layers:{args.per_region}"
    rows = _with_threads(args.threads, lambda: measure_factory(
        args.factory, parse_factory_kw(args.factory_kw), spec, args.inits, args.batches,
        args.device, args.jacobian, args.rank))
    return _emit(rows, args, lambda: (
        f"{args.factory}, {args.inits} inits x {args.batches} batches, K={rows[0].regions} "
        f"regions ({spec}), interfaces of {describe_width(args.rank, rows[0].segments)}"))


if __name__ == "__main__":
    sys.exit(main())
