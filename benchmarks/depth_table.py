"""The depth table of docs/depth.md from ``lbi-fx quality --long --json`` runs.

Every JSON under the given folder (default ``benchmarks/results/depth``) is one run of one
seed: dense rows (trained or reused) and LBI rows, each with its leak-free CE and its depth
recovery against the dense rows of the same seed. Rows are grouped by name across seeds.

    python benchmarks/depth_table.py [FOLDER] [--plot docs/depth.png]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics


def load(folder: str) -> dict[str, dict[int, dict]]:
    """name -> seed -> row (the first file that has it wins; files agree on dense rows)."""
    rows: dict[str, dict[int, dict]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        if os.path.getsize(path) == 0:  # a run still in progress writes its JSON at the end
            continue
        with open(path) as f:
            for r in json.load(f):
                rows.setdefault(r["name"], {}).setdefault(r["seed"], dict(r, file=path))
    return rows


def design(row: dict) -> str:
    """The name ``benchmarks/depth_runs.sh`` gives the row's design ("-" for dense): its
    file's stem; the LBI row of a dense file is the per-position preset."""
    if row["model"] == "dense":
        return "-"
    stem = os.path.basename(row["file"]).rsplit("_seed", 1)[0]
    return "per_position" if stem == "dense" else stem


def table(rows: dict[str, dict[int, dict]]) -> list[dict]:
    out = []
    for name, by_seed in rows.items():
        seeds = sorted(by_seed)
        ce = [by_seed[s]["ce_leak_free"] for s in seeds]
        rec = [by_seed[s]["depth_recovery"] for s in seeds]
        first = by_seed[seeds[0]]
        out.append({"name": name, "model": first["model"], "layers": first["layers"],
                    "design": design(first),
                    "scalars": first.get("scalars"), "seeds": seeds, "ce": ce,
                    "ce_mean": statistics.fmean(ce), "recovery": rec,
                    "recovery_mean": statistics.fmean(rec) if None not in rec else None})
    dense = [r for r in out if r["model"] == "dense"]
    lbi = sorted((r for r in out if r["model"] != "dense"),
                 key=lambda r: -(r["recovery_mean"] or -9))
    return sorted(dense, key=lambda r: -r["layers"]) + lbi


def markdown(rows: list[dict]) -> str:
    lines = ["| model | design | scalars | seeds | CE leak-free per seed | mean "
             "| depth recovery per seed | mean |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["name"] if r["model"] != "dense" else f"dense, {r['layers']} layers"
        rec = " / ".join(f"{x:.2f}" for x in r["recovery"])
        mean = "-" if r["recovery_mean"] is None else f"**{r['recovery_mean']:.2f}**"
        lines.append(f"| {name} | {r['design']} | {r['scalars'] or '-'} | {len(r['seeds'])} | "
                     f"{' / '.join(f'{x:.4f}' for x in r['ce'])} | {r['ce_mean']:.4f} | {rec} | "
                     f"{mean} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lbi = [r for r in rows if r["model"] != "dense"][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(lbi) + 1.5))
    for i, r in enumerate(lbi):
        color = ("tab:orange" if r["model"] == "spl" else
                 "tab:blue" if (r["scalars"] or 0) <= 64 else "tab:gray")
        ax.barh(i, r["recovery_mean"], color=color, alpha=0.5)
        ax.plot(r["recovery"], [i] * len(r["recovery"]), "k.", ms=6)
    ax.set_yticks(range(len(lbi)), [f"{r['design']} ({len(r['seeds'])} seeds)" for r in lbi],
                  fontsize=8)
    refs = [(0, "one region alone"), (1, "dense, full depth")]
    refs += [(r["recovery_mean"], f"dense, {r['layers']} layers") for r in rows
             if r["model"] == "dense" and 0 < r["recovery_mean"] < 1]
    for x, label in refs:
        ax.axvline(x, color="black", lw=1, ls="-" if x in (0, 1) else ":")
        ax.text(x, len(lbi) - 0.4, label, fontsize=7, ha="center")
    ax.axvline(0.5, color="tab:red", ls="--", lw=1)
    ax.set_xlabel("depth recovery (0: one region alone, 1: dense at full depth); "
                  "dots: seeds, bars: mean;\nblue: LBI at <= 64 scalars, grey: more, "
                  "orange: SPL (whole hidden state, detached)")
    ax.set_title("Depth kept by each interface design (GPT 6 x 64, regions of 2, 6000 steps)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=os.path.join(os.path.dirname(__file__),
                                                              "results", "depth"))
    ap.add_argument("--plot", metavar="PNG")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = table(load(args.folder))
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
