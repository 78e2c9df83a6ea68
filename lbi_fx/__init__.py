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
    HookError,
    InputError,
    InternalError,
    LBIError,
    ModeError,
    NonFiniteError,
    PeerFailedError,
    RegionSpecError,
    RewriteError,
    SeparatorError,
    SequenceAxisError,
    TraceError,
)
from lbi_fx.interfaces import per_position
from lbi_fx.passes.capture import CaptureWarning
from lbi_fx.regions import composition, every
from lbi_fx.report import BoundaryReport, SeparatorReport
from lbi_fx.spl import stage_partition

__all__ = [
    "BatchMixingError",
    "BoundaryReport",
    "CaptureWarning",
    "Causality",
    "CausalityWarning",
    "CheckpointError",
    "DistributedError",
    "DistributedTimeout",
    "FallbackWarning",
    "HigherOrderError",
    "HookError",
    "InputError",
    "InternalError",
    "LBIError",
    "ModeError",
    "NonFiniteError",
    "PeerFailedError",
    "RegionSpecError",
    "RewriteError",
    "SeparatorError",
    "SequenceAxisError",
    "SeparatorReport",
    "TraceError",
    "composition",
    "every",
    "per_position",
    "stage_partition",
    "transform",
    "verify",
]
__version__ = "0.1.0"

# Public submodules, reachable as attributes after a bare `import lbi_fx` (lbi_fx.testing,
# lbi_fx.models, ...) but imported on first use, so `import lbi_fx` stays cheap.
SUBMODULES = frozenset({
    "api", "bench", "causality", "checkpoint", "cli", "distributed", "errors", "kernels",
    "models", "passes", "pgf", "pipelining", "plan", "regions", "report", "spl", "testing",
})


def __getattr__(name: str):
    """Import a public submodule the first time it is read as an attribute."""
    if name in SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | SUBMODULES)
