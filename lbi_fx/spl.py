"""Stage-partitioned learning (seed 002) as a second rewrite on lbi-fx's front end.

A composition pi = (d_0, ..., d_{K-1}) of the layers makes K stages. Stage k trains on
its own loss through a head - the model's own epilogue program (final norm, LM head)
run on the stage's output (Eq. 4) - and every edge that enters stage k >= 1 passes the
relay D_lambda(h) = sg(h) + lambda (h - sg(h)) (Eq. 26). lambda = 0 detaches, so stage
k's parameters get gradient from loss k alone (Prop. 4.7); lambda = 1 is plain backprop
of the summed loss; one stage with a shared head is backprop itself (Thm. 5.1).

LBI keeps gradients exact across regions, SPL cuts them; both start from the same
captured, partitioned graph (``lbi_fx.analysis.analyze``), so a user can compare them on
one model. A node *carries data* when it depends on the input (``mark_dynamic``). Every
floating data edge from an earlier place into stage k is relayed, whether it comes from
stage k-1 or skips stages (an embedding / x0 bus, a long skip): a relay missing on a
bypass edge would let loss k train an earlier stage. Static values (masks, position
tables, parameter transforms) carry no data; each stage that reads one recomputes it,
so every stage's program can run its backward on its own (``schedule="interleaved"``).
"""

from __future__ import annotations

import itertools
import json
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.analysis import analyze
from lbi_fx.errors import InputError, RegionSpecError
from lbi_fx.module import adopt_state
from lbi_fx.passes.mark_dynamic import DATA_KEY
from lbi_fx.passes.partition import PROLOGUE, module_of, place_of
from lbi_fx.passes.shape_prop import BATCH_KEY, SHAPE_KEY, scalars_per_sample, tensors_of
from lbi_fx.regions import RegionSpec

HEADS = ("shared", "per-stage")
SCHEDULES = ("joint", "interleaved")
SCORERS = ("last", "mean-stage", "sum-logits")
STAGE_KEY = "spl_stage"
ROLE_KEY = "spl_role"  # "body" (prologue + stage layers), "head", "relay"


# ----------------------------------------------------------------------- compositions

