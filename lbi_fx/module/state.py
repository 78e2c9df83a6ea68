"""Keeping the rewritten module's caches true to the module as it is *now*.

Programs, parameter slots and per-region choices are derived from the parameters, modes,
dtype and device at build time; these methods notice when any of them changes
(``.to()``, ``.train()``, ``load_state_dict(assign=True)``, freezing) and rebuild or refuse,
so a gradient is never computed from a stale program.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.choices import RegionChoices
from lbi_fx.errors import BatchMixingError, HookError, LBIError


class StateFollowing:
    """Mixin of :class:`~lbi_fx.module.LBIModule`: follow the module's state."""

    def __getstate__(self) -> dict:
        # Built programs are GraphModules rooted at this module; pickling them would ask
        # FX to re-trace them on load. They are rebuilt on first use instead.
        state = self.__dict__.copy()
        state["_compiled"] = None
        state["_timings"] = None
        state["_where"] = None
        state["_record"] = {}
        state["region_choices"] = RegionChoices()  # decided afresh where it is loaded
        state["_hook_watch_orig"] = []  # the original model's modules stay with the original
        return state

    def _apply(self, fn, recurse=True):
        # .to()/.double() may replace tensors: rebuild programs that hold references; a
        # new dtype or device may change which Jacobian strategy works or is fastest.
        self._compiled = None
        before = _placement(self)
        moves = {(d, dev): _moved(fn, d, dev) for d, dev in before}
        out = super()._apply(fn, recurse)
        if _placement(self) != before:
            self.region_choices.clear()
            if self.capture.startswith("export"):
                self._follow_placement(moves)
        return out

    def _follow_placement(self, moves: dict) -> None:
        """``torch.export`` writes the dtype and device it saw into the graph (casts,
        factory calls, dtype assertions), where the model's code said ``x.dtype`` or
        ``self.device``: after ``.to()`` those constants follow the model's tensors, so an
        exported model computes in its new dtype and device as a traced one does."""
        dtypes = {d: nd for (d, _), (nd, _) in moves.items() if d.is_floating_point and d != nd}
        devices = {dev: nv for (_, dev), (_, nv) in moves.items() if dev != nv}

        def swap(a):
            if isinstance(a, torch.dtype):
                return dtypes.get(a, a)
            if isinstance(a, torch.device):
                return devices.get(a, a)
            return a

        graphs = [self._flat_graph, self._programs_spec.prologue.graph, self._programs_spec.epilogue.graph,
                  *[p.graph for p in self._programs_spec.regions]]
        for graph in graphs:
            for node in graph.nodes:
                if node.op in ("call_function", "call_method", "call_module"):
                    node.args = pytree.tree_map(swap, node.args)
                    node.kwargs = pytree.tree_map(swap, node.kwargs)
        for name, value in list(vars(self).items()):  # constants export lifted (not buffers)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                nd, nv = moves.get((value.dtype, value.device), (value.dtype, value.device))
                if value.dtype.is_floating_point or nv != value.device:
                    setattr(self, name, value.to(device=nv, dtype=nd if value.dtype.is_floating_point else value.dtype))

    def train(self, mode: bool = True):
        # train/eval switches dropout (followed by the programs' mode switches) and
        # attention kernels (CPU flash attention has no forward-mode rule): the per-region
        # choices are made again at the next backward. A change that would make a region
        # mix samples, or that the capture cannot follow, is refused here and undone.
        before = [(m, m.training) for m in self.modules()]
        out = super().train(mode)
        if self._modes() != self._modes_seen:
            try:
                self._check_modes(f"lbi.{'train' if mode else 'eval'}()")
            except LBIError:
                for m, was in before:
                    m.training = was
                raise
        return out

    # -- hooks the programs cannot run ---------------------------------------------------
    def _watch_hooks(self, modules: dict[str, nn.Module], *, original: bool = False) -> None:
        """Remember the hooks now on ``modules`` (path -> module, every module the capture
        traced through): a hook added later would never run, since the region programs
        inline the module's code instead of calling it (``_check_hooks``)."""
        watch = [(path, mod, *(frozenset(d) for d in _hook_dicts(mod)))
                 for path, mod in modules.items()]
        if original:
            self._hook_watch_orig = watch
        else:
            self._hook_watch = watch

    def _check_hooks(self) -> None:
        """Refuse, naming the module, a forward / forward pre / backward hook added after
        capture to a traced-through submodule (of this module or of the model it was made
        from): it would be silently ignored. Global hooks are not checked."""
        for path, mod, *base in (*getattr(self, "_hook_watch", ()),
                                 *getattr(self, "_hook_watch_orig", ())):
            for kind, d, b in zip(_HOOK_KINDS, _hook_dicts(mod), base):
                if d and d.keys() - b:
                    raise HookError(
                        f"a {kind} hook was registered on {path!r} ({type(mod).__name__}) after "
                        f"transform; lbi-fx traced through {path!r} at capture (its code is "
                        "inlined in the region programs and the module is never called), so the "
                        "hook would never run. Transform with "
                        f"leaf_modules=[{path!r}] (a leaf module is called, and keeps its "
                        "hooks), or register the hook on the LBI module itself or on a leaf "
                        "module (see `lbi-fx inspect`)")

    # -- the state the programs follow -------------------------------------------------
    def _modes(self) -> tuple[bool, ...]:
        return tuple(m.training for m in self.modules())

    def _user_modes(self) -> dict[str, bool]:
        """Modes of the captured model's modules (not lbi-fx's interfaces or switches)."""
        return {n: m.training for n, m in self.named_modules()
                if not (n == "lbi" or n.startswith("lbi.") or "lbi_mode_" in n)}

    def _state_key(self) -> tuple:
        return (tuple((id(p), p.requires_grad) for p in self.parameters()),
                tuple(id(b) for b in self.buffers()))

    def _refresh(self) -> None:
        """Before every forward: programs and per-region facts are caches of the module's
        state. Parameters replaced (``load_state_dict(assign=True)``), frozen or unfrozen
        rebuild the programs and parameter slots; a mode change (``.train()``/``.eval()``
        on any submodule) re-runs the checks that depend on it and the per-region choices."""
        if self._compiled is not None and self._built_key != self._state_key():
            self._compiled = None
        if self._modes() != self._modes_seen:
            self._check_modes("this forward (a submodule's mode changed)")

    def _check_modes(self, call: str) -> None:
        """The modules' modes changed: refuse what cannot stay exact, naming the module;
        otherwise remember them and decide per-region choices afresh."""
        from lbi_fx.errors import ModeError
        from lbi_fx.passes.check_batch_mixing import check_batch_mixing

        now = self._user_modes()
        if self._mode_problem is not None and now != self._captured_modes:
            changed = [n or "<root>" for n, v in now.items() if self._captured_modes.get(n) != v]
            raise ModeError(
                f"{call} changes the mode of {', '.join(changed[:3])}"
                f"{' ...' if len(changed) > 3 else ''}, but the rewritten model cannot follow "
                f"a mode change: {self._mode_problem}. Set the modes you train in on the "
                "original model and transform it again (one LBI module per mode)")
        if self._batch is not None:
            try:
                check_batch_mixing(self.rewritten_graph, self.num_regions, self._batch)
            except BatchMixingError as exc:
                raise BatchMixingError(f"{call} makes a region mix samples: {exc}. To keep "
                                       "BatchNorm statistics frozen while training the rest, set "
                                       "modes per module: `for m in lbi.modules(): m.training = "
                                       "not isinstance(m, torch.nn.modules.batchnorm._BatchNorm)`"
                                       ) from None
        self._modes_seen = self._modes()
        self.region_choices.clear()


