"""Refuse operations that mix samples inside a region.

Interfaces are per sample (m_k has shape (B, r)) and J_k is block-diagonal over the
batch only if no region lets one sample see another. BatchNorm in training mode and
reductions over the batch axis break that; this pass names them before any rewrite.
(``lbi_fx.checks.probe_batch_mixing`` also checks numerically after the rewrite.)
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from lbi_fx.errors import BatchMixingError

from .follow_mode import effective_call
from .mark_dynamic import is_dynamic
from .partition import module_of, place_of
from .shape_prop import output_tensor, tensors_of

_BN_FUNCS = {torch.nn.functional.batch_norm, torch.batch_norm}
# ops taking a dim argument that mix samples when that dim is the batch axis
_ALONG_DIM = {"cumsum", "cumprod", "cummax", "cummin", "softmax", "log_softmax", "flip", "roll",
              "sort", "argsort", "topk", "logcumsumexp"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "std", "var", "prod", "norm",
               "logsumexp", "nansum", "nanmean", "std_mean", "var_mean"}


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0]


def check_batch_mixing(gm: fx.GraphModule, num_regions: int, batch: int) -> None:
    for node in gm.graph.nodes:
        if not (0 <= place_of(node) < num_regions) or not is_dynamic(node):
            continue
        where = f"{node.name} ({module_of(node) or '<top level>'}, region {place_of(node)})"
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (
                    mod.training or mod.running_mean is None):
                raise BatchMixingError(
                    f"{where} is a BatchNorm in training mode: it mixes samples, so the "
                    "interface is not per sample. Use LayerNorm/GroupNorm, or call .eval() on "
                    "the BatchNorm (frozen statistics) before transforming")
        fn, args, kwargs = effective_call(gm, node)  # a mode switch: its op, as now
        is_call = node.op == "call_function" or fn is not node.target
        name = fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))
        if is_call and (fn in _BN_FUNCS or "batch_norm" in name):
            training = kwargs.get("training", args[5] if len(args) > 5 else True)
            if training:
                raise BatchMixingError(
                    f"{where} runs batch_norm with training statistics: it mixes samples. Use "
                    "a per-sample normalisation inside regions")
        if _op_name(node) in _ALONG_DIM and _touches_batch_dim(node):
            raise BatchMixingError(
                f"{where} runs {_op_name(node)} along the batch axis ({node.format_node()}): "
                "samples mix, so m_k would not be per sample. Use a non-batch axis")
        if _op_name(node) in _REDUCTIONS:
            ins = [a for a in node.all_input_nodes if is_dynamic(a) and output_tensor(a) is not None]
            out = tensors_of(node)
            if ins and all(t.shape and t.shape[0] == batch for t in
                           (output_tensor(a) for a in ins)) and batch > 1 and out and (
                    not out[0].shape or out[0].shape[0] != batch):
                raise BatchMixingError(
                    f"{where} reduces over the batch axis ({node.format_node()}): samples mix, "
                    "so m_k would not be per sample. Reduce over non-batch axes only")


def _touches_batch_dim(node: fx.Node) -> bool:
    """Does a dim/dims/shifts argument name axis 0 of the op's (batch-first) input?"""
    src = next((a for a in node.all_input_nodes if output_tensor(a) is not None), None)
    ndim = len(output_tensor(src).shape) if src is not None else 0
    dims = node.kwargs.get("dim", node.kwargs.get("dims"))
    if dims is None:
        name = _op_name(node)
        pos = 2 if name in ("roll", "topk") else 1
        dims = node.args[pos] if len(node.args) > pos else None
    if dims is None:
        return False
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return any(isinstance(d, int) and ndim and d % ndim == 0 for d in dims)
