"""``lbi-fx bench NAME``: one sub-parser per entry of :data:`lbi_fx.bench.BENCHES`."""

from __future__ import annotations

import argparse

from lbi_fx.cli.common import doc_head, load_module


def add_bench_parsers(b: argparse.ArgumentParser, selected: str | None) -> None:
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
        module = load_module(f"lbi_fx.bench.{module_name}", f"lbi-fx bench {name}")
        sp = bsub.add_parser(name, help=doc_head(module).split(":", 1)[-1].strip(),
                             description=doc_head(module))
        module.add_arguments(sp)
        sp.set_defaults(run=module.run)



def selected_bench(argv: list[str] | None) -> str | None:
    """The bench whose module ``argv`` needs: its name, "" for none, None for every one."""
    if argv is None:
        return None
    if argv[:1] != ["bench"]:
        return ""
    return argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None
