"""Error hierarchy. Every refusal of lbi-fx is an ``LBIError`` that names its culprit."""

from __future__ import annotations


class LBIError(Exception):
    """Base class of every error lbi-fx raises on bad input or an unsupported model."""


class TraceError(LBIError):
    """The model could not be captured as an FX graph."""


class InputError(LBIError):
    """``example_inputs`` or another argument is missing or malformed."""


class SequenceAxisError(InputError):
    """An input's sequence axis is needed (``pool="causal"``, ``max_len``) but neither the
    graph says it (an embedding lookup, a Conv1d, a Linear reading the input) nor
    ``seq_dim=`` names it."""


class RegionSpecError(LBIError):
    """The region spec does not describe a valid, topologically ordered partition."""


class SeparatorError(LBIError):
    """A boundary is not separated by the interface (Def. A.1 / Def. 2.4)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class RewriteError(LBIError):
    """The model cannot be rewritten into a bounded-interface model as asked."""


class BatchMixingError(RewriteError):
    """An operation inside a region mixes samples, so interfaces are not per-sample."""


class ModeError(LBIError):
    """A ``.train()``/``.eval()`` change the rewritten model cannot follow exactly (its
    capture branches on ``self.training``); transform the model again in that mode."""


class HookError(LBIError):
    """A hook on a submodule the capture traced through (its code is inlined in the
    region programs, the module itself is never called), so it would never run."""


class NonFiniteError(LBIError):
    """A NaN or Inf appeared where ``check_finite=True`` forbids it."""


class HigherOrderError(LBIError):
    """A gradient of the scan backward's gradients was asked for (double backward)."""


class InternalError(Exception):
    """lbi-fx itself failed where plain PyTorch works on the same region: a bug to report.

    Deliberately not an ``LBIError``: a refusal says the model cannot be made exact, this
    says lbi-fx broke, and tests and the fuzzer count it as a failure. ``original`` is the
    exception lbi-fx raised (also chained as ``__cause__``).
    """

    def __init__(self, message: str, original: BaseException | None = None):
        super().__init__(f"{message}. This is a bug in lbi-fx: please report it with the "
                         "model, the call and this traceback")
        self.original = original


class CheckpointError(LBIError):
    """A checkpoint does not fit the run loading it (another model, K, placement), or is
    incomplete."""


class DistributedError(LBIError):
    """A distributed step could not finish; ``rank``, ``regions`` and ``phase`` name where."""

    def __init__(self, message: str, rank: int | None = None, regions=(), phase: str = ""):
        super().__init__(message)
        self.rank, self.regions, self.phase = rank, list(regions), phase


class PeerFailedError(DistributedError):
    """Another rank's step raised; this rank stopped waiting for it (``rank`` is the failed
    one, ``phase`` where it failed)."""


class DistributedTimeout(DistributedError):
    """A peer did not reach a collective within ``RegionParallel``'s ``timeout``: stuck,
    dead, or slower than the timeout allows (``rank``: the first rank missing)."""
