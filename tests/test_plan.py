"""``lbi-fx plan`` (issue #24 item 6): the simulator on cases worked out by hand, the byte
formulas against a real 2-rank run's ``Comm.totals()``, and the command at a toy size."""

from __future__ import annotations

import json
import os

import pytest
import torch.distributed as dist

from lbi_fx import plan
from lbi_fx.cli import main as cli_main
from lbi_fx.errors import InputError
from lbi_fx.plan import (
    Collective,
    Compute,
    LBIRank,
    Link,
    Recv,
    Send,
    Wait,
    gpipe_program,
    lbi_program,
    one_f_one_b_program,
    simulate,
)

FREE = Link(rate=1e12)  # no latency, bytes cost nothing
TOY = ["--layers", "4", "--width", "32", "--heads", "2", "--seq", "16", "--batch", "4",
       "--rank", "4", "--microbatches", "1,2", "--rates", "unshaped,10mbit", "--reps", "1",
       "--warmup", "1"]
gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                          reason="needs torch.distributed with gloo")


# -- the simulator --------------------------------------------------------------------------

def test_gpipe_step_is_the_hand_computed_value():
    # equal stages: (M + W - 1)(F + B); unequal: stage 0 F [0,1] [1,2]; stage 1 F [1,3]
    # [3,5], B [5,9] [9,13]; stage 0 B [9,11] [13,15]
    assert simulate(gpipe_program([1, 1], [2, 2], 2, 0), FREE).step_s == pytest.approx(9)
    sim = simulate(gpipe_program([1, 2], [2, 4], 2, 0), FREE)
    assert sim.step_s == pytest.approx(15) and sim.busy_s == [6, 12]


def test_one_f_one_b_takes_gpipe_s_time_without_communication():
    for W, M in ((2, 2), (2, 4), (3, 6), (4, 4)):
        fwd, bwd = [1.0] * W, [2.0] * W
        g = simulate(gpipe_program(fwd, bwd, M, 0), FREE).step_s
        f = simulate(one_f_one_b_program(fwd, bwd, M, 0), FREE).step_s
        assert g == pytest.approx(f) == pytest.approx((M + W - 1) * 3), (W, M)
    with pytest.raises(InputError, match="M >= 3"):
        one_f_one_b_program([1.0] * 3, [1.0] * 3, 2, 0)


def test_link_bound_step_is_total_bytes_over_rate():
    """No compute: messages queue on the one link, both directions share it."""
    link = Link(rate=1000.0)
    progs = [[Send("a", 1, 500), Recv("b", 1), Wait(("a", "b"))],
             [Send("b", 0, 1500), Recv("a", 0), Wait(("a", "b"))]]
    assert simulate(progs, link).step_s == pytest.approx(2.0)
    M, act = 4, 1000
    sim = simulate(gpipe_program([0, 0], [0, 0], M, act, grad_bytes=100), link)
    total = 2 * M * act + 2 * 100 + plan.LOSS_PIPE_BYTES  # ring all-reduce: 2n on 2 ranks
    assert sim.step_s == pytest.approx(total / link.rate) and sim.wire_bytes == total


