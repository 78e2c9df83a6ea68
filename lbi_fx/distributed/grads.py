"""Gradients across ranks: what a step adds to ``.grad`` is reduced without touching what
earlier steps left there.

Exchange 3 of a step (and the pipeline baseline's shared-weight sum): the gradients of
parameters several ranks use are summed over the group in one flat buffer per dtype
(:func:`reduce_shared`), a large shared matrix (an embedding) only in the rows some rank
touched. With data parallelism the parameters only this region rank uses are averaged
over ``mesh["dp"]`` as DDP does: launched asynchronously right after the last local VJP
(:func:`launch_dp`), so gloo's worker thread reduces them while the prologue backward
computes, and waited for last (:func:`finish_dp`). ``.grad`` accumulated before the step
is taken out first (:func:`_take_grads`) and added back once this step's part is reduced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lbi_fx.distributed.comm import Comm


def _flat_by_dtype(params: Sequence[nn.Parameter]) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
    """One flat buffer per dtype of the parameters' gradients (zeros where a rank did not
    touch a parameter), in a fixed order that every rank sharing the list agrees on, then
    one 0/1 flag per parameter: "this rank has a gradient". Summed, the flags tell a
    gradient of zero from none at all (autograd's None, which optimizers skip)."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    out = []
    for ps in by_dtype.values():
        dev = _device(ps)
        grads = [(p.grad if p.grad is not None else _zeros(p.shape, p.dtype, dev)).reshape(-1)
                 for p in ps]
        flags = torch.tensor([p.grad is not None for p in ps], dtype=ps[0].dtype, device=dev)
        out.append((ps, torch.cat([*grads, flags])))
    return out


def _device(ps: Sequence[torch.Tensor]) -> torch.device:
    """Where a bucket lives on this rank: its first held tensor's device. A rank may take
    part in reducing a parameter it does not hold (on the meta device: another rank's
    region reads it); it lends zeros there."""
    return next((p.device for p in ps if p.device.type != "meta"), torch.device(
        "cuda", torch.cuda.current_device()) if torch.cuda.is_available() and
        torch.cuda.is_initialized() else torch.device("cpu"))


def _zeros(shape, dtype, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def _take_grads(params: Sequence[nn.Parameter]) -> dict[nn.Parameter, torch.Tensor | None]:
    """Detach what ``.grad`` accumulated before this step (``.grad`` becomes None), so that
    only this step's contribution goes through the all-reduce: summing the whole ``.grad``
    would multiply earlier steps' (already reduced) gradients by the number of ranks.
    :func:`_unflatten_into` adds it back; :func:`_restore_grads` after a failure."""
    prev = {}
    for p in params:
        prev[p], p.grad = p.grad, None
    return prev


def _restore_grads(prev: dict[nn.Parameter, torch.Tensor | None]) -> None:
    """After a failed step: the earlier gradients plus this step's local (unreduced) part,
    what plain autograd would have left."""
    for p, old in prev.items():
        if old is not None:
            p.grad = old if p.grad is None else old + p.grad
    prev.clear()


def _unflatten_into(ps: Sequence[nn.Parameter], flat: torch.Tensor, scale: float = 1.0,
                    prev: dict | None = None) -> None:
    """Write a reduced bucket back into ``.grad``, added to ``prev`` (popped: what
    :func:`_take_grads` kept out of the reduction). Where no rank had a gradient this step
    ``.grad`` keeps its earlier value, None included, as autograd leaves it."""
    flags = flat[len(flat) - len(ps):]
    i = 0
    for p, has in zip(ps, flags.tolist()):
        old = None if prev is None else prev.pop(p, None)
        if p.device.type == "meta":  # not held here: the sum lives on its holders
            i += p.numel()
            continue
        g = flat[i: i + p.numel()].view_as(p)
        if has == 0:
            p.grad = old
        else:
            g = g * scale if scale != 1.0 else g
            p.grad = old + g if old is not None else g if scale != 1.0 else g.clone()
        i += p.numel()


def _sum_shared(comm: Comm, params: Sequence[nn.Parameter], prev: dict | None = None) -> None:
    """All-reduce (sum) the gradients of parameters several ranks contribute to: one flat
    buffer per dtype. A rank that did not touch one contributes zeros. ``prev``: the
    gradients :func:`_take_grads` kept out, added back afterwards."""
    for ps, flat in _flat_by_dtype(params):
        comm.all_reduce(flat, "grad_allreduce")
        _unflatten_into(ps, flat, prev=prev)


def _add_grad(p: torch.Tensor, g: torch.Tensor | None) -> None:
    """Accumulate ``g`` (a fresh gradient from ``autograd.grad``) into ``p.grad``, taken as
    it is: cloning it would hold a second copy of the region's gradients at the peak, as
    much memory again as the parameters this rank trains."""
    if g is None:
        return
    # (a transposed view, as a Linear weight's gradient often is, is fresh storage too)
    p.grad = g.detach() if p.grad is None else p.grad + g


def _reduce_touched_rows(comm: Comm, params: Sequence[nn.Parameter], group, scale: float,
                         prev: dict, min_rows: int, sparse: set[int]) -> list[nn.Parameter]:
    """All-reduce only the rows some rank touched of each shared matrix with at least
    ``min_rows`` rows (an embedding's gradient is zero outside the batch's tokens): one
    all-reduce of a row mask (V + 1 elements: the last says "some rank has a gradient"),
    then one of the union's rows, where that is smaller than the whole matrix. Exact:
    the rows left out are zero on every rank. Returns the parameters left for the dense
    all-reduce (every rank decides alike: the shapes and the reduced mask agree).
    ``sparse``: ids of the parameters that may be row-sparse (prologue parameters no
    epilogue reads)."""
    rest = []
    for p in params:
        if p.dim() != 2 or p.shape[0] < min_rows or id(p) not in sparse:
            rest.append(p)
            continue
        g = p.grad
        held = p.device.type != "meta"
        dev = p.device if held else _device([])
        mask = _zeros(p.shape[0] + 1, p.dtype, dev)
        if g is not None:
            mask[:-1] = (g != 0).any(dim=1).to(mask.dtype)
            mask[-1] = 1
        comm.all_reduce(mask, "grad_rows", group)
        old = prev.pop(p, None)
        if mask[-1] == 0:  # no rank has a gradient: .grad keeps its earlier value
            p.grad = old
            continue
        rows = (mask[:-1] > 0).nonzero().squeeze(1)
        if (rows.numel() + 1) * p.shape[1] >= p.numel():  # not smaller: the whole matrix
            buf = (g if g is not None else _zeros(p.shape, p.dtype, dev)).contiguous().clone()
            comm.all_reduce(buf, "grad_allreduce", group)
            full = buf
            if not held:
                continue
        else:
            buf = g[rows] if g is not None else _zeros((rows.numel(), p.shape[1]), p.dtype, dev)
            comm.all_reduce(buf, "grad_allreduce", group)
            if not held:
                continue
            full = _zeros(p.shape, p.dtype, dev)
            full[rows] = buf
        full = full * scale if scale != 1.0 else full
        p.grad = full if old is None else old + full
    return rest




def reduce_shared(comm: Comm, params: Sequence[nn.Parameter], group, scale: float,
                  prev: dict, min_rows: int, sparse: set[int]) -> None:
    """Sum (then ``scale``) the gradients of the parameters several region ranks use over
    ``group``: row-sparse where that is smaller (:func:`_reduce_touched_rows`), the rest
    in one dense flat buffer per dtype."""
    dense = _reduce_touched_rows(comm, params, group, scale, prev, min_rows, sparse)
    for ps, flat in _flat_by_dtype(dense):
        comm.all_reduce(flat, "grad_allreduce", group)
        _unflatten_into(ps, flat, scale, prev)


def launch_dp(comm: Comm, params: Sequence[nn.Parameter], group) -> list[tuple]:
    """Start averaging ``params`` over the dp ``group``: one asynchronous all-reduce per
    dtype; :func:`finish_dp` waits for them and writes ``.grad``."""
    return [(ps, flat, comm.all_reduce_async(flat, "dp_allreduce", group, op="dp_all_reduce"))
            for ps, flat in _flat_by_dtype(params)]


def finish_dp(comm: Comm, pending: Sequence[tuple], scale: float, prev: dict) -> None:
    """Wait for :func:`launch_dp`'s all-reduces and write their (scaled) sums into ``.grad``."""
    for ps, flat, handle in pending:
        comm.finish(handle)
        _unflatten_into(ps, flat, scale, prev)


def reduce_dp(comm: Comm, params: Sequence[nn.Parameter], group, scale: float,
              prev: dict) -> None:
    """Average ``params`` over the dp ``group`` now, one bucket at a time (the ones final
    only after the prologue backward: this rank's own canvas copies, per_region)."""
    for ps, flat in _flat_by_dtype(params):
        comm.finish(comm.all_reduce_async(flat, "dp_allreduce", group, op="dp_all_reduce"))
        _unflatten_into(ps, flat, scale, prev)
