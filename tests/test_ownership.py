"""Region parallelism divides memory (issue #34): each rank holds only the tensors of the
programs it runs, a model built on the meta device is never materialised whole, and the
gradients are still those of single-process autograd on the same values."""

from __future__ import annotations

import json
import math
import sys
import traceback
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

B, L = 2, 8


def _gpt(width: int = 32, n_layer: int = 6, meta: bool = False, tie: bool = False):
    from lbi_fx.models.transformer import GPT, GPTConfig

    cfg = GPTConfig(block_size=L, n_layer=n_layer, n_head=2, n_embd=width, tie_weights=tie)
    if meta:
        with torch.device("meta"):
            return GPT(cfg)
    torch.manual_seed(3)
    return GPT(cfg)


def _transform(model, canvas_weights="per_region", jacobian="reuse", **kw):
    import lbi_fx

    idx = torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)  # interface modules of a materialised model: the global RNG
        lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=4, example_inputs=(idx,),
                               jacobian=jacobian, pool="causal", canvas_weights=canvas_weights,
                               **kw)
    return lbi, idx


def _loss(out):
    return out.float().pow(2).mean() if out.dtype != torch.float64 else out.pow(2).mean()


def _bytes(tensors) -> int:
    seen = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _spawn(fn, world: int, out: Path, *args) -> None:
    from lbi_fx.distributed import free_port

    try:
        mp.spawn(_worker, args=(world, free_port(), str(out), fn, *args), nprocs=world)
    finally:
        errs = sorted(out.glob("err*"))
        assert not errs, "\n".join(e.read_text() for e in errs)


