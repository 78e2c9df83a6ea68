"""Binding a call's arguments to the captured graph's inputs.

An exported capture fixes which inputs exist; a keyword it never saw would be dropped
silently, so it is refused by name with the ``example_inputs`` that would capture it.
"""

from __future__ import annotations

from torch.utils import _pytree as pytree

from lbi_fx.errors import InputError


class InputBinding:
    """Mixin of :class:`~lbi_fx.module.LBIModule`: flatten a call for the prologue."""

    def _flatten(self, args, kwargs) -> list:
        if self._pytree_info is not None:
            args, kwargs = self._bind(tuple(args), dict(kwargs))
            return pytree.arg_tree_leaves(*args, **kwargs)
        if kwargs:
            names = self._programs_spec.prologue.inputs
            bound = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
            return bound
        return list(args)

    def _bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """An exported model's call, as the original forward took it, put in the order of
        the capture's inputs (``in_spec``): keywords of captured parameters go to their
        positions. A keyword the capture did not include would be silently dropped (or
        shift the inputs), so it is refused by name, unless its value means "left out"."""
        spec = self._pytree_info.in_spec
        if spec is None:
            return args, kwargs
        n, keys = spec.child(0).num_children, list(spec.child(1).context or [])
        sig = getattr(self, "_signature", None) or {}
        none_at = set(sig.get("none_at", ()))
        if not kwargs and len(args) == n and not none_at:
            return args, kwargs
        names = list(self._pytree_info.orig_args)[:n]
        if len(args) > n:
            raise InputError(f"{len(args)} positional inputs given, but the model was captured "
                             f"with {n} ({', '.join(names)}): pass example_inputs with every "
                             "input the calls use, and transform again")
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in keys}
        bound, missing = list(args), []
        for i in range(len(args), n):
            bound.append(kwargs.pop(names[i], None))
            if bound[i] is None and i not in none_at:
                missing.append(names[i])
        for i in sorted(none_at):
            if i < n and bound[i] is not None:
                raise InputError(
                    f"{names[i]} was None in example_inputs, so the capture has no input for it "
                    f"and would ignore the value given: pass a {names[i]} in example_inputs "
                    "and transform again")
        if missing:
            raise InputError(f"{missing[0]} is missing: the model was captured with {missing[0]} "
                             "in example_inputs, so every call passes it")
        for key, value in kwargs.items():
            if key in names:
                raise InputError(f"{key}= given twice: by position and by keyword")
            if any(value is v for v in sig.get("absent", {}).get(key, ())):
                continue  # the default, as the capture ran
            raise InputError(self._uncaptured(key, names, none_at))
        return tuple(bound), given

    def _uncaptured(self, key: str, names: list[str], none_at: set[int]) -> str:
        """Why a keyword cannot reach the exported graph, and the example_inputs that would."""
        sig = getattr(self, "_signature", None) or {}
        params, absent = sig.get("params") or [], sig.get("absent", {})
        took = ", ".join(n for i, n in enumerate(names) if i not in none_at) or "nothing"
        text = (f"{key}= was not part of the capture: {sig.get('model', 'the model')} was "
                f"exported with example_inputs for {took} only, so its graph has no input for "
                f"{key} and would ignore it. ")
        if key in params:
            j = params.index(key)
            before = [names[i] if i < len(names) and i not in none_at else
                      ("None" if params[i] in absent else params[i]) for i in range(j)]
            return text + (f"Pass it in example_inputs at its place in forward(): "
                           f"example_inputs=({', '.join([*before, key])}), and transform again "
                           "(transform takes example inputs by position only)")
        return text + (f"forward has no positional parameter {key}, and transform takes example "
                       "inputs by position only: wrap the model in a module whose forward takes "
                       f"{key} by position")
