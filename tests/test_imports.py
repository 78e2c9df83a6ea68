"""Package hygiene: every ``lbi_fx`` module imports on its own, no import cycle among them
(function-level imports included: a cycle hidden inside a function still couples the
modules), and nothing in the package imports the repository's ``examples/``.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import lbi_fx


def _package_dirs() -> dict[str, Path]:
    """Module-name prefix -> directory, as the wheel maps them (passes/ -> lbi_fx.passes)."""
    root = Path(lbi_fx.__file__).resolve().parent
    dirs = {"lbi_fx": root}
    for sub in ("passes", "kernels"):
        spec = importlib.util.find_spec(f"lbi_fx.{sub}")
        dirs[f"lbi_fx.{sub}"] = Path(spec.origin).resolve().parent
    return dirs


def lbi_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    out: dict[str, Path] = {}
    for prefix, d in _package_dirs().items():
        for f in sorted(d.rglob("*.py")):
            rel = f.relative_to(d).with_suffix("").parts
            if prefix == "lbi_fx" and rel[0] in ("passes", "kernels"):
                continue  # mapped from their own folder (a symlink or copy is the same files)
            parts = [p for p in rel if p != "__init__"]
            out[".".join([prefix, *parts])] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """lbi_fx modules that ``name`` imports anywhere in its body, with relative imports and
    ``from pkg import submodule`` resolved."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import lbi_fx.x.y` names lbi_fx.x.y's module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = lbi_modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_finds_a_hidden_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_sees_function_level_imports():
    graph = import_graph()
    assert "lbi_fx.module" in graph["lbi_fx.api"]  # imported inside transform()
    assert "lbi_fx.passes.capture" in graph["lbi_fx.analysis"]
    assert {"lbi_fx.models.mamba2", "lbi_fx.models.transformer"} <= graph["lbi_fx.models.hybrid"]


def test_no_import_cycle_among_lbi_fx_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_never_imports_examples():
    offenders = []
    for name, path in lbi_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name} imports {m}" for m in mods
                          if m == "examples" or m.startswith("examples.")]
    assert offenders == []


def test_each_module_imports_alone():
    """Import each module with no lbi_fx module loaded before it (torch stays cached, so
    one interpreter is enough): an order-dependent import fails here."""
    names = sorted(n for n in lbi_modules() if not n.endswith("__main__"))  # __main__ runs
    code = (
        "import importlib, sys, traceback\n"
        "import torch\n"
        "bad = []\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'lbi_fx' or m.startswith('lbi_fx.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert len(names) > 30  # the walk really found the package


def test_example_scripts_import_what_the_package_has():
    """examples/ are scripts a user could write: they import lbi_fx, nothing else of ours."""
    scripts = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
    problems = []
    for script in scripts:
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                if top in ("examples", "tests"):
                    problems.append(f"{script.name} imports {node.module}")
                elif top == "lbi_fx":
                    module = importlib.import_module(node.module)
                    problems += [f"{script.name}: {node.module} has no {a.name}"
                                 for a in node.names if not hasattr(module, a.name)
                                 and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert len(scripts) >= 4 and problems == []


# The layers of the package tree (ARCHITECTURE.md) and what each may import besides
# itself: the zoo's models are plain PyTorch (gpt-fast style) and the compiler knows no
# model; the seed systems and the distributed layer build on both; the tools on anything.
# The package root (a facade that re-exports ``stage_partition``) and ``__main__`` sit
# outside the layers.
LAYERS = {
    # what every layer may raise or read: the error classes, and which tensor of a model's
    # output holds the logits (the zoo's training loop and the compiler's harness share it)
    "base": ("lbi_fx.errors", "lbi_fx.outputs"),
    "zoo": ("lbi_fx.models",),
    "compiler": ("lbi_fx.passes", "lbi_fx.kernels", "lbi_fx.module"),  # + top-level modules
    "systems": ("lbi_fx.spl", "lbi_fx.pgf", "lbi_fx.distributed", "lbi_fx.checkpoint",
                "lbi_fx.pipelining"),
    "tools": ("lbi_fx.cli", "lbi_fx.bench", "lbi_fx.plan"),
}
MAY_IMPORT = {"base": set(), "zoo": {"base"}, "compiler": {"base"},
              "systems": {"base", "compiler", "zoo"},
              "tools": {"base", "compiler", "zoo", "systems"}}


def layer_of(name: str) -> str | None:
    if name in ("lbi_fx", "lbi_fx.__main__"):
        return None
    for layer, prefixes in LAYERS.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return layer
    return "compiler"  # a top-level module of lbi_fx/ is the compiler


def test_layer_of_places_modules():
    assert layer_of("lbi_fx.api") == layer_of("lbi_fx.passes.capture") == "compiler"
    assert layer_of("lbi_fx.distributed.checkpoint") == layer_of("lbi_fx.spl") == "systems"
    assert layer_of("lbi_fx.models.data") == "zoo" and layer_of("lbi_fx.cli.quality") == "tools"
    assert layer_of("lbi_fx") is None
    assert layer_of("lbi_fx.errors") == layer_of("lbi_fx.outputs") == "base"


def test_no_layer_imports_what_it_may_not():
    """The compiler never reaches into the systems built on it or into a model, the
    systems never into the tools: the tree reads as the architecture because imports say so."""
    bad = []
    for name, deps in import_graph().items():
        lo = layer_of(name)
        for dep in sorted(deps):
            hi = layer_of(dep)
            if lo is not None and hi is not None and hi != lo and hi not in MAY_IMPORT[lo]:
                bad.append(f"{name} ({lo}) imports {dep} ({hi})")
    assert bad == []
