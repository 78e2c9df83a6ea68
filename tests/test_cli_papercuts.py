"""Newcomer papercuts, round 2 (issue 25): the command line does what it says and says it
one way - verify checks the rewrite it is asked about, every command takes any factory,
widths read "rank r x S segments = S r scalars", help has text and no reST markup."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pytest

import lbi_fx
from lbi_fx.cli import build_parser, main
from lbi_fx.cli.factory import UsageError, parse_factory_kw

ROOT = Path(__file__).resolve().parents[1]
# a 2-layer GPT of width 16 over 8 positions: 2 regions, boundary min cut 8 x 16 = 128
TINY = ["lbi_fx.models:gpt", "--factory-kw", "n_layer=2", "--factory-kw", "n_embd=16",
        "--factory-kw", "seq=8"]


def _run(capsys, *argv: str) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(list(argv))
    return rc, capsys.readouterr().out


# -- item 7: verify checks what it is asked about -----------------------------------------

def test_verify_with_a_rank_checks_the_rewrite_at_that_rank(capsys):
    rc, out = _run(capsys, "verify", *TINY, "--regions", "layers:1", "--rank", "4", "--json")
    data = json.loads(out)
    assert rc == 0 and data["checked"] == "rewrite" and data["ok"] is True
    assert data["segments"] == 4 and data["boundaries"][0]["limit"] == 16
    rc, out = _run(capsys, "verify", *TINY, "--regions", "layers:1", "--rank", "4")
    assert rc == 0 and "checked the bounded-interface rewrite" in out
    assert "rank 4 x 4 segments = 16 scalars" in out and "OK: every boundary holds" in out


def test_verify_dense_checks_the_model_as_given(capsys):
    rc, out = _run(capsys, "verify", *TINY, "--regions", "layers:1", "--rank", "4", "--dense")
    assert rc == 1 and "checked the model as given" in out and "a budget of 4 scalars" in out
    assert "FAIL: boundaries 1" in out and "128" in out


def test_verify_without_a_budget_says_none_was_given(capsys):
    rc, out = _run(capsys, "verify", *TINY, "--regions", "layers:1")
    assert rc == 0 and "OK: every boundary holds" not in out
    assert "no budget given" in out and "min cuts only" in out
    row = next(ln for ln in out.splitlines() if ln.startswith("1 "))
    assert row.split()[-1] == "-" and "128" in row  # the min cut, and no verdict
    rc, out = _run(capsys, "verify", *TINY, "--regions", "layers:1", "--json")
    assert rc == 0 and json.loads(out)["checked"] == "min cuts"


# -- item 7: every command takes any factory, with --factory-kw ------------------------------

def test_factory_kw_values_are_python_literals_or_strings():
    kw = parse_factory_kw(["n=2", "lr=0.1", "tie=False", "name=gpt", "shape=(1, 2)", "x=None",
                           "path=a/b.txt"])
    assert kw == {"n": 2, "lr": 0.1, "tie": False, "name": "gpt", "shape": (1, 2), "x": None,
                  "path": "a/b.txt"}
    for bad in ("n", "=2", "2x=1"):
        with pytest.raises(UsageError, match="KEY=VALUE"):
            parse_factory_kw([bad])


def test_a_bad_factory_kw_is_a_one_line_usage_error(capsys):
    assert main(["verify", "lbi_fx.models:gpt", "--regions", "layers:2", "--factory-kw",
                 "n_layer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--factory-kw 'n_layer'" in err
    assert main(["inspect", "lbi_fx.models:gpt", "--regions", "layers:2", "--factory-kw",
                 "no_such_kw=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "raised TypeError" in err and "no_such_kw" in err


def test_inspect_takes_factory_kw_and_shows_widths_one_way(capsys):
    rc, out = _run(capsys, "inspect", *TINY, "--regions", "layers:1", "--rank", "8",
                   "--show", "report")
    assert rc == 0 and "rank <=" not in out
    assert "== 2 regions, interfaces of rank 8 x 4 segments = 32 scalars, pool causal" in out
    assert "batch 2, rank 8 x 4 segments = 32 scalars, captured by" in out


def test_bench_step_takes_any_factory_and_states_the_segments(capsys):
    rc, out = _run(capsys, "bench", "step", "--model", "lbi_fx.models:gpt",
                   *TINY[1:], "--regions", "layers:1", "--rank", "4", "--steps", "1",
                   "--threads", "1", "--json")
    res = json.loads(out)
    assert rc == 0 and res["model"] == "lbi_fx.models:gpt" and res["regions"] == 2
    assert (res["rank_per_segment"], res["segments"], res["rank"]) == (4, 4, 16)
    assert res["width"] == "rank 4 x 4 segments = 16 scalars"


def test_bench_step_default_header_says_rank_times_segments(capsys):
    rc, out = _run(capsys, "bench", "step", "--layers", "2", "--region-size", "1", "--width",
                   "16", "--batch", "2", "--seq", "8", "--steps", "1", "--threads", "1")
    header = out.splitlines()[0]
    assert rc == 0 and "r=" not in header
    assert "interfaces of rank 16 x 4 segments = 64 scalars (w = 64)" in header


def test_bench_step_takes_a_model_that_is_not_a_language_model(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # tests.* factories import from the checkout
    rc, out = _run(capsys, "bench", "step", "--model", "tests.test_bad_inputs:factory",
                   "--regions", "blocks:1", "--rank", "3", "--steps", "1", "--threads", "1",
                   "--json")
    res = json.loads(out)
    assert rc == 0 and res["regions"] == 3 and res["segments"] == 1 and res["eta"] > 0


def test_parity_takes_any_factory(capsys):
    rc, out = _run(capsys, "parity", "--factory", "lbi_fx.models:gpt", *TINY[1:],
                   "--regions", "layers:1", "--inits", "1", "--batches", "2", "--json")
    rows = json.loads(out)
    assert rc == 0 and [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert all(r["backend"] == "lbi_fx.models:gpt" and r["trials"] == 2 and r["ok"]
               and (r["regions"], r["rank"], r["segments"]) == (2, 8, 4) for r in rows)
    rc, out = _run(capsys, "parity", "--factory", "lbi_fx.models:gpt", *TINY[1:],
                   "--regions", "layers:1", "--inits", "1", "--batches", "1")
    assert rc == 0 and "interfaces of rank 8 x 4 segments = 32 scalars" in out


def test_parity_on_a_float64_factory_holds_the_float64_goal(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc, out = _run(capsys, "parity", "--factory", "tests.test_bad_inputs:factory", "--regions",
                   "blocks:1", "--rank", "3", "--inits", "1", "--batches", "2", "--json")
    rows = {r["dtype"]: r for r in json.loads(out)}
    assert rc == 0 and set(rows) == {"float64", "bfloat16"}
    assert rows["float64"]["goal_rel_l2"] == 1e-10 and rows["float64"]["rel_l2"] < 1e-10


# -- item 7: help, --version -----------------------------------------------------------------

def _parsers() -> dict[str, argparse.ArgumentParser]:
    out = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        out[name] = parser
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    walk(sp, f"{name} {sub}")

    walk(build_parser(None), "lbi-fx")
    return out


def test_every_argument_of_every_command_has_help():
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in _parsers().items()
               for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and not a.help]
    assert missing == []


def test_inspect_help_explains_its_arguments(capsys):
    assert main(["inspect", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("pkg.module:function returning (model, example_inputs)", "--factory-kw",
                 "interface rank r per row", "what to print", "interface encoder"):
        assert text in out, text


def test_no_help_shows_raw_rst_backticks(capsys):
    from lbi_fx.bench import BENCHES

    commands = [[], ["verify"], ["inspect"], ["parity"], ["quality"], ["spl"], ["bench"],
                *[["bench", b] for b in BENCHES]]
    for argv in commands:
        assert main([*argv, "--help"]) == 0
        out = capsys.readouterr().out
        assert "``" not in out, (argv, [ln for ln in out.splitlines() if "``" in ln])


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lbi-fx {lbi_fx.__version__}"


# -- item 5: lbi-fx quality does not warn about what it does on purpose ----------------------

def test_quality_quick_runs_without_warning_about_itself(capsys):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["quality", "--quick", "--steps", "2", "--layers", "4", "--width", "16",
                     "--seq", "16", "--batch", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    own = [str(w.message)[:120] for w in seen
           if issubclass(w.category, lbi_fx.CausalityWarning) or "requires_grad" in str(w.message)]
    assert own == []
    header = out.splitlines()[0]
    assert "then scan" not in header and "LBI backward: scan, the first 2 steps timed" in header
    assert "causal" in out  # the table is there


def test_quality_header_names_both_backwards_when_they_differ(capsys):
    from lbi_fx.cli.quality import Config, _backward_text

    cfg = Config(steps=600, timed_steps=15, backward="autograd")
    assert _backward_text(cfg) == ("LBI backward: scan for the first 15 steps (timed), then "
                                   "autograd (same gradients) for the other 585")


# -- item 12: every test of the suite runs in CI -----------------------------------------------

def test_no_test_is_left_out_of_the_default_run():
    """CI runs plain `pytest -q`: a marker that the default run skips hides a test forever."""
    marker = "mark." + "slow"  # spelled apart so this file does not match itself
    offenders = [p.name for p in sorted((ROOT / "tests").glob("*.py"))
                 if marker in p.read_text()]
    assert offenders == []
    assert "--slow" not in (ROOT / "tests" / "conftest.py").read_text()


# -- issue 35 item 8: advice that can be followed from the command line --------------------

def test_every_transform_option_has_a_flag_on_verify_and_inspect():
    """A refusal may advise any keyword of lbi_fx.transform (verify --rank 2 advises
    interface_norm='rms'): each is a flag of both commands, and reaches transform."""
    import inspect

    options = [n for n, p in inspect.signature(lbi_fx.transform).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "example_inputs"]
    assert {"interface_norm", "summary", "decoder_window", "decoder_at",
            "canvas_weights"} <= set(options)
    parsers = _parsers()
    for cmd in ("verify", "inspect"):
        flags = {s for a in parsers[f"lbi-fx {cmd}"]._actions for s in a.option_strings}
        missing = [o for o in options if "--" + o.replace("_", "-") not in flags]
        assert missing == [], f"lbi-fx {cmd} has no flag for transform's {missing}"


@pytest.mark.parametrize("cmd", ["verify", "inspect"])
def test_transform_flags_reach_transform(cmd, monkeypatch, capsys):
    seen = {}

    def fake(model, regions, rank=16, **kw):
        seen.update(kw)
        raise lbi_fx.InputError("stop here")

    monkeypatch.setattr("lbi_fx.api.transform", fake)
    rc, _ = _run(capsys, cmd, *TINY, "--regions", "layers:1", "--rank", "2",
                 "--interface-norm", "rms", "--summary", "latest", "--decoder-window", "2",
                 "--decoder-at", "every", "--canvas-weights", "per_region", "--decoder-init",
                 "zero", "--jacobian", "reuse", "--chunk", "3", "--leaf-modules",
                 "layers.0.attn", "--scan-backend", "torch", "--check-finite")
    assert rc == 2
    assert {k: seen[k] for k in ("interface_norm", "summary", "decoder_window", "decoder_at",
                                 "canvas_weights", "decoder_init", "jacobian", "chunk",
                                 "leaf_modules", "scan_backend", "check_finite")} == {
        "interface_norm": "rms", "summary": "latest", "decoder_window": 2,
        "decoder_at": "every", "canvas_weights": "per_region", "decoder_init": "zero",
        "jacobian": "reuse", "chunk": 3, "leaf_modules": ("layers.0.attn",),
        "scan_backend": "torch", "check_finite": True}


def test_rank_2_advice_is_followed_with_the_flag_it_names(capsys):
    """verify --rank 2 advises interface_norm='rms'; --interface-norm rms then works."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["verify", *TINY, "--regions", "layers:1", "--rank", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "interface_norm='rms'" in err, err
    rc, out = _run(capsys, "verify", *TINY, "--regions", "layers:1", "--rank", "2",
                   "--interface-norm", "rms")
    assert rc == 0 and "OK: every boundary holds" in out, out


