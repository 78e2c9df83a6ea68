"""Per-region canvas weights: each region computes what it reads from the prologue with
its own copy of the prologue's parameters (``transform(..., canvas_weights="per_region")``).

Every region reads the canvas, so with shared weights the embedding's gradient is a sum
over all regions: placed on different ranks, that sum is an all-reduce of the embedding
(and of a tied head) every step. Here region 0 (and m_0's encoder, in the prologue) keeps
the original parameters; for each region k >= 1 the part of the prologue that computes a
tensor region k reads, and that depends on a trainable prologue tensor, is duplicated in
the prologue with those tensors cloned (``lbi_canvas.region_{k}.<path>``), and region k's
reads are rewired to the copy. The epilogue runs beside the last region, so its reads of
prologue tensors and parameters (a tied head) go to the last region's copy. Copies start
equal to the originals and then train apart: a different model, whose gradients the scan
backward gives exactly. Non-trainable buffers stay shared. A copy draws its own dropout.

Runs after ``insert_interfaces`` (so decoders' canvas inputs are rewired too) and before
shape propagation and ``split_places``; new nodes are placed in the prologue (static)
and carry ``meta[COPY_KEY] = k``. ``param_users`` answers, for a built prologue program,
which places a trainable parameter's gradient comes from (for region parallelism).
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.fx as fx
from torch import nn

from lbi_fx.errors import RewriteError

from .capture import MODULE_KEY
from .partition import PLACE_KEY, PROLOGUE, place_of

CANVAS_WEIGHTS = ("shared", "per_region")
HOLDER = "lbi_canvas"  # gm.lbi_canvas: ModuleDict region_{k} / epilogue -> copies
COPY_KEY = "lbi_canvas_copy"  # node meta: the region whose copy this prologue node is
ORIGIN_KEY = "lbi_canvas_origin"  # gm meta: copy module path -> the module path it copies


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _trainable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _module_tensors(mod: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*mod.parameters(), *mod.buffers()) if _trainable(t)]


def node_tensors(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    """Trainable tensors a node reads itself: its module's, or a get_attr's tensor."""
    if node.op == "call_module":
        return _module_tensors(gm.get_submodule(node.target))
    if node.op == "get_attr":
        t = _attr(gm, node.target)
        return [t] if _trainable(t) else []
    return []


def prologue_tensors(gm: fx.GraphModule) -> dict[int, torch.Tensor]:
    """id -> trainable tensor read by a prologue computation (not a bare get_attr)."""
    out: dict[int, torch.Tensor] = {}
    for n in gm.graph.nodes:
        if place_of(n) != PROLOGUE or n.op in ("get_attr", "placeholder", "output"):
            continue
        reads = node_tensors(gm, n) + [t for a in n.all_input_nodes if a.op == "get_attr"
                                       for t in node_tensors(gm, a)]
        out.update((id(t), t) for t in reads)
    return out


def dependent_nodes(gm: fx.GraphModule, tensors: dict[int, torch.Tensor]) -> set[fx.Node]:
    """Prologue computations whose value depends on one of ``tensors``."""
    dep: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if place_of(n) != PROLOGUE or n.op in ("get_attr", "placeholder", "output"):
            continue
        reads = node_tensors(gm, n) + [t for a in n.all_input_nodes if a.op == "get_attr"
                                       for t in node_tensors(gm, a)]
        if any(id(t) in tensors for t in reads) or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _clone(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=True)


def _refuse_state(mod: nn.Module, path: str) -> None:
    for name, m in mod.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            where = f"{path}.{name}" if name else path
            raise RewriteError(
                f"canvas_weights='per_region' would call {where} ({type(m).__name__}) once per "
                "region copy, updating its running statistics several times a step; use "
                "canvas_weights='shared' for a prologue with batch statistics")


def _module_copy(mod: nn.Module, clones: dict[int, nn.Parameter]) -> nn.Module:
    """A shallow copy of ``mod`` whose cloned tensors are swapped in; children holding
    none of them (and every other tensor) stay shared."""
    new = copy.copy(mod)
    new._parameters = {n: clones.get(id(p), p) if p is not None else None
                       for n, p in mod._parameters.items()}
    new._buffers = dict(mod._buffers)
    for n, b in mod._buffers.items():
        if b is not None and id(b) in clones:  # a buffer with requires_grad
            del new._buffers[n]
            new._parameters[n] = clones[id(b)]
    new._modules = {n: _module_copy(c, clones)
                    if c is not None and any(id(t) in clones for t in _module_tensors(c)) else c
                    for n, c in mod._modules.items()}
    return new


def _canonical(gm: fx.GraphModule, t: torch.Tensor, default: str) -> str:
    """The name ``named_parameters`` gives ``t`` (export reads a tied weight by another)."""
    named = (*gm.named_parameters(), *gm.named_buffers())
    return next((n for n, p in named if p is t), default)


def _fresh(holder: nn.Module, path: str) -> str:
    name, i = path.replace(".", "_") or "root", 1
    base = name
    while hasattr(holder, name):
        name, i = f"{base}_{i}", i + 1
    return name


class _Copies:
    """One region's copies: cloned tensors (by id of the original), module copies and
    get_attr nodes, registered under ``lbi_canvas.<key>``."""

    def __init__(self, gm: fx.GraphModule, key: str, tensors: dict[int, torch.Tensor],
                 clones: dict[int, nn.Parameter] | None = None):
        self.gm, self.key, self.tensors = gm, key, tensors
        self.holder = nn.ModuleDict()
        getattr(gm, HOLDER)[key] = self.holder
        self.clones = {} if clones is None else clones
        self.modules: dict[str, str] = {}
        self.attrs: dict[str, fx.Node] = {}

    def clone_for(self, ts: list[torch.Tensor]) -> None:
        for t in ts:
            if id(t) in self.tensors and id(t) not in self.clones:
                self.clones[id(t)] = _clone(t)

    def module(self, path: str) -> str:
        """Target of a copy of module ``path`` reading the clones."""
        if path not in self.modules:
            mod = self.gm.get_submodule(path)
            self.clone_for(_module_tensors(mod))
            name = _fresh(self.holder, path)
            self.holder.add_module(name, _module_copy(mod, self.clones))
            self.modules[path] = f"{HOLDER}.{self.key}.{name}"
            self.gm.meta.setdefault(ORIGIN_KEY, {})[self.modules[path]] = path
        return self.modules[path]

    def attr(self, node: fx.Node) -> fx.Node:
        """A get_attr node reading the clone of ``node``'s tensor."""
        if node.target not in self.attrs:
            t = _attr(self.gm, node.target)
            self.clone_for([t])
            name = _fresh(self.holder, _canonical(self.gm, t, node.target))
            self.holder.register_parameter(name, self.clones[id(t)])
            with self.gm.graph.inserting_after(node):
                new = self.gm.graph.get_attr(f"{HOLDER}.{self.key}.{name}")
            new.meta = dict(node.meta)
            self.attrs[node.target] = new
        return self.attrs[node.target]


