"""Capture: any PyTorch model -> ``fx.GraphModule`` whose nodes know their module path.

Three entry forms are accepted: an ``nn.Module`` (symbolic tracing with our tracer,
falling back to ``torch.export`` when tracing fails), an ``fx.GraphModule`` (taken as
is) and the module of a ``torch.export`` program (``ep.module()``). Whatever the
route, every node ends with ``node.meta["lbi_module"]``: the dotted path of the
innermost module it came from ("" for top-level code), the fact regions are named by.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from lbi_fx.errors import InputError, TraceError

from .follow_mode import ModeMismatch, fixed_mode_ops, follow_mode
from .meta_keys import CAPTURE_KEY, MODE_KEY, MODE_PROBLEM_KEY, MODULE_KEY, SIGNATURE_KEY
from .vmappable_sizes import vmappable_sizes


class CaptureWarning(UserWarning):
    """How lbi-fx captured a model differs from how it was asked or configured (symbolic
    tracing fell back to torch.export; a Hugging Face KV cache turned off)."""


class LBITracer(fx.Tracer):
    """``fx.Tracer`` that keeps ``leaf_modules`` (types or paths) opaque.

    Opaque blocks (e.g. mamba-ssm's ``Mamba2``, whose CUDA kernels FX cannot trace)
    stay single ``call_module`` nodes; their path is the node's target. Modules that
    declare ``lbi_fx_leaf = True`` (``lbi_fx.pgf.TiledMamba2Mixer``) are leaves as well.
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        leaves = list(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_paths = {x for x in leaves if isinstance(x, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_paths:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if getattr(m, "lbi_fx_leaf", False):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _is_export_module(gm: nn.Module) -> bool:
    return isinstance(gm, fx.GraphModule) and isinstance(
        gm.graph._codegen, fx.graph._PyTreeCodeGen
    )


def _stack_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if not isinstance(path, str) or path.startswith("_empty_nn_module_stack"):
        return None
    # Dynamo-style keys ("L['self'].layers.0") are normalised to plain dotted paths.
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path


def annotate_module_paths(gm: fx.GraphModule) -> None:
    """Fill ``meta["lbi_module"]`` on every node.

    ``call_module`` nodes are their own target; other nodes take the innermost entry
    of ``nn_module_stack``. Nodes without a stack (placeholders, top-level code, and
    ``get_attr`` nodes, whose owner is the attribute path) fill the gap: a
    ``get_attr`` belongs to the module that owns the attribute.
    """
    for node in gm.graph.nodes:
        if MODE_KEY in node.meta:
            continue  # a mode switch keeps the path of the op it wraps
        if node.op == "call_module":
            path = str(node.target)
            stack = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
            parent = stack[-2] if len(stack) >= 2 and isinstance(stack[-2], str) else None
            if parent and not path.startswith(parent + "."):
                # a module instance registered under several paths: name it by the caller
                path = f"{parent}.{path.rpartition('.')[2]}"
        elif node.op == "get_attr":
            path = str(node.target).rpartition(".")[0]
        else:
            path = _stack_path(node) or ""
        node.meta[MODULE_KEY] = path
        if isinstance(node.type, str):
            # a postponed annotation ("torch.Tensor" under `from __future__ import
            # annotations`) would become a str global of the generated code, which
            # GraphModule pickling (torch.save) cannot import
            node.type = None


def _dynamic_shapes(example_inputs: Sequence[object]) -> tuple:
    """Batch (dim 0) and sequence (dim 1) stay dynamic; ``Dim.AUTO`` lets export keep
    a dim static where the model really specialises it instead of failing."""
    specs = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            specs.append({d: torch.export.Dim.AUTO for d in range(min(x.dim(), 2))})
        else:
            specs.append(None)
    return tuple(specs)


def _widen(example_inputs: Sequence[object]) -> tuple:
    """Size-1 batch or sequence axes would be specialised by export (0/1 specialisation):
    repeat them to 2 so the captured graph stays dynamic in both."""
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            reps = [2 if (d < 2 and x.shape[d] == 1) else 1 for d in range(x.dim())]
            x = x.repeat(*reps) if any(r > 1 for r in reps) else x
        out.append(x)
    return tuple(out)


def export_capture(model: nn.Module, example_inputs: Sequence[object],
                   earlier: str = "") -> fx.GraphModule:
    """Capture with ``torch.export`` keeping batch and sequence sizes dynamic."""
    example_inputs = _widen(example_inputs)
    try:
        ep = torch.export.export(
            model, tuple(example_inputs), dynamic_shapes=_dynamic_shapes(example_inputs)
        )
    except Exception as exc:  # noqa: BLE001 - re-raised as TraceError with advice
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(
            (f"{earlier}; then " if earlier else "")
            + f"torch.export failed on {type(model).__name__}: {type(exc).__name__}: {first}. "
            "Pass leaf_modules=[...] for untraceable blocks, or simplify the data-dependent "
            "control flow."
        ) from exc
    gm = vmappable_sizes(ep.module())
    record_signature(gm, model, example_inputs)
    return gm


def record_signature(gm: fx.GraphModule, model: nn.Module, example_inputs: Sequence[object]
                     ) -> None:
    """Keep what ``LBIModule`` needs to take the original call signature: forward's
    positional parameters, the values that mean "left out" for each (its default None;
    ``use_cache`` False too, which is how a Hugging Face model is captured), and which
    captured positions held None (constants of the export, not inputs)."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    absent: dict[str, tuple] = {p.name: (None,) for p in params if p.default is None}
    if is_hf_pretrained(model) and "use_cache" in absent:
        absent["use_cache"] = (None, False)
    gm.meta[SIGNATURE_KEY] = {
        "model": type(model).__name__,
        "params": [p.name for p in params if p.kind in kinds],
        "absent": absent,
        "none_at": [i for i, x in enumerate(example_inputs) if x is None],
    }


# export's explicit size reads, as tensor methods: ``aten.sym_size.int`` and friends have no
# vmap batching rule, so ``jacobian="recompute"`` (regions rerun under vmap) would fail on
# an exported graph where the model's own code (``x.shape[0]``) vmaps fine


def is_hf_pretrained(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel``, recognised without importing transformers."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _configs(model: nn.Module) -> dict[str, object]:
    """Every distinct ``config`` object of ``model`` and its submodules, by the path of its
    first holder: an encoder-decoder (T5) gives its encoder and decoder stacks copies of
    the top-level config, and the decoder's copy is what decides whether it builds a cache
    (``model.config.use_cache = False`` set by hand leaves that copy on)."""
    seen: dict[int, tuple[str, object]] = {}
    for path, m in model.named_modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            seen.setdefault(id(config), (f"{path}.config" if path else "config", config))
    return dict(seen.values())


@contextlib.contextmanager
def _cache_off(model: nn.Module):
    """``use_cache = False`` in every config of the model (the top-level one and the copies
    its stacks hold) for the duration of a capture, then each one's own value again."""
    saved = [(c, c.use_cache) for c in _configs(model).values()]
    for config, _ in saved:
        config.use_cache = False
    try:
        yield
    finally:
        for config, value in saved:
            config.use_cache = value


CACHE_KEYS = ("cache", "past_key_values", "cache_params")


def holds_cache(out: object) -> bool:
    """Does a model's output carry a KV / state cache? Read from the output's own keys
    (a ``ModelOutput`` is a dict of its non-None fields), never through the attributes
    transformers 5.x keeps for old names, which log a deprecation when read."""
    if isinstance(out, Mapping):
        return any(k in CACHE_KEYS and v is not None for k, v in out.items())
    fields = getattr(out, "__dataclass_fields__", {})
    return any(k in fields and getattr(out, k, None) is not None for k in CACHE_KEYS)


def uses_kv_cache(model: nn.Module, example_inputs: Sequence[object]) -> str | None:
    """Would ``model`` keep a KV cache (or SSM state cache) as configured? The path of the
    config that turns it on (``"config"``, ``"decoder.config"``), or None. ``use_cache`` on
    says little alone: BERT's config has it on and never caches. A model that can generate
    is run once in eval mode (no grad, RNG untouched), and a cache in its output decides."""
    on = [path for path, c in _configs(model).items() if getattr(c, "use_cache", False)]
    if not on:
        return None
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and not can_generate():
        return None
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(*example_inputs)
    except Exception:  # noqa: BLE001 - cannot tell: say so rather than stay silent
        return on[0]
    finally:
        for m, mode in modes:
            m.training = mode
    return on[0] if holds_cache(out) else None


def hf_capture(model: nn.Module, example_inputs: Sequence[object] | None,
               announce: bool = True) -> fx.GraphModule:
    """Capture a Hugging Face model as it comes: torch.export with the KV cache off.

    HF forwards do not symbolically trace, and with ``use_cache`` on they return a
    ``DynamicCache`` (``EncoderDecoderCache``) that export cannot flatten, so it is turned
    off in every config the model holds (T5's decoder stack keeps its own copy); an LBI model recomputes whole sequences
    anyway, so the cache has no use there. The output type (``CausalLMOutput...``) stays.
    A model that really caches is told so with one ``CaptureWarning`` (``announce``).
    """
    name = type(model).__name__
    if example_inputs is None:
        raise TraceError(f"{name} is a Hugging Face model, which lbi-fx captures with "
                         "torch.export: pass example_inputs=(input_ids,)")
    if announce and (on := uses_kv_cache(model, example_inputs)):
        from lbi_fx.choices import _caller_level

        warnings.warn(f"lbi-fx: {name} keeps a KV cache ({on}.use_cache=True): capturing it "
                      "with torch.export and use_cache=False, since an LBI model recomputes "
                      "whole sequences (filter lbi_fx.CaptureWarning to silence this)",
                      CaptureWarning, stacklevel=_caller_level())
    with _cache_off(model):
        return export_capture(model, example_inputs)


def capture(
    model: nn.Module,
    example_inputs: Sequence[object] | None = None,
    *,
    leaf_modules: Iterable[type | str] = (),
) -> fx.GraphModule:
    """Return an ``fx.GraphModule`` for ``model`` with module paths on every node.

    ``meta[CAPTURE_KEY]`` on the graph module says how it was captured:
    ``"graph_module"``, ``"export"`` or ``"symbolic_trace"``.
    """
    if isinstance(model, torch.export.ExportedProgram):
        gm, how = vmappable_sizes(model.module()), "export"
    elif isinstance(model, fx.GraphModule):
        gm, how = model, ("export" if _is_export_module(model) else "graph_module")
        if how == "export":
            vmappable_sizes(gm)
    elif isinstance(model, nn.Module):
        leaf_modules = list(leaf_modules)
        _check_leaf_paths(model, leaf_modules)
        gm, how = capture_following_mode(model, example_inputs, leaf_modules)
        return gm
    else:
        raise InputError(
            f"model must be an nn.Module, fx.GraphModule or torch.export program, "
            f"got {type(model).__name__}"
        )
    annotate_module_paths(gm)
    gm.meta[CAPTURE_KEY] = how
    gm.meta[MODE_PROBLEM_KEY] = fixed_mode_ops(gm)
    return gm


def _capture_module(model: nn.Module, example_inputs: Sequence[object] | None,
                    leaf_modules: list, route: str | None = None,
                    announce: bool = True) -> tuple[fx.GraphModule, str]:
    """One capture of ``model`` as its modules' modes are now: symbolic tracing, falling
    back to torch.export (``route="export"`` skips the trace). ``announce``: warn about
    what the capture changed (the first of ``capture_following_mode``'s captures does)."""
    if is_hf_pretrained(model):
        return hf_capture(model, example_inputs, announce), "export"
    if route == "export":
        return export_capture(model, example_inputs), "export"
    from lbi_fx.choices import _caller_level

    tracer = LBITracer(leaf_modules)
    before = {k: b.detach().clone() for k, b in model.named_buffers()}
    try:
        graph = tracer.trace(model)
        _check_buffers_untouched(model, before)
        return fx.GraphModule(tracer.root, graph, type(model).__name__), "symbolic_trace"
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure triggers the fallback
        where = _trace_failure_site(exc)
        if example_inputs is None:
            raise TraceError(
                f"symbolic tracing of {type(model).__name__} failed{where}: "
                f"{type(exc).__name__}: {exc}. Pass example_inputs= so lbi-fx can "
                "capture with torch.export instead, or mark the block with "
                "leaf_modules=[...]."
            ) from exc
        warnings.warn(
            f"lbi-fx: symbolic tracing of {type(model).__name__} failed{where} "
            f"({type(exc).__name__}: {exc}); capturing with torch.export instead "
            "(batch and sequence sizes dynamic).", CaptureWarning,
            stacklevel=_caller_level(),
        )
        return export_capture(model, example_inputs, f"symbolic tracing failed{where}: "
                              f"{type(exc).__name__}: {exc}"), "export"


def capture_following_mode(model: nn.Module, example_inputs: Sequence[object] | None,
                           leaf_modules: list) -> tuple[fx.GraphModule, str]:
    """Capture ``model`` with every module in training mode and again in eval mode, and
    let ``follow_mode`` turn the constants that differ into switches that read the
    owning module's mode at run time. The captured modules then carry the model's own
    modes. Where the two captures differ in structure, the model is captured as its
    modes are now and ``meta[MODE_PROBLEM_KEY]`` says why its mode cannot change."""
    flags = [(m, m.training) for m in model.modules()]

    def restore() -> None:
        for m, mode in flags:
            m.training = mode

    def quiet(route: str | None) -> tuple[fx.GraphModule, str]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _capture_module(model, example_inputs, leaf_modules, route=route,
                                   announce=False)

    problem, other = None, None
    try:
        # capture as the user left the modes first: its failure is the one to report
        gm, how = _capture_module(model, example_inputs, leaf_modules)
        if not any(mode for _, mode in flags):
            other = gm  # already the eval-mode capture
        if not all(mode for _, mode in flags):
            model.train()
            try:
                gm, _ = quiet(how)
            except TraceError as exc:
                problem = ModeMismatch("", "", f"capturing the model in training mode failed: {exc}")
        if problem is None and other is None:
            model.eval()
            try:
                other, _ = quiet(how)
            except TraceError as exc:
                problem = ModeMismatch("", "", f"capturing the model in eval mode failed: {exc}")
        if problem is None:
            annotate_module_paths(gm)
            problem = follow_mode(gm, other)
        if problem is not None and not all(mode for _, mode in flags):
            # gm must be the capture of the modes as they are (follow_mode left it as is)
            restore()
            gm = other if not any(mode for _, mode in flags) and other is not None else quiet(how)[0]
    finally:
        restore()
    annotate_module_paths(gm)
    gm.meta[CAPTURE_KEY] = how
    gm.meta[MODE_PROBLEM_KEY] = problem
    copy_modes(gm, model)
    return gm, how


def copy_modes(gm: nn.Module, model: nn.Module) -> None:
    """Give each module of the capture the mode of the model's module at its path; the
    containers a capture creates for paths (and mode switches) take their parent's."""
    own = dict(model.named_modules())
    modes = {"": model.training}
    for name, m in gm.named_modules():
        src = own.get(name)
        m.training = src.training if src is not None else modes[name.rpartition(".")[0]]
        modes[name] = m.training


def _check_buffers_untouched(model: nn.Module, before: dict) -> None:
    """A buffer that changed during symbolic tracing was updated by eager Python code
    (``self.count += 1``) that the graph does not record: the rewritten model would
    silently drop the update. Restore it and refuse."""
    changed = []
    with torch.no_grad():
        for k, b in model.named_buffers():
            if k in before and (b.shape != before[k].shape or not torch.equal(b, before[k])):
                changed.append(k)
                if b.shape == before[k].shape:
                    b.copy_(before[k])
    if changed:
        raise TraceError(
            f"forward updates buffer {', '.join(changed)} with eager Python code that FX does "
            "not record (e.g. `self.count += 1`); the rewritten model would drop the update. "
            "Move the state update out of forward, or make it a traced tensor op")


def _check_leaf_paths(model: nn.Module, leaf_modules: list) -> None:
    paths = dict(model.named_modules())
    for leaf in leaf_modules:
        if isinstance(leaf, str) and leaf not in paths:
            raise InputError(f"leaf_modules names {leaf!r}, which is not a submodule of the model")
        if not isinstance(leaf, (str, type)):
            raise InputError(f"leaf_modules entries are module paths or types, got {leaf!r}")


def _trace_failure_site(exc: BaseException) -> str:
    """Name the innermost frame of user code where tracing failed."""
    from lbi_fx import errors  # any module at the package root locates the package

    # lbi-fx's own frames are never the cause; its example models (lbi_fx/models) can be
    pkg = os.path.dirname(os.path.abspath(errors.__file__))
    own = (pkg + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)
    models = os.path.join(pkg, "models") + os.sep
    tb = exc.__traceback__
    site = None
    while tb is not None:
        fname = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if "/torch/" not in fname and (not fname.startswith(own) or fname.startswith(models)):
            site = f"{fname}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return f" at {site}" if site else ""
