"""Causality along the sequence axis, measured rather than assumed.

A model is causal when its outputs at positions < t do not change when its inputs at
positions >= t do (inputs and outputs carry the sequence on the axes the graph says or
the user names, ``passes/seq_axes.py``; never a guess from an axis's position). lbi-fx probes that numerically at every cut t:
it perturbs the later positions of every sequence input (integer ids are replaced by
other ids, float inputs get Gaussian noise), reruns the model with the same RNG state,
and measures how far earlier outputs moved. The same probe decides ``pool="auto"``,
checks what ``transform`` built, and tells ``verify`` whether an LBI model leaks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.errors import InputError

CAUSAL_TOL = 1e-6  # relative change of earlier outputs below which a model counts as causal


class CausalityWarning(UserWarning):
    """A causal model gets an interface that lets earlier positions see later ones."""


@dataclass
class Causality:
    """What ``verify`` reports: is the model causal, is its LBI rewrite, and which
    interface modules pool across positions (the leaks)."""

    model_causal: bool | None
    lbi_causal: bool | None = None
    leaks: list[str] = field(default_factory=list)
    model_leak: float | None = None  # causal_leak of the model (relative)
    lbi_leak: float | None = None    # causal_leak of the LBI module
    note: str = ""
    sequence: bool = True  # False: no input has a sequence axis (an image), nothing to say

    def to_dict(self) -> dict:
        return {"model_causal": self.model_causal, "lbi_causal": self.lbi_causal,
                "leaks": list(self.leaks), "model_leak": self.model_leak,
                "lbi_leak": self.lbi_leak, "note": self.note, "sequence": self.sequence}

    def __str__(self) -> str:
        if not self.sequence:
            return ""

        def yn(v: bool | None) -> str:
            return "unknown" if v is None else "yes" if v else "NO"

        text = f"causality (every cut of the sequence): model causal: {yn(self.model_causal)}"
        if self.model_leak is not None:
            text += f" (leak {self.model_leak:.1e})"
        if self.lbi_causal is not None:
            text += f"; LBI causal: {yn(self.lbi_causal)}"
            if self.lbi_leak is not None:
                text += f" (leak {self.lbi_leak:.1e})"
        if self.leaks:
            text += f"; interfaces pooling across positions: {', '.join(self.leaks)}"
        if self.note:
            text += f"; {self.note}"
        return text


def _is_sequence(x: object) -> bool:
    """Ids (B, L, ...) or features (B, L, ..., D): a float (B, D) has no sequence axis
    (the default for a plain module when neither the graph nor ``seq_dim`` said which
    inputs carry the sequence)."""
    if not isinstance(x, torch.Tensor):
        return False
    floating = x.dtype.is_floating_point or x.dtype.is_complex
    return x.dim() >= (3 if floating else 2)


def _sequence_axes(tensors: list[torch.Tensor], seq_inputs: Sequence | None) -> list[int | None]:
    """The sequence axis of every tensor input: ``seq_inputs`` holds one per tensor (an
    int, None for none; True / False mean axis 1 / none), else the shape default."""
    if seq_inputs is not None and len(seq_inputs) == len(tensors):
        out = []
        for f, x in zip(seq_inputs, tensors):
            a = (1 if f else None) if isinstance(f, bool) else f
            out.append(a if isinstance(a, int) and 0 < a < x.dim() else None)
        return out
    return [1 if _is_sequence(x) else None for x in tensors]


def _changed(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x with every entry replaced by a different value of the same kind."""
    if x.dtype == torch.bool:
        return ~x
    if x.dtype.is_floating_point or x.dtype.is_complex:
        scale = float(x.detach().abs().amax()) or 1.0
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        return x + (scale * noise).to(device=x.device, dtype=x.dtype)
    hi = max(int(x.max()), 1) + 1  # ids: another id from the range the input already uses
    shift = torch.randint(1, hi, x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
    return (x + shift) % hi


def _later(cuts: list[int], batch: int, length: int, axis: int, like: torch.Tensor) -> torch.Tensor:
    """Bool mask (n * batch, ...) broadcastable to ``like``: copy j's positions >=
    cuts[j] along ``axis``."""
    dim = like.dim()
    pos = torch.arange(length, device=like.device)
    mask = pos[None, :] >= torch.tensor(cuts, device=like.device)[:, None]  # (n, L)
    mask = mask.repeat_interleave(batch, dim=0)                   # (n * B, L)
    shape = [mask.shape[0]] + [1] * (dim - 1)
    shape[axis] = length
    return mask.reshape(shape)


def _output_axes(outs: list, length: int, output_axes: Sequence | None) -> list[int | None]:
    """The sequence axis of each output tensor (None: not a per-position float output)."""
    given = output_axes is not None and len(output_axes) == len(outs)
    axes = []
    for i, o in enumerate(outs):
        if not o.dtype.is_floating_point or o.dim() < 2:
            axes.append(None)
        elif given:
            ax = output_axes[i]
            ax = ax[0] if isinstance(ax, tuple) and len(ax) == 1 else ax
            axes.append(ax if isinstance(ax, int) and 0 < ax < o.dim() and o.shape[ax] == length
                        else None)
        else:
            axes.append(1 if o.shape[1] == length else None)
    return axes


def _restore_buffers(model: nn.Module):
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}

    def restore():
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in saved and b.shape == saved[k].shape:
                    b.copy_(saved[k])

    return restore


