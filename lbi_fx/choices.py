"""Per-region run-time choices of the scan backward, kept in one object.

The backward decides some things per region and keeps them: which Jacobian strategy
``jacobian="auto"`` picked (and the probe timings behind it), and whether batched VJPs
work there or per-row VJPs are used for good. Those decisions depend on the module's
dtype, device and train/eval mode (dropout moves attention off the CPU flash kernel,
which has no forward-mode rule), so ``LBIModule`` clears this object whenever one of
them changes and the next backward decides afresh.

What auto's probe finds unsupported (CPU flash attention has no forward-mode rule, an op
without a batching rule) is a choice auto makes by design: recorded and listed by
``LBIModule.explain()``, never warned about. A fallback that costs something the user did
not choose (batched VJPs that raised outside the probe - CUDA out-of-memory included -
and so run one row at a time from then on) is exact but slower: one ``FallbackWarning``
per model and cause, pointing at the user's line, and ``explain()`` lists it.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field

import torch


class FallbackWarning(UserWarning):
    """A region's backward fell back to another (still exact) way of computing J_k."""


# cause -> what auto does instead when its probe finds the strategy unsupported
_PROBED = {
    "forward": "auto uses VJPs there (expected: e.g. CPU flash attention has no forward-mode rule)",
    "reuse-batched": "auto uses per-row VJPs or forward mode there",
    "reuse-rows": "auto uses another strategy there",
}

# cause -> what runs instead, in words
_INSTEAD = {
    "forward": "auto does not use forward mode there",
    "reuse-batched": "per-row VJPs from now on (exact, r times more backward calls)",
    "reuse-rows": "auto does not use per-row VJPs there",
    "recompute": "auto does not use recompute there",
}


@dataclass
class RegionChoices:
    """What the backward decided per region, why, and which fallbacks it already reported.

    ``jacobian`` and ``batched`` are the dicts the run-time reads (``ChainState.choice``
    and ``ChainState.batched_ok`` are these very objects); ``clear`` empties everything
    in place so every holder sees the reset.
    """

    jacobian: dict[int, str] = field(default_factory=dict)   # region -> strategy auto picked
    batched: dict[int, bool] = field(default_factory=dict)   # region -> batched VJPs work
    probes: dict[int, dict[str, float | str]] = field(default_factory=dict)  # seconds or error
    fallbacks: dict[int, dict[str, str]] = field(default_factory=dict)  # region -> cause -> why
    # region -> cause -> why: what auto's probe found unsupported (by design, not warned)
    unsupported: dict[int, dict[str, str]] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)  # causes warned about; kept by ``clear``
    probe_runs: int = 0   # how many region probes ran (a cleared object probes again)
    probing: bool = False  # auto's probe is running: failures are its findings

    def clear(self) -> None:
        """Forget every decision (the next backward probes again); fallbacks already
        reported stay reported, so a train/eval toggle per epoch does not repeat them."""
        for d in (self.jacobian, self.batched, self.probes, self.fallbacks, self.unsupported):
            d.clear()

    def fell_back(self, k: int, cause: str, exc: BaseException) -> None:
        """Remember that ``cause`` failed in region k with ``exc``: a finding of auto's probe
        while it runs (explained only), else a fallback (reported by ``flush``)."""
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        where = self.unsupported if self.probing else self.fallbacks
        where.setdefault(k, {})[cause] = f"{type(exc).__name__}: {first}"[:300]

    def flush(self, k: int) -> None:
        """Warn about region k's fallbacks whose cause this model has not reported yet:
        one warning per model and cause, however many regions (and steps) meet it."""
        for cause, why in self.fallbacks.get(k, {}).items():
            if cause in self.reported:
                continue
            self.reported.add(cause)
            where = ("`lbi-fx inspect FACTORY --regions SPEC --jacobian J --explain`"
                     if _from_cli() else "lbi.explain()")
            warnings.warn(
                f"lbi-fx: region {k}: {_label(cause)} failed ({why}); "
                f"{_INSTEAD.get(cause, 'another way is used')}. Gradients stay exact; said "
                f"once per model (other regions may do the same): {where} lists every "
                "region's choices", FallbackWarning, stacklevel=_caller_level())


