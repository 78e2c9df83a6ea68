"""On a CPU machine the suite skips nothing but GPU work (issue 16): a dependency of
lbi-fx or of its ``test`` extra that fails to import must fail the suite, not turn its
tests into skips that a green run hides."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomllib's predecessor, not a dependency of lbi-fx
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _required() -> set[str]:
    """Import names of the runtime dependencies and of the ``test`` extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {re.split(r"[<>=!~\[ ]", s)[0].lower().replace("-", "_") for s in specs}


def test_no_test_skips_when_a_required_package_is_missing():
    required = _required()
    assert {"triton", "transformers", "hypothesis", "matplotlib"} <= required
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        for name in re.findall(r"importorskip\(\s*[\"']([\w.]+)", text):
            if name.split(".")[0].lower() in required:
                offenders.append(f"{path.name}: importorskip({name!r})")
        if re.search(r"skipif\(\s*not\s+triton_available\(\)", text):
            offenders.append(f"{path.name}: skipif(not triton_available())")
    assert not offenders, f"required packages must fail, not skip: {offenders}"
