"""lbi-fx command line; lbi-fx COMMAND --help lists the flags of each command.

Exit codes: 0 every boundary holds (or no budget was given: min cuts only), 1 a boundary
fails, 2 usage or spec error, 3 any other failure (each error is one line on stderr, no
traceback; LBI_FX_TRACEBACK=1 re-raises).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Sequence

from lbi_fx import __version__
from lbi_fx.errors import LBIError, SeparatorError
from lbi_fx.factory import UsageError, add_factory_kw, parse_factory_kw
from lbi_fx.factory import load_factory as _load_factory

__all__ = ["UsageError", "build_parser", "load_factory", "main"]


def load_factory(spec: str, kwargs: dict[str, object] | None = None):
    """``pkg.module:factory`` -> ``(model, example_inputs)``; see :mod:`lbi_fx.factory`."""
    return _load_factory(spec, kwargs)


def _model(args) -> tuple:
    """The model and example inputs a command's ``factory`` and ``--factory-kw`` name."""
    return load_factory(args.factory, parse_factory_kw(args.factory_kw))


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


def _rewrite_kwargs(args) -> dict:
    """The ``lbi_fx.transform`` options shared by ``verify --rank`` and ``inspect``."""
    return dict(encoder=args.encoder, pool=args.pool, segment_len=args.segment_len,
                max_len=args.max_len)