def test_lbi_relay_with_zero_size_messages_is_the_compute_critical_path():
    """K = 3 on 2 ranks ([0, 1] | [2]), M = 2. Rank 0: prologue [0,1], forward [1,3], J
    [3,6]; again [6,7] [7,9] [9,12]. Rank 1: m_2 at 3, forward [3,5], seed [5,9]; m_2 of
    micro-batch 1 at 10 (its prologue [9,10]), forward [10,12], seed [12,16]; mbar to rank
    0 at 16; rank 0 scans [16,16.25], local VJPs 2 x 1, prologue backward 2 x 0.5: 19.25."""
    r0 = LBIRank(prologue=1, forward=2, jacobian=3, local=1, prologue_bwd=0.5,
                 scan={"relay": 0.25})
    r1 = LBIRank(prologue=1, forward=2, jacobian=0, local=0, prologue_bwd=0.5, seed=4)
    progs = lbi_program([r0, r1], [[0, 1], [2]], [16, 16, 16], 16, B=8, M=2, exchange="relay",
                        elem=0)
    sim = simulate(progs, FREE)
    assert sim.step_s == pytest.approx(19.25)
    assert sim.end_s == pytest.approx([19.25, 19.25])  # the loss all-reduce ends both
    one = simulate(lbi_program([r0, r1], [[0, 1], [2]], [16] * 3, 16, 8, 1, "relay", elem=0),
                   FREE)
    assert one.step_s == pytest.approx(10.75)  # 9 (seed) + 0.25 + 1 + 0.5


def test_latency_and_token_bucket():
    lat = Link(rate=1e12, latency=0.01)
    progs = [[Send("a", 1, 8), Wait(("a",)), Send("b", 1, 8), Wait(("b",))],
             [Recv("a", 0), Recv("b", 0), Wait(("a", "b"))]]
    assert simulate(progs, lat).step_s == pytest.approx(0.02)  # one latency per message
    coll = [[Collective("x", 0, rounds=3)], [Compute(1.0), Collective("x", 0, rounds=3)]]
    assert simulate(coll, lat).step_s == pytest.approx(1.03)  # after the last arrival
    tbf = Link(rate=1000.0, burst=500.0)
    progs = [[Send("a", 1, 400), Wait(("a",)), Send("b", 1, 400), Wait(("b",))],
             [Recv("a", 0), Recv("b", 0), Wait(("a", "b"))]]
    assert simulate(progs, tbf).step_s == pytest.approx(0.3)  # 400 in the burst, 300 at rate


def test_busy_ranks_slow_each_other_by_the_measured_speeds():
    """While n ranks compute, each runs at speeds[n - 1]; a rank alone, or waiting, at
    speeds[0]."""
    both = [[Compute(1.0)], [Compute(1.0)]]
    assert simulate(both, FREE).step_s == pytest.approx(1.0)
    assert simulate(both, FREE, speeds=(1.0, 0.5)).step_s == pytest.approx(2.0)
    # rank 1 computes [0, 1] at half speed beside rank 0, then alone: 0.5 + 0.5 = 1.5
    sim = simulate([[Compute(0.5)], [Compute(1.0)]], FREE, speeds=(1.0, 0.5))
    assert sim.end_s == pytest.approx([1.0, 1.5]) and sim.busy_s == [0.5, 1.0]
    # a waiting rank slows nobody: rank 1 waits for rank 0's message, then computes
    progs = [[Compute(1.0), Send("a", 1, 0), Wait(("a",))],
             [Recv("a", 0), Wait(("a",)), Compute(1.0)]]
    assert simulate(progs, FREE, speeds=(0.8, 0.5)).step_s == pytest.approx(2.5)
    assert simulate(plan.dense_program(1.0), FREE, speeds=(0.5,)).step_s == pytest.approx(2.0)
    # beyond the table: its last entry x len / n
    three = [[Compute(1.0)]] * 3
    assert simulate(three, FREE, speeds=(1.0, 0.5)).step_s == pytest.approx(3.0)


def test_contention_probe_measures_a_speed_per_number_of_busy_ranks():
    speeds = plan.contention_probe(2, iters=20)
    assert len(speeds) == 2 and all(0.05 < s < 2.0 for s in speeds)


def test_a_program_that_cannot_finish_is_refused():
    with pytest.raises(ValueError, match="deadlock.*rank 1 waits for \\['never'\\]"):
        simulate([[Compute(1.0)], [Recv("never", 0), Wait(("never",))]], FREE)
    with pytest.raises(ValueError, match="did not post"):
        simulate([[Wait(("x",))]], FREE)


# -- bytes against a real run ----------------------------------------------------------------

