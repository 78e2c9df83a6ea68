"""``lbi-fx inspect``: rewrite the model with lbi_fx.transform and print its separator
report, rewritten forward graph and generated backward graph."""

from __future__ import annotations

import argparse

from lbi_fx.cli.common import (
    add_model_arguments,
    add_rewrite_arguments,
    interface_width,
    model_and_inputs,
    parse_rank,
    rewrite_kwargs,
)


def add_arguments(i: argparse.ArgumentParser) -> None:
    add_model_arguments(i)
    i.add_argument("--rank", default="16", help="interface rank r per row (an int, or one per "
                                                "boundary; default 16)")
    add_rewrite_arguments(i)
    i.add_argument("--show", choices=["all", "forward", "backward", "report"],
                   help="what to print (default all; with --explain alone: nothing more)")
    i.add_argument("--explain", action="store_true",
                   help="print each region's Jacobian strategy, VJPs, what auto's probe found "
                        "unsupported and every fallback (lbi.explain())")


def run(args: argparse.Namespace) -> int:
    from lbi_fx.api import transform

    model, example = model_and_inputs(args)
    lbi = transform(model, args.regions, parse_rank(args.rank), example_inputs=example,
                    **rewrite_kwargs(args))
    # --explain alone prints the per-region choices only; --show adds the graphs
    what = args.show or ("none" if args.explain else "all")
    print(f"== {lbi.num_regions} regions, interfaces of {interface_width(lbi)}, pool {lbi.pool}")
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
