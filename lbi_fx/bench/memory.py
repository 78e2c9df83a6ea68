"""``lbi-fx bench memory``: what one rank must hold to train a GPT, one process against K
region ranks (``RegionParallel``) against K pipeline stages (``PipelineRunner``).

Every configuration runs in fresh processes (gloo on 127.0.0.1). Each process builds the
model under ``torch.device("meta")``, so nothing is whole before it is split: the single
process materialises all of it, a region rank or stage only its own share (``to_empty`` +
``init_weights``). Then AdamW over what the process trains and ``--steps`` training steps.
Reported per rank: the peak resident memory (``VmHWM``, reset after the imports and a
warm-up on a tiny model, so code does not count; ``max_memory_allocated`` on CUDA) grown
through build, split, initialisation and the steps, beside the bytes the parameter counts
predict (parameters + gradients + AdamW's two moments = 4 x the parameter bytes held),
and as a ratio to the single process.

``--rate 10mbit`` shapes the loopback (``lbi_fx.bench.link``) while the runs train, so the
step times are those of the slow link region parallelism is for. ``--budget GIB`` caps every process's address-space growth (``resource.setrlimit``
``RLIMIT_AS`` = its size after warm-up + the budget): a configuration whose training does
not fit fails with PyTorch's out-of-memory error, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from lbi_fx.bench import standalone
from lbi_fx.errors import InputError


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()
            if line.startswith(("VmRSS", "VmHWM", "VmSize"))}


def _gpt(cfg: dict, meta: bool):
    from lbi_fx.models.transformer import GPT, GPTConfig

    gcfg = GPTConfig(n_layer=cfg["layers"], n_embd=cfg["width"], n_head=cfg["heads"],
                     block_size=cfg["seq"], tie_weights=False)
    if meta:
        with torch.device("meta"):
            return GPT(gcfg)
    return GPT(gcfg)


def _regions(layers: int, k: int) -> list[list[int]]:
    from lbi_fx.distributed.mesh import placement

    return placement(layers, k) if k <= layers else []


def _loss(logits, tgt):
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))


def _warm_up(cfg: dict, kind: str) -> None:
    """Load every code path the measured run takes, on a tiny model (code is not memory
    the model needs)."""
    tiny = dict(cfg, width=32, heads=2)
    _run_kind(tiny, kind, measure=False)


def _run_kind(cfg: dict, kind: str, measure: bool) -> dict:
    import warnings

    import lbi_fx
    from lbi_fx.distributed import RegionParallel
    from lbi_fx.distributed.ownership import held_bytes, init_weights, materialize, named_tensors
    from lbi_fx.pipelining import PipelineRunner

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (cfg["batch"], cfg["seq"]), generator=g)
    tgt = torch.randint(0, 256, (cfg["batch"], cfg["seq"]), generator=g)
    model = _gpt(cfg, meta=True)
    k = cfg["k"]
    if kind == "single":
        materialize(model, set(named_tensors(model)), "cpu")
        init_weights(model, 0)
        params, step = list(model.parameters()), None
        held = held_bytes(model)
    elif kind == "lbi":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lbi = lbi_fx.transform(model, [[f"layers.{i}" for i in r] for r in
                                           _regions(cfg["layers"], k)],
                                   rank=cfg["rank"], pool="mean", jacobian="reuse",
                                   canvas_weights="per_region", example_inputs=(idx,))
        rp = RegionParallel(lbi, timeout=3600.0, microbatches=cfg["microbatches"],
                            exchange="relay")
        rp.to_empty(device="cpu").init_weights(seed=0)
        params, held = list(rp.parameters()), rp.held_bytes()

        def step():
            return rp.step((idx,), _loss, target=tgt)
    else:
        runner = PipelineRunner(model, _regions(cfg["layers"], k), schedule=kind.split("-")[1],
                                microbatches=cfg["microbatches"], loss_fn=_loss)
        runner.to_empty(device="cpu").init_weights(seed=0)
        params, held = list(runner.parameters()), runner.held_bytes()

        def step():
            return runner.step(idx, tgt)
    opt = torch.optim.AdamW(params, lr=1e-4)
    t0 = time.perf_counter()
    losses = []
    for _ in range(cfg["steps"] if measure else 1):
        opt.zero_grad(set_to_none=True)
        if step is None:
            loss = _loss(model(idx), tgt)
            loss.backward()
            losses.append(float(loss.detach()))
        else:
            losses.append(step())
        opt.step()
    return dict(held=held, params=sum(p.numel() * p.element_size() for p in params),
                loss=losses[-1], step_s=(time.perf_counter() - t0) / max(1, len(losses)))


def _worker(rank: int, world: int, port: int, out: str, kind: str, cfg: dict) -> None:
    import resource

    import torch.distributed as dist

    torch.set_num_threads(cfg["threads"])
    res: dict = {"rank": rank}
    try:
        if kind != "single":
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world)
        _warm_up(cfg, kind)
        if cfg.get("budget"):
            size = _status()["VmSize"]
            limit = size + int(cfg["budget"] * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            res["budget_bytes"] = int(cfg["budget"] * 2**30)
        Path("/proc/self/clear_refs").write_text("5")  # peak := current
        before = _status()["VmRSS"]
        res.update(_run_kind(cfg, kind, measure=True))
        res["peak_growth"] = _status()["VmHWM"] - before
    except Exception as exc:  # noqa: BLE001 - an over-budget run is a result, not a crash
        res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        res["trace"] = traceback.format_exc()[-2000:]
    Path(out, f"{kind}_{world}_{rank}.json").write_text(json.dumps(res))
    if kind != "single" and dist.is_initialized() and "error" not in res:
        dist.barrier()
        dist.destroy_process_group()


def _spawn(kind: str, world: int, cfg: dict, out: str) -> list[dict]:
    import torch.multiprocessing as mp

    from lbi_fx.distributed import free_port

    ctx = mp.start_processes(_worker, args=(world, free_port(), out, kind, cfg), nprocs=world,
                             join=False, start_method="spawn")
    while not ctx.join(timeout=5):
        pass
    return [json.loads(Path(out, f"{kind}_{world}_{r}.json").read_text()) for r in range(world)]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of ``lbi-fx bench memory``."""
    ap.add_argument("--width", type=int, default=2048, help="model width (default 2048)")
    ap.add_argument("--layers", type=int, default=6, help="GPT blocks (default 6: 1.13 GiB "
                    "of fp32 parameters at width 2048)")
    ap.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    ap.add_argument("--seq", type=int, default=16, help="tokens per sequence (default 16)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    ap.add_argument("--rank", type=int, default=3, help="interface rank (pool mean)")
    ap.add_argument("--ranks", default="2,3,4", help="numbers of region ranks / stages")
    ap.add_argument("--steps", type=int, default=2, help="training steps each (default 2)")
    ap.add_argument("--schedules", default="gpipe",
                    help="pipeline schedules to compare, comma-separated: gpipe, 1f1b, or none")
    ap.add_argument("--microbatches", type=int, default=1,
                    help="micro-batches per step, LBI and pipelines alike (default 1)")
    ap.add_argument("--budget", type=float, default=None,
                    help="GiB of address space each process may grow by (RLIMIT_AS)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--rate", default=None,
                    help="shape the loopback to this tc rate during the runs (e.g. 10mbit; "
                         "root, tc): the slow link region parallelism is for")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point."""
    return standalone(sys.modules[__name__], "memory", argv)


def run(a: argparse.Namespace) -> int:
    """``lbi-fx bench memory``; returns the exit status."""
    from lbi_fx.cli.common import int_list

    ks = int_list(a.ranks, "--ranks")
    schedules = [] if a.schedules == "none" else a.schedules.split(",")
    bad = [x for x in schedules if x not in ("gpipe", "1f1b")]
    if bad:
        raise InputError(f"--schedules {a.schedules}: choose from gpipe, 1f1b (or none)")
    if a.batch % a.microbatches:
        raise InputError(f"--batch {a.batch} does not split into --microbatches {a.microbatches}")
    if "1f1b" in schedules and any(a.microbatches < k for k in ks):
        raise InputError(f"--schedules 1f1b needs --microbatches >= every --ranks ({a.ranks})")
    if a.width % a.heads:
        raise InputError(f"--width {a.width} is not a multiple of --heads {a.heads}")
    if any(k < 2 or k > a.layers for k in ks):
        raise InputError(f"--ranks {a.ranks}: each between 2 and --layers ({a.layers})")
    cfg = dict(width=a.width, layers=a.layers, heads=a.heads, seq=a.seq, batch=a.batch,
               rank=a.rank, steps=a.steps, budget=a.budget, threads=a.threads, k=1,
               microbatches=a.microbatches)
    whole = sum(t.numel() * t.element_size() for t in _gpt(cfg, meta=True).parameters())
    rows = []
    from lbi_fx.bench.link import shaped_loopback

    with tempfile.TemporaryDirectory() as out, shaped_loopback(a.rate):
        plan = [("single", 1)] + [(kind, k) for k in ks
                                  for kind in ("lbi", *(f"pipeline-{s}" for s in schedules))]
        for kind, k in plan:
            res = _spawn(kind, k, dict(cfg, k=k), out)
            for r in res:
                rows.append(dict(kind=kind, k=k, **{x: r.get(x) for x in (
                    "rank", "held", "params", "peak_growth", "loss", "step_s", "error",
                    "budget_bytes")}))
    single = next((r["peak_growth"] for r in rows if r["kind"] == "single"
                   and r.get("peak_growth")), None)
    for r in rows:
        r["expected"] = None if r["params"] is None else r["held"] + 3 * r["params"]
        r["ratio"] = (None if single is None or r.get("peak_growth") is None
                      else r["peak_growth"] / single)
    if a.json:
        print(json.dumps(dict(whole_bytes=whole, rows=rows), indent=1))
        return 0
    gib = 2 ** 30
    print(f"GPT {a.layers} x {a.width}, {whole / gib:.2f} GiB of fp32 parameters, AdamW, "
          f"batch {a.batch} x {a.seq}, {a.steps} steps"
          + (f", budget {a.budget:g} GiB per process" if a.budget else "")
          + (f", loopback shaped to {a.rate}" if a.rate else ""))
    print(f"{'run':<18}{'rank':>5}{'holds GiB':>11}{'expected GiB':>14}{'peak GiB':>10}"
          f"{'x 1 process':>13}{'step s':>8}  status")
    for r in rows:
        name = ("1 process" if r["kind"] == "single" else f"LBI, {r['k']} ranks"
                if r["kind"] == "lbi" else f"{r['kind'].split('-')[1]}, {r['k']} stages")
        f = (lambda v: "-" if v is None else f"{v / gib:.2f}")  # noqa: E731
        print(f"{name:<18}{r['rank']:>5}{f(r['held']):>11}{f(r['expected']):>14}"
              f"{f(r['peak_growth']):>10}"
              f"{'-' if r['ratio'] is None else format(r['ratio'], '.2f'):>13}"
              f"{'-' if r['step_s'] is None else format(r['step_s'], '.1f'):>8}  "
              f"{r['error'] or 'trained'}")
    return 0
