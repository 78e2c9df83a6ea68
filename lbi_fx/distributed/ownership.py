"""What each rank holds: the parameters and buffers of the programs it runs, nothing else.

Region parallelism is for models one device cannot hold, so a rank keeps only what it
runs - its regions (with their interface modules), the prologue outputs those regions read
(under ``canvas_weights="per_region"`` its own canvas copy), the epilogue on the last rank -
and the rest of the module lives on the meta device: shapes and names, no storage. Who holds
what is read from the programs' graphs (:func:`holders`), so every rank knows every other
rank's share without a collective, and the same facts serve construction, the broadcast
that makes ranks agree, gradient reductions and checkpoints.

Models built on the meta device (``with torch.device("meta"): model = Model(cfg)``) stay
there through ``transform``; :func:`materialize` then allocates this rank's share alone,
and :func:`init_weights` initialises it to values that do not depend on the world size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from lbi_fx.passes.prune_prologue import prune_outputs

META = torch.device("meta")


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by every name it has (tied weights under each)."""
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def prologue_needs(lbi: nn.Module, regions: Iterable[int], epilogue: bool) -> set[str]:
    """The prologue outputs that ``regions`` (and the epilogue, if ``epilogue``) read."""
    spec = lbi.program_spec
    outs = set(spec.prologue.outputs)
    need: set[str] = set()
    for k in regions:
        need |= outs & set(spec.regions[k].inputs)
        if k == 0:
            need.add(spec.m_nodes[0])
    if epilogue:
        need |= outs & set(spec.epilogue.inputs)
    return need


def _program_tensors(root: nn.Module, graph: fx.Graph) -> list[torch.Tensor]:
    gm = fx.GraphModule(root, graph, "Reads")
    return [t for _, t in (*gm.named_parameters(remove_duplicate=False),
                           *gm.named_buffers(remove_duplicate=False))]


def holders(lbi: nn.Module, place: list[list[int]]) -> dict[str, set[int]]:
    """Tensor name -> the region ranks that hold it (``place[j]``: rank j's regions; the
    last rank also runs the epilogue). A tensor no program reads is held by rank 0, so a
    checkpoint still has it."""
    spec = lbi.program_spec
    last = len(place) - 1
    by_id: dict[int, set[int]] = {}
    for j, ks in enumerate(place):
        graphs = [prune_outputs(spec.prologue.graph, spec.prologue.outputs,
                                prologue_needs(lbi, ks, j == last), lbi)]
        graphs += [spec.regions[k].graph for k in ks]
        if j == last:
            graphs.append(spec.epilogue.graph)
        for g in graphs:
            for t in _program_tensors(lbi, g):
                by_id.setdefault(id(t), set()).add(j)
    return {n: set(by_id.get(id(t), {0})) for n, t in named_tensors(lbi).items()}


def _swap(module: nn.Module, name: str, new: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    if attr in mod._parameters:
        mod._parameters[attr] = new
    else:
        mod._buffers[attr] = new


def _replace(module: nn.Module, keep: Callable[[str, torch.Tensor], bool],
             make: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Replace every tensor for which ``keep`` is false by ``make(t)``, one replacement per
    tensor (tied names stay tied); returns the number of tensors replaced."""
    done: dict[int, torch.Tensor] = {}
    for name, t in named_tensors(module).items():
        if keep(name, t):
            continue
        if id(t) not in done:
            new = make(t)
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            done[id(t)] = new
        _swap(module, name, done[id(t)])
    return len(done)


def release(module: nn.Module, mine: set[str]) -> int:
    """Move every tensor whose names are not in ``mine`` to the meta device (storage freed
    once nothing else refers to it). Returns how many tensors were released."""
    return _replace(module, lambda n, t: n in mine or t.device == META,
                    lambda t: torch.empty_like(t, device=META))


def materialize(module: nn.Module, mine: set[str], device: torch.device | str) -> int:
    """Allocate (uninitialised) storage on ``device`` for the meta tensors in ``mine``."""
    return _replace(module, lambda n, t: n not in mine or t.device != META,
                    lambda t: torch.empty_like(t, device=device))


def held_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers that have storage (not on meta)."""
    seen: dict[int, torch.Tensor] = {id(t): t for t in named_tensors(module).values()}
    return sum(t.numel() * t.element_size() for t in seen.values() if t.device != META)


def _seed(base: int, name: str) -> int:
    h = hashlib.sha256(f"{base}/{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _origin(path: str, origin: dict[str, str]) -> str:
    """The module path a copy stands for (``origin`` maps copies' roots to originals)."""
    for copy, orig in origin.items():
        if path == copy or path.startswith(copy + "."):
            return orig + path[len(copy):]
    return path


def _direct(mod: nn.Module, path: str) -> list[str]:
    return [f"{path}.{n}" if path else n for n, t in
            [*mod._parameters.items(), *mod._buffers.items()] if t is not None]


def init_weights(module: nn.Module, seed: int = 0, *, fn: Callable | None = None,
                 origin: dict[str, str] | None = None, only: set[str] | None = None
                 ) -> list[str]:
    """Initialise the tensors in ``only`` (default: every tensor with storage), module by
    module, each module from an RNG seeded by ``seed`` and its path: values that depend on
    neither the world size nor the order ranks run in, so a rank holding a module gets the
    weights a single process would. A module is initialised by ``fn(path, module)`` when
    given, else by its own ``reset_parameters()`` (lbi-fx's interface modules reset their
    whole subtree, zero-initialised decoders included). ``origin`` maps a copy's module
    path to the module it copies (per-region canvas copies), which then starts equal to
    it. Returns the names of the tensors in ``only`` left uninitialised (no
    ``reset_parameters`` and no ``fn``)."""
    origin = origin or {}
    named = named_tensors(module)
    only = only if only is not None else {n for n, t in named.items() if t.device != META}
    covered: set[int] = set()
    skip: tuple[str, ...] = ()
    for path, mod in module.named_modules():  # a module shared by two paths: once
        if skip and any(path == s or path.startswith(s + ".") for s in skip):
            continue
        whole = getattr(mod, "resets_subtree", False)  # lbi-fx's own: always its own reset
        mine = ([n for n in named if n.startswith(path + ".")] if whole and path
                else _direct(mod, path))
        if not any(n in only for n in mine):
            continue
        reset = (lambda m=mod, p=path: fn(p, m)) if fn is not None and not whole else getattr(
            mod, "reset_parameters", None)
        if reset is None:
            continue
        devices = [t.device for t in mod.parameters() if t.device.type == "cuda"]
        with torch.random.fork_rng(devices=devices[:1]), torch.no_grad():
            torch.manual_seed(_seed(seed, _origin(path, origin)))
            reset()
        covered.update(id(named[n]) for n in mine)
        if whole:
            skip += (path,)
    return sorted(n for n in only if id(named[n]) not in covered)
