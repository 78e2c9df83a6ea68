"""Shape propagation: run the graph once on ``example_inputs`` and record, per node,
the shapes and dtypes of every tensor it produces.

Separators are counted in scalars per sample, so each node needs ``numel``: nodes
returning several tensors (split, chunk, tuples) count all of them, and non-tensor
values (sizes, ints) count 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from lbi_fx.errors import InputError, InternalError

SHAPE_KEY = "lbi_tensors"
BATCH_KEY = "lbi_batch"


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


def tensors_of(node: fx.Node) -> list[TensorMeta]:
    return node.meta.get(SHAPE_KEY, [])


def output_tensor(node: fx.Node) -> TensorMeta | None:
    """The single tensor a node returns, or None for tuples and non-tensors."""
    ts = tensors_of(node)
    return ts[0] if len(ts) == 1 and node.meta.get("lbi_single") else None


def scalars_per_sample(node: fx.Node, batch: int) -> int:
    """Scalars a node's outputs hold per sample: numel / batch where it divides (a batch
    folded into another axis, e.g. (B*T, D), still counts per sample)."""
    total = 0
    for t in tensors_of(node):
        n = t.numel
        total += n // batch if batch > 0 and n % batch == 0 else n
    return total


# Who a failure of shape propagation is blamed on (``propagate_shapes(blame=...)``):
# "inputs": the user's own model under example_inputs (InputError); "lbi-fx": the graph
# lbi-fx rewrote from a model that already ran on the same inputs, so any failure is
# lbi-fx's own (InternalError); "node" (a built model run on new inputs): lbi-fx's where
# the failing node is one lbi-fx added (an interface module, a decoder, a canvas copy) or
# reads one, and every input has the shape the model was built with (batch axis aside);
# otherwise the inputs'.
BLAME = ("inputs", "lbi-fx", "node")
_ADDED_KEYS = ("lbi_role", "lbi_canvas_copy")  # insert_interfaces / per_region_canvas


def added_by_lbi(n: fx.Node) -> bool:
    """A node the rewrite added (not one of the user's model)."""
    return (any(k in n.meta for k in _ADDED_KEYS)
            or str(n.meta.get("lbi_module") or "").startswith("lbi."))


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, blame: str = "inputs"):
        super().__init__(gm)
        self.blame = blame
        # "node": the input shapes the model was built with (the last propagation's)
        self.built = {n.name: [t.shape[1:] for t in tensors_of(n)]
                      for n in gm.graph.nodes if n.op == "placeholder"}
        self.same_inputs = True

    def _ours(self, n: fx.Node) -> bool:
        if self.blame != "node":
            return self.blame == "lbi-fx"
        near = added_by_lbi(n) or any(added_by_lbi(u) for u in n.all_input_nodes)
        return near and self.same_inputs

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:  # noqa: BLE001 - reported with the node's name
            where = (f"node {n.name!r} (module {n.meta.get('lbi_module') or '<top level>'!r}, "
                     f"{n.format_node()}) raised {type(exc).__name__}: {exc}")
            if self._ours(n):
                raise InternalError(
                    f"shape propagation through lbi-fx's rewritten graph failed at {where} "
                    "(the model itself runs on these inputs: the rewrite broke it)", exc) from exc
            raise InputError(f"example_inputs do not run through the model: {where}") from exc
        leaves = [x for x in tree_leaves(result) if isinstance(x, torch.Tensor)]
        if n.op == "placeholder" and self.built.get(n.name):
            self.same_inputs &= [x.shape[1:] for x in leaves] == self.built[n.name]
        n.meta[SHAPE_KEY] = [TensorMeta(tuple(x.shape), x.dtype) for x in leaves]
        n.meta["lbi_single"] = isinstance(result, torch.Tensor)
        return result


def check_example_inputs(example_inputs: object) -> tuple:
    if example_inputs is None:
        raise InputError(
            "example_inputs is required: a tuple of the model's positional inputs, e.g. "
            "example_inputs=(tokens,)"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise InputError(
            f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}"
        )
    if not any(isinstance(x, torch.Tensor) for x in example_inputs):
        raise InputError("example_inputs holds no tensor; the first tensor sets the batch size")
    return tuple(example_inputs)


def batch_size_of(example_inputs: Sequence[object]) -> int:
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                raise InputError("the first tensor in example_inputs is 0-d; it needs a batch axis")
            return int(x.shape[0])
    raise InputError("example_inputs holds no tensor")


def on_meta(module: torch.nn.Module) -> bool:
    """Whether some parameter or buffer of ``module`` is on the meta device (a model built
    under ``torch.device("meta")``: shapes without storage)."""
    return any(t.device.type == "meta" for t in (*module.parameters(), *module.buffers()))


@contextlib.contextmanager
def shapes_only(gm: torch.nn.Module, args: list):
    """Run shape probes of a model whose tensors are on the meta device: inside, its meta
    parameters and buffers are fake tensors on the inputs' device (``FakeTensorMode``: no
    storage, so a model too large to hold is never materialised) and ``args`` come back
    fake. Any other model runs as it is."""
    if not on_meta(gm):
        yield args
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    leaves = [x for x in tree_leaves(args) if isinstance(x, torch.Tensor)]
    device = next((x.device for x in leaves if x.device.type != "meta"), torch.device("cpu"))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    slots = []  # (module, dict, attr, original)
    fakes: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for store in (mod._parameters, mod._buffers):
            for attr, t in store.items():
                if t is None or t.device.type != "meta":
                    continue
                if id(t) not in fakes:
                    with mode:
                        fakes[id(t)] = torch.empty(t.shape, dtype=t.dtype, device=device)
                slots.append((store, attr, t))
                store[attr] = fakes[id(t)]
    try:
        fake_args = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args]
        with mode:
            yield fake_args
    finally:
        for store, attr, t in slots:
            store[attr] = t


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[object],
                     blame: str = "inputs") -> object:
    """Record ``meta[SHAPE_KEY]`` on every node; returns the model's output. ``blame``
    (:data:`BLAME`): whose error a failing node is, ``InputError`` or ``InternalError``."""
    example_inputs = check_example_inputs(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(tree_leaves(list(example_inputs)))
    args = flat if len(flat) == len(placeholders) else list(example_inputs)
    required = [p for p in placeholders if not p.args]
    if not len(required) <= len(args) <= len(placeholders):
        raise InputError(
            f"the model takes {len(placeholders)} inputs "
            f"({', '.join(p.name for p in placeholders)}), example_inputs has {len(args)}"
        )
    # A shape probe must not change the model: keep buffers (BatchNorm statistics) and
    # the RNG stream as they were.
    saved = {k: b.detach().clone() for k, b in gm.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), shapes_only(gm, args) as args:
            out = _Recorder(gm, blame).run(*args)
    finally:
        with torch.no_grad():
            for k, b in gm.named_buffers():
                if k in saved and b.shape == saved[k].shape:
                    b.copy_(saved[k])
    gm.meta[BATCH_KEY] = batch_size_of(example_inputs)
    return out
