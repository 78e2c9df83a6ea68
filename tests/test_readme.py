"""The README works as written (issue 25): every ```python block runs in a fresh namespace,
as a newcomer pasting it would run it, except blocks whose first line says
``# not run by the suite: <why>`` (those still have to compile); the inspect listing is
what the command prints, and the command-line claims hold."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NOT_RUN = "# not run by the suite:"
MIN_RUN = 5  # blocks that run; fewer means blocks were lost or marked away


def fenced(lang: str) -> list[tuple[int, str]]:
    """(line number, body) of every fenced block of the README opened with ```lang."""
    out, opened, body = [], None, []
    for no, line in enumerate(README.splitlines(), 1):
        if not line.startswith("```"):
            body.append(line)
        elif opened is None:
            opened, start, body = line[3:].strip(), no + 1, []
        else:
            if opened == lang:
                out.append((start, "\n".join(body) + "\n"))
            opened = None
    return out


BLOCKS = fenced("python")
RUN = [(line, code) for line, code in BLOCKS if not code.startswith(NOT_RUN)]


def test_the_readme_has_enough_runnable_blocks():
    assert len(RUN) >= MIN_RUN, [line for line, _ in RUN]
    for line, code in BLOCKS:  # skipped blocks still parse, and say why they are skipped
        compile(code, f"README.md:{line}", "exec")
        if code.startswith(NOT_RUN):
            assert code.splitlines()[0].removeprefix(NOT_RUN).strip(), line


@pytest.mark.parametrize("line, code", RUN, ids=[f"line{line}" for line, _ in RUN])
def test_readme_python_block_runs_as_written(line, code, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the blocks' own warnings are not what is tested
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    capsys.readouterr()


def test_import_lbi_fx_reaches_every_public_submodule():
    import subprocess
    import sys

    import lbi_fx

    names = ["testing", "models", "pgf", "spl", "distributed", "checkpoint", "pipelining",
             "causality", "bench", "plan", "cli", "kernels", "passes"]
    assert set(names) <= lbi_fx.SUBMODULES and set(names) <= set(dir(lbi_fx))
    code = ("import sys, lbi_fx\n"
            "lazy = [m for m in ('lbi_fx.testing', 'lbi_fx.distributed', 'lbi_fx.checkpoint', "
            "'lbi_fx.models', 'lbi_fx.pgf') if m in sys.modules]\n"
            f"mods = [getattr(lbi_fx, n) for n in {names!r}]\n"
            "print(lazy, all(m.__name__.startswith('lbi_fx.') for m in mods))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300, cwd=ROOT).stdout.strip()
    assert out == "[] True", out  # nothing heavy on import; every name reachable after
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lbi_fx.nope  # noqa: B018


def _pattern(line: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in line.split("...")))


def test_inspect_backward_listing_is_what_the_command_prints(capsys):
    from lbi_fx.cli import main

    intro = re.search(r"The generated backward of a (\d+)-region model \(`(lbi-fx inspect [^`]+)`",
                      README, re.S)
    assert intro, "the README's inspect listing lost its command"
    regions, command = int(intro.group(1)), " ".join(intro.group(2).split())
    (listing,) = [code for line, code in fenced("") if "phase1_jacobian_0" in code]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(command.split()[1:]) == 0
    printed = capsys.readouterr().out
    assert f"== {regions} regions," in printed
    # the listing leaves out the `x = None` statements that free values early
    lines = [re.sub(r";  \w+( = \w+)* = None$", "", ln) for ln in printed.splitlines()]
    at = 0
    for want in listing.splitlines():
        if want.strip() == "...":
            continue
        pat = _pattern(want)
        found = next((i for i in range(at, len(lines)) if pat.fullmatch(lines[i])), None)
        assert found is not None, f"README line not printed (in order): {want!r}"
        at = found + 1
    assert len([w for w in listing.splitlines() if w.strip() != "..."]) > 10


def test_the_installed_wheel_claim_covers_only_shipped_factories():
    """'Everything above runs from an installed wheel in any folder' holds only if every
    factory above it ships in lbi_fx; the repository's test models come after it."""
    section = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    above, claim, below = section.partition("Everything above runs from an installed wheel")
    assert claim, "the claim moved: update this test with it"
    shown = lambda text: set(re.findall(r"lbi-fx \w+ ([\w.]+):\w+", text))  # noqa: E731
    assert shown(above) and all(m.startswith("lbi_fx.") for m in shown(above)), shown(above)
    assert "tests.models" in shown(below)  # the checkout-only example, said to be one
