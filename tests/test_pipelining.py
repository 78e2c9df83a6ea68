"""torch.distributed.pipelining's GPipe and 1F1B over GPT (lbi_fx.pipelining) on a real
2-rank gloo group: exact gradients, accumulation across steps, and byte records that
match what crosses the rank boundary. One spawn for the whole module; the workers run
every configuration and write what they saw, the tests read it."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD, B, L, D, V, ES = 2, 8, 16, 32, 256, 8  # fp64: 8 bytes an element
# (schedule, microbatches, layers, regions); 1f1b needs microbatches >= stages
CONFIGS = [(s, m, n, regions)
           for n, regions in ((4, [[0, 1], [2, 3]]), (6, [[0, 1], [2, 3], [4, 5]]))
           for s in ("gpipe", "1f1b") for m in (1, 2, 4) if not (s == "1f1b" and m < WORLD)]


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _model(n_layer: int):
    from lbi_fx.models.transformer import build

    model, (idx,) = build(n_layer=n_layer, n_embd=D, n_head=2, block_size=L, batch=B, seq=L,
                          seed=3)
    target = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(4))
    return model.double(), idx, target


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    n = float(ref.norm())
    return float((got - ref).norm()) / n if n > 0 else float(got.norm())


def _run(runner, model, idx, target, ref_model) -> dict:
    """Two steps without zero_grad against single-process autograd on the full batch
    (``ref_model``: an equal copy; the runner's rank holds only its stage of ``model``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = list(dict.fromkeys(model.parameters()))
    ref_named = dict(ref_model.named_parameters())
    ref_loss = loss_fn(ref_model(idx), target)
    ref = torch.autograd.grad(ref_loss, [ref_named[names[id(p)]] for p in params])
    ref_loss = float(ref_loss.detach())
    res: dict = {"stage": sorted(names[id(p)] for p in runner.params),
                 "shared": sorted(names[id(p)] for p in runner.shared),
                 "shared_numel": sum(p.numel() for p in runner.shared),
                "held": sorted(runner.held),
                "held_fraction": runner.held_bytes() / sum(
                    p.numel() * p.element_size() for p in ref_model.parameters())}
    for s in (1, 2):
        n0 = len(runner.comm.records)
        loss = runner.step(idx, target)
        res[f"loss_err{s}"] = abs(loss - ref_loss)
        res[f"rel{s}"] = max(_rel(p.grad, s * g) for p, g in zip(params, ref)
                             if p.grad is not None)
        res[f"have{s}"] = sorted(names[id(p)] for p in params if p.grad is not None)
        res[f"shapes{s}"] = [(r.phase, list(r.shape)) for r in runner.comm.records[n0:]
                             if r.phase.startswith("pipe_")]
        res[f"totals{s}"] = runner.comm.totals()  # collective: the group's bytes so far
        res["timings"] = runner.timings
    res["send_restored"] = dist.send is dist.distributed_c10d.send
    return res


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    port = int(Path(out, "port").read_text())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    import lbi_fx
    from lbi_fx.pipelining import PipelineRunner

    result: dict = {}
    for sched, m, n_layer, regions in CONFIGS:
        model, idx, target = _model(n_layer)
        runner = PipelineRunner(model, regions, schedule=sched, microbatches=m,
                                loss_fn=loss_fn)
        result[f"{sched}/{m}/{len(regions)}"] = _run(runner, model, idx, target,
                                                     _model(n_layer)[0])
    # a one-rank group per rank: one stage that is first and last, no communication
    solo = [dist.new_group([r]) for r in range(WORLD)]
    for sched in ("gpipe", "1f1b"):
        model, idx, target = _model(4)
        runner = PipelineRunner(model, [[0, 1], [2, 3]], solo[rank], schedule=sched,
                                microbatches=2, loss_fn=loss_fn)
        result[f"solo/{sched}"] = _run(runner, model, idx, target, _model(4)[0])
    errors = {}
    model, idx, target = _model(4)
    for name, kw in (("1f1b_few", dict(schedule="1f1b", microbatches=1)),
                     ("uneven", dict(schedule="gpipe", microbatches=3))):
        try:
            PipelineRunner(model, [[0, 1], [2, 3]], loss_fn=loss_fn, **kw).step(idx, target)
        except lbi_fx.InputError as exc:
            errors[name] = str(exc)
    result["errors"] = errors
    dist.barrier()
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    from lbi_fx.distributed import free_port

    out = tmp_path_factory.mktemp("pipelining")
    Path(out, "port").write_text(str(free_port()))
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("sched,m,n_layer,regions", CONFIGS)
def test_gradients_and_loss_match_single_process_autograd(ranks, sched, m, n_layer, regions):
    for rank, res in enumerate(ranks):
        r = res[f"{sched}/{m}/{len(regions)}"]
        for s in (1, 2):  # step 2 without zero_grad: twice the gradient
            assert r[f"rel{s}"] <= 1e-10, (rank, s, r[f"rel{s}"])
            assert r[f"loss_err{s}"] <= 1e-12, (rank, s, r[f"loss_err{s}"])
            # gradients exactly where this rank's stage computes (plus the shared sum)
            assert r[f"have{s}"] == sorted(set(r["stage"]) | set(r["shared"]))
        assert r["shared"] == ["wte.weight"]  # the tied head, on the first and last stage
        # each rank holds its stage alone (the rest of the model is on the meta device)
        assert set(r["stage"]) <= set(r["held"])
        blocks = {int(n.split(".")[1]) for n in r["held"] if n.startswith("layers.")}
        stage_blocks = {int(n.split(".")[1]) for n in r["stage"] if n.startswith("layers.")}
        assert blocks == stage_blocks, (rank, blocks, stage_blocks)
        assert r["held_fraction"] <= 0.75, (rank, r["held_fraction"])
        assert r["timings"]["step"] > 0
        assert r["send_restored"]


@pytest.mark.parametrize("sched,m,n_layer,regions", CONFIGS)
def test_bytes_are_what_crosses_the_boundary(ranks, sched, m, n_layer, regions):
    r0, r1 = (res[f"{sched}/{m}/{len(regions)}"] for res in ranks)
    act = (B // m) * L * D * ES  # one micro-batch's (B/M, L, D) activation
    boundaries = WORLD - 1
    shared = (r0["shared_numel"] + len(r0["shared"])) * ES  # + one has-grad flag each
    for s in (1, 2):
        t = r0[f"totals{s}"]
        assert t == r1[f"totals{s}"]
        assert t["pipe_forward_act"] == s * m * act * boundaries
        assert t["pipe_backward_grad"] == s * m * act * boundaries
        assert t["grad_allreduce"] == s * shared
        assert t["loss"] == s * ES
        # the warm-up vote: one int32 each way per boundary, on the first step only
        assert t["pipe_meta"] == 2 * 4 * boundaries
    # each micro-batch's activation leaves rank 0 once, its gradient leaves rank 1 once
    assert r0["shapes2"] == [["pipe_forward_act", [B // m, L, D]]] * m
    assert r1["shapes2"] == [["pipe_backward_grad", [B // m, L, D]]] * m


def test_one_rank_group_runs_the_schedule_without_communication(ranks):
    for res in ranks:
        for sched in ("gpipe", "1f1b"):
            r = res[f"solo/{sched}"]
            assert r["rel1"] <= 1e-10 and r["rel2"] <= 1e-10, (sched, r["rel1"], r["rel2"])
            assert r["loss_err1"] <= 1e-12
            assert r["shared"] == []
            assert not any(k.startswith("pipe_") or k in ("grad_allreduce", "loss")
                           for k in r["totals2"])


def test_refusals_inside_a_group(ranks):
    for res in ranks:
        e = res["errors"]
        assert "batch of 8" in e["uneven"] and "microbatches=3" in e["uneven"], e
        assert "microbatches >= 2" in e["1f1b_few"] and "gpipe" in e["1f1b_few"], e


@pytest.mark.parametrize("kw,match", [
    (dict(schedule="zb"), r"unknown pipeline schedule 'zb'.*'gpipe', '1f1b'"),
    (dict(microbatches=0), r"microbatches=0"),
    (dict(regions=[[0, 1], [3]]), r"cover the model's 4 layers"),
    (dict(regions=[[0, 9]]), r"region entry 9"),
])
def test_refusals_before_any_collective(kw, match):
    """No process group exists in the test process: these are refused before one is used."""
    import lbi_fx
    from lbi_fx.pipelining import PipelineRunner

    model, _, _ = _model(4)
    kw = {"regions": [[0, 1], [2, 3]], **kw}
    with pytest.raises(lbi_fx.InputError, match=match):
        PipelineRunner(model, kw.pop("regions"), loss_fn=loss_fn, **kw)


def test_send_counter_restores_on_error():
    from lbi_fx.distributed import Comm
    from lbi_fx.pipelining import _count_plain_sends

    orig = dist.send
    with pytest.raises(ValueError), _count_plain_sends(Comm(), "pipe_meta"):
        assert dist.send is not orig
        raise ValueError
    assert dist.send is orig
