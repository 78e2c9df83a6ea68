"""What a rewritten module can tell about itself: spectra, timings, choices, checks.

Read-only views over the last backward and the rewritten graph; nothing here changes
what a forward or backward computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch.utils._pytree import tree_leaves

from lbi_fx.choices import Explanation, RegionExplanation, explain_region
from lbi_fx.errors import InputError
from lbi_fx.report import SeparatorReport, describe_width


class Introspection:
    """Mixin of :class:`~lbi_fx.module.LBIModule`: reports on the module."""

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
        unprobed = getattr(self, "unprobed", [])
        if unprobed:
            header += (f"\nbuilt on the meta device: transform did not run {', '.join(unprobed)}"
                       " (no values); verify a small materialised config of the same model")
        return Explanation(rows, header)

    def lbi_verify(self, *, example_inputs: Sequence[object], rank=None, interfaces=None
                   ) -> SeparatorReport:
        """Separator check of the rewritten graph: every boundary must hold at m_k."""
        from lbi_fx.analysis import separator_report
        from lbi_fx.causality import Causality, leaky_interfaces, probe_causal
        from lbi_fx.passes.mark_dynamic import mark_dynamic
        from lbi_fx.passes.shape_prop import BATCH_KEY, propagate_shapes

        gm = self.rewritten_graph
        gm.meta["lbi_capture"] = f"lbi_fx.transform ({self.capture})"
        propagate_shapes(gm, example_inputs, blame="node")  # lbi-fx's nodes: InternalError
        mark_dynamic(gm)
        report = separator_report(gm, self.regions, gm.meta[BATCH_KEY],
                                  rank=self.ranks if rank is None and interfaces is None else rank,
                                  interfaces=interfaces)
        if rank is None and interfaces is None:  # held to its own m_k: S rows of r each
            segs = getattr(self, "segments", None)
            report.segments = segs.count if segs is not None else 1
        from lbi_fx.causality import graph_axes
        from lbi_fx.passes.seq_axes import mark_seq_axes

        # which output axis is the sequence: the graph says, from the inputs' axes that
        # transform derived (or seq_dim named)
        given = getattr(self, "input_seq_axes", None)
        n_in = sum(isinstance(x, torch.Tensor) for x in tree_leaves(list(example_inputs)))
        why = mark_seq_axes(gm, example_inputs, given if given is not None and len(given) == n_in
                            else None)
        ia = gm.meta["lbi_input_axes"]
        leaks = leaky_interfaces(self)
        if not ia.unknown and not ia.any_sequence:  # an image model: nothing causal to say
            report.causality = Causality(model_causal=None, sequence=False)
            return report
        causal, leak, why = ((None, None, why) if ia.unknown
                             else probe_causal(self, example_inputs, **graph_axes(gm)))
        # an interface that pools across positions leaks whatever a numeric probe sees
        # (a tiny or untrained encoder can hide it below the probe's tolerance)
        report.causality = Causality(
            model_causal=getattr(self, "model_causal", None),
            lbi_causal=False if leaks else causal, lbi_leak=leak, leaks=leaks, note=why)
        return report
