"""Distributed checkpoints (lbi_fx.checkpoint) on loopback gloo groups: a run saved at step n
and resumed in fresh processes ends bitwise where the uninterrupted run ends, and a
checkpoint that does not fit the run is refused by name on every rank."""

from __future__ import annotations

import math
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_harness_strict import _lm  # K = 2, rank 4, seq 32: layout variants

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

B, L, D = 4, 8, 16  # B: the global batch, split over the dp replicas
N_FIRST, N_MORE = 2, 2  # steps before the checkpoint, steps after it
K = 4


def _model(K: int, dtype: torch.dtype, width: int = D):
    import lbi_fx
    from lbi_fx.models.transformer import build

    torch.manual_seed(0)  # interface modules draw from the global RNG: same model everywhere
    model, (idx,) = build(n_layer=K, n_embd=width, n_head=2, block_size=L, batch=B, seq=L,
                          seed=3, dropout=0.1)  # dropout: resuming must restore each rank's RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lbi_fx.CausalityWarning)
        lbi = lbi_fx.transform(model, regions=[[f"layers.{k}"] for k in range(K)], rank=4,
                               example_inputs=(idx,), jacobian="reuse", pool="mean")
    return lbi.to(dtype)


def _pristine(out: Path, K: int = K):
    """The model the test process built (``runs``): unpickling it is what building it in
    each process would give, without a transform per rank."""
    return torch.load(out / f"model{K}.pt", weights_only=False)


def _mesh(dp: int, region: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dp, region), mesh_dim_names=("dp", "region"))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (B, L + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def _run(lbi, group=None, mesh=None):
    """RegionParallel + AdamW on the parameters this rank updates, per-rank dropout streams."""
    from lbi_fx.distributed import RegionParallel

    rp = RegionParallel(lbi, group, mesh=mesh)
    opt = torch.optim.AdamW([p for n, p in lbi.named_parameters() if n in set(rp.used)],
                            lr=1e-2, weight_decay=0.1)
    torch.manual_seed(100 + dist.get_rank())
    return rp, opt


def _train(rp, opt, batches) -> list[float]:
    import torch.nn.functional as F

    from lbi_fx.distributed import shard_batch

    losses = []
    for batch in batches:
        x, y = shard_batch(batch, rp)  # this dp replica's rows

        def loss_fn(logits, y=y):
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

        opt.zero_grad(set_to_none=True)
        losses.append(rp.step((x,), loss_fn))
        opt.step()
    return losses


def _owned_params(rp) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in rp.lbi.named_parameters() if n in set(rp.used)}


