"""Distributed checkpoints of a :class:`~lbi_fx.distributed.RegionParallel` run.

Built on ``torch.distributed.checkpoint`` (DCP): every rank hands DCP only what it holds
authoritatively and DCP writes one shard file per rank; nothing is gathered on rank 0.

What a rank holds authoritatively: the parameters it updates (``rp.used``: its regions,
their interface modules, the prologue, and on the last region rank the epilogue), the
buffers of the programs it runs, and anything no rank updates. Parameters of other ranks'
regions are stale copies on this rank, so they are never written from here. Items several
ranks hold (the prologue, a tied head, every dp replica's copy) are bitwise identical after
the gradient all-reduce, and DCP's save planner keeps one copy of each key.

Keys, all name-keyed so they survive a different data-parallel size:

``model.<param or buffer>``             tensors
``optim.state.<param>.<state key>``     Adam's ``exp_avg``, ``step``, ... (tensors)
``optim.hparams.<param>``               the param group's hyperparameters (pickled)
``local.<dp index>.<region rank>``      per-rank RNG states, ``extra`` and the Jacobian
                                        strategies ``jacobian="auto"`` timed in this process
``lbi_meta.json`` (a file beside the shards) describes the model, its regions, the LBI
layout (pool, segment layout, encoder kind, interface ranks: weights of the same shapes
mean something else under another layout, see :mod:`lbi_fx.layout`), the placement and
every rank's optimizer param groups; :func:`load` checks it before any collective, on
every rank alike, so a mismatching checkpoint is refused everywhere with a
:class:`CheckpointError` naming the field, both values and what to build instead.
Works in one process too: ``RegionParallel`` over a world-1 gloo group.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from lbi_fx.errors import CheckpointError
from lbi_fx.layout import layout_mismatch, lbi_layout, rebuild_hint

META = "lbi_meta.json"
FORMAT = 2  # 2: + "layout", "optim_groups"; 1 still loads, those unchecked (a warning)


# -- what this rank holds -----------------------------------------------------------

def _coords(rp) -> tuple[int, int, int]:
    """(dp replica, dp size, region rank) of this process; (0, 1, rank) without a mesh."""
    return getattr(rp, "dp_rank", 0), getattr(rp, "dp_size", 1), rp.rank


def _group(rp):
    """The group DCP coordinates over: every rank of the run (the whole mesh, or the plain
    group ``RegionParallel`` was given)."""
    if getattr(rp, "mesh", None) is not None:
        return None
    return getattr(rp, "region_group", None) or rp.comm.group


def owned(rp) -> set[str]:
    """Parameter and buffer names this rank writes and reads back: what it holds
    (:mod:`~lbi_fx.distributed.ownership`). Several ranks hold the prologue, a tied head
    and every dp replica's copy; those are bitwise identical, and DCP keeps one of each."""
    if hasattr(rp, "held"):  # (held names every alias of a tied weight; keys use one)
        return set(rp.held) & set(_tensors(rp.lbi))
    return {n for n, _ in (*rp.lbi.named_parameters(), *rp.lbi.named_buffers())}


def _device_type(module: nn.Module) -> str:
    return next((t.device.type for t in _tensors(module).values() if t.device.type != "meta"),
                "cpu")


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _fingerprint(module: nn.Module) -> dict[str, list]:
    return {n: [list(t.shape), str(t.dtype).removeprefix("torch.")]
            for n, t in _tensors(module).items()}


def _optim_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Size and hyper-parameter keys of each param group: another grouping (say weight
    decay on other tensors) would apply saved hyper-parameters to the wrong tensors."""
    return [{"size": len(g["params"]), "keys": sorted(k for k in g if k != "params")}
            for g in optimizer.param_groups]


def _meta(rp, optimizer: torch.optim.Optimizer) -> dict:
    """What :func:`load` compares; ``optim_groups`` holds this rank's groups only (save
    gathers every rank's, keyed ``"<dp index>.<region rank>"``)."""
    lbi = rp.lbi
    d, _, j = _coords(rp)
    return {"format": FORMAT, "K": lbi.num_regions, "regions": lbi.regions,
            "ranks": list(lbi.ranks), "layout": lbi_layout(lbi), "placement": rp.place,
            "dp": _coords(rp)[1], "optimizer": type(optimizer).__name__,
            "optim_groups": {f"{d}.{j}": _optim_groups(optimizer)},
            "tensors": _fingerprint(lbi)}


