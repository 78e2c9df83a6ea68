"""``lbi-fx`` command line; `lbi-fx COMMAND --help` lists the flags of each command.

Exit codes: 0 every boundary holds, 1 a boundary fails, 2 usage or spec error, 3 any other
failure (each error is one line on stderr, no traceback; LBI_FX_TRACEBACK=1 re-raises).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from lbi_fx.errors import LBIError


class UsageError(LBIError):
    """Bad command-line input: reported on one line, exit status 2."""


def load_factory(spec: str):
    """``pkg.module:factory`` -> ``(model, example_inputs)``."""
    if ":" not in spec:
        raise UsageError(f"factory {spec!r} must look like pkg.module:function")
    mod_name, _, fn_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {mod_name!r} for factory {spec!r}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"module {mod_name!r} has no callable {fn_name!r}")
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - any failure of user code is a usage error here
        raise UsageError(f"factory {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise UsageError(
            f"factory {spec!r} must return (model, example_inputs), got {type(result).__name__}"
        )
    model, example = result
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"factory {spec!r} returned {type(model).__name__} as the model, not an nn.Module")
    if isinstance(example, torch.Tensor):
        example = (example,)
    if not isinstance(example, (tuple, list)):
        raise UsageError(f"factory {spec!r} must return example_inputs as a tuple")
    return model, tuple(example)


def _rank(text: str | None):
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--rank {text!r}: expected an int or a comma-separated list of ints") from None
    return vals[0] if len(vals) == 1 else vals


def _relay(text: str):
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--relay {text!r}: expected a number or one per boundary, e.g. 0,0.5") from None
    return vals[0] if len(vals) == 1 else vals


def _interfaces(text: str | None):
    if text is None:
        return None
    return [[p for p in part.split("+") if p] for part in text.split(",")]


def cmd_verify(args) -> int:
    from lbi_fx.api import verify

    model, example = load_factory(args.factory)
    if args.spl:  # stage-partitioned learning: edges cut, bypasses, shared parameters
        from lbi_fx.spl import stage_partition

        report = stage_partition(model, args.regions, example_inputs=example, heads=args.heads,
                                 relay=_relay(args.relay)).report()
        print(report.to_json() if args.json else report)
        return 0 if report.ok else 1
    report = verify(model, args.regions, example_inputs=example, rank=_rank(args.rank),
                    interfaces=_interfaces(args.interfaces))
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(report.to_dot())
    print(report.to_json() if args.json else report)
    return 0 if report.ok else 1


def cmd_inspect(args) -> int:
    from lbi_fx.api import transform

    model, example = load_factory(args.factory)
    lbi = transform(model, args.regions, _rank(args.rank), example_inputs=example,
                    encoder=args.encoder, pool=args.pool, segment_len=args.segment_len,
                    max_len=args.max_len)
    what = args.show
    if what in ("all", "report"):
        print("== separator report of the rewritten model")
        print(lbi.lbi_verify(example_inputs=example))
    if what in ("all", "forward"):
        print("== rewritten forward graph (place of each node in brackets)")
        gm = lbi.rewritten_graph
        for node in gm.graph.nodes:
            place = node.meta.get("lbi_place")
            tag = ("prologue" if place == -1 else "epilogue" if place == lbi.num_regions
                   else f"region {place}")
            print(f"  [{tag:>9}] {node.format_node()}")
    if what in ("all", "backward"):
        print("== generated backward graph (Algorithm 1)")
        print(lbi.backward_graph.code)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (sub-parsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def _doc_head(module) -> str:
    return (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


def _load(module_name: str, what: str):
    """Import a sub-command's module; a missing dependency is a one-line usage error."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{what} cannot run here: importing {module_name} failed ({exc})") from None


def _add_bench_parsers(b: argparse.ArgumentParser, selected: str | None) -> None:
    """One sub-parser per entry of ``lbi_fx.bench.BENCHES``, each with its own flags.

    Only the bench named by ``selected`` (every bench when ``selected`` is None, for
    ``lbi-fx bench --help``) is imported; the others get a bare parser, so running one
    bench never imports the others' dependencies.
    """
    from lbi_fx.bench import BENCHES

    bsub = b.add_subparsers(dest="what", required=True, metavar="{" + ",".join(BENCHES) + "}")
    for name, module_name in BENCHES.items():
        if selected is not None and name != selected:
            bsub.add_parser(name)
            continue
        module = _load(f"lbi_fx.bench.{module_name}", f"lbi-fx bench {name}")
        sp = bsub.add_parser(name, help=_doc_head(module).split(":", 1)[-1].strip(),
                             description=_doc_head(module))
        module.add_arguments(sp)
        sp.set_defaults(run=module.run)


