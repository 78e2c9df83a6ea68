"""Dynamic/static classification (App. A): which values carry information between
regions.

A node is *dynamic* when it sits in a region or the epilogue, returns a tensor, and
reads the input data (directly, through the prologue, or through another dynamic
node). Everything else is *static*: the prologue (the canvas), and values computed
only from parameters, constants and shapes - causal masks, rotary tables, weight
transforms. Static values may feed any region without breaking sufficiency, and
non-tensor values (sizes, ints) carry no gradient, so they are static too.
"""

from __future__ import annotations

import torch.fx as fx

from .partition import PROLOGUE, place_of
from .shape_prop import SHAPE_KEY

DYNAMIC_KEY = "lbi_dynamic"
DATA_KEY = "lbi_reads_data"


def is_dynamic(node: fx.Node) -> bool:
    return node.meta.get(DYNAMIC_KEY, False)


def mark_dynamic(gm: fx.GraphModule) -> None:
    """Set ``meta[DYNAMIC_KEY]`` (and ``meta[DATA_KEY]``: depends on input data)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            reads = bool(node.meta.get(SHAPE_KEY))
        elif node.op == "get_attr":
            reads = False
        else:
            reads = any(a.meta.get(DATA_KEY, False) for a in node.all_input_nodes)
        has_tensor = bool(node.meta.get(SHAPE_KEY))
        # A size taken of a data tensor is a shape fact, not data.
        node.meta[DATA_KEY] = reads and has_tensor
        node.meta[DYNAMIC_KEY] = (
            node.op != "output" and place_of(node) != PROLOGUE and reads and has_tensor
        )