# -- optimizer state, keyed by parameter name ----------------------------------------

def _param_names(lbi: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Names of the optimizer's parameters, group by group."""
    names = {id(p): n for n, p in lbi.named_parameters()}
    out = []
    for g, group in enumerate(optimizer.param_groups):
        row = []
        for i, p in enumerate(group["params"]):
            if id(p) not in names:
                raise CheckpointError(
                    f"parameter {i} of the optimizer's param group {g} (shape "
                    f"{tuple(p.shape)}) is not a parameter of rp.lbi: build the optimizer "
                    "on rp.lbi's parameters")
            row.append(names[id(p)])
        out.append(row)
    return out


def _optim_items(lbi, optimizer, mine: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group, names in zip(optimizer.param_groups, _param_names(lbi, optimizer)):
        hp = pickle.dumps({k: v for k, v in group.items() if k != "params"})
        for p, n in zip(group["params"], names):
            if n not in mine:
                continue
            out[f"optim.hparams.{n}"] = hp
            for k, v in optimizer.state.get(p, {}).items():
                out[f"optim.state.{n}.{k}"] = v.detach() if torch.is_tensor(v) else pickle.dumps(v)
    return out


def _optim_dest(lbi, optimizer, mine: set[str], md: dict) -> dict[str, Any]:
    """Buffers DCP loads into: CPU tensors of the saved shape/dtype, placeholders for bytes
    (``Optimizer.load_state_dict`` then moves them to each parameter's device)."""
    out: dict[str, Any] = {}
    for names in _param_names(lbi, optimizer):
        for n in names:
            if n not in mine:
                continue
            out[f"optim.hparams.{n}"] = b""
            prefix = f"optim.state.{n}."
            for key, m in md.items():
                if key.startswith(prefix) and "." not in key[len(prefix):]:
                    out[key] = (torch.empty(m.size, dtype=m.properties.dtype)
                                if hasattr(m, "size") else b"")
    return out


def _optim_apply(lbi, optimizer, mine: set[str], got: dict[str, Any]) -> None:
    sd = optimizer.state_dict()  # template: same groups, integer ids in order
    for g, names in enumerate(_param_names(lbi, optimizer)):
        group = sd["param_groups"][g]
        for idx, n in zip(group["params"], names):
            if n not in mine:
                continue
            hp = pickle.loads(got[f"optim.hparams.{n}"])
            group.update(hp)
            prefix = f"optim.state.{n}."
            st = {k[len(prefix):]: (pickle.loads(v) if isinstance(v, bytes) else v)
                  for k, v in got.items() if k.startswith(prefix)}
            if st:
                sd["state"][idx] = st
    optimizer.load_state_dict(sd)


# -- per-rank state ---------------------------------------------------------------------

def _rng_state() -> dict:
    out = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    if "numpy" in sys.modules:
        out["numpy"] = sys.modules["numpy"].random.get_state()
    return out


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state and "numpy" in sys.modules:
        sys.modules["numpy"].random.set_state(state["numpy"])


def _fresh_seed(state: dict, dp_index: int) -> int:
    """A seed for a dp replica the checkpoint did not have: derived from the replica it
    copies and its own index, so replicas do not draw the same dropout masks."""
    h = hashlib.sha256(state["torch"].numpy().tobytes() + dp_index.to_bytes(8, "little"))
    return int.from_bytes(h.digest()[:8], "little") >> 1


# -- save / load --------------------------------------------------------------------------

def save(path: str | Path, rp, optimizer: torch.optim.Optimizer, extra: Any = None) -> None:
    """Write this run's state to directory ``path`` (collective: every rank calls it).

    Each rank writes its own shard: the parameters/buffers it owns, their optimizer
    state, its RNG states and its ``extra`` (any picklable: step counter, data position).
    """
    path = Path(path)
    mine = owned(rp)
    sd: dict[str, Any] = {f"model.{n}": t.detach() for n, t in _tensors(rp.lbi).items()
                          if n in mine}
    sd.update(_optim_items(rp.lbi, optimizer, mine))
    d, _, j = _coords(rp)
    lbi = rp.lbi
    sd[f"local.{d}.{j}"] = pickle.dumps({
        "rng": _rng_state(), "extra": extra,
        "device": _device_type(lbi),
        "jacobian_choice": dict(lbi.region_choices.jacobian), "batched_ok": dict(lbi.region_choices.batched)})
    group = _group(rp)
    meta = _meta(rp, optimizer)
    every = [None] * dist.get_world_size(group)  # each rank's param groups, for its load
    dist.all_gather_object(every, meta["optim_groups"], group=group)
    meta["optim_groups"] = {k: v for g in every for k, v in g.items()}
    if dist.get_rank(group) == 0:  # a save that dies halfway leaves no lbi_meta.json behind
        (path / META).unlink(missing_ok=True)
    # overwrite: --save-every rewrites one directory, as nanoGPT rewrites ckpt.pt
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(path), overwrite=True),
             process_group=group)
    if dist.get_rank(group) == 0:  # after dcp.save's final collective: every shard is on disk
        (path / META).write_text(json.dumps(meta, indent=1))
    dist.barrier(group=group)


