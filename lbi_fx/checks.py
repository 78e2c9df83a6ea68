"""Numerical checks run on a built ``LBIModule`` at transform time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lbi_fx.errors import BatchMixingError


def probe_batch_mixing(lbi, example_inputs: Sequence[object]) -> None:
    """Every region must map sample b's m_k to sample b's outputs only.

    Runs the chain once on the example batch and takes, per region, the gradient of
    sample 0's outputs with respect to all samples' m_k: any nonzero row for another
    sample means the region mixes samples (a batch-axis op the static check missed).
    """
    c = lbi._build()
    spec = lbi._programs_spec
    with torch.enable_grad():
        flat = lbi._flatten(tuple(example_inputs), {})
        env = dict(zip(spec.prologue.outputs, c["prologue"](*flat)))
        from lbi_fx.module import _Call

        call = _Call({k: v for k, v in env.items() if k not in c["static_names"]})
        statics = [env[n] for n in c["static_names"]]
        state, _ = lbi.run_chain(call, env[spec.m_nodes[0]], statics, c["params"], keep=True)
    for k, cache in enumerate(state.caches):
        outs = [o for o in cache.outs if o.requires_grad and o.dim() > 0
                and o.shape[0] == cache.m_in.shape[0]]
        if cache.m_in.shape[0] < 2 or not outs:
            continue
        seeds = [torch.zeros_like(o) for o in outs]
        for s in seeds:
            s[0] = 1.0
        (g,) = torch.autograd.grad(outs, cache.m_in, seeds, retain_graph=True, allow_unused=True)
        if g is None:
            continue
        leak = g[1:].abs().max().item()
        if leak > 0:
            raise BatchMixingError(
                f"region {k} ({', '.join(lbi.regions[k])}) mixes samples: sample 0's outputs "
                f"depend on other samples' interface state (|d out_0 / d m_b| = {leak:.2e}). "
                "Look for reductions, views or norms over the batch axis inside the region")


def trial_backward(lbi, example_inputs: Sequence[object]) -> None:
    """One scan backward on the example batch at transform time: a Jacobian strategy that
    cannot differentiate a region fails here, naming the region, not mid-training; and
    ``auto`` makes its per-region choice once. Parameter ``.grad`` stays untouched."""
    from lbi_fx.testing import default_loss

    params = [p for p in lbi.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        loss = default_loss(lbi(*example_inputs))
        torch.autograd.grad(loss, params, allow_unused=True)
