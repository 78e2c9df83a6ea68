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

    def _defer_to_the_installed_kernels() -> None:
        """Where the Hugging Face ``kernels`` package is installed too, ``import kernels``
        from a checkout's root must give that package, not this directory: transformers
        imports names from it once its distribution is found (``from kernels import
        CUDAProperties``). The import system returns whatever ``sys.modules`` holds for
        the name when this file finishes, so the other package's module goes there."""
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.abspath(__file__))
        root = os.path.dirname(here)
        others = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
        spec = importlib.machinery.PathFinder.find_spec(__name__, others)
        if spec is None or spec.origin is None or os.path.dirname(
                os.path.abspath(spec.origin)) == here:
            return
        ours, module = sys.modules[__name__], importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules[__name__] = ours
            raise

    if __name__ == "kernels":
        _defer_to_the_installed_kernels()