def _groups_mismatch(saved: list[dict] | None, now: list[dict], where: str) -> str | None:
    if saved is None or saved == now:
        return None

    def show(groups):
        return (f"{len(groups)} group(s) of sizes {[g['size'] for g in groups]}, hyper-parameter "
                f"keys {sorted({k for g in groups for k in g['keys']})}")
    return (f"optimizer param groups ({where}): checkpoint has {show(saved)}, this optimizer "
            f"{show(now)}; build the optimizer with the param groups it was saved with")


def _mismatch(saved: dict, now: dict, slot: str = "0.0") -> str | None:
    """The first difference, named by key; dp may differ (state is replicated over dp).
    ``slot``: the saved ``"<dp replica>.<region rank>"`` whose param groups this rank takes."""
    for key in ("K", "regions"):
        if saved[key] != now[key]:
            return f"{key}: checkpoint has {saved[key]}, this model {now[key]}"
    if "layout" in saved:  # before "ranks": a causal layout multiplies each width
        problem = layout_mismatch(saved["layout"], now["layout"], "checkpoint has")
        if problem:
            return f"{problem} ({rebuild_hint(saved['layout'])})"
    if saved["ranks"] != now["ranks"]:
        return f"ranks: checkpoint has {saved['ranks']}, this model {now['ranks']}"
    a, b = saved["tensors"], now["tensors"]
    for n in sorted(set(a) | set(b)):
        if n not in b:
            return f"{n!r}: in the checkpoint, not in this model"
        if n not in a:
            return f"{n!r}: in this model, not in the checkpoint"
        if a[n] != b[n]:
            return (f"{n!r}: checkpoint has shape {tuple(a[n][0])} {a[n][1]}, this model "
                    f"{tuple(b[n][0])} {b[n][1]}")
    if saved["optimizer"] != now["optimizer"]:
        return f"optimizer: checkpoint has {saved['optimizer']}, this run {now['optimizer']}"
    if "optim_groups" in saved:
        mine = next(iter(now["optim_groups"].values()))
        d, j = slot.split(".")
        if saved["placement"] != now["placement"]:
            # another placement: each rank's groups hold other parameters, so only their
            # number and hyper-parameter keys can be compared
            keys = lambda gs: [g["keys"] for g in gs]  # noqa: E731
            theirs = saved["optim_groups"].get(slot)
            if theirs is not None and keys(theirs) != keys(mine):
                return _groups_mismatch(theirs, mine, f"dp replica {d}, region rank {j}")
            return None
        return _groups_mismatch(saved["optim_groups"].get(slot), mine,
                                f"dp replica {d}, region rank {j}")
    return None


