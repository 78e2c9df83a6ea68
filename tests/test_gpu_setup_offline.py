"""The GPU check's set-up on a machine like the lent ones (issue 35), rehearsed on a CPU: a
"system" Python that holds torch (and numpy) and nothing else of ours, no network, and a
copy of the working tree carrying ``wheelhouse/`` (``bash scripts/build_wheelhouse.sh``).
``scripts/gpu_setup.sh`` must make a venv that keeps the system's torch, installs the rest
from the wheelhouse alone, and never asks an index.

Runs where a wheelhouse exists (``wheelhouse/`` in the repository root, or the folder named
by ``LBI_FX_WHEELHOUSE``); skipped otherwise, since building one needs PyPI and ~2 minutes.
Where ``unshare -rn`` works the set-up runs in a network namespace with no interface up, so
any attempt to reach the network fails; pip is also pointed at a dead index."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = Path(os.environ.get("LBI_FX_WHEELHOUSE", ROOT / "wheelhouse")).resolve()
DEAD_INDEX = "http://127.0.0.1:9/"

pytestmark = pytest.mark.skipif(
    not any(WHEELS.glob("*.whl")),
    reason=f"no wheelhouse at {WHEELS}: run `bash scripts/build_wheelhouse.sh` first (needs PyPI)")


def _dist_closure(*names: str) -> list[md.Distribution]:
    """The installed distributions ``names`` need, themselves included (extras ignored)."""
    seen, todo, out = set(), list(names), []
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        out.append(dist)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0])
    return out


def _fake_system(tmp: Path) -> Path:
    """A venv standing for the device's /opt/torch/.venv: torch, numpy and torch's own
    requirements (linked from this interpreter's site-packages), pip, nothing of ours."""
    sysenv = tmp / "system"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(sysenv)], check=True,
                   timeout=120)
    lib = tmp / "system_lib"
    lib.mkdir()
    for dist in _dist_closure("torch", "numpy"):
        site = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops - {"..", "bin"}:
            if (site / top).exists() and not (lib / top).exists():
                (lib / top).symlink_to(site / top)
    purelib = subprocess.run([str(sysenv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "torch_here.pth").write_text(f"{lib}\n")
    return sysenv / "bin" / "python"


def _tree_copy(tmp: Path) -> Path:
    """What the device gets: tracked and untracked-not-ignored files, plus the carried
    wheelhouse."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    tree = tmp / "tree"
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / name)
    shutil.copytree(WHEELS, tree / "wheelhouse")
    return tree


def _offline_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "LBI_FX_", "VIRTUAL_ENV", "PYTHON"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
            "PIP_INDEX_URL": DEAD_INDEX, "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "2",
            "http_proxy": DEAD_INDEX, "https_proxy": DEAD_INDEX, "LBI_FX_REHEARSE": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _no_net_prefix() -> list[str]:
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True) \
        if shutil.which("unshare") else None
    return ["unshare", "-rn"] if probe is not None and probe.returncode == 0 else []


@pytest.fixture(scope="module")
def device_copy(tmp_path_factory):
    """The set-up run once, offline, in a copy of the tree: (tree, env, its output)."""
    tmp = tmp_path_factory.mktemp("device")
    system_py = _fake_system(tmp)
    tree = _tree_copy(tmp)
    env = _offline_env()
    proc = subprocess.run([*_no_net_prefix(), "bash", "scripts/gpu_setup.sh", str(system_py)],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    return tmp, tree, env, proc


def test_offline_setup_keeps_the_system_torch_and_installs_from_the_wheelhouse(device_copy):
    tmp, tree, env, proc = device_copy
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    # no index was asked, no connection tried
    for sign in ("127.0.0.1", "Looking in indexes", "Retrying", "NewConnectionError"):
        assert sign not in log, log
    code = ("import json, torch, lbi_fx, pytest, hypothesis, transformers, networkx, tqdm; "
            "print(json.dumps({m.__name__: m.__file__ for m in (torch, lbi_fx, pytest, "
            "hypothesis, transformers, networkx, tqdm)} | {'version': torch.__version__}))")
    out = subprocess.run([str(tree / ".venv" / "bin" / "python"), "-c", code], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    torch_version = md.distribution("torch").version
    assert got["version"] == torch_version  # the system's torch, not a pinned one
    assert got["torch"].startswith(str(tmp / "system_lib"))
    assert f"torch {torch_version}" in proc.stdout
    assert got["lbi_fx"] == str(tree / "lbi_fx" / "__init__.py")  # editable: this tree
    venv_site = next((tree / ".venv" / "lib").glob("python*/site-packages"))
    for name in ("pytest", "hypothesis", "transformers", "tqdm"):  # networkx: torch needs it
        assert got[name].startswith(str(venv_site)), (name, got[name])  # from the wheelhouse
    # nothing of torch's (or numpy) was installed into the venv itself
    assert not list(venv_site.glob("torch*")) and not list(venv_site.glob("numpy*"))


def test_the_gpu_tests_collect_in_that_venv(device_copy):
    """What gpu_check.sh's pytest part does first: every test module imports (a package
    missing from the wheelhouse would be a collection error there)."""
    _, tree, env, proc = device_copy
    assert proc.returncode == 0
    out = subprocess.run([*_no_net_prefix(), ".venv/bin/python", "-m", "pytest", "--co", "-q",
                          "-m", "gpu", "-p", "no:cacheprovider", "tests"], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "test_cuda_grid" in out.stdout and "error" not in out.stdout.lower()
