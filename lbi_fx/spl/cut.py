"""The cut: the captured graph copied into one SPL graph, with relays and K heads.

A node *carries data* when it depends on the input (``mark_dynamic``). Every floating
data edge from an earlier place into stage k is relayed, whether it comes from stage k-1
or skips stages (an embedding / x0 bus, a long skip): a relay missing on a bypass edge
would let loss k train an earlier stage. Static values (masks, position tables,
parameter transforms) carry no data; each stage that reads one recomputes it, so every
stage's program can run its backward on its own (``schedule="interleaved"``).

Each stage's head is the model's epilogue (final norm, LM head) rerun on the stage's
output (Eq. 4): shared, or with a zero-initialised delta per stage (``"per-stage"``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from lbi_fx.errors import RegionSpecError
from lbi_fx.passes.mark_dynamic import DATA_KEY
from lbi_fx.passes.partition import PROLOGUE, module_of, place_of
from lbi_fx.passes.shape_prop import BATCH_KEY, SHAPE_KEY, scalars_per_sample, tensors_of
from lbi_fx.spl.relays import _edge_lambda, relay
from lbi_fx.spl.report import CutEdge

STAGE_KEY = "spl_stage"
ROLE_KEY = "spl_role"  # "body" (prologue + stage layers), "head", "relay"


def _call_with(module: nn.Module, params: dict, *args, **kwargs):
    """A head module called with per-stage parameters (W + W_k, Eq. 4 with H = ps)."""
    return torch.func.functional_call(module, params, args, kwargs)


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