def _reads_cloned(gm: fx.GraphModule, node: fx.Node, tensors: dict) -> bool:
    return node.op in ("call_module", "get_attr") and any(
        id(t) in tensors for t in node_tensors(gm, node))


def _needed(readers: list[fx.Node], dep: set[fx.Node]) -> set[fx.Node]:
    """The dependent prologue computations ``readers`` reach (their copies' cone)."""
    out: set[fx.Node] = set()
    stack = [a for n in readers for a in n.all_input_nodes if a in dep]
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(a for a in n.all_input_nodes if a in dep)
    return out


def _duplicate(gm: fx.GraphModule, nodes: list[fx.Node], k: int, copies: _Copies,
               anchor: fx.Node) -> dict[fx.Node, fx.Node]:
    """Region k's copies of the prologue computations ``nodes`` (in graph order), placed
    before ``anchor``: original -> copy."""
    done: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        args, kwargs = fx.map_arg((node.args, node.kwargs), partial(_swap, gm, copies, done))
        target = node.target
        if node.op == "call_module":
            _refuse_state(gm.get_submodule(node.target), node.target)
            if _reads_cloned(gm, node, copies.tensors):
                target = copies.module(node.target)
        with gm.graph.inserting_before(anchor):
            new = gm.graph.create_node(node.op, target, args, kwargs,
                                       name=f"{node.name}_region{k}", type_expr=node.type)
        new.meta = dict(node.meta)
        new.meta[PLACE_KEY] = PROLOGUE
        new.meta[COPY_KEY] = k
        if target != node.target:
            new.meta[MODULE_KEY] = target
        done[node] = new
    return done


