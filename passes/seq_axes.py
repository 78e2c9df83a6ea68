"""Sequence axes: which axes of every tensor carry the input's positions.

Sizes cannot say it (a (B, D, L) activation with D == L looks like (B, L, D); a (B, 4, L)
signal has its channels on axis 1). The inputs' axes are what the ops reading them say
(``derive_input_axes``: an embedding lookup, a Conv1d, a Linear; a Conv2d reads an image,
which has none) or what the user names (``transform(..., seq_dim=)``); the graph is then
run a second time on example inputs one position longer or shorter on those axes: the
axes of every tensor whose size follows the length are its sequence axes. ``meta[SEQ_KEY]`` holds, per tensor of
``tensors_of(node)``, a tuple of such axes (``()``: no sequence axis), or ``None``
where the second run could not tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from .shape_prop import SHAPE_KEY, check_example_inputs, shapes_only

SEQ_KEY = "lbi_seq_axes"
SEQ_INPUTS_KEY = "lbi_seq_inputs"  # gm.meta: per tensor input leaf, its sequence axis or None
INPUT_AXES_KEY = "lbi_input_axes"  # gm.meta: the InputAxes behind SEQ_INPUTS_KEY


def _arg_axis(axis, dim: int) -> int | None:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -dim <= axis < dim:
        return None
    return axis % dim


# Ops that keep every axis where it is (sizes may change: pad); the walk below follows
# an input's axes through them to the op that says what the axes mean.
_KEEP = {
    "add", "sub", "mul", "truediv", "div", "neg", "tanh", "sigmoid", "relu", "gelu", "silu",
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone",
    "detach", "exp", "log", "abs", "dropout", "pad", "constant_pad_nd", "long", "int",
    "_to_copy", "alias", "lift_fresh_copy", "sqrt", "rsqrt", "pow", "clamp", "softplus",
}
_KEEP_MODULES = (nn.Dropout, nn.Identity, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                 nn.ConstantPad1d, nn.ZeroPad1d)


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    return str(getattr(t, "__name__", None) or t).split(".")[0]


def _meaning(node: fx.Node, user: fx.Node, gm: fx.GraphModule) -> str | None:
    """What ``user`` says about the axes of its tensor input ``node``: "ids" (an
    embedding lookup: every non-batch axis is a position), "conv1d" (channel axis 1,
    sequence axis 2), "linear" (last axis features), "image" (Conv2d/3d: spatial axes,
    no sequence), or None (no fact)."""
    if user.op == "call_module":
        mod = gm.get_submodule(str(user.target))
        if not user.args or user.args[0] is not node:
            return None
        if isinstance(mod, nn.Embedding):
            return "ids"
        if isinstance(mod, nn.Conv1d):
            return "conv1d"
        if isinstance(mod, (nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.AvgPool2d)):
            return "image"
        if isinstance(mod, nn.Linear):
            return "linear"
        return None
    if user.op not in ("call_function", "call_method"):
        return None
    name = _op_name(user)
    args = list(user.args)
    if name in ("embedding",):  # F.embedding(ids, weight) / aten.embedding(weight, ids)
        aten = "aten" in str(user.target)
        idx = 1 if aten else 0
        return "ids" if len(args) > idx and args[idx] is node else None
    if not args or args[0] is not node:
        return None
    if name in ("conv1d",):
        return "conv1d"
    if name in ("conv2d", "conv3d", "max_pool2d", "avg_pool2d"):
        return "image"
    if name == "convolution":
        t = _shape(node)
        return None if t is None else "conv1d" if len(t) == 3 else "image"
    if name in ("linear", "addmm"):
        return "linear"
    if name in ("matmul",) and len(args) > 1 and isinstance(args[1], fx.Node) \
            and args[1].op == "get_attr" and len(_shape(args[1]) or ()) == 2:
        return "linear"
    return None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    shapes = node.meta.get(SHAPE_KEY)
    if shapes and len(shapes) == 1:
        return tuple(shapes[0].shape)
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _follow(node: fx.Node, user: fx.Node, axes: list, gm: fx.GraphModule) -> list | None:
    """``axes`` (input axis per axis of ``node``) carried through ``user``, or None where
    the walk stops (an op that may move axes in ways not followed here)."""
    if user.op == "call_module":
        mod = gm.get_submodule(str(user.target))
        ok = isinstance(mod, _KEEP_MODULES) and user.args and user.args[0] is node
        return list(axes) if ok else None
    if user.op not in ("call_function", "call_method"):
        return None
    name = _op_name(user)
    args = list(user.args) + list(user.kwargs.values())
    out = _shape(user)
    if name in _KEEP:
        if out is None or len(out) < len(axes):
            return None
        return [None] * (len(out) - len(axes)) + list(axes)  # broadcasting adds leading axes
    if not user.args or user.args[0] is not node:
        return None
    dim = len(axes)
    if name in ("transpose", "swapaxes") and len(args) >= 3:
        a, b = _arg_axis(args[1], dim), _arg_axis(args[2], dim)
        if a is None or b is None:
            return None
        axes = list(axes)
        axes[a], axes[b] = axes[b], axes[a]
        return axes
    if name == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        dims = [_arg_axis(d, dim) for d in dims]
        if len(dims) != dim or None in dims:
            return None
        return [axes[d] for d in dims]
    if name in ("view", "reshape", "_unsafe_view", "expand") and out is not None \
            and _shape(node) == tuple(out):
        return list(axes)  # a reshape to its own shape (HF: ids.view(-1, L) at batch size B)
    if name == "unsqueeze" and len(args) >= 2:
        at = _arg_axis(args[1], dim + 1)
        return None if at is None else [*axes[:at], None, *axes[at:]]
    return None


def _facts(gm: fx.GraphModule, placeholder: fx.Node, dim: int) -> set:
    """What the ops reading ``placeholder`` (through axis-keeping ops) say its sequence
    axis is: a set of ("seq", axis, which op), ("none", why) and ("ambiguous", why)."""
    found: set = set()
    stack = [(placeholder, list(range(dim)))]
    seen = set()
    while stack:
        node, axes = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            meaning = _meaning(node, user, gm)
            if meaning is None:
                carried = _follow(node, user, axes, gm)
                if carried is not None:
                    stack.append((user, carried))
                continue
            rest = list(axes[1:])  # every axis but batch
            if meaning == "image":
                found.add(("none", f"{_module_name(user)} reads it as an image (B, C, H, W)"))
                continue
            if meaning == "ids":
                cand = rest
                what = "an embedding lookup"
            elif meaning == "conv1d":
                cand = axes[2:3] if len(axes) == 3 else []
                what = "a Conv1d (channels on axis 1, the sequence on axis 2)"
            else:  # linear: last axis features
                cand = rest[:-1]
                what = "a Linear (features on the last axis)"
            cand = [a for a in cand if a is not None]
            if meaning == "linear" and not cand and len(axes) <= 2:
                found.add(("none", f"{_module_name(user)} reads it as (B, features)"))
            elif len(cand) == 1 and cand[0] >= 1:
                found.add(("seq", cand[0], f"{what} ({_module_name(user)})"))
            elif meaning == "conv1d" and len(axes) != 3:
                continue
            else:
                found.add(("ambiguous", f"{what} ({_module_name(user)}) reads it with "
                           f"{len(cand)} candidate sequence axes"))
    return found


def _module_name(node: fx.Node) -> str:
    from .capture import MODULE_KEY

    return node.meta.get(MODULE_KEY) or node.name


@dataclass
class InputAxes:
    """The sequence axis of every tensor input (one entry per tensor leaf of the
    example inputs): an int, or None where it has none. ``unknown`` lists the inputs
    whose axis neither the graph nor ``seq_dim`` says (their ``axes`` entry is None)."""

    axes: list[int | None]
    names: list[str]
    shapes: list[tuple[int, ...]]
    unknown: list[int] = field(default_factory=list)
    how: list[str] = field(default_factory=list)

    @property
    def length(self) -> int | None:
        for a, s in zip(self.axes, self.shapes):
            if a is not None:
                return int(s[a])
        return None

    @property
    def any_sequence(self) -> bool:
        return any(a is not None for a in self.axes)

    def describe_unknown(self) -> str:
        return "; ".join(f"input {self.names[i]!r} {self.shapes[i]}: {self.how[i]}"
                         for i in self.unknown)


def _tensor_leaves(example_inputs: Sequence[object]) -> list[torch.Tensor]:
    return [x for x in tree_leaves(list(example_inputs)) if isinstance(x, torch.Tensor)]


def normalize_seq_dim(seq_dim, n: int) -> list | None:
    """``transform(..., seq_dim=)``: None, an int (every tensor input of enough axes), or
    one entry per tensor input (an int, or None: no sequence axis)."""
    if seq_dim is None:
        return None
    if isinstance(seq_dim, int) and not isinstance(seq_dim, bool) and seq_dim != 0:
        return [seq_dim] * n
    if isinstance(seq_dim, (list, tuple)) and len(seq_dim) == n and all(
            d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in seq_dim):
        return list(seq_dim)
    from lbi_fx.errors import InputError

    raise InputError(f"seq_dim={seq_dim!r}: the sequence axis of the inputs, an int, or one "
                     f"int (or None: no sequence) per tensor input ({n} here)")


def derive_input_axes(gm: fx.GraphModule, example_inputs: Sequence[object],
                      seq_dim=None) -> InputAxes:
    """Each tensor input's sequence axis, as the ops reading it say (an embedding lookup:
    the ids' position axis; a Conv1d: axis 2 of (B, C, L); a Linear: the one axis
    between batch and features; a Conv2d: an image, no sequence) or as ``seq_dim``
    names it; never from the input's shape alone. An input no such op reads (a mask,
    targets) follows the sequence of one that is read, on its one axis of that length."""
    from lbi_fx.errors import InputError

    tensors = _tensor_leaves(example_inputs)
    shapes = [tuple(int(s) for s in x.shape) for x in tensors]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = tree_leaves(list(example_inputs))
    names = [f"#{i}" for i in range(len(tensors))]
    phs: list[fx.Node | None] = [None] * len(tensors)
    if len(flat) == len(placeholders):
        j = 0
        for x, p in zip(flat, placeholders):
            if isinstance(x, torch.Tensor):
                phs[j], names[j] = p, p.name
                j += 1
    given = normalize_seq_dim(seq_dim, len(tensors))
    axes: list[int | None] = [None] * len(tensors)
    how = [""] * len(tensors)
    pending = []
    for i, x in enumerate(tensors):
        if isinstance(seq_dim, int) and not isinstance(seq_dim, bool):
            a = _arg_axis(seq_dim, x.dim())
            if a is not None and a > 0:  # one int: every input that has that axis
                axes[i], how[i] = a, "seq_dim"
                continue
        elif given is not None:  # one entry per input: exactly as named
            d = given[i]
            if d is None:
                how[i] = "no sequence axis (seq_dim)"
                continue
            a = _arg_axis(d, x.dim())
            if a is None or a == 0:
                raise InputError(
                    f"seq_dim={d} for input {names[i]!r} of shape {shapes[i]}: name an axis "
                    "other than batch (axis 0), or None for an input without a sequence")
            axes[i], how[i] = a, "seq_dim"
            continue
        if x.dim() < 2:
            how[i] = "no sequence axis (a (B,) tensor)"
            continue
        facts = _facts(gm, phs[i], x.dim()) if phs[i] is not None else set()
        seqs = {f[1] for f in facts if f[0] == "seq"}
        if facts and not seqs and all(f[0] == "none" for f in facts):
            how[i] = "no sequence axis: " + sorted(facts)[0][1]
        elif len(seqs) == 1 and not any(f[0] == "ambiguous" for f in facts):
            axes[i] = seqs.pop()
            how[i] = next(f[2] for f in facts if f[0] == "seq")
        elif facts:
            how[i] = ("the ops reading it disagree on its sequence axis ("
                      + "; ".join(str(f[-1]) for f in sorted(facts, key=str)) + ")")
            pending.append((i, False))
        else:
            pending.append((i, True))
    lengths = {shapes[i][a] for i, a in enumerate(axes) if a is not None}
    unknown = []
    for i, companion in pending:
        if companion and len(lengths) == 1:
            length = next(iter(lengths))
            match = [a for a in range(1, len(shapes[i])) if shapes[i][a] == length]
            if len(match) == 1:
                axes[i], how[i] = match[0], "the one axis of the sequence's length"
                continue
            if not match:
                how[i] = "no sequence axis (no axis of the sequence's length)"
                continue
            how[i] = (f"axes {match} all have the sequence's length {length}")
        elif companion:
            how[i] = ("no op that says what its axes mean (an embedding lookup, a Conv1d, a "
                      "Linear) reads it")
        unknown.append(i)
    return InputAxes(axes, names, shapes, unknown, how)


def sequence_length(example_inputs: Sequence[object], axes: InputAxes | None = None) -> int | None:
    """The length of the inputs' sequence (on the axes ``axes`` names), or None."""
    if axes is not None:
        return axes.length
    for x in tree_leaves(list(example_inputs)):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return int(x.shape[1])
    return None


