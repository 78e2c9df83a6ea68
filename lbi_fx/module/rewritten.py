"""``LBIModule``: the rewritten model, an ordinary ``nn.Module``.

It owns the captured model's submodules (same names, so ``state_dict`` keys match the
original model) plus ``lbi``, the interface modules. Its forward is
prologue -> interface chain -> epilogue. With ``backward = "scan"`` the chain is one
``LBIChain`` autograd node whose backward is the generated three-phase program; with
``backward = "autograd"`` the same programs run under plain reverse mode - the
reference for parity tests and benchmark ratios.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from lbi_fx.choices import RegionChoices
from lbi_fx.errors import InputError
from lbi_fx.module.chain import ChainRunner, _Call
from lbi_fx.module.inputs import InputBinding
from lbi_fx.module.introspect import Introspection
from lbi_fx.module.state import StateFollowing, traced_through
from lbi_fx.passes.build_backward import build_backward_graph
from lbi_fx.passes.capture import MODE_PROBLEM_KEY, SIGNATURE_KEY
from lbi_fx.passes.prune_prologue import prune_outputs
from lbi_fx.passes.split_places import Programs
from lbi_fx.runtime import STRATEGIES, LBIChain

BACKWARD_MODES = ("scan", "autograd")


class LBIModule(StateFollowing, InputBinding, ChainRunner, Introspection, nn.Module):
    """The rewritten model. Its parts, one responsibility each: following the module's
    state (``state.py``), binding calls (``inputs.py``), running the chain
    (``chain.py``), reporting (``introspect.py``); here the programs and the forward."""

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
        if hasattr(self, "lbi"):  # the layout record (lbi_fx/layout.py) names the regions
            self.lbi.regions = self.regions
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
        self._watch_hooks(traced_through(self._flat_graph, self))

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
        keep = getattr(self, "_prologue_keep", None)
        compiled = {
            "prologue": gm(spec.prologue, "Prologue"),
            # what this process runs of it: a region-parallel rank computes only what its
            # regions read (passes/prune_prologue.py); the full program stays for analysis
            "prologue_run": (gm(spec.prologue, "Prologue") if keep is None else fx.GraphModule(
                self, prune_outputs(spec.prologue.graph, spec.prologue.outputs, keep, self),
                "Prologue")),
            "regions": regions,
            "epilogue": gm(spec.epilogue, "Epilogue"),
            "static_names": static_names,
            "params": params,
            "region_params": region_params,
            "region_param_names": region_names,
        }
        self._compiled = compiled
        return compiled

    def keep_prologue_outputs(self, names: set[str] | None) -> None:
        """Run only the prologue outputs ``names`` (None: all). A region-parallel rank
        sets it to what its regions read, so the prologue never touches the parameters
        of other ranks' canvas copies; the other outputs come back as None."""
        self._prologue_keep = None if names is None else frozenset(names)
        self._compiled = None

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



def _any_grad(xs) -> bool:
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def _scan_target(fallback):
    op = getattr(getattr(torch.ops, "lbi_fx", None), "suffix_scan", None)
    return op if op is not None else fallback
