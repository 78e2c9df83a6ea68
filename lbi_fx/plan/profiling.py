"""The single-process profile behind ``lbi-fx plan``: the crossover bench's GPT, its LBI
ranks phase by phase, its pipeline stages and the dense step, timed in CPU seconds.

Why a module of its own: it is the part that builds models and times them; everything
downstream (:mod:`~lbi_fx.plan.prediction`) works from the plain dict :func:`profile`
returns, which also survives a JSON round trip.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lbi_fx.errors import InputError
from lbi_fx.plan.traffic import lbi_shared_params, lbi_widths, pipeline_shared_params


@dataclass
class Config:
    """The model and run of a plan (the crossover bench's flags)."""

    layers: int = 6
    width: int = 64
    heads: int = 4
    seq: int = 64
    batch: int = 16
    region_size: int = 2
    rank: int = 4
    vocab: int = 256
    world: int = 2
    microbatches: tuple[int, ...] = (1, 2, 4, 8)

    @property
    def regions(self) -> list[list[int]]:
        n, s = self.layers, self.region_size
        return [list(range(i, min(i + s, n))) for i in range(0, n, s)]

    @property
    def K(self) -> int:
        return len(self.regions)

    def check(self) -> None:
        """Every refusal before any model is built, each naming its flag."""
        for k in ("layers", "width", "heads", "seq", "batch", "region_size", "rank", "world"):
            if getattr(self, k) < 1:
                raise InputError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        if self.vocab < 2:
            raise InputError(f"--vocab {self.vocab}: at least 2 tokens")
        if self.width % self.heads:
            raise InputError(f"--width {self.width} must be a multiple of --heads {self.heads}")
        if self.K < 2:
            raise InputError(f"{self.layers} layers in regions of {self.region_size}: LBI needs "
                             "at least 2 regions (one boundary)")
        if not 2 <= self.world <= self.K:
            raise InputError(f"--world {self.world}: needs 2 <= world <= K = {self.K} regions "
                             "(every rank runs at least one region / pipeline stage)")
        if not self.microbatches or min(self.microbatches) < 1:
            raise InputError(f"--microbatches {list(self.microbatches)}: ints >= 1")
        bad = [m for m in self.microbatches if self.batch % m]
        if bad:
            raise InputError(f"--microbatches {bad}: the batch {self.batch} does not split into "
                             f"{bad[0]} equal micro-batches (use divisors of --batch)")

    def as_dict(self) -> dict:
        return dict(layers=self.layers, width=self.width, heads=self.heads, seq=self.seq,
                    batch=self.batch, region_size=self.region_size, rank=self.rank,
                    vocab=self.vocab, world=self.world, microbatches=list(self.microbatches),
                    K=self.K)


def _gpt(cfg: Config):
    """The crossover bench's GPT (``models.transformer.build``, seed 0) and its data."""
    from lbi_fx.models.transformer import GPT, GPTConfig

    gcfg = GPTConfig(vocab_size=cfg.vocab, block_size=cfg.seq, n_layer=cfg.layers,
                     n_head=cfg.heads, n_embd=cfg.width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(gcfg)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
    tgt = torch.randint(0, cfg.vocab, idx.shape, generator=torch.Generator().manual_seed(1))
    return model, idx, tgt


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             target.reshape(-1))


def _lbi(cfg: Config, canvas: str):
    import lbi_fx

    model, idx, tgt = _gpt(cfg)
    torch.manual_seed(0)  # as the bench: interface modules draw from the global RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (lbi_fx.CausalityWarning, lbi_fx.FallbackWarning))
        lbi = lbi_fx.transform(model, lbi_fx.every(cfg.region_size, "layers"), rank=cfg.rank,
                               example_inputs=(idx,), canvas_weights=canvas)
    return lbi, idx, tgt


# Compute phases are timed in CPU seconds of this (one-threaded) process: what a rank
# needs from a dedicated core, whatever else the machine runs meanwhile; the simulator
# slows ranks down by the measured contention (``contention_probe``).
_clock = time.process_time


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _add_grad(p: torch.Tensor, g: torch.Tensor | None) -> None:
    if g is not None:  # as RegionParallel: clone the first, add the next ones
        p.grad = g.detach().clone() if p.grad is None else p.grad + g


def _lbi_pass(lbi, idx: torch.Tensor, tgt: torch.Tensor, mine: Sequence[int], last: bool,
              gen: torch.Generator) -> dict:
    """One micro-batch of one rank, phase by phase, through RegionParallel's calls (the
    received m_k and mbar_{k+1} are random: values do not change the cost)."""
    from lbi_fx.runtime import last_region_vjp, region_jacobian, region_local_vjp

    K = lbi.num_regions
    params = lbi._build()["params"]
    T: dict[str, float] = {}
    clock = _clock
    with lbi.profile() as prof:
        t = clock()
        with torch.enable_grad():
            pro_env = lbi.run_prologue((idx,))
        T["prologue"] = clock() - t
        m0, statics = lbi.chain_inputs(pro_env)
        env = lbi.chain_env(pro_env, statics)
        widths = lbi_widths(lbi)[0]
        k0, k1 = mine[0], mine[-1] + 1
        b = idx.shape[0]
        m = (m0.detach() if k0 == 0 else
             torch.randn(b, widths[k0], generator=gen, dtype=m0.dtype)).requires_grad_(True)
        static_grads: list = [None] * len(statics)

        def apply(k: int, grads) -> None:
            cache = caches[k]
            ns = len(cache.static)
            for (s, _), g in zip(cache.static, grads[:ns]):
                if g is not None:
                    static_grads[s] = g if static_grads[s] is None else static_grads[s] + g
            for (i, _), g in zip(cache.params, grads[ns:]):
                _add_grad(params[i], g)

        t = clock()
        caches: list = [None] * K
        caches[k0:k1] = lbi.run_regions(env, m, k0, k1)
        T["forward"] = clock() - t
        state = lbi.chain_state(caches, len(statics), len(params))
        t = clock()
        jac = {k: region_jacobian(state, k) for k in mine if k < K - 1}
        T["jacobian"] = clock() - t
        if last:
            t = clock()
            names = [n for n in lbi.program_spec.regions[K - 1].outputs
                     if isinstance(env[n], torch.Tensor)]
            leaves = [o.detach().requires_grad_(o.requires_grad) for o in caches[K - 1].outs]
            epi_env = {**env, **pro_env, **dict(zip(names, leaves))}
            with torch.enable_grad():
                loss = _loss(lbi.run_epilogue(epi_env), tgt)
            loss.backward(retain_graph=True)
            seed = last_region_vjp(state, *[leaf.grad for leaf in leaves])
            apply(K - 1, seed[1:])
            T["seed"] = clock() - t
        t = clock()
        for k in mine:
            if k < K - 1:
                g = torch.randn(b, widths[k + 1], generator=gen, dtype=m0.dtype)
                apply(k, region_local_vjp(state, k, g))
        T["local"] = clock() - t
        t = clock()
        roots, grads = [], []
        for s, g in zip(statics, static_grads):
            if g is not None and s.requires_grad:
                roots.append(s)
                grads.append(g)
        if k0 == 0 and m0.requires_grad:
            roots.append(m0)
            grads.append(torch.randn(m0.shape, generator=gen, dtype=m0.dtype))
        if roots:
            torch.autograd.backward(roots, grads)
        T["prologue_bwd"] = clock() - t
    for key, vals in prof.items():
        T[f"region:{key}"] = sum(vals)
    T["_jac"], T["_state"], T["_elem"] = jac, state, m0.element_size()
    return T


def _scan_time(state, jacs: list[torch.Tensor], B: int, start: int, reps: int) -> float:
    """Seconds of the suffix scan and mbar products over ``jacs`` at B rows, as the rank
    runs it once per step over every micro-batch's rows."""
    from lbi_fx.kernels import suffix_scan
    from lbi_fx.runtime import interface_adjoints

    if not jacs:
        return 0.0
    J = torch.stack([j.repeat(-(-B // j.shape[0]), 1, 1)[:B] for j in jacs], 1)
    mbar = torch.zeros(B, J.shape[-1], dtype=J.dtype)
    ts = []
    for _ in range(reps + 1):
        t = _clock()
        P = suffix_scan(J, state.scan_backend)
        interface_adjoints(state, P, mbar, start=start)
        ts.append(_clock() - t)
    return median(ts[1:])


def profile_lbi(cfg: Config, canvas: str, sizes: Sequence[int], reps: int = 5,
                warmup: int = 2) -> dict:
    """Per micro-batch size b: per rank of ``placement(K, world)`` the seconds of each
    phase (:class:`LBIRank` fields) and per region forward / J_k / local VJP / seed; plus
    the shapes and shared parameters the byte accounting needs."""
    from lbi_fx.distributed import placement

    lbi, idx, tgt = _lbi(cfg, canvas)
    K, W, B = lbi.num_regions, cfg.world, cfg.batch
    place = placement(K, W)
    gen = torch.Generator().manual_seed(2)
    widths, r_max = lbi_widths(lbi)
    out: dict = dict(canvas=canvas, place=place, widths=widths, r_max=r_max, elem=4,
                     shared=lbi_shared_params(lbi, W), per_b={})
    scans: dict[int, dict] = {}
    for b in sorted(set(sizes), reverse=True):
        ranks, regions = [], {}
        for j, mine in enumerate(place):
            runs = []
            for _ in range(warmup + reps):
                lbi.zero_grad(set_to_none=True)
                runs.append(_lbi_pass(lbi, idx[:b], tgt[:b], mine, j == W - 1, gen))
            runs = runs[warmup:]
            med = {k: median([r.get(k, 0.0) for r in runs]) for k in runs[0]
                   if not k.startswith("_")}
            out["elem"] = runs[-1]["_elem"]
            if j not in scans:  # once per step over all B rows: the same for every M
                jac, state = runs[-1]["_jac"], runs[-1]["_state"]
                like = next(iter(jac.values()), None)
                # allgather: the rank scans J_{k0} .. J_{K-2}, the later ones gathered
                later = [jac.get(k, like) for k in range(mine[0], K - 1)]
                own = [jac[k] for k in mine if k < K - 1]
                scans[j] = dict(
                    allgather=_scan_time(state, [x for x in later if x is not None], B,
                                         mine[0], reps),
                    relay=_scan_time(state, own, B, mine[0], reps))
            ranks.append(dict(prologue=med["prologue"], forward=med["forward"],
                              jacobian=med["jacobian"], seed=med.get("seed", 0.0),
                              local=med["local"], prologue_bwd=med["prologue_bwd"],
                              scan=scans[j]))
            regions.update({k.split(":", 1)[1]: v for k, v in med.items()
                            if k.startswith("region:")})
        out["per_b"][b] = dict(ranks=ranks, regions=regions)
    lbi.zero_grad(set_to_none=True)
    return out


def _dense_pass(model, idx: torch.Tensor, tgt: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    t = _clock()
    _loss(model(idx), tgt).backward()
    return _clock() - t


def profile_pipeline(cfg: Config, sizes: Sequence[int], reps: int = 5, warmup: int = 2) -> dict:
    """Per micro-batch size b and pipeline stage: forward (the last with the loss) and
    backward seconds of ``lbi_fx.pipelining``'s stage modules; the schedule's own cost per
    forward or backward action (:func:`pipeline_overhead`); shapes and the tied
    parameters for the bytes."""
    from lbi_fx.distributed import placement
    from lbi_fx.pipelining import _Stage

    model, idx, tgt = _gpt(cfg)
    regions = cfg.regions
    place = placement(len(regions), cfg.world)
    stage_layers = [[i for k in ks for i in regions[k]] for ks in place]
    W = len(stage_layers)
    stages = [_Stage(model, ls, j == 0, j == W - 1) for j, ls in enumerate(stage_layers)]
    gen = torch.Generator().manual_seed(3)
    per_b = {}
    for b in sorted(set(sizes), reverse=True):
        fwd, bwd = [], []
        for j, st in enumerate(stages):
            tf, tb = [], []
            for _ in range(warmup + reps):
                model.zero_grad(set_to_none=True)
                x = idx[:b] if j == 0 else torch.randn(b, cfg.seq, cfg.width, generator=gen,
                                                       requires_grad=True)
                t = _clock()
                out = st(x)
                if j == W - 1:
                    out = _loss(out, tgt[:b])
                tf.append(_clock() - t)
                g = None if j == W - 1 else torch.randn(out.shape, generator=gen)
                t = _clock()
                out.backward(g)
                tb.append(_clock() - t)
            fwd.append(median(tf[warmup:]))
            bwd.append(median(tb[warmup:]))
        per_b[b] = dict(fwd=fwd, bwd=bwd)
    model.zero_grad(set_to_none=True)
    overhead, note = pipeline_overhead(cfg, sizes, reps, warmup)
    return dict(stage_layers=stage_layers, act_per_row=cfg.seq * cfg.width,
                elem=model.wte.weight.element_size(),
                shared=pipeline_shared_params(model, stage_layers), per_b=per_b,
                overhead=overhead, overhead_note=note)


def pipeline_overhead(cfg: Config, sizes: Sequence[int], reps: int = 5,
                      warmup: int = 2) -> tuple[dict[int, float], str]:
    """torch.distributed.pipelining's own seconds per forward or backward action at each
    micro-batch size: a one-rank ``PipelineRunner`` (GPipe, one stage, no communication)
    minus M x the plain forward + backward at b, over 2M actions. Needs a one-rank gloo
    group of its own: where this process already has a default group, 0 (and why)."""
    import torch.distributed as dist

    zero = {b: 0.0 for b in sizes}
    if not dist.is_available() or not dist.is_gloo_available():
        return zero, "torch.distributed with gloo is unavailable: schedule overhead taken as 0"
    if dist.is_initialized():
        return zero, ("this process already has a process group: schedule overhead taken as 0")
    from lbi_fx.distributed import Comm
    from lbi_fx.pipelining import PipelineRunner

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        out = {}
        for b in sorted(set(sizes), reverse=True):
            M = cfg.batch // b
            model, idx, tgt = _gpt(cfg)
            runner = PipelineRunner(model, [list(range(cfg.layers))], schedule="gpipe",
                                    microbatches=M, loss_fn=_loss, comm=Comm(None),
                                    sync_params=False)
            steps, plain = [], []
            for _ in range(warmup + reps):
                model.zero_grad(set_to_none=True)
                t = _clock()
                runner.step(idx, tgt)
                steps.append(_clock() - t)
                plain.append(sum(_dense_pass(model, idx[i * b:(i + 1) * b], tgt[i * b:(i + 1) * b])
                                 for i in range(M)))
            extra = median(steps[warmup:]) - median(plain[warmup:])
            out[b] = max(0.0, extra / (2 * M))
    finally:
        dist.destroy_process_group()
    return out, "one-rank GPipe step minus plain forward + backward, per action"


def profile_dense(cfg: Config, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds of forward + loss + backward of the whole model at the full batch."""
    model, idx, tgt = _gpt(cfg)
    ts = [_dense_pass(model, idx, tgt) for _ in range(warmup + reps)]
    return median(ts[warmup:])


def profile(cfg: Config, reps: int = 5, warmup: int = 2, progress=None) -> dict:
    """Everything :func:`predict` needs, measured on one thread (restored afterwards)."""
    cfg.check()
    if reps < 1 or warmup < 0:
        raise InputError(f"--reps {reps} must be >= 1 and --warmup {warmup} >= 0")
    sizes = sorted({cfg.batch // m for m in cfg.microbatches}, reverse=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        def note(what: str) -> None:
            if progress is not None:
                progress(f"profiling {what} ({time.perf_counter() - t0:.1f} s)")
        note("dense")
        dense = profile_dense(cfg, reps, warmup)
        note("pipeline stages")
        pipe = profile_pipeline(cfg, sizes, reps, warmup)
        lbi = {}
        for canvas in ("shared", "per_region"):
            note(f"LBI {canvas} canvas")
            lbi[canvas] = profile_lbi(cfg, canvas, sizes, reps, warmup)
    finally:
        torch.set_num_threads(threads)
    return dict(config=cfg.as_dict(), reps=reps, warmup=warmup, dense_s=dense, pipeline=pipe,
                lbi=lbi, seconds=time.perf_counter() - t0)
