"""Model factories for the command line: ``pkg.module:function`` -> ``(model, example_inputs)``.

Every command that takes a model (``verify``, ``inspect``, ``parity``, ``bench step``) loads
it here, so all of them accept the same specs and the same repeatable ``--factory-kw
key=value`` keyword arguments (values read as Python literals where they parse as one).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from lbi_fx.errors import LBIError


class UsageError(LBIError):
    """Bad command-line input: reported on one line, exit status 2."""


def parse_factory_kw(items: Sequence[str] | None) -> dict[str, object]:
    """``["n_layer=2", "name=gpt"]`` -> ``{"n_layer": 2, "name": "gpt"}``: a value that is a
    Python literal (int, float, bool, None, tuple, ...) is that literal, anything else a
    string, so shell quoting is never needed for plain words."""
    out: dict[str, object] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--factory-kw {item!r}: expected KEY=VALUE with KEY a Python name")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def add_factory_kw(parser: argparse.ArgumentParser) -> None:
    """The ``--factory-kw KEY=VALUE`` flag (repeatable) of every command that loads a model."""
    parser.add_argument("--factory-kw", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the factory, repeatable (values are Python "
                             "literals where they parse, else strings): --factory-kw n_layer=2")


def resolve_factory(spec: str) -> Callable:
    """The callable ``pkg.module:factory`` names. The current folder is importable (as for
    ``python -m``), so a user's own module works without installing it."""
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
    return fn


def load_factory(spec: str, kwargs: dict[str, object] | None = None):
    """``pkg.module:factory`` called with ``kwargs`` -> ``(model, example_inputs)``; every
    way the spec or the factory can fail is a ``UsageError`` naming the spec."""
    fn = resolve_factory(spec)
    try:
        result = fn(**(kwargs or {}))
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


def training_loss(out, inputs: Sequence[object], generator=None) -> Callable[[object], object]:
    """A loss for timing or checking any factory's model: cross-entropy on random targets
    when ``out`` (or its ``logits``: a ``ModelOutput``, dict or tuple, as
    :func:`lbi_fx.outputs.select_output` reads it) looks like LM logits (B, T, V) over
    integer ids (B, T), else ``lbi_fx.checks.default_loss`` (a fixed random projection of
    every floating output)."""
    import torch
    import torch.nn.functional as F

    from lbi_fx.checks import default_loss
    from lbi_fx.errors import InputError
    from lbi_fx.outputs import select_output

    try:
        scores = select_output(out)
    except InputError:
        return default_loss
    ids = inputs[0] if inputs else None
    if (scores.dim() == 3 and scores.dtype.is_floating_point
            and isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point
            and tuple(ids.shape) == tuple(scores.shape[:2])):
        targets = torch.randint(0, scores.shape[-1], tuple(ids.shape), generator=generator)
        targets = targets.to(scores.device)
        return lambda o: F.cross_entropy(select_output(o).flatten(0, 1).float(),
                                         targets.flatten())
    return default_loss
