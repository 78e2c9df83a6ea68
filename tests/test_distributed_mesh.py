"""Region parallelism on a ("dp", "region") device mesh, and failures that end every rank's
step with a named error. One spawn of 4 gloo ranks runs every scenario (process start-up
and model capture dominate the cost); scenarios that leave a process group unusable run
on their own groups, the one that breaks the default group runs last."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

B, L, D, V, K = 4, 8, 16, 64, 3   # global batch B, split over dp=2
TIMEOUT = 3.0                      # RegionParallel's timeout in the failure scenarios


def _gpt():
    """A causal GPT: transform's default pool is "causal" (S segment rows per interface)."""
    import lbi_fx
    from lbi_fx.models.transformer import build

    torch.manual_seed(0)
    model, _ = build(n_layer=K, n_embd=D, n_head=2, block_size=L, batch=2, seq=L, seed=3)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, V, (B, L), generator=g)
    tgt = torch.randint(0, V, (B, L), generator=g)
    lbi = lbi_fx.transform(model, regions=[[f"layers.{k}"] for k in range(K)], rank=4,
                           example_inputs=(idx[:2],), jacobian="reuse")
    return lbi, idx, tgt


def ce(tgt):
    """Mean token cross-entropy: the global mean is the dp mean of equal shards' means."""
    def loss(logits):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    return loss


class Blk(nn.Module):
    def __init__(self, nan: bool = False):
        super().__init__()
        self.lin, self.nan = nn.Linear(6, 6), nan

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        return y + torch.sqrt(x - x) if self.nan else y  # sqrt(0) = 0, its derivative inf * 0


class Chain(nn.Module):
    def __init__(self, nan_in: int | None = None, n: int = 3, skip_last: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Blk(i == nan_in) for i in range(n))
        self.skip_last = skip_last  # the last block reads the input, not the chain

    def forward(self, x):
        h = x
        for b in self.blocks[:-1]:
            h = b(h)
        return self.blocks[-1](x if self.skip_last else h)


def _chain(n: int, nan_in: int | None = None, check_finite: bool = False,
           skip_last: bool = False):
    import lbi_fx

    torch.manual_seed(0)
    x = torch.randn(2, 6, dtype=torch.float64)
    lbi = lbi_fx.transform(Chain(n=n, nan_in=nan_in, skip_last=skip_last).double(),
                           regions=[[f"blocks.{k}"] for k in range(n)], rank=3,
                           example_inputs=(x,), jacobian="reuse")
    lbi.check_finite = check_finite  # set after: transform's own trial backward would refuse
    return lbi, x


def _error(fn) -> dict:
    """Run ``fn``; what it raised (type, message, rank/phase fields) and how long it took."""
    t0 = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded for the test to assert on
        return dict(type=type(exc).__name__, msg=str(exc), rank=getattr(exc, "rank", None),
                    phase=getattr(exc, "phase", None), regions=getattr(exc, "regions", None),
                    s=time.monotonic() - t0, lbi=_is_lbi(exc))
    return dict(type=None, s=time.monotonic() - t0)


def _is_lbi(exc) -> bool:
    import lbi_fx

    return isinstance(exc, lbi_fx.LBIError)


def _exact(lbi, idx, tgt, mesh, dtype, **rp_kw) -> dict:
    from lbi_fx.distributed import RegionParallel, shard_batch

    lbi = copy.deepcopy(lbi)  # a RegionParallel keeps only its rank's share of the module
    lbi.to(dtype)
    lbi.backward = "autograd"
    params = dict(lbi.named_parameters())
    ref_loss = ce(tgt)(lbi(idx))
    ref = dict(zip(params, torch.autograd.grad(ref_loss, list(params.values()),
                                               allow_unused=True)))
    lbi.backward = "scan"
    lbi.zero_grad(set_to_none=True)
    rp = RegionParallel(lbi, mesh=mesh, timeout=30, **rp_kw)
    my_idx, my_tgt = shard_batch((idx, tgt), rp)
    if rp_kw:  # micro-batches: the loss takes each micro-batch's targets
        loss = rp.step((my_idx,), lambda out, t: ce(t)(out), target=my_tgt)
    else:
        loss = rp.step((my_idx,), ce(my_tgt))
    got = {n: p.grad for n, p in params.items() if p.grad is not None}
    diff = sum(float((got[n].double() - ref[n].double()).pow(2).sum()) for n in got)
    norm = sum(float(ref[n].double().pow(2).sum()) for n in got)
    return dict(rel=math.sqrt(diff / norm), loss=loss, ref_loss=float(ref_loss),
                have=sorted(got), used=rp.used, shard=list(my_idx.shape),
                covered=sorted(n for n in ref if ref[n] is not None),
                dp_bytes=sum(r.bytes for r in rp.comm.records if r.phase == "dp_allreduce"),
                dp_calls=sum(r.phase == "dp_allreduce" for r in rp.comm.records),
                pool=getattr(lbi, "pool", None))