def resize_sequence(example_inputs: Sequence[object], length: int, new: int,
                    axes: list[int | None] | None = None) -> list:
    """The inputs with the sequence axis of every tensor (``axes``: one per tensor leaf;
    default axis 1 of every tensor of that length) cut or extended (the last position
    repeated) to ``new``."""
    it = iter(axes) if axes is not None else None

    def change(x):
        if not isinstance(x, torch.Tensor):
            return x
        a = next(it) if it is not None else (1 if x.dim() >= 2 and x.shape[1] == length else None)
        if a is None or x.shape[a] != length:
            return x
        if new <= length:
            return x.narrow(a, 0, new).clone()
        last = x.narrow(a, length - 1, 1)
        reps = last.expand(*[new - length if i == a else s for i, s in enumerate(x.shape)])
        return torch.cat([x, reps], dim=a)

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


def mark_seq_axes(gm: fx.GraphModule, example_inputs: Sequence[object], seq_dim=None,
                  *, input_axes: InputAxes | None = None) -> str:
    """Fill ``meta[SEQ_KEY]`` on every node that ``propagate_shapes`` saw; returns ""
    or why the sequence axes are unknown (every entry is then ``None``).

    The inputs' sequence axes come from ``derive_input_axes`` (or ``input_axes``, what
    an earlier call derived); the graph is then run again with the inputs one position
    longer (or shorter) on those axes, and the axes of every tensor whose size follows
    are its sequence axes. ``gm.meta[SEQ_INPUTS_KEY]`` holds the inputs' axes."""
    example_inputs = check_example_inputs(example_inputs)
    for n in gm.graph.nodes:
        n.meta[SEQ_KEY] = [None] * len(n.meta.get(SHAPE_KEY, []))
    gm.meta[SEQ_INPUTS_KEY] = None
    ia = input_axes if input_axes is not None else derive_input_axes(gm, example_inputs, seq_dim)
    gm.meta[INPUT_AXES_KEY] = ia
    if ia.unknown:
        return ("cannot tell the sequence axis of " + ia.describe_unknown()
                + "; name it with transform(..., seq_dim=...)")
    length = ia.length
    if length is None:
        gm.meta[SEQ_INPUTS_KEY] = list(ia.axes)
        for n in gm.graph.nodes:
            n.meta[SEQ_KEY] = [() for _ in n.meta.get(SHAPE_KEY, [])]
        return "no input has a sequence axis"
    flat = [x for x in tree_leaves(list(example_inputs))]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tries = [n for n in (length + 1, length - 1, 2 * length, length + 2) if n >= 2]
    why = ""
    for new in tries:
        changed = resize_sequence(example_inputs, length, new, ia.axes)
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
        gm.meta[SEQ_INPUTS_KEY] = list(ia.axes)
        return ""
    return why


def seq_axes(node: fx.Node) -> tuple[int, ...] | None:
    """Sequence axes of the node's single output tensor; None where unknown."""
    axes = node.meta.get(SEQ_KEY)
    return axes[0] if axes and len(axes) == 1 else None


def seq_axes_known(gm: fx.GraphModule) -> bool:
    return gm.meta.get(SEQ_INPUTS_KEY) is not None
