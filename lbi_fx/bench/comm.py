"""``lbi-fx bench comm``: every byte of one training step of region parallelism vs
torch.distributed.pipelining, from one real multi-process run (and with ``--timed``, their
step times and LBI's critical path).

It spawns ``--world`` processes itself (gloo on 127.0.0.1, a free port), builds
``lbi_fx.models.transformer.GPT`` (``--vocab`` tokens: 50257 is GPT-2's) with K regions of
``--layers-per-region`` blocks, and runs one step of each:

* LBI (``RegionParallel``, ``--exchange allgather``: the J_k all-gathered and mbar_{K-1}
  broadcast; ``relay``: mbar_k passed rank to rank, J_k never leave their rank) with the
  canvas weights shared (their gradients all-reduced over the region ranks) or
  ``--canvas-weights per_region`` (each region's own copy: nothing to reduce);
* torch.distributed.pipelining (``lbi_fx.pipelining.PipelineRunner``), 1F1B where the
  batch fills one micro-batch per stage, else GPipe (the bytes are the same for any
  schedule and micro-batch count: the (B, L, D) activations forward and their gradient
  back across each rank boundary).

Every phase is counted where it is sent and reported as a step total first, then by kind
(``lbi_fx.distributed.step_bytes``: activations / interface, Jacobians, parameter-gradient
reductions, dp reductions, control), in bytes on the wire: what the ranks send, by the
algorithm gloo runs each collective with (an all-reduce over n ranks: 2 (n - 1) x its
buffer in all), beside the logical payload (each collective's tensor once). With ``--dp``
the figures are one replica's ranks' (each replica sends as much). With ``--dp N`` the LBI run is a ``("dp", "region")``
mesh of N x world ranks. Defaults are the paper's configuration (K=7, r=64, bf16, B=1,
L=1024, D=768) with one block per region and one rank per region.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lbi_fx.bench import standalone
from lbi_fx.errors import InputError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def _build(cfg: dict):
    """(lbi, baseline model, idx, targets, regions as layer lists) on this rank; idx and
    targets hold the global batch (dp x B rows)."""
    from lbi_fx.models.transformer import GPT, GPTConfig

    K, lpr = cfg["k"], cfg["layers_per_region"]
    gcfg = GPTConfig(vocab_size=cfg.get("vocab", 256), n_layer=K * lpr, n_embd=cfg["dim"],
                     n_head=cfg["heads"], block_size=max(cfg["seq"], 8))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(gcfg)
    torch.manual_seed(0)  # interface modules draw from the global RNG
    layers = [[k * lpr + i for i in range(lpr)] for k in range(K)]
    with warnings.catch_warnings():  # --pool mean on a causal GPT is the user's explicit choice
        warnings.simplefilter("ignore", lbi_fx_warnings())
        lbi = _transform(model, layers, cfg)
    dtype = DTYPES[cfg["dtype"]]
    lbi = lbi.to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = GPT(gcfg).to(dtype)
    g = torch.Generator().manual_seed(1)
    rows = cfg.get("dp", 1) * cfg["batch"]
    idx = torch.randint(0, gcfg.vocab_size, (rows, cfg["seq"]), generator=g)
    tgt = torch.randint(0, gcfg.vocab_size, (rows, cfg["seq"]), generator=g)
    return lbi, base, idx, tgt, layers


def lbi_fx_warnings() -> tuple:
    import lbi_fx

    return (lbi_fx.CausalityWarning, lbi_fx.FallbackWarning)


def pipeline_schedule(batch: int, world: int) -> tuple[str, int]:
    """1F1B with one micro-batch per stage where the batch allows, else GPipe with one
    micro-batch per row: the bytes are the same either way."""
    return ("1f1b", world) if batch >= world and batch % world == 0 else ("gpipe", 1)


def _worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from lbi_fx.distributed import Comm, RegionParallel, shard_batch
    from lbi_fx.pipelining import PipelineRunner

    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        lbi, base, idx, tgt, layers = _build(cfg)
        mesh, region_group = None, None
        if cfg.get("dp", 1) > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (cfg["dp"], world // cfg["dp"]),
                                    mesh_dim_names=("dp", "region"))
            region_group = mesh.get_group("region")

        def loss_fn(logits, target):
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))

        lbi_t, pipe_t = [], []
        rp = RegionParallel(lbi, mesh=mesh, comm=Comm(), timeout=cfg.get("timeout", 3600.0),
                            exchange=cfg.get("exchange", "allgather"))
        idx, tgt = shard_batch((idx, tgt), rp)  # this replica's rows
        schedule, M = pipeline_schedule(cfg["batch"], cfg["world"])
        pipe = PipelineRunner(base, layers, region_group, schedule=schedule, microbatches=M,
                              loss_fn=loss_fn, comm=Comm(region_group))
        for _ in range(cfg["steps"]):
            rp.comm.records.clear()
            pipe.comm.records.clear()
            lbi.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            lbi_loss = rp.step((idx,), loss_fn, target=tgt)
            lbi_t.append(dict(rp.timings, step=time.perf_counter() - t0))
            base.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            pipe_loss = pipe.step(idx, tgt)
            pipe_t.append(dict(pipe.timings, step=time.perf_counter() - t0))
        lbi_tot, pipe_tot = rp.comm.traffic(), pipe.comm.traffic()
        every: list = [None] * world
        dist.all_gather_object(every, {"lbi": lbi_t, "pipe": pipe_t})
        if rank == 0:
            Path(out).write_text(json.dumps(dict(
                lbi=lbi_tot, pipe=pipe_tot, timings=every, lbi_loss=lbi_loss,
                pipe_loss=pipe_loss, place=rp.place, schedule=[schedule, M])))
        dist.barrier()  # nobody tears down the store (hosted by rank 0) while others use it
    finally:
        dist.destroy_process_group()


def check_config(cfg: dict) -> None:
    """Bad sizes fail here, on one line, rather than inside the spawned ranks."""
    from lbi_fx.distributed import placement

    for key in ("rank", "batch", "seq", "dim", "heads", "layers_per_region", "steps", "threads",
                "dp"):
        if cfg[key] < 1:
            raise InputError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if not cfg.get("timeout", 1.0) > 0:
        raise InputError(f"--timeout {cfg['timeout']}: seconds a rank waits for its peers, > 0")
    if cfg["k"] < 2:
        raise InputError(f"--k {cfg['k']}: LBI needs at least 2 regions (one boundary)")
    if cfg["dim"] % cfg["heads"]:
        raise InputError(f"--dim {cfg['dim']} must be a multiple of --heads {cfg['heads']}")
    if cfg.get("vocab", 256) < 2:
        raise InputError(f"--vocab {cfg['vocab']}: at least 2 tokens")
    placement(cfg["k"], cfg["world"])  # InputError when the ranks cannot all get a region


def spawn_run(cfg: dict) -> dict:
    """One multi-process run; returns rank 0's summary."""
    import torch.multiprocessing as mp

    from lbi_fx.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        n = cfg["world"] * cfg.get("dp", 1)
        try:
            mp.spawn(_worker, args=(n, free_port(), cfg, out), nprocs=n)
        except mp.ProcessRaisedException as exc:  # its message starts with a blank line
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise RuntimeError(f"rank {exc.error_index} failed: {lines[-1]}") from exc
        return json.loads(Path(out).read_text())


