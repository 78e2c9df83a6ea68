"""Region parallelism on real loopback process groups (gloo, mp spawn): exact gradients on
every rank, and no hidden-size payload in the LBI exchanges."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

B, L, D = 2, 8, 16


def _model(K: int, dtype: torch.dtype):
    import lbi_fx
    from lbi_fx.models.transformer import build

    torch.manual_seed(0)  # interface modules draw from the global RNG: same model everywhere
    model, (idx,) = build(n_layer=K, n_embd=D, n_head=2, block_size=L, batch=B, seq=L, seed=3)
    # pool="mean": the exchange-size checks below count one row of r per interface
    # (causal interfaces carry S rows; their exactness is tested in test_causal.py)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lbi_fx.CausalityWarning)
        lbi = lbi_fx.transform(model, regions=[[f"layers.{k}"] for k in range(K)], rank=4,
                               example_inputs=(idx,), jacobian="reuse", pool="mean")
    return lbi.to(dtype), idx


def _parity_worker(rank: int, world: int, port: int, K: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from lbi_fx.distributed import LBI_BACKWARD_PHASES, RegionParallel
    from lbi_fx.testing import default_loss

    result = {}
    for dtype in (torch.float64, torch.float32):
        lbi, idx = _model(K, dtype)
        lbi.backward = "autograd"
        params = dict(lbi.named_parameters())
        ref = dict(zip(params, torch.autograd.grad(default_loss(lbi(idx)), list(params.values()),
                                                   allow_unused=True)))
        lbi.backward = "scan"
        lbi.zero_grad(set_to_none=True)
        rp = RegionParallel(lbi)
        rp.step((idx,), default_loss)
        got = {n: p.grad for n, p in params.items() if p.grad is not None}
        errs = {n: float((got[n].double() - ref[n].double()).norm() / ref[n].double().norm())
                for n in got}
        diff = sum(float((got[n].double() - ref[n].double()).pow(2).sum()) for n in got)
        norm = sum(float(ref[n].double().pow(2).sum()) for n in got)
        worst = [r for r in rp.comm.records
                 if r.phase in (*LBI_BACKWARD_PHASES, "forward_m") and r.numel >= B * L * D]
        covered = sorted({n for n, u in rp.users.items() for _ in u})
        result[str(dtype)] = dict(rel=math.sqrt(diff / norm), worst=max(errs.items(), key=lambda e: e[1]), have=sorted(got), used=rp.used,
                                  covered=covered, all=sorted(n for n in ref if ref[n] is not None),
                                  big=[r.phase for r in worst],
                                  phases=sorted({r.phase for r in rp.comm.records}))
    dist.barrier()
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


# One region per rank here; two regions on one rank (K = 3 over 2 region ranks) runs in
# tests/test_distributed_mesh.py, inside the 2 x 2 mesh (one spawn less: the distributed
# tests stay under a minute).
@pytest.mark.parametrize("world,K", [(3, 3)])
def test_region_parallel_gradients_exact(tmp_path, world, K):
    from lbi_fx.distributed import free_port

    mp.spawn(_parity_worker, args=(world, free_port(), K, str(tmp_path)), nprocs=world)
    for rank in range(world):
        res = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        for dtype, tol in (("torch.float64", 1e-12), ("torch.float32", 1e-6)):
            r = res[dtype]
            assert r["rel"] <= tol, (rank, dtype, r["rel"], r["worst"])
            assert r["have"] == r["used"], (rank, dtype)
            assert r["covered"] == r["all"]
            assert r["big"] == [], f"hidden-size payload in {r['big']}"
            assert {"scan_allgather", "mbar_broadcast", "grad_allreduce"} <= set(r["phases"])


def test_bench_comm_json(capsys):
    """Every byte of a step, by phase, equals what the configuration implies: K = 2 on 2
    ranks, r = 8 (mean pool), fp32, B = 1, L = 16, D = 32, 256-token vocabulary."""
    from lbi_fx.bench.comm import main

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = ["--json", "--k", "2", "--world", "2", "--dim", "32", "--seq", "16", "--heads", "2",
            "--rank", "8", "--dtype", "fp32"]
    assert main(base) == 0
    data = json.loads(capsys.readouterr().out)
    lbi, pipe = data["lbi"]["logical"]["by_phase"], data["pipeline"]["logical"]["by_phase"]
    assert lbi["scan_allgather"] == 2 * 8 * 8 * 4  # world x (B, 1 slot, r, r)
    assert lbi["mbar_broadcast"] == lbi["forward_m"] == 8 * 4
    assert lbi["grad_allreduce"] == (256 * 32 + 16 * 32 + 2) * 4  # wte, wpe, a flag each
    assert pipe["pipe_forward_act"] == pipe["pipe_backward_grad"] == 16 * 32 * 4
    assert pipe["grad_allreduce"] == (256 * 32 + 1) * 4  # the tied head / wte
    # on the wire, 2 ranks: the all-gather's result and the broadcast cross once, each
    # all-reduce twice (ring: every rank sends its half, then the reduced half back)
    wire = {ph: b * (2 if ph in ("grad_allreduce", "loss") else 1) for ph, b in lbi.items()}
    assert data["lbi"]["by_phase"] == wire
    assert data["pipeline"]["by_phase"] == {ph: b * (2 if ph == "grad_allreduce" else 1)
                                            for ph, b in pipe.items()}
    assert data["lbi_step_bytes"] == sum(data["lbi"]["by_kind"].values()) == sum(wire.values())
    assert data["lbi_step_bytes"] == sum(data["lbi"]["per_rank"])
    assert data["lbi_logical_bytes"] == sum(lbi.values())
    assert data["pipeline_step_bytes"] == sum(data["pipeline"]["by_phase"].values())
    assert data["pipeline_logical_bytes"] == sum(pipe.values())
    assert data["pipeline_schedule"] == ["gpipe", 1]  # B = 1 cannot fill 2 micro-batches
    # relay + per-region canvas: m_1 forward, mbar_1 (+ flag) back, the loss; nothing else
    assert main([*base, "--exchange", "relay", "--canvas-weights", "per_region"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lbi"]["logical"]["by_phase"] == {"forward_m": 8 * 4, "mbar_relay": 9 * 4,
                                                  "loss": 3 * 8}
    assert data["lbi"]["by_phase"] == {"forward_m": 8 * 4, "mbar_relay": 9 * 4, "loss": 2 * 3 * 8}
    assert data["lbi_logical_bytes"] == 92 and data["lbi_step_bytes"] == 116


@pytest.mark.parametrize("timeout", [0, -1.0, True, "60"])
def test_region_parallel_refuses_a_bad_timeout_before_any_collective(timeout):
    """Checked before the process group is touched: no group exists in this process."""
    import lbi_fx
    from lbi_fx.distributed import RegionParallel

    lbi, _ = _model(2, torch.float64)
    with pytest.raises(lbi_fx.InputError, match="timeout="):
        RegionParallel(lbi, timeout=timeout)