def compositions(n: int, parts: int | None = None) -> list[tuple[int, ...]]:
    """Every composition of ``n`` (Def. 2.1), or those with ``parts`` parts.

    A composition is the set of its internal boundaries, a subset of {1..n-1}, so there
    are 2^(n-1) of them (Prop. 2.2) and C(n-1, K-1) with K parts.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"compositions(n={n!r}): n must be an int >= 1")
    counts = range(n) if parts is None else [parts - 1]
    out = []
    for k in counts:
        for cuts in itertools.combinations(range(1, n), k):
            ends = (0, *cuts, n)
            out.append(tuple(b - a for a, b in zip(ends, ends[1:])))
    return out


# ----------------------------------------------------------------------- the relay

class _Scale(torch.autograd.Function):
    """Identity forward, ``lambda * grad`` backward: D_lambda for 0 < lambda < 1."""

    @staticmethod
    def forward(ctx, t, lam):
        ctx.lam = lam
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.lam, None


def relay(value, lam: float):
    """D_lambda (Eq. 26) on every floating tensor in ``value``: the value unchanged, its
    gradient scaled by ``lam``. ``lam = 0`` is ``detach`` (no gradient edge at all)."""

    def one(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or lam == 1.0:
            return t
        return t.detach() if lam == 0.0 else _Scale.apply(t, lam)

    return pytree.tree_map(one, value)


def _call_with(module: nn.Module, params: dict, *args, **kwargs):
    """A head module called with per-stage parameters (W + W_k, Eq. 4 with H = ps)."""
    return torch.func.functional_call(module, params, args, kwargs)


# ----------------------------------------------------------------------- the report

@dataclass
class CutEdge:
    """One data edge into stage ``stage`` (k >= 1), relayed with gradient factor ``lam``."""

    stage: int
    source: str
    source_module: str
    source_place: str          # "prologue" or "stage j"
    readers: list[str]         # the nodes of stage ``stage`` that read it
    scalars: int               # per sample
    lam: float
    bypass: bool               # skips at least one stage (an x0 bus, a long skip)
    into_head: bool            # read by the stage's head


@dataclass
class ParamReach:
    name: str
    numel: int
    owners: list[str]          # "stage k" / "head k": where the parameter first meets data
    reaches: list[int]         # losses it gets gradient from, in the graph after the cut
    expected: list[int]        # losses the relay allows


@dataclass
class Violation:
    param: str
    owners: list[str]
    loss: int
    path: list[str]            # a gradient path, parameter -> loss, node by node


@dataclass
class SPLReport:
    """What ``spl.report()`` and ``lbi-fx verify --spl`` show."""

    regions: list[list[str]]
    heads: str
    relay: list[float]
    alpha: float
    edges: list[CutEdge]
    head_inputs: list[dict[str, str]]   # per stage: last stage's tensor -> stage's tensor
    params: list[ParamReach]
    violations: list[Violation] = field(default_factory=list)
    capture: str = ""

    @property
    def ok(self) -> bool:
        """Every parameter reaches only the losses its relays allow (Prop. 4.7 at 0)."""
        return not self.violations

    @property
    def num_stages(self) -> int:
        return len(self.regions)

    def cut(self, stage: int) -> list[CutEdge]:
        return [e for e in self.edges if e.stage == stage]

    def bypass(self) -> list[CutEdge]:
        return [e for e in self.edges if e.bypass]

    def shared(self) -> list[ParamReach]:
        """Parameters trained by more than one loss (heads, tied weights, shared modules)."""
        return [p for p in self.params if len(p.reaches) > 1]

    def stage_numel(self) -> list[int]:
        """Parameters owned by each stage alone (its layers, and the prologue for stage 0)."""
        out = [0] * self.num_stages
        for p in self.params:
            if len(p.owners) == 1 and p.owners[0].startswith("stage "):
                out[int(p.owners[0].split()[1])] += p.numel
        return out

    def to_json(self) -> str:
        d = asdict(self)
        d["ok"] = self.ok
        return json.dumps(d, indent=2)

    def __str__(self) -> str:
        K = self.num_stages
        sizes = tuple(len(r) for r in self.regions)
        lam = ("0 (detach)" if all(v == 0 for v in self.relay) else
               ", ".join(f"{v:g}" for v in self.relay)) if self.relay else "-"
        lines = [f"stage-partitioned learning: {K} stage(s) {sizes}, heads {self.heads}, "
                 f"relay lambda {lam}, alpha {self.alpha:g}" +
                 (f" ({self.capture})" if self.capture else "")]
        numel = self.stage_numel()
        for k, region in enumerate(self.regions):
            extra = " + prologue" if k == 0 else ""
            lines.append(f"  stage {k}: {', '.join(region)}{extra}  ({numel[k]:,} own parameters)")
        for k in range(1, K):
            cut = self.cut(k)
            lines.append(f"  boundary {k} (into stage {k}): {len(cut)} edge(s) cut")
            for e in cut:
                tag = " [bypass]" if e.bypass else ""
                tag += " [head]" if e.into_head else ""
                lines.append(f"    {e.source} [{e.source_module or '<top level>'}, {e.source_place}]"
                             f" -> {', '.join(e.readers[:3])}{' ...' if len(e.readers) > 3 else ''}"
                             f"  {e.scalars} scalars/sample, lambda {e.lam:g}{tag}")
        nb = len(self.bypass())
        lines.append(f"  bypass edges cut: {nb}")
        for k, m in enumerate(self.head_inputs[:-1]):
            if m:
                lines.append(f"  head {k} reads " + ", ".join(f"{v} for {s}" for s, v in m.items()))
        shared = self.shared()
        lines.append(f"  parameters trained by several losses: {len(shared)}")
        for p in shared:
            lines.append(f"    {p.name} ({p.numel:,}; {', '.join(p.owners)}): losses "
                         f"{','.join(map(str, p.reaches))}")
        if self.ok:
            lines.append("  locality (networkx, graph after the cut): OK - every stage's "
                         "parameters reach only the losses the relay allows")
        else:
            lines.append(f"  locality: {len(self.violations)} VIOLATION(S)")
            for v in self.violations[:10]:
                lines.append(f"    {v.param} ({', '.join(v.owners)}) reaches loss {v.loss}: "
                             + " -> ".join(v.path))
        return "\n".join(lines)


# ----------------------------------------------------------------------- the cut graph

def _floats(n: fx.Node) -> list:
    return [t for t in tensors_of(n) if t.dtype.is_floating_point]


def _carries(n: fx.Node) -> bool:
    """A floating tensor that depends on the input: the edges a stage boundary cuts."""
    return bool(n.meta.get(DATA_KEY)) and bool(_floats(n))


def _stage(n: fx.Node) -> int:
    """Stage of a node; the prologue belongs to stage 0, the epilogue is K."""
    p = place_of(n)
    return 0 if p == PROLOGUE else p


def _place_label(n: fx.Node) -> str:
    return "prologue" if place_of(n) == PROLOGUE else f"stage {place_of(n)}"


def _edge_lambda(lams: Sequence[float], src_place: int, k: int) -> float:
    """Gradient factor of an edge from ``src_place`` into stage k: the product of the
    relays of every boundary it crosses (so a hard vertex of the relaxed space is exactly
    a coarser composition, Prop. 9.4)."""
    out = 1.0
    for i in range(max(src_place, 0) + 1, k + 1):
        out *= lams[i - 1]
    return out


def _mangle(path: str) -> str:
    return path.replace(".", "__")


class _CutBuilder:
    """Copies the captured graph into the SPL graph: the prologue and the stages with a
    relay on every data edge into a later stage, then one head per stage."""

    def __init__(self, gm: fx.GraphModule, regions: list[list[str]], lams: list[float],
                 heads: str):
        self.gm, self.regions, self.lams, self.heads = gm, regions, lams, heads
        self.K = len(regions)
        self.nodes = list(gm.graph.nodes)
        self.out = next(n for n in self.nodes if n.op == "output")
        self.G = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.relays: dict[tuple[fx.Node, int], fx.Node] = {}
        self.edges: dict[tuple[fx.Node, int], CutEdge] = {}
        self.deltas: dict[tuple[int, int], tuple[str, nn.Parameter, fx.Node]] = {}
        self.head_inputs: list[dict[str, str]] = [{} for _ in regions]

    def build(self) -> fx.Graph:
        for n in self.nodes:
            if n.op == "output" or place_of(n) == self.K:
                continue
            k = _stage(n)
            new = self.G.node_copy(n, lambda a, k=k, n=n: self._read(a, k, n))
            self._tag(new, k, "body")
            self.env[n] = new
        heads = [self._head(k) for k in range(self.K)]
        self.G.output(tuple(heads))
        self.G.lint()
        return self.G

    @staticmethod
    def _tag(node: fx.Node, k: int, role: str) -> None:
        node.meta[STAGE_KEY] = k
        node.meta[ROLE_KEY] = role

    def _read(self, a: fx.Node, k: int, user: fx.Node, head: bool = False) -> fx.Node:
        if _carries(a) and _stage(a) < k:
            return self._relay(a, k, user, head)
        return self.env[a]

    def _relay(self, a: fx.Node, k: int, user: fx.Node, head: bool) -> fx.Node:
        key = (a, k)
        if key not in self.relays:
            lam = _edge_lambda(self.lams, place_of(a), k)
            r = self.G.call_function(relay, (self.env[a], lam))
            r.meta = {DATA_KEY: True, SHAPE_KEY: a.meta.get(SHAPE_KEY, []),
                      "lbi_module": module_of(user)}
            self._tag(r, k, "relay")
            self.relays[key] = r
            self.edges[key] = CutEdge(
                stage=k, source=a.name, source_module=module_of(a), source_place=_place_label(a),
                readers=[], scalars=scalars_per_sample(a, self.gm.meta.get(BATCH_KEY, 1)),
                lam=lam, bypass=place_of(a) < k - 1, into_head=False)
        edge = self.edges[key]
        label = f"head {k}" if head else (module_of(user) or user.name)
        if label not in edge.readers:
            edge.readers.append(label)
        edge.into_head |= head
        return self.relays[key]

    # -- heads ---------------------------------------------------------------------
    def _head(self, k: int):
        K = self.K
        hmap: dict[fx.Node, fx.Node] = {}
        used: set[fx.Node] = set()

        def read(a: fx.Node) -> fx.Node:
            if a in hmap:
                return hmap[a]
            if a.op == "get_attr":
                return self._head_attr(a, k)
            if _carries(a):
                if place_of(a) == K - 1 and k < K - 1:
                    t = self._terminal(a, k, used)
                    hmap[a] = self.env[t]
                    self.head_inputs[k][a.name] = t.name
                    return hmap[a]
                if _stage(a) < k:
                    return self._relay(a, k, a, head=True)
                if _stage(a) == k:
                    return self.env[a]
                raise RegionSpecError(
                    f"the epilogue reads {a.name} ({module_of(a) or '<top level>'}) from stage "
                    f"{_stage(a)}, not only from the last stage; the head of stage {k} would "
                    f"need a later stage's value. Put {module_of(a) or a.name!r} in the last "
                    f"stage, or merge stages {k}..{_stage(a)}")
            if a.op == "placeholder" or _stage(a) <= k:
                return self.env[a]
            # a shape or static value made in a later stage: the head recomputes it
            new = self.G.node_copy(a, read)
            self._tag(new, k, "head")
            hmap[a] = new
            return new

        for n in self.nodes:
            if n.op == "output" or place_of(n) != K:
                continue
            new = self._delta_call(n, k, read) if n.op == "call_module" else None
            if new is None:
                new = self.G.node_copy(n, read)
            self._tag(new, k, "head")
            hmap[n] = new
        return fx.map_arg(self.out.args[0], read)

    def _terminal(self, a: fx.Node, k: int, used: set[fx.Node]) -> fx.Node:
        """Stage k's tensor that plays the role of the last stage's ``a`` in head k: the
        latest tensor of stage k with a's shape that a later stage reads."""
        want = [(t.shape, t.dtype) for t in tensors_of(a)]
        cands = [t for t in self.nodes
                 if t.op != "get_attr" and _carries(t) and _stage(t) == k and t not in used
                 and [(m.shape, m.dtype) for m in tensors_of(t)] == want
                 and any(place_of(u) > k for u in t.users)]
        if not cands:
            outs = [f"{t.name} {[tuple(m.shape) for m in tensors_of(t)]}" for t in self.nodes
                    if _carries(t) and _stage(t) == k and any(place_of(u) > k for u in t.users)]
            raise RegionSpecError(
                f"stage {k} ({', '.join(self.regions[k])}) hands on no tensor shaped like "
                f"{a.name} {[tuple(m.shape) for m in tensors_of(a)]}, the last stage's output "
                f"that the epilogue reads; a stage head reruns the epilogue on its stage's "
                f"output, so every stage must end in the same shape (stage {k} hands on: "
                f"{', '.join(outs) or 'nothing'}). Choose boundaries between such layers")
        t = cands[-1]
        used.add(t)
        return t

    def _delta(self, k: int, path: str, param: nn.Parameter) -> fx.Node:
        """``W + W_k``: the shared parameter plus stage k's zero-initialised delta."""
        key = (k, id(param))
        if key not in self.deltas:
            name = f"spl_heads.{k}.{_mangle(path)}"
            base = self.G.get_attr(path)
            delta = self.G.get_attr(name)
            add = self.G.call_function(operator.add, (base, delta))
            for n in (base, delta, add):
                self._tag(n, k, "head")
            self.deltas[key] = (name, param, add)
        return self.deltas[key][2]

    def _head_attr(self, a: fx.Node, k: int) -> fx.Node:
        if self.heads == "shared":
            return self.env[a]
        try:
            obj = self.gm.get_parameter(a.target)
        except AttributeError:
            return self.env[a]
        if not (obj.requires_grad and obj.is_floating_point()):
            return self.env[a]
        return self._delta(k, a.target, obj)

    def _delta_call(self, n: fx.Node, k: int, read) -> fx.Node | None:
        if self.heads == "shared":
            return None
        module = self.gm.get_submodule(n.target)
        params = {name: p for name, p in module.named_parameters()
                  if p.requires_grad and p.is_floating_point()}
        if not params:
            return None
        overrides = {name: self._delta(k, f"{n.target}.{name}", p) for name, p in params.items()}
        mod = self.G.get_attr(n.target)
        self._tag(mod, k, "head")
        new = self.G.call_function(_call_with, (mod, overrides, *fx.map_arg(n.args, read)),
                                   fx.map_arg(n.kwargs, read))
        new.meta = dict(n.meta)
        return new


