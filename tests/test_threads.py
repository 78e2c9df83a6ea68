"""The demo and the suite run on pinned threads (issue 37): their stated times were 10-20x
off on a loaded 2-core machine because the training loop used a thread per core.
``scripts/run.sh`` exports ``OMP_NUM_THREADS`` (default 1, the caller's value kept) for
``demo`` and ``test``; the suite's conftest pins this process and its subprocesses; the
demo takes ``--threads`` (default ``$OMP_NUM_THREADS``, else 1) and sets it first."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_suite_runs_on_pinned_threads():
    threads = int(os.environ["OMP_NUM_THREADS"])  # set for every subprocess too
    assert torch.get_num_threads() == threads


@pytest.fixture
def fake_checkout(tmp_path):
    """scripts/run.sh beside an installed-looking .venv whose python prints its thread
    environment instead of running anything."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "run.sh", tmp_path / "scripts" / "run.sh")
    (tmp_path / "pyproject.toml").write_text("")
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    python = bin_ / "python"
    python.write_text('#!/bin/sh\necho "OMP=$OMP_NUM_THREADS MKL=$MKL_NUM_THREADS args=$*"\n')
    python.chmod(0o755)
    stamp = tmp_path / ".venv" / ".lbi-fx-installed"
    stamp.write_text("")
    os.utime(stamp, (os.path.getmtime(tmp_path / "pyproject.toml") + 10,) * 2)
    return tmp_path


@pytest.mark.parametrize("what, args", [("test", "-m pytest -q -x"),
                                        ("demo", "examples/demo.py --quick")])
def test_run_sh_pins_threads_unless_told(fake_checkout, what, args):
    def run(**extra):
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        env.update(extra)
        extra_args = ["-x"] if what == "test" else ["--quick"]
        proc = subprocess.run(["bash", str(fake_checkout / "scripts" / "run.sh"), what,
                               *extra_args], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert run() == f"OMP=1 MKL=1 args={args}"
    assert run(OMP_NUM_THREADS="3") == f"OMP=3 MKL=3 args={args}"  # the caller's value


def _demo():
    spec = importlib.util.spec_from_file_location("lbi_fx_demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_pins_its_threads_before_anything_runs(monkeypatch, capsys):
    demo = _demo()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert demo.parse_args([]).threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert demo.parse_args([]).threads == 2 and demo.parse_args(["--threads", "3"]).threads == 3

    seen = []

    class Stop(Exception):
        pass

    def stop(*a, **k):
        seen.append(torch.get_num_threads())
        raise Stop

    before = torch.get_num_threads()
    monkeypatch.setattr(demo.lbi_fx, "verify", stop)
    try:
        torch.set_num_threads(2)
        with pytest.raises(Stop):
            demo.main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert seen == [1] and "1 intra-op thread(s)" in capsys.readouterr().out
