"""Train lbi_fx.models.transformer (the example GPT) with LBI region parallelism: one process per rank.

    torchrun --nproc-per-node 2 examples/distributed_train.py [--steps 5 --layers 4 ...]
    torchrun --nproc-per-node 4 examples/distributed_train.py --dp 2 --save ckpt --save-every 5
    torchrun --nproc-per-node 4 examples/distributed_train.py --dp 2 --resume ckpt --steps 20

gloo on CPU, nccl when CUDA is available (one GPU per local rank). The ranks form a
("dp", "region") device mesh: each of the --dp replicas places the K regions over its
world/dp ranks and trains on its own rows of the global batch; gradients are averaged
over the replicas as DDP does. Each rank builds the model on the meta device, transforms
it there, and allocates and initialises only its own share (``rp.to_empty`` +
``rp.init_weights``: the same values at any world size); it runs the prologue outputs its
regions read, its own regions and, on the last region rank, the epilogue and the loss. The only activation-path traffic
is m_k (B x r) forward, one all-gather of the J_k and one broadcast of mbar_{K-1}
backward; shared parameters (embeddings, tied head) are all-reduced. Every rank steps its
optimizer on the parameters it uses.

--save writes a torch.distributed.checkpoint directory (every rank its own shard: its
parameters, Adam state, RNG states, the step and the data position); --resume continues
from one, also with another --dp. The last line prints a digest of the trained
parameters: a resumed run ends with the same digest as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from tqdm import tqdm

import lbi_fx
from lbi_fx import checkpoint
from lbi_fx.distributed import LBI_BACKWARD_PHASES, RegionParallel, shard_batch
from lbi_fx.models.transformer import GPT, GPTConfig


def param_digest(rp: RegionParallel) -> str:
    """sha256 over every parameter, each taken from a rank that updates it (other ranks
    hold stale copies of other regions' parameters)."""
    mine = {n: hashlib.sha256(p.detach().cpu().numpy().tobytes()).hexdigest()
            for n, p in rp.lbi.named_parameters() if n in set(rp.used)}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    merged = {n: h for d in every for n, h in d.items()}
    return hashlib.sha256("".join(f"{n}{merged[n]}" for n in sorted(merged)).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="train until this step (also when resuming)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--regions", type=int, default=None, help="default: one per layer")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16, help="interface rank r")
    ap.add_argument("--batch", type=int, default=4, help="global batch, split over --dp")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--dp", type=int, default=1, help="data-parallel replicas (mesh dim 'dp')")
    ap.add_argument("--microbatches", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--exchange", choices=["allgather", "relay"], default="allgather",
                    help="backward exchange: J_k all-gathered, or mbar passed rank to rank")
    ap.add_argument("--canvas-weights", choices=["shared", "per_region"], default="shared",
                    help="per_region: each region its own embedding copy (no gradient all-reduce)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds a rank waits for a peer before the step fails, naming it")
    ap.add_argument("--save", default=None, help="checkpoint directory to write")
    ap.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    ap.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world % a.dp or a.batch % a.dp:
        raise SystemExit(f"--dp {a.dp} must divide the world size ({world}) and --batch ({a.batch})")

    K = a.regions or a.layers
    if a.layers % K:
        raise SystemExit(f"--layers {a.layers} is not a multiple of --regions {K}")
    per = a.layers // K
    # built on the meta device: no rank ever holds the whole model (issue #34)
    cfg = GPTConfig(n_layer=a.layers, n_embd=a.width, block_size=a.seq, dropout=a.dropout)
    with torch.device("meta"):
        model = GPT(cfg)
    example = torch.zeros(2, 8, dtype=torch.long)  # real ids: transform needs shapes only
    lbi = lbi_fx.transform(model, regions=[[f"layers.{k * per + i}" for i in range(per)]
                                           for k in range(K)],
                           rank=a.rank, example_inputs=(example,), max_len=a.seq,
                           pool="causal", jacobian="reuse", canvas_weights=a.canvas_weights)
    mesh = init_device_mesh(device.type, (a.dp, world // a.dp), mesh_dim_names=("dp", "region"))
    rp = RegionParallel(lbi, mesh=mesh, timeout=a.timeout, microbatches=a.microbatches,
                        exchange=a.exchange)
    rp.to_empty(device=device).init_weights(seed=0)  # this rank's share, the same at any world
    opt = torch.optim.AdamW(rp.parameters(), lr=a.lr)  # this rank's share alone
    if rank == 0:
        print(f"rank 0 holds {rp.held_bytes() / 2**20:.1f} MiB of parameters and buffers",
              flush=True)
    torch.manual_seed(1000 + rank)  # each rank its own dropout stream
    try:
        from lbi_fx.models.data import load_corpus

        corpus = load_corpus(max_bytes=500_000)
    except Exception:  # no stdlib sources: random bytes still exercise the machinery
        corpus = None
    gen = torch.Generator().manual_seed(1)  # same global batches on every rank
    start = 0
    if a.resume:
        t0 = time.perf_counter()
        extra = checkpoint.load(a.resume, rp, opt)
        start = extra["step"]
        gen.set_state(extra["data_rng"])
        if rank == 0:
            print(f"resumed from {a.resume} at step {start} ({time.perf_counter() - t0:.2f} s)")
    if rank == 0:
        print(f"world={world} dp={a.dp} K={K} placement={rp.place} r={a.rank} "
              f"{'nccl' if cuda else 'gloo'}", flush=True)

    def save(step: int) -> None:
        t0 = time.perf_counter()
        checkpoint.save(a.save, rp, opt, extra={"step": step, "data_rng": gen.get_state()})
        if rank == 0:
            tqdm.write(f"saved step {step} to {a.save} ({time.perf_counter() - t0:.2f} s)")

    loss = float("nan")
    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, disable=rank != 0)
    for step in bar:
        if corpus is not None:
            x, y = corpus.get_batch("train", a.batch, a.seq, generator=gen)
        else:
            x = torch.randint(0, 256, (a.batch, a.seq + 1), generator=gen)
            x, y = x[:, :-1], x[:, 1:]
        x, y = shard_batch((x.to(device), y.to(device)), rp)  # this replica's rows

        def loss_fn(logits, target):
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

        rp.comm.records.clear()
        opt.zero_grad(set_to_none=True)
        loss = rp.step((x,), loss_fn, target=y)
        opt.step()
        b = rp.comm.local_bytes(wire=True)  # what this rank sent, on the wire
        bar.set_postfix(loss=f"{loss:.4f}", bwd_B=sum(b.get(p, 0) for p in LBI_BACKWARD_PHASES),
                        allreduce_B=b.get("grad_allreduce", 0) + b.get("dp_allreduce", 0))
        if a.save and a.save_every and (step + 1) % a.save_every == 0 and step + 1 < a.steps:
            save(step + 1)
    if a.save:
        save(a.steps)
    digest = param_digest(rp)
    if rank == 0:
        print(f"step {a.steps}  loss {loss:.4f}  params {digest}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
