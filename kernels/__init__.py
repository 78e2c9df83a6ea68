"""Suffix-product scans over Jacobian chains (the exact backward of an LBI model).

Importing this package registers the ``lbi_fx::suffix_scan`` and
``lbi_fx::suffix_adjoints`` custom ops; it does not import Triton (see ``ops``).

Installed, this directory is ``lbi_fx.kernels``. In a source checkout it is also visible as
a top-level ``kernels`` from the repository root (``python -m`` puts the working directory
on ``sys.path``), and ``transformers`` probes for the Hugging Face ``kernels`` package by
importing that name. Loaded under any name but ``lbi_fx.kernels`` the package stays empty:
importing ``ops`` a second time would re-register the custom ops and rebind them to a copy
of this module, whose classes (``TritonFallbackWarning``) differ from lbi_fx's.
"""

if __name__ == "lbi_fx.kernels":
    from .ops import (
        BACKENDS,
        TritonFallbackWarning,
        suffix_adjoints,
        suffix_scan,
        triton_available,
    )
    from .scan_torch import chunk_size, suffix_scan_reference

    __all__ = [
        "BACKENDS",
        "TritonFallbackWarning",
        "chunk_size",
        "suffix_adjoints",
        "suffix_scan",
        "suffix_scan_reference",
        "triton_available",
    ]
else:  # pragma: no cover - a probe by another library, see above
    __all__: list[str] = []
