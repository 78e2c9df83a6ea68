"""Encoder/decoder interface modules (Eq. 4-5 of the LBI paper).

They are ordinary ``nn.Module``s - optimizers, ``state_dict`` and ``.to()`` see them -
and each appears as a single ``call_module`` node in the rewritten graph, so the
interface m_k is one node of r scalars per sample: the separator the check counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lbi_fx.errors import InputError, RewriteError


def _mlp(d_in: int, hidden: int, d_out: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


POOLS = ("auto", "causal", "mean", "last")
DECODER_INITS = ("default", "zero")
# How m_k is normalised per row: LayerNorm removes mean and scale (r - 2 degrees of
# freedom left), RMSNorm the scale (r - 1), "none" nothing (r).
NORMS = ("layer", "rms", "none")
MIN_RANKS = {"layer": 3, "rms": 2, "none": 1}
MIN_RANK = MIN_RANKS["layer"]
# What a causal encoder reads for row s: "prefix" the mean of the positions before segment
# s; "latest" that mean and the last position before segment s; "recent" that mean and,
# position by position, the whole segment before s; "inclusive" the mean of the positions
# up to and including segment s's first position, and that position's own state (with
# segment_len=1 every position reads its own deep state: a per-position bottleneck).
SUMMARIES = ("prefix", "latest", "recent", "inclusive")


def per_position(rank: int = 1, window: int = 4, segment_len: int = 1) -> dict:
    """``transform`` arguments of the causal interface that kept the most depth (issue
    #23, ``lbi-fx quality --long``): one row of ``rank`` scalars per ``segment_len``
    positions (per position by default), each row read up to and including its own first
    position, decoders that read the ``window`` latest rows and start at zero, no row
    norm below rank 3. Its width is (max_len / segment_len) x rank scalars per sample, so
    it grows with the sequence: at 64 positions, rank 1 is the 64 scalars of the default
    16 x 4 segments. ``transform(model, regions, example_inputs=ex, **per_position())``."""
    return {"pool": "causal", "rank": rank, "segment_len": segment_len,
            "summary": "inclusive", "decoder_window": window, "decoder_init": "zero",
            "interface_norm": "layer" if rank >= MIN_RANKS["layer"] else "none"}


def rank_problem(rank: int, norm: str = "layer") -> str:
    """Why ``rank`` scalars per row carry nothing through the interface's norm."""
    if norm == "rms":
        return (f"the interface's RMSNorm removes each row's scale, so {rank} scalar per row "
                f"carries only a sign; use rank >= {MIN_RANKS['rms']} or interface_norm='none'")
    what = "a constant (all J_k == 0)" if rank <= 1 else "only a sign (J_k ~ 1e-5: one bit)"
    return (f"the interface's LayerNorm removes each row's mean and scale, so {rank} scalar(s) "
            f"per row carry {what}; use rank >= {MIN_RANK}, or interface_norm='rms' / 'none'")


def _reset_children(mod: nn.Module) -> None:
    for m in mod.modules():
        if m is not mod and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def make_norm(norm: str, rank: int) -> nn.Module:
    if norm == "layer":
        return nn.LayerNorm(rank)
    if norm == "rms":
        return nn.RMSNorm(rank)
    if norm == "none":
        return nn.Identity()
    raise InputError(f"interface_norm={norm!r}: choose one of {', '.join(NORMS)}")


@dataclass(frozen=True)
class Segments:
    """The causal layout: the sequence axis (wherever the graph puts it) cut into
    ``count`` fixed segments of ``length`` positions. Boundaries are absolute positions,
    so a shorter input sees the same segments as the example (a prefix of them);
    ``max_len`` bounds the input."""

    count: int
    length: int
    max_len: int

    @staticmethod
    def make(max_len: int, segment_len: int | None = None) -> Segments:
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise InputError(f"max_len={max_len!r}: the longest sequence the interface takes, an int >= 1")
        if segment_len is None:
            segment_len = -(-max_len // 4)
        if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
            raise InputError(f"segment_len={segment_len!r}: positions per segment, an int >= 1")
        count = -(-max_len // segment_len)
        if count < 2:
            # row 0 pools the empty prefix: m_{k+1} would not depend on region k at all
            raise InputError(
                f"segment_len={segment_len} with max_len={max_len} leaves a single causal "
                "segment, whose row summarises the empty prefix before it: the interface "
                "would carry nothing from any region. Use segment_len <= max_len // 2 "
                f"(default ceil(max_len / 4)), or pool='mean'")
        return Segments(count, segment_len, max_len)

    def check(self, length: int) -> None:
        if length > self.max_len:
            raise InputError(
                f"sequence length {length} exceeds max_len={self.max_len} of the causal "
                f"interface (segments of {self.length} positions at fixed offsets); transform "
                f"again with max_len >= {length}")


def pool(x: torch.Tensor, how: str) -> torch.Tensor:
    """(B, ..., D) -> (B, D): never pools over the batch axis.

    ``"mean"`` averages every axis but batch and features; ``"last"`` takes the last
    position. Both reach every position, later ones included: in a causal model they
    leak the future into earlier positions through m_k (``"causal"`` does not).
    """
    if x.dim() == 1:
        return x.unsqueeze(-1)
    if x.dim() == 2:
        return x
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return flat.mean(dim=1) if how == "mean" else flat[:, -1]


def prefix_pool(x: torch.Tensor, seg: Segments) -> torch.Tensor:
    """(B, L, ..., D) -> (B, S, D): row s is the mean of x over positions strictly before
    segment s (zeros for s = 0), so row s never sees segment s or anything after it."""
    seg.check(x.shape[1])
    x = x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]).mean(dim=2) if x.dim() > 3 else x
    B, L, D = x.shape
    full = seg.count * seg.length
    sums = torch.nn.functional.pad(x, (0, 0, 0, full - L)).reshape(B, seg.count, seg.length, D)
    sums = sums.sum(dim=2)
    # exclusive prefix sums: row s adds segments 0..s-1 only (a cumsum minus its own
    # segment would let segment s's values into row s through rounding)
    before = torch.nn.functional.pad(sums[:, :-1], (0, 0, 1, 0)).cumsum(dim=1)
    starts = torch.arange(seg.count, device=x.device) * seg.length
    counts = starts.clamp(max=L).clamp(min=1).to(x.dtype)
    return before / counts[:, None]


def recent_segment(x: torch.Tensor, seg: Segments) -> torch.Tensor:
    """(B, L, ..., D) -> (B, S, segment_len * D): row s holds every position of segment
    s - 1 side by side (zeros for s = 0 and past the input's end), so row s sees only
    positions before segment s, each at its own place."""
    seg.check(x.shape[1])
    x = x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]).mean(dim=2) if x.dim() > 3 else x
    B, L, D = x.shape
    full = seg.count * seg.length
    rows = torch.nn.functional.pad(x, (0, 0, 0, full - L)).reshape(B, seg.count, seg.length * D)
    return torch.nn.functional.pad(rows[:, :-1], (0, 0, 1, 0))


