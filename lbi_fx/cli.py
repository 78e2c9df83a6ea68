"""``lbi-fx`` command line: verify, inspect, bench.

Exit codes: 0 every boundary holds, 1 a boundary fails, 2 usage or spec error (one line
on stderr, no traceback).
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


def _interfaces(text: str | None):
    if text is None:
        return None
    return [[p for p in part.split("+") if p] for part in text.split(",")]


def cmd_verify(args) -> int:
    from lbi_fx.api import verify

    model, example = load_factory(args.factory)
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
    lbi = transform(model, args.regions, _rank(args.rank) or 16, example_inputs=example,
                    encoder=args.encoder, pool=args.pool)
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


def cmd_bench(args, rest: list[str]) -> int:
    if args.what == "scan":
        from lbi_fx.bench_scan import main as bench_scan

        return bench_scan(rest)
    if args.what == "step":
        from lbi_fx.bench_step import main as bench_step

        return bench_step(rest)
    if args.what == "comm":
        from lbi_fx.bench_comm import main as bench_comm

        return bench_comm(rest)
    raise UsageError(f"unknown benchmark {args.what!r}; available: scan, step, comm")


def _parity(rest: list[str]) -> int:
    """``lbi-fx parity``: the paper's Table 5 (examples/parity_table.py, from the repo root)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from examples.parity_table import main as parity_main
    except ImportError as exc:
        print(f"lbi-fx: error: parity needs the repository's examples/ ({exc}); run it from "
              "the repository root", file=sys.stderr)
        return 2
    return parity_main(rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lbi-fx", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check the vertex-separator condition at every boundary")
    v.add_argument("factory", help="pkg.module:function returning (model, example_inputs)")
    v.add_argument("--regions", required=True, help="'layers:2' or 'a,b;c,d'")
    v.add_argument("--rank", help="interface budget r (an int, or one per boundary: 8,8,16)")
    v.add_argument("--interfaces", help="one module path or node per boundary, comma-separated "
                                        "(join several with +)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--dot", metavar="FILE", help="write a Graphviz picture of the check")
    i = sub.add_parser("inspect", help="print the rewritten forward and generated backward graphs")
    i.add_argument("factory")
    i.add_argument("--regions", required=True)
    i.add_argument("--rank", default="16")
    i.add_argument("--encoder", default="mlp", choices=["mlp", "linear"])
    i.add_argument("--pool", default="mean", choices=["mean", "last"])
    i.add_argument("--show", default="all", choices=["all", "forward", "backward", "report"])
    sub.add_parser("parity", help="gradient-parity table over backends (the paper's Table 5)")
    b = sub.add_parser("bench", help="benchmarks: ratios against a baseline from the same run")
    b.add_argument("what", help="scan | step | comm")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] == "parity":
            return _parity(argv[1:])
        if argv and argv[0] == "bench":
            args, rest = parser.parse_known_args(argv)
            return cmd_bench(args, rest)
        args = parser.parse_args(argv)
        return {"verify": cmd_verify, "inspect": cmd_inspect}[args.command](args)
    except LBIError as exc:
        msg = " ".join(str(exc).split("\n")[0].split())
        print(f"lbi-fx: error: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: usage errors exit 2 already
        return int(exc.code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