@gloo
@pytest.mark.parametrize("argv", [
    ["--pool", "causal"],                                       # allgather, shared canvas
    ["--exchange", "relay", "--canvas-weights", "per_region"],  # relay, per-region canvas
])
def test_byte_formulas_equal_a_real_two_rank_run(argv, capsys):
    """K = 3 on 2 ranks (a rank with two regions: two all-gather slots), B = 2."""
    from lbi_fx.bench import comm
    from lbi_fx.distributed import placement

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = ["--json", "--k", "3", "--world", "2", "--dim", "32", "--seq", "16", "--heads", "2",
            "--rank", "4", "--dtype", "fp32", "--batch", "2", *argv]
    assert comm.main(base) == 0
    data = json.loads(capsys.readouterr().out)
    c = data["config"]
    lbi, model, _, _, layers = comm._build(dict(c, dp=1, heads=2))
    place = placement(3, 2)
    widths, r_max = plan.lbi_widths(lbi)
    shared = plan.lbi_shared_params(lbi, 2)
    got = plan.lbi_bytes(2, widths, r_max, place, c["exchange"], shared)
    assert got == data["lbi"]["logical"]["by_phase"]
    # on the wire: what step_bytes reports and the simulated link carries
    wire = plan.lbi_wire_bytes(2, widths, r_max, place, c["exchange"], shared)
    assert wire == data["lbi"]["by_phase"]
    stages = [[i for k in ks for i in layers[k]] for ks in place]
    pshared = plan.pipeline_shared_params(model, stages)
    pipe = plan.pipeline_bytes(2, 16 * 32, 2, pshared)
    assert pipe == {k: v for k, v in data["pipeline"]["logical"]["by_phase"].items()
                    if k != "pipe_meta"}
    assert plan.pipeline_wire_bytes(2, 16 * 32, 2, pshared) == data["pipeline"]["by_phase"]
    # the simulator's programs put exactly these wire bytes on the link (no compute, a
    # free link; relay's sends and the all-gather's collectives alike)
    from lbi_fx.plan.traffic import bucket_bytes

    ranks = [plan.LBIRank(0.0, 0.0, 0.0, 0.0, 0.0) for _ in range(2)]
    sim = plan.simulate(plan.lbi_program(ranks, place, widths, r_max, 2, 1, c["exchange"],
                                         bucket_bytes(shared)), FREE)
    assert sim.wire_bytes == sum(wire.values())
    sim = plan.simulate(plan.gpipe_program([0.0, 0.0], [0.0, 0.0], 1, 2 * 16 * 32 * 4,
                                           bucket_bytes(pshared)), FREE)
    assert sim.wire_bytes == sum(plan.pipeline_wire_bytes(2, 16 * 32, 2, pshared).values())


