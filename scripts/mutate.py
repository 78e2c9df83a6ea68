#!/usr/bin/env python3
"""Mutation testing over a named list of mutations: does the suite notice a plausible bug?

Each mutant is one exact edit of one file (an ``old`` snippet that must occur exactly once,
and its replacement) and the pytest node ids that should fail on it. The runner copies the
repository (without .git and .venv) to a temporary directory laid out as the installed
package (``lbi_fx/passes``, ``lbi_fx/kernels``), checks that Python imports lbi-fx from the
copy, runs every named test once on the unmutated copy (a test that fails there kills
nothing), then applies one mutant at a time to the copy, runs its tests with
``OMP_NUM_THREADS=1`` and restores the file. The working tree is never written.

    python scripts/mutate.py                 # every mutant; killed / survived and a summary
    python scripts/mutate.py --list          # names, files and tests, nothing runs
    python scripts/mutate.py --only NAME     # one mutant (repeatable)

Verdicts: ``killed`` (a named test failed), ``survived`` (all passed: the suite misses
this bug), ``stale`` (the snippet is not in the file exactly once: the code moved on; update
the mutant), ``timeout``, ``error`` (pytest could not run the tests). Exit 0 whatever the
verdicts; non-zero only when the runner itself cannot work (no copy, imports not from it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where a repository path lives in the copy (the installed layout: passes/ and kernels/
# are the subpackages lbi_fx.passes and lbi_fx.kernels)
LAYOUT = {"passes/": "lbi_fx/passes/", "kernels/": "lbi_fx/kernels/"}
TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str            # repository path
    old: str             # exact snippet, once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids that should fail
    what: str            # the bug it stands for


MUTANTS = [
    # -- the four issue 35 item 9 found surviving ------------------------------------------
    Mutant("first_row_wrong_end", "lbi_fx/interfaces.py",
           "row = row[..., : self.rank] if self.in_rank > self.rank",
           "row = row[..., -self.rank:] if self.in_rank > self.rank",
           ("tests/test_parity.py::test_parity_rank_lists_with_a_causal_pool",),
           "first_row truncates a wider m_k at the other end than the forward does"),
    Mutant("head_rows_wrong_size", "lbi_fx/module/chain.py",
           'return {"head": enc.rank, "head_rows": head_rows}',
           'return {"head": enc.in_rank, "head_rows": head_rows}',
           ("tests/test_parity.py::test_parity_rank_lists_with_a_causal_pool",),
           "the Jacobian's head rows sized by the incoming rank, not the outgoing one"),
    Mutant("harness_missing_unlisted", "lbi_fx/testing.py",
           "missing = [n for n, a, b in zip(names, ref, got) if a is not None and b is None]",
           "missing = []",
           ("tests/test_parity.py::test_parity_lists_a_tensor_one_mode_gives_no_gradient",),
           "gradient_parity never lists a tensor with no gradient under scan"),
    Mutant("probe_odd_cuts", "lbi_fx/causality.py",
           "(range(1, length) if cuts is None else cuts)",
           "(range(1, length, 2) if cuts is None else cuts)",
           ("tests/test_causal.py::test_the_causal_probe_checks_every_cut",),
           "the causal probe checks odd cuts only"),
    # -- runtime ---------------------------------------------------------------------------
    Mutant("forward_truncation_wrong_end", "lbi_fx/interfaces.py",
           "m = m[..., : self.rank] if self.in_rank > self.rank",
           "m = m[..., -self.rank:] if self.in_rank > self.rank",
           ("tests/test_parity.py::test_parity_rank_lists_with_a_causal_pool",),
           "the encoder keeps the other end of a wider m_k than first_row"),
    Mutant("adjoint_width_wrong_end", "lbi_fx/runtime.py",
           "return [allm[:, i, : state.ranks[start + i]] for i in range(allm.shape[1])]",
           "return [allm[:, i, state.r_max - state.ranks[start + i]:] "
           "for i in range(allm.shape[1])]",
           ("tests/test_parity.py::test_parity_rank_lists_with_a_causal_pool",),
           "mbar_k cut to its width from the padded end"),
    Mutant("accumulate_drops_shares", "lbi_fx/runtime.py",
           "total = s if total is None else total + s",
           "total = s if total is None else total",
           ("tests/test_parity.py::test_parity_grid",),
           "a shared input (tied weights, the canvas) keeps the first region's share only"),
    Mutant("scan_carry_shifted", "kernels/scan_torch.py",
           "carry = torch.cat([S[:, 1:], eye], dim=1)",
           "carry = torch.cat([S[:, :-1], eye], dim=1)",
           ("tests/test_kernels.py::test_torch_backends_grid",),
           "the chunked scan's fix-up multiplies chunk c by the wrong carry"),
    # -- testing (the harness) -------------------------------------------------------------
    Mutant("harness_share_floor_whole", "lbi_fx/testing.py",
           "floor = total * math.sqrt(k / numel)",
           "floor = total",
           ("tests/test_harness_strict.py::test_small_tensor_35_percent_wrong_is_caught",),
           "every tensor's floor is the whole gradient's norm: a small tensor may be anything"),
    Mutant("harness_oracle_lax", "lbi_fx/testing.py",
           "limit64=ORACLE_FACTOR * (e_auto + floor)",
           "limit64=1e4 * ORACLE_FACTOR * (e_auto + floor)",
           ("tests/test_harness_strict.py::"
            "test_fp32_whole_weight_one_tenth_percent_off_fails_rounding_passes",),
           "the fp32 float64 oracle allows 1e5 x autograd's error"),
    Mutant("harness_extra_unlisted", "lbi_fx/testing.py",
           "extra = [n for n, a, b in zip(names, ref, got) if a is None and b is not None]",
           "extra = []",
           ("tests/test_parity.py::test_parity_lists_a_tensor_one_mode_gives_no_gradient",),
           "gradient_parity never lists a tensor with a gradient under scan only"),
    Mutant("harness_cosine_unchecked", "lbi_fx/testing.py",
           "        if not self.cosine >= cosine:\n",
           "        if False:\n",
           ("tests/test_harness_strict.py::test_ok_agrees_with_assert_close",
            "tests/test_harness_strict.py::"
            "test_cosine_bound_binds_where_a_loose_rtol_would_pass"),
           "the cosine bound is never checked"),
    # -- causality -------------------------------------------------------------------------
    Mutant("prefix_pool_inclusive", "lbi_fx/interfaces.py",
           "before = torch.nn.functional.pad(sums[:, :-1], (0, 0, 1, 0)).cumsum(dim=1)",
           "before = sums.cumsum(dim=1)",
           ("tests/test_causal.py::test_prefix_pool_rows_see_only_earlier_segments",
            "tests/test_causal.py::test_default_on_a_causal_gpt_is_causal_and_leaks_nothing"),
           "causal row s also pools segment s (a leak)"),
    Mutant("row_window_reads_next_row", "lbi_fx/interfaces.py",
           "padded = torch.nn.functional.pad(rows, (0, 0, window - 1, 0))",
           "padded = torch.nn.functional.pad(rows, (0, 0, window - 2, 1))",
           ("tests/test_depth_designs.py::test_row_window_reads_only_earlier_rows",),
           "a windowed decoder reads row s + 1 (a leak)"),
    Mutant("built_model_not_probed", "lbi_fx/api.py",
           "        _check_built_causal(lbi, a, layout)\n",
           "        pass\n",
           ("tests/test_causality_trust.py::test_a_leaking_causal_rewrite_is_an_internal_error",),
           "transform never probes the built causal model for a leak"),
    # -- layout and blame ------------------------------------------------------------------
    Mutant("layout_regions_unchecked", "lbi_fx/layout.py",
           'FIELDS = {"regions": "regions", "pool": "pool",',
           'FIELDS = {"pool": "pool",',
           ("tests/test_harness_strict.py::"
            "test_state_dict_of_another_region_partition_is_refused_by_name",),
           "a state dict of another region partition loads"),
    Mutant("layout_pool_unchecked", "lbi_fx/layout.py",
           "if key in saved and key in now and saved[key] != now[key]:",
           "if key != 'pool' and key in saved and key in now and saved[key] != now[key]:",
           ("tests/test_harness_strict.py::"
            "test_same_shapes_other_pool_refused_and_same_layout_loads",),
           "a state dict of another pool (same shapes) loads"),
    Mutant("rewritten_graph_blames_inputs", "passes/shape_prop.py",
           "            if self._ours(n):",
           "            if False:",
           ("tests/test_refusals.py::"
            "test_bug_in_the_rewritten_graph_is_an_internal_error_naming_the_node",),
           "lbi-fx's own failure in the rewritten graph reported as the user's InputError"),
    # -- ownership: each rank holds only what it runs (issue 34) ----------------------------
    Mutant("rank_keeps_everything", "lbi_fx/distributed/region_parallel.py",
           "        release(lbi, self.held)\n",
           "\n",
           ("tests/test_ownership.py::test_each_rank_holds_only_what_it_runs",),
           "RegionParallel leaves the whole module on every rank"),
    Mutant("holders_miss_the_prologue", "lbi_fx/distributed/ownership.py",
           "        graphs += [spec.regions[k].graph for k in ks]",
           "        graphs = [spec.regions[k].graph for k in ks]",
           ("tests/test_ownership.py::test_each_rank_holds_only_what_it_runs",),
           "a rank does not hold the prologue tensors its regions read"),
    Mutant("prologue_not_pruned", "lbi_fx/module/rewritten.py",
           "        keep = getattr(self, \"_prologue_keep\", None)",
           "        keep = None",
           ("tests/test_ownership.py::test_each_rank_holds_only_what_it_runs",),
           "every rank runs the whole prologue (other ranks' canvas copies on meta)"),
    Mutant("recompute_seed_lost", "lbi_fx/distributed/region_parallel.py",
           "            rerun = not caches[K - 1].kept",
           "            rerun = False",
           ("tests/test_ownership.py::test_each_rank_holds_only_what_it_runs",),
           "jacobian='recompute' under RegionParallel: the epilogue's gradient never seeds"),
    Mutant("init_seed_ignores_path", "lbi_fx/distributed/ownership.py",
           "            torch.manual_seed(_seed(seed, _origin(path, origin)))",
           "            torch.manual_seed(seed)",
           ("tests/test_ownership.py::test_init_weights_do_not_depend_on_the_world_size",),
           "every module initialised from the same RNG state"),
    Mutant("copies_not_seeded_as_originals", "lbi_fx/distributed/ownership.py",
           "            return orig + path[len(copy):]",
           "            return path",
           ("tests/test_ownership.py::test_init_weights_do_not_depend_on_the_world_size",),
           "a per-region canvas copy starts apart from the module it copies"),
    Mutant("checkpoint_saves_unheld", "lbi_fx/distributed/checkpoint.py",
           "        return set(rp.held) & set(_tensors(rp.lbi))",
           "        return set(_tensors(rp.lbi))",
           ("tests/test_distributed_checkpoint.py::test_resume_in_fresh_processes_is_bitwise",),
           "a rank saves and loads tensors it does not hold (meta)"),
    Mutant("meta_shape_run_real", "passes/shape_prop.py",
           "    if not on_meta(gm):\n        yield args\n        return",
           "    if True:\n        yield args\n        return",
           ("tests/test_ownership.py::"
            "test_a_meta_model_with_float_inputs_transforms_on_fake_tensors",),
           "shape propagation runs a meta model on real inputs"),
]


def copy_tree(dst: Path) -> None:
    """The repository as the installed package sees it, under ``dst``."""
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache",
                                    ".hypothesis", "wheelhouse")
    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)
    for src, where in LAYOUT.items():
        shutil.copytree(ROOT / src, dst / where, ignore=ignore, dirs_exist_ok=True)


def in_copy(path: str) -> str:
    for src, where in LAYOUT.items():
        if path.startswith(src):
            return where + path[len(src):]
    return path


def env_for(copy: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")]))
    env.pop("LBI_FX_TRACEBACK", None)
    return env


def check_imports(copy: Path) -> None:
    """Python must import lbi-fx (and its mapped subpackages) from the copy."""
    code = ("import lbi_fx, lbi_fx.passes, lbi_fx.kernels; "
            "print(lbi_fx.__file__); print(lbi_fx.passes.__file__); "
            "print(lbi_fx.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env_for(copy),
                         capture_output=True, text=True, timeout=300)
    files = out.stdout.split()
    if out.returncode or len(files) != 3 or not all(
            Path(f).resolve().is_relative_to(copy.resolve()) for f in files):
        raise SystemExit(f"mutate.py: lbi-fx is not imported from the copy {copy}: "
                         f"{out.stdout.strip()} {out.stderr.strip()[-500:]}")


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[str, float, str]:
    """'pass', 'fail', 'timeout' or 'error' (pytest could not run them), seconds, tail."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "-W", "ignore", *tests]
    try:
        out = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or [""]
    verdict = {0: "pass", 1: "fail"}.get(out.returncode, "error")
    return verdict, time.perf_counter() - t0, tail[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    p.add_argument("--only", action="append", metavar="NAME", help="run this mutant only "
                   "(repeatable)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip running the named tests on the unmutated copy first")
    a = p.parse_args(argv)
    chosen = MUTANTS
    if a.only:
        unknown = sorted(set(a.only) - {m.name for m in MUTANTS})
        if unknown:
            p.error(f"unknown mutant(s) {unknown}; --list shows them")
        chosen = [m for m in MUTANTS if m.name in a.only]
    if a.list:
        for m in chosen:
            print(f"{m.name}: {m.file}: {m.what}\n    tests: {' '.join(m.tests)}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="lbi-mutate-") as tmp:
        copy = Path(tmp) / "repo"
        copy_tree(copy)
        check_imports(copy)
        broken: set[str] = set()
        if not a.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            for t in tests:  # one by one: a failing test is named
                verdict, secs, tail = run_tests(copy, (t,))
                if verdict != "pass":
                    broken.add(t)
                    print(f"baseline: {t} does not pass unmutated ({verdict}: {tail}); "
                          "mutants relying on it are reported as 'error'")
            print(f"baseline: {len(tests) - len(broken)}/{len(tests)} named tests pass unmutated")
        for m in chosen:
            path = copy / in_copy(m.file)
            text = path.read_text() if path.is_file() else ""
            if text.count(m.old) != 1:
                verdict, secs, tail = "stale", 0.0, f"snippet found {text.count(m.old)} times"
            elif broken & set(m.tests):
                verdict, secs, tail = "error", 0.0, "a named test fails unmutated"
            else:
                try:
                    path.write_text(text.replace(m.old, m.new))
                    outcome, secs, tail = run_tests(copy, m.tests)
                finally:
                    path.write_text(text)
                verdict = {"fail": "killed", "pass": "survived"}.get(outcome, outcome)
            results.append((m, verdict))
            print(f"{verdict:>8}  {m.name}  ({secs:.0f}s; {m.what}; {tail})", flush=True)
    counts = {v: sum(1 for _, r in results if r == v) for v in
              ("killed", "survived", "stale", "timeout", "error")}
    print("summary: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
          + f" of {len(results)} mutants")
    survivors = [m.name for m, r in results if r == "survived"]
    if survivors:
        print("survived (the suite misses these bugs): " + ", ".join(survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