def inclusive_pool(x: torch.Tensor, seg: Segments) -> torch.Tensor:
    """(B, L, ..., D) -> (B, S, 2 D): row s is the mean of x over positions up to and
    including p_s = s * segment_len (the first position of segment s, the latest one every
    position of the segment may see), then x at p_s; zeros where p_s is past the input."""
    seg.check(x.shape[1])
    x = x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]).mean(dim=2) if x.dim() > 3 else x
    B, L, D = x.shape
    firsts = torch.arange(0, L, seg.length, device=x.device)  # p_s of the rows the input reaches
    means = x.cumsum(dim=1)[:, firsts] / (firsts + 1).to(x.dtype)[:, None]
    rows = torch.cat([means, x[:, firsts]], dim=-1)
    return torch.nn.functional.pad(rows, (0, 0, 0, seg.count - firsts.numel()))


def causal_summary(x: torch.Tensor, seg: Segments, summary: str) -> torch.Tensor:
    """What a causal encoder reads per row: the prefix mean, then the last position
    before the row (``"latest"``) or the whole segment before it (``"recent"``); or, for
    ``"inclusive"``, the mean up to the row's first position and that position."""
    if summary == "prefix":
        return prefix_pool(x, seg)
    if summary == "inclusive":
        return inclusive_pool(x, seg)
    recent = recent_segment(x, seg)
    if summary == "latest":
        recent = recent[..., -x.shape[-1]:]  # the segment's last position
    return torch.cat([prefix_pool(x, seg), recent], dim=-1)


def summary_positions(summary: str, seg: Segments | None) -> int:
    """Positions a causal summary reads beside the prefix mean."""
    return {"prefix": 0, "latest": 1, "inclusive": 1,
            "recent": seg.length if seg is not None else 0}[summary]


def spread(d: torch.Tensor, length: int, seg: Segments) -> torch.Tensor:
    """(B, S, D) -> (B, length, D): position t reads row t // segment_len."""
    seg.check(length)
    B, S, D = d.shape
    return d[:, :, None, :].expand(B, S, seg.length, D).reshape(B, S * seg.length, D)[:, :length]


