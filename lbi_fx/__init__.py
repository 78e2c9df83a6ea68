"""lbi-fx: rewrite PyTorch models into Latent Bounded Interface models whose backward
is a Jacobian -> suffix scan -> region-local program with exact gradients."""

from lbi_fx.api import transform, verify
from lbi_fx.causality import Causality, CausalityWarning
from lbi_fx.choices import FallbackWarning
from lbi_fx.errors import (
    BatchMixingError,
    CheckpointError,
    DistributedError,
    DistributedTimeout,
    HigherOrderError,
    InputError,
    InternalError,
    LBIError,
    NonFiniteError,
    PeerFailedError,
    RegionSpecError,
    RewriteError,
    SeparatorError,
    TraceError,
)
from lbi_fx.regions import composition, every
from lbi_fx.report import BoundaryReport, SeparatorReport
from lbi_fx.spl import stage_partition

__all__ = [
    "BatchMixingError",
    "BoundaryReport",
    "Causality",
    "CausalityWarning",
    "CheckpointError",
    "DistributedError",
    "DistributedTimeout",
    "FallbackWarning",
    "HigherOrderError",
    "InputError",
    "InternalError",
    "LBIError",
    "NonFiniteError",
    "PeerFailedError",
    "RegionSpecError",
    "RewriteError",
    "SeparatorError",
    "SeparatorReport",
    "TraceError",
    "composition",
    "every",
    "stage_partition",
    "transform",
    "verify",
]
__version__ = "0.1.0"
