"""Refusal or bug: what an exception inside lbi-fx's run-time means.

A failure while lbi-fx runs a region is a *refusal* (an ``LBIError`` naming the region
and PyTorch's own cause) only when plain PyTorch fails on that region too: the region is
rerun alone from its interface state, with the RNG state of its forward, and
differentiated by the same PyTorch primitive lbi-fx used (reverse mode, forward mode,
``vmap``). If plain PyTorch succeeds there, the failure is lbi-fx's: an
``InternalError`` carrying the original exception. Without this split any bug of ours
that raises would pass for a legitimate refusal.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import warnings

import torch

from lbi_fx.errors import InternalError, LBIError, RewriteError

PRIMITIVES = {  # strategy -> the PyTorch primitive it relies on, in words
    "reuse": "reverse-mode autograd",
    "forward": "forward-mode AD (torch.func.jvp)",
    "recompute": "torch.func.vmap with reverse-mode autograd",
}
_IN_PLACE = ("inplace", "in-place", "modified by an")


# torch.fx prints a failing GraphModule call's traceback and generated code to stderr
# before re-raising (torch/fx/graph_module.py, _WrappedCall.__call__), in one write
FX_DUMP = "Call using an FX-traced Module, line"


class _DropFXDumps:
    """``sys.stderr`` minus torch.fx's dumps (and the newline ``print`` adds after one);
    every other write, warnings and progress bars included, passes through."""

    def __init__(self, target):
        self.target = target
        self._after_dump = False

    def write(self, text: str) -> int:
        if FX_DUMP in text or (self._after_dump and text == "\n"):
            self._after_dump = FX_DUMP in text
            return len(text)
        self._after_dump = False
        return self.target.write(text)

    def __getattr__(self, name):
        return getattr(self.target, name)


@contextlib.contextmanager
def without_fx_dumps():
    """Hush torch.fx's traceback dump of a failing generated program: lbi-fx turns the
    exception into a refusal or an ``InternalError`` with its own message (the original
    stays chained as ``__cause__``), so the dump only buries that message."""
    if isinstance(sys.stderr, _DropFXDumps):
        yield
        return
    old = sys.stderr
    sys.stderr = _DropFXDumps(old)
    try:
        yield
    finally:
        if isinstance(sys.stderr, _DropFXDumps):
            sys.stderr = old


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def region_of(where: str) -> int | None:
    """The region index in a run-time location such as ``"region 2 (local VJP)"``."""
    m = re.match(r"region (\d+)", where or "")
    return int(m.group(1)) if m else None


def plain_failure(cache, strategy: str = "reuse") -> BaseException | None:
    """Rerun one region alone from a fresh m_k leaf and differentiate it with plain
    PyTorch's ``strategy`` primitive; return the exception it raises, or None."""
    m = cache.m_in.detach().requires_grad_(True)
    try:
        with torch.enable_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            if strategy == "forward":
                torch.func.jvp(lambda mm: cache.replay(mm)[0], (m.detach(),),
                               (torch.ones_like(m),))
                return None
            if strategy == "recompute":
                reps = m.detach().unsqueeze(0).clone().requires_grad_(True)
                out = torch.func.vmap(lambda mm: cache.replay(mm)[0], randomness="same")(reps)
                torch.autograd.grad(out, reps, torch.ones_like(out), allow_unused=True)
                return None
            outs = [o for o in cache.replay(m)
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = [m, *[t for _, t in cache.static if t.requires_grad],
                   *[p for _, p in cache.params]]
            if outs:
                torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs],
                                    allow_unused=True)
    except (RuntimeError, NotImplementedError) as exc:
        return exc
    return None


def classify(exc: BaseException, cache, where: str, strategy: str = "reuse",
             name: str = "") -> BaseException:
    """The exception to raise for ``exc``, raised by lbi-fx while working on ``where``
    (a region's cache ``cache``, or None outside any region): a ``RewriteError`` when
    plain PyTorch fails on that region too, an ``InternalError`` otherwise."""
    if isinstance(exc, (LBIError, InternalError)):
        return exc
    label = f"{where} ({name})" if name else where
    cause = plain_failure(cache, strategy) if cache is not None else None
    if cause is None:
        return InternalError(
            f"lbi-fx failed in {label or 'the chain'} with {type(exc).__name__}: "
            f"{first_line(exc)}, where plain PyTorch ({PRIMITIVES.get(strategy, strategy)}) "
            "runs the same region fine; backward='autograd' avoids the failing path", exc)
    hint = ("An in-place op on a tensor the region saved for backward is the cause (the "
            "rewrite feeds every region output into its interface, so even a branch the "
            "original loss ignored is differentiated): use the out-of-place op there"
            if any(s in str(cause) for s in _IN_PLACE) else
            "Use jacobian='auto' (falls back per region) or 'reuse'" if strategy != "reuse"
            else "Change the op PyTorch names, or leave this module out of the regions")
    return RewriteError(
        f"{label} cannot be differentiated: plain PyTorch "
        f"({PRIMITIVES.get(strategy, strategy)}) fails on this region too: "
        f"{first_line(cause)}. {hint}")
