"""``SPLModule``, the trainable stage-partitioned model: it shares the captured model's
state (``lbi_fx.module.adopt_state``, the same helper ``LBIModule`` uses) and runs the
stage programs in order, with one joint backward or each stage's backward interleaved
with the forward.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.errors import InputError
from lbi_fx.module import adopt_state
from lbi_fx.spl.locality import spl_report
from lbi_fx.spl.programs import StageProgram, split_stages
from lbi_fx.spl.report import SPLReport

if TYPE_CHECKING:
    from lbi_fx.spl.cut import _CutBuilder

SCHEDULES = ("joint", "interleaved")


@dataclass(frozen=True)
class SPLConfig:
    """A configuration (pi, H) of C(L), with the relay and the loss scaling."""

    regions: tuple[tuple[str, ...], ...]
    heads: str
    relay: tuple[float, ...]   # lambda per boundary
    alpha: float

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(r) for r in self.regions)


class SPLModule(nn.Module):
    """The stage-partitioned model: shares every parameter with the model it came from
    (same names), plus ``spl_heads`` (per-stage head deltas) when ``heads="per-stage"``;
    ``spl_config`` holds (pi, H), the relay and alpha.

    ``spl(x)`` is ``model(x)`` (the last stage through its head); ``stage_outputs(x)``
    gives all K; ``stage_loss(x, loss_fn)`` the training loss; ``forward_backward`` runs
    a whole step, optionally interleaving each stage's backward with the forward.
    """

    def __init__(self, gm: fx.GraphModule, builder: _CutBuilder, *, alpha: float,
                 capture: str = "", pytree_info=None):
        super().__init__()
        reserved = set(dir(SPLModule)) | {"spl_config", "spl_heads"}
        for name in [n for n, _ in gm.named_children()] + [
                n for n, _ in itertools.chain(gm.named_parameters(recurse=False),
                                              gm.named_buffers(recurse=False))]:
            if name in reserved:
                raise InputError(f"the model's attribute {name!r} clashes with a name of the "
                                 "stage-partitioned module; rename it in the model")
        adopt_state(self, gm)
        self.spl_config = SPLConfig(tuple(tuple(r) for r in builder.regions), builder.heads,
                                    tuple(builder.lams), float(alpha))
        self._capture = capture
        self._graph = builder.G
        self._edges = list(builder.edges.values())
        self._head_inputs = builder.head_inputs
        self._pytree_info = pytree_info
        self._n_inputs = sum(1 for n in builder.G.nodes if n.op == "placeholder")
        if builder.heads == "per-stage":
            self.spl_heads = nn.ModuleList(nn.ParameterDict() for _ in builder.regions)
            for name, param, _ in builder.deltas.values():
                _, k, key = name.split(".", 2)
                self.spl_heads[int(k)][key] = nn.Parameter(torch.zeros_like(param.detach()))
        self._compiled: dict = {}

    @property
    def num_stages(self) -> int:
        return len(self.spl_config.regions)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_compiled"] = {}
        return state

    def _apply(self, fn, recurse=True):
        self._compiled = {}  # programs hold references to tensors .to() may replace
        return super()._apply(fn, recurse)

    @property
    def graph(self) -> fx.GraphModule:
        """The whole SPL forward after the cut (relays and K heads), printable."""
        return fx.GraphModule(self, self._graph, "SPLGraph")

    def programs(self, heads: str = "all") -> list[tuple[StageProgram, fx.GraphModule]]:
        """Stage programs with every head (``"all"``) or the last only (``"last"``)."""
        if heads not in self._compiled:
            K = self.num_stages
            which = range(K) if heads == "all" else [K - 1]
            progs = split_stages(self._graph, K, which)
            self._compiled[heads] = [(p, fx.GraphModule(self, p.graph, f"Stage{p.stage}"))
                                     for p in progs]
        return self._compiled[heads]

    # -- running ---------------------------------------------------------------------
    def _flatten(self, args, kwargs) -> list:
        if self._pytree_info is not None:
            return list(pytree.arg_tree_leaves(*args, **kwargs))
        if kwargs:
            raise InputError("pass the model's inputs positionally to a stage-partitioned model")
        return list(args)

    def _unflatten(self, out):
        info = self._pytree_info
        if info is not None and info.out_spec is not None:
            return pytree.tree_unflatten(list(out), info.out_spec)
        return out

    def _run(self, flat: list, heads: str, after: Callable | None = None) -> list:
        """Run the stage programs in order. ``after(k, head_out)`` runs right after stage
        k; when it returns True, the values handed to later stages are detached (their
        graph is spent)."""
        env: dict = {}
        outs = []
        for prog, gm in self.programs(heads):
            args = (list(flat) if prog.stage == 0 else []) + [env[n] for n in prog.inputs]
            head, *vals = gm(*args)
            del args
            head = None if head is None else self._unflatten(head)
            if after is not None and after(prog.stage, head):
                vals = [v.detach() if isinstance(v, torch.Tensor) else v for v in vals]
                head = None  # spent: keep no stage's logits or graph alive
            outs.append(head)
            env.update(zip(prog.exports, vals))
            del vals
        return outs

    def forward(self, *args, **kwargs):
        """What ``model(*args)`` returns: the last stage through its head."""
        return self._run(self._flatten(args, kwargs), "last")[-1]

    def stage_outputs(self, *args, **kwargs) -> list:
        """The K stage outputs, each stage's output through its head (Eq. 4)."""
        return self._run(self._flatten(args, kwargs), "all")

    def _weights(self, weights: Sequence[float] | None) -> list[float]:
        K = self.num_stages
        scale = K ** (1.0 - self.spl_config.alpha)
        if weights is None:
            return [1.0 / scale] * K
        if len(weights) != K:
            raise InputError(f"weights has {len(weights)} entries for {K} stages")
        return [float(w) / scale for w in weights]

    def stage_loss(self, x, loss_fn: Callable, *, weights: Sequence[float] | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(total, [loss_k])`` with total = sum_k w_k loss_fn(z_k) / K^(1 - alpha) (w_k = 1:
        Eq. 5; ``weights`` = tau gives the soft loss of Eq. 29)."""
        args = x if isinstance(x, tuple) else (x,)
        losses = [loss_fn(z) for z in self.stage_outputs(*args)]
        w = self._weights(weights)
        total = sum(wk * lk for wk, lk in zip(w, losses))
        return total, losses

    def forward_backward(self, x, loss_fn: Callable, *, schedule: str = "joint",
                         weights: Sequence[float] | None = None) -> tuple[float, list[float]]:
        """Forward and backward of the stage loss; gradients accumulate in ``.grad``.

        ``"joint"``: one backward of the total. ``"interleaved"``: stage k's backward runs
        right after its forward and its graph is freed before stage k+1 runs, so only one
        stage's activations are alive at a time (the locality of property P4). Both give
        the same gradients; interleaving needs every relay at 0.
        """
        if schedule not in SCHEDULES:
            raise InputError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
        args = x if isinstance(x, tuple) else (x,)
        w = self._weights(weights)
        if schedule == "joint":
            total, losses = self.stage_loss(args, loss_fn, weights=weights)
            total.backward()
            return float(total.detach()), [float(v.detach()) for v in losses]
        if any(v != 0 for v in self.spl_config.relay):
            raise InputError(
                f"schedule='interleaved' needs relay 0 on every boundary (got "
                f"{list(self.spl_config.relay)}): "
                "with lambda > 0 a later stage's loss sends gradient into stages whose "
                "graphs are already freed; use schedule='joint'")
        losses: list[float] = []

        def after(k: int, head) -> bool:
            loss = loss_fn(head)
            if (w[k] * loss).requires_grad:
                (w[k] * loss).backward()
            losses.append(float(loss.detach()))
            return True

        self._run(self._flatten(args, {}), "all", after)
        return sum(wk * lk for wk, lk in zip(w, losses)), losses

    def report(self) -> SPLReport:
        """Edges cut per boundary, bypass edges, parameters shared across stages, and the
        locality check on the graph that runs (networkx)."""
        return spl_report(self)
