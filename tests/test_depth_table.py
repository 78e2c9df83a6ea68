"""``benchmarks/depth_table.py`` (issue #23): the depth table of docs/depth.md from per-seed runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def depth_table():
    spec = importlib.util.spec_from_file_location("depth_table",
                                                  ROOT / "benchmarks" / "depth_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(model, name, seed, ce, rec, layers=6, scalars=None):
    return {"model": model, "name": name, "seed": seed, "ce_leak_free": ce,
            "depth_recovery": rec, "layers": layers, "scalars": scalars}


def test_rows_group_by_name_across_seeds_and_files(tmp_path, depth_table):
    for s, (d6, d2, pp, d) in enumerate([(1.40, 1.50, 1.42, 1.47), (1.42, 1.48, 1.44, 1.47)]):
        dense = [_row("dense", "dense", s, d6, 1.0), _row("dense", "dense 2 layers", s, d2, 0.0, 2),
                 _row("lbi", "pp", s, pp, (d2 - pp) / (d2 - d6), scalars=64)]
        (tmp_path / f"dense_seed{s}.json").write_text(json.dumps(dense))
        (tmp_path / f"default_16x4_seed{s}.json").write_text(json.dumps(
            [_row("lbi", "default", s, d, (d2 - d) / (d2 - d6), scalars=64)]))
    (tmp_path / "spl_seed0.json").write_text("")  # a run still in progress: skipped
    rows = depth_table.table(depth_table.load(str(tmp_path)))
    assert [r["name"] for r in rows] == ["dense", "dense 2 layers", "pp", "default"]
    pp = rows[2]
    assert pp["seeds"] == [0, 1] and pp["design"] == "per_position"
    assert pp["recovery"] == pytest.approx([0.8, 4 / 6])
    assert pp["recovery_mean"] == pytest.approx((0.8 + 4 / 6) / 2)
    assert rows[3]["design"] == "default_16x4" and rows[0]["design"] == "-"
    md = depth_table.markdown(rows)
    assert "| pp | per_position | 64 | 2 | 1.4200 / 1.4400 | 1.4300 |" in md
    assert "| dense, 2 layers | - | - | 2 |" in md