def _critical_path(res: dict) -> dict:
    """Per rank, the fastest of the timed steps after the first (warm-up)."""
    def best(key: str, rank: int) -> dict:
        steps = res["timings"][rank][key]
        steps = steps[1:] or steps
        return min(steps, key=lambda t: t["step"])

    world = len(res["timings"])
    compute = ("jacobian", "seed", "scan", "local", "prologue_bwd")
    exch = ("allgather", "broadcast", "relay")
    per_rank = []
    for j in range(world):
        t = best("lbi", j)
        per_rank.append({k: t.get(k, 0.0) for k in (*compute, *exch)})
    exchange = min(sum(t[k] for k in exch) for t in per_rank)
    lbi = max(sum(t[k] for k in compute) for t in per_rank) + exchange
    after = max(sum(t[k] for k in compute if k != "jacobian") for t in per_rank) + exchange
    return dict(lbi_critical_s=lbi, lbi_exchange_s=exchange, lbi_after_forward_s=after,
                lbi_step_s=max(best("lbi", j)["step"] for j in range(world)),
                pipeline_step_s=max(best("pipe", j)["step"] for j in range(world)),
                lbi_per_rank=per_rank)


def summarize(cfg: dict, res: dict) -> dict:
    from lbi_fx.distributed import step_bytes

    lbi, pipe = step_bytes(res["lbi"]), step_bytes(res["pipe"])
    return dict(
        config={**{k: cfg.get(k, 1) for k in ("k", "world", "dp", "rank", "dtype", "batch",
                                              "seq", "dim", "layers_per_region", "vocab")},
                "pool": cfg.get("pool", "mean"), "exchange": cfg.get("exchange", "allgather"),
                "canvas_weights": cfg.get("canvas_weights", "shared")},
        placement=res["place"],
        pipeline_schedule=res.get("schedule"),
        # on the wire, all ranks (what step_bytes' total is)
        lbi_step_bytes=lbi["total"],
        pipeline_step_bytes=pipe["total"],
        step_ratio=pipe["total"] / lbi["total"] if lbi["total"] else float("inf"),
        # the logical payloads (a collective's tensor once), for comparison only
        lbi_logical_bytes=lbi["logical"]["total"],
        pipeline_logical_bytes=pipe["logical"]["total"],
        lbi=lbi, pipeline=pipe,
        # the backward's exchange alone, on the wire
        lbi_bytes=sum(lbi["by_phase"].get(p, 0) for p in ("scan_allgather", "mbar_broadcast",
                                                          "mbar_relay")),
        pipeline_bytes=pipe["by_phase"].get("pipe_backward_grad", 0),
        lbi_loss=res["lbi_loss"],
        pipeline_loss=res["pipe_loss"],
    )


