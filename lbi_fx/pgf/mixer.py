"""Tiling whole models: ``tile_ssm`` swaps a mixer whose backward recomputes ``tile``
steps at a time into every Mamba-2 mixer, carrying the conv tail and the SSD state across
tiles. The tiled mixer is an FX leaf, so ``lbi_fx.transform`` can capture a tiled model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from lbi_fx.errors import InputError, RewriteError
from lbi_fx.pgf.inputs import DEFAULT_TILE, _check_tile, _tiles


def _mamba2():
    """The project's Mamba-2 model module (imported on first use of the Mamba-2 parts)."""
    from lbi_fx.models import mamba2

    return mamba2


def ssd_with_state(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, chunk_size: int, h0: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's chunked SSD scan from initial state ``h0``; returns ``(y, h_last)``.

    x: (b, T, g, k, p); dt: (b, T, g, k); A: (g, k); B, C: (b, T, g, n); h0, h_last:
    (b, g, k, p, n). ``y`` adds to the zero-state SSD output the carried-in state read out
    by C_t and decayed by ``exp(sum_{s<=t} dt_s A)``; the last state adds the tile's own
    contributions, each decayed by the sum of the log-decays after it (never a difference
    of prefix sums, so strong decay stays exact).
    """
    y = _mamba2().ssd(x, dt, A, B, C, chunk_size)
    a = dt * A  # (b, T, g, k)
    into = torch.exp(a.cumsum(1))
    y = y + torch.einsum("btgn,bgkpn->btgkp", C, h0) * into.unsqueeze(-1)
    later = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1).flip(1).cumsum(1).flip(1)
    own = torch.einsum("btgk,btgkp,btgn->bgkpn", torch.exp(later) * dt, x, B)
    return y, into[:, -1, :, :, None, None] * h0 + own


def _mixer_tile(m, u, tail, h0):
    """One tile of ``Mamba2Mixer.forward`` from a conv tail and an SSD state.

    tail: the last ``d_conv - 1`` conv inputs before the tile (zeros before the first);
    returns (out, next tail, last state). Same maths as the mixer's own forward.
    """
    z, xBC, dt = m.project(u)
    full = torch.cat([tail, xBC], 1)
    next_tail = full[:, full.size(1) - tail.size(1):]
    xBC = F.silu(m._causal_conv(full, full.size(1))[:, tail.size(1):])
    x, dt, A, B, C = m.ssm_inputs(xBC, dt)
    y, h = ssd_with_state(x, dt, A, B, C, m.chunk_size, h0)
    return m.output(y, x, z), next_tail, h


class _TiledMixer(torch.autograd.Function):
    """Mixer forward tile by tile; saves u, one conv tail and one SSD state per tile;
    backward reruns each tile under autograd, last tile first, chaining the adjoints of
    the state and the tail into the tile before."""

    @staticmethod
    def forward(ctx, mixer, tile, u, *params):
        b, length, _ = u.shape
        g, k = mixer.ngroups, mixer.nheads // mixer.ngroups
        conv_dim = mixer.conv1d.weight.size(0)
        tail = u.new_zeros(b, mixer.d_conv - 1, conv_dim)
        h = u.new_zeros(b, g, k, mixer.headdim, mixer.d_state)
        outs, tails, states = [], [], []
        for s, e in _tiles(length, tile):
            tails.append(tail)
            states.append(h)
            out, tail, h = _mixer_tile(mixer, u[:, s:e], tail, h)
            outs.append(out)
        ctx.save_for_backward(u, torch.stack(tails), torch.stack(states), *params)
        ctx.mixer, ctx.spans = mixer, _tiles(length, tile)
        ctx.names = [n for n, _ in mixer.named_parameters()]  # the order of ``params``
        ctx.autocast = _autocast_state(u.device.type)
        return torch.cat(outs, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        u, tails, states, *saved = ctx.saved_tensors  # raises if a parameter was modified
        # The reruns read fresh leaves in place of the parameters the forward was given
        # (they may be a caller's aliases, e.g. lbi-fx's region parameters): gradients go
        # to those inputs, and no parameter hook runs inside this backward.
        params = [p.detach().requires_grad_(p.requires_grad) for p in saved]
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        g_params = [None] * len(params)
        g_u = torch.empty_like(u)
        g_h = g_tail = None
        for i in reversed(range(len(ctx.spans))):
            s, e = ctx.spans[i]
            u_i = u[:, s:e].detach().requires_grad_()
            tail = tails[i].detach().requires_grad_()
            h0 = states[i].detach().requires_grad_()
            with torch.enable_grad(), torch.autocast(**ctx.autocast), \
                    _reparametrize_module(ctx.mixer, dict(zip(ctx.names, params))):
                out, next_tail, h = _mixer_tile(ctx.mixer, u_i, tail, h0)
            outs, cots = [out], [g_out[:, s:e]]
            if g_h is not None:
                outs += [h, next_tail]
                cots += [g_h, g_tail]
            grads = torch.autograd.grad(outs, [u_i, tail, h0] + [params[j] for j in trainable],
                                        cots, allow_unused=True)
            g_u[:, s:e], g_tail, g_h = grads[0], _zero_if_none(grads[1], tail), \
                _zero_if_none(grads[2], h0)
            for j, g in zip(trainable, grads[3:]):
                if g is not None:
                    g_params[j] = g if g_params[j] is None else g_params[j] + g
        return (None, None, g_u, *g_params)


def _zero_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _autocast_state(device_type: str) -> dict:
    """Keyword arguments that re-enter the caller's autocast state (for the recompute)."""
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)
    return {"device_type": device_type, "dtype": dtype, "enabled": enabled}