def _captured_axes(model: nn.Module, example_inputs: Sequence[object]) -> list | None:
    """The inputs' sequence axes as the ops of ``model``'s captured graph say them
    (``passes.seq_axes.derive_input_axes``); None where the capture fails or an axis is
    unknown (the shape default then applies: ids (B, L), features (B, L, ..., D))."""
    from lbi_fx.passes.capture import capture
    from lbi_fx.passes.seq_axes import derive_input_axes
    from lbi_fx.passes.shape_prop import propagate_shapes

    restore = _restore_buffers(model)
    try:
        with warnings.catch_warnings(), torch.no_grad(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            gm = capture(model, example_inputs)
            propagate_shapes(gm, example_inputs)
            ia = derive_input_axes(gm, example_inputs)
    except Exception:  # noqa: BLE001 - a model the capture cannot take: the default
        return None
    finally:
        restore()
    return None if ia.unknown else list(ia.axes)


def _module_axes(model: nn.Module, example_inputs: Sequence[object], seed: int) -> tuple:
    """(seq_inputs, output_axes) from running the model one position longer (or shorter):
    the output axes whose size follows the length are its sequence axes. (None, None)
    where the model runs at one length only (the shape heuristics then apply)."""
    from lbi_fx.passes.seq_axes import resize_sequence, sequence_length

    tensors = [x for x in pytree.tree_leaves(list(example_inputs)) if isinstance(x, torch.Tensor)]
    given = getattr(model, "input_seq_axes", None)  # an LBI module: what transform derived
    if given is None:
        given = _captured_axes(model, example_inputs)
    if given is not None and len(given) == len(tensors):
        flags = list(given)
        length = next((int(x.shape[a]) for x, a in zip(tensors, flags) if a is not None), None)
    else:
        flags = None
        length = sequence_length(example_inputs)
    if length is None:
        return (flags, None) if flags is not None else (None, None)
    restore = _restore_buffers(model)

    def shapes(xs):
        restore()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model(*xs)
        return [tuple(o.shape) for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]

    try:
        base = shapes(list(example_inputs))
        for new in (length + 1, length - 1):
            if new < 2:
                continue
            try:
                other = shapes(resize_sequence(example_inputs, length, new, flags))
            except Exception:  # noqa: BLE001 - fixed to one length: try the other side
                continue
            if len(other) != len(base):
                return None, None
            axes = [tuple(i for i, (p, q) in enumerate(zip(a, b)) if p != q)
                    if len(a) == len(b) else None for a, b in zip(base, other)]
            if flags is None:
                flags = [1 if x.dim() >= 2 and x.shape[1] == length else None for x in tensors]
            return flags, axes
    except Exception:  # noqa: BLE001 - the probe proper reports a model that does not run
        return flags, None
    finally:
        restore()
    return flags, None


def causal_leak(model: nn.Module, example_inputs: Sequence[object], *,
                cuts: Sequence[int] | None = None, seed: int = 0,
                seq_inputs: Sequence[bool] | None = None, output_axes: Sequence | None = None,
                max_tokens: int = 8192) -> float:
    """Max change of outputs at positions < t when inputs at positions >= t change,
    relative to the output scale, over every cut t = 1..L-1 (or ``cuts``). 0.0 for a
    causal model.

    ``seq_inputs`` gives the sequence axis of every tensor input (one int or None per
    tensor, from the graph: ``passes/seq_axes.py``; an LBI module carries what
    ``transform`` derived; else ids (B, L) and features (B, L, ..., D) on axis 1). Every float
    output with a sequence axis is compared along it (``output_axes``: one entry per
    output tensor, from the graph; else axis 1 where it has the input's length). The
    perturbed copies go through the model together, ``max_tokens`` at a time, against
    an unperturbed replica of the same size run with the same RNG seed (same dropout
    masks); under ``no_grad``, buffers restored afterwards. Raises ``InputError`` when no
    input or no output has a sequence axis.
    """
    leaves, spec = pytree.tree_flatten(list(example_inputs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if seq_inputs is None and output_axes is None:
        seq_inputs, output_axes = _module_axes(model, example_inputs, seed)
    in_axes = _sequence_axes(tensors, seq_inputs)
    seqs = [(x, a) for x, a in zip(tensors, in_axes) if a is not None]
    if not seqs:
        raise InputError("no example input has a sequence axis; causality is measured along "
                         "the inputs' sequence axes (transform(..., seq_dim=) names them)")
    length = int(seqs[0][0].shape[seqs[0][1]])
    if length < 2:
        raise InputError("causality needs a sequence of at least 2 positions in example_inputs")
    batch = next(int(x.shape[0]) for x in tensors if x.dim() >= 1)
    cuts = sorted({t for t in (range(1, length) if cuts is None else cuts) if 0 < t < length})
    restore = _restore_buffers(model)

    def run(xs):
        restore()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model(*pytree.tree_unflatten(xs, spec))
        return [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]

    def leak_over(chunk: list[int], gen: torch.Generator) -> tuple[float, float]:
        n = len(chunk)
        rep, pert = [], []
        for x in leaves:
            is_t = isinstance(x, torch.Tensor)
            if not is_t or x.dim() < 1 or x.shape[0] != batch:
                rep.append(x)
                pert.append(x)
                continue
            xr = x.repeat(n, *([1] * (x.dim() - 1)))
            rep.append(xr)
            ax = next((a for s, a in seqs if s is x), None)
            if ax is not None and x.shape[ax] == length:
                mask = _later(chunk, batch, length, ax, xr)
                xr = torch.where(mask, _changed(xr, gen), xr)
            pert.append(xr)
        a_outs, b_outs = run(rep), run(pert)
        axes = _output_axes(a_outs, length, output_axes)
        worst, scale, seen = 0.0, 0.0, False
        for a, b, ax in zip(a_outs, b_outs, axes):
            if ax is None or a.shape[0] != n * batch or a.shape != b.shape:
                continue
            seen = True
            scale = max(scale, float(a.detach().abs().amax()))
            earlier = ~_later(chunk, batch, length, ax, a)
            diff = torch.where(earlier, (b.double() - a.double()).abs(), 0.0)
            worst = max(worst, float(diff.amax()))
        if not seen:
            raise InputError(
                f"no output of {type(model).__name__} has the sequence axis (length {length}): "
                "causality is defined for per-position outputs")
        return worst, scale

    per = max(1, max_tokens // (batch * length))
    try:
        for step in (per, 1):
            gen = torch.Generator().manual_seed(seed)
            try:
                worst, scale = 0.0, 0.0
                for i in range(0, len(cuts), step):
                    w, s = leak_over(cuts[i:i + step], gen)
                    worst, scale = max(worst, w), max(scale, s)
                break
            except InputError:
                raise
            except Exception:
                if step == 1:  # the model runs one sample batch at a time only: say so
                    raise
    finally:
        restore()
    return worst / (scale or 1.0)


def probe_causal(model: nn.Module, example_inputs: Sequence[object], **axes
                 ) -> tuple[bool | None, float | None, str]:
    """(causal?, leak, why unknown): never raises - a model the probe cannot run is
    reported as unknown (None); ``axes`` are ``causal_leak``'s ``seq_inputs`` /
    ``output_axes`` (see ``graph_axes``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leak = causal_leak(model, example_inputs, **axes)
    except InputError as exc:
        return None, None, str(exc).split(";")[0]
    except Exception as exc:  # noqa: BLE001 - the probe must not break verify/transform
        return None, None, f"the causality probe could not run the model ({type(exc).__name__}: {exc})"
    return leak <= CAUSAL_TOL, leak, ""


def graph_axes(gm: torch.fx.GraphModule) -> dict:
    """``causal_leak``'s ``seq_inputs`` and ``output_axes`` as the graph says them (after
    ``passes.seq_axes.mark_seq_axes``); empty when it could not tell."""
    from lbi_fx.passes.seq_axes import SEQ_INPUTS_KEY, SEQ_KEY

    flags = gm.meta.get(SEQ_INPUTS_KEY)
    if flags is None:
        return {}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return {"seq_inputs": list(flags), "output_axes": out.meta.get(SEQ_KEY)}


def leaky_interfaces(lbi: nn.Module) -> list[str]:
    """Interface encoders that pool a sequence axis over all positions (mean / last)."""
    from lbi_fx.interfaces import InterfaceEncoder

    out = []
    iface = getattr(lbi, "lbi", None)
    if iface is None:
        return out
    for name, mod in iface.named_children():
        if isinstance(mod, InterfaceEncoder) and mod.segments is None and mod.pool in ("mean", "last"):
            if getattr(mod, "pools_positions", True):
                out.append(f"lbi.{name}")
    return out


@contextmanager
def live_interfaces(lbi: nn.Module, seed: int = 0):
    """Within the block, the interface encoders and decoders of an LBI module have
    random, non-zero weights (every ``nn.Linear`` under ``lbi`` reset, biases drawn too;
    the weights are restored after): a design that starts at zero
    (``decoder_init="zero"``, ``per_position()``) must not pass the causality probe by
    being zero - training makes it non-zero. In place, so no copy of the model is made."""
    iface = getattr(lbi, "lbi", None)
    linears = [m for m in iface.modules() if isinstance(m, nn.Linear)] if iface is not None else []
    saved = [(p, p.detach().clone()) for m in linears for p in m.parameters()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for mod in linears:
                mod.reset_parameters()
                if mod.bias is not None:
                    nn.init.uniform_(mod.bias, -1.0, 1.0)
        yield lbi
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)


def leaking_interfaces(live: nn.Module, example_inputs: Sequence[object], **axes) -> list[str]:
    """The interface modules of ``live`` (see ``live_interfaces``) whose output
    layer, zeroed alone, stops the leak: the ones through which later positions reach
    earlier ones."""
    iface = getattr(live, "lbi", None)
    if iface is None:
        return []
    out = []
    for name, mod in iface.named_children():
        last = [m for m in mod.modules() if isinstance(m, nn.Linear)]
        if not last:
            continue
        saved = [(p, p.detach().clone()) for p in last[-1].parameters()]
        with torch.no_grad():
            for p, _ in saved:
                p.zero_()
        try:
            causal, _, _ = probe_causal(live, example_inputs, **axes)
        finally:
            with torch.no_grad():
                for p, v in saved:
                    p.copy_(v)
        if causal:
            out.append(f"lbi.{name}")
    return out
