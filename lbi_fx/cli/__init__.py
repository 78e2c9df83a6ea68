"""lbi-fx command line; lbi-fx COMMAND --help lists the flags of each command.

Exit codes (:data:`lbi_fx.cli.exits.EXIT_CODES`): 0 success, 1 a check failed (a boundary
wider than the budget), 2 usage or spec error, 3 the model is refused or the run failed,
4 a bug in lbi-fx (``InternalError``). Each error is one line on stderr, no traceback
(LBI_FX_TRACEBACK=1 re-raises); each warning one line naming the factory and region spec.

Every sub-command is a module with ``add_arguments(parser)`` and ``run(args) -> int``
(the contract of :mod:`lbi_fx.bench`); :data:`COMMANDS` lists them, and a module is
imported only when its command runs or ``--help`` lists every flag.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from lbi_fx import __version__
from lbi_fx.cli.bench import add_bench_parsers, selected_bench
from lbi_fx.cli.common import Parser, add_command_parser, load_factory
from lbi_fx.cli.exits import EXIT_CODES, attributed_warnings, report_error, subject_of
from lbi_fx.cli.factory import UsageError

__all__ = ["COMMANDS", "EXIT_CODES", "UsageError", "build_parser", "load_factory", "main"]

# command -> (module with add_arguments / run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("lbi_fx.cli.verify", "check the vertex-separator condition at every boundary"),
    "inspect": ("lbi_fx.cli.inspect", "print the rewritten forward and generated backward graphs"),
    "parity": ("lbi_fx.cli.parity", "gradient-parity table over backends (the paper's Table 5)"),
    "quality": ("lbi_fx.cli.quality", "dense vs LBI language models, leak-free scores side by side"),
    "spl": ("lbi_fx.cli.spl", "stage-partitioned learning vs BP and LBI: the root-bottleneck table"),
    "plan": ("lbi_fx.plan", "predict GPipe / 1F1B / LBI step times per link rate from a profile"),
}


def build_parser(argv: Sequence[str] | None = None) -> Parser:
    """The lbi-fx parser; sub-commands with heavy imports load them only when ``argv``
    selects them (``argv=None``: load every one, e.g. to list all flags)."""
    argv = None if argv is None else list(argv)
    p = Parser(prog="lbi-fx", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"lbi-fx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module_name, help_) in COMMANDS.items():
        add_command_parser(sub, name, module_name, help_, load=argv is None or argv[:1] == [name])
    b = sub.add_parser("bench", help="benchmarks: ratios against a baseline from the same run",
                       description="Benchmarks: each prints ratios against a baseline timed in "
                                   "the same run; bench NAME --help lists a bench's flags.")
    add_bench_parsers(b, selected_bench(argv))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from lbi_fx.failures import without_fx_dumps

    hush = (contextlib.nullcontext() if os.environ.get("LBI_FX_TRACEBACK")
            else without_fx_dumps())  # an error is its one-line message, no FX dump first
    subject: list[str] = []  # what warnings are about, once the flags are parsed
    with attributed_warnings(subject):
        try:
            with hush:
                args = build_parser(argv).parse_args(argv)
                subject += subject_of(args)
                return args.run(args)
        except SystemExit as exc:  # argparse: usage errors exit 2 already
            if isinstance(exc.code, str):  # sys.exit("message"): a one-line usage error
                print(" ".join(exc.code.split()), file=sys.stderr)
                return 2
            return int(exc.code or 0)
        except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not dump a traceback
            return report_error(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
