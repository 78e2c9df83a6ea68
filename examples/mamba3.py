"""Transform a Mamba-3 (SISO) language model and check its gradients. CUDA only.

    python examples/mamba3.py [--layers 4 --rank 8]

The model (:mod:`lbi_fx.models.mamba3`) runs mamba-ssm's Mamba-3 Triton kernel, which
fx cannot trace, so each mixer stays one opaque node (``leaf_modules``). The kernel
computes in bfloat16 whatever the parameter dtype, so the float32 gradients are compared
against autograd with the bfloat16 goal of the parity table (rel-l2 <= 1.4e-2).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import lbi_fx
from lbi_fx.models.mamba3 import build, leaf_modules, mamba3_class
from lbi_fx.testing import gradient_parity


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    a = ap.parse_args(argv)
    try:
        mamba3_class()
    except RuntimeError as exc:
        print(f"mamba3.py: {exc}", file=sys.stderr)
        return 2
    model, (idx,) = build(n_layer=a.layers)
    lbi = lbi_fx.transform(model, lbi_fx.every(2, "layers"), rank=a.rank, example_inputs=(idx,),
                           leaf_modules=leaf_modules(model))
    targets = torch.randint(0, 256, idx.shape, device=idx.device)
    report = gradient_parity(lbi, (idx,), lambda logits: F.cross_entropy(logits.flatten(0, 1),
                                                                        targets.flatten()))
    print(report)
    return 0 if report.rel_l2 <= 1.4e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