def _worker(rank: int, world: int, port: int, out: str, fn: str, *args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        res = globals()[fn](rank, world, *args)
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
        dist.barrier()
    except BaseException:
        Path(out, f"err{rank}").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


# -- a materialised model: each rank keeps its share ------------------------------------

def _share(rank: int, world: int, canvas_weights: str, jacobian: str) -> dict:
    from lbi_fx.distributed import RegionParallel

    lbi, idx = _transform(_gpt(), canvas_weights, jacobian)
    lbi.double()
    whole = _bytes(lbi.parameters())
    all_names = sorted(n for n, _ in lbi.named_parameters())
    lbi.backward = "autograd"
    params = dict(lbi.named_parameters())
    ref = dict(zip(params, torch.autograd.grad(_loss(lbi(idx)), list(params.values()),
                                               allow_unused=True)))
    lbi.backward = "scan"
    rp = RegionParallel(lbi)
    rp.step((idx,), _loss)
    mine = dict(rp.named_parameters())
    with_grad = sorted(n for n, p in rp.lbi.named_parameters() if p.grad is not None)
    errs = {n: float((p.grad - ref[n]).norm() / ref[n].norm()) for n, p in mine.items()
            if p.grad is not None and ref[n] is not None and float(ref[n].norm()) > 0}
    return dict(
        fraction=rp.held_bytes() / whole, params_fraction=_bytes(mine.values()) / whole,
        names=sorted(mine), with_grad=with_grad, all=all_names, worst=max(errs.values()),
        no_grad=sorted(n for n, p in mine.items() if p.grad is None),
        meta_devices=sorted({t.device.type for t in rp.lbi.parameters()}),
        blocks=sorted({int(n.split(".")[1]) for n in mine if n.startswith("layers.")}))


@pytest.fixture(scope="module")
def shares(tmp_path_factory):
    out = {}
    for cw, jac in SHARES:
        d = tmp_path_factory.mktemp(cw)
        _spawn("_share", 3, d, cw, jac)
        out[cw, jac] = [json.loads((d / f"rank{r}.json").read_text()) for r in range(3)]
    return out


# jacobian="recompute": the last rank's epilogue reads outputs of a region run without its
# graph (once silently no gradient at all under RegionParallel)
SHARES = [("per_region", "reuse"), ("shared", "reuse"), ("per_region", "recompute")]


@pytest.mark.parametrize("canvas_weights,jacobian", SHARES)
def test_each_rank_holds_only_what_it_runs(shares, canvas_weights, jacobian):
    """GPT, untied head, 6 blocks in 3 regions over 3 ranks: each rank holds <= 0.55 of the
    module's parameter bytes, trains exactly the parameters named_parameters() yields, with
    fp64 gradients of single-process autograd; together the ranks hold the whole model."""
    res = shares[canvas_weights, jacobian]
    union = set()
    for rank, r in enumerate(res):
        assert r["fraction"] <= 0.55, (rank, r["fraction"])
        assert r["names"] == r["with_grad"], rank  # what it yields is what it trains
        assert not r["no_grad"], (rank, r["no_grad"])
        assert r["worst"] <= 1e-10, (rank, r["worst"])
        assert r["blocks"] == [2 * rank, 2 * rank + 1], (rank, r["blocks"])
        assert "meta" in r["meta_devices"]  # released, not merely left without gradients
        union |= set(r["names"])
    assert union == set(res[0]["all"])


# -- a model built on the meta device: never whole ---------------------------------------

def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process (Linux /proc)."""
    status = Path("/proc/self/status").read_text()
    get = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
           if line.startswith(("VmRSS", "VmHWM"))}
    return get["VmRSS"], get["VmHWM"]


def _from_meta(rank: int, world: int, width: int, out: str) -> dict:
    from lbi_fx.distributed import RegionParallel

    _transform(_gpt(width=16, meta=True))  # loads the code transform runs (not the model's)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current
    before, _ = _rss()
    model = _gpt(width=width, meta=True)
    lbi, idx = _transform(model)
    rp = RegionParallel(lbi)
    rp.to_empty(device="cpu")
    rp.init_weights(seed=7)
    _, peak = _rss()
    rp.step((idx,), _loss)
    torch.save({n: p.grad for n, p in rp.named_parameters()}, Path(out, f"grads{rank}.pt"))
    whole = sum(math.prod(p.shape) * 4 for p in _gpt(width=width, meta=True).parameters())
    return dict(growth=peak - before, whole=whole, held=rp.held_bytes())


def test_meta_model_is_never_whole_and_trains_exactly(tmp_path):
    """A GPT of width 1024 built under torch.device("meta"): through transform,
    RegionParallel, to_empty and init_weights each rank's peak RSS grows by <= 0.5x the
    model's parameter bytes (measured from after a warm-up transform of a tiny model, so
    that loading lbi-fx's and torch's code does not count), and its fp32 gradients equal
    single-process autograd on the same values (the whole model materialised here with
    the same seeds)."""
    from lbi_fx.distributed.ownership import init_weights, materialize, named_tensors

    width = 1024
    _spawn("_from_meta", 3, tmp_path, width, str(tmp_path))
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for rank, r in enumerate(res):
        assert r["growth"] <= 0.5 * r["whole"], (rank, r["growth"] / r["whole"])
        assert r["held"] <= 0.5 * r["whole"], (rank, r["held"] / r["whole"])
    # the reference: the same meta model, materialised whole, the same init
    lbi, idx = _transform(_gpt(width=width, meta=True))
    materialize(lbi, set(named_tensors(lbi)), "cpu")
    assert init_weights(lbi, 7, origin=lbi.canvas_origin) == []
    lbi.backward = "autograd"
    torch.set_num_threads(1)
    params = dict(lbi.named_parameters())
    ref = dict(zip(params, torch.autograd.grad(_loss(lbi(idx)), list(params.values()),
                                               allow_unused=True)))
    seen = set()
    for rank in range(3):
        for n, g in torch.load(tmp_path / f"grads{rank}.pt").items():
            rel = float((g - ref[n]).norm() / ref[n].norm().clamp_min(1e-30))
            assert rel <= 2e-4, (rank, n, rel)
            seen.add(n)
    assert seen == {n for n, p in params.items() if ref[n] is not None}


# -- single-process facts (no process group) --------------------------------------------

def test_transform_of_a_meta_model_allocates_nothing():
    lbi, _ = _transform(_gpt(meta=True), decoder_at="every")
    devices = {t.device.type for t in (*lbi.parameters(), *lbi.buffers())}
    assert devices == {"meta"}
    assert lbi.pool == "causal" and lbi.unprobed  # value probes did not run, and it says so
    assert "meta device" in str(lbi.explain())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_init_weights_do_not_depend_on_the_world_size(world):
    """Each rank initialises only what it holds; the union over ranks equals one process's
    initialisation, canvas copies start equal to the module they copy, and lbi-fx's
    zero-initialised decoders are zero."""
    from lbi_fx.distributed.mesh import placement
    from lbi_fx.distributed.ownership import (
        holders,
        init_weights,
        materialize,
        named_tensors,
    )

    def fresh():
        lbi, _ = _transform(_gpt(meta=True), decoder_init="zero")
        return lbi

    whole = fresh()
    materialize(whole, set(named_tensors(whole)), "cpu")
    assert init_weights(whole, 11, origin=whole.canvas_origin) == []
    ref = named_tensors(whole)
    assert torch.equal(ref["wte.weight"], ref["lbi_canvas.region_2.wte.weight"])
    # each module its own stream: two blocks of one shape do not start equal
    assert not torch.equal(ref["layers.0.mlp.c_fc.weight"], ref["layers.1.mlp.c_fc.weight"])
    dec = whole.get_submodule("lbi.dec_1_0").net[-1]
    assert not dec.weight.any() and not dec.bias.any()
    place = placement(3, world)
    for j in range(world):
        lbi = fresh()
        mine = {n for n, h in holders(lbi, place).items() if j in h}
        materialize(lbi, mine, "cpu")
        init_weights(lbi, 11, origin=lbi.canvas_origin, only=mine)
        got = named_tensors(lbi)
        for n in mine:
            assert torch.equal(got[n], ref[n]), (world, j, n)


def test_a_second_region_parallel_on_a_split_module_is_refused():
    """RegionParallel keeps only its rank's share; another one on the same module (another
    placement) would run regions whose weights are gone: refused, naming a tensor."""
    import os

    import lbi_fx
    from lbi_fx.distributed import RegionParallel, free_port
    from lbi_fx.distributed.ownership import named_tensors, release

    lbi, idx = _transform(_gpt(n_layer=4))
    release(lbi, {n for n in named_tensors(lbi) if not n.startswith("layers.1.")})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(lbi_fx.InputError, match=r"'layers\.1\..*split by another"):
            RegionParallel(lbi)
    finally:
        dist.destroy_process_group()


def test_step_before_to_empty_is_refused():
    import os

    import lbi_fx
    from lbi_fx.distributed import RegionParallel, free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        lbi, idx = _transform(_gpt(n_layer=4, meta=True))
        rp = RegionParallel(lbi)
        with pytest.raises(lbi_fx.InputError, match=r"meta device: call rp\.to_empty"):
            rp.step((idx,), _loss)
        rp.to_empty(device="cpu").init_weights()
        assert math.isfinite(rp.step((idx,), _loss))
        assert not [n for n, p in rp.named_parameters() if p.grad is None]
    finally:
        dist.destroy_process_group()


def test_bench_memory_divides_what_a_rank_holds(capsys):
    """``lbi-fx bench memory`` on a tiny GPT: a region rank and a pipeline stage each hold
    and grow less than the single process, and the expected bytes follow the held ones."""
    from lbi_fx.bench import memory

    assert memory.main(["--width", "64", "--heads", "2", "--layers", "4", "--ranks", "2",
                        "--steps", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = res["rows"]
    single = next(r for r in rows if r["kind"] == "single")
    assert single["error"] is None and single["held"] >= res["whole_bytes"]
    for kind in ("lbi", "pipeline-gpipe"):
        mine = [r for r in rows if r["kind"] == kind]
        assert len(mine) == 2 and all(r["error"] is None for r in mine), mine
        assert all(r["held"] < 0.75 * single["held"] for r in mine), mine
        assert all(r["expected"] == r["held"] + 3 * r["params"] for r in mine)
        assert all(math.isfinite(r["loss"]) for r in mine)


def _save_then_load_into_meta(rank: int, world: int, out: str) -> dict:
    """A run saves after one AdamW step; a fresh model built on the meta device, split and
    allocated (never initialised), loads the checkpoint: each rank reads its own shards."""
    from lbi_fx import checkpoint
    from lbi_fx.distributed import RegionParallel

    lbi, idx = _transform(_gpt(n_layer=4))
    rp = RegionParallel(lbi)
    opt = torch.optim.AdamW(rp.parameters(), lr=1e-2)
    rp.step((idx,), _loss)
    opt.step()
    checkpoint.save(Path(out) / "ckpt", rp, opt)
    saved = {n: p.detach().clone() for n, p in rp.named_parameters()}
    fresh = RegionParallel(_transform(_gpt(n_layer=4, meta=True))[0]).to_empty(device="cpu")
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    checkpoint.load(Path(out) / "ckpt", fresh, opt2)
    got = dict(fresh.named_parameters())
    return dict(same=sorted(got) == sorted(saved),
                equal=all(torch.equal(got[n], saved[n]) for n in saved),
                adam=sum(len(s) for s in opt2.state.values()), n=len(saved))


def test_checkpoint_fills_a_meta_built_share(tmp_path):
    _spawn("_save_then_load_into_meta", 2, tmp_path, str(tmp_path))
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["same"] and r["equal"], (rank, r)
        assert r["adam"] >= 2 * r["n"], (rank, r)  # exp_avg, exp_avg_sq (and step) restored


def test_a_meta_model_with_float_inputs_transforms_on_fake_tensors():
    """Real float inputs meet meta weights in the first Linear: only fake tensors run it."""
    from torch import nn

    import lbi_fx

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Blk() for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    with torch.device("meta"):
        model = Chain()
    lbi = lbi_fx.transform(model, [["blocks.0"], ["blocks.1"], ["blocks.2"]], rank=3,
                           example_inputs=(torch.randn(2, 6),))
    assert {t.device.type for t in lbi.parameters()} == {"meta"}
