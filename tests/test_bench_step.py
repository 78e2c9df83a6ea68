"""``lbi-fx bench step`` measures the interface it says it measures."""

from __future__ import annotations

import json
import warnings

import pytest

import lbi_fx
from lbi_fx.bench.step import main

TINY = ["--layers", "2", "--region-size", "1", "--width", "16", "--batch", "2", "--seq", "8",
        "--steps", "1", "--rank", "4", "--threads", "1", "--json"]


def _run(capsys, *extra: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*TINY, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_pool_is_causal_with_four_segments(capsys):
    res = _run(capsys)
    assert (res["pool"], res["segments"], res["rank"]) == ("causal", 4, 16)


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_one_row_pools_measure_rank_r(capsys, pool):
    res = _run(capsys, "--pool", pool)
    assert (res["pool"], res["segments"], res["rank"]) == (pool, 1, 4)
    assert res["eta"] > 0 and res["step_ratio"] > 1.0


def test_segment_len_sets_the_number_of_rows(capsys):
    res = _run(capsys, "--pool", "causal", "--segment-len", "4")
    assert (res["segments"], res["rank"]) == (2, 8)


def test_bad_segment_len_is_refused_by_name():
    with pytest.raises(lbi_fx.InputError, match="segment_len=0"):
        main([*TINY, "--pool", "causal", "--segment-len", "0"])


def test_bench_comm_refuses_a_non_positive_timeout_before_spawning():
    from lbi_fx.bench.comm import main as comm_main

    with pytest.raises(lbi_fx.InputError, match="--timeout 0.0"):
        comm_main(["--k", "2", "--world", "2", "--dim", "16", "--seq", "8", "--heads", "2",
                   "--rank", "4", "--dtype", "fp32", "--timeout", "0"])
