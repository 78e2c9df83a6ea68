"""The real pipeline-parallel baseline: ``torch.distributed.pipelining``'s GPipe and 1F1B
schedules over a GPT-like model, split at the same rank boundaries as region parallelism,
with every byte the schedule sends recorded in a :class:`lbi_fx.distributed.Comm`.

These are the schedules people actually deploy (micro-batched, overlapped), so a
comparison with :class:`~lbi_fx.distributed.RegionParallel` is against the real thing.

Stages. Regions are placed on ranks with :func:`lbi_fx.distributed.placement`; stage j
(on rank j of the group) runs the blocks of rank j's regions, stage 0 also the token and
position embeddings (and dropout), the last stage ``ln_f`` and ``head``. Each stage is a
small module around the model's own submodules (the same parameter objects), handed to
``torch.distributed.pipelining.PipelineStage`` with example inputs and outputs, so the
stage runs in its STATIC metadata mode: no shape inference forward or backward and no
pickled metadata objects over the wire.

Bytes (``self.comm.records``), counted where the schedule gets its P2P ops from the
stage (``get_fwd_send_ops`` / ``get_bwd_send_ops``), from the ``isend`` ops' own tensors:

- ``pipe_forward_act``   activations sent forward (op ``send``);
- ``pipe_backward_grad`` activation gradients sent backward (op ``send``);
- ``pipe_meta``          what the schedule sends once, on the first step after a schedule
  is built (or rebuilt for a new micro-batch shape): torch 2.13's warm-up vote on the
  metadata mode, one int32 forward and one back per rank boundary (``dist.send``).
  Exclude it when comparing steady-state traffic;
- ``grad_allreduce``     the sum of the gradients of parameters on several stages (the
  tied ``head.weight`` / ``wte.weight``), one flat buffer as in ``_sum_shared``;
- ``loss``               the loss, broadcast from the last rank;
- ``init_broadcast``     the parameters from rank 0 at construction (``sync_params``).

Gradients. After :meth:`PipelineRunner.step` every rank's ``.grad`` of the parameters
its stage holds (and of the shared ones, on every rank) is the gradient of
``loss_fn(model(idx), target)`` on the full batch, added to what ``.grad`` held before.
torch's schedule scales by dividing *all* of ``p.grad`` by the number of micro-batches
(``scale_grads``), which would also shrink gradients accumulated by earlier steps; so the
earlier gradients are taken out before the schedule runs and added back after. That
scaling is exact for a ``loss_fn`` that averages over rows: the batch mean is the mean of
the equal-sized micro-batch means (``microbatches`` must divide the batch).

A failed peer is not detected here: a rank waits in gloo until its timeout.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lbi_fx.distributed.comm import Comm, broadcast_held
from lbi_fx.distributed.grads import _restore_grads, _sum_shared, _take_grads
from lbi_fx.distributed.mesh import placement
from lbi_fx.distributed.ownership import (
    held_bytes,
    init_weights,
    materialize,
    named_tensors,
    release,
)
from lbi_fx.errors import InputError

SCHEDULES = ("gpipe", "1f1b")
GPT_PARTS = ("wte", "wpe", "drop", "layers", "ln_f", "head")


class _Stage(nn.Module):
    """One pipeline stage of a GPT: the model's own modules, so gradients land in the
    model's parameters (and a tied head shares its weight with the embedding)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
        self.blocks = nn.ModuleList([model.layers[i] for i in layers])
        if last:
            self.ln_f, self.head = model.ln_f, model.head

    def forward(self, x: Tensor) -> Tensor:
        if self.first:  # as GPT.forward
            pos = torch.arange(x.size(1), device=x.device)
            x = self.drop(self.wte(x) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        if self.last:
            x = self.head(self.ln_f(x))
        return x


def _log_sends(comm: Comm, ops: list, phase: str) -> list:
    """Record the tensors of the ``isend`` ops among ``ops`` (receives are the sender's)."""
    for op in ops:
        if op.op is dist.isend:
            comm._log(phase, "send", op.tensor)
    return ops


@contextlib.contextmanager
def _count_plain_sends(comm: Comm, phase: str) -> Iterator[None]:
    """Record every ``torch.distributed.send`` made inside the block (the stage's warm-up
    vote calls it through the module attribute); restores it on exit, error or not."""
    orig = dist.send

    def send(tensor: Tensor, *args, **kwargs):
        comm._log(phase, "send", tensor)
        return orig(tensor, *args, **kwargs)

    dist.send = send
    try:
        yield
    finally:
        dist.send = orig


@functools.cache
def _counting_stage_class():
    """``PipelineStage`` whose P2P sends are recorded into ``self.comm`` (a class made on
    first use so that importing this module does not import torch's pipelining)."""
    from torch.distributed.pipelining import PipelineStage

    class CountingStage(PipelineStage):
        comm: Comm

        def get_fwd_send_ops(self, fwd_chunk_id: int) -> list:
            return _log_sends(self.comm, super().get_fwd_send_ops(fwd_chunk_id),
                              "pipe_forward_act")

        def get_bwd_send_ops(self, bwd_chunk_id: int) -> list:
            return _log_sends(self.comm, super().get_bwd_send_ops(bwd_chunk_id),
                              "pipe_backward_grad")

        def _warmup_forward_vote(self, *args, **kwargs):
            with _count_plain_sends(self.comm, "pipe_meta"):
                return super()._warmup_forward_vote(*args, **kwargs)

        def _warmup_backward_result(self, *args, **kwargs):
            with _count_plain_sends(self.comm, "pipe_meta"):
                return super()._warmup_backward_result(*args, **kwargs)

        def _send_meta(self, meta, dst_stage: int) -> None:  # DYNAMIC mode only
            raise RuntimeError(
                f"stage {self.stage_index} fell back to dynamic shape inference, whose "
                "pickled metadata lbi_fx cannot count: the static example shapes it was "
                "given did not cover the stage")

    return CountingStage


def _layer_index(x, n_layer: int) -> int:
    """A region entry: a layer index, or its module name ``"layers.N"``."""
    if isinstance(x, str) and x.startswith("layers.") and x[7:].isdigit():
        x = int(x[7:])
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n_layer:
        raise InputError(f"region entry {x!r} is not a layer of the model: use an index in "
                         f"0..{n_layer - 1} (or 'layers.N')")
    return x


class PipelineRunner:
    """GPipe / 1F1B over the same split points as an LBIModule's regions.

    ``model``: a GPT-like module (``wte``, ``wpe``, ``drop``, ``layers``, ``ln_f``,
    ``head``, as ``lbi_fx.models.transformer.GPT``), the same on every rank (synchronised
    from rank 0 unless ``sync_params=False``). ``regions``: lists of layer indices that
    together cover every layer once, in order. ``loss_fn(logits, target)`` must average
    over rows (see the module docstring). With a one-rank group the single stage is both
    first and last and the schedule runs with no communication at all.

    Attributes: ``comm`` (byte records), ``timings`` (seconds of the last step on this
    rank: ``step``, ``schedule``, ``allreduce``, ``loss``), ``rank``, ``world``,
    ``layers`` (this rank's blocks), ``params`` (the parameters its stage holds),
    ``shared`` (those on several stages: their summed gradient is on every rank).
    """

    def __init__(self, model: nn.Module, regions: Sequence[Sequence[int]], group=None, *,
                 schedule: str = "1f1b", microbatches: int = 4,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], comm: Comm | None = None,
                 sync_params: bool = True):
        # everything that can be refused is refused before any collective
        if schedule not in SCHEDULES:
            raise InputError(f"unknown pipeline schedule {schedule!r}: choose one of "
                             f"{', '.join(map(repr, SCHEDULES))}")
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) \
                or microbatches < 1:
            raise InputError(f"microbatches={microbatches!r}: the number of micro-batches a "
                             "step splits the batch into, an int >= 1")
        if not callable(loss_fn):
            raise InputError(f"loss_fn={loss_fn!r} is not callable: pass "
                             "loss_fn(logits, target) -> a scalar mean over rows")
        missing = [n for n in GPT_PARTS if not hasattr(model, n)]
        if missing:
            raise InputError(f"PipelineRunner needs a GPT-like model with {', '.join(GPT_PARTS)}"
                             f" (lbi_fx.models.transformer.GPT); {type(model).__name__} lacks "
                             f"{', '.join(missing)}")
        n_layer = len(model.layers)
        regions = [[_layer_index(x, n_layer) for x in r] for r in regions]
        if [i for r in regions for i in r] != list(range(n_layer)) or not all(regions):
            raise InputError(f"regions {regions} must cover the model's {n_layer} layers once, "
                             "in order, with no empty region: a pipeline runs the whole model")
        self.model, self.schedule_name, self.microbatches = model, schedule, microbatches
        self.loss_fn = loss_fn
        self.comm = comm or Comm(group)
        self.group = self.comm.group
        self.rank, self.world = self.comm.rank, self.comm.world
        self.place = placement(len(regions), self.world)
        if schedule == "1f1b" and microbatches < self.world:
            raise InputError(f"1f1b over {self.world} stages needs microbatches >= {self.world}"
                             f" (got {microbatches}): raise microbatches or use 'gpipe'")
        self.last = self.world - 1
        self.stage_layers = [[i for k in ks for i in regions[k]] for ks in self.place]
        self.layers = self.stage_layers[self.rank]
        self.module = _Stage(model, self.layers, self.rank == 0, self.rank == self.last)
        uses: dict[int, set[int]] = {}
        for j, layers in enumerate(self.stage_layers):
            stage = _Stage(model, layers, j == 0, j == self.last)
            for t in (*stage.parameters(), *stage.buffers()):
                uses.setdefault(id(t), set()).add(j)
        # each rank holds its stage alone, as torch.distributed.pipelining's stages do: the
        # rest of the model goes to the meta device
        self.holders = {n: uses.get(id(t), {0}) for n, t in named_tensors(model).items()}
        self.held = {n for n, h in self.holders.items() if self.rank in h}
        shared_ids = {i for i, u in uses.items() if len(u) > 1}
        shared_names = [n for n, p in model.named_parameters() if id(p) in shared_ids]
        release(model, self.held)
        self.params = list(dict.fromkeys(self.module.parameters()))
        # the same order on every rank: the model's
        named = dict(model.named_parameters())
        self._shared_names = shared_names
        self.shared = [named[n] for n in shared_names]
        self.timings: dict[str, float] = {}
        self._built: tuple | None = None  # (key, schedule)
        self._synced = not sync_params
        if sync_params and not self._on_meta():
            self._sync()

    # -- ownership (as RegionParallel's) -------------------------------------------------
    def _on_meta(self) -> bool:
        return any(t.device.type == "meta" for n, t in named_tensors(self.model).items()
                   if n in self.held)

    def _sync(self) -> None:
        broadcast_held(self.comm, named_tensors(self.model), self.holders,
                       [self.comm._ranks(self.group)], self.group, None, self._device())
        self._synced = True

    def _device(self) -> torch.device:
        return next((p.device for p in self.module.parameters() if p.device.type != "meta"),
                    torch.device("cpu"))

    def named_parameters(self):
        """This stage's parameters, under the model's names (build the optimizer on them)."""
        for n, p in self.model.named_parameters():
            if n in self.held and p.device.type != "meta" and p.requires_grad:
                yield n, p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def held_bytes(self) -> int:
        return held_bytes(self.model)

    def to_empty(self, *, device) -> PipelineRunner:
        """Allocate this stage's share of a model built on the meta device (uninitialised)."""
        materialize(self.model, self.held, device)
        self.params = list(dict.fromkeys(self.module.parameters()))
        named = dict(self.model.named_parameters())
        self.shared = [named[n] for n in self._shared_names]
        self._built = None
        self._synced = False
        return self

    def init_weights(self, seed: int = 0, fn=None) -> PipelineRunner:
        """As ``RegionParallel.init_weights``: module by module, seeded by path."""
        left = init_weights(self.model, seed, fn=fn, only=self.held)
        if left:
            raise InputError(f"init_weights: no reset_parameters() for {', '.join(left[:5])}; "
                             "pass fn=lambda path, module: ...")
        self._synced = False
        return self

    # -- the schedule, built for one micro-batch shape -----------------------------------
    def _schedule(self, idx: Tensor):
        """The torch schedule for micro-batches shaped like ``idx``'s, rebuilt when the
        shape, dtype or device changes (a new schedule votes again: ``pipe_meta``)."""
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        m = self.model
        held = next(p for p in self.module.parameters() if p.device.type != "meta")
        act_dtype, dev = held.dtype, held.device
        mb, L = idx.shape[0] // self.microbatches, idx.shape[1]
        key = (mb, L, idx.dtype, act_dtype, dev)
        if self._built is not None and self._built[0] == key:
            return self._built[1]
        D, V = m.wte.embedding_dim, m.head.out_features

        def act(n: int):
            return torch.empty(mb, L, n, dtype=act_dtype, device=dev, requires_grad=True)

        first, last = self.rank == 0, self.rank == self.last
        stage = _counting_stage_class()(
            self.module, self.rank, self.world, dev,
            input_args=torch.empty(mb, L, dtype=idx.dtype, device=dev) if first else act(D),
            output_args=act(V) if last else act(D), group=self.group)
        stage.comm = self.comm
        cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        sched = cls(stage, n_microbatches=self.microbatches, loss_fn=self.loss_fn)
        self._built = (key, sched)
        return sched

    def _check(self, idx: Tensor, target: Tensor) -> None:
        if not isinstance(idx, Tensor) or idx.dim() != 2:
            raise InputError(f"idx must be a (batch, seq) tensor of token ids, got "
                             f"{tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__}")
        if not isinstance(target, Tensor) or target.dim() == 0 \
                or target.shape[0] != idx.shape[0]:
            raise InputError(f"target must be a tensor with the batch ({idx.shape[0]}) as its "
                             f"first dim, got {getattr(target, 'shape', type(target).__name__)}")
        B, M = idx.shape[0], self.microbatches
        if B % M:
            raise InputError(f"a batch of {B} does not split into microbatches={M} equal "
                             f"micro-batches: use a batch size divisible by {M} (or another "
                             "microbatches); unequal ones would not average to the batch mean")

    def step(self, idx: Tensor, target: Tensor) -> float:
        """One pipelined forward + backward of the full local batch (the same on every rank);
        adds the gradient of the batch-mean loss to ``.grad`` and returns that loss on every
        rank. Collective over the group."""
        self._check(idx, target)
        if not self._synced:
            if self._on_meta():
                raise InputError("PipelineRunner holds tensors on the meta device: call "
                                 "to_empty(device=...) and fill them first")
            self._sync()
        t0 = time.perf_counter()
        T: dict[str, float] = {}
        sched = self._schedule(idx)
        first, last = self.rank == 0, self.rank == self.last
        # scale_grads divides the whole .grad: keep earlier steps' out of it (and of the sum)
        prev = _take_grads(list(dict.fromkeys([*self.params, *self.shared])))
        losses: list[Tensor] = []
        try:
            t = time.perf_counter()
            sched.step(*((idx,) if first else ()), target=target if last else None,
                       losses=losses if last else None, return_outputs=False)
            T["schedule"] = time.perf_counter() - t
            t = time.perf_counter()
            if self.shared:
                _sum_shared(self.comm, self.shared, prev)
            T["allreduce"] = time.perf_counter() - t
        except BaseException:
            _restore_grads(prev)
            raise
        _restore_grads(prev)  # the unshared ones: earlier gradients + this step's
        t = time.perf_counter()
        val = torch.zeros(1, dtype=torch.float64, device=idx.device)
        if last:
            val[0] = torch.stack([x.detach().double() for x in losses]).mean()
        if self.world > 1:
            self.comm.broadcast(val, self.last, "loss")
        T["loss"] = time.perf_counter() - t
        T["step"] = time.perf_counter() - t0
        self.timings = T
        return float(val)
