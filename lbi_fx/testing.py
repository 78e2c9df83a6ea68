"""Test harness for compiler passes: gradient parity and separator checks.

Usable from any project's pytest suite::

    from lbi_fx.testing import gradient_parity, assert_separated
    report = gradient_parity(lbi, (tokens,), loss_fn)
    assert report.ok, report          # or report.assert_close(): the same verdict
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lbi_fx.analysis import precision_notes
from lbi_fx.checks import default_loss  # public here too: the harness API
from lbi_fx.errors import LBIError
from lbi_fx.outputs import Selector, select_output

# (rtol, cosine) that a report holds itself to by default, keyed by the least precise dtype
# among the gradients and the forward's floating outputs (autocast shows there). Measured
# scan-vs-autograd (CPU, K = 2-4, GPT/Mamba-2/hybrid): fp64 global ~3e-17, worst tensor
# ~5e-16; fp32 global 1e-8..1.4e-7, worst tensor ~2e-7; bf16 autocast global ~6e-4, worst
# tensor ~7e-3. The defaults leave room for larger models without hiding a real bug.
DEFAULT_TOL = {torch.float64: (1e-10, 1 - 1e-10), torch.float32: (1e-5, 0.999999),
               torch.float16: (2e-2, 0.9999), torch.bfloat16: (2e-2, 0.9999)}

# The fp32 oracle (OpInfo-style: a low-precision result is judged by how far it is from a
# float64 reference compared with how far plain PyTorch's own low-precision result is).
# Per tensor t, with g64 the float64 autograd gradient of a float64 copy of the module:
#     ||g_scan - g64|| <= ORACLE_FACTOR * (||g_autograd - g64|| + eps32 * floor_t)
#     floor_t = ||g64_t|| + 1e-3 * ||G64||
# Measured ||g_scan - g64|| / (||g_autograd - g64|| + eps32 ||g64_t||) is <= 1.4 (GPT,
# Mamba-2, hybrid; K = 2-4; pools mean and causal); a tensor 0.1% off is ~1000x autograd's
# fp32 error (~2e-7 relative), so it fails while rounding passes. The floor's second term
# covers a gradient that is a sum of many terms cancelling to a small value (an interface's
# scalar gate alpha: its rounding is that of the terms, not of the sum; once measured 48x
# autograd's own, luckily small, error at 6e-10 when the gate's gradient nearly cancelled).
# A tensor 0.1% off still fails wherever its gradient is more than ~1.2e-6 of the whole
# (1e-3 * share > 10 * eps32 * (share + 1e-3)).
ORACLE_FACTOR = 10.0
# autograd fp32 vs the float64 copy beyond this global rel-l2: the copy is no reference
# (random ops draw other numbers in float64, or the forward is not a function of its
# dtype); the verdict then falls back to the rtol rules, with a note.
ORACLE_SANE = 1e-3
REFERENCES = ("auto", "float64", "none")


@dataclass(frozen=True)
class TensorParity:
    """One compared tensor (a parameter, or ``"input i"``).

    ``rel`` is what the per-tensor check holds to ``rtol``::

        rel = ||g - g_ref|| / (||g_ref|| + ||G_ref|| * sqrt(numel / N))

    ``G_ref`` is the whole reference gradient (N elements). The second term is this
    tensor's share, by size, of the global error budget: the floors of all tensors add up
    (in squares) to exactly ``rtol * ||G_ref||``, so a tensor whose reference gradient is
    ~0 may carry its share of rounding, but never more than the global check would allow.
    A tensor 35% wrong escapes only if its gradient's RMS is below ~3 rtol times the
    model's (it is then at the rounding level the global tolerance accepts anyway).
    """

    name: str
    numel: int
    err: float       # ||g - g_ref||
    ref: float       # ||g_ref||
    rel: float       # as above: <= rtol to pass
    share: float     # ||g_ref|| / ||G_ref||
    # the fp32 oracle (``ORACLE_FACTOR``), nan where no float64 reference ran
    err64: float = math.nan        # ||g_scan - g64||
    autograd_err64: float = math.nan  # ||g_autograd - g64||: plain PyTorch's own error
    limit64: float = math.nan      # err64 must be <= this

    @property
    def oracle_ok(self) -> bool:
        """Within the fp32 oracle's limit (True where no float64 reference ran)."""
        return math.isnan(self.limit64) or self.err64 <= self.limit64

    @property
    def plain_rel(self) -> float:
        """||g - g_ref|| / ||g_ref|| without the floor (inf for a zero reference)."""
        return self.err / self.ref if self.ref > 0 else (0.0 if self.err == 0 else math.inf)