# ----------------------------------------------------------------------- stage programs

@dataclass
class StageProgram:
    """Stage k's program: ``(head output or None, *exports) = graph(*inputs)``; stage 0
    also takes the model's inputs first. ``inputs`` and ``exports`` are SPL-graph names."""

    stage: int
    graph: fx.Graph
    inputs: list[str]
    exports: list[str] = field(default_factory=list)


def _is_static(n: fx.Node) -> bool:
    return (n.op not in ("placeholder", "get_attr") and not n.meta.get(DATA_KEY)
            and bool(tensors_of(n)))


def split_stages(G: fx.Graph, K: int, heads: Iterable[int]) -> list[StageProgram]:
    """One program per stage from the SPL graph, with the heads in ``heads``. A stage
    receives data values and sizes from earlier programs and recomputes static tensors,
    so no autograd graph is shared between stages except through relays."""
    heads = set(heads)
    nodes = list(G.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    out = nodes[-1]
    phs = [n for n in nodes if n.op == "placeholder"]

    def included(n: fx.Node, k: int) -> bool:
        role = n.meta.get(ROLE_KEY)
        if n.meta.get(STAGE_KEY) != k or n.op in ("placeholder", "get_attr", "output"):
            return False
        if role == "head":
            return k in heads
        if role == "relay":  # read by an included node, or returned by head k itself
            return any(included(u, k) or (u.op == "output" and k in heads) for u in n.users)
        return True

    exported: dict[int, list[fx.Node]] = {k: [] for k in range(K)}
    programs: list[StageProgram] = []
    envs: list[dict] = []
    for k in range(K):
        local = [n for n in nodes if included(n, k)]
        ext: list[fx.Node] = []
        dup: set[fx.Node] = set()
        seen: set[fx.Node] = set()

        def need(a: fx.Node, k=k, ext=ext, dup=dup, seen=seen) -> None:
            if a in seen or a.op == "get_attr" or (a.op == "placeholder" and k == 0):
                return
            seen.add(a)
            if a.op != "placeholder" and a.meta.get(STAGE_KEY) == k:
                return
            if _is_static(a):
                dup.add(a)
                for b in a.all_input_nodes:
                    need(b)
            else:
                ext.append(a)
                src = 0 if a.op == "placeholder" else a.meta[STAGE_KEY]
                if a not in exported[src]:
                    exported[src].append(a)

        for n in local:
            for a in n.all_input_nodes:
                need(a)
        body = set(local) | dup
        attrs = {a for n in body for a in n.all_input_nodes if a.op == "get_attr"}
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if k == 0:
            for ph in phs:
                env[ph] = g.node_copy(ph)
        for a in ext:
            env[a] = g.placeholder(a.name)
            env[a].meta = dict(a.meta)
        for n in sorted(body | attrs, key=order.__getitem__):
            env[n] = g.node_copy(n, env.__getitem__)
        programs.append(StageProgram(k, g, [a.name for a in ext]))
        envs.append(env)
    for k, prog in enumerate(programs):
        head = fx.map_arg(out.args[0][k], envs[k].__getitem__) if k in heads else None
        prog.graph.output((head, *[envs[k][n] for n in exported[k]]))
        prog.exports = [n.name for n in exported[k]]
        prog.graph.lint()
    return programs


# ----------------------------------------------------------------------- the module

@dataclass(frozen=True)
class SPLConfig:
    """A configuration (pi, H) of C(L), with the relay and the loss scaling."""

    regions: tuple[tuple[str, ...], ...]
    heads: str
    relay: tuple[float, ...]   # lambda per boundary
    alpha: float

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(r) for r in self.regions)


