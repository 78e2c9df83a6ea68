"""Split the rewritten graph into place programs: prologue, K regions, epilogue.

Each program is an ``fx.Graph`` with named inputs and outputs, so a runtime can move
values between them through a dict. What may cross between programs is exactly what
the bounded-interface property allows:

* prologue values (the canvas, masks, token ids) into any later place;
* m_k into region k (its first input), and the last region's outputs into the epilogue;
* non-tensor values (sizes) from any earlier place.

Static tensors computed inside a region and read by a later place (a weight transform,
a mask) are recomputed there: their gradient then reaches the parameters through each
reader's own backward, which keeps region backward passes independent. Anything else is
a dynamic value bypassing the interface and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from lbi_fx.errors import SeparatorError

from .mark_dynamic import is_dynamic
from .partition import PROLOGUE, module_of, place_name, place_of
from .shape_prop import tensors_of


@dataclass
class Program:
    place: int
    graph: fx.Graph
    inputs: list[str]
    outputs: list[str] = field(default_factory=list)


@dataclass
class Programs:
    prologue: Program
    regions: list[Program]
    epilogue: Program
    m_nodes: list[str]

    @property
    def num_regions(self) -> int:
        return len(self.regions)


def _external_needs(nodes: list[fx.Node], place: int) -> tuple[list[fx.Node], set[fx.Node]]:
    """Inputs a place must receive, and static nodes from earlier regions it recomputes."""
    ext: list[fx.Node] = []
    dup: set[fx.Node] = set()
    seen: set[fx.Node] = set()

    def need(n: fx.Node) -> None:
        if n in seen or n.op == "get_attr" or place_of(n) == place:
            return
        seen.add(n)
        recomputable = (place_of(n) >= 0 and not is_dynamic(n) and bool(tensors_of(n))
                        and n.op != "placeholder")
        if recomputable:
            dup.add(n)
            for a in n.all_input_nodes:
                need(a)
        else:
            ext.append(n)

    for n in nodes:
        for a in n.all_input_nodes:
            need(a)
    return ext, dup


def split_places(gm: fx.GraphModule, num_regions: int, m_nodes: list[str]) -> Programs:
    K = num_regions
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    exported: dict[int, list[fx.Node]] = {p: [] for p in range(PROLOGUE, K + 1)}
    programs: dict[int, Program] = {}
    envs: dict[int, dict[fx.Node, fx.Node]] = {}
    for p in range(PROLOGUE, K + 1):
        local = [n for n in nodes if place_of(n) == p and n.op != "get_attr"
                 and (n.op != "placeholder" or p == PROLOGUE)]
        ext, dup = _external_needs(local, p)
        if 0 <= p < K:
            m_name = m_nodes[p]
            ext.sort(key=lambda n: (n.name != m_name, order[n]))
        for n in ext:
            _check_crossing(n, p, K, m_nodes)
            if n not in exported[place_of(n)]:
                exported[place_of(n)].append(n)
        body = sorted(set(local) | dup | _get_attrs(local, dup), key=order.__getitem__)
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in ext:
            ph = g.placeholder(n.name)
            ph.meta = dict(n.meta)
            env[n] = ph
        for n in body:
            if n.op == "output":
                continue
            env[n] = g.node_copy(n, env.__getitem__)
        programs[p] = Program(p, g, [n.name for n in ext])
        envs[p] = env
        if p == K:
            out = next(n for n in nodes if n.op == "output")
            g.output(fx.map_arg(out.args[0], env.__getitem__))
    for p in range(PROLOGUE, K):
        outs = exported[p]
        if 0 <= p < K - 1:
            nxt = by_name[m_nodes[p + 1]]
            outs = [nxt] + [n for n in outs if n is not nxt]
        prog = programs[p]
        prog.graph.output(tuple(envs[p][n] for n in outs))
        prog.outputs = [n.name for n in outs]
    for prog in programs.values():
        prog.graph.lint()
    programs[PROLOGUE].inputs = [n.name for n in nodes if n.op == "placeholder"]
    return Programs(programs[PROLOGUE], [programs[k] for k in range(K)], programs[K], list(m_nodes))


def _get_attrs(local: list[fx.Node], dup: set[fx.Node]) -> set[fx.Node]:
    return {a for n in [*local, *dup] for a in n.all_input_nodes if a.op == "get_attr"}


def _check_crossing(n: fx.Node, p: int, K: int, m_nodes: list[str]) -> None:
    """Only m_k enters region k dynamically; only the last region feeds the epilogue."""
    if not is_dynamic(n):
        return
    if p < K and n.name == m_nodes[p]:
        return
    if p == K and place_of(n) == K - 1:
        return
    raise SeparatorError(
        f"{n.name} ({module_of(n) or '<top level>'}, {place_name(place_of(n), K)}) reaches "
        f"{place_name(p, K)} without passing through the interface; this is a bug in the "
        "rewrite or an unsupported pattern - please report it with `lbi-fx inspect` output"
    )
