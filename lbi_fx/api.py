"""Public entry points: ``verify`` and ``transform``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lbi_fx.analysis import analyze, normalize_rank, separator_report
from lbi_fx.errors import InputError, RewriteError
from lbi_fx.interfaces import (
    DECODER_INITS,
    MIN_RANKS,
    NORMS,
    POOLS,
    SUMMARIES,
    Segments,
    check_window,
    rank_problem,
)
from lbi_fx.passes.shape_prop import on_meta, output_tensor
from lbi_fx.regions import RegionSpec
from lbi_fx.report import SeparatorReport


def verify(
    model: nn.Module,
    regions: RegionSpec | None = None,
    *,
    example_inputs: Sequence[object],
    rank: int | Sequence[int] | None = None,
    interfaces: Sequence | None = None,
    leaf_modules: Iterable[type | str] = (),
    seq_dim: int | Sequence[int | None] | None = None,
) -> SeparatorReport:
    """Check the vertex-separator condition at every region boundary, and causality.

    With ``rank=r`` a boundary holds iff its minimum separator is at most r scalars per
    sample (Def. 2.4); with ``interfaces=[...]`` (one module path or node per boundary)
    it holds iff removing those outputs cuts every dynamic path (Def. A.1). A model
    returned by ``transform`` carries its own regions and rank. ``report.causality`` says
    whether the model (and its LBI rewrite) is causal along its inputs' sequence axes
    (from the graph, or ``seq_dim``), measured by a probe; nothing for images.
    """
    if hasattr(model, "lbi_verify"):
        if regions is not None:
            raise InputError("an LBI module carries its own regions; call verify(lbi, example_inputs=...)")
        return model.lbi_verify(example_inputs=example_inputs, rank=rank, interfaces=interfaces)
    from lbi_fx.causality import Causality, graph_axes, probe_causal
    from lbi_fx.passes.seq_axes import mark_seq_axes

    a = analyze(model, regions, example_inputs, leaf_modules=leaf_modules)
    report = separator_report(a.gm, a.regions, a.batch, rank=rank, interfaces=interfaces)
    why = mark_seq_axes(a.gm, a.example_inputs, seq_dim)
    ia = a.gm.meta["lbi_input_axes"]
    if not ia.unknown and not ia.any_sequence:  # images: nothing to say about causality
        report.causality = Causality(model_causal=None, sequence=False)
        return report
    if ia.unknown:
        report.causality = Causality(model_causal=None, note=why)
        return report
    causal, leak, why = probe_causal(a.gm, a.example_inputs, **graph_axes(a.gm))
    report.causality = Causality(model_causal=causal, model_leak=leak, note=why)
    return report


def transform(
    model: nn.Module,
    regions: RegionSpec,
    rank: int | Sequence[int] = 16,
    *,
    example_inputs: Sequence[object],
    encoder: str = "mlp",
    pool: str = "auto",
    segment_len: int | None = None,
    max_len: int | None = None,
    canvas: str | None = None,
    jacobian: str = "auto",
    chunk: int | None = None,
    leaf_modules: Iterable[type | str] = (),
    scan_backend: str = "auto",
    check_finite: bool = False,
    decoder_init: str = "default",
    interface_norm: str = "layer",
    canvas_weights: str = "shared",
    summary: str = "prefix",
    decoder_window: int = 1,
    decoder_at: str = "first",
    seq_dim: int | Sequence[int | None] | None = None,
):
    """Rewrite ``model`` into a bounded-interface model whose backward is Algorithm 1.

    ``decoder_init="zero"`` starts every decoder at Dec_k(m) = 0, so each region begins
    as its dense self on the canvas and the interface only adds what training finds.
    ``canvas_weights="per_region"`` gives every region k >= 1 its own copy of the prologue
    weights its canvas is computed with (a tied head uses the last region's), so regions
    on different ranks all-reduce no embedding gradient (``passes/per_region_canvas.py``).

    ``pool`` says how an interface summarises the sequence. Each input's sequence axis
    is what the ops reading it say (an embedding lookup, a Conv1d's (B, C, L), a
    Linear's (B, L, D); a Conv2d reads an image, which has none), or what ``seq_dim``
    names (an int, or one int or None per tensor input) - never a guess from the shape;
    inside the model the graph says which axis of each tensor carries it (a second shape
    run at another length), so channels-first (B, D, L) works too.
    ``"causal"`` cuts it into S = ceil(max_len / segment_len) fixed segments and carries
    S rows of ``rank`` scalars, row s summarising positions before segment s, so no
    position sees a later one; transform then probes the built model at every cut and
    refuses a leak. ``"mean"`` / ``"last"`` (the paper's Eq. 5) pool every position into
    one row, which lets a causal model see the future. ``"auto"`` (default) probes the
    captured model at every cut: causal -> ``"causal"``, else ``"mean"`` (with a
    ``CausalityWarning`` when the probe cannot run); ``lbi.pool`` holds the choice.
    ``max_len`` defaults to the example inputs' sequence length, ``segment_len`` to
    ceil(max_len / 4). ``rank`` is per row and at least 3: the interface's LayerNorm
    leaves r - 2 degrees of freedom. ``interface_norm="rms"`` (RMSNorm, r - 1 left, rank
    >= 2) or ``"none"`` (all r, rank >= 1) keep more of a small row. ``summary="latest"``
    / ``"recent"`` (causal pools only) let each causal encoder read, beside the prefix
    mean, the last position before the row / the whole segment before it;
    ``"inclusive"`` reads the mean up to and including the row's first position and that
    position's own state (with ``segment_len=1`` every position reads its own deep state;
    use it with ``decoder_init="zero"``: with default decoders the per-position model
    trained far worse than one region alone, issue #23). ``decoder_window=w`` (causal pools
    only) lets each decoder read the w latest rows a position may see instead of one: a
    causal convolution over m_k's rows, so a per-position interface of rank 1 reaches the
    region as w features. ``decoder_at="every"`` also adds a decoder of m_k before every
    later block of a region (the modules its spec names), not only where it starts.

    The result shares parameters with ``model`` (deep-copy the model first for an
    independent copy). Raises an ``LBIError`` subclass naming the culprit when the
    model or spec cannot be made into an exact bounded-interface model.
    """
    import warnings

    from lbi_fx.checks import probe_batch_mixing, trial_backward
    from lbi_fx.errors import SeparatorError
    from lbi_fx.module import LBIModule
    from lbi_fx.passes.check_batch_mixing import check_batch_mixing
    from lbi_fx.passes.check_state import check_state_writes
    from lbi_fx.passes.decode_at_blocks import DECODER_AT
    from lbi_fx.passes.mark_dynamic import mark_dynamic
    from lbi_fx.passes.per_region_canvas import CANVAS_WEIGHTS
    from lbi_fx.passes.seq_axes import mark_seq_axes
    from lbi_fx.passes.shape_prop import propagate_shapes
    from lbi_fx.passes.split_places import split_places
    from lbi_fx.runtime import STRATEGIES

    if jacobian not in STRATEGIES:
        raise InputError(f"jacobian={jacobian!r}: choose one of {', '.join(STRATEGIES)}")
    if decoder_init not in DECODER_INITS:
        raise InputError(f"decoder_init={decoder_init!r}: choose one of {', '.join(DECODER_INITS)}")
    if canvas_weights not in CANVAS_WEIGHTS:
        raise InputError(f"canvas_weights={canvas_weights!r}: choose one of {', '.join(CANVAS_WEIGHTS)}")
    if decoder_at not in DECODER_AT:
        raise InputError(f"decoder_at={decoder_at!r}: choose one of {', '.join(DECODER_AT)}")
    if interface_norm not in NORMS:
        raise InputError(f"interface_norm={interface_norm!r}: choose one of {', '.join(NORMS)}")
    if summary not in SUMMARIES:
        raise InputError(f"summary={summary!r}: choose one of {', '.join(SUMMARIES)}")
    if summary != "prefix" and pool in ("mean", "last"):
        raise InputError(f"summary={summary!r} reads whole causal segments; pool={pool!r} has "
                         "none (use pool='causal' or 'auto')")
    a = analyze(model, regions, example_inputs, leaf_modules=leaf_modules)
    K = a.num_regions
    ranks = normalize_rank(rank, K - 1)
    if ranks is None:
        raise InputError("rank= is required for transform (an int >= 3, or one per interface)")
    for k, r in enumerate(ranks):
        if r < MIN_RANKS[interface_norm]:
            raise InputError(f"rank {r} for interface {k + 1}: {rank_problem(r, interface_norm)}")
    _check_float(a)
    check_batch_mixing(a.gm, K, a.batch)
    check_state_writes(a.gm, K)
    mark_seq_axes(a.gm, a.example_inputs, seq_dim)
    layout = choose_pool(a, pool, segment_len=segment_len, max_len=max_len, canvas=canvas)
    if summary != "prefix" and layout.segments is None:
        raise InputError(f"summary={summary!r} reads whole causal segments, but pool='auto' "
                         f"chose {layout.pool!r} for this model; pass pool='causal' or drop summary=")
    check_window(decoder_window, layout.segments)
    rows = layout.segments.count if layout.segments is not None else 1
    widths = [r * rows for r in ranks]  # scalars per sample each m_k carries
    dense = separator_report(a.gm, a.regions, a.batch)
    for b in dense.boundaries:
        if b.min_cut_scalars and widths[b.index - 1] >= b.min_cut_scalars:
            warnings.warn(
                f"lbi-fx: interface {b.index} carries {widths[b.index - 1]} scalars per sample "
                f"(rank {ranks[b.index - 1]} x {rows} segment(s)), not below the dense separator "
                f"({b.min_cut_scalars} scalars per sample): the interface compresses nothing",
                stacklevel=2)
    info = getattr(a.gm.graph._codegen, "pytree_info", None)
    meta = on_meta(a.gm)  # built on the meta device: interfaces too, and no value probes
    with torch.device("meta") if meta else contextlib.nullcontext():
        plan, origin = _rewrite(a, K, ranks, layout, encoder=encoder, canvas=canvas,
                                decoder_init=decoder_init, interface_norm=interface_norm,
                                summary=summary, decoder_window=decoder_window,
                                decoder_at=decoder_at, canvas_weights=canvas_weights)
    propagate_shapes(a.gm, a.example_inputs, blame="lbi-fx")  # the model ran: ours to fail
    mark_dynamic(a.gm)
    report = separator_report(a.gm, a.regions, a.batch, rank=widths)
    if not report.ok:
        raise SeparatorError(
            "the rewritten model still has a boundary wider than its rank - a bug in the "
            f"rewrite; please report it:\n{report}", report)
    programs = split_places(a.gm, K, plan.m_nodes)
    lbi = LBIModule(a.gm, programs, a.regions, widths, pytree_info=info, jacobian=jacobian,
                    chunk=chunk, scan_backend=scan_backend, check_finite=check_finite,
                    capture=a.gm.meta.get("lbi_capture", ""))
    lbi.canvas = plan.canvas
    lbi.canvas_weights = canvas_weights
    lbi.canvas_origin = origin
    lbi.init_seed = 0  # seeds lbi-fx's interface modules where they are built from meta
    lbi.pool = layout.pool
    lbi.rank_per_row = list(ranks)
    lbi.segments = layout.segments
    lbi.model_causal = layout.model_causal
    lbi.input_seq_axes = list(a.gm.meta["lbi_input_axes"].axes)
    _watch_original_hooks(lbi, model)
    lbi.unprobed = list(VALUE_PROBES) if meta else []
    if meta:
        return lbi
    probe_batch_mixing(lbi, a.example_inputs)
    if layout.pool == "causal":
        _check_built_causal(lbi, a, layout)
    trial_backward(lbi, a.example_inputs)
    return lbi


# what transform checks by running the model: skipped for a model on the meta device
VALUE_PROBES = ("batch mixing (numeric probe)", "causality of the built model (numeric probe)",
                "one trial backward")


def _rewrite(a, K, ranks, layout, *, encoder, canvas, decoder_init, interface_norm, summary,
             decoder_window, decoder_at, canvas_weights):
    """The passes that add modules: interfaces, decoders at every block, canvas copies.
    Returns the interface plan and, per canvas copy's module path, the module it copies."""
    from lbi_fx.passes.decode_at_blocks import decode_at_blocks
    from lbi_fx.passes.insert_interfaces import insert_interfaces
    from lbi_fx.passes.per_region_canvas import ORIGIN_KEY, per_region_canvas

    plan = insert_interfaces(a.gm, K, ranks, encoder=encoder, pool=layout.pool, canvas=canvas,
                             decoder_init=decoder_init, norm=interface_norm,
                             segments=layout.segments,
                             summary=summary, decoder_window=decoder_window)
    if decoder_at == "every":
        decode_at_blocks(a.gm, a.regions, plan.m_nodes, zero_init=decoder_init == "zero")
    if canvas_weights == "per_region":
        per_region_canvas(a.gm, K)
    return plan, dict(a.gm.meta.get(ORIGIN_KEY, {}))


def _watch_original_hooks(lbi, model) -> None:
    """Hooks added later to the original model's traced-through blocks would never run
    in ``lbi`` either: ``lbi`` refuses them at forward, naming the module."""
    from lbi_fx.module.state import traced_through

    if isinstance(model, nn.Module):
        mods = {p: m for p, m in traced_through(lbi._flat_graph, model).items()
                if all(m is not w[1] for w in lbi._hook_watch)}
        lbi._watch_hooks(mods, original=True)


def _check_float(a) -> None:
    from lbi_fx.errors import RewriteError

    floats = [p for p in a.gm.parameters() if p.dtype.is_floating_point]
    if not floats:
        raise RewriteError(
            "the model has no floating-point parameters; LBI rewrites trainable float models "
            "(convert with .float() first)")


@dataclass
class PoolChoice:
    """How the interfaces pool the sequence, and the probe result behind the choice."""

    pool: str
    segments: Segments | None
    model_causal: bool | None
    leak: float | None = None


def choose_pool(a, pool: str, *, segment_len: int | None = None, max_len: int | None = None,
                canvas: str | None = None) -> PoolChoice:
    """Resolve ``pool="auto"`` by probing the captured model for causality along its
    sequence (every cut; axes from ``passes.seq_axes``), and warn whenever the choice
    lets later positions reach earlier ones in a model that is, or may be, causal."""
    import warnings

    from lbi_fx.causality import CausalityWarning, graph_axes, probe_causal
    from lbi_fx.passes.insert_interfaces import (
        causal_layout_problem,
        crossing_sets,
        find_canvas,
        sequence_axis,
    )

    if pool not in POOLS:
        raise InputError(f"pool={pool!r}: choose one of {', '.join(POOLS)}")
    if pool in ("mean", "last") and (segment_len is not None or max_len is not None):
        raise InputError(f"segment_len= and max_len= shape causal interfaces; pool={pool!r} "
                         "takes neither")
    from lbi_fx.errors import SequenceAxisError
    from lbi_fx.passes.seq_axes import INPUT_AXES_KEY

    ia = a.gm.meta.get(INPUT_AXES_KEY)
    canvas_node = find_canvas(a.gm, canvas)
    if ia is not None and ia.unknown:  # the sequence axis is needed, never guessed
        need = (f"cannot tell the sequence axis of {ia.describe_unknown()}; name it with "
                "transform(..., seq_dim=<axis>) (one int, or one per tensor input; None for "
                "an input without one)")
        if pool == "causal" or max_len is not None or segment_len is not None:
            raise SequenceAxisError(f"pool={pool!r} needs the inputs' sequence axis: {need}")
        if pool == "auto":
            warnings.warn(f"lbi-fx: pool='auto' cannot probe causality: {need}; using "
                          "pool='mean', through which later positions reach earlier ones "
                          "if the model is causal", CausalityWarning, stacklevel=3)
        return PoolChoice("mean" if pool == "auto" else pool, None, None)
    if ia is not None and not ia.any_sequence and pool != "causal":
        # images: no sequence, nothing causal to probe or say (pool='causal' is refused
        # below: the canvas has no sequence axis)
        if max_len is not None or segment_len is not None:
            raise SequenceAxisError("segment_len= and max_len= bound a sequence axis, and no "
                                    "input has one; drop them or name it with seq_dim=")
        return PoolChoice("mean" if pool == "auto" else pool, None, None)
    if on_meta(a.gm):
        causal, leak, why = None, None, "the model is on the meta device: no values to probe"
    else:
        causal, leak, why = probe_causal(a.gm, a.example_inputs, **graph_axes(a.gm))
    crossings = crossing_sets(a.gm, a.num_regions)
    problem = causal_layout_problem(canvas_node, crossings)
    if problem is None and causal and pool in ("auto", "causal"):
        problem = _noncausal_crossing(a, crossings)
    if pool == "auto":
        pool = "causal" if causal and problem is None else "mean"
        if causal and problem is not None:
            warnings.warn(
                f"lbi-fx: the model is causal but causal interfaces cannot carry it "
                f"({problem}); using pool='mean', through which later positions reach "
                "earlier ones", CausalityWarning, stacklevel=3)
        elif causal is None and _has_sequence(canvas_node):
            warnings.warn(
                f"lbi-fx: pool='auto' cannot tell whether the model is causal ({why}); using "
                "pool='mean', through which later positions reach earlier ones. Pass "
                "pool='causal' for a causal model (transform then checks the result leaks "
                "nothing) or pool='mean' to keep the paper's pool and silence this warning",
                CausalityWarning, stacklevel=3)
    elif pool in ("mean", "last") and causal:
        warnings.warn(
            f"lbi-fx: pool={pool!r} on a causal model: every interface pools all positions, "
            "so earlier positions see later ones through m_k and one-forward losses "
            "understate the true loss. Use pool='causal' (or 'auto')",
            CausalityWarning, stacklevel=3)
    segments = None
    if pool == "causal":
        if problem is not None:
            raise RewriteError(f"pool='causal': {problem}")
        at = sequence_axis(canvas_node) or 1
        length = output_tensor(canvas_node).shape[at]
        segments = Segments.make(length if max_len is None else max_len, segment_len)
        segments.check(length)
    return PoolChoice(pool, segments, causal, leak)


def _noncausal_crossing(a, crossings: dict) -> str | None:
    """A tensor the interfaces will pool that reads later positions, in a model whose
    outputs do not (its value reaches no output, e.g. a block after the one the model
    returns): pooled into m_k, it would carry the future into every later region. The
    captured graph is probed with those tensors as its outputs; None when all are causal."""
    import torch.fx as fx
    from torch.utils import _pytree as pytree

    from lbi_fx.causality import probe_causal
    from lbi_fx.passes.capture import MODULE_KEY
    from lbi_fx.passes.insert_interfaces import sequence_axis
    from lbi_fx.passes.seq_axes import SEQ_INPUTS_KEY

    nodes = list(dict.fromkeys(n for k in sorted(crossings) for n in crossings[k]))
    leaves = pytree.tree_leaves(list(a.example_inputs))
    flags = a.gm.meta.get(SEQ_INPUTS_KEY)
    seq = {} if flags is None else {"seq_inputs": list(flags)}

    def probe(outs: list) -> tuple:
        g, env = fx.Graph(), {}
        g.graph_copy(a.gm.graph, env)
        g.output(tuple(env[n] for n in outs))
        return probe_causal(fx.GraphModule(a.gm, g, "Crossings"), leaves,
                            output_axes=[sequence_axis(n) for n in outs], **seq)

    if not nodes or probe(nodes)[0] is not False:
        return None
    for n in nodes:  # name the first that leaks
        causal, leak, _ = probe([n])
        if causal is False:
            return (f"{n.name} ({n.meta.get(MODULE_KEY) or '<top level>'}) crosses a region "
                    f"boundary and reads later positions (leak {leak:.1e}), though no output "
                    "of the model depends on it: an interface pooling it would carry the "
                    "future into every later region. Make that op causal, or take "
                    "pool='mean' knowingly")
    return ("tensors crossing region boundaries together read later positions though no "
            "output of the model depends on them; make those ops causal, or take "
            "pool='mean' knowingly")


def _has_sequence(canvas_node) -> bool:
    """Does the canvas carry positions (so a mean pool mixes them)? From the graph where
    it could tell, else a (B, L, ..., D) shape."""
    from lbi_fx.passes.seq_axes import SEQ_INPUTS_KEY, seq_axes

    if canvas_node.graph.owning_module.meta.get(SEQ_INPUTS_KEY) is not None:
        return bool(seq_axes(canvas_node))
    return len(output_tensor(canvas_node).shape) >= 3


def _check_built_causal(lbi, a, layout: PoolChoice) -> None:
    """Probe the built model over every cut: a causal pool must leave outputs at positions
    < t unchanged when inputs at positions >= t change. The probe runs while the
    interface weights are random and non-zero (``causality.live_interfaces``), so
    zero-initialised decoders cannot hide a leak that training would open. A leak in a
    rewrite of a causal model is lbi-fx's bug; in a model that is not (or not known to
    be) causal it is the model's own, which causal interfaces cannot remove. Either way
    the message names the interface modules the leak runs through."""
    from lbi_fx.causality import (
        CAUSAL_TOL,
        graph_axes,
        leaking_interfaces,
        live_interfaces,
        probe_causal,
    )
    from lbi_fx.errors import InternalError

    axes = graph_axes(a.gm)
    with live_interfaces(lbi) as live:
        causal, leak, _ = probe_causal(live, a.example_inputs, **axes)
        if causal is not False:
            return  # causal, or the probe cannot run the model (no per-position output)
        through = leaking_interfaces(live, a.example_inputs, **axes)
    what = (f"the model built with pool='causal' leaks: with non-zero interface weights its "
            f"outputs at positions < t move by {leak:.1e} (relative; tolerance "
            f"{CAUSAL_TOL:.0e}) when the inputs at positions >= t change"
            + (f", through {', '.join(through)}" if through else ""))
    if layout.model_causal:
        raise InternalError(f"{what}, although the captured model does not")
    model = ("reads later positions itself" if layout.model_causal is False
             else "may read later positions itself (the probe could not run it)")
    raise RewriteError(
        f"{what}: the model {model} (probe leak "
        f"{'unknown' if layout.leak is None else f'{layout.leak:.1e}'}), and causal interfaces "
        "cannot make it causal. Use pool='mean' (or 'auto') for a model that sees the future, "
        "or fix the op that reads ahead")
