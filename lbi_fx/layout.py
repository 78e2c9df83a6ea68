"""The interface layout a set of LBI weights only makes sense in, and its record in state dicts.

Two models with other region partitions (regions (1, 3) and (2, 2) of four blocks), other
pools (``"mean"``/``"last"``/``"causal"``) or other segment layouts have parameters of the same names and shapes, so ``load_state_dict`` and a checkpoint's
shape check alone accept the weights of one into the other; the logits then differ. The
layout is therefore recorded beside the weights and compared before they are used:

* :mod:`lbi_fx.checkpoint` writes :func:`lbi_layout` into ``lbi_meta.json``;
* :class:`InterfaceDict` (the ``lbi`` container of every rewritten model) puts
  :func:`interface_layout` into ``state_dict()`` as ``lbi._extra_state`` and refuses, on
  ``load_state_dict``, a record that differs. Only the ``lbi.*`` keys, lbi-fx's own,
  change; the user's modules keep their keys. A state dict without the record (saved
  before lbi-fx wrote one) still loads, with a warning that the layout went unchecked.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from torch import nn

from lbi_fx.errors import CheckpointError

RECORD = 1  # version of the extra-state record


def _kind(module: nn.Module) -> str | None:
    """``"linear"`` or ``"mlp"``: the ``kind`` an interface module's network was built with."""
    net = getattr(module, "net", None)
    if net is None:
        return None
    return "linear" if isinstance(net, nn.Linear) else "mlp"


def interface_layout(container: nn.Module) -> dict[str, Any]:
    """Pool, segment layout, encoder kind and encoder ranks, read off the interface modules
    themselves (so it describes the weights, whatever attributes the model carries)."""
    from lbi_fx.interfaces import InterfaceEncoder

    pools, segs, kinds, ranks, summaries, windows = set(), set(), set(), {}, set(), set()
    norms = set()
    for name, mod in container.named_children():
        seg = getattr(mod, "segments", None)
        segs.add(None if seg is None else (seg.count, seg.length, seg.max_len))
        kind = _kind(mod)
        if kind is not None:
            kinds.add(kind)
        if isinstance(mod, InterfaceEncoder):
            pools.add(mod.pool)
            summaries.add(getattr(mod, "summary", "prefix"))
            ranks[name] = [mod.in_rank, mod.rank]
            norms.add(getattr(mod, "norm_kind", "layer"))
        else:
            windows.add(getattr(mod, "window", 1))

    def one(values: set):
        return next(iter(values)) if len(values) == 1 else sorted(values, key=repr) or None

    seg = one(segs)
    regions = getattr(container, "regions", None)  # set by LBIModule: the module paths per region
    return {"regions": None if regions is None else [list(r) for r in regions],
            "pool": one(pools),
            "segments": None if seg is None else dict(zip(("count", "length", "max_len"), seg)),
            "encoder": one(kinds), "ranks": ranks, "interface_norm": one(norms) or "layer", "summary": one(summaries) or "prefix",
            "decoder_window": one(windows) or 1,
            # passes/decode_at_blocks.py names its decoders dec_{k}_b{j}
            "decoder_at": "every" if any(re.fullmatch(r"dec_\d+_b\d+", n)
                                         for n, _ in container.named_children()) else "first",
            # set by passes/per_region_canvas.py: per-region copies of the canvas weights
            "canvas_weights": getattr(container, "canvas_weights", "shared")}


def lbi_layout(lbi: nn.Module) -> dict[str, Any]:
    """:func:`interface_layout` of ``lbi.lbi`` plus the model's per-row interface ranks."""
    out = interface_layout(getattr(lbi, "lbi", nn.Module()))
    out["rank_per_row"] = list(getattr(lbi, "rank_per_row", getattr(lbi, "ranks", [])))
    return out


FIELDS = {"regions": "regions", "pool": "pool", "segments": "segment layout", "encoder": "encoder kind",
          "ranks": "interface ranks", "rank_per_row": "interface ranks per row",
          "canvas_weights": "canvas weights", "summary": "causal summary",
          "decoder_window": "decoder window", "decoder_at": "decoders at",
          "interface_norm": "interface norm"}


def _show(field: str, value: Any) -> str:
    if field == "segments":
        return ("none (no causal segments)" if value is None else
                f"{value['count']} segments of {value['length']} positions, max_len "
                f"{value['max_len']}")
    return repr(value)


def layout_mismatch(saved: dict, now: dict, source: str = "the state dict has") -> str | None:
    """The first field that differs, with both values, in :data:`FIELDS` order; fields
    one side lacks (an older record, or a container no LBIModule named regions for) are
    skipped."""
    for key, label in FIELDS.items():
        if key == "regions" and None in (saved.get(key), now.get(key)):
            continue
        if key in saved and key in now and saved[key] != now[key]:
            return (f"{label}: {source} {_show(key, saved[key])}, this model "
                    f"{_show(key, now[key])}")
    return None


def rebuild_hint(saved: dict) -> str:
    """What to do about a layout mismatch: the transform arguments the saved layout needs."""
    seg = saved.get("segments")
    how = f"pool={saved.get('pool')!r}"
    if saved.get("regions") is not None:
        how = f"regions={saved['regions']!r}, " + how
    if seg:
        how += f", segment_len={seg['length']}, max_len={seg['max_len']}"
    if isinstance(saved.get("encoder"), str):
        how += f", encoder={saved['encoder']!r}"
    if saved.get("summary", "prefix") != "prefix":
        how += f", summary={saved['summary']!r}"
    if saved.get("decoder_at", "first") != "first":
        how += f", decoder_at={saved['decoder_at']!r}"
    if saved.get("decoder_window", 1) != 1:
        how += f", decoder_window={saved['decoder_window']!r}"
    if saved.get("canvas_weights", "shared") != "shared":
        how += f", canvas_weights={saved['canvas_weights']!r}"
    if saved.get("interface_norm", "layer") != "layer":
        how += f", interface_norm={saved['interface_norm']!r}"
    return f"rebuild the model with lbi_fx.transform(..., {how}) and the saved ranks, then load"


class InterfaceDict(nn.ModuleDict):
    """The ModuleDict of interface modules (``lbi.lbi``); its state dict entry
    ``lbi._extra_state`` records :func:`interface_layout`, checked on load.

    The check runs when ``load_state_dict`` reaches ``lbi`` (the last child), so a refused
    load has already copied the user's modules, as torch's own shape errors do: reload or
    rebuild the model before using it."""

    def get_extra_state(self) -> dict[str, Any]:
        return {"lbi_layout": RECORD, **interface_layout(self)}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "lbi_layout" not in state:
            raise CheckpointError(
                f"the state dict's lbi._extra_state is {type(state).__name__}, not an lbi-fx "
                "layout record: load a state dict saved from an lbi_fx.transform model")
        problem = layout_mismatch(state, interface_layout(self))
        if problem:
            raise CheckpointError(
                f"state dict does not fit this model's interfaces: {problem}; {rebuild_hint(state)} "
                "(or drop 'lbi._extra_state' from the state dict to load into another layout "
                "on purpose)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:  # saved before the record existed
            missing_keys.remove(key)
            warnings.warn(f"lbi-fx: the state dict has no {key} (saved before lbi-fx recorded "
                          "interface layouts): its pool, segment layout and encoder kind are "
                          "not checked against this model", stacklevel=4)
