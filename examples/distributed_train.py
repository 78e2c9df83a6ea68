"""Train lbi_fx.models.transformer (the example GPT) with LBI region parallelism: one process per rank.

    torchrun --nproc-per-node 2 examples/distributed_train.py [--steps 5 --layers 4 ...]

gloo on CPU, nccl when CUDA is available (one GPU per local rank). Each rank builds the
same LBI model (same seed; ``RegionParallel`` also broadcasts rank 0's weights), runs the
prologue, its own regions and, on the last rank, the epilogue and the loss. The only
activation-path traffic is m_k (B x r) forward, one all-gather of the J_k and one
broadcast of mbar_{K-1} backward; shared parameters (embeddings, tied head) are
all-reduced. Every rank steps its optimizer on the parameters it uses.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lbi_fx
from lbi_fx.distributed import LBI_BACKWARD_PHASES, RegionParallel
from lbi_fx.models.transformer import build


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--regions", type=int, default=None, help="default: one per layer")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16, help="interface rank r")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))

    K = a.regions or a.layers
    if a.layers % K:
        raise SystemExit(f"--layers {a.layers} is not a multiple of --regions {K}")
    per = a.layers // K
    torch.manual_seed(0)  # same interface modules on every rank
    model, (example,) = build(n_layer=a.layers, n_embd=a.width, block_size=a.seq, batch=2, seq=8)
    lbi = lbi_fx.transform(model, regions=[[f"layers.{k * per + i}" for i in range(per)]
                                           for k in range(K)],
                           rank=a.rank, example_inputs=(example,), max_len=a.seq,
                           jacobian="reuse").to(device)
    rp = RegionParallel(lbi)
    params = [p for n, p in lbi.named_parameters() if n in set(rp.used)]
    opt = torch.optim.AdamW(params, lr=a.lr)
    try:
        from lbi_fx.data import load_corpus

        corpus = load_corpus(max_bytes=500_000)
    except Exception:  # no stdlib sources: random bytes still exercise the machinery
        corpus = None
    gen = torch.Generator().manual_seed(1)  # same batches on every rank
    if rank == 0:
        print(f"world={dist.get_world_size()} K={K} placement={rp.place} r={a.rank} "
              f"{'nccl' if cuda else 'gloo'}", flush=True)
    for step in range(a.steps):
        if corpus is not None:
            x, y = corpus.get_batch("train", a.batch, a.seq, generator=gen)
        else:
            x = torch.randint(0, 256, (a.batch, a.seq + 1), generator=gen)
            x, y = x[:, :-1], x[:, 1:]
        x, y = x.to(device), y.to(device)

        def loss_fn(logits, y=y):
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

        rp.comm.records.clear()
        opt.zero_grad(set_to_none=True)
        loss = rp.step((x,), loss_fn)
        opt.step()
        if rank == 0:
            b = rp.comm.local_bytes()
            bwd = sum(b.get(p, 0) for p in LBI_BACKWARD_PHASES)
            print(f"step {step}  loss {loss:.4f}  backward exchange {bwd} B  "
                  f"grad all-reduce {b.get('grad_allreduce', 0)} B", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
