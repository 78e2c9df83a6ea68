"""Running the interface chain, one contiguous range of regions at a time.

``LBIChain`` runs all K regions in one process; ``lbi_fx.distributed.RegionParallel`` runs
each rank's range with the same methods, so a fix lands once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.passes.split_places import Programs
from lbi_fx.runtime import ChainState, RegionCache, RngSnapshot


class _Call:
    """Per-forward values that are not tensors with gradients (sizes, int tensors)."""

    def __init__(self, env: dict):
        self.env = env
        self.out_env: dict = {}


class ChainRunner:
    """Mixin of :class:`~lbi_fx.module.LBIModule`: prologue, regions, epilogue."""

    @property
    def program_spec(self) -> Programs:
        """Prologue / region / epilogue programs: their input and output node names and the
        interface nodes ``m_nodes`` (read-only)."""
        return self._programs_spec

    def prologue_param_users(self) -> dict[str, set[int | str]]:
        """For each trainable parameter of the prologue program (name as in
        ``named_parameters``): the regions (and ``"epilogue"``) whose gradient reaches it,
        through a prologue output that depends on it (walked on the program's graph) or
        by reading it themselves (a tied head). m_0's encoder maps to {0}; with
        ``canvas_weights="per_region"`` region k's copies map to {k}."""
        from lbi_fx.passes.per_region_canvas import param_users

        self._refresh()
        c, spec = self._build(), self._programs_spec
        places = [*enumerate(zip(spec.regions, c["regions"])),
                  ("epilogue", (spec.epilogue, c["epilogue"]))]
        readers: dict[str, set] = {}
        direct: dict[int, set] = {}
        for who, (prog, pgm) in places:
            for name in prog.inputs:
                readers.setdefault(name, set()).add(who)
            for p in pgm.parameters():
                direct.setdefault(id(p), set()).add(who)
        names = {id(p): n for n, p in self.named_parameters()}
        found = param_users(c["prologue"], spec.prologue.outputs, readers, direct)
        return {names[i]: users for i, (t, users) in found.items() if i in names}

    def run_prologue(self, args: Sequence, kwargs: dict | None = None) -> dict:
        """Run the prologue on the model's inputs; its outputs by node name (canvas, m_0,
        masks, ...)."""
        spec = self._programs_spec
        self._check_hooks()  # every run starts here: forward and each region-parallel rank
        self._refresh()
        pro = self._build()["prologue_run"](*self._flatten(tuple(args), kwargs or {}))
        return dict(zip(spec.prologue.outputs, pro))

    def chain_inputs(self, env: dict) -> tuple[torch.Tensor, list]:
        """(m_0, the chain's static tensors in slot order) from the prologue's outputs."""
        return env[self._programs_spec.m_nodes[0]], [env[n] for n in self._build()["static_names"]]

    def chain_env(self, env: dict, static: Sequence) -> dict:
        """A copy of ``env`` whose static inputs are detached leaves: each region's graph
        then ends at them, and their gradients are summed by the chain, not by autograd."""
        out = dict(env)
        out.update(zip(self._build()["static_names"], [_leaf(s) for s in static]))
        return out

    def run_regions(self, env: dict, m: torch.Tensor, start: int, stop: int,
                    keep: bool | None = None) -> list[RegionCache]:
        """Run regions ``start .. stop-1`` in order, region ``start`` reading the leaf ``m``
        as its m_k; ``env`` (node name -> value) is read and extended in place. Returns the
        regions' caches C_k. Each m_{k+1} enters the next region detached, so a region's
        graph never reaches another's. ``keep``: keep region graphs (default: as the
        Jacobian strategy needs)."""
        import time

        c = self._build()
        spec = self._programs_spec
        keep = self.jacobian != "recompute" if keep is None else keep
        caches: list[RegionCache] = []
        timings = self._timings
        last = self.num_regions - 1
        for k in range(start, stop):
            prog, rgm = spec.regions[k], c["regions"][k]
            env[spec.m_nodes[k]] = m
            args = [env[n] for n in prog.inputs]
            m_slot = prog.inputs.index(spec.m_nodes[k]) if spec.m_nodes[k] in prog.inputs else None
            rng = RngSnapshot.take(m.device)
            t0 = time.perf_counter()
            self._where = k
            # The region's graph ends at aliases of its parameters, not at the parameters:
            # the chain's VJPs then never run the parameters' own hooks, which run once,
            # when the chain hands its gradients to autograd (as under plain autograd).
            # (Parameters, so code that lists ``self.parameters()`` in a block sees them.)
            alias = {i: nn.Parameter(c["params"][i].detach()) for i in c["region_params"][k]}
            run = _on_aliases(rgm, {name: alias[i] for name, i in c["region_param_names"][k]})
            with torch.set_grad_enabled(keep):
                res = run(*args)
            if timings is not None:
                timings.setdefault(f"forward_{k}", []).append(time.perf_counter() - t0)
            env.update(zip(prog.outputs, res))
            picks = ([prog.outputs.index(spec.m_nodes[k + 1])] if k < last else
                     [i for i, r in enumerate(res) if isinstance(r, torch.Tensor)])
            slots, names = self._static_slots(k)
            cache = RegionCache(
                m_in=m,
                outs=[res[i] for i in picks],
                static=[(s, env[n]) for s, n in zip(slots, names)],
                params=[(i, alias[i]) for i in c["region_params"][k]],
                replay=_replayer(run, args, m_slot, picks, rng),
                kept=keep,
                **self._head_rows(k, rng),
            )
            if k < stop - 1:
                m = _leaf(cache.outs[0].detach(), force=True)
            caches.append(cache)
        return caches

    def chain_state(self, caches: list, n_static: int, n_params: int) -> ChainState:
        """The backward's state over ``caches``: a list of K, where a rank that runs only
        some regions leaves the others None. Carries this module's settings (strategy,
        ``check_finite``, scan backend) and its per-region choices."""
        return ChainState(
            caches=caches,
            ranks=[self.ranks[0], *self.ranks],
            n_static=n_static,
            n_params=n_params,
            jacobian=self.jacobian,
            chunk=self.chunk,
            scan_backend=self.scan_backend,
            check_finite=self.check_finite,
            choices=self.region_choices,
            timings=self._timings,
        )

    def run_epilogue(self, env: dict):
        """Run the epilogue on ``env``; the model's output, in its original structure."""
        spec = self._programs_spec
        out = self._build()["epilogue"](*[env[n] for n in spec.epilogue.inputs])
        if self._pytree_info is not None and self._pytree_info.out_spec is not None:
            return pytree.tree_unflatten(list(out), self._pytree_info.out_spec)
        return out

    # called by LBIChain.forward
    def run_chain(self, call: _Call, m0, static, params, keep: bool | None = None):
        """Run all regions in order on detached inputs; return the backward's state and the
        last region's tensor outputs. ``keep``: keep region graphs (default: as the
        Jacobian strategy needs)."""
        spec = self._programs_spec
        env = self.chain_env(call.env, static)
        caches = self.run_regions(env, _leaf(m0, force=True), 0, self.num_regions, keep)
        call.out_env = {n: env[n] for p in spec.regions for n in p.outputs
                        if not isinstance(env.get(n), torch.Tensor)}
        state = self.chain_state(caches, len(static), len(params))
        state.backward_program = self.backward_graph
        state.record = self._record = {}
        return state, caches[-1].outs

    def _head_rows(self, k: int, rng: RngSnapshot) -> dict:
        """Region k's causal encoder gives row 0 of m_{k+1} from m_k alone (see
        ``RegionCache.head``); other interfaces have no such rows. It reruns under the
        forward's autocast state, as every replay does."""
        from lbi_fx.interfaces import InterfaceEncoder

        enc = getattr(getattr(self, "lbi", None), f"enc_{k}", None)
        if not (k < self.num_regions - 1 and isinstance(enc, InterfaceEncoder)
                and enc.segments is not None and enc.residual
                and getattr(enc, "summary", "prefix") != "inclusive"):
            return {}

        def head_rows(m: torch.Tensor) -> torch.Tensor:
            with rng.replay():
                return enc.first_row(m)

        return {"head": enc.rank, "head_rows": head_rows}


def _on_aliases(rgm: fx.GraphModule, tensors: dict):
    """``rgm`` called with these tensors in place of its parameters (by name)."""
    if not tensors:
        return rgm

    def run(*args):
        return torch.func.functional_call(rgm, tensors, args, strict=False, tie_weights=False)

    return run


def _replayer(rgm, args: list, m_slot: int | None, picks: list[int], rng: RngSnapshot):
    """Rerun one region from a new m_k with the RNG state of its forward (same dropout)."""
    def replay(m):
        a = list(args)
        if m_slot is not None:
            a[m_slot] = m
        with rng.replay():
            res = rgm(*a)
        return [res[i] for i in picks]

    return replay


def _leaf(t, force: bool = False):
    if not isinstance(t, torch.Tensor):
        return t
    if force:
        return t.detach().requires_grad_(True)
    if t.requires_grad:
        return t.detach().requires_grad_(True)
    return t