def _kb(b: float) -> str:
    return f"{b / 1024:,.1f} KiB"


def _ratio(r: float) -> str:
    """pipeline / LBI bytes, said the right way round."""
    if r >= 1:
        return f"{r:,.1f}x fewer"
    return f"{1 / r:,.1f}x more" if r > 0 else "LBI sends bytes, the pipeline none"



def _transform(model, layers: list[list[int]], cfg: dict):
    import lbi_fx

    kw = {}
    if cfg.get("canvas_weights", "shared") != "shared":
        kw["canvas_weights"] = cfg["canvas_weights"]
    return lbi_fx.transform(model, regions=[[f"layers.{i}" for i in ls] for ls in layers],
                            rank=cfg["rank"], example_inputs=(torch.zeros(2, 8, dtype=torch.long),),
                            jacobian=cfg.get("jacobian", "reuse"), chunk=cfg.get("chunk"),
                            pool=cfg.get("pool", "mean"), **kw,
                            **({"max_len": cfg["seq"]} if cfg.get("pool") in ("causal", "auto")
                               else {}))

def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of ``lbi-fx bench comm``."""
    ap.add_argument("--k", type=int, default=None, help="regions (default 7)")
    ap.add_argument("--world", type=int, default=None, help="region ranks (default: K)")
    ap.add_argument("--dp", type=int, default=1,
                    help="data-parallel replicas: a (dp, world) mesh, dp x world processes, "
                         "--batch rows per replica (default 1)")
    ap.add_argument("--rank", type=int, default=None, help="interface rank r (default 64)")
    ap.add_argument("--pool", choices=["mean", "last", "causal", "auto"], default="mean",
                    help="interface pool (default mean: the paper's configuration, one row "
                         "of r; causal carries S rows, so J is (S r)^2)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16")
    ap.add_argument("--batch", type=int, default=None, help="default 1")
    ap.add_argument("--seq", type=int, default=None, help="default 1024")
    ap.add_argument("--dim", type=int, default=None, help="default 768")
    ap.add_argument("--heads", type=int, default=None, help="default 12")
    ap.add_argument("--layers-per-region", type=int, default=None, help="default 1")
    ap.add_argument("--vocab", type=int, default=256,
                    help="token vocabulary (default 256 bytes; 50257 is GPT-2's)")
    ap.add_argument("--exchange", choices=["allgather", "relay"], default="allgather",
                    help="LBI backward exchange (RegionParallel(exchange=...))")
    ap.add_argument("--canvas-weights", choices=["shared", "per_region"], default="shared",
                    help="transform(canvas_weights=...): per_region leaves no embedding "
                         "gradient to all-reduce")
    ap.add_argument("--jacobian", choices=["reuse", "recompute"], default="reuse",
                    help="how ranks build J_k (recompute: less memory, for long sequences)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="with --jacobian recompute: replicas per rerun (memory x chunk)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--timed", action="store_true",
                    help="backward critical path vs pipeline backward for K = world in "
                         "--worlds (defaults there: D=256, L=256, r=32, fp32, 2 blocks/region)")
    ap.add_argument("--worlds", default="2,4", help="worlds for --timed (default 2,4)")
    ap.add_argument("--steps", type=int, default=None, help="steps (timed: first is warm-up)")
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds a rank waits for a peer before RegionParallel gives up "
                         "(default 3600: the default shapes take minutes per phase on CPU)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")


def _width(c: dict) -> str:
    """The interface width of config ``c``, said as everywhere: rank r x S segments."""
    from lbi_fx.interfaces import Segments
    from lbi_fx.report import describe_width

    causal = c.get("pool", "mean") in ("causal", "auto")  # auto: these GPTs are causal
    return describe_width(c["rank"], Segments.make(c["seq"]).count if causal else 1)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: parse ``argv`` with :func:`add_arguments`, then :func:`run`."""
    return standalone(sys.modules[__name__], "comm", argv)