def _batches(n: int) -> list:
    """``n`` different global batches (idx, tgt)."""
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g))
            for _ in range(n)]


def _accumulated(lbi, batches, mesh=None, group=None) -> dict:
    """One step per batch without zeroing: ``.grad`` must be the sum of the steps'
    full-batch gradients, as autograd accumulates them (fp64), with one flat all-reduce per
    step and kind."""
    from lbi_fx.distributed import RegionParallel, shard_batch

    lbi = copy.deepcopy(lbi)  # a RegionParallel keeps only its rank's share
    lbi.to(torch.float64)
    lbi.backward = "autograd"
    params = dict(lbi.named_parameters())
    ref: dict = dict.fromkeys(params)
    for idx, tgt in batches:
        grads = torch.autograd.grad(ce(tgt)(lbi(idx)), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                ref[n] = g if ref[n] is None else ref[n] + g
    lbi.backward = "scan"
    lbi.zero_grad(set_to_none=True)
    rp = RegionParallel(lbi, group, mesh=mesh, timeout=30)
    for idx, tgt in batches:
        my_idx, my_tgt = shard_batch((idx, tgt), rp)
        rp.step((my_idx,), ce(my_tgt))
    got = {n: p.grad for n, p in params.items() if p.grad is not None}
    errs = {n: float((g - ref[n]).norm() / ref[n].norm()) if ref[n] is not None else math.inf
            for n, g in got.items()}
    diff = sum(float((g - ref[n]).pow(2).sum()) for n, g in got.items() if ref[n] is not None)
    norm = sum(float(ref[n].pow(2).sum()) for n in got if ref[n] is not None)
    return dict(rel=math.sqrt(diff / norm), worst=max(errs.items(), key=lambda e: e[1]),
                have=sorted(got), used=rp.used, steps=len(batches),
                calls={ph: sum(r.phase == ph for r in rp.comm.records)
                       for ph in ("grad_allreduce", "dp_allreduce")})


def _ignored_interface(group) -> dict:
    """mbar_{K-1} is None: earlier regions get no gradient, as under autograd, also after
    a second step without zeroing (None stays None, the rest accumulates)."""
    from lbi_fx.distributed import RegionParallel

    lbi, x = _chain(3, skip_last=True)
    ref_lbi = copy.deepcopy(lbi)  # the reference: RegionParallel keeps only a share of lbi
    ref_lbi.backward = "autograd"
    params = dict(lbi.named_parameters())
    ref_params = list(dict(ref_lbi.named_parameters()).values())
    acc: list = [None] * len(params)
    rp = None
    out = {}
    for step, xs in enumerate((x, 0.5 * x.flip(0))):
        ref = torch.autograd.grad(ref_lbi(xs).pow(2).mean(), ref_params, allow_unused=True)
        acc = [a if g is None else g if a is None else a + g for a, g in zip(acc, ref)]
        rp = rp or RegionParallel(lbi, group, timeout=30)
        rp.step((xs,), lambda o: o.pow(2).mean())
        out[f"step{step}"] = {
            n: ("none" if g is None and p.grad is None else
                "mismatch" if (g is None) != (p.grad is None) else
                float((p.grad - g).norm() / max(float(g.norm()), 1e-300)))
            for (n, p), g in zip(params.items(), acc) if n in rp.used}
    return out


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=4)
    from torch.distributed.device_mesh import init_device_mesh

    from lbi_fx.distributed import Comm, RegionParallel, shard_batch

    store = dist.distributed_c10d._get_default_store()
    res: dict = {}
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "region"))
        misnamed = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "region"))
        too_wide = init_device_mesh("cpu", (1, 4), mesh_dim_names=("dp", "region"))
        dp_only = init_device_mesh("cpu", (4, 1), mesh_dim_names=("dp", "region"))
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lbi, idx, tgt = _gpt()
            res["exact"] = {str(dt): _exact(lbi, idx, tgt, mesh, dt)
                            for dt in (torch.float64, torch.float32)}
            res["exact_mb"] = {ex: _exact(lbi, idx, tgt, mesh, torch.float64, microbatches=2,
                                          exchange=ex) for ex in ("relay", "allgather")}
            # gradient accumulation: 3 steps without zero_grad, on the mesh, on a plain
            # group of 2 region ranks (K = 3: one rank runs two regions), and 2 steps on a
            # 4 x 1 mesh (one region rank: the prologue's parameters are dp-averaged)
            batches = _batches(3)
            res["accum"] = dict(mesh=_accumulated(lbi, batches, mesh=mesh),
                                plain=_accumulated(lbi, batches, group=pairs[rank // 2]),
                                dp_only=_accumulated(lbi, batches[:2], mesh=dp_only))
            # replicas fed different shard sizes: the mean would be wrong, so every rank refuses
            rp = RegionParallel(copy.deepcopy(lbi), mesh=mesh, timeout=30)
            rows = 2 if rp.dp_rank == 0 else 1
            res["unequal"] = _error(lambda: rp.step((idx[:rows],), ce(tgt[:rows])))
            comm = Comm()
            res["bad"] = dict(
                names=_error(lambda: RegionParallel(copy.deepcopy(lbi), mesh=misnamed, comm=comm)),
                wide=_error(lambda: RegionParallel(copy.deepcopy(lbi), mesh=too_wide, comm=comm)),
                both=_error(lambda: RegionParallel(copy.deepcopy(lbi), pairs[rank // 2], mesh=mesh, comm=comm)),
                records=len(comm.records))
            rp = RegionParallel(copy.deepcopy(lbi), mesh=mesh, timeout=TIMEOUT)
            res["bad"]["split"] = _error(lambda: shard_batch(torch.zeros(3, L), rp))
            if rank < 2:  # ranks 0, 1: the last region ignores m_{K-1}; then check_finite=True
                res["ignored"] = _ignored_interface(pairs[0])
                nan_lbi, x = _chain(3, nan_in=1, check_finite=True)
                rp_nan = RegionParallel(nan_lbi, pairs[0], timeout=TIMEOUT)
                res["nan"] = _error(lambda: rp_nan.step((x,), lambda o: o.pow(2).mean()))
            else:  # ranks 2, 3: rank 3's loss hangs (alive, never reaches the next collective)
                stuck_lbi, x = _chain(2)
                rp_stuck = RegionParallel(stuck_lbi, pairs[1], timeout=TIMEOUT)

                def hang(o):
                    t0 = time.monotonic()
                    while not store.check(["test/released"]) and time.monotonic() - t0 < 20:
                        time.sleep(0.05)
                    return o.pow(2).mean()

                res["stuck"] = _error(lambda: rp_stuck.step((x,), hang if rank == 3 else
                                                            (lambda o: o.pow(2).mean())))
                if rank == 2:
                    store.set("test/released", "1")
            # last: rank 3's loss raises; the default group is unusable afterwards
            my_idx, my_tgt = shard_batch((idx, tgt), rp)
            _store_barrier(store, "test/before_failure")  # time the step alone

            def boom(out):
                raise RuntimeError("loss exploded on purpose")

            res["failed"] = _error(lambda: rp.step((my_idx,), boom if rank == 3 else ce(my_tgt)))
    except Exception:  # noqa: BLE001 - reported to the test
        res["crash"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    # the failed rank stays alive until its peers are done; rank 0 serves the store
    _store_barrier(store, "test/done")
    if rank == 0:  # the others stop reading the store before it goes away with rank 0
        _store_barrier(store, "test/left")
    else:
        store.add("test/left", 1)
    os._exit(0)


def _store_barrier(store, key: str) -> None:
    """Wait (at most 30 s) until all 4 ranks added to ``key``: no process group needed."""
    store.add(key, 1)
    t0 = time.monotonic()
    while store.add(key, 0) < 4 and time.monotonic() - t0 < 30:
        time.sleep(0.01)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from lbi_fx.distributed import free_port

    tmp = tmp_path_factory.mktemp("mesh")
    mp.spawn(_worker, args=(free_port(), str(tmp)), nprocs=4)
    out = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(4)]
    for r, res in enumerate(out):
        assert "crash" not in res, (r, res["crash"])
    return out


def test_mesh_2x2_gradients_equal_full_batch_autograd(ranks):
    for rank, res in enumerate(ranks):
        for dtype, tol in (("torch.float64", 1e-10), ("torch.float32", 1e-6)):
            r = res["exact"][dtype]
            assert r["pool"] == "causal"
            assert r["shard"] == [B // 2, L]
            assert r["rel"] <= tol, (rank, dtype, r["rel"])
            assert abs(r["loss"] - r["ref_loss"]) <= tol * abs(r["ref_loss"]), (rank, dtype, r)
            assert r["have"] == r["used"], (rank, dtype)
            # one bucket (one dtype) of the rank's region parameters; region rank 0 also
            # averages m_0's encoder (a prologue parameter only it uses) after the prologue
            assert r["dp_bytes"] > 0 and r["dp_calls"] == (2 if rank % 2 == 0 else 1), r
    for dtype in ("torch.float64", "torch.float32"):  # the region ranks cover every parameter
        assert sorted({n for res in ranks[:2] for n in res["exact"][dtype]["used"]}) == \
            ranks[0]["exact"][dtype]["covered"]


def test_mesh_2x2_micro_batches_equal_full_batch_autograd(ranks):
    """2 micro-batches per dp shard, both exchanges: still the full-batch gradient."""
    for rank, res in enumerate(ranks):
        for ex, r in res["exact_mb"].items():
            assert r["rel"] <= 1e-10, (rank, ex, r["rel"])
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-10 * abs(r["ref_loss"]), (rank, ex)
            assert r["have"] == r["used"], (rank, ex)


def test_unequal_dp_shards_are_refused_on_every_rank(ranks):
    for res in ranks:
        e = res["unequal"]
        assert e["type"] == "InputError" and "different batch sizes" in e["msg"], e


def test_bad_meshes_are_refused_by_name_before_any_collective(ranks):
    for res in ranks:
        bad = res["bad"]
        assert bad["records"] == 0
        for key, pattern in (("names", "dims are named ('data', 'region')"),
                             ("wide", "'region' has 4 ranks but the model has 3 regions"),
                             ("both", "both group= and mesh="),
                             ("split", "does not split over dp=2")):
            assert bad[key]["type"] == "InputError" and pattern in bad[key]["msg"], (key, bad[key])


def test_accumulated_steps_equal_summed_autograd_on_mesh_and_plain_group(ranks):
    """Steps without zero_grad: every .grad is the sum of the steps' backwards, on the
    2 x 2 mesh, on a plain group of 2 and on a 4 x 1 mesh; one all-reduce per step and
    kind."""
    for rank, res in enumerate(ranks):
        for kind in ("mesh", "plain", "dp_only"):
            r = res["accum"][kind]
            assert r["rel"] <= 1e-10 and r["worst"][1] <= 1e-10, (rank, kind, r["rel"], r["worst"])
            assert r["have"] == r["used"], (rank, kind)
            assert r["calls"]["grad_allreduce"] == r["steps"], (rank, kind, r["calls"])
            # dp x 1: all in one bucket; on the mesh region rank 0 has a second one, for
            # m_0's encoder (a prologue parameter only it uses, final after the prologue)
            per_step = 2 if rank % 2 == 0 else 1
            dp_calls = r["steps"] * per_step if kind == "mesh" else 0
            assert r["calls"]["dp_allreduce"] == dp_calls, (rank, kind, r["calls"])


def test_last_region_ignoring_its_interface_is_exact_under_region_parallel(ranks):
    for step in ("step0", "step1"):  # step1: accumulated without zero_grad
        nones = 0
        for rank in (0, 1):
            for name, err in ranks[rank]["ignored"][step].items():
                assert err == "none" or (err != "mismatch" and err <= 1e-12), \
                    (rank, step, name, err)
                nones += err == "none"
        assert nones > 0  # the regions before the last get no gradient at all


def test_check_finite_raises_under_region_parallel_and_ends_the_peer(ranks):
    culprit, peer = ranks[0]["nan"], ranks[1]["nan"]
    assert culprit["type"] == "NonFiniteError" and "J_1 of region 1" in culprit["msg"], culprit
    assert peer["type"] == "PeerFailedError" and peer["lbi"], peer
    assert (peer["rank"], peer["phase"], peer["regions"]) == (0, "jacobian", [0, 1]), peer
    assert "NonFiniteError" in peer["msg"] and peer["s"] < TIMEOUT, peer


def test_stuck_rank_times_out_its_peer_naming_it(ranks):
    waiter, stuck = ranks[2]["stuck"], ranks[3]["stuck"]
    assert waiter["type"] == "DistributedTimeout" and waiter["lbi"], waiter
    assert waiter["rank"] == 3, waiter
    assert "rank 3 (regions [1]; last seen in step 1 phase 'epilogue')" in waiter["msg"], waiter
    assert TIMEOUT <= waiter["s"] < TIMEOUT + 2, waiter
    assert stuck["type"] == "DistributedTimeout" and stuck["rank"] == 3, stuck
    assert stuck["regions"] == [1] and "rank 3 (regions [1]) did not arrive" in stuck["msg"]


def test_failed_but_alive_rank_ends_every_peer_within_the_timeout(ranks):
    assert ranks[3]["failed"]["type"] == "RuntimeError"
    for rank in range(3):
        e = ranks[rank]["failed"]
        assert e["type"] == "PeerFailedError" and e["lbi"], (rank, e)
        assert (e["rank"], e["phase"], e["regions"]) == (3, "epilogue", [2]), (rank, e)
        assert "loss exploded on purpose" in e["msg"] and "rank 3 (regions [2]" in e["msg"]
        assert e["s"] < TIMEOUT, (rank, e)