class SPLModule(nn.Module):
    """The stage-partitioned model: shares every parameter with the model it came from
    (same names), plus ``spl_heads`` (per-stage head deltas) when ``heads="per-stage"``;
    ``spl_config`` holds (pi, H), the relay and alpha.

    ``spl(x)`` is ``model(x)`` (the last stage through its head); ``stage_outputs(x)``
    gives all K; ``stage_loss(x, loss_fn)`` the training loss; ``forward_backward`` runs
    a whole step, optionally interleaving each stage's backward with the forward.
    """

    def __init__(self, gm: fx.GraphModule, builder: _CutBuilder, *, alpha: float,
                 capture: str = "", pytree_info=None):
        super().__init__()
        reserved = set(dir(SPLModule)) | {"spl_config", "spl_heads"}
        for name in [n for n, _ in gm.named_children()] + [
                n for n, _ in itertools.chain(gm.named_parameters(recurse=False),
                                              gm.named_buffers(recurse=False))]:
            if name in reserved:
                raise InputError(f"the model's attribute {name!r} clashes with a name of the "
                                 "stage-partitioned module; rename it in the model")
        adopt_state(self, gm)
        self.spl_config = SPLConfig(tuple(tuple(r) for r in builder.regions), builder.heads,
                                    tuple(builder.lams), float(alpha))
        self._capture = capture
        self._graph = builder.G
        self._edges = list(builder.edges.values())
        self._head_inputs = builder.head_inputs
        self._pytree_info = pytree_info
        self._n_inputs = sum(1 for n in builder.G.nodes if n.op == "placeholder")
        if builder.heads == "per-stage":
            self.spl_heads = nn.ModuleList(nn.ParameterDict() for _ in builder.regions)
            for name, param, _ in builder.deltas.values():
                _, k, key = name.split(".", 2)
                self.spl_heads[int(k)][key] = nn.Parameter(torch.zeros_like(param.detach()))
        self._compiled: dict = {}

    @property
    def num_stages(self) -> int:
        return len(self.spl_config.regions)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_compiled"] = {}
        return state

    def _apply(self, fn, recurse=True):
        self._compiled = {}  # programs hold references to tensors .to() may replace
        return super()._apply(fn, recurse)

    @property
    def graph(self) -> fx.GraphModule:
        """The whole SPL forward after the cut (relays and K heads), printable."""
        return fx.GraphModule(self, self._graph, "SPLGraph")

    def programs(self, heads: str = "all") -> list[tuple[StageProgram, fx.GraphModule]]:
        """Stage programs with every head (``"all"``) or the last only (``"last"``)."""
        if heads not in self._compiled:
            K = self.num_stages
            which = range(K) if heads == "all" else [K - 1]
            progs = split_stages(self._graph, K, which)
            self._compiled[heads] = [(p, fx.GraphModule(self, p.graph, f"Stage{p.stage}"))
                                     for p in progs]
        return self._compiled[heads]

    # -- running ---------------------------------------------------------------------
    def _flatten(self, args, kwargs) -> list:
        if self._pytree_info is not None:
            return list(pytree.arg_tree_leaves(*args, **kwargs))
        if kwargs:
            raise InputError("pass the model's inputs positionally to a stage-partitioned model")
        return list(args)

    def _unflatten(self, out):
        info = self._pytree_info
        if info is not None and info.out_spec is not None:
            return pytree.tree_unflatten(list(out), info.out_spec)
        return out

    def _run(self, flat: list, heads: str, after: Callable | None = None) -> list:
        """Run the stage programs in order. ``after(k, head_out)`` runs right after stage
        k; when it returns True, the values handed to later stages are detached (their
        graph is spent)."""
        env: dict = {}
        outs = []
        for prog, gm in self.programs(heads):
            args = (list(flat) if prog.stage == 0 else []) + [env[n] for n in prog.inputs]
            head, *vals = gm(*args)
            del args
            head = None if head is None else self._unflatten(head)
            if after is not None and after(prog.stage, head):
                vals = [v.detach() if isinstance(v, torch.Tensor) else v for v in vals]
                head = None  # spent: keep no stage's logits or graph alive
            outs.append(head)
            env.update(zip(prog.exports, vals))
            del vals
        return outs

    def forward(self, *args, **kwargs):
        """What ``model(*args)`` returns: the last stage through its head."""
        return self._run(self._flatten(args, kwargs), "last")[-1]

    def stage_outputs(self, *args, **kwargs) -> list:
        """The K stage outputs, each stage's output through its head (Eq. 4)."""
        return self._run(self._flatten(args, kwargs), "all")

    def _weights(self, weights: Sequence[float] | None) -> list[float]:
        K = self.num_stages
        scale = K ** (1.0 - self.spl_config.alpha)
        if weights is None:
            return [1.0 / scale] * K
        if len(weights) != K:
            raise InputError(f"weights has {len(weights)} entries for {K} stages")
        return [float(w) / scale for w in weights]

    def stage_loss(self, x, loss_fn: Callable, *, weights: Sequence[float] | None = None):
        """``(total, [loss_k])`` with total = sum_k w_k loss_fn(z_k) / K^(1 - alpha) (w_k = 1:
        Eq. 5; ``weights`` = tau gives the soft loss of Eq. 29)."""
        args = x if isinstance(x, tuple) else (x,)
        losses = [loss_fn(z) for z in self.stage_outputs(*args)]
        w = self._weights(weights)
        total = sum(wk * lk for wk, lk in zip(w, losses))
        return total, losses

    def forward_backward(self, x, loss_fn: Callable, *, schedule: str = "joint",
                         weights: Sequence[float] | None = None) -> tuple[float, list[float]]:
        """Forward and backward of the stage loss; gradients accumulate in ``.grad``.

        ``"joint"``: one backward of the total. ``"interleaved"``: stage k's backward runs
        right after its forward and its graph is freed before stage k+1 runs, so only one
        stage's activations are alive at a time (the locality of property P4). Both give
        the same gradients; interleaving needs every relay at 0.
        """
        if schedule not in SCHEDULES:
            raise InputError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
        args = x if isinstance(x, tuple) else (x,)
        w = self._weights(weights)
        if schedule == "joint":
            total, losses = self.stage_loss(args, loss_fn, weights=weights)
            total.backward()
            return float(total.detach()), [float(v.detach()) for v in losses]
        if any(v != 0 for v in self.spl_config.relay):
            raise InputError(
                f"schedule='interleaved' needs relay 0 on every boundary (got "
                f"{list(self.spl_config.relay)}): "
                "with lambda > 0 a later stage's loss sends gradient into stages whose "
                "graphs are already freed; use schedule='joint'")
        losses: list[float] = []

        def after(k: int, head) -> bool:
            loss = loss_fn(head)
            if (w[k] * loss).requires_grad:
                (w[k] * loss).backward()
            losses.append(float(loss.detach()))
            return True

        self._run(self._flatten(args, {}), "all", after)
        return sum(wk * lk for wk, lk in zip(w, losses)), losses

    def report(self) -> SPLReport:
        """Edges cut per boundary, bypass edges, parameters shared across stages, and the
        locality check on the graph that runs (networkx)."""
        return spl_report(self)