def _own_dirs() -> tuple[str, ...]:
    """lbi_fx, its passes and kernels (installed beside it or not) and torch."""
    mods = [sys.modules.get(n) for n in ("lbi_fx", "lbi_fx.passes", "lbi_fx.kernels")]
    dirs = [os.path.dirname(os.path.abspath(m.__file__)) for m in mods
            if m is not None and getattr(m, "__file__", None)]
    dirs.append(os.path.dirname(os.path.abspath(torch.__file__)))
    return tuple(d + os.sep for d in dirs)


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside lbi-fx and torch: the user's
    ``loss.backward()`` (or ``transform``), not the runtime line that noticed the fallback."""
    frame, level, own = sys._getframe(1), 1, _own_dirs()
    while frame is not None and _internal(frame.f_code.co_filename, own):
        frame, level = frame.f_back, level + 1
    return level


def _from_cli() -> bool:
    """Is the ``lbi-fx`` command line running this (``lbi_fx.cli.main`` on the stack)?
    Its users have no ``lbi`` object to call ``explain()`` on."""
    cli = os.path.join("lbi_fx", "cli", "__init__.py")
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_code.co_filename.endswith(cli):
            return True
        frame = frame.f_back
    return False


def _internal(filename: str, own: tuple[str, ...]) -> bool:
    # "<eval_with_key>.N": code FX generated for a program (the scan backward among them)
    return filename.startswith("<eval_with_key>") or os.path.abspath(filename).startswith(own)


def _label(cause: str) -> str:
    return {"forward": "forward-mode Jacobian (jvp under vmap)",
            "reuse-batched": "batched VJPs (is_grads_batched)",
            "reuse-rows": "per-row VJPs",
            "recompute": "recompute (vmap over replicas)"}.get(cause, cause)


@dataclass
class RegionExplanation:
    """One region's line of ``LBIModule.explain()``."""

    region: int
    modules: list[str]
    width_in: int                 # scalars per sample of m_k
    width_out: int | None         # of m_{k+1}; None for the last region
    jacobian: str                 # strategy in use ("-" for the last region: no J_k)
    why: str                      # asked, or auto's probe and its timings
    vjps: str                     # batched | per-row | - (not used)
    fallbacks: dict[str, str] = field(default_factory=dict)    # cause -> error (warned)
    unsupported: dict[str, str] = field(default_factory=dict)  # auto's probe: cause -> error

    def __str__(self) -> str:
        out = "-" if self.width_out is None else str(self.width_out)
        line = (f"region {self.region} ({', '.join(self.modules)}): m {self.width_in} -> {out}; "
                f"jacobian {self.jacobian} ({self.why}); VJPs {self.vjps}")
        for cause, why in self.unsupported.items():
            line += (f"\n    auto's probe: {_label(cause)} unsupported here: {why}; "
                     f"{_PROBED.get(cause, '')}")
        for cause, why in self.fallbacks.items():
            line += f"\n    fallback: {_label(cause)} failed: {why}; {_INSTEAD.get(cause, '')}"
        return line


class Explanation(list):
    """``LBIModule.explain()``: a list of ``RegionExplanation`` plus the module-wide
    settings; ``print(lbi.explain())`` gives one line per region."""

    def __init__(self, regions, header: str):
        super().__init__(regions)
        self.header = header

    def __str__(self) -> str:
        return "\n".join([self.header, *map(str, self)])


def explain_region(choices: RegionChoices, k: int, asked: str, last: bool) -> tuple[str, str, str]:
    """(strategy, why, vjps) of region k from what the backward decided so far."""
    if last:
        return "-", "the last region has no interface Jacobian", "-"
    strategy = choices.jacobian.get(k, asked) if asked == "auto" else asked
    if asked != "auto":
        why = "asked"
    elif k not in choices.jacobian:
        why = "auto; not probed yet: runs at the next backward"
    else:
        timings = ", ".join(f"{n} {v * 1e3:.2f} ms" if isinstance(v, float) else f"{n} unsupported"
                            for n, v in choices.probes.get(k, {}).items())
        why = f"picked by auto's probe: {timings}" if timings else "picked by auto"
    uses_vjps = strategy == "reuse"
    vjps = ("-" if not uses_vjps else
            "per-row" if choices.batched.get(k) is False else
            "batched" if k in choices.batched else "batched (not run yet)")
    return strategy, why, vjps