class InterfaceEncoder(nn.Module):
    """m_{k+1} = LN(m_k + tanh(a_k) * Enc_k(cat(pool(y) for y in crossing outputs))).

    Without ``m`` (the entry interface) it is m_0 = LN(Enc_in(pool(canvas))). With
    ``segments`` (``pool="causal"``) every quantity has one row per segment, carried flat
    as (B, S * r): row s pools positions before segment s, LayerNorm acts per row.
    ``seq_axes`` (one per input, from the graph) moves each input's sequence axis to 1
    first, so a channels-first (B, D, L) tensor pools over L and encodes D features.
    LayerNorm over r scalars keeps r - 2 degrees of freedom (mean and scale go), so
    r < 3 per row would carry a constant (r = 1) or a sign (r = 2): refused.
    ``summary="latest"`` / ``"recent"`` (causal only) also feed the encoder the last
    position before each row / the whole segment before it position by position, not just
    the blurred prefix mean: the deep features a later region most needs are the nearest.
    """

    def __init__(self, in_features: list[int], rank: int, hidden: int, *, kind: str = "mlp",
                 pool: str = "mean", residual: bool = True, in_rank: int | None = None,
                 segments: Segments | None = None, seq_axes: list[int | None] | None = None,
                 norm: str = "layer", summary: str = "prefix"):
        super().__init__()
        if (pool == "causal") != (segments is not None):
            raise RewriteError("pool='causal' needs a segment layout, and only it takes one "
                               "(a bug in lbi-fx's rewrite; please report it)")
        if norm not in NORMS:
            raise InputError(f"interface_norm={norm!r}: choose one of {', '.join(NORMS)}")
        if summary not in SUMMARIES:
            raise InputError(f"summary={summary!r}: choose one of {', '.join(SUMMARIES)}")
        if summary != "prefix" and segments is None:
            raise InputError(f"summary={summary!r} reads whole segments: it needs pool='causal'")
        if rank < MIN_RANKS[norm]:
            raise InputError(f"an interface of rank {rank} per row: {rank_problem(rank, norm)}")
        self.seq_axes = list(seq_axes) if seq_axes is not None else None
        self.rank = rank
        self.in_rank = rank if in_rank is None else in_rank
        self.in_features = list(in_features)
        self.pool = pool
        self.segments = segments
        self.residual = residual
        self.summary = summary
        per_row = 1 + summary_positions(summary, segments)
        self.net_in = sum(in_features) * per_row
        self.net = _mlp(self.net_in, hidden, rank, kind) if in_features else None
        self.alpha = nn.Parameter(torch.tensor(0.5)) if residual else None
        self.norm_kind = norm
        self.norm = make_norm(norm, rank)

    # initialised as one unit (ownership.init_weights): the whole subtree from one seed
    resets_subtree = True

    def reset_parameters(self) -> None:
        """The values ``__init__`` gives (for a module built on the meta device)."""
        _reset_children(self)
        if self.alpha is not None:
            with torch.no_grad():
                self.alpha.fill_(0.5)

    @property
    def rows(self) -> int:
        return self.segments.count if self.segments is not None else 1

    def forward(self, m: torch.Tensor | None, *ys: torch.Tensor) -> torch.Tensor:
        z = None
        axes = getattr(self, "seq_axes", None)
        if axes is not None:
            ys = tuple(y if s is None or s == 1 else y.movedim(s, 1) for y, s in zip(ys, axes))
        if self.net is not None:
            if self.segments is not None:
                how = getattr(self, "summary", "prefix")
                pooled = [causal_summary(y, self.segments, how) for y in ys]
            else:
                pooled = [pool(y, self.pool) for y in ys]
            z = self.net(torch.cat(pooled, dim=-1))  # (B, r) or (B, S, r)
        if not self.residual:
            return self.norm(z).flatten(1)
        m = m.reshape(m.shape[0], self.rows, self.in_rank)
        if self.in_rank != self.rank:  # interfaces of different widths: truncate or zero-pad
            m = m[..., : self.rank] if self.in_rank > self.rank else torch.nn.functional.pad(
                m, (0, self.rank - self.in_rank))
        if z is not None and self.segments is None:
            z = z[:, None, :]
        return self.norm(m if z is None else m + torch.tanh(self.alpha) * z).flatten(1)

    def first_row(self, m: torch.Tensor) -> torch.Tensor:
        """Row 0 of the output from m alone: a causal row 0 pools an empty prefix, so
        it is LN(m[0] + tanh(a) Enc(0)) whatever the region computes (the backward takes
        its Jacobian rows from here instead of VJPs through the region)."""
        if self.segments is None or not self.residual or getattr(self, "summary", "") == "inclusive":
            raise RewriteError("first_row is defined for residual causal encoders whose row 0 "
                               "pools an empty prefix only "
                               "(a bug in lbi-fx; please report it)")
        row = m.reshape(m.shape[0], self.rows, self.in_rank)[:, :1]
        if self.in_rank != self.rank:
            row = row[..., : self.rank] if self.in_rank > self.rank else torch.nn.functional.pad(
                row, (0, self.rank - self.in_rank))
        if self.net is not None:
            zero = row.new_zeros(row.shape[0], 1, getattr(self, "net_in", sum(self.in_features)))
            row = row + torch.tanh(self.alpha) * self.net(zero)
        return self.norm(row).flatten(1)


