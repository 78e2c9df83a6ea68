"""Insert interfaces (Eq. 4-5): route every dynamic crossing through m_k in R^r.

Region k reads ``canvas + Dec_k(m_k)`` in place of each dynamic tensor that crossed into
it; a long skip crossing several boundaries is re-carried by every region it passes
(each emits it into its encoder), so afterwards only m_k crosses boundary k. Region k <
K-1 emits ``m_{k+1} = LN(m_k + tanh(a_k) Enc_k(pool(outputs)))``; the last region
feeds the epilogue directly. The pass works on a graph that ``partition`` and
``mark_dynamic`` have annotated, and leaves every new node with its place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from lbi_fx.errors import RewriteError
from lbi_fx.interfaces import InterfaceDecoder, InterfaceEncoder, Segments
from lbi_fx.layout import InterfaceDict

from .capture import MODULE_KEY
from .mark_dynamic import DATA_KEY, is_dynamic
from .partition import PLACE_KEY, PROLOGUE, module_of, place_of
from .seq_axes import seq_axes, seq_axes_known
from .shape_prop import output_tensor, tensors_of

IFACE = "lbi"  # attribute name of the ModuleDict holding the interface modules
ROLE_KEY = "lbi_role"


@dataclass
class InterfacePlan:
    """What the rewrite inserted: the m_k nodes (k = 0..K-1) and the canvas."""

    canvas: str
    m_nodes: list[str]
    ranks: list[int]
    crossings: dict[int, list[str]]


def find_canvas(gm: fx.GraphModule, canvas: str | None) -> fx.Node:
    """The static tensor that feeds region 0: the largest data-dependent float tensor
    the prologue hands to region 0 (``canvas=`` names a node or module instead)."""
    nodes = list(gm.graph.nodes)
    if canvas is not None:
        named = [n for n in nodes if n.name == canvas]
        if not named:
            named = [n for n in nodes if module_of(n) == canvas and place_of(n) == PROLOGUE
                     and any(place_of(u) >= 0 for u in n.users)]
        if len(named) != 1:
            raise RewriteError(
                f"canvas={canvas!r} names no single prologue node or module output; give the "
                "name of the node (see `lbi-fx inspect`) that feeds region 0"
            )
        node = named[0]
    else:
        cands = [
            n for n in nodes
            if place_of(n) == PROLOGUE and n.meta.get(DATA_KEY) and output_tensor(n) is not None
            and output_tensor(n).dtype.is_floating_point
            and any(place_of(u) == 0 for u in n.users)
        ]
        if not cands:
            raise RewriteError(
                "no canvas: region 0 reads no floating-point tensor computed from the inputs "
                "in the prologue. Keep the embedding out of region 0, or pass canvas=<node>"
            )
        node = max(cands, key=lambda n: output_tensor(n).numel)
    t = output_tensor(node)
    if t is None or not t.dtype.is_floating_point or len(t.shape) < 2:
        raise RewriteError(f"canvas {node.name!r} must be a floating tensor of shape (B, ..., D)")
    return node


def crossing_sets(gm: fx.GraphModule, num_regions: int) -> dict[int, list[fx.Node]]:
    """X_k for k = 1..K-1: dynamic tensors made before region k and read at or after it."""
    out: dict[int, list[fx.Node]] = {k: [] for k in range(1, num_regions)}
    for node in gm.graph.nodes:
        if not is_dynamic(node):
            continue
        latest = max((place_of(u) for u in node.users), default=-1)
        for k in range(place_of(node) + 1, min(latest, num_regions - 1) + 1):
            out[k].append(node)
    for k, xs in out.items():
        for u in xs:
            t = output_tensor(u)
            if t is None:
                raise RewriteError(
                    f"{u.name} ({module_of(u) or '<top level>'}) crosses into region {k} but is "
                    "not a single tensor; cross boundaries with tensors only"
                )
            batch = gm.meta.get("lbi_batch")
            if batch is not None and (not t.shape or t.shape[0] != batch):
                raise RewriteError(
                    f"{u.name} ({module_of(u) or '<top level>'}) crosses into region {k} with "
                    f"shape {tuple(t.shape)}, whose first axis is not the batch ({batch}); "
                    "keep the batch axis first at region boundaries (reshape inside the region)"
                )
            if not t.dtype.is_floating_point:
                raise RewriteError(
                    f"{u.name} ({module_of(u) or '<top level>'}) crosses into region {k} as a "
                    f"{t.dtype} tensor, which an interface cannot carry; compute it inside "
                    f"region {k} or in the prologue"
                )
    return out


def _target_shape(t_shape: tuple[int, ...], canvas_shape: tuple[int, ...],
                  t_axes: tuple[int, ...] | None = None, c_axis: int | None = None
                  ) -> list[tuple[str, int]]:
    """Map a crossing tensor's dims onto the canvas's so batch/sequence stay dynamic:
    with the sequence axes from the graph (``t_axes``; ``c_axis`` the canvas's), each
    sequence axis follows the canvas's; without them, dims are matched by size."""
    if t_axes is not None:
        return [("canvas", 0) if i == 0 else ("canvas", c_axis)
                if i in t_axes and c_axis is not None else ("const", s)
                for i, s in enumerate(t_shape)]
    spec: list[tuple[str, int]] = []
    inner = list(range(1, len(canvas_shape) - 1))
    for i, s in enumerate(t_shape):
        if i == 0:
            spec.append(("canvas", 0))
        elif i == len(t_shape) - 1:
            spec.append(("const", s))
        elif i in inner and canvas_shape[i] == s:
            spec.append(("canvas", i))
        else:
            match = next((j for j in inner if canvas_shape[j] == s), None)
            spec.append(("canvas", match) if match is not None else ("const", s))
    return spec


def seq_moved(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """``shape`` with the sequence axis moved to 1 (what the interfaces see)."""
    if axis is None or axis == 1:
        return tuple(shape)
    return (shape[0], shape[axis], *shape[1:axis], *shape[axis + 1:])


def _axes(node: fx.Node) -> tuple[int, ...] | None:
    """The node's sequence axes from the graph, None where the graph could not tell."""
    gm = node.graph.owning_module
    return seq_axes(node) if gm is not None and seq_axes_known(gm) else None


def sequence_axis(node: fx.Node) -> int | None:
    """The one sequence axis (>= 1) of the node's tensor, or None (none, several, or
    unknown): the axis the interfaces move to 1 before pooling."""
    axes = _axes(node)
    return axes[0] if axes is not None and len(axes) == 1 and axes[0] >= 1 else None


def insert_interfaces(
    gm: fx.GraphModule,
    num_regions: int,
    ranks: list[int],
    *,
    encoder: str = "mlp",
    pool: str = "mean",
    canvas: str | None = None,
    segments: Segments | None = None,
    decoder_init: str = "default",
    norm: str = "layer",
    summary: str = "prefix",
    decoder_window: int = 1,
) -> InterfacePlan:
    """Rewrite ``gm`` in place; adds ``gm.lbi`` (a ModuleDict of interface modules).

    ``pool="causal"`` takes ``segments``: every m_k then has S rows of r_k scalars."""
    if encoder not in ("mlp", "linear"):
        raise RewriteError(f"encoder={encoder!r}: choose 'mlp' or 'linear'")
    if pool not in ("mean", "last", "causal"):
        raise RewriteError(f"pool={pool!r}: choose 'causal', 'mean' or 'last'")
    if (pool == "causal") != (segments is not None):
        raise RewriteError("pool='causal' and segments= go together (a bug in lbi-fx; please report it)")
    if hasattr(gm, IFACE):
        raise RewriteError(f"the model already has a submodule named {IFACE!r}; rename it")
    K = num_regions
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    canvas_node = find_canvas(gm, canvas)
    c_meta = output_tensor(canvas_node)
    xs = crossing_sets(gm, K)
    if segments is not None:
        problem = causal_layout_problem(canvas_node, xs)
        if problem:
            raise RewriteError(f"pool='causal': {problem}")
    known = seq_axes_known(gm)

    def axis(u: fx.Node) -> int | None:  # the sequence axis the interfaces move to 1
        if known:
            return sequence_axis(u)
        return 1 if segments is not None else None  # checked unambiguous above

    def feats(u: fx.Node) -> int:
        shape = output_tensor(u).shape
        return seq_moved(shape, axis(u))[-1] if len(shape) > 1 else 1

    def target(u: fx.Node) -> list[tuple[str, int]]:
        return _target_shape(output_tensor(u).shape, c_meta.shape,
                             _axes(u) if known else None, c_axis)

    def pools_positions(u: fx.Node) -> bool:
        return bool(_axes(u)) if known else len(output_tensor(u).shape) >= 3

    c_axis = axis(canvas_node)
    width = feats(canvas_node)
    factory = {"dtype": c_meta.dtype}
    seg = {"segments": segments}
    dec_seg = {**seg, "window": decoder_window}
    enc_seg = {**seg, "norm": norm, "summary": summary}
    mods = InterfaceDict()  # a ModuleDict that records its layout in state dicts
    keys: dict[fx.Node, tuple[int, float]] = {}

    def add(name: str, mod: nn.Module, args: tuple, place: int, key: float, role: str) -> fx.Node:
        mods[name] = mod.to(**factory)
        node = graph.create_node("call_module", f"{IFACE}.{name}", args, {}, name=f"{IFACE}_{name}")
        node.meta[PLACE_KEY] = place
        node.meta[MODULE_KEY] = f"{IFACE}.{name}"
        node.meta[ROLE_KEY] = role
        keys[node] = (place, key)
        return node

    # m_0 from the canvas alone; region 0 reads canvas + Dec_0(m_0) in place of the canvas.
    m0 = add("enc_in", InterfaceEncoder([width], ranks[0], width, kind=encoder, pool=pool,
                                        residual=False, seq_axes=[c_axis], **enc_seg),
             (None, canvas_node), PROLOGUE, order[canvas_node] + 0.5, "m_0")
    mods["enc_in"].pools_positions = pools_positions(canvas_node)
    zero = decoder_init == "zero"
    dec0 = add("dec_0_0", InterfaceDecoder(ranks[0], width, width, target(canvas_node), kind=encoder,
                                           seq_axis=c_axis, zero_init=zero, **dec_seg),
               (m0, canvas_node), 0, -1.0, "decoder")
    for user in list(canvas_node.users):
        if user is not dec0 and place_of(user) == 0:
            user.replace_input_with(canvas_node, dec0)

    m_nodes = [m0]
    world: dict[tuple[int, fx.Node], fx.Node] = {}  # (region, crossing tensor) -> its stand-in
    for k in range(1, K):
        prev = m_nodes[-1]
        emitted = [u if place_of(u) == k - 1 else world[(k - 1, u)] for u in xs[k]]
        r_in, r_out = ranks[max(k - 2, 0)] if k > 1 else ranks[0], ranks[k - 1]
        m_k = add(f"enc_{k - 1}", InterfaceEncoder([feats(u) for u in xs[k]], r_out, width,
                                                   kind=encoder, pool=pool, in_rank=r_in,
                                                   seq_axes=[axis(u) for u in xs[k]],
                                                   **enc_seg),
                  (prev, *emitted), k - 1, float("inf"), f"m_{k}")
        mods[f"enc_{k - 1}"].pools_positions = any(pools_positions(u) for u in xs[k])
        m_nodes.append(m_k)
        for i, u in enumerate(xs[k]):
            t = output_tensor(u)
            # the canvas stands in only for a tensor of its shape and layout
            same = tuple(t.shape) == tuple(c_meta.shape) and (not known or _axes(u) == _axes(canvas_node))
            dec = add(f"dec_{k}_{i}", InterfaceDecoder(
                r_out, width, feats(u), target(u), kind=encoder, use_canvas=same,
                seq_axis=axis(u), zero_init=zero, **dec_seg),
                (m_k, canvas_node), k, -1.0 + i * 1e-3, "decoder")
            world[(k, u)] = dec
            last = k == K - 1
            for user in list(u.users):
                p = place_of(user)
                if user is not dec and (p == k or (last and p >= K)):
                    user.replace_input_with(u, dec)
    gm.add_module(IFACE, mods)
    _sort_by_place(gm, order, keys)
    return InterfacePlan(
        canvas=canvas_node.name,
        m_nodes=[n.name for n in m_nodes],
        ranks=list(ranks),
        crossings={k: [u.name for u in v] for k, v in xs.items()},
    )


def causal_layout_problem(canvas: fx.Node, crossings: dict[int, list[fx.Node]]) -> str | None:
    """Why segment-causal interfaces cannot carry this model, or None. They need one
    sequence axis (any axis but batch; the graph says which, ``passes/seq_axes.py``)
    and a features axis in the canvas and in every crossing tensor."""
    c = output_tensor(canvas)
    advice = ("use pool='mean' knowingly (later positions then reach earlier ones through "
              "m_k), or keep (batch, sequence, ..., features) at region boundaries")
    c_axes = _axes(canvas)
    if len(c.shape) < 3 or c_axes == ():
        return (f"the canvas {canvas.name} has shape {tuple(c.shape)}: there is no sequence "
                "axis (batch first, a sequence axis, features last)")
    if c_axes is None:
        if any(c.shape[i] == c.shape[1] for i in range(2, len(c.shape))):
            return (f"cannot tell which axis of the canvas {canvas.name} {tuple(c.shape)} carries "
                    "the sequence: the model does not run at another sequence length, and sizes "
                    f"are ambiguous; {advice}")
    elif len(c_axes) != 1 or c_axes[0] == 0:
        return (f"the canvas {canvas.name} {tuple(c.shape)} has sequence axes {c_axes} (one "
                f"axis besides batch is needed); {advice}")
    for k, nodes in crossings.items():
        for u in nodes:
            t = output_tensor(u)
            where = f"{u.name} ({module_of(u) or '<top level>'}) crosses into region {k} with shape {tuple(t.shape)}"
            axes = _axes(u)
            if axes is None and c_axes is None:
                # no graph facts: axis 1 only where no other axis has the sequence's size
                if len(t.shape) < 3 or _target_shape(t.shape, c.shape)[1] != ("canvas", 1) or any(
                        t.shape[i] == c.shape[1] for i in range(2, len(t.shape))):
                    return (f"{where}: cannot tell its sequence axis (the model does not run at "
                            f"another sequence length); {advice}")
                continue
            if axes is None or len(axes) != 1 or axes[0] == 0:
                return (f"{where}, whose sequence axes are {axes if axes is not None else 'unknown'} "
                        f"(one axis besides batch is needed); {advice}")
            if len(t.shape) < 3:
                return (f"{where}: sequence on axis {axes[0]} but no features axis; keep "
                        "(batch, sequence, ..., features) at region boundaries")
    return None


def _sort_by_place(gm: fx.GraphModule, order: dict, keys: dict) -> None:
    """Reorder nodes by (place, original position): a topological order, since every edge
    goes from a place to the same or a later one (Def. 2.1)."""
    def key(n: fx.Node):
        if n in keys:
            return keys[n]
        if n.op == "output":
            return (float("inf"), 0)
        return (place_of(n), order[n])

    nodes = sorted(gm.graph.nodes, key=key)
    new = fx.Graph()
    new._codegen = gm.graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        env[n] = new.node_copy(n, lambda a: env[a])
    new.lint()
    gm.graph = new
    gm.recompile()


def is_torch_tensor_meta(node: fx.Node) -> bool:
    return bool(tensors_of(node)) and isinstance(tensors_of(node)[0].dtype, torch.dtype)
