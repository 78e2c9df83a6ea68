"""Error hierarchy. Every refusal of lbi-fx is an ``LBIError`` that names its culprit."""

from __future__ import annotations


class LBIError(Exception):
    """Base class of every error lbi-fx raises on bad input or an unsupported model."""


class TraceError(LBIError):
    """The model could not be captured as an FX graph."""


class InputError(LBIError):
    """``example_inputs`` or another argument is missing or malformed."""


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


class NonFiniteError(LBIError):
    """A NaN or Inf appeared where ``check_finite=True`` forbids it."""
