"""Separator check (Def. A.1, Lemma A.2, Remark A.3) with networkx max-flow.

For boundary k every *dynamic* path from R_<k into R_>=k (the epilogue included) must
pass through the interface. Menger's theorem turns "how small can the interface be"
into a minimum vertex cut: split each node v into v_in -> v_out with capacity equal to
the scalars per sample it holds, leave data edges uncapacitated, and run max-flow
from every dynamic node of R_<k to every first node of R_>=k on such a path.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

import networkx as nx
import torch.fx as fx

from lbi_fx.errors import RegionSpecError
from lbi_fx.regions import suggest
from lbi_fx.report import BoundaryReport, NodeRef

from .mark_dynamic import is_dynamic
from .partition import module_of, place_name, place_of
from .shape_prop import output_tensor, scalars_per_sample

_SRC, _DST = ("__source__",), ("__sink__",)


def min_vertex_separator(
    graph: nx.DiGraph,
    sources: Iterable[Hashable],
    sinks: Iterable[Hashable],
    weight: Callable[[Hashable], float],
) -> tuple[float, set]:
    """Minimum-weight node set meeting every directed path from ``sources`` to ``sinks``.

    Sources and sinks may themselves be cut. Returns ``(weight, nodes)``.
    """
    sources, sinks = set(sources), set(sinks)
    if not sources or not sinks:
        return 0, set()
    flow = nx.DiGraph()
    for v in graph.nodes:
        flow.add_edge((v, 0), (v, 1), capacity=weight(v))
    for u, v in graph.edges:
        flow.add_edge((u, 1), (v, 0))  # no capacity attribute: infinite
    for s in sources:
        flow.add_edge(_SRC, (s, 0))
    for t in sinks:
        flow.add_edge((t, 1), _DST)
    value, (reach, _) = nx.minimum_cut(flow, _SRC, _DST)
    cut = {v for v in graph.nodes if (v, 0) in reach and (v, 1) not in reach}
    return value, cut


def dynamic_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph restricted to dynamic nodes (the only carriers across regions)."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        if is_dynamic(node):
            g.add_node(node.name, fx_node=node)
            for src in node.all_input_nodes:
                if is_dynamic(src):
                    g.add_edge(src.name, node.name)
    return g


def _ref(node: fx.Node, batch: int, num_regions: int) -> NodeRef:
    t = output_tensor(node)
    return NodeRef(
        node=node.name,
        module=module_of(node),
        place=place_name(place_of(node), num_regions),
        shape=tuple(t.shape) if t is not None else None,
        scalars=scalars_per_sample(node, batch),
    )


def interface_nodes(gm: fx.GraphModule, entry: str | fx.Node | Sequence) -> set[str]:
    """Node names standing for one boundary's interface: a node, or a module's outputs."""
    if isinstance(entry, fx.Node):
        return {entry.name}
    if isinstance(entry, (list, tuple)):
        return set().union(*(interface_nodes(gm, e) for e in entry))
    names = {n.name: n for n in gm.graph.nodes}
    if entry in names:
        return {entry}
    inside = [n for n in gm.graph.nodes
              if module_of(n) == entry or module_of(n).startswith(entry + ".")]
    inside = [n for n in inside if n.op != "get_attr"]
    if not inside:
        known = sorted({module_of(n) for n in gm.graph.nodes if module_of(n)} | set(names))
        raise RegionSpecError(
            f"interface {entry!r} is neither a node nor a module of the model"
            f"{suggest(str(entry), known)}"
        )
    member = {n.name for n in inside}
    return {n.name for n in inside if any(u.name not in member for u in n.users)}


def _witness(g: nx.DiGraph, sources: set, sinks: set, removed: set, via=None) -> list[str] | None:
    """One dynamic path from R_<k into R_>=k avoiding ``removed`` (through ``via`` if given)."""
    h = g.subgraph([v for v in g.nodes if v not in removed]).copy()
    h.add_edges_from((_SRC, s) for s in sources if s in h)
    h.add_edges_from((t, _DST) for t in sinks if t in h)
    try:
        if via is not None and via in h:
            path = nx.shortest_path(h, _SRC, via)[:-1] + nx.shortest_path(h, via, _DST)
        else:
            path = nx.shortest_path(h, _SRC, _DST)
    except (nx.NetworkXNoPath, nx.NodeNotFound):
        return None
    path = [p for p in path if p not in (_SRC, _DST)]
    # Lead in from the start of the earlier region so the path shows where it came from.
    while True:
        preds = [p for p in g.predecessors(path[0]) if p in sources and p not in removed]
        if not preds or len(path) > 12:
            break
        path.insert(0, preds[0])
    return path


def boundary_reports(
    gm: fx.GraphModule,
    num_regions: int,
    batch: int,
    *,
    rank: Sequence[int] | None = None,
    interfaces: Sequence | None = None,
) -> list[BoundaryReport]:
    """One report per boundary k = 1..K-1 (crossing tensors, min cut, separator, witness)."""
    g = dynamic_graph(gm)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    fxn = {v: g.nodes[v]["fx_node"] for v in g.nodes}
    place = {v: place_of(fxn[v]) for v in g.nodes}
    size = {v: scalars_per_sample(fxn[v], batch) for v in g.nodes}
    reports = []
    for k in range(1, num_regions):
        before = {v for v in g.nodes if place[v] < k}
        entries = {w for w in g.nodes if place[w] >= k and any(p in before for p in g.predecessors(w))}
        crossing = sorted((u for u in before if any(place[w] >= k for w in g.successors(u))),
                          key=order.__getitem__)
        sub = g.subgraph(before | entries)
        value, cut = min_vertex_separator(sub, before, entries, size.__getitem__)
        value = int(value)
        limit = rank[k - 1] if rank is not None else None
        iface = None
        witness = None
        if interfaces is not None:
            removed = interface_nodes(gm, interfaces[k - 1])
            iface = sorted(removed)
            witness = _witness(g, before, entries, removed)
            ok = witness is None
        else:
            ok = limit is None or value <= limit
            if not ok:
                biggest = max(cut, key=size.__getitem__) if cut else None
                witness = _witness(g, before, entries, set(), via=biggest)
        refs = lambda names: [_ref(fxn[v], batch, num_regions) for v in names]  # noqa: E731
        reports.append(BoundaryReport(
            index=k,
            crossing=refs(crossing),
            min_cut_scalars=value,
            separator=refs(sorted(cut)),
            ok=ok,
            limit=limit,
            interface=iface,
            witness=refs(witness) if witness else None,
        ))
    return reports


def graph_summary(gm: fx.GraphModule, num_regions: int) -> dict:
    """Nodes and edges for drawing (``SeparatorReport.to_dot``); get_attrs left out."""
    nodes, edges = [], []
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "output"):
            continue
        nodes.append({"name": n.name, "module": module_of(n),
                      "place": place_name(place_of(n), num_regions), "dynamic": is_dynamic(n)})
        edges.extend((a.name, n.name) for a in n.all_input_nodes if a.op != "get_attr")
    return {"nodes": nodes, "edges": edges}