def _swap(gm: fx.GraphModule, copies: _Copies, done: dict, a: fx.Node) -> fx.Node:
    """What a copy (or a rewired reader) reads in place of ``a``."""
    if a in done:
        return done[a]
    if a.op == "get_attr" and _reads_cloned(gm, a, copies.tensors):
        return copies.attr(a)
    return a


def per_region_canvas(gm: fx.GraphModule, num_regions: int) -> dict[int, list[str]]:
    """Rewrite ``gm`` in place (see the module docstring); returns, per region k >= 1,
    the names of the prologue nodes made for it."""
    from .insert_interfaces import IFACE

    if hasattr(gm, HOLDER):
        raise RewriteError(f"the model already has a submodule named {HOLDER!r}; rename it")
    K = num_regions
    tensors = prologue_tensors(gm)
    dep = dependent_nodes(gm, tensors)
    nodes = list(gm.graph.nodes)
    anchor = next(n for n in nodes if place_of(n) != PROLOGUE)
    holder = nn.ModuleDict()
    gm.add_module(HOLDER, holder)
    made: dict[int, list[str]] = {}
    for k in range(1, K):
        last = k == K - 1  # the epilogue runs beside the last region: its copies, tied
        readers = [n for n in nodes if place_of(n) == k or (last and place_of(n) > k
                                                              and n.op != "output")]
        copies = _Copies(gm, f"region_{k}", tensors)
        cone = _needed(readers, dep)
        done = _duplicate(gm, [n for n in nodes if n in cone], k, copies, anchor)
        epi = _Copies(gm, "epilogue", tensors, clones=copies.clones) if last else None
        swap = partial(_swap, gm, copies, done)
        for n in readers:
            n.args, n.kwargs = fx.map_arg((n.args, n.kwargs), swap)
            if n.op == "call_module" and _reads_cloned(gm, n, tensors):
                n.target = (epi if place_of(n) > k else copies).module(n.target)
        made[k] = [n.name for n in done.values()]
        for key, c in (("epilogue", epi), (f"region_{k}", copies)):
            if c is not None and not len(c.holder) and not c.holder._parameters:
                del holder[key]
    getattr(gm, IFACE).canvas_weights = "per_region"
    gm.graph.lint()
    gm.recompile()
    return made


def param_users(prologue: fx.GraphModule, outputs: list[str], readers: dict[str, set],
                direct: dict[int, set]) -> dict[int, tuple[torch.Tensor, set]]:
    """For each trainable tensor the prologue program reads: the places whose gradient
    reaches it. ``outputs`` names the program's outputs in order, ``readers`` maps an
    output name to the places reading it, ``direct`` a tensor id to the places (other
    than the prologue) whose programs read the tensor themselves (a tied head).
    Returns id -> (tensor, places)."""
    deps: dict[fx.Node, set[int]] = {}
    found: dict[int, torch.Tensor] = {}
    for n in prologue.graph.nodes:
        own = node_tensors(prologue, n)
        found.update((id(t), t) for t in own)
        deps[n] = {id(t) for t in own}.union(*(deps[a] for a in n.all_input_nodes))
    out = next(n for n in prologue.graph.nodes if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    users: dict[int, set] = {i: set(direct.get(i, ())) for i in found}
    for name, value in zip(outputs, values):
        if isinstance(value, fx.Node):
            for i in deps[value]:
                users[i] |= readers.get(name, set())
    return {i: (found[i], u) for i, u in users.items()}
