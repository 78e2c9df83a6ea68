"""Front end: capture -> shape propagation -> partition -> dynamic marking -> separator
check, each pass alone, plus ``verify`` and the ``lbi-fx verify`` command line."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.fx as fx
from lbi_fx.passes.capture import CAPTURE_KEY, MODULE_KEY, capture
from lbi_fx.passes.mark_dynamic import is_dynamic, mark_dynamic
from lbi_fx.passes.partition import PROLOGUE, assign_places, place_of
from lbi_fx.passes.separator import min_vertex_separator
from lbi_fx.passes.shape_prop import (
    SHAPE_KEY,
    TensorMeta,
    output_tensor,
    propagate_shapes,
    scalars_per_sample,
)

from lbi_fx import InputError, RegionSpecError, TraceError, every, verify
from lbi_fx.cli import main
from lbi_fx.models.transformer import Block, build, build_export
from lbi_fx.regions import normalize_regions, parse_region_string
from tests.models import (
    BatchNormNet,
    BoundedChain,
    MultiCross,
    SplitModel,
    StaticTables,
    TinyMLP,
    chain_interfaces,
    chain_regions,
    tokens,
)

ROOT = Path(__file__).resolve().parents[1]
L, D = 16, 32  # sequence length and width of the small transformer: L x D = 512 per sample


def small_gpt(n_layer=6, export=False, **kw):
    return (build_export if export else build)(n_layer=n_layer, n_embd=D, n_head=2, seq=L, **kw)


def nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def analyzed(model, regions, example):
    """Run the front-end passes by hand: capture, shapes, places, dynamic marks."""
    gm = capture(model, example)
    propagate_shapes(gm, example)
    assign_places(gm, normalize_regions(regions, model))
    mark_dynamic(gm)
    return gm


# ---------------------------------------------------------------- 1. capture


def test_capture_symbolic_trace_keeps_module_paths():
    model, _ = small_gpt(4)
    gm = capture(model)
    assert gm.meta[CAPTURE_KEY] == "symbolic_trace"
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output"):
            assert MODULE_KEY in n.meta, n.name
        if n.op == "call_module":
            assert n.meta[MODULE_KEY] == n.target
    by = nodes(gm)
    assert by["layers_2_attn_c_attn"].meta[MODULE_KEY] == "layers.2.attn.c_attn"
    assert by["add_1"].meta[MODULE_KEY] == "layers.0"  # glue inside Block.forward
    assert by["scaled_dot_product_attention"].meta[MODULE_KEY] == "layers.0.attn"
    assert by["arange"].meta[MODULE_KEY] == ""  # top-level code


@pytest.mark.parametrize("leaf", [Block, "layers.1"])
def test_capture_leaf_modules(leaf):
    model, example = small_gpt(4)
    gm = capture(model, leaf_modules=[leaf])
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "layers.1" in calls
    assert not any(str(n.meta[MODULE_KEY]).startswith("layers.1.") for n in gm.graph.nodes)
    if leaf is Block:
        assert [c for c in calls if c.startswith("layers")] == [f"layers.{i}" for i in range(4)]
    else:
        assert "layers.0.attn.c_attn" in calls and "layers.2.attn.c_attn" in calls
    report = verify(model, every(1, "layers"), example_inputs=example, leaf_modules=[leaf])
    assert [b.min_cut_scalars for b in report.boundaries] == [L * D] * 3


def test_capture_leaf_module_unknown_path():
    with pytest.raises(InputError, match="layers.9"):
        capture(small_gpt(4)[0], leaf_modules=["layers.9"])


@pytest.mark.parametrize("form", ["graph_module", "export", "exported_program"])
def test_capture_accepts_graph_module_and_export(form):
    model, example = small_gpt(4)
    if form == "graph_module":
        given = fx.symbolic_trace(model)
    else:
        given = torch.export.export(model, example)
        given = given if form == "exported_program" else given.module()
    gm = capture(given)
    assert gm.meta[CAPTURE_KEY] == form.replace("exported_program", "export")
    assert {n.meta[MODULE_KEY] for n in gm.graph.nodes} >= {"layers.3.mlp.c_fc", "layers.0.attn"}
    torch.testing.assert_close(gm(*example), model(*example))
    report = verify(given, every(1, "layers"), example_inputs=example)
    assert [b.min_cut_scalars for b in report.boundaries] == [L * D] * 3


def test_capture_export_fallback_runs_on_other_sizes():
    model, example = small_gpt(2, export=True)
    assert example[0].shape == (2, L)
    with pytest.raises(TypeError):
        fx.symbolic_trace(model)
    with pytest.warns(UserWarning, match="torch.export"):
        gm = capture(model, example)
    assert gm.meta[CAPTURE_KEY] == "export"
    for shape in [(3, 11), (1, 5), (2, L)]:
        x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def test_capture_export_fallback_batch_one_example_stays_dynamic():
    model, example = small_gpt(1, export=True, batch=1)
    with pytest.warns(UserWarning, match="batch and sequence sizes dynamic"):
        gm = capture(model, example)
    x = torch.randint(0, 256, (3, 11))
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def test_capture_untraceable_without_examples_is_trace_error():
    model, _ = small_gpt(2, export=True)
    with pytest.raises(TraceError) as info:
        capture(model)
    msg = str(info.value)
    assert "torch.export" in msg and "leaf_modules" in msg and "transformer.py" in msg


def test_capture_rejects_non_module():
    with pytest.raises(InputError, match="nn.Module"):
        capture(lambda x: x)


# ---------------------------------------------------------------- 2. shapes


def test_shape_prop_records_tensors_and_dtypes():
    model, example = small_gpt(2)
    gm = capture(model)
    out = propagate_shapes(gm, example)
    assert out.shape == (2, L, 256)
    by = nodes(gm)
    assert by["idx"].meta[SHAPE_KEY] == [TensorMeta((2, L), torch.int64)]
    assert by["layers_0_attn_c_attn"].meta[SHAPE_KEY] == [TensorMeta((2, L, 3 * D), torch.float32)]
    assert output_tensor(by["head"]).shape == (2, L, 256)
    assert scalars_per_sample(by["add_2"], 2) == L * D
    # non-tensor nodes (sizes) hold no scalars
    size = by["size_1"]
    assert size.target == "size" and size.meta[SHAPE_KEY] == []
    assert scalars_per_sample(size, 2) == 0 and output_tensor(size) is None


def test_shape_prop_multi_output_counts_all_outputs():
    gm = capture(SplitModel(d=4))
    propagate_shapes(gm, (torch.randn(3, 4),))
    split = next(n for n in gm.graph.nodes if n.target == "split")
    assert [t.shape for t in split.meta[SHAPE_KEY]] == [(3, 4), (3, 8)]
    assert scalars_per_sample(split, 3) == 12
    assert output_tensor(split) is None
    assert sorted(scalars_per_sample(u, 3) for u in split.users) == [4, 8]


def test_scalars_per_sample_batch_folded_into_dim0():
    node = fx.Graph().placeholder("x")
    node.meta[SHAPE_KEY] = [TensorMeta((2 * 5, 4), torch.float32)]
    assert scalars_per_sample(node, 2) == 5 * 4


def test_shape_prop_bad_inputs():
    gm = capture(TinyMLP(d=6))
    with pytest.raises(InputError, match="layers_0_0"):  # names the failing node
        propagate_shapes(gm, (torch.randn(2, 7),))
    with pytest.raises(InputError, match="example_inputs"):
        propagate_shapes(gm, None)
    with pytest.raises(InputError, match="takes 1 inputs"):
        propagate_shapes(gm, (torch.randn(2, 6), torch.randn(2, 6)))
    with pytest.raises(InputError, match="example_inputs"):
        verify(TinyMLP(), every(1, "layers"), example_inputs=None)
    with pytest.raises(InputError, match="layers_0_0"):
        verify(TinyMLP(), every(1, "layers"), example_inputs=(torch.randn(2, 7),))


# ---------------------------------------------------------------- 3. partition


def test_partition_places_every_node():
    model, example = small_gpt(6)
    gm = analyzed(model, [["layers.0", "layers.1"], ["layers.2"]], example)
    by = nodes(gm)
    for n in gm.graph.nodes:
        assert n.meta["lbi_place"] in (PROLOGUE, 0, 1, 2), n.name
        for src in n.all_input_nodes:  # Def. 2.1 on every edge
            if src.op != "get_attr":
                assert place_of(src) <= place_of(n), (src.name, n.name)
    for name in ["idx", "size", "arange", "wte", "wpe", "add", "drop"]:
        assert place_of(by[name]) == PROLOGUE, name
    assert place_of(by["layers_0_ln_1"]) == 0 and place_of(by["add_4"]) == 0
    assert place_of(by["layers_2_mlp_c_fc"]) == 1
    # layers.3 is unlisted and runs after the last region: the epilogue starts there
    for name in ["layers_3_ln_1", "add_8", "layers_5_mlp_c_proj", "ln_f", "head", "output"]:
        assert place_of(by[name]) == 2, name


def test_partition_glue_joins_latest_producer():
    gm = analyzed(TinyMLP(n_layers=4), every(1, "layers"), (torch.randn(2, 6),))
    by = nodes(gm)
    # x = x + layer(x): the top-level add joins the region of layer k
    assert [place_of(by[f"add{'_' + str(k) if k else ''}"]) for k in range(4)] == [0, 1, 2, 3]
    assert by["add_1"].meta[MODULE_KEY] == ""
    assert place_of(by["head"]) == 4  # epilogue
    chain = analyzed(BoundedChain(bypass=True), chain_regions(), (tokens(),))
    skip = nodes(chain)["skip"]  # unlisted module fed by region 1
    assert place_of(skip) == 1 and place_of(nodes(chain)["emb"]) == PROLOGUE


def test_every_and_string_forms():
    mlp = TinyMLP(n_layers=12)
    groups = normalize_regions(every(5, "layers"), mlp)
    assert [len(g) for g in groups] == [5, 5, 2]
    assert groups[2] == ["layers.10", "layers.11"]  # numeric, not lexical, order
    model, _ = small_gpt(4)
    listed = [["layers.0", "layers.1"], ["layers.2", "layers.3"]]
    assert normalize_regions("layers:2", model) == listed
    assert normalize_regions(every(2, "layers"), model) == listed
    assert normalize_regions(" layers.0, layers.1 ;layers.2,layers.3", model) == listed
    assert parse_region_string("a,b;c") == [["a", "b"], ["c"]]


@pytest.mark.parametrize("spec, match", [
    ([["layrs.0"], ["layers.1"]], r"unknown module path 'layrs.0'; did you mean 'layers.0'"),
    ([["layers.0"], ["layers.0"]], r"overlap: 'layers.0' \(region 1\) and 'layers.0' \(region 0\)"),
    ([["layers"], ["layers.1"]], r"overlap: 'layers.1' \(region 1\) and 'layers' \(region 0\)"),
    ([["layers.0"], []], "region 1 is empty"),
    ([["layers.0", "layers.1"]], "1 region"),
    ([["layers.2", "layers.3"], ["layers.0", "layers.1"]],
     r"edge add_4 \(layers.1, region 1\) -> layers_2_ln_1 \(layers.2.ln_1, region 0\)"),
    (every(0, "layers"), r"every\(n=0"),
    (every(2, "nope"), "unknown module path 'nope'"),
    (every(2, "head"), "no children"),
    ("layers:x", "layers:x"),
    ("layers:", "integer N"),
    ("", "empty region spec"),
    ("layers.0;;layers.1", "region 1 is empty"),
    (None, "regions= is required"),
])
def test_region_spec_errors(spec, match):
    model, example = small_gpt(4)
    with pytest.raises(RegionSpecError, match=match):
        verify(model, spec, example_inputs=example)


# ---------------------------------------------------------------- 4. dynamic


def test_dynamic_marking_transformer():
    model, example = small_gpt(4)
    gm = analyzed(model, every(2, "layers"), example)
    by = nodes(gm)
    prologue = [n for n in gm.graph.nodes if place_of(n) == PROLOGUE]
    assert {"wte", "wpe", "drop", "arange"} <= {n.name for n in prologue}
    assert not any(is_dynamic(n) for n in prologue)
    for name in ["size_1", "size_2"]:  # sizes in layers.0.attn read data but carry none
        assert place_of(by[name]) == 0 and not is_dynamic(by[name])
    for name in ["layers_0_ln_1", "layers_0_attn_c_attn", "add_4", "layers_2_ln_1", "head"]:
        assert is_dynamic(by[name]), name


def test_dynamic_marking_static_tables_inside_region():
    gm = analyzed(StaticTables(), every(1, "blocks"), (tokens(),))
    region0 = [n for n in gm.graph.nodes if place_of(n) == 0]
    static_ops = {n.target for n in region0 if not is_dynamic(n)}
    assert {torch.arange, torch.outer, "cos", "sin", "float"} <= static_ops
    tables = [n for n in region0 if n.target in (torch.arange, torch.outer, "cos", "le")]
    assert len(tables) >= 4 and not any(is_dynamic(n) for n in tables)
    assert is_dynamic(nodes(gm)["blocks_0_proj"])
    # the tables flow into regions 1 and 2 yet cross nothing: the cut stays L x D
    report = verify(StaticTables(), every(1, "blocks"), example_inputs=(tokens(),))
    assert [b.min_cut_scalars for b in report.boundaries] == [8 * 8] * 2
    assert [[c.node for c in b.crossing] for b in report.boundaries] == [["add_1"], ["add_3"]]


# ---------------------------------------------------------------- 5. separator


def _brute_force(g, sources, sinks, w):
    best = None
    order = list(g.nodes)
    for k in range(len(order) + 1):
        for cut in itertools.combinations(order, k):
            if _separates(g, sources, sinks, set(cut)):
                cost = sum(w[v] for v in cut)
                best = cost if best is None else min(best, cost)
    return best


def _separates(g, sources, sinks, cut):
    h = g.subgraph(v for v in g.nodes if v not in cut)
    live = {t for t in sinks if t in h}
    return not any(live & (nx.descendants(h, s) | {s}) for s in sources if s in h)


def test_min_vertex_separator_matches_brute_force():
    rng = random.Random(1234)
    for case in range(200):
        n = rng.randint(2, 9)
        g = nx.DiGraph()
        g.add_nodes_from(range(n))
        p = rng.choice([0.2, 0.4, 0.7])
        g.add_edges_from((i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < p)
        w = {v: rng.randint(1, 5) for v in g.nodes}
        sources = set(rng.sample(range(n), rng.randint(1, max(1, n // 2))))
        sinks = set(rng.sample(range(n), rng.randint(1, max(1, n // 2))))
        value, cut = min_vertex_separator(g, sources, sinks, w.__getitem__)
        expected = _brute_force(g, sources, sinks, w)
        assert value == expected, (case, sorted(g.edges), w, sources, sinks)
        assert sum(w[v] for v in cut) == value, case
        assert _separates(g, sources, sinks, cut), case
    assert min_vertex_separator(nx.DiGraph([(0, 1)]), [], [1], lambda v: 1) == (0, set())


@pytest.mark.parametrize("group", [1, 2])
def test_transformer_min_cut_is_hidden_state(group):
    model, example = small_gpt(6)
    report = verify(model, every(group, "layers"), example_inputs=example)
    assert report.ok and report.rank is None
    assert len(report.boundaries) == 6 // group - 1
    for b in report.boundaries:
        assert b.min_cut_scalars == L * D
        assert [s.scalars for s in b.separator] == [L * D]
        assert b.crossing_scalars == L * D


def test_transformer_rank_fails_with_witness():
    model, example = small_gpt(6)
    report = verify(model, every(2, "layers"), example_inputs=example, rank=16)
    assert not report.ok and [b.index for b in report.failing()] == [1, 2]
    edges = {tuple(e) for e in report.graph["edges"]}
    for b in report.boundaries:
        assert b.limit == 16 and b.min_cut_scalars == L * D
        w = b.witness
        assert w and all((u.node, v.node) in edges for u, v in zip(w, w[1:]))
        assert w[0].place in [f"region {j}" for j in range(b.index)]
        assert w[-1].place in [f"region {j}" for j in range(b.index, 3)] + ["epilogue"]
        assert all(x.module.startswith("layers.") for x in w)
    mixed = verify(model, every(2, "layers"), example_inputs=example, rank=[L * D, L * D - 1])
    assert [b.ok for b in mixed.boundaries] == [True, False]
    assert mixed.boundaries[0].witness is None


def test_bounded_chain_interfaces_hold():
    model, example = BoundedChain(), (tokens(seq=8),)
    report = verify(model, chain_regions(), example_inputs=example, interfaces=chain_interfaces())
    assert report.ok
    for b in report.boundaries:
        assert b.min_cut_scalars == 8 * 3  # seq x r
        assert b.interface == [f"blocks_{b.index - 1}_iface"] and b.witness is None


def test_bounded_chain_bypass_breaks_exactly_one_boundary():
    model, example = BoundedChain(bypass=True), (tokens(seq=8),)
    report = verify(model, chain_regions(), example_inputs=example, interfaces=chain_interfaces())
    assert [b.ok for b in report.boundaries] == [True, False, True]
    assert [b.min_cut_scalars for b in report.boundaries] == [24, 8 * (12 + 3), 24]
    broken = report.boundaries[1]
    assert {c.node for c in broken.crossing} == {"blocks_1_iface", "skip"}
    path = [x.node for x in broken.witness]
    assert "skip" in path and "blocks_1_iface" not in path
    assert path.index("tanh_1") < path.index("skip")  # blocks.1's hidden state -> skip -> blocks.2
    assert [x.module for x in broken.witness][-2:] == ["skip", "blocks.2"]
    assert broken.witness[-1].place == "region 2"
    assert "skip [skip]" in str(report)
    # the same model under rank= alone: boundary 2 is wider than r
    ranked = verify(model, chain_regions(), example_inputs=example, rank=24)
    assert [b.ok for b in ranked.boundaries] == [True, False, True]


def test_export_transformer_partitions_like_traced():
    model, example = small_gpt(4)
    exported = torch.export.export(model, example).module()
    fallback, fb_example = small_gpt(4, export=True)
    for m, ex in [(model, example), (exported, example), (fallback, fb_example)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if m is fallback else "error")
            gm = analyzed(m, every(2, "layers"), ex)
            report = verify(m, every(2, "layers"), example_inputs=ex, rank=16)
        counts = [sum(place_of(n) == k for n in gm.graph.nodes) for k in (0, 1)]
        assert min(counts) > 10, counts
        assert [b.min_cut_scalars for b in report.boundaries] == [L * D]
        assert not report.ok and report.boundaries[0].witness
    assert report.capture == "export"
    mask = [n for n in gm.graph.nodes if "tril" in str(n.target)]
    assert mask and place_of(mask[0]) == 0 and not is_dynamic(mask[0])


def test_interfaces_and_rank_validation():
    model, example = TinyMLP(), (torch.randn(2, 6),)
    with pytest.raises(RegionSpecError, match="2 interface"):
        verify(model, every(1, "layers"), example_inputs=example, interfaces=["layers.0", "layers.1"])
    with pytest.raises(RegionSpecError, match="nope"):
        verify(model, every(1, "layers"), example_inputs=example, interfaces=["nope"] * 3)
    for rank in [0, -1, "16", [4], [4, 4, 0], 2.5, True]:
        with pytest.raises(InputError, match="rank"):
            verify(model, every(1, "layers"), example_inputs=example, rank=rank)
    report = verify(model, every(1, "layers"), example_inputs=example, rank=[6, 5, 6])
    assert [b.ok for b in report.boundaries] == [True, False, True]


def test_multi_crossing_and_multi_output_cuts():
    report = verify(MultiCross(), [["enc"], ["dec"]], example_inputs=(torch.randn(2, 16),))
    (b,) = report.boundaries
    assert b.min_cut_scalars == 3 + 5
    assert sorted(c.scalars for c in b.crossing) == [3, 5]
    report = verify(SplitModel(d=4), [["first"], ["second"]], example_inputs=(torch.randn(2, 4),))
    (b,) = report.boundaries
    assert [c.node for c in b.crossing] == ["split"] and b.crossing_scalars == 12
    assert b.min_cut_scalars == 12


def test_batchnorm_block():
    model, example = BatchNormNet(d=6), (torch.randn(4, 6),)
    gm = analyzed(model, every(1, "blocks"), example)
    bn = nodes(gm)["blocks_1_bn"]
    assert place_of(bn) == 1 and is_dynamic(bn)
    report = verify(model, every(1, "blocks"), example_inputs=example, rank=6)
    assert report.ok and [b.min_cut_scalars for b in report.boundaries] == [6, 6]


def test_verify_leaves_batchnorm_state_alone():
    model = BatchNormNet(d=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    verify(model, every(1, "blocks"), example_inputs=(torch.randn(4, 6) * 5 + 3,))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_report_formats():
    model, example = small_gpt(4)
    report = verify(model, every(2, "layers"), example_inputs=example, rank=16)
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["num_regions"] == 2 and data["rank"] == [16]
    (b,) = data["boundaries"]
    assert b["min_cut_scalars"] == L * D and b["ok"] is False
    assert b["witness"] and {"node", "module", "place", "shape", "scalars"} <= set(b["witness"][0])
    text = str(report)
    rows = [line.split() for line in text.splitlines() if line.startswith("1 ")]
    assert rows == [["1", "add_4", str(L * D), str(L * D), "16", "FAIL"]]
    assert "FAIL: boundaries 1" in text and "witness path" in text
    dot = report.to_dot()
    assert dot.startswith("digraph") and 'subgraph "cluster_region 0"' in dot
    assert 'subgraph "cluster_prologue"' in dot and '[color="red", penwidth=2]' in dot
    ok = verify(model, every(1, "layers"), example_inputs=example, rank=L * D)
    assert ok.ok and json.loads(ok.to_json())["boundaries"][2]["witness"] is None
    assert "color=\"red\"" not in ok.to_dot()
    assert "OK: every boundary holds" in str(ok) and len([ln for ln in str(ok).splitlines()
                                                          if ln.endswith(" ok")]) == 3


# ---------------------------------------------------------------- 6. CLI

GPT_ARGS = ["verify", "lbi_fx.models.transformer:build", "--regions", "layers:2"]
BYPASS_ARGS = ["verify", "tests.models:bypass_factory", "--regions", "blocks:1",
               "--interfaces", "blocks.0.iface,blocks.1.iface,blocks.2.iface"]


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_cli_verify_exit_codes(at_root, capsys, tmp_path):
    """--dense: the model as given against the budget (--rank alone checks the rewrite)."""
    assert main([*GPT_ARGS, "--rank", "16", "--dense"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "2048" in out  # default build: seq 32 x n_embd 64
    assert main([*GPT_ARGS, "--rank", "100000", "--dense"]) == 0
    assert "OK: every boundary holds" in capsys.readouterr().out
    dot = tmp_path / "g.dot"
    assert main([*GPT_ARGS, "--rank", "16", "--dense", "--json", "--dot", str(dot)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["boundaries"][0]["min_cut_scalars"] == 2048
    assert dot.read_text().startswith("digraph") and "cluster" in dot.read_text()


def test_cli_interfaces_bypass(at_root, capsys):
    assert main([*BYPASS_ARGS, "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and [b["ok"] for b in data["boundaries"]] == [True, False, True]
    assert main(["verify", "tests.models:bounded_factory", *BYPASS_ARGS[2:]]) == 0


@pytest.mark.parametrize("argv, match", [
    ([*GPT_ARGS[:2], "--regions", "layers.0;layers.99"], "RegionSpecError: region 1: unknown module path 'layers.99'"),
    (["verify", "no_such_pkg_lbi:build", "--regions", "layers:2"], "cannot import module 'no_such_pkg_lbi'"),
    (["verify", "tests.models:no_such_factory", "--regions", "layers:2"], "no callable 'no_such_factory'"),
    (["verify", "tests.models:not_a_tuple_factory", "--regions", "layers:2"], "must return"),
    (["verify", "tests.models:not_a_module_factory", "--regions", "layers:2"], "not an nn.Module"),
    (["verify", "lbi_fx.models.transformer", "--regions", "layers:2"], "pkg.module:function"),
    ([*GPT_ARGS, "--rank", "sixteen"], "--rank 'sixteen'"),
    ([*GPT_ARGS, "--rank", "0"], "InputError"),
    ([*GPT_ARGS, "--rank", "16,16"], "2 entries"),
])
def test_cli_usage_errors_exit_2(at_root, capsys, argv, match):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and captured.out == ""
    assert err.startswith("lbi-fx: error:") and match in err


def test_cli_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "lbi_fx", *GPT_ARGS, "--rank", "16", "--dense"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "FAIL: boundaries 1 do not hold" in proc.stdout and "Traceback" not in proc.stderr