def test_jacobian_forward_refusal_prints_its_message_only(capfd):
    """The refusal used to come after a 25-line traceback torch.fx prints when generated
    code fails; the CLI prints one line, the library's refusal no dump either."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["inspect", *TINY, "--regions", "layers:1", "--rank", "4",
                   "--jacobian", "forward", "--show", "report"])
    out, err = capfd.readouterr()
    assert rc == 3 and err.startswith("lbi-fx: error: RewriteError: region 0 (jacobian='forward')")
    assert err.count("\n") == 1 and "Traceback" not in err and "FX-traced" not in err, err
    model, (idx,) = lbi_fx.models.gpt(n_layer=2, n_embd=16, seq=8)
    with warnings.catch_warnings(), pytest.raises(lbi_fx.RewriteError, match="jacobian='forward'"):
        warnings.simplefilter("ignore")
        lbi_fx.transform(model, lbi_fx.every(1, "layers"), 4, example_inputs=(idx,),
                         jacobian="forward")
    assert "FX-traced" not in capfd.readouterr().err


def test_seq_dim_flag_parses_one_or_per_input_axes_and_refuses_by_name():
    import lbi_fx
    from lbi_fx.cli.common import parse_seq_dim

    assert parse_seq_dim(None) is None and parse_seq_dim("2") == 2
    assert parse_seq_dim("1,none") == [1, None]
    with pytest.raises(lbi_fx.InputError, match="--seq-dim 'x'"):
        parse_seq_dim("x")
