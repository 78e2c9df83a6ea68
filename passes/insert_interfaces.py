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

from .capture import MODULE_KEY
from .mark_dynamic import DATA_KEY, is_dynamic
from .partition import PLACE_KEY, PROLOGUE, module_of, place_of
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


def _target_shape(t_shape: tuple[int, ...], canvas_shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """Map a crossing tensor's dims onto the canvas's so batch/sequence stay dynamic."""
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


def insert_interfaces(
    gm: fx.GraphModule,
    num_regions: int,
    ranks: list[int],
    *,
    encoder: str = "mlp",
    pool: str = "mean",
    canvas: str | None = None,
    segments: Segments | None = None,
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
    width = c_meta.shape[-1]
    factory = {"dtype": c_meta.dtype}
    xs = crossing_sets(gm, K)
    if segments is not None:
        problem = causal_layout_problem(canvas_node, xs)
        if problem:
            raise RewriteError(f"pool='causal': {problem}")
    seg = {"segments": segments}
    mods = nn.ModuleDict()
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
                                        residual=False, **seg),
             (None, canvas_node), PROLOGUE, order[canvas_node] + 0.5, "m_0")
    mods["enc_in"].pools_positions = len(c_meta.shape) >= 3
    dec0 = add("dec_0_0", InterfaceDecoder(ranks[0], width, width, _target_shape(c_meta.shape, c_meta.shape),
                                           kind=encoder, **seg), (m0, canvas_node), 0, -1.0, "decoder")
    for user in list(canvas_node.users):
        if user is not dec0 and place_of(user) == 0:
            user.replace_input_with(canvas_node, dec0)

    m_nodes = [m0]
    world: dict[tuple[int, fx.Node], fx.Node] = {}  # (region, crossing tensor) -> its stand-in
    for k in range(1, K):
        prev = m_nodes[-1]
        emitted = [u if place_of(u) == k - 1 else world[(k - 1, u)] for u in xs[k]]
        feats = [output_tensor(u).shape[-1] if len(output_tensor(u).shape) else 1 for u in xs[k]]
        r_in, r_out = ranks[max(k - 2, 0)] if k > 1 else ranks[0], ranks[k - 1]
        m_k = add(f"enc_{k - 1}", InterfaceEncoder(feats, r_out, width, kind=encoder, pool=pool,
                                                   in_rank=r_in, **seg),
                  (prev, *emitted), k - 1, float("inf"), f"m_{k}")
        mods[f"enc_{k - 1}"].pools_positions = any(len(output_tensor(u).shape) >= 3 for u in xs[k])
        m_nodes.append(m_k)
        for i, u in enumerate(xs[k]):
            t = output_tensor(u)
            same = tuple(t.shape) == tuple(c_meta.shape)
            dec = add(f"dec_{k}_{i}", InterfaceDecoder(
                r_out, width, t.shape[-1] if len(t.shape) > 1 else 1,
                _target_shape(t.shape, c_meta.shape), kind=encoder, use_canvas=same, **seg),
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
    """Why segment-causal interfaces cannot carry this model, or None: they need the
    sequence on axis 1 (batch first) of the canvas and of every crossing tensor."""
    c = output_tensor(canvas)
    if len(c.shape) < 3:
        return (f"the canvas {canvas.name} has shape {tuple(c.shape)}: there is no sequence "
                "axis (batch first, sequence on axis 1, features last)")
    for k, nodes in crossings.items():
        for u in nodes:
            t = output_tensor(u)
            if len(t.shape) < 3 or _target_shape(t.shape, c.shape)[1] != ("canvas", 1):
                return (f"{u.name} ({module_of(u) or '<top level>'}) crosses into region {k} with "
                        f"shape {tuple(t.shape)}, whose axis 1 is not the sequence axis of the "
                        f"canvas {tuple(c.shape)}; keep (batch, sequence, ..., features) at "
                        "region boundaries")
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
