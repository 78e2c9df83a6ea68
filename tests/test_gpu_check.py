"""``scripts/gpu_check.sh`` without CUDA (issue 25): it installs and runs nothing, says
why on stderr, exits 0 and still writes ``gpu_results.json`` with status "no CUDA"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _check(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT,
                          env={**os.environ, "OUT": str(tmp_path), **env}, capture_output=True,
                          text=True, timeout=60)
    return proc, json.loads((tmp_path / "gpu_results.json").read_text())


def test_no_visible_device_writes_no_cuda_and_exits_0(tmp_path):
    proc, result = _check(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "no CUDA" and "CUDA_VISIBLE_DEVICES" in result["message"]
    assert result["parts"] == {} and result["budget_s"] == 480
    assert "no CUDA" in proc.stderr and "gpu_results.json" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_torch_without_cuda_is_no_cuda_too(tmp_path):
    """The driver may be there while the .venv's torch is a CPU build: the report script
    asks torch, and says so (what the script runs after its set-up)."""
    env = {**os.environ, "GPU_CHECK_MODE": "run", "ROOT": str(ROOT),
           "RESULTS": str(tmp_path / "gpu_results.json"), "LOGS": str(tmp_path / "logs"),
           "SETUP_RC": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_report.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    result = json.loads((tmp_path / "gpu_results.json").read_text())
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "no CUDA" and result["device"]["available"] is False
    assert "torch in .venv sees no CUDA device" in result["message"]
    assert set(result["parts"]) == {"setup"}  # no test or bench ran


FAKE_PY = """#!/usr/bin/env bash
# a stand-in Python: logs its arguments; CUDA, imports and pip answer as $FAKE_* say
echo "$*" >> "$FAKE_LOG"
case "$*" in
  *"-m venv"*) mkdir -p .venv/bin && cp "$FAKE_SELF" .venv/bin/python && exit 0 ;;
  *cuda.is_available*) [ "$FAKE_CUDA" = 1 ] ;;
  *"import lbi_fx, pytest, hypothesis, transformers"*) [ "$FAKE_INSTALLED" = 1 ] ;;
  *"--no-index"*) exit 0 ;;
  *"-m pip"*) exit 1 ;;  # no network
  *) exit 0 ;;
esac
"""


def _setup(tmp_path: Path, cuda: bool, installed: bool) -> tuple[int, list[str]]:
    fake = tmp_path / "py"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_SELF": str(fake),
           "FAKE_CUDA": str(int(cuda)), "FAKE_INSTALLED": str(int(installed))}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_setup.sh"), str(fake)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, log.read_text().splitlines()


def test_offline_cuda_machine_uses_its_own_torch(tmp_path):
    """A GPU machine without network whose system Python has a CUDA torch (the device
    lent on 2026-12-04: its set-up died trying to download torch==2.13.0): the venv borrows
    the system packages (a .pth of the site dirs that Python sees) and nothing is
    downloaded."""
    rc, calls = _setup(tmp_path, cuda=True, installed=True)
    assert rc == 0
    assert "-m venv .venv" in calls
    assert not any("-m pip" in c for c in calls)


def test_offline_machine_installs_lbi_fx_without_dependencies(tmp_path):
    rc, calls = _setup(tmp_path, cuda=True, installed=False)
    assert rc == 0
    pips = [c for c in calls if "-m pip" in c]
    assert len(pips) == 2 and ".[test]" in pips[0] and "--no-index" in pips[1]
    assert not any("torch==" in c for c in calls)


def test_machine_without_a_cuda_torch_gets_the_pinned_wheel(tmp_path):
    rc, calls = _setup(tmp_path, cuda=False, installed=True)
    assert rc != 0  # the download fails here (the fake has no network), and says so
    assert "-m venv .venv" in calls
    assert any("torch==2.13.0" in c for c in calls)


def test_offline_machine_with_a_wheelhouse_never_asks_an_index(tmp_path):
    """With wheelhouse/ carried (scripts/build_wheelhouse.sh), every pip call is --no-index
    against it, torch is held at the machine's version by a constraint, and lbi-fx is
    installed editable without its dependencies (the real thing, offline, is rehearsed in
    tests/test_gpu_setup_offline.py)."""
    (tmp_path / "wheelhouse").mkdir()
    for name in ("pip-26.3-py3-none-any.whl", "transformers-5.25.0-py3-none-any.whl"):
        (tmp_path / "wheelhouse" / name).write_text("")
    rc, calls = _setup(tmp_path, cuda=True, installed=False)
    assert rc == 0
    assert "-m venv .venv" in calls
    pips = [c for c in calls if "-m pip install" in c]
    assert len(pips) == 2 and not any("torch==" in c for c in calls)
    for c in pips:
        assert "--no-index --find-links wheelhouse -c .venv/lbi-fx-constraints.txt" in c
    assert "transformers" in pips[0] and "hypothesis>=6" in pips[0]
    assert "--no-deps --no-build-isolation -e ." in pips[1]


def test_a_system_python_that_is_a_venv_lends_its_own_packages(tmp_path):
    """The lent machines' python3 is /opt/torch/.venv/bin/python3, itself a venv: a venv made
    from it with --system-site-packages sees its base Python's packages, not its torch (the
    set-up then tried to download torch and died offline). The .venv must see that torch."""
    system = tmp_path / "system"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(system)], check=True,
                   timeout=120)
    site = next((system / "lib").glob("python*/site-packages"))
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(
        "__version__ = '9.9.9+fake'\n"
        "class cuda:\n    is_available = staticmethod(lambda: True)\n")
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_setup.sh"), "--venv-only",
                           str(system / "bin" / "python")], cwd=work, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run([str(work / ".venv" / "bin" / "python"), "-c",
                          "import torch; print(torch.__version__, torch.__file__)"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    version, path = out.stdout.split()
    assert version == "9.9.9+fake" and path.startswith(str(site))


@pytest.mark.parametrize("limit_mb, rc", [(1, 1), (3, 0)])
def test_the_wheelhouse_is_refused_above_its_limit(tmp_path, limit_mb, rc):
    """It must fit the 64 MiB a copy of the tree may carry: above WHEELHOUSE_MAX_MB (60 by
    default) build_wheelhouse.sh exits 1 (--check measures a built one, without network)."""
    (tmp_path / "big-1.0-py3-none-any.whl").write_bytes(b"\0" * (2 * 2**20))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_wheelhouse.sh"), "--check"],
                          env={**os.environ, "WHEELHOUSE": str(tmp_path),
                               "WHEELHOUSE_MAX_MB": str(limit_mb)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc, proc.stderr
    assert f"1 wheels, 2.0 MiB (limit {limit_mb} MiB)" in proc.stdout
    assert ("refusing" in proc.stderr) == (rc == 1)
