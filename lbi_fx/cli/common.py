"""What the sub-commands share: one-line usage errors, help text without markup, lazy
imports of heavy sub-commands, the model and rewrite flags, and their parsing."""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Sequence
from types import ModuleType

from lbi_fx.cli.factory import UsageError, add_factory_kw, load_factory, parse_factory_kw
from lbi_fx.errors import InputError


def model_and_inputs(args) -> tuple:
    """The model and example inputs a command's ``factory`` and ``--factory-kw`` name."""
    return load_factory(args.factory, parse_factory_kw(args.factory_kw))


def parse_rank(text: str | None):
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--rank {text!r}: expected an int or a comma-separated list of ints") from None
    return vals[0] if len(vals) == 1 else vals


def parse_relay(text: str):
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--relay {text!r}: expected a number or one per boundary, e.g. 0,0.5") from None
    return vals[0] if len(vals) == 1 else vals


def parse_interfaces(text: str | None):
    if text is None:
        return None
    return [[p for p in part.split("+") if p] for part in text.split(",")]


def rewrite_kwargs(args) -> dict:
    """The ``lbi_fx.transform`` options shared by ``verify --rank`` and ``inspect``: every
    keyword of ``transform`` but ``example_inputs`` (a refusal may advise any of them, so
    each has a flag; ``tests/test_cli_papercuts.py`` holds the two lists equal)."""
    return dict(encoder=args.encoder, pool=args.pool, segment_len=args.segment_len,
                max_len=args.max_len, canvas=args.canvas, jacobian=args.jacobian,
                chunk=args.chunk, leaf_modules=parse_leaf_modules(args.leaf_modules),
                scan_backend=args.scan_backend, check_finite=args.check_finite,
                decoder_init=args.decoder_init, interface_norm=args.interface_norm,
                canvas_weights=args.canvas_weights, summary=args.summary,
                decoder_window=args.decoder_window, decoder_at=args.decoder_at,
                seq_dim=parse_seq_dim(args.seq_dim))


def parse_seq_dim(text: str | None):
    """``--seq-dim``: one int for every input, or one per tensor input ('2' / '2,none')."""
    if text is None:
        return None
    parts = [p.strip().lower() for p in text.split(",")]
    try:
        vals = [None if p in ("none", "") else int(p) for p in parts]
    except ValueError:
        raise InputError(f"--seq-dim {text!r}: an int, or comma-separated ints / none, one "
                         "per tensor input (e.g. 2 or 1,none)") from None
    return vals[0] if len(vals) == 1 else vals


