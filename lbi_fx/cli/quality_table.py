"""The table of ``lbi-fx quality``: which config dense rows reused with ``--reuse-dense``
must share with this run, how the header names the protocol, and how rows and curves are
shown (markdown, plot).

Kept apart from training the rows (``quality.py``): this decides whether two tables'
numbers may sit side by side and how they read; ``cfg`` is a ``quality.Config``.
"""

from __future__ import annotations

import json
import statistics

import lbi_fx


def reuse_rows(path: str, cfg) -> dict:
    """The dense rows of an earlier ``--json`` run, checked to be from this config."""
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError) as exc:
        raise lbi_fx.InputError(f"--reuse-dense {path}: cannot read a JSON table ({exc})") from None
    dense = {r["name"]: r for r in rows if isinstance(r, dict) and r.get("model") == "dense"}
    if not dense:
        raise lbi_fx.InputError(f"--reuse-dense {path}: no dense rows in it")
    # a table from before the protocol fields was trained at a constant rate of 3e-3 (no
    # flag set it) and scored on the curve's batches; the fields of ``cfg.recorded`` have
    # no such default (flags changed them), so rows without them are refused
    before = {"schedule": "constant", "warmup": 0, "min_lr": 0.1, "final_eval_batches": 0,
              "lr": 3e-3}
    for r in dense.values():
        for key, want in (("steps", cfg.steps), ("seeds", cfg.seeds), ("seed", cfg.seed),
                          *cfg.protocol.items(), *cfg.recorded.items()):
            if key not in r and key not in before:
                raise lbi_fx.InputError(
                    f"--reuse-dense {path}: row {r['name']!r} does not record {key} (this run "
                    f"{want}; a table from before rows recorded it), so it may be of another "
                    "config; rerun the dense rows with this lbi-fx and reuse that table")
            if r.get(key, before.get(key)) != want:
                raise lbi_fx.InputError(
                    f"--reuse-dense {path}: row {r['name']!r} has {key} "
                    f"{r.get(key, before.get(key))}, this run "
                    f"{want}; rerun the dense rows or pass a table of the same config")
    return dense


def _protocol_text(cfg) -> str:
    """The learning rate and the scoring set, for the header."""
    rate = (f"lr {cfg.lr:g} cosine to {cfg.min_lr:g}x" if cfg.schedule == "cosine"
            else f"lr {cfg.lr:g} constant")
    if cfg.warmup:
        rate += f" after {cfg.warmup} warm-up steps"
    batches = cfg.final_eval_batches or cfg.eval_batches
    return f"{rate}, scored on {batches} held-out batches"


def _backward_text(cfg) -> str:
    """How the LBI rows were trained, for the header: which steps ran which backward."""
    if cfg.backward == "scan" or cfg.timed_steps >= cfg.steps:
        return f"LBI backward: scan, the first {cfg.timed_steps} steps timed"
    return (f"LBI backward: scan for the first {cfg.timed_steps} steps (timed), then "
            f"{cfg.backward} (same gradients) for the other {cfg.steps - cfg.timed_steps}")


def format_table(rows: list[dict]) -> str:
    head = ("| model | layers | interface | scalars | CE one forward | CE leak-free (± seeds) | "
            "leak | gap to dense | depth recovery | steps x seeds | step / dense |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        design = r["name"].partition(", ")[2]  # zero decoders, norm, canvas, summary
        iface = "-" if r["model"] != "lbi" else (
            f"{r['pool']} {r['rank']} x {r['segments']}" + (f", {design}" if design else ""))
        model = {"dense": "dense", "lbi": "LBI", "spl": "SPL (detach)"}[r["model"]]
        rec = "-" if r.get("depth_recovery") is None else f"{r['depth_recovery']:+.2f}"
        lines.append(
            f"| {model} | {r['layers']} | {iface} | {r['scalars'] or '-'} | {r['ce']:.3f} | "
            f"{r['ce_leak_free']:.3f} ± {r['spread']:.3f} | {r['leak']:+.3f} | "
            f"{r['gap_leak_free']:+.3f} | {rec} | {r['steps']} x {r['seeds']} | "
            f"{r['step_ratio']:.2f}x |")
    return "\n".join(lines)


def plot(curves: dict, path: str) -> None:
    """Leak-free validation curves (left) and the deepest suffix product ||P_0||_2 with
    the mean ||J_k||_2 (right), per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in curves.items():
        steps = [p["step"] for p in curve]
        style = {"color": "black", "lw": 2} if name == "dense" else {}
        (line,) = ax.plot(steps, [p["ce_leak_free"] for p in curve], marker="o", ms=3,
                          label=name, **style)
        if curve and "spectra" in curve[0]:
            bx.plot(steps, [p["spectra"][0]["suffix_spectral"] for p in curve], marker="o", ms=3,
                    color=line.get_color(), label=f"{name}: ||P_0||_2")
            bx.plot(steps, [statistics.fmean(s["jac_spectral"] for s in p["spectra"])
                            for p in curve], ls="--", color=line.get_color(), alpha=0.6)
    ax.set(xlabel="step", ylabel="held-out CE, leak-free (nats/byte)",
           title="leak-free validation loss (same batches)")
    ax.legend(fontsize=8)
    bx.set(xlabel="step", ylabel="spectral norm (batch mean)", yscale="log",
           title="interface spectra: ||P_0||_2 (solid), mean ||J_k||_2 (dashed)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