# ----------------------------------------------------------------------- entry point

def _normalize_relay(relay_: object, K: int) -> list[float]:
    vals = list(relay_) if isinstance(relay_, (list, tuple)) else [relay_] * (K - 1)
    if len(vals) != K - 1:
        raise InputError(f"relay has {len(vals)} entries but {K} stages have {K - 1} boundaries")
    out = []
    for i, v in enumerate(vals):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise InputError(f"relay for boundary {i + 1} must be a number in [0, 1], got {v!r} "
                             "(0 detaches, 1 passes the gradient unchanged)")
        out.append(float(v))
    return out


def stage_partition(
    model: nn.Module,
    regions: RegionSpec,
    *,
    example_inputs: Sequence[object],
    heads: str = "shared",
    relay: float | Sequence[float] = 0.0,
    alpha: float = 1.0,
    leaf_modules: Iterable[type | str] = (),
) -> SPLModule:
    """Stage-partitioned learning on ``model``: ``regions`` are the K stages (e.g.
    ``lbi_fx.composition((1, 3, 2), "layers")``; one region is backprop itself).

    ``heads``: ``"shared"`` (every stage uses the model's epilogue, Eq. 4 with H = sh) or
    ``"per-stage"`` (plus a zero-initialised delta per stage on the epilogue's parameters,
    H = ps). ``relay``: lambda in [0, 1], one for all boundaries or one per boundary.
    ``alpha``: the total loss is sum_k loss_k / K^(1 - alpha). Parameters are shared
    with ``model``.
    """
    if heads not in HEADS:
        raise InputError(f"heads={heads!r}: choose one of {', '.join(HEADS)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"alpha={alpha!r}: a finite number (1: sum of stage losses, 0: mean)")
    a = analyze(model, regions, example_inputs, leaf_modules=leaf_modules, min_regions=1)
    lams = _normalize_relay(relay, a.num_regions)
    if not any(p.dtype.is_floating_point for p in a.gm.parameters()):
        raise InputError("the model has no floating-point parameters; nothing to train")
    builder = _CutBuilder(a.gm, a.regions, lams, heads)
    builder.build()
    info = getattr(a.gm.graph._codegen, "pytree_info", None)
    return SPLModule(a.gm, builder, alpha=alpha, capture=a.gm.meta.get("lbi_capture", ""),
                     pytree_info=info)


# ----------------------------------------------------------------------- locality check

def _cuts_gradient(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is relay:
        return node.args[1] == 0.0
    return (node.op == "call_method" and node.target == "detach") or (
        node.op == "call_function" and node.target in (torch.detach, torch.Tensor.detach))


def _params_of(obj) -> list[nn.Parameter]:
    if isinstance(obj, nn.Parameter):
        return [obj]
    if isinstance(obj, nn.Module):
        return list(obj.parameters())
    return []


def gradient_graph(spl: SPLModule):
    """The programs that run, as one networkx DiGraph of gradient edges: parameter
    nodes ``("param", name)``, program nodes ``(k, node)``, loss sinks ``("loss", k)``.
    A relay with lambda = 0 or a detach has no edge from its input."""
    import networkx as nx

    names = {id(p): n for n, p in spl.named_parameters()}
    g = nx.DiGraph()
    for prog, gm in spl.programs("all"):
        k = prog.stage
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ext = phs[spl._n_inputs:] if k == 0 else phs
        for ph, src in zip(ext, prog.inputs):
            g.add_edge(("value", src), (k, ph.name))
        for node in gm.graph.nodes:
            me = (k, node.name)
            g.add_node(me, stage=k, role=node.meta.get(ROLE_KEY), data=bool(node.meta.get(DATA_KEY)))
            if node.op == "output":
                head, *exports = node.args[0]
                for a in pytree.tree_leaves(head):
                    if isinstance(a, fx.Node):
                        g.add_edge((k, a.name), ("loss", k))
                for a, name in zip(exports, prog.exports):
                    g.add_edge((k, a.name), ("value", name))
                continue
            if node.op in ("get_attr", "call_module"):
                obj = gm.get_submodule(node.target) if node.op == "call_module" else _fetch(gm, node.target)
                for p in _params_of(obj):
                    if p.requires_grad and id(p) in names:
                        g.add_edge(("param", names[id(p)]), me)
            if _cuts_gradient(node):
                continue
            for a in node.all_input_nodes:
                g.add_edge((k, a.name), me)
    return g


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _owners(g, start) -> list[str]:
    """Where a parameter first meets data: the data nodes (or head nodes) it feeds through
    static nodes only."""
    seen, stack, found = {start}, [start], set()
    while stack:
        for v in g.successors(stack.pop()):
            if v in seen or v[0] in ("loss", "value", "param"):
                continue
            seen.add(v)
            attrs = g.nodes[v]
            if attrs.get("role") == "head" and attrs.get("data"):
                found.add(f"head {attrs['stage']}")
            elif attrs.get("data"):
                found.add(f"stage {attrs['stage']}")
            else:
                stack.append(v)
    return sorted(found, key=lambda s: (s.split()[0] == "head", int(s.split()[1])))


def spl_report(spl: SPLModule) -> SPLReport:
    import networkx as nx

    g = gradient_graph(spl)
    K = spl.num_stages
    params, violations = [], []
    for name, p in spl.named_parameters():
        node = ("param", name)
        if not p.requires_grad or node not in g:
            continue
        down = nx.descendants(g, node)
        reaches = sorted(j for j in range(K) if ("loss", j) in down)
        owners = _owners(g, node)
        allowed: set[int] = set()
        for o in owners:
            kind, k = o.split()[0], int(o.split()[1])
            allowed.add(k)
            if kind == "stage":
                allowed |= {j for j in range(k + 1, K)
                            if _edge_lambda(spl.spl_config.relay, k, j) > 0}
        params.append(ParamReach(name, p.numel(), owners, reaches, sorted(allowed)))
        for j in reaches:
            if j not in allowed:
                path = nx.shortest_path(g, node, ("loss", j))
                violations.append(Violation(name, owners, j, [_label(v) for v in path]))
    cfg = spl.spl_config
    return SPLReport(regions=[list(r) for r in cfg.regions], heads=cfg.heads,
                     relay=list(cfg.relay), alpha=cfg.alpha, edges=list(spl._edges),
                     head_inputs=spl._head_inputs, params=params, violations=violations,
                     capture=spl._capture)


def _label(v) -> str:
    if v[0] in ("param", "loss", "value"):
        return f"{v[0]} {v[1]}"
    return f"{v[1]}@{v[0]}"


# ----------------------------------------------------------------------- scorers

def stage_nats(outputs: Sequence[torch.Tensor], targets: torch.Tensor, scorer: str = "last"
               ) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of K stage logits under one scorer:
    ``"last"`` the last stage, ``"mean-stage"`` the mean of the stages' losses,
    ``"sum-logits"`` softmax of the summed stage logits (Log-OP, Eq. 17)."""
    if scorer not in SCORERS:
        raise InputError(f"scorer={scorer!r}: choose one of {', '.join(SCORERS)}")

    def up(z):  # half-precision logits are scored in fp32
        return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z

    def ce(z):
        return F.cross_entropy(up(z).reshape(-1, z.size(-1)), targets.reshape(-1))

    if scorer == "last":
        return ce(outputs[-1])
    if scorer == "mean-stage":
        return torch.stack([ce(z) for z in outputs]).mean()
    return ce(torch.stack([up(z) for z in outputs]).sum(0))


def bits_per_byte(nats: float) -> float:
    """Byte-level models: one token per byte, so BPB = nats / ln 2."""
    return float(nats) / math.log(2)


@torch.no_grad()
def stage_bpb(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Bits per byte under every scorer from one forward; a plain model (one output) gets
    the same number under all three."""
    outs = model.stage_outputs(x) if isinstance(model, SPLModule) else [model(x)]
    return {s: bits_per_byte(stage_nats(outs, y, s)) for s in SCORERS}
