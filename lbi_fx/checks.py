"""Numerical checks run on a built ``LBIModule`` at transform time."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from lbi_fx.errors import BatchMixingError, InternalError, RewriteError
from lbi_fx.failures import classify, first_line


def probe_batch_mixing(lbi, example_inputs: Sequence[object]) -> None:
    """Every region must map sample b's m_k to sample b's outputs only.

    Runs the chain once on the example batch and, per region, takes B batched VJPs: the
    cotangent of probe b is a random Gaussian on sample b's outputs and zero elsewhere.
    Any gradient reaching another sample's m_k means the region mixes samples (an op
    over the batch axis the static check missed). Random cotangents matter: a constant
    one is annihilated by the LayerNorm that ends every interface.
    """
    c = lbi._build()
    spec = lbi._programs_spec
    gen = torch.Generator().manual_seed(0)
    # A batch of one cannot show mixing: probe on two copies of the sample.
    example_inputs = [x.repeat(2, *[1] * (x.dim() - 1))
                      if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x
                      for x in example_inputs]
    with _named_failures(lbi, "forward", example_inputs), torch.enable_grad(), \
            torch.random.fork_rng(devices=[]):
        flat = lbi._flatten(tuple(example_inputs), {})
        env = dict(zip(spec.prologue.outputs, c["prologue"](*flat)))
        from lbi_fx.module import _Call

        call = _Call({k: v for k, v in env.items() if k not in c["static_names"]})
        statics = [env[n] for n in c["static_names"]]
        state, _ = lbi.run_chain(call, env[spec.m_nodes[0]], statics, c["params"], keep=True)
    for k, cache in enumerate(state.caches):
        B = cache.m_in.shape[0]
        outs = [o for o in cache.outs if o.requires_grad and o.dim() > 0 and o.shape[0] == B]
        if B < 2 or not outs:
            continue
        seeds = []
        for o in outs:
            noise = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
            eye = torch.eye(B, dtype=o.dtype, device=o.device).reshape(B, B, *[1] * (o.dim() - 1))
            seeds.append(eye * noise.unsqueeze(0))  # (B probes, *o.shape)
        try:
            g = _probe_grads(outs, cache.m_in, seeds)
        except (RuntimeError, NotImplementedError) as exc:
            raise classify(exc, cache, f"region {k}", name=", ".join(lbi.regions[k])) from exc
        if g is None:
            continue
        g = g.abs().flatten(2).amax(-1)  # (probe b, sample b') -> max |d out_b / d m_b'|
        own = g.diagonal()
        leak = (g - torch.diag_embed(own)).amax()
        scale = float(own.amax()) or 1.0
        if float(leak) > 1e-9 * scale:
            b, b2 = divmod(int((g - torch.diag_embed(own)).argmax()), B)
            raise BatchMixingError(
                f"region {k} ({', '.join(lbi.regions[k])}) mixes samples: sample {b}'s outputs "
                f"depend on sample {b2}'s interface state (|d out / d m| = {float(leak):.2e}). "
                "Look for ops over the batch axis inside the region (dim=0 reductions, "
                "cumsum/softmax/flip/roll over dim 0, matmuls with a transposed batch)")


def default_loss(out) -> torch.Tensor:
    """A fixed random projection of every floating output, plus a quadratic term.

    Each element gets its own Gaussian weight (a plain sum, or a smooth ramp, would give
    a cotangent that normalisation layers mostly project away, hiding real errors and
    inflating rounding ones); the weights depend only on the output's shape.
    """
    leaves = [o for o in torch.utils._pytree.tree_leaves(out)
              if isinstance(o, torch.Tensor) and o.dtype.is_floating_point]
    total = 0
    for i, o in enumerate(leaves):
        gen = torch.Generator().manual_seed(1234 + i)
        w = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
        total = total + (o * w).sum() / max(o.numel(), 1) ** 0.5 + 0.5 * (o * o).mean()
    return total


def trial_backward(lbi, example_inputs: Sequence[object]) -> None:
    """One scan backward on the example batch at transform time: a Jacobian strategy that
    cannot differentiate a region fails here, naming the region, not mid-training; and
    ``auto`` makes its per-region choice once. Parameter ``.grad`` stays untouched."""
    params = [p for p in lbi.parameters() if p.requires_grad]
    with _named_failures(lbi, "forward", example_inputs), torch.random.fork_rng(devices=[]), \
            torch.enable_grad():
        out = lbi(*example_inputs)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.autograd.grad(default_loss(out), params, allow_unused=True)


def _probe_grads(outs, m_in, seeds) -> torch.Tensor | None:
    """B batched VJPs (one per probe); one at a time where an op has no batching rule."""
    with torch.enable_grad():
        try:
            return torch.autograd.grad(outs, m_in, seeds, retain_graph=True,
                                       allow_unused=True, is_grads_batched=True)[0]
        except (RuntimeError, NotImplementedError) as exc:
            if any(s in str(exc) for s in ("inplace", "in-place")):
                raise
        rows = [torch.autograd.grad(outs, m_in, [s[b] for s in seeds], retain_graph=True,
                                    allow_unused=True)[0] for b in range(seeds[0].shape[0])]
        return None if rows[0] is None else torch.stack(rows)


@contextmanager
def _named_failures(lbi, phase: str, example_inputs: Sequence[object]):
    """A RuntimeError while the scan path runs the rewritten model's regions: a refusal
    naming the region if the same forward fails under plain autograd too, else lbi-fx's
    own bug (``InternalError``)."""
    lbi._where = None
    try:
        yield
    except RuntimeError as exc:
        k = lbi._where
        where = f"region {k} ({', '.join(lbi.regions[k])})" if k is not None else "the model"
        cause = _plain_forward_failure(lbi, example_inputs)
        if cause is None:
            raise InternalError(
                f"lbi-fx failed in the {phase} of {where} on the example inputs with "
                f"{type(exc).__name__}: {first_line(exc)}, where plain autograd runs the "
                "same rewritten model fine", exc) from exc
        raise RewriteError(
            f"the rewritten model fails in the {phase} of {where} on the example inputs, "
            f"under plain autograd too: {first_line(cause)}") from exc


def _plain_forward_failure(lbi, example_inputs: Sequence[object]) -> BaseException | None:
    """Run the rewritten model's forward with ``backward="autograd"``: its exception, or None."""
    before = lbi.backward
    lbi.backward = "autograd"
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            lbi(*example_inputs)
    except RuntimeError as exc:
        return exc
    finally:
        lbi.backward = before
    return None
