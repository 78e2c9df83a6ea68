"""Sizes that survive ``vmap``: export's size ops become ``Tensor.size`` calls.

``torch.export`` records every size the model reads as ``aten.sym_size.int(x, d)`` (and
``sym_numel``, ``sym_stride``). Under ``vmap`` - the recompute strategy reruns a region
on replicas of the batch - those ops meet the batched tensor and fail, where the model's
own ``x.size(d)`` would have given the per-sample size. This pass puts the method back.
"""

from __future__ import annotations

import torch.fx as fx

_SIZE_OPS = {"sym_size.int": "size", "sym_numel.default": "numel",
             "sym_stride.int": "stride", "sym_storage_offset.default": "storage_offset"}


def vmappable_sizes(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace ``aten.sym_size.int(x, d)`` (and numel, stride) with ``x.size(d)``: the same
    value in eager mode, and under ``vmap`` the per-sample size the model's code meant."""
    changed = False
    for node in list(gm.graph.nodes):
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        method = _SIZE_OPS.get(name) if str(node.target).startswith("aten.sym_") else None
        if method is None:
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_method(method, node.args, node.kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return gm