# -- the command -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_result(tmp_path_factory):
    """One toy profile, used twice: predictions, and a validation against a made-up
    crossover result whose cells are the predictions x 1.1 (one x 2)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["plan", *TOY, "--contention", "none", "--json"]) == 0
    res = json.loads(out.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    cfg = dict(res["config"], steps=3, warmup=1, exchange=None)
    runs = {rate: [] for rate in res["rates"]}
    for cell in res["cells"]:
        if cell["method"] in ("gpipe", "lbi_shared", "lbi_per_region_relay"):
            name = "lbi_per_region_relay" if cell["method"].endswith("relay") else cell["method"]
            runs[cell["rate"]].append(dict(method=name, microbatches=cell["microbatches"],
                                           median_s=cell["step_s"] * 1.1))
    runs["unshaped"][0]["median_s"] = 2 * runs["unshaped"][0]["median_s"] / 1.1
    path = tmp_path_factory.mktemp("plan") / "crossover.json"
    path.write_text(json.dumps(dict(mode="measured", config=cfg, rates=res["rates"], runs=runs)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["plan", "--validate", str(path), "--reps", "1", "--warmup", "1",
                         "--contention", "1,0.9", "--json"]) == 0
    return res, json.loads(out.getvalue()), runs


def test_cli_json_names_the_fastest_and_the_crossover(toy_result):
    res, _, _ = toy_result
    assert res["rates"] == ["unshaped", "10mbit"] and res["methods"] == list(plan.METHODS)
    for rate in res["rates"]:
        row = res["table"][rate]
        assert set(row) == set(plan.METHODS)
        assert all(row[m]["step_s"] > 0 and row[m]["microbatches"] in (1, 2)
                   for m in plan.METHODS)
        assert res["fastest"][rate] == min(plan.METHODS, key=lambda m: row[m]["step_s"])
    cells = {(c["rate"], c["method"], c["microbatches"]) for c in res["cells"]}
    assert ("unshaped", "1f1b", 1) not in cells and ("unshaped", "1f1b", 2) in cells
    assert {"rate", "break_even_bps", "text", "per_rate"} <= set(res["crossover"])
    # LBI's bytes: the interface and Jacobians, far below the pipeline's activations
    assert sum(res["bytes"]["lbi_per_region_relay"].values()) < \
        sum(res["bytes"]["gpipe"].values()) / 10
    assert set(res["profile"]["pipeline"]["overhead"]) == {"4", "2"}
    assert res["link"]["speeds"] is None
    prof = res["profile"]["lbi"]["shared"]
    assert prof["place"] == [[0], [1]] and set(prof["per_b"]) == {"4", "2"}
    regions = prof["per_b"]["4"]["regions"]
    assert {"forward_0", "forward_1", "jacobian_0", "local_0", "seed"} <= set(regions)
    assert "predicted step seconds" in plan.report(res)


def test_validate_reports_each_cell_and_the_cells_over_25_percent(toy_result):
    _, val, runs = toy_result
    v = val["validation"]
    n = sum(len(r) for r in runs.values())
    assert len(v["default"]["cells"]) == n
    errors = sorted(round(c["rel_error"], 6) for c in v["default"]["cells"])
    # profiles differ between runs, so errors are near, not at, the planted ones
    assert v["default"]["max_abs_rel_error"] > 0.25
    assert any(c["rate"] == "unshaped" for c in v["default"]["over"])
    assert len(errors) == n and v["fitted_latency"]["latency_s"] >= 0
    assert val["link"]["speeds"] == [1.0, 0.9]
    text = "\n".join(plan._validation_lines(v))
    assert "exceed 25%" in text and "max |error|" in text


@pytest.mark.parametrize("argv, match", [
    (["--microbatches", "3"], "does not split into 3"),
    (["--microbatches", "a"], "comma-separated ints"),
    (["--world", "4"], "world <= K = 3"),
    (["--rates", "fast"], "link rate 'fast'"),
    (["--k", "4"], "does not divide --layers 6"),
    (["--k", "3", "--region-size", "3"], "disagree"),
    (["--width", "30"], "multiple of --heads"),
    (["--latency", "-1"], "--latency"),
    (["--contention", "fast"], "--contention 'fast'"),
    (["--validate", "/no/such/crossover.json"], "cannot read"),
])
def test_bad_flags_are_one_line_errors_before_any_profiling(argv, match, capsys):
    assert cli_main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "InputError" in err and match in err, err
    with pytest.raises(InputError):
        plan.run(plan_args(argv))


def test_a_json_that_is_not_a_crossover_result_is_refused(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    assert cli_main(["plan", "--validate", str(p)]) == 2
    assert "not a `lbi-fx bench crossover --json` result" in capsys.readouterr().err
    assert cli_main(["plan", "--world", "x"]) == 2  # argparse's own usage error


def plan_args(argv):
    import argparse

    ap = argparse.ArgumentParser()
    plan.add_arguments(ap)
    return ap.parse_args(argv)
