"""From a checkout's root the source directory ``kernels/`` is importable as ``kernels``,
the name of the Hugging Face kernels package that ``transformers`` probes for by importing
it. That import must not re-register lbi-fx's custom ops under a copy of ``ops``, and where
the Hugging Face package is installed it must get that package (transformers imports names
from it once it finds its distribution)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = r"""
import importlib, importlib.metadata, sys, warnings
import torch
import lbi_fx.kernels.ops as ops
sys.path.insert(0, sys.argv[1])       # the checkout's root, as `python -m` from there gives
probe = importlib.import_module("kernels")  # what transformers' availability probe does
assert "kernels.ops" not in sys.modules, "the probe loaded a second copy of ops"
try:
    importlib.metadata.distribution("kernels")  # Hugging Face's: transformers imports from it
    assert hasattr(probe, "CUDAProperties"), f"the checkout's kernels/ shadowed {probe.__file__}"
except importlib.metadata.PackageNotFoundError:
    assert probe.__all__ == [], probe.__file__  # the checkout's directory, left empty
J = torch.randn(2, 3, 4, 4, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ops.suffix_scan(J, "triton")      # float64: the torch scan runs, with a warning
assert [type(w.message) for w in caught] == [ops.TritonFallbackWarning], caught
print("OK")
"""


def test_top_level_kernels_import_leaves_lbi_fx_ops_alone():
    proc = subprocess.run([sys.executable, "-c", CODE, str(ROOT)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT / "tests")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
