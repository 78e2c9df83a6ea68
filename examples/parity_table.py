"""Gradient parity table (the paper's Table 5) from a script; same as ``lbi-fx parity``.

    python examples/parity_table.py                      # 20 x 5, CPU backends
    python examples/parity_table.py --inits 2 --batches 1 --backends mamba2,hybrid --json

The table lives in :mod:`lbi_fx.cli.parity` so an installed lbi-fx runs it too. From your own
code, ``lbi_fx.cli.parity.measure("hybrid", inits=2, batches=1)`` returns one backend's
worst-case rows (float32 and bfloat16 autocast); this script parses the flags and prints
the whole table.
"""

from __future__ import annotations

import sys

from lbi_fx.cli.parity import build_parser, run

if __name__ == "__main__":
    sys.exit(run(build_parser(prog="parity_table.py").parse_args()))
