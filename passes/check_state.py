"""Refuse forward passes that write state the rewrite cannot carry.

Two patterns break the bounded-interface model silently, so they are refused by name:

* a region writes a module buffer in place (``self.mem.copy_(y)``): a later region
  reading that buffer receives per-sample data through a channel the graph shows as a
  static ``get_attr``, bypassing m_k;
* a region mutates in place a value it receives from another place (the canvas, a
  mask): regions then see different values depending on execution order, which the
  scan backward's reruns and independent region graphs cannot reproduce.

In-place ops on a region's own tensors (including a crossing tensor's stand-in, which
the rewrite makes region-local) are fine.
"""

from __future__ import annotations

import torch.fx as fx

from lbi_fx.errors import RewriteError

from .mark_dynamic import is_dynamic
from .partition import module_of, place_name, place_of


def _is_inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.arguments and schema.arguments[0].alias_info is not None \
                and schema.arguments[0].alias_info.is_write:
            return True
    else:
        return False
    return name.endswith("_") and not name.endswith("__")


def check_state_writes(gm: fx.GraphModule, num_regions: int) -> None:
    for node in gm.graph.nodes:
        p = place_of(node)
        if not (0 <= p < num_regions) or not _is_inplace(node) or not node.args:
            continue
        target = node.args[0]
        if not isinstance(target, fx.Node):
            continue
        where = f"{node.name} ({module_of(node) or '<top level>'}, {place_name(p, num_regions)})"
        if target.op == "get_attr":
            raise RewriteError(
                f"{where} writes the buffer {target.target} during forward: a region may not "
                "keep per-call state in module buffers (a later region reading it would bypass "
                "the interface). Return the value instead, or keep the buffer out of the regions")
        if place_of(target) != p and not is_dynamic(target):
            raise RewriteError(
                f"{where} modifies {target.name} ({module_of(target) or '<top level>'}, "
                f"{place_name(place_of(target), num_regions)}) in place, a value shared with "
                f"other places; clone it inside {place_name(p, num_regions)} before changing it")

