"""lbi-fx: rewrite PyTorch models into Latent Bounded Interface models whose backward
is a Jacobian -> suffix scan -> region-local program with exact gradients."""

from lbi_fx.api import transform, verify
from lbi_fx.errors import (
    BatchMixingError,
    InputError,
    LBIError,
    NonFiniteError,
    RegionSpecError,
    RewriteError,
    SeparatorError,
    TraceError,
)
from lbi_fx.regions import every
from lbi_fx.report import BoundaryReport, SeparatorReport

__all__ = [
    "BatchMixingError",
    "BoundaryReport",
    "InputError",
    "LBIError",
    "NonFiniteError",
    "RegionSpecError",
    "RewriteError",
    "SeparatorError",
    "SeparatorReport",
    "TraceError",
    "every",
    "transform",
    "verify",
]
__version__ = "0.1.0"
