"""Benchmarks behind ``lbi-fx bench <name>``: each prints ratios against a baseline timed in
the same run.

Contract: a bench is a module ``lbi_fx.bench.<module>`` with
``add_arguments(parser) -> None`` (its flags, so ``lbi-fx bench <name> --help`` lists them),
``run(args) -> int`` (the exit status) and ``main(argv=None) -> int`` for standalone use.
:data:`BENCHES` maps the command-line name to the module name; the CLI imports a module only
when its bench runs, so a bench with heavy imports costs nothing to the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

# bench name -> module under lbi_fx.bench (the first docstring line becomes the --help text)
BENCHES: dict[str, str] = {
    "scan": "scan",
    "step": "step",
    "comm": "comm",
    "pgf": "pgf",
    "crossover": "crossover",
    "memory": "memory",
}


def load(name: str) -> ModuleType:
    """The module of bench ``name`` (KeyError for an unknown name)."""
    return importlib.import_module(f"lbi_fx.bench.{BENCHES[name]}")


def standalone(module: ModuleType, name: str, argv: Sequence[str] | None) -> int:
    """``main`` of a bench module: its own parser, then ``run``."""
    from lbi_fx.cli.common import standalone as _standalone

    return _standalone(module, f"lbi-fx bench {name}", argv)
