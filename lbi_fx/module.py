"""``LBIModule``: the rewritten model, an ordinary ``nn.Module``.

It owns the captured model's submodules (same names, so ``state_dict`` keys match the
original model) plus ``lbi``, the interface modules. Its forward is
prologue -> interface chain -> epilogue. With ``backward = "scan"`` the chain is one
``LBIChain`` autograd node whose backward is the generated three-phase program; with
``backward = "autograd"`` the same programs run under plain reverse mode - the
reference for parity tests and benchmark ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from lbi_fx.choices import Explanation, RegionChoices, RegionExplanation, explain_region
from lbi_fx.errors import BatchMixingError, InputError, LBIError
from lbi_fx.passes.build_backward import build_backward_graph
from lbi_fx.passes.capture import MODE_PROBLEM_KEY, SIGNATURE_KEY
from lbi_fx.passes.split_places import Programs
from lbi_fx.report import SeparatorReport, describe_width
from lbi_fx.runtime import STRATEGIES, ChainState, LBIChain, RegionCache, RngSnapshot

BACKWARD_MODES = ("scan", "autograd")


class _Call:
    """Per-forward values that are not tensors with gradients (sizes, int tensors)."""

    def __init__(self, env: dict):
        self.env = env
        self.out_env: dict = {}


class LBIModule(nn.Module):
    def __init__(
        self,
        gm: fx.GraphModule,
        programs: Programs,
        regions: list[list[str]],
        ranks: list[int],
        *,
        pytree_info=None,
        jacobian: str = "auto",
        chunk: int | None = None,
        scan_backend: str = "auto",
        check_finite: bool = False,
        capture: str = "",
    ):
        super().__init__()
        adopt_state(self, gm)
        self._flat_graph = gm.graph
        self._programs_spec = programs
        self.regions = [list(r) for r in regions]
        self.ranks = list(ranks)
        if jacobian not in STRATEGIES:
            raise InputError(f"jacobian={jacobian!r}: choose one of {', '.join(STRATEGIES)}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise InputError(f"chunk={chunk!r}: the number of Jacobian rows per rerun, an int >= 1")
        self.jacobian = jacobian
        self.chunk = chunk
        self._timings: dict | None = None
        self._where: int | None = None  # region running now (for error messages)
        # per region: auto's strategy, batched VJPs or rows, probe timings, fallbacks
        self.region_choices = RegionChoices()
        self.scan_backend = scan_backend
        self.check_finite = check_finite
        self.capture = capture
        self._pytree_info = pytree_info
        self._signature = gm.meta.get(SIGNATURE_KEY)  # an exported forward's parameters
        self._backward = "scan"
        self._compiled = None
        self._record: dict = {}  # J_k and suffix products of the last scan backward
        # What the programs and checks were derived from (see ``_refresh``): the identity
        # and requires_grad of every parameter, buffer identities, and module modes.
        self.training = gm.training
        for name, m in self.named_modules():  # interfaces the rewrite added: the model's mode
            if name == "lbi" or name.startswith("lbi."):
                m.training = gm.training
        self._mode_problem = gm.meta.get(MODE_PROBLEM_KEY)
        self._batch = gm.meta.get("lbi_batch")
        self._built_key: tuple | None = None
        self._modes_seen = self._modes()
        self._captured_modes = self._user_modes()

    # -- configuration -------------------------------------------------------------
    @property
    def num_regions(self) -> int:
        return len(self.regions)

    @property
    def backward(self) -> str:
        return self._backward

    @backward.setter
    def backward(self, mode: str) -> None:
        if mode not in BACKWARD_MODES:
            raise InputError(f"backward={mode!r}: choose one of {', '.join(BACKWARD_MODES)}")
        self._backward = mode

    def __getstate__(self) -> dict:
        # Built programs are GraphModules rooted at this module; pickling them would ask
        # FX to re-trace them on load. They are rebuilt on first use instead.
        state = self.__dict__.copy()
        state["_compiled"] = None
        state["_timings"] = None
        state["_where"] = None
        state["_record"] = {}
        state["region_choices"] = RegionChoices()  # decided afresh where it is loaded
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

    # older callers (and tests written against them): views of ``region_choices``
    @property
    def _jacobian_choice(self) -> dict[int, str]:
        return self.region_choices.jacobian

    @property
    def _batched_ok(self) -> dict[int, bool]:
        return self.region_choices.batched

    # -- programs ------------------------------------------------------------------
    def _build(self) -> dict:
        if self._compiled is not None:
            return self._compiled
        spec = self._programs_spec
        gm = lambda prog, name: fx.GraphModule(self, prog.graph, name)  # noqa: E731
        regions = [gm(p, f"Region{k}") for k, p in enumerate(spec.regions)]
        static_names: list[str] = []
        pro_out = set(spec.prologue.outputs)
        is_tensor = {n.name: bool(n.meta.get("lbi_single")) for n in self._flat_graph.nodes}
        for prog in spec.regions:
            for name in prog.inputs:
                if (name in pro_out and name != spec.m_nodes[0] and is_tensor.get(name)
                        and name not in static_names):
                    static_names.append(name)
        params: list[nn.Parameter] = []
        index: dict[int, int] = {}
        region_params: list[list[int]] = []
        region_names: list[list[tuple[str, int]]] = []  # every name of each slot, per region
        for rgm in regions:
            slots, names = [], []
            for name, p in rgm.named_parameters(remove_duplicate=False):
                if p.requires_grad:
                    if id(p) not in index:
                        index[id(p)] = len(params)
                        params.append(p)
                    if index[id(p)] not in slots:
                        slots.append(index[id(p)])
                    names.append((name, index[id(p)]))
            region_params.append(slots)
            region_names.append(names)
        self._built_key = self._state_key()
        compiled = {
            "prologue": gm(spec.prologue, "Prologue"),
            "regions": regions,
            "epilogue": gm(spec.epilogue, "Epilogue"),
            "static_names": static_names,
            "params": params,
            "region_params": region_params,
            "region_param_names": region_names,
        }
        self._compiled = compiled
        return compiled

    @property
    def n_static(self) -> int:
        return len(self._build()["static_names"])

    @property
    def rewritten_graph(self) -> fx.GraphModule:
        """The whole rewritten forward as one graph (nodes carry ``meta['lbi_place']``)."""
        return fx.GraphModule(self, self._flat_graph, "LBIForward")

    @property
    def programs(self) -> dict:
        self._refresh()
        c = self._build()
        return {"prologue": c["prologue"], "regions": list(c["regions"]), "epilogue": c["epilogue"]}

    @property
    def backward_graph(self) -> fx.GraphModule:
        """The generated backward (Algorithm 1), as a printable ``fx.GraphModule``."""
        c = self._build()
        if "backward" not in c:
            from lbi_fx.kernels import suffix_scan

            region_static = [self._static_slots(k)[0] for k in range(self.num_regions)]
            graph = build_backward_graph(
                self.num_regions, len(self._last_tensor_outputs()), region_static,
                c["region_params"], len(c["static_names"]), len(c["params"]),
                scan=_scan_target(suffix_scan), scan_backend=self.scan_backend)
            c["backward"] = fx.GraphModule(torch.nn.Module(), graph, "LBIBackward")
        return c["backward"]

    def _static_slots(self, k: int) -> tuple[list[int], list[str]]:
        """Region k's static inputs and their slots among the chain's; derived once per
        build, since every forward asks for them."""
        c = self._build()
        if "static_slots" not in c:
            slot = {n: i for i, n in enumerate(c["static_names"])}
            c["static_slots"] = [
                ([slot[n] for n in names], names)
                for names in ([n for n in prog.inputs if n in slot]
                              for prog in self._programs_spec.regions)]
        return c["static_slots"][k]

    def _last_tensor_outputs(self) -> list[str]:
        last = self._programs_spec.regions[-1]
        return list(last.outputs)

    # -- forward -------------------------------------------------------------------
    def _flatten(self, args, kwargs) -> list:
        if self._pytree_info is not None:
            args, kwargs = self._bind(tuple(args), dict(kwargs))
            return pytree.arg_tree_leaves(*args, **kwargs)
        if kwargs:
            names = self._programs_spec.prologue.inputs
            bound = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
            return bound
        return list(args)

    def _bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """An exported model's call, as the original forward took it, put in the order of
        the capture's inputs (``in_spec``): keywords of captured parameters go to their
        positions. A keyword the capture did not include would be silently dropped (or
        shift the inputs), so it is refused by name, unless its value means "left out"."""
        spec = self._pytree_info.in_spec
        if spec is None:
            return args, kwargs
        n, keys = spec.child(0).num_children, list(spec.child(1).context or [])
        sig = getattr(self, "_signature", None) or {}
        none_at = set(sig.get("none_at", ()))
        if not kwargs and len(args) == n and not none_at:
            return args, kwargs
        names = list(self._pytree_info.orig_args)[:n]
        if len(args) > n:
            raise InputError(f"{len(args)} positional inputs given, but the model was captured "
                             f"with {n} ({', '.join(names)}): pass example_inputs with every "
                             "input the calls use, and transform again")
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in keys}
        bound, missing = list(args), []
        for i in range(len(args), n):
            bound.append(kwargs.pop(names[i], None))
            if bound[i] is None and i not in none_at:
                missing.append(names[i])
        for i in sorted(none_at):
            if i < n and bound[i] is not None:
                raise InputError(
                    f"{names[i]} was None in example_inputs, so the capture has no input for it "
                    f"and would ignore the value given: pass a {names[i]} in example_inputs "
                    "and transform again")
        if missing:
            raise InputError(f"{missing[0]} is missing: the model was captured with {missing[0]} "
                             "in example_inputs, so every call passes it")
        for key, value in kwargs.items():
            if key in names:
                raise InputError(f"{key}= given twice: by position and by keyword")
            if any(value is v for v in sig.get("absent", {}).get(key, ())):
                continue  # the default, as the capture ran
            raise InputError(self._uncaptured(key, names, none_at))
        return tuple(bound), given

    def _uncaptured(self, key: str, names: list[str], none_at: set[int]) -> str:
        """Why a keyword cannot reach the exported graph, and the example_inputs that would."""
        sig = getattr(self, "_signature", None) or {}
        params, absent = sig.get("params") or [], sig.get("absent", {})
        took = ", ".join(n for i, n in enumerate(names) if i not in none_at) or "nothing"
        text = (f"{key}= was not part of the capture: {sig.get('model', 'the model')} was "
                f"exported with example_inputs for {took} only, so its graph has no input for "
                f"{key} and would ignore it. ")
        if key in params:
            j = params.index(key)
            before = [names[i] if i < len(names) and i not in none_at else
                      ("None" if params[i] in absent else params[i]) for i in range(j)]
            return text + (f"Pass it in example_inputs at its place in forward(): "
                           f"example_inputs=({', '.join([*before, key])}), and transform again "
                           "(transform takes example inputs by position only)")
        return text + (f"forward has no positional parameter {key}, and transform takes example "
                       "inputs by position only: wrap the model in a module whose forward takes "
                       f"{key} by position")

    def forward(self, *args, **kwargs):
        self._refresh()
        c = self._build()
        spec = self._programs_spec
        env = self.run_prologue(args, kwargs)
        use_scan = self._backward == "scan" and torch.is_grad_enabled() and _any_grad(
            [env[spec.m_nodes[0]], *[env[n] for n in c["static_names"]], *c["params"]])
        if use_scan:
            call = _Call({k: v for k, v in env.items() if k not in c["static_names"]})
            statics = [env[n] for n in c["static_names"]]
            outs = LBIChain.apply(self, call, env[spec.m_nodes[0]], *statics, *c["params"])
            env.update(call.out_env)
            env.update(zip(self._last_tensor_outputs(), outs))
        else:
            self._run_plain(env)
        return self.run_epilogue(env)

    def _run_plain(self, env: dict) -> None:
        c = self._build()
        for prog, rgm in zip(self._programs_spec.regions, c["regions"]):
            outs = rgm(*[env[n] for n in prog.inputs])
            env.update(zip(prog.outputs, outs))

    # -- the chain, one range of regions at a time ---------------------------------------
    # ``LBIChain`` runs all K regions in one process; ``lbi_fx.distributed.RegionParallel``
    # runs each rank's contiguous range with the same methods, so a fix lands once.
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
        self._refresh()
        pro = self._build()["prologue"](*self._flatten(tuple(args), kwargs or {}))
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
                and enc.segments is not None and enc.residual):
            return {}

        def head_rows(m: torch.Tensor) -> torch.Tensor:
            with rng.replay():
                return enc.first_row(m)

        return {"head": enc.rank, "head_rows": head_rows}

    def spectra(self) -> list[dict]:
        """Interface spectra (paper, App. F) of the last scan backward, from the Jacobians
        and suffix products it built: per J_k = dm_{k+1}/dm_k (boundary k+1), the batch
        mean of ||J_k||_2, of ||J_k||_F / sqrt(r) and of ||P_k||_2, where
        P_k = J_k^T ... J_{K-2}^T maps mbar_{K-1} to mbar_k. Products that shrink or grow
        geometrically with depth show here before they show in the loss."""
        rec = getattr(self, "_record", None) or {}
        if "J" not in rec or "P" not in rec:
            raise InputError("spectra() reads the Jacobians of a scan backward: run a forward and "
                             "backward with lbi.backward = 'scan' first")
        out = []
        for k in sorted(rec["J"]):
            jac = rec["J"][k].double()
            suffix = rec["P"][:, k].double()
            out.append({
                "boundary": k + 1,
                "rank": jac.shape[-2],
                "jac_spectral": float(torch.linalg.matrix_norm(jac, ord=2).mean()),
                "jac_fro_rms": float((torch.linalg.matrix_norm(jac) / jac.shape[-2] ** 0.5).mean()),
                "suffix_spectral": float(torch.linalg.matrix_norm(suffix, ord=2).mean()),
            })
        return out

    @contextmanager
    def profile(self):
        """Collect per-phase wall times (seconds) of forward and backward calls:
        ``with lbi.profile() as t: ...`` then ``t["jacobian_0"]``, ``t["seed"]``, ..."""
        self._timings = {}
        try:
            yield self._timings
        finally:
            self._timings = None

    def explain(self) -> Explanation:
        """Per region: how the scan backward computes J_k (the strategy asked for, or the one
        auto's probe picked with its timings and what it found unsupported), batched or
        per-row VJPs, and every fallback a failure forced, with PyTorch's error; plus the scan backend, pool and interface
        widths. Choices are made at the first backward after transform, ``.to()`` or
        ``.train()``/``.eval()``. ``print(lbi.explain())`` for a readable listing."""
        choices, last = self.region_choices, self.num_regions - 1
        rows = []
        for k in range(self.num_regions):
            strategy, why, vjps = explain_region(choices, k, self.jacobian, k == last)
            rows.append(RegionExplanation(
                region=k, modules=list(self.regions[k]), width_in=self.ranks[max(k - 1, 0)],
                width_out=None if k == last else self.ranks[k], jacobian=strategy, why=why,
                vjps=vjps, fallbacks=dict(choices.fallbacks.get(k, {})),
                unsupported=dict(choices.unsupported.get(k, {}))))
        pool = getattr(self, "pool", "?")
        segs = getattr(self, "segments", None)
        rows_per = segs.count if segs is not None else 1
        width = describe_width(getattr(self, "rank_per_row", None)
                               or [w // rows_per for w in self.ranks], rows_per)
        header = (f"LBIModule: {self.num_regions} regions, interfaces of {width} per sample, "
                  f"pool {pool}"
                  + f", jacobian={self.jacobian!r}, scan backend {self.scan_backend!r}"
                  + (" (auto: triton on CUDA, else the sequential or chunked torch scan by "
                     "shape)" if self.scan_backend == "auto" else ""))
        return Explanation(rows, header)

    # -- checks ----------------------------------------------------------------------
    def lbi_verify(self, *, example_inputs: Sequence[object], rank=None, interfaces=None
                   ) -> SeparatorReport:
        """Separator check of the rewritten graph: every boundary must hold at m_k."""
        from lbi_fx.analysis import separator_report
        from lbi_fx.causality import Causality, leaky_interfaces, probe_causal
        from lbi_fx.passes.mark_dynamic import mark_dynamic
        from lbi_fx.passes.shape_prop import BATCH_KEY, propagate_shapes

        gm = self.rewritten_graph
        gm.meta["lbi_capture"] = f"lbi_fx.transform ({self.capture})"
        propagate_shapes(gm, example_inputs)
        mark_dynamic(gm)
        report = separator_report(gm, self.regions, gm.meta[BATCH_KEY],
                                  rank=self.ranks if rank is None and interfaces is None else rank,
                                  interfaces=interfaces)
        if rank is None and interfaces is None:  # held to its own m_k: S rows of r each
            segs = getattr(self, "segments", None)
            report.segments = segs.count if segs is not None else 1
        from lbi_fx.causality import graph_axes
        from lbi_fx.passes.seq_axes import mark_seq_axes

        mark_seq_axes(gm, example_inputs)  # which output axis is the sequence: the graph says
        causal, leak, why = probe_causal(self, example_inputs, **graph_axes(gm))
        leaks = leaky_interfaces(self)
        # an interface that pools across positions leaks whatever a numeric probe sees
        # (a tiny or untrained encoder can hide it below the probe's tolerance)
        report.causality = Causality(
            model_causal=getattr(self, "model_causal", None),
            lbi_causal=False if leaks else causal, lbi_leak=leak, leaks=leaks, note=why)
        return report


def adopt_state(dst: nn.Module, gm: fx.GraphModule) -> None:
    """Give ``dst`` the captured model's submodules, parameters, buffers and top-level
    constants under their own names, shared rather than copied, so ``state_dict`` keys
    match the original model and optimizers see the same tensors."""
    for name, child in gm.named_children():
        dst.add_module(name, child)
    for name, p in gm.named_parameters(recurse=False):
        dst.register_parameter(name, p)
    for name, b in gm.named_buffers(recurse=False):
        dst.register_buffer(name, b)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." not in node.target and not hasattr(dst, node.target):
            setattr(dst, node.target, getattr(gm, node.target))


def _placement(module: nn.Module) -> frozenset:
    """The (dtype, device) pairs of a module's tensors: what ``.to()`` and friends change."""
    return frozenset((t.dtype, t.device) for t in (*module.parameters(), *module.buffers()))


def _moved(fn, dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, torch.device]:
    """Where ``fn`` (the function ``.to()`` and friends apply) sends a tensor of this kind."""
    t = fn(torch.empty(0, dtype=dtype, device=device))
    return t.dtype, t.device


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


def _any_grad(xs) -> bool:
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def _scan_target(fallback):
    op = getattr(getattr(torch.ops, "lbi_fx", None), "suffix_scan", None)
    return op if op is not None else fallback
