"""Prune the prologue to the outputs one rank reads.

Under region parallelism every rank runs the prologue itself, but a rank needs only the
prologue outputs its own regions (and, on the last rank, the epilogue) read. Computing the
others would need parameters the rank does not hold - under ``canvas_weights="per_region"``
every other region's copy of the embedding. The pruned program returns ``None`` in place
of each output nobody on the rank reads, and dead-code elimination drops what only those
outputs needed, so the parameters they read are never touched (and may live on the meta
device).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
from torch import nn


def prune_outputs(graph: fx.Graph, outputs: list[str], keep: Iterable[str],
                  root: nn.Module) -> fx.Graph:
    """A copy of ``graph`` (a program whose output tuple is named ``outputs``, its modules
    under ``root``) that returns None for every output not in ``keep``; the arity stays,
    so callers zip names as before."""
    keep = set(keep)
    g = fx.Graph(owning_module=root)
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(graph, env)
    values = out if isinstance(out, (tuple, list)) else (out,)
    pruned = tuple(v if name in keep else None for name, v in zip(outputs, values))
    g.output(pruned)
    g.eliminate_dead_code()
    return g