_HOOK_KINDS = ("forward", "forward pre", "backward", "backward pre")


def _hook_dicts(mod: nn.Module) -> tuple[dict, ...]:
    return tuple(getattr(mod, a, None) or {} for a in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def traced_through(graph, root: nn.Module) -> dict[str, nn.Module]:
    """The submodules of ``root`` (by path) whose forward the capture ran and inlined:
    every module on a node's ``nn_module_stack`` that is not a ``call_module`` target
    (a leaf, which the programs call) nor inside one, nor an interface."""
    leaves = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    called: set[str] = set()
    for n in graph.nodes:
        for v in (n.meta.get("nn_module_stack") or {}).values():
            path = v[0] if isinstance(v, tuple) else v
            if not isinstance(path, str) or path.startswith("_empty_nn_module_stack"):
                continue
            for prefix in ("L['self'].", "L__self__."):
                if path.startswith(prefix):
                    path = path[len(prefix):]
            called.add(path)
    out = {}
    for path in sorted(called):
        if (not path or path == "lbi" or path.startswith("lbi.")
                or any(path == leaf or path.startswith(leaf + ".") for leaf in leaves)):
            continue
        try:
            out[path] = root.get_submodule(path)
        except AttributeError:
            continue
    return out


def _placement(module: nn.Module) -> frozenset:
    """The (dtype, device) pairs of a module's tensors: what ``.to()`` and friends change."""
    return frozenset((t.dtype, t.device) for t in (*module.parameters(), *module.buffers()))


def _moved(fn, dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, torch.device]:
    """Where ``fn`` (the function ``.to()`` and friends apply) sends a tensor of this kind."""
    t = fn(torch.empty(0, dtype=dtype, device=device))
    return t.dtype, t.device