def check_window(window: int, segments: Segments | None) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InputError(f"decoder_window={window!r}: the rows a decoder reads, an int >= 1")
    if window > 1 and segments is None:
        raise InputError(f"decoder_window={window} reads earlier causal rows; a mean or last "
                         "pool has one row (use pool='causal')")


def row_window(rows: torch.Tensor, window: int) -> torch.Tensor:
    """(B, S, r) -> (B, S, window * r): row s beside the ``window - 1`` rows before it
    (oldest first, zeros before row 0), so a decoder reads only rows <= s."""
    if window == 1:
        return rows
    S = rows.shape[1]
    padded = torch.nn.functional.pad(rows, (0, 0, window - 1, 0))
    return torch.cat([padded[:, i:i + S] for i in range(window)], dim=-1)


class InterfaceDecoder(nn.Module):
    """x_hat = canvas + Dec_k(m_k), broadcast over every axis but batch and features
    (with ``segments``: position t of segment s adds Dec_k(m_k[s]); with ``window`` w it
    adds Dec_k(m_k[s - w + 1 .. s]), the w latest rows it may see, a causal convolution).

    ``shape`` says how to build the target shape at run time: each entry is either
    ``("canvas", j)`` (take ``canvas.shape[j]``, so batch and sequence stay dynamic) or
    ``("const", n)``. A crossing tensor whose shape differs from the canvas gets a zero
    canvas (``use_canvas=False``). ``seq_axis`` (from the graph) is where the target keeps
    its sequence: the decoder builds it on axis 1 and moves it there.
    """

    def __init__(self, rank: int, hidden: int, out_features: int, shape: list[tuple[str, int]],
                 *, kind: str = "mlp", use_canvas: bool = True, segments: Segments | None = None,
                 seq_axis: int | None = None, zero_init: bool = False, window: int = 1):
        super().__init__()
        check_window(window, segments)
        self.window = window
        self.shape = [tuple(s) for s in shape]
        self.seq_axis = seq_axis
        at = 1 if seq_axis is None else seq_axis
        if segments is not None and (len(self.shape) < 3 or not 0 < at < len(self.shape)
                                     or self.shape[at][0] != "canvas"):
            raise RewriteError("a causal decoder needs the sequence axis of its target to follow "
                               "the canvas's (a bug in lbi-fx's rewrite; please report it)")
        self.rank = rank
        self.use_canvas = use_canvas
        self.segments = segments
        self.net = _mlp(rank * window, hidden, out_features, kind)
        self.zero_init = zero_init
        self._zero_last()

    resets_subtree = True  # see InterfaceEncoder

    def _zero_last(self) -> None:
        if self.zero_init:  # Dec_k(m) = 0 at init: each region starts as its dense self on the canvas
            last = self.net if isinstance(self.net, nn.Linear) else self.net[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def reset_parameters(self) -> None:
        """The values ``__init__`` gives (for a module built on the meta device)."""
        _reset_children(self)
        self._zero_last()

    def forward(self, m: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        shape = [canvas.shape[v] if how == "canvas" else v for how, v in self.shape]
        at = getattr(self, "seq_axis", None)
        moved = at is not None and at != 1
        if moved:  # build (B, L, ..., F), then put the sequence back on its axis
            shape = [shape[0], shape[at], *shape[1:at], *shape[at + 1:]]
        if self.segments is not None:  # position t reads the row of its segment
            rows = m.reshape(m.shape[0], self.segments.count, self.rank)
            d = self.net(row_window(rows, getattr(self, "window", 1)))
            d = spread(d, shape[1], self.segments)
            d = d.reshape(d.shape[0], d.shape[1], *([1] * (len(shape) - 3)), d.shape[-1])
            d = d.expand(shape)
        else:
            d = self.net(m)
            if len(shape) == 1:
                d = d.reshape(shape)
            else:
                d = d.reshape(d.shape[0], *([1] * (len(shape) - 2)), d.shape[-1]).expand(shape)
        if moved:
            d = d.movedim(1, at)
        return canvas + d if self.use_canvas else d.contiguous()