def _mixer_base() -> type:
    return _mamba2().Mamba2Mixer


class TiledMamba2Mixer(_mixer_base()):
    """A ``Mamba2Mixer`` whose backward recomputes ``tile`` steps at a time, in reverse.

    Same parameters (the very same tensors, same names), same outputs; memory kept for
    backward: the input, one SSD state and one conv tail per tile. ``lbi_fx_leaf`` keeps
    it one opaque node when lbi-fx traces a model (its custom autograd op has no FX form).
    """

    lbi_fx_leaf = True

    @classmethod
    def from_mixer(cls, mixer: nn.Module, tile: int) -> TiledMamba2Mixer:
        new = cls.__new__(cls)
        new.__dict__.update(mixer.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            new.__dict__[key] = mixer.__dict__[key].copy()
        new.tile = tile
        return new

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (b, T, d_model) -> (b, T, d_model), tile by tile."""
        if u.dim() != 3:
            raise InputError(f"TiledMamba2Mixer: input has shape {tuple(u.shape)}; expected "
                             "(batch, seqlen, d_model)")
        return _TiledMixer.apply(self, self.tile, u, *self.parameters())

    def extra_repr(self) -> str:
        return f"tile={self.tile}"


def tile_ssm(model: nn.Module, *, tile: int = DEFAULT_TILE) -> nn.Module:
    """Swap :class:`TiledMamba2Mixer` in for every Mamba-2 mixer of ``model`` (in place).

    Parameters are shared, not copied, so optimisers and state dicts are unaffected.
    Returns the model (a new module when ``model`` itself is a mixer). Mixers already
    tiled get the new tile. mamba-ssm's fused ``Mamba2`` cannot be tiled here: build the
    model with ``backend="torch"``.
    """
    tile = _check_tile(tile)
    if not isinstance(model, nn.Module):
        raise InputError(f"tile_ssm: expected an nn.Module, got {type(model).__name__}")
    base = _mixer_base()
    if isinstance(model, base):
        return TiledMamba2Mixer.from_mixer(model, tile)
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, TiledMamba2Mixer):
                child.tile = tile
                swapped += 1
            elif isinstance(child, base):
                setattr(parent, name, TiledMamba2Mixer.from_mixer(child, tile))
                swapped += 1
            elif type(child).__module__.startswith("mamba_ssm") and "Mamba" in type(
                    child).__name__:
                raise RewriteError(
                    f"tile_ssm: {path} is {type(child).__module__}.{type(child).__name__}, "
                    "whose fused kernels cannot be tiled here; build the model with "
                    "backend='torch' (lbi_fx.models.mamba2.Mamba2Mixer)")
    if not swapped:
        raise InputError(f"tile_ssm: {type(model).__name__} has no Mamba2Mixer "
                         "(lbi_fx.models.mamba2) to tile")
    return model
