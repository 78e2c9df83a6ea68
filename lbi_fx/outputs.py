"""Which tensor of a model's output holds the scores: one rule for every helper that wants
logits (``lbi_fx.models.training``, ``lbi_fx.testing.prefix_loss``, the CLI's losses).

A model may return a tensor, a Hugging Face ``ModelOutput``, a dict, a tuple or list, or
any object with a ``.logits`` attribute. ``logits=`` picks the tensor:

- ``None`` (default): the output itself if it is a tensor; else its ``"logits"`` key or
  ``.logits`` attribute; else the first element of a tuple or list.
- a ``str``: that key of a mapping (a ``ModelOutput`` is one) or that attribute.
- an ``int``: that element of a tuple or list (or of ``ModelOutput.to_tuple()``).
- a callable: ``logits(output)``, whatever it returns.

Keys are read as keys: a ``ModelOutput``'s fields are its keys, so nothing here goes
through the attributes transformers keeps for deprecated names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Union

import torch

from lbi_fx.errors import InputError

Selector = Union[None, str, int, Callable[[object], torch.Tensor]]  # noqa: UP007 - py3.10 alias


def _describe(out: object) -> str:
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out.keys())}"
    if isinstance(out, (tuple, list)):
        kinds = [type(x).__name__ for x in out]
        return f"a {type(out).__name__} of {len(out)} ({', '.join(kinds[:6])})"
    return f"a {type(out).__name__}"


def select_output(out: object, logits: Selector = None, *, who: str = "select_output"
                  ) -> torch.Tensor:
    """The scores tensor of ``out`` as ``logits=`` selects it (module docstring); an
    ``InputError`` naming what the output holds when it has none there."""
    def refuse(why: str) -> InputError:
        return InputError(f"{who} cannot find the logits in the model's output ({_describe(out)}): "
                          f"{why}; pass logits= a key or attribute name, an index, or a "
                          "callable output -> tensor")

    if callable(logits) and not isinstance(logits, (str, int)):
        got = logits(out)
    elif logits is None:
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, Mapping):
            if "logits" not in out.keys():
                raise refuse("it has no 'logits' key")
            got = out["logits"]
        elif not isinstance(out, (tuple, list)) and hasattr(out, "logits"):
            got = out.logits
        elif isinstance(out, (tuple, list)) and out:
            got = out[0]
        else:
            raise refuse("it is neither a tensor nor holds one named 'logits'")
    elif isinstance(logits, bool) or not isinstance(logits, (str, int)):
        raise InputError(f"logits= takes a key or attribute name, an index or a callable, "
                         f"got {type(logits).__name__}")
    elif isinstance(logits, str):
        if isinstance(out, Mapping):
            if logits not in out.keys():
                raise refuse(f"no key {logits!r}")
            got = out[logits]
        elif hasattr(out, logits) and not isinstance(out, torch.Tensor):
            got = getattr(out, logits)
        else:
            raise refuse(f"no key or attribute {logits!r}")
    else:
        items = (out.to_tuple() if isinstance(out, Mapping) and hasattr(out, "to_tuple")
                 else list(out.values()) if isinstance(out, Mapping)
                 else out if isinstance(out, (tuple, list)) else None)
        if items is None:
            raise refuse(f"logits={logits} indexes a tuple or list")
        if not -len(items) <= logits < len(items):
            raise refuse(f"index {logits} is out of range")
        got = items[logits]
    if not isinstance(got, torch.Tensor):
        raise refuse(f"logits={logits!r} gives a {type(got).__name__}, not a tensor")
    return got