def run(a: argparse.Namespace) -> int:
    """``lbi-fx bench comm``; returns the process exit status."""
    defaults = dict(k=7, rank=64, dtype="bf16", batch=1, seq=1024, dim=768, heads=12,
                    layers_per_region=1, steps=1)
    if a.timed:
        defaults.update(dim=256, heads=4, seq=256, rank=32, dtype="fp32", layers_per_region=2,
                        steps=3)
    cfg = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in defaults.items()}
    cfg.update(world=cfg["k"] if a.world is None else a.world, threads=a.threads, pool=a.pool,
               dp=a.dp, timeout=a.timeout, vocab=a.vocab, exchange=a.exchange,
               canvas_weights=a.canvas_weights, jacobian=a.jacobian, chunk=a.chunk)
    if a.timed and a.dp != 1:
        raise InputError("--timed compares one replica's critical paths: use it without --dp")
    if a.timed:
        try:
            worlds = [int(x) for x in a.worlds.split(",")]
        except ValueError:
            raise InputError(f"--worlds {a.worlds!r}: expected comma-separated ints") from None
        for w in worlds:
            check_config(dict(cfg, k=w, world=w))
        rows = []
        for w in worlds:
            c = dict(cfg, k=w, world=w)
            res = spawn_run(c)
            rows.append(dict(summarize(c, res), **_critical_path(res)))
        if a.json:
            print(json.dumps(rows, indent=1))
        else:
            c = rows[0]["config"]
            print(f"{_width(c)}, {c['dtype']} B={c['batch']} L={c['seq']} D={c['dim']} "
                  f"{c['layers_per_region']} blocks/region, one region per rank; seconds")
            print(f"{'K=world':>8} {'LBI crit':>9} {'exchange':>9} {'LBI after fwd':>14} "
                  f"{'LBI step':>9} {'pipe step':>10}")
            for r in rows:
                print(f"{r['config']['world']:>8} {r['lbi_critical_s']:>9.3f} "
                      f"{r['lbi_exchange_s']:>9.4f} {r['lbi_after_forward_s']:>14.3f} "
                      f"{r['lbi_step_s']:>9.3f} {r['pipeline_step_s']:>10.3f}")
                for j, t in enumerate(r["lbi_per_rank"]):
                    print("    rank", j, " ".join(f"{k}={v:.3f}" for k, v in t.items()))
        return 0
    check_config(cfg)
    s = summarize(cfg, spawn_run(cfg))
    if a.json:
        print(json.dumps(s, indent=1))
        return 0
    c = s["config"]
    sched, M = s["pipeline_schedule"]
    print(f"K={c['k']} world={c['world']} dp={c['dp']} {_width(c)}, {c['dtype']} B={c['batch']} "
          f"L={c['seq']} D={c['dim']} vocab={c['vocab']} placement={s['placement']}")
    scope = "all ranks" if c["dp"] == 1 else \
        f"the {c['world']} ranks of one replica (the mesh: dp = {c['dp']} x this)"
    print(f"  bytes per step on the wire, {scope}: LBI ({c['exchange']}, "
          f"{c['canvas_weights']} canvas) {s['lbi_step_bytes']:,} ({_kb(s['lbi_step_bytes'])}) "
          f"vs pipelining {sched} M={M} {s['pipeline_step_bytes']:,} "
          f"({_kb(s['pipeline_step_bytes'])}): {_ratio(s['step_ratio'])}")
    print(f"  logical payload (each collective's tensor once): LBI {s['lbi_logical_bytes']:,} "
          f"vs pipelining {s['pipeline_logical_bytes']:,}; headers and framing in neither")
    print("  per rank on the wire: LBI " + ", ".join(f"{b:,}" for b in s["lbi"]["per_rank"])
          + "; pipeline " + ", ".join(f"{b:,}" for b in s["pipeline"]["per_rank"]))
    for kind in s["lbi"]["by_kind"]:
        lb, pb = s["lbi"]["by_kind"][kind], s["pipeline"]["by_kind"][kind]
        if lb or pb:
            print(f"    {kind:<12} LBI {lb:>14,}   pipeline {pb:>14,}")
    print("  by phase: LBI " + ", ".join(f"{p} {b:,}" for p, b in s["lbi"]["by_phase"].items()))
    print("            pipeline " + ", ".join(f"{p} {b:,}"
                                              for p, b in s["pipeline"]["by_phase"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