def _read_meta(path: Path) -> dict:
    f = path / META
    if not f.is_file():
        raise CheckpointError(f"no lbi-fx checkpoint at {path}: {META} is missing (an "
                              "interrupted save, or not a directory lbi_fx.checkpoint.save wrote)")
    meta = json.loads(f.read_text())
    if meta.get("format") not in (1, FORMAT):
        raise CheckpointError(f"{f}: format {meta.get('format')!r}, this lbi-fx reads 1 and "
                              f"{FORMAT}")
    if meta["format"] == 1:
        warnings.warn(f"lbi-fx: {f} predates layout records (format 1): its pool, segment "
                      "layout, encoder kind and optimizer param groups are not checked",
                      stacklevel=3)
    return meta


def load(path: str | Path, rp, optimizer: torch.optim.Optimizer) -> Any:
    """Restore what :func:`save` wrote into ``rp.lbi`` and ``optimizer`` (collective);
    returns this rank's ``extra``.

    Build the model, ``RegionParallel`` and optimizer exactly as for a fresh run, then
    load: the run continues bitwise as if never stopped. The data-parallel size may
    differ from the saved run's: model and optimizer state are replicated over dp.
    Replica d takes the RNG states and ``extra`` of saved replica ``d % saved_dp``; a
    replica the checkpoint did not have (d >= saved_dp) then reseeds from them and its
    index, so it draws its own dropout masks (that part is not a continuation).
    Raises :class:`CheckpointError` naming the first mismatching field (K, regions, pool,
    segment layout, encoder kind, interface ranks, tensors, placement over the region
    ranks, optimizer class, param groups) before any collective, on every rank.
    """
    path = Path(path)
    meta = _read_meta(path)
    d, _, j = _coords(rp)
    problem = _mismatch(meta, _meta(rp, optimizer), f"{d % meta['dp']}.{j}")
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit this run: {problem}. Build "
                              "the model, regions and optimizer the checkpoint was saved from")
    md = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    mine = owned(rp)
    src = d % meta["dp"]
    moved = meta["placement"] != rp.place  # another number of region ranks
    j = j % len(meta["placement"])  # RNG states and extra of a saved rank (not a continuation
    # where the placement moved: regions now run on other ranks)
    tensors = _tensors(rp.lbi)
    dest: dict[str, Any] = {f"model.{n}": tensors[n].detach() for n in sorted(mine)}
    dest.update(_optim_dest(rp.lbi, optimizer, mine, md))
    local = f"local.{src}.{j}"
    dest[local] = b""
    for key in dest:
        if key not in md:
            raise CheckpointError(f"checkpoint {path} lacks {key!r} although its "
                                  f"{META} matches: was it written by an interrupted save?")
    with torch.no_grad():
        dcp.load(dest, checkpoint_id=str(path), process_group=_group(rp))
    _optim_apply(rp.lbi, optimizer, mine, dest)
    state = pickle.loads(dest[local])
    if state["device"] == _device_type(rp.lbi) and not moved:
        # jacobian="auto" picks by timing: the saved picks keep the resumed run bitwise
        # (another device type probes afresh: a pick may not work there)
        rp.lbi.region_choices.jacobian.clear()
        rp.lbi.region_choices.jacobian.update(state["jacobian_choice"])
        rp.lbi.region_choices.batched.clear()
        rp.lbi.region_choices.batched.update(state["batched_ok"])
    _set_rng(state["rng"])
    if d != src:
        seed = _fresh_seed(state["rng"], d)
        torch.manual_seed(seed)
        random.seed(seed)
    return state["extra"]
