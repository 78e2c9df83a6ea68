"""The wheel as a user gets it: build it, install it into a temporary folder, and run
``lbi-fx`` from a folder outside the repository (issue 17).

The quick test (CI) checks that the installed package is the one imported, that the
headline ``lbi-fx verify lbi_fx.models:gpt`` works, that every sub-command's ``--help``
names it and lists its flags, and that every sub-command fails on bad input with one line
and no traceback. The last test runs every sub-command with its quickest flags as a
process (54-83 s measured on 2 shared cores; it runs in CI like every other test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One bad invocation per sub-command: each must exit non-zero with a one-line error.
FAILURES: dict[str, list[str]] = {
    "verify": ["verify", "lbi_fx.models:nope", "--regions", "layers:2"],
    "inspect": ["inspect", "lbi_fx.models:gpt", "--regions", "blocks:2"],
    "parity": ["parity", "--backends", "nope"],
    "quality": ["quality", "--budgets", "x"],
    "spl": ["spl", "--compositions", "x"],
    "plan": ["plan", "--microbatches", "3"],
    "bench scan": ["bench", "scan", "--repeat", "0"],
    "bench step": ["bench", "step", "--layers", "2", "--region-size", "2"],
    "bench comm": ["bench", "comm", "--k", "2", "--world", "3"],
    "bench pgf": ["bench", "pgf", "--lengths", "x"],
    "bench crossover": ["bench", "crossover", "--microbatches", "x"],
    "bench memory": ["bench", "memory", "--ranks", "x"],
}
# The quickest successful run of each sub-command, and its exit status.
QUICK: dict[str, tuple[list[str], int]] = {
    "verify": (["verify", "lbi_fx.models:gpt", "--regions", "layers:2", "--rank", "16"], 0),
    "inspect": (["inspect", "lbi_fx.models:gpt", "--regions", "layers:2", "--rank", "4",
                 "--show", "report"], 0),
    "parity": (["parity", "--inits", "1", "--batches", "1", "--backends", "transformer",
                "--json"], 0),
    "quality": (["quality", "--quick", "--no-progress", "--json"], 0),
    "spl": (["spl", "--quick", "--no-progress", "--json", "--threads", "1"], 0),
    "plan": (["plan", "--layers", "2", "--region-size", "1", "--width", "16", "--heads", "2",
              "--seq", "8", "--batch", "2", "--reps", "1", "--warmup", "0", "--json"], 0),
    "bench scan": (["bench", "scan", "--quick", "--repeat", "1", "--threads", "1", "--json"], 0),
    "bench step": (["bench", "step", "--layers", "2", "--region-size", "1", "--width", "16",
                    "--batch", "2", "--seq", "8", "--steps", "1", "--rank", "4",
                    "--threads", "1", "--json"], 0),
    "bench comm": (["bench", "comm", "--k", "2", "--world", "2", "--dim", "16", "--seq", "8",
                    "--heads", "2", "--rank", "4", "--dtype", "fp32", "--json"], 0),
    "bench pgf": (["bench", "pgf", "--quick", "--no-mamba2", "--json"], 0),
    "bench crossover": (["bench", "crossover", "--modeled", "--rates", "unshaped", "--layers", "2",
                         "--region-size", "1", "--width", "16", "--heads", "2", "--seq", "8",
                         "--batch", "2", "--steps", "2", "--warmup", "1", "--microbatches", "1",
                         "--no-progress", "--json"], 0),
    "bench memory": (["bench", "memory", "--width", "32", "--heads", "2", "--layers", "2",
                      "--seq", "8", "--ranks", "2", "--steps", "1", "--schedules", "none",
                      "--json"], 0),
}

# Runs inside the installed package: lists the sub-commands, then calls the CLI's main()
# on each argv of sys.argv[1] (JSON), capturing its exit status, stdout and stderr.
DRIVER = r"""
import contextlib, io, json, sys
import lbi_fx, lbi_fx.passes
from lbi_fx.bench import BENCHES
from lbi_fx.cli import build_parser, main

