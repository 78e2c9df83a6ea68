"""Sequence axes: which axes of every tensor carry the input's positions.

Sizes cannot say it (a (B, D, L) activation with D == L looks like (B, L, D)), so the
graph is run a second time on example inputs whose sequence (axis 1 of every input of
the sequence's length) is one position longer or shorter: the axes whose size follows
the length are the sequence axes. ``meta[SEQ_KEY]`` holds, per tensor of
``tensors_of(node)``, a tuple of such axes (``()``: no sequence axis), or ``None``
where the second run could not tell.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves, tree_map

from .shape_prop import SHAPE_KEY, check_example_inputs, shapes_only

SEQ_KEY = "lbi_seq_axes"
SEQ_INPUTS_KEY = "lbi_seq_inputs"  # gm.meta: per tensor input leaf, does it carry the sequence


def sequence_length(example_inputs: Sequence[object]) -> int | None:
    """Axis-1 size of the first tensor input with at least two axes (the sequence the
    inputs carry on axis 1, batch first), or None."""
    for x in tree_leaves(list(example_inputs)):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return int(x.shape[1])
    return None


def resize_sequence(example_inputs: Sequence[object], length: int, new: int) -> list:
    """The inputs with axis 1 of every length-``length`` tensor cut or extended (the last
    position repeated) to ``new``."""
    def change(x):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != length:
            return x
        if new <= length:
            return x[:, :new].clone()
        reps = x[:, -1:].expand(x.shape[0], new - length, *x.shape[2:])
        return torch.cat([x, reps], dim=1)

    return tree_map(change, list(example_inputs))


class _Shapes(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, list[tuple[int, ...]]] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        self.shapes[n] = [tuple(x.shape) for x in tree_leaves(result) if isinstance(x, torch.Tensor)]
        return result


def _run_shapes(gm: fx.GraphModule, args: list) -> dict:
    saved = {k: b.detach().clone() for k, b in gm.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), shapes_only(gm, args) as args:
            interp = _Shapes(gm)
            interp.run(*args)
            return interp.shapes
    finally:
        with torch.no_grad():
            for k, b in gm.named_buffers():
                if k in saved and b.shape == saved[k].shape:
                    b.copy_(saved[k])


def mark_seq_axes(gm: fx.GraphModule, example_inputs: Sequence[object]) -> str:
    """Fill ``meta[SEQ_KEY]`` on every node that ``propagate_shapes`` saw; returns ""
    or why the sequence axes are unknown (every entry is then ``None``)."""
    example_inputs = check_example_inputs(example_inputs)
    for n in gm.graph.nodes:
        n.meta[SEQ_KEY] = [None] * len(n.meta.get(SHAPE_KEY, []))
    gm.meta[SEQ_INPUTS_KEY] = None
    length = sequence_length(example_inputs)
    if length is None:
        return "no example input has a sequence axis (axis 1 of a (B, L, ...) tensor)"
    flat = [x for x in tree_leaves(list(example_inputs))]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tries = [n for n in (length + 1, length - 1, 2 * length, length + 2) if n >= 2]
    why = ""
    for new in tries:
        changed = resize_sequence(example_inputs, length, new)
        leaves = tree_leaves(changed)
        args = leaves if len(flat) == len(placeholders) else changed
        try:
            shapes = _run_shapes(gm, args)
        except Exception as exc:  # noqa: BLE001 - a model fixed to one length says so here
            why = (f"the model does not run at sequence length {new} (example: {length}): "
                   f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            continue
        for n in gm.graph.nodes:
            before = [t.shape for t in n.meta.get(SHAPE_KEY, [])]
            after = shapes.get(n)
            if after is None or len(after) != len(before):
                continue
            n.meta[SEQ_KEY] = [
                tuple(i for i, (a, b) in enumerate(zip(s0, s1)) if a != b) if len(s0) == len(s1)
                else None
                for s0, s1 in zip(before, after)]
        gm.meta[SEQ_INPUTS_KEY] = [
            isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == length
            for x in flat if isinstance(x, torch.Tensor)]
        return ""
    return why


def seq_axes(node: fx.Node) -> tuple[int, ...] | None:
    """Sequence axes of the node's single output tensor; None where unknown."""
    axes = node.meta.get(SEQ_KEY)
    return axes[0] if axes and len(axes) == 1 else None


def seq_axes_known(gm: fx.GraphModule) -> bool:
    return gm.meta.get(SEQ_INPUTS_KEY) is not None
