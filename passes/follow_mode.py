"""Follow ``.train()`` / ``.eval()``: make mode-dependent constants of a capture live.

A capture bakes every Python value the forward read, ``self.training`` included:
``F.scaled_dot_product_attention(..., dropout_p=p if self.training else 0.0)`` under fx,
``aten.dropout(x, p, True)`` under ``torch.export``. A module rewritten from such a graph
would keep the capture's mode for ever. ``capture`` therefore captures the model twice,
once with every module in training mode and once in eval mode, and this pass compares
the two graphs node by node. Where they differ only in constant arguments, the node
becomes a ``call_module`` of a ``ModeSwitch`` registered beside the op's own module (so
``owner.train()``/``.eval()`` reach it like any child), which calls the op with the
train- or eval-mode constants at run time. Where the graphs differ in structure (a
Python ``if self.training:`` around ops, BatchNorm's buffer updates under export), no
switch can follow: the pass returns what differs, and the rewritten module refuses the
mode change by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .meta_keys import MODE_KEY, MODULE_KEY


class _Absent:
    """An argument one mode does not pass (the op's default applies)."""

    def __repr__(self) -> str:
        return "<absent>"

    def __reduce__(self):
        return (_absent, ())


ABSENT = _Absent()


def _absent() -> _Absent:
    return ABSENT


class ModeSwitch(nn.Module):
    """Call ``fn`` with the constants of the current mode (``self.training``).

    ``train`` / ``eval`` map an argument position (int) or keyword (str) to its value in
    that mode (``ABSENT``: not passed); every other argument comes from the graph.
    ``identity_in`` names a mode in which the op does not run at all (dropout in eval
    mode, which ``torch.export`` leaves out of the graph): the switch returns its input.
    No parameters or buffers, so ``state_dict`` does not see it.
    """

    def __init__(self, fn, method: bool, train: dict, eval: dict, identity_in: str | None = None):
        super().__init__()
        self.fn, self.method = fn, method
        self.train_args, self.eval_args = dict(train), dict(eval)
        self.identity_in = identity_in

    def resolve(self, args: tuple, kwargs: dict, training: bool | None = None) -> tuple:
        """(args, kwargs) as the op is called in ``training`` (default: the current mode)."""
        over = self.train_args if (self.training if training is None else training) else self.eval_args
        args, kwargs = list(args), dict(kwargs)
        for key, value in over.items():
            if isinstance(key, int):
                args += [ABSENT] * (key + 1 - len(args))
                args[key] = value
            elif value is ABSENT:
                kwargs.pop(key, None)
            else:
                kwargs[key] = value
        while args and args[-1] is ABSENT:
            args.pop()
        return tuple(args), kwargs

    def forward(self, *args, **kwargs):
        if self.identity_in == ("train" if self.training else "eval"):
            return args[0]
        args, kwargs = self.resolve(args, kwargs)
        if self.method:
            return getattr(args[0], self.fn)(*args[1:], **kwargs)
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        name = self.fn if self.method else getattr(self.fn, "__name__", str(self.fn))
        skip = f", identity in {self.identity_in}" if self.identity_in else ""
        return f"{name}, train={self.train_args}, eval={self.eval_args}{skip}"


@dataclass
class ModeMismatch:
    """Where the train- and eval-mode captures differ in structure."""

    node: str
    module: str
    why: str

    def __str__(self) -> str:
        where = f"{self.node} ({self.module or '<top level>'}): " if self.node else ""
        return where + self.why


def _has_node(a) -> bool:
    found = []
    fx.map_arg(a, lambda n: found.append(n))
    return bool(found)


def _op_name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _is_value_identity(n: fx.Node) -> bool:
    """Ops that return their input's values: export keeps or drops them by strides."""
    return (n.op in ("call_function", "call_method") and bool(n.args)
            and isinstance(n.args[0], fx.Node)
            and _op_name(n).split(".")[0] in ("contiguous", "clone", "alias"))


def _is_dropout(n: fx.Node) -> bool:
    return (n.op in ("call_function", "call_method") and bool(n.args)
            and isinstance(n.args[0], fx.Node) and "dropout" in _op_name(n))


class _Pairing:
    """Train node <-> eval node correspondence, seeing through skipped identities."""

    def __init__(self):
        self.of_eval: dict[fx.Node, fx.Node] = {}
        self.alias_train: dict[fx.Node, fx.Node] = {}
        self.alias_eval: dict[fx.Node, fx.Node] = {}

    @staticmethod
    def _root(n: fx.Node, alias: dict) -> fx.Node:
        while n in alias:
            n = alias[n]
        return n

    def same(self, a, b) -> bool:
        """Same structure, nodes corresponding, constants equal."""
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return False
            b = self._root(b, self.alias_eval)
            return self._root(self.of_eval.get(b, b), self.alias_train) is self._root(a, self.alias_train)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(
                self.same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(self.same(a[k], b[k]) for k in a)
        try:
            return type(a) is type(b) and bool(a == b)
        except Exception:  # noqa: BLE001 - tensors and other values without a plain ==
            return a is b


def _diff_args(a: fx.Node, b: fx.Node, pairing: _Pairing) -> tuple[dict, dict] | str:
    """Constant arguments of ``a`` (train) and ``b`` (eval) that differ, by position or
    keyword (``ABSENT`` where one mode does not pass it); a string saying why when they
    differ in more than constants."""
    train, eval_ = {}, {}
    keys = [*range(max(len(a.args), len(b.args))), *dict.fromkeys([*a.kwargs, *b.kwargs])]
    for key in keys:
        if isinstance(key, int):
            x = a.args[key] if key < len(a.args) else ABSENT
            y = b.args[key] if key < len(b.args) else ABSENT
        else:
            x, y = a.kwargs.get(key, ABSENT), b.kwargs.get(key, ABSENT)
        if x is not ABSENT and y is not ABSENT and pairing.same(x, y):
            continue
        if _has_node(x) or _has_node(y):
            return f"argument {key!r} reads other values in the two modes"
        train[key], eval_[key] = x, y
    return train, eval_


def follow_mode(gm: fx.GraphModule, eval_gm: fx.GraphModule) -> ModeMismatch | None:
    """Rewrite ``gm`` (captured with every module in training mode; ``eval_gm`` is the
    same model captured in eval mode) so its mode-dependent constants follow the owning
    module's mode at run time.

    The graphs are walked side by side. Nodes that differ only in constant arguments
    get a switch; a dropout only the training graph runs gets a switch that is the
    identity in eval mode; a value-identity op (``contiguous``) that only one graph has
    is kept as it is. Returns None when every difference could be made live, else the
    first structural difference, leaving ``gm`` untouched.
    """
    a_nodes, b_nodes = list(gm.graph.nodes), list(eval_gm.graph.nodes)
    pairing = _Pairing()
    switches: dict[str, tuple] = {}
    i = j = 0
    while i < len(a_nodes) or j < len(b_nodes):
        a = a_nodes[i] if i < len(a_nodes) else None
        b = b_nodes[j] if j < len(b_nodes) else None
        if a is not None and b is not None and a.op == b.op and a.target == b.target:
            i, j = i + 1, j + 1
            pairing.of_eval[b] = a
            if a.op in ("placeholder", "get_attr"):
                continue
            if a.op == "output":
                if not pairing.same(a.args, b.args):
                    return ModeMismatch("", "", "the two modes return other values")
                continue
            diff = _diff_args(a, b, pairing)
            if isinstance(diff, str):
                return ModeMismatch(a.name, _module_path(gm, a.name), diff)
            if diff[0]:
                if a.op == "call_module":
                    return ModeMismatch(a.name, str(a.target),
                                        "the module is called with other constants per mode")
                switches[a.name] = (*diff, None)
        elif a is not None and _is_dropout(a):
            pairing.alias_train[a] = a.args[0]  # eval mode: the input itself
            switches[a.name] = ({}, {}, "eval")
            i += 1
        elif a is not None and _is_value_identity(a):
            pairing.alias_train[a] = a.args[0]
            i += 1
        elif b is not None and _is_value_identity(b):
            pairing.alias_eval[b] = b.args[0]
            j += 1
        else:
            where = a if a is not None else b
            what = (f"train mode runs {a.op if a is not None else 'nothing'} "
                    f"{a.target if a is not None else ''}, eval mode "
                    f"{b.op if b is not None else 'nothing'} {b.target if b is not None else ''}")
            return ModeMismatch(where.name, _module_path(gm, where.name) if a is not None else "",
                                f"{what}: the forward branches on self.training")
    if not switches:
        return None
    by_name = {n.name: n for n in gm.graph.nodes}
    for i, (name, (train, eval_, identity)) in enumerate(switches.items()):
        node = by_name[name]
        owner_path = _owner(gm, node.meta.get(MODULE_KEY, ""))
        owner = gm.get_submodule(owner_path) if owner_path else gm
        child = f"lbi_mode_{i}"
        while hasattr(owner, child):
            child += "_"
        owner.add_module(child, ModeSwitch(node.target, node.op == "call_method", train, eval_,
                                           identity))
        path = f"{owner_path}.{child}" if owner_path else child
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, node.args, node.kwargs)
        new.meta = dict(node.meta)
        new.meta[MODULE_KEY] = node.meta.get(MODULE_KEY, "")
        new.meta[MODE_KEY] = path
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        new.name = name
    gm.graph.lint()
    gm.recompile()
    return None


def fixed_mode_ops(gm: fx.GraphModule) -> ModeMismatch | None:
    """A graph captured elsewhere (an ``fx.GraphModule``, ``ep.module()``) has one mode
    baked in, and lbi-fx cannot capture its other mode: the first op whose behaviour
    depends on the mode (dropout, batch_norm, attention dropout) names why a mode change
    cannot be followed. None when nothing in it depends on the mode."""
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        name = _op_name(n)
        p = n.kwargs.get("dropout_p", n.args[4] if "scaled_dot_product" in name and len(n.args) > 4
                         else 0.0)
        if "dropout" in name or "batch_norm" in name or (isinstance(p, float) and p > 0):
            return ModeMismatch(n.name, str(n.meta.get(MODULE_KEY, "")),
                                f"{name} was captured in one mode before lbi-fx saw the model "
                                "(an fx.GraphModule or torch.export program); pass the "
                                "nn.Module itself so both modes are captured")
    return None


def _module_path(gm: fx.GraphModule, name: str) -> str:
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    return "" if node is None else str(node.meta.get(MODULE_KEY, ""))


def _owner(gm: nn.Module, path: str) -> str:
    """The longest prefix of ``path`` that is a submodule of ``gm`` (a capture keeps only
    the modules its nodes reference, so the op's own module may be missing)."""
    parts = path.split(".") if path else []
    while parts:
        try:
            gm.get_submodule(".".join(parts))
            return ".".join(parts)
        except AttributeError:
            parts.pop()
    return ""


def effective_call(gm: nn.Module, node: fx.Node, training: bool | None = None):
    """(target, args, kwargs) a node runs: a ``ModeSwitch`` node shows its op and the
    constants of ``training`` (default: the switch's current mode); others as they are."""
    if node.op == "call_module" and MODE_KEY in node.meta:
        sw = gm.get_submodule(node.target)
        if isinstance(sw, ModeSwitch):
            args, kwargs = sw.resolve(node.args, node.kwargs, training)
            return sw.fn, args, kwargs
    return node.target, node.args, node.kwargs
