"""``transform(..., canvas_weights="per_region")``: each region's own copy of the prologue
weights its canvas is computed with (``passes/per_region_canvas.py``)."""

from __future__ import annotations

import pytest
import torch

import lbi_fx
from lbi_fx.errors import CheckpointError, InputError
from lbi_fx.models.transformer import GPT, GPTConfig, build_export
from lbi_fx.testing import gradient_parity
from tests.models import BoundedChain, chain_regions, tokens

pytestmark = pytest.mark.usefixtures("one_thread")

FP64 = dict(rel_l2=1e-10, cosine=1 - 1e-10)
FP32 = dict(rel_l2=1e-6, cosine=0.999999)
REGIONS = lbi_fx.every(2, "layers")  # 6 layers -> 3 regions


def _gpt(tie: bool = True, dtype=torch.float64) -> GPT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = GPTConfig(n_layer=6, n_embd=32, n_head=4, block_size=32, tie_weights=tie)
        return GPT(cfg).to(dtype)


def _idx(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def _lbi(model, canvas_weights: str = "per_region", seed: int = 1, **kw):
    with torch.random.fork_rng(devices=[]):  # the same interface weights for every call
        torch.manual_seed(seed)
        return lbi_fx.transform(model, REGIONS, rank=4, example_inputs=(_idx(),),
                                canvas_weights=canvas_weights, **kw)


@pytest.fixture(scope="module")
def per_region():
    return _lbi(_gpt())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64), (torch.float32, FP32)])
def test_scan_backward_is_exact_for_the_per_region_model(dtype, tol):
    lbi = _lbi(_gpt(dtype=dtype))
    assert lbi.pool == "causal"  # transform probed the built model and found no leak
    report = gradient_parity(lbi, (_idx(),))
    report.assert_close(**tol)
    names = {t.name for t in report.tensors}
    assert {"lbi_canvas.region_1.wte.weight", "lbi_canvas.region_2.wpe.weight"} <= names


