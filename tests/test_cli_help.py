"""Every ``lbi-fx`` sub-command and bench has its own ``--help`` listing its flags, under
its own name; benches follow the ``lbi_fx.bench`` contract and load lazily (issue 15)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from lbi_fx.bench import BENCHES
from lbi_fx.cli import main

STEP_FLAGS = ["--model", "--rank", "--jacobian", "--layers", "--region-size", "--width",
              "--batch", "--seq", "--steps", "--threads", "--json", "--pool", "--segment-len"]


def _help(capsys, *argv: str) -> str:
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_bench_step_help_lists_its_flags(capsys):
    out = _help(capsys, "bench", "step")
    assert out.startswith("usage: lbi-fx bench step ")
    missing = [f for f in STEP_FLAGS if f not in out]
    assert missing == [], out


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_each_bench_help_names_it_and_lists_flags(capsys, name):
    out = _help(capsys, "bench", name)
    parser = argparse.ArgumentParser()
    importlib.import_module(f"lbi_fx.bench.{BENCHES[name]}").add_arguments(parser)
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    assert out.startswith(f"usage: lbi-fx bench {name} ")
    assert len(flags) > 1 and [f for f in flags if f not in out] == []


def test_bench_help_lists_every_bench(capsys):
    out = _help(capsys, "bench")
    assert all(name in out for name in BENCHES) and "NAME --help" in " ".join(out.split())


def test_parity_help_calls_itself_lbi_fx_parity(capsys):
    out = _help(capsys, "parity")
    assert out.startswith("usage: lbi-fx parity ")
    assert "parity_table" not in out
    assert all(f in out for f in ("--inits", "--batches", "--backends", "--json"))


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_modules_follow_the_contract(name):
    module = importlib.import_module(f"lbi_fx.bench.{BENCHES[name]}")
    assert all(callable(getattr(module, f, None)) for f in ("add_arguments", "run", "main"))
    with pytest.raises(SystemExit) as info:  # standalone main parses its own argv
        module.main(["--help"])
    assert info.value.code == 0


def test_unknown_flag_is_one_line_error(capsys):
    assert main(["bench", "step", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lbi-fx") and "error" in err and "--no-such-flag" in err
    assert len(err.splitlines()) == 1


def test_running_one_bench_imports_no_other():
    code = ("import sys\nfrom lbi_fx.cli import build_parser\n"
            "build_parser(['bench', 'scan', '--quick']).parse_args(['bench', 'scan', '--quick'])\n"
            "print(sorted(m for m in sys.modules if m.startswith('lbi_fx.bench.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert out.strip() == "['lbi_fx.bench.scan']"