def _add_command_parser(sub, name: str, module_name: str, help_: str, load: bool) -> None:
    """A top-level command whose module follows the bench contract (add_arguments, run)."""
    if not load:
        sub.add_parser(name, help=help_)
        return
    module = _load(module_name, f"lbi-fx {name}")
    sp = sub.add_parser(name, help=help_, description=_doc_head(module))
    module.add_arguments(sp)
    sp.set_defaults(run=module.run)


def _selected_bench(argv: list[str] | None) -> str | None:
    """The bench whose module ``argv`` needs: its name, "" for none, None for every one."""
    if argv is None:
        return None
    if argv[:1] != ["bench"]:
        return ""
    return argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``lbi-fx`` parser; sub-commands with heavy imports load them only when ``argv``
    selects them (``argv=None``: load every one, e.g. to list all flags)."""
    argv = None if argv is None else list(argv)
    p = _Parser(prog="lbi-fx", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check the vertex-separator condition at every boundary")
    v.add_argument("factory", help="pkg.module:function returning (model, example_inputs)")
    v.add_argument("--regions", required=True,
                   help="'layers:2', 'a,b;c,d' or a composition 'layers=1,3,2'")
    v.add_argument("--rank", help="interface budget r (an int, or one per boundary: 8,8,16)")
    v.add_argument("--interfaces", help="one module path or node per boundary, comma-separated "
                                        "(join several with +)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--dot", metavar="FILE", help="write a Graphviz picture of the check")
    v.add_argument("--spl", action="store_true", help="check the stages of stage-partitioned "
                   "learning instead: edges cut, bypasses, shared parameters, locality")
    v.add_argument("--heads", default="shared", choices=["shared", "per-stage"],
                   help="with --spl: the head structure H")
    v.add_argument("--relay", default="0", help="with --spl: lambda in [0, 1], one or one "
                   "per boundary (0 detaches)")
    i = sub.add_parser("inspect", help="print the rewritten forward and generated backward graphs")
    i.add_argument("factory")
    i.add_argument("--regions", required=True)
    i.add_argument("--rank", default="16")
    i.add_argument("--encoder", default="mlp", choices=["mlp", "linear"])
    i.add_argument("--pool", default="auto", choices=["auto", "causal", "mean", "last"],
                   help="how interfaces summarise the sequence (auto: causal for causal models)")
    i.add_argument("--segment-len", type=int, help="positions per causal segment "
                                                   "(default ceil(max_len / 4))")
    i.add_argument("--max-len", type=int, help="longest sequence of a causal interface "
                                               "(default: the example inputs' length)")
    i.add_argument("--show", default="all", choices=["all", "forward", "backward", "report"])
    _add_command_parser(sub, "parity", "lbi_fx.parity",
                        "gradient-parity table over backends (the paper's Table 5)",
                        load=argv is None or argv[:1] == ["parity"])
    _add_command_parser(sub, "quality", "lbi_fx.quality",
                        "dense vs LBI language models, leak-free scores side by side",
                        load=argv is None or argv[:1] == ["quality"])
    _add_command_parser(sub, "spl", "lbi_fx.spl_cli",
                        "stage-partitioned learning vs BP and LBI: the root-bottleneck table",
                        load=argv is None or argv[:1] == ["spl"])
    b = sub.add_parser("bench", help="benchmarks: ratios against a baseline from the same run",
                       description="Benchmarks: each prints ratios against a baseline timed in "
                                   "the same run; bench NAME --help lists a bench's flags.")
    _add_bench_parsers(b, _selected_bench(argv))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        if getattr(args, "run", None) is not None:  # bench and parity: their module's run()
            return args.run(args)
        return {"verify": cmd_verify, "inspect": cmd_inspect}[args.command](args)
    except LBIError as exc:
        msg = " ".join(str(exc).split("\n")[0].split())
        print(f"lbi-fx: error: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: usage errors exit 2 already
        if isinstance(exc.code, str):  # sys.exit("message"): a one-line usage error
            print(" ".join(exc.code.split()), file=sys.stderr)
            return 2
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not dump a traceback
        if os.environ.get("LBI_FX_TRACEBACK"):
            raise
        msg = " ".join(str(exc).split("\n")[0].split())
        print(f"lbi-fx: error: {type(exc).__name__}: {msg} (LBI_FX_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
