"""The locality check, run on the stage programs that actually execute rather than on how
the cut was built: one networkx graph of gradient edges, and for every parameter the
losses it reaches against those its relays allow (Prop. 4.7 at lambda = 0).

``spl`` is an ``SPLModule``, typed as ``nn.Module`` because ``SPLModule.report`` calls in
here and the package keeps its imports acyclic (``tests/test_imports.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.passes.mark_dynamic import DATA_KEY
from lbi_fx.spl.cut import ROLE_KEY
from lbi_fx.spl.relays import _edge_lambda, relay
from lbi_fx.spl.report import ParamReach, SPLReport, Violation

if TYPE_CHECKING:
    import networkx as nx


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


def gradient_graph(spl: nn.Module) -> nx.DiGraph:
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


def spl_report(spl: nn.Module) -> SPLReport:
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
