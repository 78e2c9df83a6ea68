"""The parts of ``scripts/gpu_check.sh`` and its ``gpu_results.json`` (stdlib only: it also
writes the "no CUDA" result on a machine without torch).

Environment (set by gpu_check.sh): GPU_CHECK_MODE (no-cuda | setup-failed | run), ROOT,
START (epoch seconds), BUDGET (seconds for everything), RESULTS (the JSON path), LOGS (a
folder for each part's output), SETUP_RC / SETUP_WALL / SETUP_S, GPU_CHECK_WHY.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.environ.get("ROOT", os.getcwd())
START = float(os.environ.get("START", time.time()))
BUDGET = float(os.environ.get("BUDGET", 480))
RESULTS = os.environ.get("RESULTS", os.path.join(ROOT, "gpu_results.json"))
LOGS = os.environ.get("LOGS", os.path.join(os.path.dirname(RESULTS), "gpu_check_logs"))
VPY = os.path.join(ROOT, ".venv", "bin", "python")
# GPU_CHECK_DEVICE=cpu: a dry run of the plumbing on a CPU machine (benches on the CPU, the
# GPU tests all skip); the status then says "dry run", never "ok"
DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")
RESERVE = 5.0  # seconds kept for writing the JSON


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _base(status: str, message: str) -> dict:
    return {"status": status, "message": message,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": BUDGET, "logs": LOGS, "parts": {}}


def _setup_part() -> dict:
    rc = int(os.environ.get("SETUP_RC", "0"))
    return {"status": "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed"),
            "rc": rc, "wall_s": float(os.environ.get("SETUP_WALL", "0")),
            "timeout_s": float(os.environ.get("SETUP_S", "0")), "log": "setup.log",
            **({} if rc == 0 else {"tail": _tail(os.path.join(LOGS, "setup.log"))})}


def _write(result: dict) -> None:
    result["wall_s"] = round(time.time() - START, 1)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def run_part(name: str, argv: list[str], limit: float, env: dict | None = None) -> dict:
    """Run one part in its own process group under min(limit, what the budget has left);
    stdout to LOGS/name.out, stderr to LOGS/name.err."""
    left = BUDGET - (time.time() - START) - RESERVE
    timeout = min(limit, left)
    part = {"cmd": " ".join(argv), "timeout_s": round(timeout, 1), "log": f"{name}.out"}
    if timeout < 10:
        return {**part, "status": "skipped", "why": "the budget is spent"}
    out_path, err_path = os.path.join(LOGS, f"{name}.out"), os.path.join(LOGS, f"{name}.err")
    t0 = time.time()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, status = proc.wait(), "timeout"
    part.update(status=status, rc=rc, wall_s=round(time.time() - t0, 1))
    if status != "ok":
        part["tail"] = _tail(err_path) or _tail(out_path)
    return part


def _json_out(name: str):
    """The last JSON document a part printed on stdout (benches print one)."""
    text = _tail(os.path.join(LOGS, f"{name}.out"), 10**7).strip()
    for start in (text.find("["), text.find("{")):
        if start >= 0:
            try:
                return json.loads(text[start:])
            except ValueError:
                continue
    return None


def _pytest_figures(xml_path: str) -> dict:
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad, skipped = [], []
    for case in suite.iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            bad.append(test)
        elif case.find("skipped") is not None:
            skipped.append(f"{test}: {case.find('skipped').get('message', '')}"[:200])
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failing": bad[:20], "skipped_why": skipped[:20]}


def _scan_figures(rows) -> dict:
    if not isinstance(rows, list) or not rows:
        return {}
    tri = [r["triton_speedup"] for r in rows if r.get("triton_speedup") is not None]
    return {"triton_ran": len(tri) == len(rows),
            "triton_speedup_min": min(tri, default=None), "triton_speedup_max": max(tri, default=None),
            "torch_speedup_max": max(r["torch_speedup"] for r in rows),
            "rows": [{k: r[k] for k in ("K", "r", "N", "sequential_ms", "torch_ms", "triton_ms")}
                     for r in rows]}


STEP_KEYS = ("model", "strategy", "regions", "width", "batch", "step_ratio", "work_bound", "eta",
             "span_ratio", "scan_share", "peak_memory_ratio", "autograd_backward_s",
             "lbi_backward_s", "device")


def _step_figures(m) -> dict:
    return {k: m[k] for k in STEP_KEYS if k in m} if isinstance(m, dict) else {}


def _pgf_figures(m) -> dict:
    if not isinstance(m, dict):
        return {}
    keep = ("method", "L", "seconds", "peak_bytes", "max_rel_grad_diff_vs_loop",
            "max_rel_grad_diff", "time_vs_pgf", "peak_vs_pgf", "skipped")
    return {"config": m.get("config"),
            "scan": [{k: r[k] for k in keep if k in r} for r in m.get("scan", [])][:40],
            "mamba2": [{k: r[k] for k in keep if k in r} for r in m.get("mamba2", [])][:20]}


def _device() -> dict:
    code = ("import json, torch; from lbi_fx.kernels import triton_available; "
            "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'available': torch.cuda.is_available(), 'name': torch.cuda.get_device_name(0) "
            "if torch.cuda.is_available() else None, 'triton': triton_available()}))")
    try:
        out = subprocess.run([VPY, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"available": False, "error": "could not import torch from .venv"}


def main() -> int:
    os.makedirs(LOGS, exist_ok=True)
    mode = os.environ.get("GPU_CHECK_MODE", "run")
    if mode == "no-cuda":
        _write(_base("no CUDA", os.environ.get("GPU_CHECK_WHY", "no CUDA device")))
        return 0
    if mode == "setup-failed":
        result = _base("failed", "set-up failed: see parts.setup")
        result["parts"]["setup"] = _setup_part()
        _write(result)
        return 1
    device = _device()
    if not device.get("available") and DEV == "cuda":
        result = _base("no CUDA", f"torch in .venv sees no CUDA device ({device})")
        result["device"], result["parts"]["setup"] = device, _setup_part()
        _write(result)
        print(f"gpu_check: no CUDA: {result['message']}", file=sys.stderr)
        return 0
    result = _base("ok" if DEV == "cuda" else "dry run", "")
    result["device"] = device
    parts = result["parts"]
    parts["setup"] = _setup_part()
    _write(result)  # a result on disk even if this process is killed later
    lbi = [VPY, "-m", "lbi_fx"]
    xml = os.path.join(LOGS, "pytest_gpu.xml")
    plan = [
        ("pytest_gpu", [VPY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        f"--junitxml={xml}", "tests"], 180,
         lambda: _pytest_figures(xml)),
        ("bench_scan", lbi + ["bench", "scan", "--device", DEV, "--quick", "--json"], 60,
         lambda: _scan_figures(_json_out("bench_scan"))),
        ("bench_step_transformer", lbi + ["bench", "step", "--device", DEV, "--model",
                                          "transformer", "--steps", "3", "--json"], 75,
         lambda: _step_figures(_json_out("bench_step_transformer"))),
        ("bench_step_mamba2", lbi + ["bench", "step", "--device", DEV, "--model", "mamba2",
                                     "--steps", "3", "--json"], 75,
         lambda: _step_figures(_json_out("bench_step_mamba2"))),
        ("bench_pgf", lbi + ["bench", "pgf", "--device", DEV, "--quick", "--json"], 90,
         lambda: _pgf_figures(_json_out("bench_pgf"))),
    ]
    for name, argv, limit, figures in plan:
        parts[name] = run_part(name, argv, limit)
        if parts[name]["status"] in ("ok", "failed"):
            parts[name]["figures"] = figures()
        _write(result)
    bad = [n for n, p in parts.items() if p["status"] != "ok"]
    result["status"] = ("ok" if DEV == "cuda" else "dry run") if not bad else "failed"
    result["message"] = ("every part ok" if not bad else
                         "not ok: " + ", ".join(f"{n} ({parts[n]['status']})" for n in bad))
    _write(result)
    print(f"gpu_check: {result['message']} in {result['wall_s']} s; wrote {RESULTS}",
          file=sys.stderr)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
