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
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from lbi_fx.errors import InputError, TraceError

MODULE_KEY = "lbi_module"
CAPTURE_KEY = "lbi_capture"


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
    return ep.module()


def is_hf_pretrained(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel``, recognised without importing transformers."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


@contextlib.contextmanager
def _cache_off(model: nn.Module):
    """``config.use_cache = False`` for the duration of a capture, then the user's value."""
    config = getattr(model, "config", None)
    saved = getattr(config, "use_cache", None)
    if config is not None and saved is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None and saved is not None:
            config.use_cache = saved


def hf_capture(model: nn.Module, example_inputs: Sequence[object] | None) -> fx.GraphModule:
    """Capture a Hugging Face model as it comes: torch.export with the KV cache off.

    HF forwards do not symbolically trace, and with ``use_cache`` on they return a
    ``DynamicCache`` that export cannot flatten; an LBI model recomputes whole sequences
    anyway, so the cache has no use there. The output type (``CausalLMOutput...``) stays.
    """
    name = type(model).__name__
    if example_inputs is None:
        raise TraceError(f"{name} is a Hugging Face model, which lbi-fx captures with "
                         "torch.export: pass example_inputs=(input_ids,)")
    if getattr(getattr(model, "config", None), "use_cache", False):
        warnings.warn(f"lbi-fx: {name} is a Hugging Face model: capturing it with torch.export "
                      "and use_cache=False (an LBI model has no KV cache)", stacklevel=5)
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
        gm, how = model.module(), "export"
    elif isinstance(model, fx.GraphModule):
        gm, how = model, ("export" if _is_export_module(model) else "graph_module")
    elif isinstance(model, nn.Module) and is_hf_pretrained(model):
        gm, how = hf_capture(model, example_inputs), "export"
    elif isinstance(model, nn.Module):
        leaf_modules = list(leaf_modules)
        _check_leaf_paths(model, leaf_modules)
        tracer = LBITracer(leaf_modules)
        before = {k: b.detach().clone() for k, b in model.named_buffers()}
        try:
            graph = tracer.trace(model)
            _check_buffers_untouched(model, before)
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
            how = "symbolic_trace"
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
                "(batch and sequence sizes dynamic).",
                stacklevel=3,
            )
            gm, how = export_capture(model, example_inputs, f"symbolic tracing failed{where}: "
                                     f"{type(exc).__name__}: {exc}"), "export"
    else:
        raise InputError(
            f"model must be an nn.Module, fx.GraphModule or torch.export program, "
            f"got {type(model).__name__}"
        )
    annotate_module_paths(gm)
    gm.meta[CAPTURE_KEY] = how
    return gm


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
