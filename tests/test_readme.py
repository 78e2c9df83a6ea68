"""The README and the docs work as written (issues 25, 37): every ```python block of README.md
and of every docs/*.md page runs in a fresh namespace, as a newcomer pasting it would run it,
except blocks whose first line says ``# not run by the suite: <why>`` (those still have to
compile); the inspect listing is what the command prints, and the command-line claims hold.
The README is a front door: at most 300 lines, linking to every docs page, and every relative
link of every page leads to a file (and heading) that exists."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {p.relative_to(ROOT).as_posix(): p.read_text() for p in PAGES}
README = TEXT["README.md"]
NOT_RUN = "# not run by the suite:"
MIN_RUN = 5  # blocks that run; fewer means blocks were lost or marked away
MAX_README_LINES = 300


def fenced(lang: str, name: str | None = None) -> list[tuple[str, int, str]]:
    """(page, line number, body) of every fenced block opened with ```lang, in one page
    (``name``, relative to the repository) or in all of them."""
    out = []
    for page, text in TEXT.items():
        if name is not None and page != name:
            continue
        opened, body = None, []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.startswith("```"):
                body.append(line)
            elif opened is None:
                opened, start, body = line[3:].strip(), no + 1, []
            else:
                if opened == lang:
                    out.append((page, start, "\n".join(body) + "\n"))
                opened = None
    return out


def page_with(needle: str) -> str:
    """The one page whose text holds ``needle`` (a section moves: its checks follow it)."""
    pages = [page for page, text in TEXT.items() if needle in text]
    assert len(pages) == 1, f"{needle!r} is in {pages or 'no page'}: update this test"
    return TEXT[pages[0]]


BLOCKS = fenced("python")
RUN = [(page, line, code) for page, line, code in BLOCKS if not code.startswith(NOT_RUN)]


def test_the_docs_have_enough_runnable_blocks():
    assert len(RUN) >= MIN_RUN, [f"{page}:{line}" for page, line, _ in RUN]
    assert any(page == "README.md" for page, _, _ in RUN)  # the tour's block runs
    for page, line, code in BLOCKS:  # skipped blocks still parse, and say why they are skipped
        compile(code, f"{page}:{line}", "exec")
        if code.startswith(NOT_RUN):
            assert code.splitlines()[0].removeprefix(NOT_RUN).strip(), f"{page}:{line}"


@pytest.mark.parametrize("page, line, code", RUN, ids=[f"{page}:{line}" for page, line, _ in RUN])
def test_python_block_runs_as_written(page, line, code, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the blocks' own warnings are not what is tested
        exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__readme__"})
    capsys.readouterr()


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    out, in_code = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            out.add(slug(line.lstrip("#")))
    return out


def test_the_readme_is_a_front_door_to_every_docs_page():
    lines = len(README.splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move sections to docs/"
    linked = {target.split("#")[0] for target in LINK.findall(README)}
    missing = [p for p in TEXT if p.startswith("docs/") and p not in linked]
    assert not missing, f"README.md does not link to {missing}"


@pytest.mark.parametrize("page", list(TEXT))
def test_every_relative_link_leads_somewhere(page):
    base = (ROOT / page).parent
    for target in LINK.findall(TEXT[page]):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (base / path).resolve() if path else ROOT / page
        assert dest.exists(), f"{page}: link to {target} leads nowhere"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest.read_text()), f"{page}: no heading #{anchor} in {path}"


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

    text = page_with("The generated backward of a ")
    intro = re.search(r"The generated backward of a (\d+)-region model \(`(lbi-fx inspect [^`]+)`",
                      text, re.S)
    assert intro, "the docs' inspect listing lost its command"
    regions, command = int(intro.group(1)), " ".join(intro.group(2).split())
    (listing,) = [code for _, _, code in fenced("") if "phase1_jacobian_0" in code]
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
        assert found is not None, f"listing line not printed (in order): {want!r}"
        at = found + 1
    assert len([w for w in listing.splitlines() if w.strip() != "..."]) > 10


def test_the_installed_wheel_claim_covers_only_shipped_factories():
    """'Everything above runs from an installed wheel in any folder' holds only if every
    factory above it ships in lbi_fx; the repository's test models come after it."""
    text = page_with("Everything above runs from an installed wheel")
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    above, claim, below = section.partition("Everything above runs from an installed wheel")
    assert claim, "the claim moved: update this test with it"
    shown = lambda text: set(re.findall(r"lbi-fx \w+ ([\w.]+):\w+", text))  # noqa: E731
    assert shown(above) and all(m.startswith("lbi_fx.") for m in shown(above)), shown(above)
    assert "tests.models" in shown(below)  # the checkout-only example, said to be one
