"""Exit codes as one table (issue 37): 2 for usage and spec errors, 3 for refusals of the
model (``TraceError`` and ``BatchMixingError`` used to exit 2), 4 for lbi-fx's own bugs
(``InternalError``); ``lbi_fx.cli.exits.EXIT_CODES`` and docs/cli.md's table agree. CLI
warnings name the factory and region spec, not the installed entry script's line."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lbi_fx
import lbi_fx.errors
from lbi_fx.bench.link import LinkShapingUnavailable
from lbi_fx.cli import EXIT_CODES, main
from lbi_fx.cli.factory import UsageError

ROOT = Path(__file__).resolve().parents[1]

# every error class a command can end with, and its exit code
EXPECTED = {
    UsageError: 2, LinkShapingUnavailable: 2,
    lbi_fx.errors.InputError: 2, lbi_fx.errors.SequenceAxisError: 2,
    lbi_fx.errors.RegionSpecError: 2, lbi_fx.errors.CheckpointError: 2,
    lbi_fx.errors.LBIError: 3, lbi_fx.errors.TraceError: 3, lbi_fx.errors.SeparatorError: 3,
    lbi_fx.errors.RewriteError: 3, lbi_fx.errors.BatchMixingError: 3,
    lbi_fx.errors.ModeError: 3, lbi_fx.errors.HookError: 3,
    lbi_fx.errors.NonFiniteError: 3, lbi_fx.errors.HigherOrderError: 3,
    lbi_fx.errors.DistributedError: 3, lbi_fx.errors.PeerFailedError: 3,
    lbi_fx.errors.DistributedTimeout: 3,
    RuntimeError: 3, ValueError: 3,  # the model's own code or PyTorch
    lbi_fx.errors.InternalError: 4,
}


def test_every_error_class_has_an_expected_code():
    """A new error class must be placed in the table (and here) before it ships."""
    classes = {c for _, c in inspect.getmembers(lbi_fx.errors, inspect.isclass)
               if issubclass(c, Exception) and c.__module__ == "lbi_fx.errors"}
    assert classes <= set(EXPECTED), classes - set(EXPECTED)


@pytest.mark.parametrize("cls", list(EXPECTED), ids=[c.__name__ for c in EXPECTED])
def test_each_error_class_exits_with_its_code_on_one_line(cls, monkeypatch, capsys):
    from lbi_fx.cli import verify

    def refuse(args):
        raise cls("what went wrong\nand a second line")

    monkeypatch.setattr(verify, "run", refuse)
    monkeypatch.delenv("LBI_FX_TRACEBACK", raising=False)
    code = main(["verify", "lbi_fx.models:gpt", "--regions", "layers:2"])
    out = capsys.readouterr()
    assert code == EXPECTED[cls] and code in EXIT_CODES, (cls, code)
    err = out.err.strip()
    assert "\n" not in err and err.startswith(f"lbi-fx: error: {cls.__name__}: what went wrong")
    assert "Traceback" not in err and out.out == ""


def test_a_refused_model_exits_3_end_to_end(monkeypatch, capsys):
    """BatchNorm in training mode mixes samples: the model is refused (it used to exit 2,
    the code of a typing mistake)."""
    monkeypatch.chdir(ROOT)
    code = main(["verify", "tests.test_cli_exits:batchnorm_factory", "--regions", "blocks:1",
                 "--rank", "4"])
    err = capsys.readouterr().err
    assert code == 3 and "BatchMixingError" in err, err
    assert main(["verify", "tests.test_cli_exits:batchnorm_factory", "--regions",
                 "blocks.0;blocks.9"]) == 2  # a spec error stays 2
    assert "RegionSpecError" in capsys.readouterr().err


def test_readme_shows_the_same_table():
    text = (ROOT / "docs" / "cli.md").read_text() + "\n## end"
    section = text[text.index("## Command line"):]
    section = section[:section.index("\n## ", 3)]
    rows = dict(re.findall(r"^\| (\d) \| ([^|]+?) \|", section, flags=re.M))
    assert {int(k): v for k, v in rows.items()} == {k: v[0] for k, v in EXIT_CODES.items()}


# ------------------------------------------------------------ warnings name the model

class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return torch.tanh(x * self.w)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Scale() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def wide_factory():
    """An elementwise model (no op says which axis is the sequence: a CausalityWarning)
    whose factory warns too (the user's own code: its line is kept)."""
    warnings.warn("a note from the factory", UserWarning, stacklevel=1)
    torch.manual_seed(0)
    return _Net(), (torch.randn(2, 6, 8),)


def batchnorm_factory():
    from tests.models import BatchNormNet

    torch.manual_seed(0)
    return BatchNormNet(), (torch.randn(4, 6),)


def _entry_points() -> list[list[str]]:
    """``python -m lbi_fx`` and, where installed, the ``lbi-fx`` script next to python."""
    script = Path(sys.executable).parent / "lbi-fx"
    return [[sys.executable, "-m", "lbi_fx"]] + ([[str(script)]] if script.exists() else [])


@pytest.mark.parametrize("entry", _entry_points(), ids=lambda e: Path(e[-1]).name)
def test_cli_warnings_name_the_model_not_the_entry_script(entry):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    env.pop("LBI_FX_TRACEBACK", None)
    proc = subprocess.run([*entry, "verify", "tests.test_cli_exits:wide_factory",
                           "--regions", "blocks:1", "--rank", "64"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    ours = [ln for ln in lines if "CausalityWarning" in ln or "not below the dense" in ln]
    assert len(ours) == 2, proc.stderr
    for line in ours:  # attributed to the factory and spec, with no file:line of anyone's
        assert line.startswith("lbi-fx: warning (tests.test_cli_exits:wide_factory "
                               "--regions blocks:1): "), line
        assert not re.search(r"\.py:\d+|lbi-fx:\d+|bin/", line), line
    assert not [ln for ln in lines if re.search(r"bin/lbi-fx:\d+|lbi_fx/cli/\w+\.py:\d+", ln)]
    mine = [ln for ln in lines if "a note from the factory" in ln]
    assert len(mine) == 1 and "test_cli_exits.py:" in mine[0], proc.stderr  # the user's line
