"""The text ``lbi-fx plan`` prints: the prediction table, bytes per step, the crossover
and, with ``--validate``, every cell's error.

Why a module of its own: formatting only; it reads the result dict that ``--json``
prints, so the text and the JSON cannot disagree.
"""

from __future__ import annotations

from lbi_fx.bench.link import format_rate
from lbi_fx.plan.prediction import LABELS


def report(res: dict) -> str:
    c = res["config"]
    prof = res["profile"]
    lines = [f"GPT {c['layers']} layers, width {c['width']}, {c['heads']} heads, seq {c['seq']}, "
             f"batch {c['batch']}, vocab {c['vocab']}; K = {c['K']} regions of "
             f"{c['region_size']} layers, interface rank {c['rank']}; world {c['world']}; "
             f"M in {c['microbatches']}",
             f"profiled in {prof['seconds']:.1f} s on one thread (median of {prof['reps']} after "
             f"{prof['warmup']} warm-up); link: {res['link']['latency_s'] * 1e3:.2f} ms per "
             f"message, loopback {format_rate(res['link']['loopback_bytes_per_s'] * 8)}, tbf "
             f"burst {res['link']['burst_bytes']:.0f} B, x{res['link']['overhead']:.3f} wire "
             "bytes when shaped; " + (
                 "rank speed with 1.. ranks busy " + ", ".join(
                     f"{x:.2f}" for x in res["link"]["speeds"])
                 if res["link"]["speeds"] else "a core per rank"),
             "predicted step seconds (best M):"]
    methods = res["methods"]
    lines.append(f"{'rate':<10}" + "".join(f"{LABELS[m]:>22}" for m in methods) + "   fastest")
    for rate in res["rates"]:
        cells = []
        for m in methods:
            t = res["table"][rate][m]
            cells.append("-" if t is None else f"{t['step_s']:.4f} (M={t['microbatches']})")
        lines.append(f"{rate:<10}" + "".join(f"{x:>22}" for x in cells)
                     + f"   {LABELS[res['fastest'][rate]]}")
    lines.append("bytes per step on the wire, all ranks (step_bytes accounting; headers "
                 "left out):")
    for m in methods:
        if res["bytes"][m]:
            b = res["bytes"][m]
            lines.append(f"  {LABELS[m]:<22} {sum(b.values()):>10,}  ("
                         + ", ".join(f"{k} {v:,}" for k, v in b.items()) + ")")
    lines.append(res["crossover"]["text"])
    v = res.get("validation")
    if v:
        lines += _validation_lines(v)
    return "\n".join(lines)


def _validation_lines(v: dict) -> list[str]:
    out = [f"validation against {v['path']} (bench mode {v['mode']}); error = predicted / "
           "measured - 1"]
    for name, s in (("default latency", v["default"]),
                    (f"latency fitted to {v['fitted_latency']['fitted_on']} unshaped "
                     f"(pipeline) rows: {v['fitted_latency']['latency_s'] * 1e3:.2f} ms"
                     if v["fitted_latency"] else "", v["fitted_latency"])):
        if not s:
            continue
        out.append(f"  {name}:")
        out.append(f"    {'rate':<10}{'method':<24}{'M':>3}{'measured':>11}{'predicted':>11}"
                   f"{'error':>9}")
        for cell in s["cells"]:
            flag = " (bench-modeled)" if cell["modeled"] else (
                "  > {:.0%}".format(v["threshold"]) if abs(cell["rel_error"]) > v["threshold"]
                else "")
            out.append(f"    {cell['rate']:<10}{cell['method']:<24}{cell['microbatches']:>3}"
                       f"{cell['measured_s']:>11.4f}{cell['predicted_s']:>11.4f}"
                       f"{cell['rel_error']:>+9.1%}{flag}")
        if s["max_abs_rel_error"] is not None:
            w = s["worst"]
            out.append(f"    max |error| {s['max_abs_rel_error']:.1%} ({w['rate']} {w['method']} "
                       f"M={w['microbatches']}), median {s['median_abs_rel_error']:.1%}; "
                       f"{len(s['over'])} measured cells exceed {v['threshold']:.0%}"
                       + (": " + ", ".join(f"{c['rate']} {c['method']} M={c['microbatches']}"
                                           for c in s["over"]) if s["over"] else ""))
    return out
