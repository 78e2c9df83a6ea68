"""The cut graph split into one program per stage, so that each stage can run, and free,
its forward and backward on its own: a stage takes data values from earlier programs and
recomputes the static tensors it reads, so no autograd graph spans two stages except
through a relay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.fx as fx

from lbi_fx.passes.mark_dynamic import DATA_KEY
from lbi_fx.passes.shape_prop import tensors_of
from lbi_fx.spl.cut import ROLE_KEY, STAGE_KEY


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