top = next(a for a in build_parser([])._actions if a.dest == "command").choices
commands = [c for c in top if c != "bench"] + [f"bench {b}" for b in BENCHES]
runs = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    runs.append(dict(argv=argv, rc=rc, out=out.getvalue(), err=err.getvalue()))
print(json.dumps(dict(files=[lbi_fx.__file__, lbi_fx.passes.__file__], commands=commands,
                      runs=runs)))
"""


@dataclass
class Installed:
    site: Path  # the --target folder
    away: Path  # a working folder outside the repository

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(self.site), PYTHONNOUSERSITE="1",
                   OMP_NUM_THREADS="1")
        env.pop("LBI_FX_TRACEBACK", None)
        return env

    def lbi_fx(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """The installed console script, as a user would run it."""
        return subprocess.run([str(self.site / "bin" / "lbi-fx"), *args], cwd=self.away,
                              env=self.env(), capture_output=True, text=True, timeout=timeout)

    def drive(self, argvs: list[list[str]]) -> dict:
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=self.away,
                              env=self.env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """Build the wheel from a copy of the sources (the shared tree gets no build/ folder)
    and install it, without dependencies or network, into a temporary target."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("lbi_fx", "passes", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("lbi_fx-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"),
                    str(wheel)], check=True, timeout=300)
    away = tmp / "elsewhere"
    away.mkdir()
    return Installed(tmp / "site", away)


def _one_line_error(err: str) -> bool:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return len(lines) == 1 and lines[0].startswith("lbi-fx") and "Traceback" not in err


def test_installed_wheel_verifies_gpt_from_another_folder(installed):
    proc = installed.lbi_fx("verify", "lbi_fx.models:gpt", "--regions", "layers:2",
                            "--rank", "16", "--dense", timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr  # the dense GPT's boundary is L x D > 16
    assert "boundar" in proc.stdout and "region 1" in proc.stdout


def test_installed_wheel_helps_and_fails_in_one_line(installed):
    sub = lambda c: c.split()  # noqa: E731 - "bench step" -> ["bench", "step"]
    helps = [[*sub(c), "--help"] for c in QUICK]
    res = installed.drive([["--help"], *helps, *FAILURES.values()])
    site = str(installed.site)
    assert all(f.startswith(site) for f in res["files"]), res["files"]  # not the repo's
    # every sub-command has a failure case and a quick run here (a new one must add them)
    assert sorted(res["commands"]) == sorted(FAILURES) == sorted(QUICK)
    top, runs = res["runs"][0], res["runs"][1:]
    assert top["rc"] == 0 and all(c.split()[0] in top["out"] for c in res["commands"])
    for (cmd, (argv, _)), run in zip(QUICK.items(), runs[: len(helps)]):
        flag = next(a for a in argv if a.startswith("--"))  # the help lists the flags
        assert run["rc"] == 0, (cmd, run["err"])
        assert f"usage: lbi-fx {cmd} " in run["out"] and flag in run["out"], run["out"]
    for cmd, run in zip(FAILURES, runs[len(helps):]):
        assert run["rc"] != 0 and _one_line_error(run["err"]), (cmd, run["rc"], run["err"])
    # and as a process: the console script's error is one line too
    proc = installed.lbi_fx(*FAILURES["bench comm"], timeout=300)
    assert proc.returncode == 2 and _one_line_error(proc.stderr), proc.stderr


def test_installed_wheel_runs_every_subcommand(installed):
    for cmd, (argv, rc) in QUICK.items():
        proc = installed.lbi_fx(*argv)
        assert "Traceback" not in proc.stderr, (cmd, proc.stderr[-3000:])
        assert proc.returncode == rc, (cmd, proc.returncode, proc.stderr[-3000:])
        if "--json" in argv:
            json.loads(proc.stdout)  # the whole stdout is the JSON document
