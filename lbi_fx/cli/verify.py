"""``lbi-fx verify``: check the vertex-separator condition at every region boundary.

With --rank R: rewrite the model with lbi_fx.transform at rank R and check the rewrite;
with --dense or --interfaces: check the model as given; with no budget: report min cuts
only (exit 0). Exit 1 when a boundary fails.
"""

from __future__ import annotations

import argparse
import json

from lbi_fx.cli.common import (
    add_model_arguments,
    add_rewrite_arguments,
    interface_width,
    model_and_inputs,
    parse_interfaces,
    parse_leaf_modules,
    parse_rank,
    parse_relay,
    rewrite_kwargs,
)
from lbi_fx.errors import SeparatorError


def add_arguments(v: argparse.ArgumentParser) -> None:
    add_model_arguments(v)
    v.add_argument("--rank", help="interface rank r per row (an int, or one per boundary: "
                                  "8,8,16): check the bounded-interface rewrite at this rank")
    v.add_argument("--dense", action="store_true",
                   help="with --rank: check the model as given against R scalars per sample "
                        "instead of its rewrite (a dense model fails wherever its cut is wider)")
    v.add_argument("--interfaces", help="the model's own interfaces, checked as given: one "
                                        "module path or node per boundary, comma-separated "
                                        "(join several with +)")
    add_rewrite_arguments(v)
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--dot", metavar="FILE", help="write a Graphviz picture of the check")
    v.add_argument("--spl", action="store_true", help="check the stages of stage-partitioned "
                   "learning instead: edges cut, bypasses, shared parameters, locality")
    v.add_argument("--heads", default="shared", choices=["shared", "per-stage"],
                   help="with --spl: the head structure H")
    v.add_argument("--relay", default="0", help="with --spl: lambda in [0, 1], one or one "
                   "per boundary (0 detaches)")


def run(args: argparse.Namespace) -> int:
    """Check the rewrite at ``--rank``, or the model as given (``--dense``, ``--interfaces``),
    or, with no budget at all, report min cuts only and say so."""
    from lbi_fx.api import transform, verify

    model, example = model_and_inputs(args)
    if args.spl:  # stage-partitioned learning: edges cut, bypasses, shared parameters
        from lbi_fx.spl import stage_partition

        report = stage_partition(model, args.regions, example_inputs=example, heads=args.heads,
                                 relay=parse_relay(args.relay)).report()
        print(report.to_json() if args.json else report)
        return 0 if report.ok else 1
    rank = parse_rank(args.rank)
    if rank is not None and args.interfaces is None and not args.dense:
        try:
            lbi = transform(model, args.regions, rank, example_inputs=example,
                            **rewrite_kwargs(args))
        except SeparatorError as exc:  # the rewrite itself is not separated: a failing check
            if exc.report is None:
                raise
            report, checked = exc.report, "rewrite"
            what = f"the bounded-interface rewrite at rank {args.rank} (refused by transform)"
        else:
            report, checked = lbi.lbi_verify(example_inputs=example), "rewrite"
            what = f"the bounded-interface rewrite (lbi_fx.transform, {interface_width(lbi)})"
    else:
        report = verify(model, args.regions, example_inputs=example, rank=rank,
                        interfaces=parse_interfaces(args.interfaces),
                        leaf_modules=parse_leaf_modules(args.leaf_modules))
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