def test_copies_are_distinct_start_equal_and_train_apart(per_region):
    lbi = per_region
    names = dict(lbi.named_parameters())
    copies = {k: (names[f"lbi_canvas.region_{k}.wte.weight"],
                  names[f"lbi_canvas.region_{k}.wpe.weight"]) for k in (1, 2)}
    wte, wpe = lbi.wte.weight, lbi.wpe.weight
    group = [wte, *(c[0] for c in copies.values())]
    assert len({id(p) for p in group}) == 3
    for te, pe in copies.values():
        assert torch.equal(te, wte) and torch.equal(pe, wpe)
    # the tied head reads the last region's copy; region 0 and m_0 the originals
    assert lbi.lbi_canvas.epilogue.head.weight is copies[2][0]
    assert "lbi_canvas.region_0" not in dict(lbi.named_modules())
    pro = lbi.programs["prologue"].code
    assert "self.wte(idx)" in pro and "self.lbi_canvas.region_1.wte(idx)" in pro
    assert "self.lbi_canvas.epilogue.head(" in lbi.programs["epilogue"].code

    lbi = _lbi(_gpt())  # a fresh model: the fixture stays at init for the other tests
    opt = torch.optim.SGD(lbi.parameters(), lr=0.5)
    idx = _idx()
    torch.nn.functional.cross_entropy(lbi(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    opt.step()
    c1, c2 = lbi.lbi_canvas.region_1.wte.weight, lbi.lbi_canvas.region_2.wte.weight
    assert not torch.equal(lbi.wte.weight, c1) and not torch.equal(c1, c2)
    assert not torch.equal(lbi.wpe.weight, lbi.lbi_canvas.region_1.wpe.weight)


def test_output_at_init_equals_the_shared_model(per_region):
    shared = _lbi(_gpt(), "shared")
    x = _idx(3)
    torch.testing.assert_close(per_region(x), shared(x), rtol=0, atol=1e-12)
    assert shared.canvas_weights == "shared" and per_region.canvas_weights == "per_region"


def test_causality_and_separators_hold(per_region):
    report = lbi_fx.verify(per_region, example_inputs=(_idx(),))
    assert report.ok, report
    assert report.causality.lbi_causal is True and not report.causality.leaks
    x, y = _idx(), _idx(5)
    loss = lbi_fx.testing.prefix_loss(per_region, x, y)
    assert torch.isfinite(torch.as_tensor(loss)).all()


def test_untied_gpt():
    lbi = _lbi(_gpt(tie=False))
    gradient_parity(lbi, (_idx(),)).assert_close(**FP64)
    assert "epilogue" not in lbi.lbi_canvas  # the head is the epilogue's own
    assert "self.head(" in lbi.programs["epilogue"].code
    users = lbi.prologue_param_users()
    assert "head.weight" not in users
    assert users["lbi_canvas.region_2.wte.weight"] == {2}


def test_unknown_value_is_refused():
    with pytest.raises(InputError, match="canvas_weights='per_rank': choose one of shared, per_region"):
        lbi_fx.transform(_gpt(), REGIONS, rank=4, example_inputs=(_idx(),),
                         canvas_weights="per_rank")


def test_state_dict_round_trip_and_refusal(per_region):
    sd = per_region.state_dict()
    assert sd["lbi._extra_state"]["canvas_weights"] == "per_region"
    assert "lbi_canvas.region_1.wte.weight" in sd
    fresh = _lbi(_gpt(), seed=7)
    with torch.no_grad():
        for p in fresh.lbi_canvas.parameters():
            p.add_(1.0)  # so the load has something to restore
    fresh.load_state_dict(sd)
    x = _idx(4)
    torch.testing.assert_close(fresh(x), per_region(x), rtol=0, atol=0)
    shared = _lbi(_gpt(), "shared")
    with pytest.raises(CheckpointError, match="canvas weights: the state dict has 'per_region', "
                                              "this model 'shared'.*canvas_weights='per_region'"):
        shared.load_state_dict(sd)


def test_prologue_param_users(per_region):
    shared = _lbi(_gpt(), "shared")
    users = shared.prologue_param_users()
    assert users["wte.weight"] == {0, 1, 2, "epilogue"}  # the canvas everywhere, tied head
    assert users["wpe.weight"] == {0, 1, 2}
    assert users["lbi.enc_in.net.0.weight"] == {0}
    assert not any(n.startswith("lbi_canvas") for n in users)

    users = per_region.prologue_param_users()
    assert users["wte.weight"] == users["wpe.weight"] == {0}
    assert users["lbi.enc_in.net.0.weight"] == {0}
    assert users["lbi_canvas.region_1.wte.weight"] == users["lbi_canvas.region_1.wpe.weight"] == {1}
    assert users["lbi_canvas.region_2.wte.weight"] == {2, "epilogue"}
    assert users["lbi_canvas.region_2.wpe.weight"] == {2}
    assert all(p.requires_grad for n, p in per_region.named_parameters() if n in users)
    # a frozen parameter is not the runtime's concern
    per_region.lbi_canvas.region_1.wpe.weight.requires_grad_(False)
    try:
        assert "lbi_canvas.region_1.wpe.weight" not in per_region.prologue_param_users()
    finally:
        per_region.lbi_canvas.region_1.wpe.weight.requires_grad_(True)


def test_exported_gpt_reads_copies_through_get_attr():
    """torch.export leaves parameters as get_attr nodes (a tied head reads ``head.weight``)."""
    model, (idx,) = build_export(n_layer=4, n_embd=16, n_head=2, seq=8)
    with pytest.warns(lbi_fx.CaptureWarning):
        lbi = lbi_fx.transform(model.double(), REGIONS, rank=4, example_inputs=(idx,),
                               canvas_weights="per_region")
    gradient_parity(lbi, (idx,)).assert_close(**FP64)
    users = lbi.prologue_param_users()
    assert users["lbi_canvas.region_1.wte_weight"] == {1, "epilogue"}
    assert users["wte.weight"] == {0}
    assert "lbi_canvas_region_1_wte_weight" in lbi.programs["epilogue"].code


def test_bounded_chain_every_region_reads_its_own_embedding():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BoundedChain().double()
    lbi = lbi_fx.transform(model, chain_regions(), rank=3, example_inputs=(tokens(),),
                           canvas_weights="per_region")
    gradient_parity(lbi, (tokens(),)).assert_close(**FP64)
    users = lbi.prologue_param_users()
    assert {n: u for n, u in users.items() if "emb" in n} == {
        "emb.weight": {0}, **{f"lbi_canvas.region_{k}.emb.weight": {k} for k in (1, 2, 3)}}
