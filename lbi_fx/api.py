"""Public entry points: ``verify`` and ``transform``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from lbi_fx.analysis import analyze, normalize_rank, separator_report
from lbi_fx.errors import InputError
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
) -> SeparatorReport:
    """Check the vertex-separator condition at every region boundary.

    With ``rank=r`` a boundary holds iff its minimum separator is at most r scalars per
    sample (Def. 2.4); with ``interfaces=[...]`` (one module path or node per boundary)
    it holds iff removing those outputs cuts every dynamic path (Def. A.1). A model
    returned by ``transform`` carries its own regions and rank.
    """
    if hasattr(model, "lbi_verify"):
        if regions is not None:
            raise InputError("an LBI module carries its own regions; call verify(lbi, example_inputs=...)")
        return model.lbi_verify(example_inputs=example_inputs, rank=rank, interfaces=interfaces)
    a = analyze(model, regions, example_inputs, leaf_modules=leaf_modules)
    return separator_report(a.gm, a.regions, a.batch, rank=rank, interfaces=interfaces)


def transform(
    model: nn.Module,
    regions: RegionSpec,
    rank: int | Sequence[int] = 16,
    *,
    example_inputs: Sequence[object],
    encoder: str = "mlp",
    pool: str = "mean",
    canvas: str | None = None,
    jacobian: str = "auto",
    chunk: int | None = None,
    leaf_modules: Iterable[type | str] = (),
    scan_backend: str = "auto",
    check_finite: bool = False,
):
    """Rewrite ``model`` into a bounded-interface model whose backward is Algorithm 1.

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
    from lbi_fx.passes.insert_interfaces import insert_interfaces
    from lbi_fx.passes.mark_dynamic import mark_dynamic
    from lbi_fx.passes.shape_prop import propagate_shapes
    from lbi_fx.passes.split_places import split_places
    from lbi_fx.runtime import STRATEGIES

    if jacobian not in STRATEGIES:
        raise InputError(f"jacobian={jacobian!r}: choose one of {', '.join(STRATEGIES)}")
    a = analyze(model, regions, example_inputs, leaf_modules=leaf_modules)
    K = a.num_regions
    ranks = normalize_rank(rank, K - 1)
    if ranks is None:
        raise InputError("rank= is required for transform (an int >= 1, or one per interface)")
    _check_float(a)
    check_batch_mixing(a.gm, K, a.batch)
    check_state_writes(a.gm, K)
    dense = separator_report(a.gm, a.regions, a.batch)
    for b in dense.boundaries:
        if b.min_cut_scalars and ranks[b.index - 1] >= b.min_cut_scalars:
            warnings.warn(
                f"lbi-fx: rank {ranks[b.index - 1]} at boundary {b.index} is not below the dense "
                f"separator ({b.min_cut_scalars} scalars per sample): the interface compresses "
                "nothing", stacklevel=2)
    info = getattr(a.gm.graph._codegen, "pytree_info", None)
    plan = insert_interfaces(a.gm, K, ranks, encoder=encoder, pool=pool, canvas=canvas)
    propagate_shapes(a.gm, a.example_inputs)
    mark_dynamic(a.gm)
    report = separator_report(a.gm, a.regions, a.batch, rank=ranks)
    if not report.ok:
        raise SeparatorError(
            "the rewritten model still has a boundary wider than its rank - a bug in the "
            f"rewrite; please report it:\n{report}", report)
    programs = split_places(a.gm, K, plan.m_nodes)
    lbi = LBIModule(a.gm, programs, a.regions, ranks, pytree_info=info, jacobian=jacobian,
                    chunk=chunk, scan_backend=scan_backend, check_finite=check_finite,
                    capture=a.gm.meta.get("lbi_capture", ""))
    lbi.canvas = plan.canvas
    lbi.pool = pool
    probe_batch_mixing(lbi, a.example_inputs)
    trial_backward(lbi, a.example_inputs)
    return lbi


def _check_float(a) -> None:
    from lbi_fx.errors import RewriteError

    floats = [p for p in a.gm.parameters() if p.dtype.is_floating_point]
    if not floats:
        raise RewriteError(
            "the model has no floating-point parameters; LBI rewrites trainable float models "
            "(convert with .float() first)")