def _width(lbi) -> str:
    from lbi_fx.report import describe_width

    rows = lbi.segments.count if getattr(lbi, "segments", None) is not None else 1
    return describe_width([w // rows for w in lbi.ranks], rows)


def cmd_verify(args) -> int:
    """Check the rewrite at ``--rank``, or the model as given (``--dense``, ``--interfaces``),
    or, with no budget at all, report min cuts only and say so."""
    from lbi_fx.api import transform, verify

    model, example = _model(args)
    if args.spl:  # stage-partitioned learning: edges cut, bypasses, shared parameters
        from lbi_fx.spl import stage_partition

        report = stage_partition(model, args.regions, example_inputs=example, heads=args.heads,
                                 relay=_relay(args.relay)).report()
        print(report.to_json() if args.json else report)
        return 0 if report.ok else 1
    rank = _rank(args.rank)
    if rank is not None and args.interfaces is None and not args.dense:
        try:
            lbi = transform(model, args.regions, rank, example_inputs=example,
                            **_rewrite_kwargs(args))
        except SeparatorError as exc:  # the rewrite itself is not separated: a failing check
            if exc.report is None:
                raise
            report, checked = exc.report, "rewrite"
            what = f"the bounded-interface rewrite at rank {args.rank} (refused by transform)"
        else:
            report, checked = lbi.lbi_verify(example_inputs=example), "rewrite"
            what = f"the bounded-interface rewrite (lbi_fx.transform, {_width(lbi)})"
    else:
        report = verify(model, args.regions, example_inputs=example, rank=rank,
                        interfaces=_interfaces(args.interfaces))
        checked = "model" if rank is not None or args.interfaces is not None else "min cuts"
        what = ("the model as given, its own interfaces" if args.interfaces is not None
                else f"the model as given, against {report.budget_text()}" if rank is not None
                else "nothing: no budget given, min cuts only (--rank R checks the rewrite at "
                     "rank R; --rank R --dense the model as given)")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(report.to_dot())
    if args.json:
        print(json.dumps({"checked": checked, **report.to_dict()}, indent=2))
    else:
        print(f"lbi-fx verify: checked {what}")
        print(report)
    return 0 if report.ok else 1


def cmd_inspect(args) -> int:
    from lbi_fx.api import transform

    model, example = _model(args)
    lbi = transform(model, args.regions, _rank(args.rank), example_inputs=example,
                    jacobian=args.jacobian, **_rewrite_kwargs(args))
    # --explain alone prints the per-region choices only; --show adds the graphs
    what = args.show or ("none" if args.explain else "all")
    print(f"== {lbi.num_regions} regions, interfaces of {_width(lbi)}, pool {lbi.pool}")
    if args.explain:  # lbi.explain(): what FallbackWarnings from the command line point to
        print("== per-region choices of the scan backward (lbi.explain())")
        print(lbi.explain())
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


def plain(text: str) -> str:
    """Help text without reST markup: ``x`` -> x, so --help shows no raw backticks."""
    return re.sub(r"``([^`]*)``", r"\1", text)


def _doc_head(module) -> str:
    return plain((module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "))


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


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model a command works on: a factory, its keyword arguments, the region spec."""
    p.add_argument("factory", help="pkg.module:function returning (model, example_inputs), "
                                   "e.g. lbi_fx.models:gpt or mymodels:build (the current "
                                   "folder is importable)")
    add_factory_kw(p)
    p.add_argument("--regions", required=True,
                   help="'layers:2', 'a,b;c,d' or a composition 'layers=1,3,2'")


def _add_rewrite_arguments(p: argparse.ArgumentParser) -> None:
    """How ``lbi_fx.transform`` builds the interfaces (verify --rank and inspect)."""
    p.add_argument("--encoder", default="mlp", choices=["mlp", "linear"],
                   help="interface encoder Enc_k (default mlp)")
    p.add_argument("--pool", default="auto", choices=["auto", "causal", "mean", "last"],
                   help="how interfaces summarise the sequence (auto: causal for causal models)")
    p.add_argument("--segment-len", type=int, help="positions per causal segment "
                                                   "(default ceil(max_len / 4))")
    p.add_argument("--max-len", type=int, help="longest sequence of a causal interface "
                                               "(default: the example inputs' length)")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The lbi-fx parser; sub-commands with heavy imports load them only when ``argv``
    selects them (``argv=None``: load every one, e.g. to list all flags)."""
    argv = None if argv is None else list(argv)
    p = _Parser(prog="lbi-fx", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"lbi-fx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check the vertex-separator condition at every boundary",
                       description="Check the vertex-separator condition at every region "
                                   "boundary. With --rank R: rewrite the model with "
                                   "lbi_fx.transform at rank R and check the rewrite; with "
                                   "--dense or --interfaces: check the model as given; with "
                                   "no budget: report min cuts only (exit 0).")
    _add_model_arguments(v)
    v.add_argument("--rank", help="interface rank r per row (an int, or one per boundary: "
                                  "8,8,16): check the bounded-interface rewrite at this rank")
    v.add_argument("--dense", action="store_true",
                   help="with --rank: check the model as given against R scalars per sample "
                        "instead of its rewrite (a dense model fails wherever its cut is wider)")
    v.add_argument("--interfaces", help="the model's own interfaces, checked as given: one "
                                        "module path or node per boundary, comma-separated "
                                        "(join several with +)")
    _add_rewrite_arguments(v)
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--dot", metavar="FILE", help="write a Graphviz picture of the check")
    v.add_argument("--spl", action="store_true", help="check the stages of stage-partitioned "
                   "learning instead: edges cut, bypasses, shared parameters, locality")
    v.add_argument("--heads", default="shared", choices=["shared", "per-stage"],
                   help="with --spl: the head structure H")
    v.add_argument("--relay", default="0", help="with --spl: lambda in [0, 1], one or one "
                   "per boundary (0 detaches)")
    i = sub.add_parser("inspect", help="print the rewritten forward and generated backward graphs",
                       description="Rewrite the model with lbi_fx.transform and print its "
                                   "separator report, rewritten forward graph and generated "
                                   "backward graph.")
    _add_model_arguments(i)
    i.add_argument("--rank", default="16", help="interface rank r per row (an int, or one per "
                                                "boundary; default 16)")
    _add_rewrite_arguments(i)
    i.add_argument("--show", choices=["all", "forward", "backward", "report"],
                   help="what to print (default all; with --explain alone: nothing more)")
    i.add_argument("--explain", action="store_true",
                   help="print each region's Jacobian strategy, VJPs, what auto's probe found "
                        "unsupported and every fallback (lbi.explain())")
    i.add_argument("--jacobian", default="auto", choices=["auto", "reuse", "forward", "recompute"],
                   help="how region Jacobians are computed (default auto), as transform's "
                        "jacobian=")
    _add_command_parser(sub, "parity", "lbi_fx.parity",
                        "gradient-parity table over backends (the paper's Table 5)",
                        load=argv is None or argv[:1] == ["parity"])
    _add_command_parser(sub, "quality", "lbi_fx.quality",
                        "dense vs LBI language models, leak-free scores side by side",
                        load=argv is None or argv[:1] == ["quality"])
    _add_command_parser(sub, "spl", "lbi_fx.spl_cli",
                        "stage-partitioned learning vs BP and LBI: the root-bottleneck table",
                        load=argv is None or argv[:1] == ["spl"])
    _add_command_parser(sub, "plan", "lbi_fx.plan", "predict GPipe / 1F1B / LBI step times per "
                        "link rate from a profile", load=argv is None or argv[:1] == ["plan"])
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