@dataclass
class ParityReport:
    """Scan backward vs plain autograd on the same module, same inputs, same RNG.

    ``ok`` and ``assert_close()`` give one verdict: both modes give a gradient to the
    same tensors (None vs a tensor, zeros included, fails; so do other shapes), the
    global rel-l2 and every tensor's ``rel`` (:class:`TensorParity`) are within
    ``tol_rel_l2``, the cosine at least ``tol_cosine``, the losses within ``tol_rel_l2``.
    In float32 (``reference == "float64"``) every tensor must also pass the oracle: the
    scan's distance to a float64 reference at most ``ORACLE_FACTOR`` times autograd's own
    fp32 distance (plus an eps-sized floor), so a tensor 0.1% off fails whatever rtol says.
    """

    max_abs: float
    rel_l2: float
    cosine: float
    tensors: list[TensorParity] = field(default_factory=list)  # worst ``rel`` first
    missing: list[str] = field(default_factory=list)  # grad under autograd, none under scan
    extra: list[str] = field(default_factory=list)    # grad under scan, none under autograd
    n_params: int = 0
    loss: float = float("nan")        # under autograd
    loss_scan: float = float("nan")   # under scan: the same forward, so the same value
    n_inputs: int = 0                 # floating inputs whose gradients are compared too
    tol_rel_l2: float = DEFAULT_TOL[torch.float32][0]  # rtol: global and per tensor
    tol_cosine: float = DEFAULT_TOL[torch.float32][1]
    dtype: str = "float32"            # what the default tolerances were picked for
    tol_given: bool = False           # rtol/cosine passed to gradient_parity, not defaults
    shape_mismatch: list[str] = field(default_factory=list)  # grads of different shapes
    # what the verdict should be read with (e.g. float32 ops in a float64 model); never
    # changes the tolerances or ``ok``
    notes: list[str] = field(default_factory=list)
    # "float64": the fp32 oracle judged every tensor (see ORACLE_FACTOR); "none": rtol only
    reference: str = "none"

    @property
    def worst(self) -> list[tuple[str, float]]:
        """(tensor, rel) pairs, worst first."""
        return [(t.name, t.rel) for t in self.tensors]

    @property
    def tensor_rel(self) -> float:
        """The worst per-tensor ``rel``: the smallest rtol every tensor passes."""
        return self.tensors[0].rel if self.tensors else 0.0

    @property
    def complete(self) -> bool:
        """Both modes give a gradient to the same tensors, and the errors are finite."""
        return (not self.missing and not self.extra and not self.shape_mismatch
                and math.isfinite(self.rel_l2))

    @property
    def loss_error(self) -> float:
        return abs(self.loss_scan - self.loss) / max(abs(self.loss), 1e-300)

    def problems(self, rtol: float | None = None, cosine: float | None = None,
                 max_abs: float | None = None) -> list[str]:
        """Every check that fails at these tolerances (default: the report's own)."""
        rtol = self.tol_rel_l2 if rtol is None else rtol
        cosine = self.tol_cosine if cosine is None else cosine
        out = []
        if self.missing:
            out.append(f"tensors with an autograd gradient but none under scan: {self.missing[:5]}")
        if self.extra:
            out.append(f"tensors with a scan gradient but none under autograd: {self.extra[:5]}")
        if self.shape_mismatch:
            out.append(f"gradients of different shapes: {self.shape_mismatch[:5]}")
        if not self.rel_l2 <= rtol:
            out.append(f"global rel_l2 {self.rel_l2:.3e} > {rtol:.1e}")
        bad = [t for t in self.tensors if not t.rel <= rtol]
        if bad:
            out.append(f"{len(bad)} tensor(s) over rtol {rtol:.1e}: " + ", ".join(
                f"{t.name} {t.rel:.2e}" for t in bad[:5]))
        off = [t for t in self.tensors if not t.oracle_ok]
        if off:
            out.append(f"{len(off)} tensor(s) further from the float64 reference than fp32 "
                       f"rounding allows (scan vs autograd error, limit {ORACLE_FACTOR:g}x): "
                       + ", ".join(f"{t.name} {t.err64:.2e} vs {t.autograd_err64:.2e}"
                                   for t in sorted(off, key=lambda t: -t.err64 / max(
                                       t.limit64, 1e-300))[:5]))
        if not self.cosine >= cosine:
            out.append(f"cosine {self.cosine:.12f} < {cosine}")
        if max_abs is not None and not self.max_abs <= max_abs:
            out.append(f"max_abs {self.max_abs:.3e} > {max_abs:.1e}")
        if not self.loss_error <= rtol:
            out.append(f"loss {self.loss_scan!r} under scan, {self.loss!r} under autograd")
        return out

    @property
    def ok(self) -> bool:
        """No :meth:`problems` at the report's tolerances (what ``assert_close()`` checks)."""
        return not self.problems()

    def assert_close(self, rel_l2: float | None = None, cosine: float | None = None,
                     max_abs: float | None = None, *, rtol: float | None = None) -> None:
        """Raise ``AssertionError`` listing :meth:`problems`; without arguments it agrees
        with ``ok``. ``rtol`` (alias ``rel_l2``) bounds the global and per-tensor errors."""
        if rtol is not None and rel_l2 is not None and rtol != rel_l2:
            raise LBIError(f"assert_close got rtol={rtol} and rel_l2={rel_l2}: pass one")
        problems = self.problems(rtol if rtol is not None else rel_l2, cosine, max_abs)
        if problems:
            raise AssertionError("gradient parity failed: " + "; ".join(problems) + f"\n{self}")

    def __str__(self) -> str:
        what = f"{self.n_params} params" + (f" + {self.n_inputs} inputs" if self.n_inputs else "")
        lines = [
            f"ParityReport(ok={self.ok}; tolerances: rtol {self.tol_rel_l2:.1e} global and "
            f"per tensor, cosine >= {self.tol_cosine} "
            f"({'given' if self.tol_given else self.dtype + ' defaults'}))",
            f"  loss: autograd {self.loss!r}, scan {self.loss_scan!r} (rel {self.loss_error:.2e})",
            f"  global over {what}: rel_l2 {self.rel_l2:.3e}, cosine {self.cosine:.12f}, "
            f"max_abs {self.max_abs:.3e}",
            *([f"  float64 oracle: every tensor's scan error <= {ORACLE_FACTOR:g} x (autograd's "
               "fp32 error + eps floor); worst " + ", ".join(
                   f"{t.name} {t.err64:.2e} vs {t.autograd_err64:.2e}" for t in sorted(
                       self.tensors, key=lambda t: -t.err64 / max(t.limit64, 1e-300))[:2])]
              if self.reference == "float64" else []),
            "  worst tensors (rel; plain rel, share of |G|): " + (", ".join(
                f"{t.name} {t.rel:.2e} ({t.plain_rel:.1e}, {t.share:.1e})"
                for t in self.tensors[:3]) or "none"),
        ]
        for label, names in (("no grad under scan", self.missing),
                             ("no grad under autograd", self.extra),
                             ("other shapes", self.shape_mismatch)):
            if names:
                lines.append(f"  {label}: {names[:5]}" + (" ..." if len(names) > 5 else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _grads(module: nn.Module, inputs, loss_fn, seed: int, mode: str):
    """Gradients of the parameters and of every floating input (fresh leaves per mode),
    the loss, and the forward's floating output dtypes (autocast lowers them)."""
    module.backward = mode
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    inputs = [x.detach().clone().requires_grad_(True)
              if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    named += [(f"input {i}", x) for i, x in enumerate(inputs)
              if isinstance(x, torch.Tensor) and x.requires_grad]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = module(*inputs)
        loss = loss_fn(out)
        grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    outs = out if isinstance(out, (tuple, list)) else [getattr(out, "logits", out)]
    dtypes = [o.dtype for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return [n for n, _ in named], grads, float(loss.detach()), dtypes


def _least_precise(dtypes) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)


def gradient_parity(
    lbi: nn.Module,
    example_inputs: Sequence[object],
    loss_fn: Callable[[object], torch.Tensor] | None = None,
    *,
    seed: int = 0,
    rtol: float | None = None,
    cosine: float | None = None,
    rel_l2: float | None = None,
    reference: str = "auto",
) -> ParityReport:
    """Compare ``lbi.backward = "scan"`` against ``"autograd"`` on the same module.

    Both passes run with the same RNG seed, so dropout masks agree. One global number
    lets a small tensor be badly wrong, so the report also checks every parameter and
    floating input on its own (:class:`TensorParity`). ``rtol`` (alias ``rel_l2``) and
    ``cosine`` default by dtype (``DEFAULT_TOL``: the least precise of the gradients and
    the forward's outputs, so autocast gets 16-bit tolerances).

    In float32 a global rtol cannot tell rounding from a small bug (fp32 noise differs per
    tensor by orders of magnitude), so ``reference="auto"`` (or ``"float64"``) also runs a
    float64 copy of the module under autograd, the oracle OpInfo-style tests use, and
    judges every tensor by it: ``||g_scan - g64|| <= ORACLE_FACTOR * (||g_autograd - g64||
    + eps32 * (||g64|| + 1e-3 ||G64|| sqrt(numel / N)))``. A tensor 0.1% off fails; rounding
    passes. Where the copy is no reference (it cannot be made, or autograd fp32 is more
    than ``ORACLE_SANE`` from it: dropout draws other numbers in float64) the verdict uses
    the rtol rules alone and says so in ``notes``. ``reference="none"`` skips the copy.
    """
    if reference not in REFERENCES:
        raise LBIError(f"gradient_parity(reference={reference!r}): choose one of "
                       f"{', '.join(REFERENCES)}")
    if not hasattr(lbi, "backward") or not hasattr(lbi, "lbi_verify"):
        raise LBIError("gradient_parity takes a module returned by lbi_fx.transform")
    if rtol is not None and rel_l2 is not None and rtol != rel_l2:
        raise LBIError(f"gradient_parity got rtol={rtol} and rel_l2={rel_l2}: pass one")
    rtol = rel_l2 if rtol is None else rtol
    loss_fn = loss_fn or default_loss
    inputs = tuple(example_inputs)
    before = lbi.backward
    try:
        names, ref, loss, out_dtypes = _grads(lbi, inputs, loss_fn, seed, "autograd")
        _, got, loss_scan, _ = _grads(lbi, inputs, loss_fn, seed, "scan")
    finally:
        lbi.backward = before
    missing = [n for n, a, b in zip(names, ref, got) if a is not None and b is None]
    extra = [n for n, a, b in zip(names, ref, got) if a is None and b is not None]
    shapes = [n for n, a, b in zip(names, ref, got)
              if a is not None and b is not None and a.shape != b.shape]
    pairs = [(n, a.double(), b.double()) for n, a, b in zip(names, ref, got)
             if a is not None and b is not None and a.shape == b.shape]
    norms = []
    diff_sq = ref_sq = dot = got_sq = 0.0
    max_abs = 0.0
    for n, a, b in pairs:
        d = b - a
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
        diff_sq += float((d * d).sum())
        ref_sq += float((a * a).sum())
        got_sq += float((b * b).sum())
        dot += float((a * b).sum())
        norms.append((n, a.numel(), float(d.norm()), float(a.norm())))
    total = math.sqrt(ref_sq)
    numel = sum(k for _, k, _, _ in norms) or 1
    tensors = []
    for n, k, err, r in norms:
        floor = total * math.sqrt(k / numel)
        rel = err / (r + floor) if r + floor > 0 else (0.0 if err == 0 else math.inf)
        tensors.append(TensorParity(n, k, err, r, rel, r / total if total > 0 else 0.0))
    tensors.sort(key=lambda t: -t.rel if not math.isnan(t.rel) else -math.inf)
    rel = math.sqrt(diff_sq) / total if ref_sq > 0 else math.sqrt(diff_sq)
    cos = dot / math.sqrt(ref_sq * got_sq) if ref_sq > 0 and got_sq > 0 else (
        1.0 if diff_sq == 0 else 0.0)
    n_inputs = sum(n.startswith("input ") for n, _, _ in pairs)
    dtype = _least_precise([a.dtype for a in ref if a is not None and a.is_floating_point()]
                           + out_dtypes)
    tol_rel, tol_cos = DEFAULT_TOL.get(dtype, DEFAULT_TOL[torch.float16])
    notes = list(precision_notes(lbi))
    used = "none"
    if reference == "float64" or (reference == "auto" and dtype == torch.float32):
        g64, why = _float64_reference(lbi, inputs, loss_fn, seed, before, names, ref)
        if g64 is None:
            notes.append(f"no float64 oracle: {why}; the per-tensor verdict is rtol's alone")
        else:
            used = "float64"
            tensors = _oracle(tensors, names, ref, got, g64)
    return ParityReport(max_abs=max_abs, rel_l2=rel, cosine=cos, tensors=tensors,
                        missing=missing, extra=extra, n_params=len(pairs) - n_inputs,
                        loss=loss, loss_scan=loss_scan, n_inputs=n_inputs,
                        tol_rel_l2=tol_rel if rtol is None else rtol,
                        tol_cosine=tol_cos if cosine is None else cosine,
                        dtype=str(dtype).removeprefix("torch."), shape_mismatch=shapes,
                        tol_given=rtol is not None or cosine is not None,
                        notes=notes, reference=used)


def _float64_reference(lbi, inputs, loss_fn, seed, mode, names, ref):
    """Autograd gradients of a float64 copy of ``lbi`` (by name), or (None, why not)."""
    try:
        twin = copy.deepcopy(lbi).double()
        twin.backward = mode
        inputs64 = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point()
                         else x for x in inputs)
        names64, g64, _, _ = _grads(twin, inputs64, loss_fn, seed, "autograd")
    except Exception as e:  # noqa: BLE001 - any failure only means: no oracle
        return None, f"a float64 copy of the module does not run ({type(e).__name__}: {e})"
    g64 = dict(zip(names64, g64))
    diff = total = 0.0
    for n, a in zip(names, ref):
        b = g64.get(n)
        if a is None or b is None or a.shape != b.shape:
            continue
        diff += float(((a.double() - b) ** 2).sum())
        total += float((b * b).sum())
    rel = math.sqrt(diff / total) if total > 0 else math.sqrt(diff)
    if not rel <= ORACLE_SANE:
        return None, (f"autograd in float32 is {rel:.1e} (rel-l2) from the float64 copy, more "
                      f"than rounding (random ops in the forward?)")
    return g64, ""


def _oracle(tensors, names, ref, got, g64) -> list[TensorParity]:
    """``tensors`` with their float64-oracle errors and limits filled in."""
    eps = torch.finfo(torch.float32).eps
    by_name = {n: (a, b) for n, a, b in zip(names, ref, got)}
    ref_norms = {t.name: float(g64[t.name].norm()) for t in tensors if t.name in g64}
    total = math.sqrt(sum(v * v for v in ref_norms.values()))
    out = []
    for t in tensors:
        r = g64.get(t.name)
        a, b = by_name[t.name]
        if r is None or r.shape != a.shape:
            out.append(t)
            continue
        e_scan = float((b.double() - r).norm())
        e_auto = float((a.double() - r).norm())
        floor = eps * (ref_norms[t.name] + 1e-3 * total)
        out.append(replace(t, err64=e_scan, autograd_err64=e_auto,
                           limit64=ORACLE_FACTOR * (e_auto + floor)))
    return out


def assert_separated(model: nn.Module, regions=None, *, example_inputs, rank=None,
                     interfaces=None, failing: Sequence[int] = ()) -> None:
    """Assert the separator check holds at every boundary except ``failing`` ones."""
    from lbi_fx.api import verify

    report = verify(model, regions, example_inputs=example_inputs, rank=rank,
                    interfaces=interfaces)
    bad = sorted(b.index for b in report.failing())
    if bad != sorted(failing):
        raise AssertionError(f"expected failing boundaries {sorted(failing)}, got {bad}\n{report}")


@torch.no_grad()
def prefix_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                *, logits: Selector = None) -> float:
    """Leak-free loss: position t is scored from a forward over ``x[:, :t+1]`` alone, so
    nothing after t can reach its prediction - whatever the model (an interface that
    pools the whole sequence included). Mean over positions and batch; L forwards.

    ``loss_fn(scores (B, V), targets (B,))`` defaults to cross-entropy. ``logits=`` picks
    the scores from the model's output (a tensor, ``ModelOutput``, dict or tuple:
    :func:`lbi_fx.outputs.select_output`).
    """
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    if x.dim() < 2 or y.shape[:2] != x.shape[:2]:
        raise LBIError(f"prefix_loss takes x and y of shape (B, L, ...) with the same (B, L), "
                       f"got {tuple(x.shape)} and {tuple(y.shape)}")
    total = 0.0
    for t in range(x.shape[1]):
        scores = select_output(model(x[:, : t + 1]), logits, who="prefix_loss")[:, t]
        total += float(loss_fn(scores, y[:, t]))
    return total / x.shape[1]


def causal_leak(model: nn.Module, example_inputs: Sequence[object]) -> float:
    """Max change of earlier outputs when later inputs change, relative to the output
    scale (0.0 for a causal model); see :mod:`lbi_fx.causality`."""
    from lbi_fx.causality import causal_leak as leak

    return leak(model, example_inputs)
