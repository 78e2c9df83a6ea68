"""A byte-level Mamba-2 language model, written to be rewritten by lbi-fx.

One file, in the spirit of nanoGPT. Blocks are pre-norm residual, ``x = x + mixer(norm(x))``
with RMSNorm, as in mamba-ssm's ``MambaLMHeadModel``.

The mixer has two implementations with the same parameter names, shapes and maths:

* ``mamba_ssm.Mamba2`` (fused Triton/CUDA kernels), used on CUDA when mamba-ssm
  imports. FX cannot trace its kernels, so pass ``leaf_modules=leaf_modules(model)`` to
  ``lbi_fx.transform``; the block then stays one opaque node.
* :class:`Mamba2Mixer`, our pure-PyTorch SSD (state space duality) mixer, used
  everywhere else. It traces with ``torch.fx.symbolic_trace`` (no Python loop over time,
  no factory call that takes a traced size), so lbi-fx never needs its export fallback;
  ``torch.export`` with dynamic batch and sequence sizes captures it as well.

Mixer maths (Mamba-2, Dao & Gu 2024), per head h with scalar decay ``A_h < 0``::

    [z, x, B, C, dt] = in_proj(u)
    [x, B, C] = silu(causal_depthwise_conv1d([x, B, C]))
    dt = softplus(dt + dt_bias);  A = -exp(A_log)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T         (h_t: headdim x d_state)
    y_t = h_t C_t + D x_t
    out = out_proj(rmsnorm_grouped(y * silu(z)) * norm.weight)

B and C are shared by the ``nheads / ngroups`` heads of a group. The recurrence is
evaluated with the chunked SSD algorithm: inside a chunk of ``chunk_size`` steps as a
masked, decay-weighted ``C B^T`` product (quadratic in the chunk, like attention); across
chunks through the chunk-end states. Every operation is per sample, so samples in a
batch never mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Mamba2Config:
    vocab_size: int = 256  # bytes
    n_layer: int = 4
    d_model: int = 64
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    headdim: int = 16
    ngroups: int = 1
    chunk_size: int = 64
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    bias: bool = False  # in_proj / out_proj biases
    conv_bias: bool = True
    norm_eps: float = 1e-5
    tie_weights: bool = True

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim


def mamba_ssm_available() -> bool:
    """True when ``mamba_ssm.Mamba2`` imports (it needs CUDA builds of its kernels)."""
    try:
        from mamba_ssm import Mamba2  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a CUDA/driver error at import
        return False
    return True


def leaf_modules(model: nn.Module) -> tuple[type, ...]:
    """Module types lbi-fx must keep opaque in ``model``: the outermost mamba-ssm blocks
    (``Mamba2``, ``Mamba3``), whose kernels FX cannot trace. Empty on the pure-torch path."""
    found: set[type] = set()

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if type(child).__module__.startswith("mamba_ssm"):
                found.add(type(child))  # its own children are hidden inside the leaf
            else:
                walk(child)

    walk(model)
    return tuple(sorted(found, key=lambda t: t.__qualname__))


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., t, s] = a[..., s+1] + ... + a[..., t]`` for s <= t, ``-inf`` above.

    ``exp(segsum(dt * A))`` is the decay from step s to step t. Summing the masked
    increments (rather than subtracting two cumulative sums) keeps every entry exact to
    the rounding of its own terms, however long the prefix.
    """
    n = a.size(-1)
    ones = a.new_ones(n, n)
    strictly_below = ones.tril(-1)  # [k, s] = 1 where k > s
    terms = a.unsqueeze(-1) * strictly_below  # [..., k, s] = a_k for k > s
    out = terms.cumsum(-2)  # [..., t, s] = sum_{s < k <= t} a_k
    return out.masked_fill(ones.tril() == 0, float("-inf"))


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Chunked SSD scan without the D skip.

    x: (b, T, g, k, p) with heads split as (group, head in group); dt: (b, T, g, k) after
    softplus; A: (g, k), negative; B, C: (b, T, g, n). Returns y: (b, T, g, k, p).
    The sequence is zero-padded to a multiple of ``chunk_size``; padded steps come after
    every real step, so causality keeps them out of the result.
    """
    T = x.size(1)
    pad = (-T) % chunk_size
    u = x * dt.unsqueeze(-1)  # dt_s x_s, the input of step s
    a = dt * A  # log-decay of each step
    u = F.pad(u, (0, 0, 0, 0, 0, 0, 0, pad)).unflatten(1, (-1, chunk_size))  # (b,c,l,g,k,p)
    a = F.pad(a, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, chunk_size))  # (b,c,l,g,k)
    B = F.pad(B, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, chunk_size))  # (b,c,l,g,n)
    C = F.pad(C, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, chunk_size))

    a = a.permute(0, 1, 3, 4, 2)  # (b,c,g,k,l)
    seg = segsum(a)  # (b,c,g,k,l,s)
    # 1. inside each chunk: y_t += sum_{s<=t} (C_t . B_s) decay(s->t) u_s
    scores = torch.einsum("bclgn,bcsgn->bcgls", C, B)
    weights = scores.unsqueeze(3) * torch.exp(seg)  # (b,c,g,k,l,s)
    y = torch.einsum("bcgkls,bcsgkp->bclgkp", weights, u)
    # 2. state each chunk leaves behind on its own: sum_s decay(s->end) u_s B_s^T
    to_end = torch.exp(seg[..., -1, :])  # (b,c,g,k,s)
    local = torch.einsum("bcgks,bcsgn,bcsgkp->bcgkpn", to_end, B, u)
    # 3. across chunks: state at the end of chunk j = sum_{i<=j} decay(i->j) local_i,
    #    and chunk j starts from the state at the end of chunk j-1 (zero for j = 0).
    totals = a.sum(-1).permute(0, 2, 3, 1)  # (b,g,k,c): log-decay over a whole chunk
    ends = torch.einsum("bgkji,bigkpn->bjgkpn", torch.exp(segsum(totals)), local)
    starts = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)
    # 4. the carried-in state, decayed to each step and read out by C_t
    from_start = torch.exp(a.cumsum(-1)).permute(0, 1, 4, 2, 3)  # (b,c,l,g,k)
    y = y + torch.einsum("bclgn,bcgkpn->bclgkp", C, starts) * from_start.unsqueeze(-1)
    return y.flatten(1, 2)[:, :T]


class GatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z)) * weight``, normalised over groups of ``group_size``.

    This is mamba-ssm's ``RMSNormGated`` with ``norm_before_gate=False``, the Mamba-2
    default: the gate is applied before normalising.
    """

    def __init__(self, d: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = (y * F.silu(z)).unflatten(-1, (-1, self.group_size))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.flatten(-2) * self.weight


class Mamba2Mixer(nn.Module):
    """Pure-PyTorch Mamba-2 mixer; parameters named and shaped as in ``mamba_ssm.Mamba2``.

    in_proj.weight (2*d_inner + 2*ngroups*d_state + nheads, d_model), conv1d (depthwise
    over x, B, C), dt_bias, A_log, D (nheads,), norm.weight (d_inner,), out_proj.weight.
    A state dict loads into ``mamba_ssm.Mamba2(d_model, d_state, d_conv, expand=expand,
    headdim, ngroups)`` and back.
    """

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        assert cfg.d_inner % cfg.headdim == 0, "expand * d_model must be a multiple of headdim"
        assert cfg.nheads % cfg.ngroups == 0, "nheads must be a multiple of ngroups"
        self.d_inner, self.nheads, self.headdim = cfg.d_inner, cfg.nheads, cfg.headdim
        self.ngroups, self.d_state, self.chunk_size = cfg.ngroups, cfg.d_state, cfg.chunk_size
        self.dt_limit = tuple(cfg.dt_limit)
        self.d_conv = cfg.d_conv
        conv_dim = self.d_inner + 2 * cfg.ngroups * cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, conv_dim + self.d_inner + self.nheads, bias=cfg.bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.d_conv, groups=conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        # Initialisation as in mamba-ssm: dt log-uniform in [dt_min, dt_max], stored
        # through the inverse softplus; A uniform in A_init_range, stored as log.
        dt = torch.exp(torch.rand(self.nheads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(*cfg.A_init_range).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // cfg.ngroups, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=cfg.bias)

    def _causal_conv(self, v: torch.Tensor, T: int) -> torch.Tensor:
        """Depthwise causal conv over time of v: (b, T, channels), with conv1d's weights.

        ``out_t = bias + sum_j w_j v_{t-K+1+j}``, what ``conv1d`` (padding K-1, first T
        outputs) computes, written as K shifted multiply-adds. mamba-ssm also hands these
        weights to a kernel rather than calling the module; here it avoids CPU
        ``conv1d``'s slow one-group-per-channel path (about 0.2 s a call in fp64 on our
        2-core machine, for a (2, 96, 16) input).
        """
        w = self.conv1d.weight.squeeze(1)  # (channels, K)
        vp = F.pad(v, (0, 0, self.d_conv - 1, 0))
        out = vp[:, 0:T] * w[:, 0]
        for j in range(1, self.d_conv):
            out = out + vp[:, j:j + T] * w[:, j]
        return out if self.conv1d.bias is None else out + self.conv1d.bias

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (b, T, d_model) -> (b, T, d_model)."""
        z, xBC, dt = self.project(u)
        xBC = F.silu(self._causal_conv(xBC, u.size(1)))
        x, dt, A, B, C = self.ssm_inputs(xBC, dt)
        return self.output(ssd(x, dt, A, B, C, self.chunk_size), x, z)

    # The three steps around the SSD scan, shared with lbi_fx.pgf's tiled mixer, which
    # runs the scan tile by tile from a carried state.
    def project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, xBC, dt): the gate, the conv input and the raw step sizes."""
        gn = self.ngroups * self.d_state
        return self.in_proj(u).split([self.d_inner, self.d_inner + 2 * gn, self.nheads], -1)

    def ssm_inputs(self, xBC: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(x, dt, A, B, C) in the grouped-head layout ``ssd`` takes, from the conv output."""
        g, k = self.ngroups, self.nheads // self.ngroups
        gn = self.ngroups * self.d_state
        x, B, C = xBC.split([self.d_inner, gn, gn], -1)
        dt = F.softplus(dt + self.dt_bias)
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        A = -torch.exp(self.A_log)
        return (x.unflatten(-1, (g, k, self.headdim)), dt.unflatten(-1, (g, k)), A.view(g, k),
                B.unflatten(-1, (g, self.d_state)), C.unflatten(-1, (g, self.d_state)))

    def output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The skip term, the gated norm and the output projection after the scan."""
        g, k = self.ngroups, self.nheads // self.ngroups
        return self.out_proj(self.norm((y + x * self.D.view(g, k, 1)).flatten(-3), z))


class MambaBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``."""

    def __init__(self, cfg: Mamba2Config, mixer: nn.Module):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


def make_mixer(cfg: Mamba2Config, use_mamba_ssm: bool = False, device=None) -> nn.Module:
    """Our :class:`Mamba2Mixer`, or ``mamba_ssm.Mamba2`` with the same configuration."""
    if not use_mamba_ssm:
        return Mamba2Mixer(cfg).to(device)
    from mamba_ssm import Mamba2

    return Mamba2(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                  headdim=cfg.headdim, ngroups=cfg.ngroups, A_init_range=cfg.A_init_range,
                  dt_min=cfg.dt_min, dt_max=cfg.dt_max, dt_init_floor=cfg.dt_init_floor,
                  dt_limit=cfg.dt_limit, bias=cfg.bias, conv_bias=cfg.conv_bias,
                  chunk_size=cfg.chunk_size, device=device)


class LM(nn.Module):
    """Byte embedding, a stack of residual blocks, final RMSNorm, (tied) head.

    The blocks are given, so the Mamba-2 model and the hybrid share this wrapper.
    """

    def __init__(self, cfg: Mamba2Config, layers: list[nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(layers)
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=0.02)
        if cfg.tie_weights:
            self.lm_head.weight = self.embedding.weight
        # mamba-ssm's prenorm-residual rescaling: each out_proj adds to the residual
        # stream once per layer, so shrink it by sqrt(n_layer) to keep the variance flat.
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("out_proj.weight"):
                    p /= math.sqrt(len(layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) int64 byte ids -> logits (B, T, vocab_size)."""
        x = self.embedding(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm_f(x))


def resolve_backend(backend: str, device: torch.device | str) -> bool:
    """``"auto"``: mamba-ssm on CUDA when it imports; ``"torch"``; ``"mamba_ssm"``."""
    if backend not in ("auto", "torch", "mamba_ssm"):
        raise ValueError(f"backend={backend!r}: choose 'auto', 'torch' or 'mamba_ssm'")
    cuda = torch.device(device).type == "cuda"
    if backend == "mamba_ssm" and not (cuda and mamba_ssm_available()):
        raise RuntimeError("backend='mamba_ssm' needs a CUDA device and an importable mamba_ssm")
    return backend == "mamba_ssm" or (backend == "auto" and cuda and mamba_ssm_available())


def rng_devices(device: torch.device | str) -> list[int]:
    """CUDA devices whose RNG a seeded build touches (mamba-ssm initialises on device)."""
    d = torch.device(device)
    if d.type != "cuda":
        return []
    return [d.index if d.index is not None else torch.cuda.current_device()]


def build(
    n_layer: int = 4,
    d_model: int = 64,
    d_state: int = 16,
    headdim: int = 16,
    expand: int = 2,
    ngroups: int = 1,
    d_conv: int = 4,
    chunk_size: int = 64,
    batch: int = 2,
    seq: int = 32,
    tie_weights: bool = True,
    seed: int = 0,
    device: str = "cpu",
    backend: str = "auto",
) -> tuple[LM, tuple[torch.Tensor]]:
    """Factory for the CLI (``lbi_fx.models.mamba2:build``): (model, (idx,)).

    On CPU (or ``backend="torch"``) the model is fx-traceable; with mamba-ssm on CUDA
    transform it with ``leaf_modules=leaf_modules(model)``.
    """
    cfg = Mamba2Config(n_layer=n_layer, d_model=d_model, d_state=d_state, headdim=headdim,
                       expand=expand, ngroups=ngroups, d_conv=d_conv, chunk_size=chunk_size,
                       tie_weights=tie_weights)
    use_ssm = resolve_backend(backend, device)
    # Seed locally so building a model does not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        layers = [MambaBlock(cfg, make_mixer(cfg, use_ssm, device)) for _ in range(n_layer)]
        model = LM(cfg, layers).to(device)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    return model, (idx,)
