"""Tiled exact differentiation of selective state space models (``lbi_fx.pgf``).

Phase Gradient Flow (``../shared/seeds/003_…txt``) in lbi-fx terms: a tile of time steps
is a region and the SSM state it hands to the next tile is its interface. The state
separates the past from the future, so a backward pass can run tile by tile in reverse
from the states saved at tile boundaries, and a forward-mode pass can stream tile by
tile keeping only the current state and its tangent.

Selective scan (mamba-ssm's ``selective_scan_ref`` semantics, real ``A``, input-dependent
``B`` and ``C``)::

    dt_t = softplus(delta_t + delta_bias)   (or delta_t + delta_bias)    (b, d, l)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t u_t B_t                           (b, d, n)
    y_t  = sum_n C_t h_t;   out_t = (y_t + D u_t) * silu(z_t)

* :func:`selective_scan` (``reverse_mode``): a custom ``autograd.Function``. Forward saves
  the inputs and one state per tile; backward recomputes each tile, in reverse, and runs
  the adjoint recurrence ``lam_t = C_t g_t + exp(a_{t+1}) lam_{t+1}`` analytically
  (``tile``), so no autograd graph of a tile is ever built.
* :func:`selective_scan_jvp` (``forward_mode``): forward-mode sensitivities streamed tile
  by tile.
* :func:`selective_scan_ref` (``reference``): a per-step reference loop, the ground truth
  of the tests and the paper's autograd baseline.
* :func:`tile_ssm` (``mixer``): swaps a tiled, reverse-recomputing backward into every
  Mamba-2 mixer of a model (conv tail and SSD state carried across tiles); the tiled
  mixer is an FX leaf for ``lbi_fx.transform``.

Inside a tile every recurrence is a log-depth scan (``scan``); ``inputs`` holds the
shape, dtype and tile checks the entry points share.
"""

from lbi_fx.pgf.forward_mode import selective_scan_jvp
from lbi_fx.pgf.inputs import DEFAULT_TILE, n_tiles
from lbi_fx.pgf.mixer import TiledMamba2Mixer, ssd_with_state, tile_ssm
from lbi_fx.pgf.reference import selective_scan_ref
from lbi_fx.pgf.reverse_mode import selective_scan
from lbi_fx.pgf.scan import linear_scan
from lbi_fx.pgf.tile import tile_forward

__all__ = [
    "DEFAULT_TILE",
    "TiledMamba2Mixer",
    "linear_scan",
    "n_tiles",
    "selective_scan",
    "selective_scan_jvp",
    "selective_scan_ref",
    "ssd_with_state",
    "tile_forward",
    "tile_ssm",
]
