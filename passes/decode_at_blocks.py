"""Decode the interface at every block of a region, not only at its entry
(``transform(..., decoder_at="every")``).

``insert_interfaces`` adds ``Dec_k(m_k)`` to the canvas where region k starts; its later
blocks see m_k only through what the first block kept of it in the hidden state. Here
each later block of region k (the modules the region spec names, in order) gets its own
decoder of the same m_k added to the one tensor the previous block hands it:
``h_j <- h_j + Dec_{k,j}(m_k)``. m_k already enters region k, so no boundary grows; the
region's Jacobian dm_{k+1}/dm_k simply has more paths, which the scan backward takes as
it takes any. Runs after ``insert_interfaces`` and before shape propagation; new nodes
carry the region's place and ``meta[ROLE_KEY] = "decoder"``.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from lbi_fx.errors import InputError, RewriteError
from lbi_fx.interfaces import InterfaceDecoder

from .capture import MODULE_KEY
from .insert_interfaces import IFACE, ROLE_KEY, _axes, seq_moved, sequence_axis
from .mark_dynamic import is_dynamic
from .partition import PLACE_KEY, module_of, place_of
from .shape_prop import output_tensor

DECODER_AT = ("first", "every")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def block_inputs(gm: fx.GraphModule, k: int, modules: list[str]) -> list[fx.Node]:
    """The tensor each block of region k after the first reads from the blocks before it:
    for module j >= 1 of the region, the one dynamic node of the region, made outside
    modules j, j+1, ... (in an earlier block or in glue between them), that a node under
    module j reads. Refused by name where there is not exactly one (a block that reads
    two tensors of the blocks before it, or none)."""
    out = []
    for j in range(1, len(modules)):
        earlier = modules[:j]
        found = []
        for n in gm.graph.nodes:
            if (place_of(n) != k or not is_dynamic(n)
                    or any(_under(module_of(n), p) for p in modules[j:])):
                continue
            if any(_under(module_of(u), modules[j]) for u in n.users):
                found.append(n)
        if len(found) != 1:
            what = ", ".join(n.name for n in found) or "none"
            raise InputError(
                f"decoder_at='every': block {modules[j]!r} of region {k} should read one tensor "
                f"from the blocks before it ({', '.join(earlier)}), but reads {what}; name "
                "regions whose modules each hand the next one hidden state, or use "
                "decoder_at='first'")
        out.append(found[0])
    return out


def decode_at_blocks(gm: fx.GraphModule, regions: list[list[str]], m_nodes: list[str],
                     *, zero_init: bool = False) -> list[str]:
    """Add a decoder of m_k before every block of region k but the first; returns the
    names of the decoders added. Each copies the entry decoder's (``lbi.dec_{k}_0``)
    rank, segments, window and kind; its sequence axis and target are those of the
    block's input, from the graph at that point (``_layout_at``)."""
    mods = getattr(gm, IFACE)
    by_name = {n.name: n for n in gm.graph.nodes}
    added = []
    for k, modules in enumerate(regions):
        entry = mods[f"dec_{k}_0"] if f"dec_{k}_0" in mods else None
        if entry is None:
            raise RewriteError(f"region {k} has no entry decoder to copy (a bug in lbi-fx's "
                               "rewrite; please report it)")
        m_k = by_name[m_nodes[k]]
        start = output_tensor(entry_target(gm, k))
        linear = isinstance(entry.net, nn.Linear)
        for j, h in enumerate(block_inputs(gm, k, modules), start=1):
            t = output_tensor(h)
            if t is None or tuple(t.shape) != tuple(start.shape):
                raise InputError(
                    f"decoder_at='every': {h.name} ({module_of(h)}), the input of block "
                    f"{modules[j]!r} of region {k}, is not shaped like the tensor the region "
                    f"starts from ({tuple(start.shape)}); use decoder_at='first'")
            name = f"dec_{k}_b{j}"
            at, shape = _layout_at(h, k, modules[j], entry.segments is not None)
            mods[name] = InterfaceDecoder(
                entry.rank, 0 if linear else entry.net[0].out_features,
                seq_moved(tuple(t.shape), at)[-1], shape,
                kind="linear" if linear else "mlp", segments=entry.segments,
                seq_axis=at, zero_init=zero_init, window=getattr(entry, "window", 1),
            ).to(dtype=t.dtype)
            users = [u for u in h.users if any(_under(module_of(u), p) for p in modules[j:])]
            with gm.graph.inserting_after(h):
                dec = gm.graph.create_node("call_module", f"{IFACE}.{name}", (m_k, h), {},
                                           name=f"{IFACE}_{name}")
            dec.meta[PLACE_KEY] = k
            dec.meta[MODULE_KEY] = f"{IFACE}.{name}"
            dec.meta[ROLE_KEY] = "decoder"
            for u in users:
                u.replace_input_with(h, dec)
            added.append(name)
    gm.graph.lint()
    gm.recompile()
    return added


def _layout_at(h: fx.Node, k: int, block: str, causal: bool
               ) -> tuple[int | None, list[tuple[str, int]]]:
    """The sequence axis of ``h`` as the graph says it at this insertion point (never the
    entry decoder's: a later block may take (B, D, L) where the region starts from (B, L,
    D)), and the decoder's target shape: every axis of ``h`` itself. A causal decoder
    needs exactly one sequence axis; refused by name where the graph cannot tell it."""
    axes = _axes(h)
    at = sequence_axis(h)
    if causal and at is None:
        raise RewriteError(
            f"decoder_at='every': cannot tell the sequence axis of {h.name} "
            f"({module_of(h) or '<top level>'}), the input of block {block!r} of region {k} "
            f"(sequence axes from the graph: {axes if axes is not None else 'unknown'}); a "
            "causal decoder adds m_k's rows along it. Use decoder_at='first'")
    shape = [("canvas", i) for i in range(len(output_tensor(h).shape))]
    return at, shape


def entry_target(gm: fx.GraphModule, k: int) -> fx.Node:
    """The tensor region k's entry decoder adds Dec_k(m_k) to (its second argument)."""
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == f"{IFACE}.dec_{k}_0":
            return n.args[1]
    raise RewriteError(f"no entry decoder node for region {k} (a bug in lbi-fx; please report it)")