def parse_leaf_modules(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def interface_width(lbi) -> str:
    from lbi_fx.report import describe_width

    rows = lbi.segments.count if getattr(lbi, "segments", None) is not None else 1
    return describe_width([w // rows for w in lbi.ranks], rows)


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (sub-parsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def plain(text: str) -> str:
    """Help text without reST markup: ``x`` -> x, so --help shows no raw backticks."""
    return re.sub(r"``([^`]*)``", r"\1", text)


def doc_head(module) -> str:
    return plain((module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "))


def load_module(module_name: str, what: str):
    """Import a sub-command's module; a missing dependency is a one-line usage error."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{what} cannot run here: importing {module_name} failed ({exc})") from None


def add_command_parser(sub, name: str, module_name: str, help_: str, load: bool) -> None:
    """A top-level command whose module follows the bench contract (add_arguments, run)."""
    if not load:
        sub.add_parser(name, help=help_)
        return
    module = load_module(module_name, f"lbi-fx {name}")
    sp = sub.add_parser(name, help=help_, description=doc_head(module))
    module.add_arguments(sp)
    sp.set_defaults(run=module.run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model a command works on: a factory, its keyword arguments, the region spec."""
    p.add_argument("factory", help="pkg.module:function returning (model, example_inputs), "
                                   "e.g. lbi_fx.models:gpt or mymodels:build (the current "
                                   "folder is importable)")
    add_factory_kw(p)
    p.add_argument("--regions", required=True,
                   help="'layers:2', 'a,b;c,d' or a composition 'layers=1,3,2'")


def add_rewrite_arguments(p: argparse.ArgumentParser) -> None:
    """How ``lbi_fx.transform`` builds the interfaces (verify --rank and inspect)."""
    p.add_argument("--encoder", default="mlp", choices=["mlp", "linear"],
                   help="interface encoder Enc_k (default mlp)")
    p.add_argument("--pool", default="auto", choices=["auto", "causal", "mean", "last"],
                   help="how interfaces summarise the sequence (auto: causal for causal models)")
    p.add_argument("--segment-len", type=int, help="positions per causal segment "
                                                   "(default ceil(max_len / 4))")
    p.add_argument("--max-len", type=int, help="longest sequence of a causal interface "
                                               "(default: the example inputs' length)")
    from lbi_fx.interfaces import DECODER_INITS, NORMS, SUMMARIES
    from lbi_fx.kernels.ops import BACKENDS
    from lbi_fx.passes.decode_at_blocks import DECODER_AT
    from lbi_fx.passes.per_region_canvas import CANVAS_WEIGHTS
    from lbi_fx.runtime import STRATEGIES

    p.add_argument("--interface-norm", default="layer", choices=NORMS,
                   help="how m_k is normalised per row (default layer; rms or none for ranks "
                        "below 3), as transform's interface_norm=")
    p.add_argument("--summary", default="prefix", choices=SUMMARIES,
                   help="what a causal encoder row summarises (default prefix), as summary=")
    p.add_argument("--decoder-window", type=int, default=1,
                   help="rows of m_k each causal decoder reads (default 1), as decoder_window=")
    p.add_argument("--decoder-at", default="first", choices=DECODER_AT,
                   help="decode m_k before the first block of its region or before every "
                        "block (default first), as decoder_at=")
    p.add_argument("--canvas-weights", default="shared", choices=CANVAS_WEIGHTS,
                   help="one canvas for all regions, or per-region copies of its weights "
                        "(default shared), as canvas_weights=")
    p.add_argument("--decoder-init", default="default", choices=DECODER_INITS,
                   help="decoders start at their default init or at zero, as decoder_init=")
    p.add_argument("--canvas", help="the node or module path the interfaces decode onto "
                                    "(default: found from the graph), as canvas=")
    p.add_argument("--jacobian", default="auto", choices=STRATEGIES,
                   help="how region Jacobians are computed (default auto), as transform's "
                        "jacobian=")
    p.add_argument("--chunk", type=int, help="Jacobian rows per rerun (jacobian recompute), "
                                             "as chunk=")
    p.add_argument("--leaf-modules", metavar="PATHS",
                   help="comma-separated module paths kept opaque by the trace, as "
                        "leaf_modules=")
    p.add_argument("--scan-backend", default="auto", choices=BACKENDS,
                   help="suffix-scan kernel (default auto), as scan_backend=")
    p.add_argument("--check-finite", action="store_true",
                   help="refuse NaN / Inf in J_k and the adjoints, as check_finite=True")
    p.add_argument("--seq-dim", metavar="AXES",
                   help="the inputs' sequence axis where the graph cannot tell: one int, or "
                        "one per tensor input ('none' for an input without one), as seq_dim=")


def standalone(module: ModuleType, prog: str, argv: Sequence[str] | None) -> int:
    """``main`` of a sub-command module (``python -m``): its own parser, then ``run``."""
    doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("``", "")
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    module.add_arguments(parser)
    return module.run(parser.parse_args(None if argv is None else list(argv)))


def int_list(text: str, flag: str) -> list[int]:
    """A flag's comma-separated ints, each >= 1, first occurrences in order; else an
    ``InputError`` naming the flag and the value."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated ints, e.g. 1,2,4,8") from None
    if not out or min(out) < 1:
        raise InputError(f"{flag} {text!r}: expected ints >= 1")
    return list(dict.fromkeys(out))
