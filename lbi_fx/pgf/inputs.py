"""What the scans accept, checked once at the public entry points: real floating inputs
in mamba-ssm's shapes, a compute dtype of at least fp32, and a tile length (a number of
time steps) that cuts the sequence into the spans every pass walks.
"""

from __future__ import annotations

import math

import torch

from lbi_fx.errors import InputError

DEFAULT_TILE = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 (mamba-ssm's reference upcasts half inputs), but fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Shapes of the supported case; an ``InputError`` naming the argument otherwise."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("z", z), ("delta_bias", delta_bias)):
        if t is None and name in ("D", "z", "delta_bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise InputError(f"selective_scan: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InputError(f"selective_scan: {name} has dtype {t.dtype}; only real floating "
                             "point inputs are supported (complex A is not)")
    if u.dim() != 3:
        raise InputError(f"selective_scan: u has shape {tuple(u.shape)}; expected (batch, dim, "
                         "seqlen)")
    b, d, length = u.shape
    if A.dim() != 2 or A.size(0) != d:
        raise InputError(f"selective_scan: A has shape {tuple(A.shape)}; expected (dim, d_state) "
                         f"with dim = {d} from u")
    n = A.size(1)
    want = {"delta": (b, d, length), "z": (b, d, length), "B": (b, n, length),
            "C": (b, n, length), "D": (d,), "delta_bias": (d,)}
    for name, t in (("delta", delta), ("z", z), ("B", B), ("C", C), ("D", D),
                    ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != want[name]:
            hint = (" (only input-dependent B/C of shape (batch, d_state, seqlen) are "
                    "supported: expand a constant or grouped B/C to that shape)"
                    if name in ("B", "C") else "")
            raise InputError(f"selective_scan: {name} has shape {tuple(t.shape)}; expected "
                             f"{want[name]}{hint}")


def _check_tile(tile, length: int | None = None) -> int:
    if tile is None:
        return DEFAULT_TILE if length is None else max(1, min(DEFAULT_TILE, length))
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise InputError(f"tile={tile!r}: the tile is a number of time steps, an int >= 1")
    return tile


def _tiles(length: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, length)) for s in range(0, length, tile)]


def n_tiles(length: int, tile: int) -> int:
    """Number of tiles (and of saved boundary states) for a sequence of ``length`` steps."""
    return math.ceil(length / tile)