def _worker(rank: int, world: int, port: int, out: str, name: str, *args) -> None:
    """Runs ``globals()[name](rank, world, out, *args)`` in a gloo group; a failure is also
    written to out/err<rank> so the test shows it."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        globals()[name](rank, world, Path(out), *args)
        dist.barrier()
    except BaseException:
        Path(out, f"err{rank}").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(name: str, world: int, out: Path, *args) -> None:
    from lbi_fx.distributed import free_port

    try:
        mp.spawn(_worker, args=(world, free_port(), str(out), name, *args), nprocs=world)
    finally:
        errs = sorted(out.glob("err*"))
        assert not errs, "\n".join(e.read_text() for e in errs)


# -- workers (module level: mp.spawn pickles them by name) --------------------------------

def _optim_by_name(rp, opt) -> dict[str, dict]:
    names = {id(p): n for n, p in rp.lbi.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}


def _uninterrupted_and_first_half(rank: int, world: int, out: Path) -> None:
    """2 x 2 mesh. Run A: n + m steps, never stopped. Run B: n steps, save, exit."""
    from lbi_fx import checkpoint

    mesh, batches = _mesh(2, 2), _batches(N_FIRST + N_MORE)
    rp, opt = _run(_pristine(out), mesh=mesh)
    _train(rp, opt, batches)
    torch.save(_owned_params(rp), out / f"A{rank}.pt")
    rp, opt = _run(_pristine(out), mesh=mesh)
    _train(rp, opt, batches[:N_FIRST])
    torch.save({"params": _owned_params(rp), "optim": _optim_by_name(rp, opt),
                "rng": torch.get_rng_state()}, out / f"B{rank}.pt")
    checkpoint.save(out / "ckpt", rp, opt, extra={"step": N_FIRST, "rank": rank})


def _resume_refuse_reshape(rank: int, world: int, out: Path) -> None:
    """Fresh processes. Run C (2 x 2 mesh): load, m steps. Loads that must be refused. Then
    ranks 0 and 1 alone, a plain group (dp = 1, the same two region ranks), load the 2 x 2
    checkpoint into a fresh model, record what they got and train on."""
    from lbi_fx import checkpoint
    from lbi_fx.errors import CheckpointError

    mesh = _mesh(2, 2)
    rp, opt = _run(_pristine(out), mesh=mesh)
    extra = checkpoint.load(out / "ckpt", rp, opt)
    assert extra == {"step": N_FIRST, "rank": rank}, extra
    _train(rp, opt, _batches(N_FIRST + N_MORE)[extra["step"]:])
    torch.save(_owned_params(rp), out / f"C{rank}.pt")

    msgs = {}
    for name, make in (("K", lambda: _run(_pristine(out, K + 1), mesh=mesh)),  # another model
                       ("missing", lambda: (rp, opt))):
        path = out / ("no_such_checkpoint" if name == "missing" else "ckpt")
        with pytest.raises(CheckpointError) as e:
            checkpoint.load(path, *make())
        msgs[name] = str(e.value)
    torch.save(msgs, out / f"refusals{rank}.pt")

    # the 2 x 2 checkpoint (2 region ranks) onto 4 region ranks, no dp: another placement
    rp4, opt4 = _run(_pristine(out))
    checkpoint.load(out / "ckpt", rp4, opt4)
    torch.save({"params": _owned_params(rp4), "optim": _optim_by_name(rp4, opt4),
                "held": sorted(rp4.held)}, out / f"moved{rank}.pt")

    pair = dist.new_group([0, 1])
    if rank < 2:
        rp, opt = _run(_pristine(out), group=pair)
        extra = checkpoint.load(out / "ckpt", rp, opt)
        got = {"params": _owned_params(rp), "optim": _optim_by_name(rp, opt),
               "rng": torch.get_rng_state(), "extra": extra}
        got["losses"] = _train(rp, opt, _batches(N_FIRST + N_MORE)[extra["step"]:])
        torch.save(got, out / f"dp1_{rank}.pt")


# -- tests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """K = 4, fp32, dropout on, global batch 4. Spawn 1 (2 x 2 mesh): runs A and B (A's final
    parameters, B's state and checkpoint at step N_FIRST). Spawn 2, fresh processes: run C,
    the refused loads, the load onto dp = 1."""
    out = tmp_path_factory.mktemp("ckpt")
    for k in (K, K + 1):
        torch.save(_model(k, torch.float32), out / f"model{k}.pt")
    _spawn("_uninterrupted_and_first_half", 4, out)
    _spawn("_resume_refuse_reshape", 4, out)
    return out


def test_resume_in_fresh_processes_is_bitwise(runs):
    for rank in range(4):
        a, c = torch.load(runs / f"A{rank}.pt"), torch.load(runs / f"C{rank}.pt")
        assert sorted(a) == sorted(c) and a, rank
        for n in a:
            assert torch.equal(a[n], c[n]), (rank, n, float((a[n] - c[n]).abs().max()))
    # each rank wrote its own shard: a region's tensors sit in a file of a rank that runs it
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(runs / "ckpt")).read_metadata()
    files = {}
    for idx, info in md.storage_data.items():
        files.setdefault(idx.fqn, set()).add(info.relative_path)
    assert sorted(p.name for p in runs.glob("ckpt/*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    for key, where in files.items():
        assert len(where) == 1, (key, where)  # written once, whatever the dp copies
        if key.startswith(("model.layers.", "optim.state.layers.")):
            k = int(key.split("layers.")[1].split(".")[0])
            writer = int(next(iter(where)).split("_")[2])  # __<rank>_0.distcp
            assert writer % 2 == k // 2, (key, where)  # mesh [[0, 1], [2, 3]]: region rank


def test_load_onto_other_dp_size(runs):
    """The 2 x 2 checkpoint onto 2 ranks without data parallelism: each rank gets exactly
    what region rank j of dp replica 0 saved (parameters, Adam state, RNG, extra)."""
    for j in range(2):
        got, saved = torch.load(runs / f"dp1_{j}.pt"), torch.load(runs / f"B{j}.pt")
        assert sorted(got["params"]) == sorted(saved["params"])
        for n, t in saved["params"].items():
            assert torch.equal(got["params"][n], t), n
        assert sorted(got["optim"]) == sorted(saved["optim"]) and got["optim"]
        for n, st in saved["optim"].items():
            for k, v in st.items():
                assert torch.equal(got["optim"][n][k], v), (n, k)
        assert torch.equal(got["rng"], saved["rng"])
        assert got["extra"] == {"step": N_FIRST, "rank": j}
        assert all(math.isfinite(v) for v in got["losses"]), got["losses"]


def test_mismatched_checkpoint_is_refused_by_name(runs):
    for rank in range(4):
        msgs = torch.load(runs / f"refusals{rank}.pt")
        assert "K: checkpoint has 4, this model 5" in msgs["K"], msgs["K"]
        assert "lbi_meta.json is missing" in msgs["missing"], msgs["missing"]


def test_load_at_another_number_of_region_ranks_is_bitwise(runs):
    """Saved over 2 region ranks (x 2 dp), loaded over 4: every rank holds only its own
    regions, each parameter and Adam state bitwise what dp replica 0 saved."""
    saved = {"params": {}, "optim": {}}
    for j in range(2):  # dp replica 0 of the 2 x 2 mesh: global ranks 0 and 1
        b = torch.load(runs / f"B{j}.pt")
        saved["params"].update(b["params"])
        saved["optim"].update(b["optim"])
    seen = set()
    for rank in range(4):
        got = torch.load(runs / f"moved{rank}.pt")
        assert got["params"], rank
        for n, t in got["params"].items():
            assert torch.equal(t, saved["params"][n]), (rank, n)
            seen.add(n)
        for n, st in got["optim"].items():
            for k, v in st.items():
                assert torch.equal(v, saved["optim"][n][k]), (rank, n, k)
        # region k's blocks live on rank k alone
        blocks = {int(n.split(".")[1]) for n in got["held"] if n.startswith("layers.")}
        assert blocks == {rank}, (rank, blocks)
    assert seen == set(saved["params"])


def test_other_model_same_k_is_refused_naming_the_tensor(runs):
    """Same K and placement, wider model: the check runs before any collective, so a
    single process shows it (region rank 0's view)."""
    from types import SimpleNamespace

    from lbi_fx import checkpoint
    from lbi_fx.distributed import placement
    from lbi_fx.errors import CheckpointError

    lbi = _model(K, torch.float32, width=2 * D)
    rp = SimpleNamespace(lbi=lbi, place=placement(K, 2), rank=0, used=[], comm=None)
    opt = torch.optim.AdamW(lbi.parameters())
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.c_attn\.bias': checkpoint "
                       r"has shape \(48,\) float32, this model \(96,\) float32"):
        checkpoint.load(runs / "ckpt", rp, opt)


# -- one process: a world-1 gloo group, no spawn -------------------------------------------

@pytest.fixture(scope="module")
def world1():
    """checkpoint.save/load are collectives; in one process a world-1 gloo group serves."""
    from lbi_fx.distributed import free_port

    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()




def _one(lbi, groups: int = 1):
    """RegionParallel over the world-1 group, AdamW in one group or decay / no-decay."""
    from lbi_fx.distributed import RegionParallel

    rp = RegionParallel(lbi)
    ps = list(lbi.parameters())
    if groups == 1:
        return rp, torch.optim.AdamW(ps, lr=1e-2)
    return rp, torch.optim.AdamW([{"params": [p for p in ps if p.dim() >= 2]},
                                  {"params": [p for p in ps if p.dim() < 2],
                                   "weight_decay": 0.0}], lr=1e-2)


@pytest.fixture(scope="module")
def causal16(world1, tmp_path_factory):
    """A checkpoint of a pool="causal", segment_len=16 model, after one AdamW step."""
    from lbi_fx import checkpoint

    path = tmp_path_factory.mktemp("causal16")
    lbi = _lm(pool="causal", segment_len=16)
    rp, opt = _one(lbi)
    lbi(torch.randint(0, 256, (2, 32))).logsumexp(-1).mean().backward()
    opt.step()
    checkpoint.save(path, rp, opt, extra={"step": 1})
    return path, {n: p.detach().clone() for n, p in lbi.named_parameters()}


def test_one_process_checkpoint_round_trip(causal16):
    from lbi_fx import checkpoint

    path, saved = causal16
    lbi = _lm(pool="causal", segment_len=16)
    assert checkpoint.load(path, *_one(lbi)) == {"step": 1}
    for n, p in lbi.named_parameters():
        assert torch.equal(p, saved[n]), n


@pytest.mark.parametrize("kw, groups, message", [
    (dict(pool="causal", segment_len=8), 1, "segment layout: checkpoint has 2 segments of 16 "
     "positions, max_len 32, this model 4 segments of 8 positions, max_len 32"),
    (dict(pool="causal", segment_len=17), 1, "segment layout: checkpoint has 2 segments of "
     "16 positions, max_len 32, this model 2 segments of 17 positions"),  # same widths too
    (dict(pool="mean"), 1, "pool: checkpoint has 'causal', this model 'mean'"),
    (dict(pool="causal", segment_len=16, encoder="linear"), 1,
     "encoder kind: checkpoint has 'mlp', this model 'linear'"),
    (dict(pool="causal", segment_len=16), 2, r"optimizer param groups \(dp replica 0, region "
     r"rank 0\): checkpoint has 1 group\(s\) of sizes \[\d+\].*this optimizer 2 group\(s\)"),
], ids=["segment_len", "segment_len_same_width", "pool", "encoder", "param_groups"])
def test_checkpoint_of_another_layout_is_refused_by_field(causal16, kw, groups, message):
    """Same tensor names and shapes (but the encoder's), other meaning: refused before any
    collective, naming the field and both values."""
    from lbi_fx import checkpoint
    from lbi_fx.errors import CheckpointError

    lbi = _lm(**kw)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(causal16[0], *_one(lbi, groups))


def test_format_1_checkpoint_loads_with_a_warning(causal16, tmp_path):
    """Checkpoints written before the layout record (format 1) still load, and say what
    went unchecked."""
    import json
    import shutil

    from lbi_fx import checkpoint

    old = tmp_path / "old"
    shutil.copytree(causal16[0], old)
    meta = json.loads((old / "lbi_meta.json").read_text())
    meta["format"] = 1
    del meta["layout"], meta["optim_groups"]
    (old / "lbi_meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="predates layout records"):
        assert checkpoint.load(old, *_one(_lm(pool="causal", segment_len=16))) == {"step": 1}
