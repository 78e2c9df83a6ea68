"""``lbi-fx bench crossover`` (issue #24 item 5) and its loopback shaper.

The shaper is tested against a fake ``run`` that records the commands and plays ``ip`` /
``tc``: the real loopback is never shaped here (other tests use it concurrently). One
tiny real run (2 gloo ranks, ``--modeled``, unshaped) checks the bench's numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
import torch.distributed as dist

from lbi_fx.bench import crossover, link
from lbi_fx.bench.link import LinkShapingUnavailable, parse_rate, shaped_loopback
from lbi_fx.cli import main as cli_main
from lbi_fx.errors import InputError

NOQUEUE = "qdisc noqueue 0: root refcnt 2 \n"
TBF = "qdisc tbf 8001: root refcnt 2 rate 10Mbit burst 16Kb lat 13.1s \n"
EPERM = (2, "RTNETLINK answers: Operation not permitted\n")


class FakeNet:
    """``subprocess.run`` for ip/tc on a pretend loopback; ``fail`` maps a command prefix
    to (returncode, stderr) or an exception to raise."""

    def __init__(self, qdisc: str = NOQUEUE, mtu: int = 65536, fail: dict | None = None):
        self.qdisc, self.mtu, self.fail, self.calls = qdisc, mtu, fail or {}, []

    def __call__(self, argv, capture_output=False, text=False, check=False):
        argv = list(argv)
        self.calls.append(" ".join(argv))
        for prefix, what in self.fail.items():
            if " ".join(argv).startswith(prefix):
                if isinstance(what, BaseException):
                    raise what
                return subprocess.CompletedProcess(argv, what[0], "", what[1])
        out = ""
        if argv[:3] == ["ip", "link", "show"]:
            out = (f"1: lo: <LOOPBACK,UP,LOWER_UP> mtu {self.mtu} qdisc noqueue state UNKNOWN "
                   "mode DEFAULT group default qlen 1000\n    link/loopback 00:00:00:00:00:00\n")
        elif argv[:3] == ["tc", "qdisc", "show"]:
            out = self.qdisc
        elif argv[:3] == ["ip", "link", "set"]:
            self.mtu = int(argv[-1])
        elif argv[:3] == ["tc", "qdisc", "add"]:
            self.qdisc = TBF
        elif argv[:3] == ["tc", "qdisc", "del"]:
            self.qdisc = NOQUEUE
        return subprocess.CompletedProcess(argv, 0, out, "")

    def changes(self) -> list[str]:
        return [c for c in self.calls if c.split()[:3] not in (["ip", "link", "show"],
                                                               ["tc", "qdisc", "show"])]


SHAPE = ["ip link set dev lo mtu 1500",
         "tc qdisc add dev lo root tbf rate 10mbit burst 16kb limit 16mb"]
RESTORE = ["tc qdisc del dev lo root", "ip link set dev lo mtu 65536"]


def test_shapes_then_restores_in_order():
    net = FakeNet()
    with shaped_loopback("10mbit", run=net) as got:
        assert net.changes() == SHAPE and net.mtu == 1500 and net.qdisc == TBF
        assert got["original_mtu"] == 65536
    assert net.changes() == SHAPE + RESTORE
    assert net.mtu == 65536 and net.qdisc == NOQUEUE


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_error_inside_the_block_still_restores_in_order(exc):
    net = FakeNet()
    with pytest.raises(type(exc)), shaped_loopback("10mbit", run=net):
        raise exc
    assert net.changes() == SHAPE + RESTORE


def test_sigterm_inside_the_block_restores_and_puts_the_handler_back():
    net = FakeNet()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info, shaped_loopback("10mbit", run=net):
        assert signal.getsignal(signal.SIGTERM) is link._terminated  # else: do not kill
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.code == 128 + signal.SIGTERM
    assert net.changes() == SHAPE + RESTORE
    assert signal.getsignal(signal.SIGTERM) is before


def test_atexit_safety_net_is_registered_for_the_block(monkeypatch):
    seen = []
    monkeypatch.setattr(link.atexit, "register", lambda f: seen.append(("register", f)))
    monkeypatch.setattr(link.atexit, "unregister", lambda f: seen.append(("unregister", f)))
    net = FakeNet()
    with shaped_loopback("10mbit", run=net):
        assert [k for k, _ in seen] == ["register"]
        net.calls.clear()
        assert seen[0][1]() == [] and net.changes() == RESTORE  # the hook restores
        net.calls.clear()
    assert [k for k, _ in seen] == ["register", "unregister"] and seen[0][1] is seen[1][1]
    assert net.changes() == []  # restored once only


def test_an_existing_root_qdisc_is_refused_untouched():
    net = FakeNet(qdisc=TBF, mtu=1500)
    with pytest.raises(InputError) as info, shaped_loopback("10mbit", run=net):
        pytest.fail("entered the block")
    assert not isinstance(info.value, LinkShapingUnavailable)
    assert "tc qdisc del dev lo root" in str(info.value) and "tbf" in str(info.value)
    assert net.changes() == []


@pytest.mark.parametrize("rate", [None, "unshaped"])
def test_unshaped_runs_nothing(rate):
    net = FakeNet()
    with shaped_loopback(rate, run=net) as got:
        assert got is None
    assert net.calls == []


def test_eperm_is_link_shaping_unavailable_and_changes_nothing():
    net = FakeNet(fail={"ip link set": EPERM})
    with pytest.raises(LinkShapingUnavailable, match="not permitted.*--modeled"), \
            shaped_loopback("10mbit", run=net):
        pytest.fail("entered the block")
    assert net.changes() == ["ip link set dev lo mtu 1500"] and net.mtu == 65536


def test_tc_refused_after_the_mtu_puts_the_mtu_back():
    net = FakeNet(fail={"tc qdisc add": EPERM})
    with pytest.raises(LinkShapingUnavailable), shaped_loopback("10mbit", run=net):
        pytest.fail("entered the block")
    assert net.changes() == [SHAPE[0], SHAPE[1], RESTORE[1]] and net.mtu == 65536


def test_missing_tools_and_probe():
    with pytest.raises(LinkShapingUnavailable, match="not installed"), \
            shaped_loopback("10mbit", run=FakeNet(fail={"ip": FileNotFoundError("ip")})):
        pytest.fail("entered the block")
    with pytest.raises(LinkShapingUnavailable, match="not permitted"):
        link.probe(FakeNet(fail={"ip link set": EPERM}))
    net = FakeNet()
    assert link.probe(net) == 65536 and net.changes() == ["ip link set dev lo mtu 65536"]


def test_parse_rate():
    assert parse_rate("10mbit") == 1e7 and parse_rate("1gbit") == 1e9
    assert parse_rate("2mbps") == 1.6e7 and parse_rate("1kibit") == 1024
    assert parse_rate("unshaped") == float("inf")
    for bad in ("10", "fast", "-1mbit", "0mbit"):
        with pytest.raises(InputError):
            parse_rate(bad)


def test_cli_without_tc_suggests_modeled(monkeypatch, capsys):
    def no_tc(run=None):
        raise LinkShapingUnavailable("`tc` is not installed")

    def never(*a, **k):
        raise AssertionError("shaped the loopback")

    monkeypatch.setattr(crossover, "probe", no_tc)
    monkeypatch.setattr(crossover, "shaped_loopback", never)
    monkeypatch.setattr(crossover, "spawn_run", never)
    assert cli_main(["bench", "crossover", "--rates", "unshaped,10mbit", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "LinkShapingUnavailable" in err and "--modeled" in err


def test_bench_crossover_help_via_cli(capsys):
    assert cli_main(["bench", "crossover", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lbi-fx bench crossover ")
    for flag in ("--rates", "--microbatches", "--modeled", "--json", "--plot", "--steps",
                 "--no-progress", "--layers", "--region-size", "--rank"):
        assert flag in out


def test_plan_skips_what_cannot_run():
    cfg = dict(batch=8, world=2, microbatches=[1, 2, 3])
    runs, skipped = crossover.plan(cfg)
    for method in crossover.METHODS:
        assert (method, 2) in runs and (method, 3) not in runs
    assert ("1f1b", 1) not in runs and ("lbi_per_region_relay", 1) in runs
    reasons = " ".join(s["reason"] for s in skipped)
    assert "M >= 2" in reasons and "does not split into 3" in reasons


def test_crossover_and_break_even_from_numbers():
    def cell(t, m=1):
        return dict(median_s=t, microbatches=m)
    table = {"unshaped": dict(gpipe=cell(0.1), lbi_shared=cell(0.3)),
             "100mbit": dict(gpipe=cell(0.2), lbi_shared=cell(0.31)),
             "10mbit": dict(gpipe=cell(1.0), lbi_shared=cell(0.4))}
    c = crossover.crossover(table, list(table))
    assert c["rate"] == "10mbit" and c["lbi_loses"] == ["unshaped", "100mbit"]
    assert "loses at unshaped, 100mbit" in c["text"]
    rows = [dict(method="gpipe", median_s=0.1, bytes=dict(wire=1_000_000)),
            dict(method="lbi_shared", median_s=0.3, bytes=dict(wire=0))]
    assert crossover.break_even(rows) == pytest.approx(8e6 / 0.2)  # 0.1 + 8e6/R = 0.3
    rows[1]["bytes"]["wire"] = 2_000_000
    assert crossover.break_even(rows) is None  # slower and more bytes: never


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_tiny_modeled_run(capsys):
    # width 32, seq 32: the J all-gather ((S r)^2 = 16^2 per sample) is a quarter of the
    # activations a boundary carries (2 L D); at width 16, seq 16 the two are equal
    B, L, D, W = 8, 16 * 2, 32, 2
    argv = ["--modeled", "--rates", "unshaped,10mbit", "--layers", "4", "--width", str(D),
            "--heads", "2", "--seq", str(L), "--batch", str(B), "--steps", "3",
            "--microbatches", "1,2", "--json", "--no-progress"]
    assert crossover.main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mode"] == "modeled" and s["rates"] == ["unshaped", "10mbit"]
    rows = s["runs"]["unshaped"]
    timed = {(r["method"], r["microbatches"]): r for r in rows if "median_s" in r}
    for m in crossover.METHODS:
        assert any(k[0] == m for k in timed), m
        assert s["table"]["unshaped"][m]["median_s"] > 0
    assert all(t > 0 for r in timed.values() for t in r["steps_s"])
    assert all(len(r["per_rank_s"]) == W for r in timed.values())
    per_dir = B * L * D * 4
    assert s["boundary_bytes_per_direction"] == per_dir
    for (method, M), r in timed.items():
        parts = r["bytes"]["parts"]
        assert "pipe_meta" not in parts and "init_broadcast" not in parts
        assert r["bytes"]["total"] == sum(parts.values()) > 0
        assert r["bytes"]["wire"] >= r["bytes"]["total"]
        if method in crossover.PIPELINES:  # W - 1 = 1 boundary, both ways, M chunks
            assert parts["pipe_forward_act"] == parts["pipe_backward_grad"] == M * (B // M) * L * D * 4
            assert parts["pipe_forward_act"] + parts["pipe_backward_grad"] == 2 * M * (B // M * L * D * 4)
        else:
            exchange = sum(v for k, v in parts.items() if k not in ("grad_allreduce", "loss"))
            assert 0 < exchange < 2 * per_dir / 3, parts
            assert ("grad_allreduce" in parts) == method.startswith("lbi_shared"), parts
            if method == "lbi_per_region_relay":  # m_k forward, mbar (+ flag) back: B x r
                assert set(parts) == {"forward_m", "mbar_relay", "loss"}, parts
    assert ("gpipe", 1) in timed and ("gpipe", 2) in timed and ("1f1b", 2) in timed
    assert ("1f1b", 1) not in timed
    # modeled rows: the unshaped median plus the wire bytes at the rate
    slow = {(r["method"], r["microbatches"]): r for r in s["runs"]["10mbit"] if "median_s" in r}
    for k, r in slow.items():
        assert r["modeled"] and r["median_s"] == pytest.approx(
            timed[k]["median_s"] + 8 * timed[k]["bytes"]["wire"] / 1e7)
    c = s["crossover"]
    assert {"rate", "text", "lbi_wins", "lbi_loses", "break_even_bps"} <= set(c)
    assert c["rate"] in (None, "unshaped", "10mbit") and c["text"]
