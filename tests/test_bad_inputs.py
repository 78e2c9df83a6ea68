"""Issue 7, the catalogue: every bad model, spec or argument is refused with an
``LBIError`` whose message names the culprit (region, node, module path or edge) and says
what to do - or, where the model is fine after all, the result is exact.

Tests marked ``xfail(strict=True)`` with ``BUG:``/``MISSING:`` describe what a demanding
user expects and the library does not do yet.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lbi_fx.passes.capture import capture
from torch import nn

import lbi_fx
from lbi_fx.testing import gradient_parity

ROOT = Path(__file__).resolve().parents[1]
D, B = 6, 3
EXACT = 1e-12


def x64(batch: int = B) -> torch.Tensor:
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


class Blk(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, skip=None):
        y = x + torch.tanh(self.lin(x))
        return y if skip is None else y + skip


class Net(nn.Module):
    """``inp`` (canvas; the raw input if ``raw``) -> ``blocks.0..n-1`` -> ``head``;
    ``wire(self, canvas)`` overrides the plain chain; ``kinds`` swaps in other blocks."""

    def __init__(self, *kinds, n: int = 3, wire=None, raw: bool = False):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.inp = None if raw else nn.Linear(D, D)
            self.blocks = nn.ModuleList(k() for k in kinds or (Blk,) * n)
            self.head = nn.Linear(D, 2)
        self.wire = wire

    def forward(self, x):
        h = x if self.inp is None else self.inp(x)
        if self.wire is not None:
            return self.head(self.wire(self, h))
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def net(*kinds, **kw) -> nn.Module:
    return Net(*kinds, **kw).double()


def transform(model, spec=None, rank=3, **kw):
    """``lbi_fx.transform`` with every region a block by default, warnings off, and the
    interface modules initialised from a fixed seed (results do not depend on test order)."""
    kw.setdefault("example_inputs", (x64(),))
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return lbi_fx.transform(model, lbi_fx.every(1, "blocks") if spec is None else spec,
                                rank, **kw)


def assert_exact(lbi, inputs=None) -> None:
    inputs = inputs or (x64(),)
    report = gradient_parity(lbi, inputs)
    assert report.ok and report.rel_l2 <= EXACT, report
    cuts = [b.min_cut_scalars for b in lbi_fx.verify(lbi, example_inputs=inputs).boundaries]
    assert len(cuts) == lbi.num_regions - 1 and all(c <= r for c, r in zip(cuts, lbi.ranks))


# ------------------------------------------------------------------ capture and inputs


class DataDependent(Blk):
    def forward(self, x, skip=None):
        if x.sum() > 0:  # neither symbolic tracing nor torch.export can capture this
            x = -x
        return super().forward(x)


def test_untraceable_model_without_example_inputs_is_trace_error():
    with pytest.raises(lbi_fx.TraceError) as info:
        capture(net(Blk, DataDependent, Blk))
    msg = str(info.value)
    assert "test_bad_inputs.py" in msg and "in forward" in msg  # the failing line
    assert "example_inputs=" in msg and "leaf_modules" in msg   # what to do


def test_model_neither_traced_nor_exported_is_trace_error():
    with pytest.raises(lbi_fx.TraceError, match=r"torch.export failed on Net.*leaf_modules"):
        transform(net(Blk, DataDependent, Blk))


def test_model_neither_traced_nor_exported_names_the_line():
    with pytest.raises(lbi_fx.TraceError, match=r"test_bad_inputs.py:\d+ in forward"):
        transform(net(Blk, DataDependent, Blk))


def test_missing_example_inputs_is_input_error():
    with pytest.raises(lbi_fx.InputError, match=r"example_inputs is required.*example_inputs=\("):
        transform(net(), example_inputs=None)
    with pytest.raises(lbi_fx.InputError, match="holds no tensor"):
        transform(net(), example_inputs=())


def test_wrongly_shaped_example_inputs_name_the_node():
    with pytest.raises(lbi_fx.InputError) as info:
        transform(net(), example_inputs=(torch.randn(B, D + 1, dtype=torch.float64),))
    msg = str(info.value)
    assert "node 'inp'" in msg and "module 'inp'" in msg and "3x7 and 6x6" in msg
    with pytest.raises(lbi_fx.InputError, match=r"takes 1 inputs \(x\), example_inputs has 2"):
        transform(net(), example_inputs=(x64(), x64()))


# ------------------------------------------------------------------ region specs

SPEC_ERRORS = {
    "unknown-path": ([["blocks.0"], ["blocks.7"]], r"region 1: unknown module path 'blocks.7'"
                     r"; did you mean .*'blocks.0'"),
    "typo": ([["block.0"], ["blocks.1"]], r"unknown module path 'block.0'; did you mean"),
    "overlap": ([["blocks.0", "blocks.1"], ["blocks.1"]],
                r"regions overlap: 'blocks.1' \(region 1\) and 'blocks.1' \(region 0\).*one region"),
    "overlap-parent": ([["blocks"], ["blocks.2"]], r"overlap: 'blocks.2' \(region 1\) and 'blocks'"),
    "empty-region": ([["blocks.0"], [], ["blocks.1"]], r"region 1 is empty: give it at least"),
    "one-region": ([["blocks.0", "blocks.1", "blocks.2"]], r"1 region\(s\); LBI needs at least 2"),
    "no-region": ([], r"0 region\(s\); LBI needs at least 2"),
    "every-too-big": (lbi_fx.every(3, "blocks"), r"1 region\(s\).*use smaller groups"),
    "out-of-order": ([["blocks.1"], ["blocks.0"], ["blocks.2"]],
                     r"out of topological order: edge add \(blocks.0, region 1\) -> blocks_1_lin "
                     r"\(blocks.1.lin, region 0\).*list the regions in the order"),
    "every-zero": (lbi_fx.every(0, "blocks"), r"every\(n=0, 'blocks'\): n must be an int >= 1"),
    "every-negative": (lbi_fx.every(-1, "blocks"), r"every\(n=-1.*int >= 1"),
    "every-float": (lbi_fx.every(1.5, "blocks"), r"every\(n=1.5.*int >= 1"),
    "every-str": (lbi_fx.every("2", "blocks"), r"every\(n='2'.*int >= 1"),
    "every-unknown": (lbi_fx.every(1, "blokcs"), r"unknown module path 'blokcs'; did you mean 'blocks'"),
    "every-leaf": (lbi_fx.every(1, "head"), r"module 'head' has no children.*ModuleList"),
}


@pytest.mark.parametrize("name", sorted(SPEC_ERRORS))
def test_region_spec_error_names_the_culprit(name):
    spec, match = SPEC_ERRORS[name]
    with pytest.raises(lbi_fx.RegionSpecError, match=match):
        transform(net(), spec)


def test_every_with_a_bool_is_refused():
    with pytest.raises(lbi_fx.RegionSpecError, match=r"every\(n=True"):
        transform(net(), lbi_fx.every(True, "blocks"))


def _skip_over_unlisted(self, h):
    h0 = self.blocks[0](h)
    return self.blocks[2](self.blocks[1](h0), h0)


def test_unlisted_module_inside_last_region_is_named():
    with pytest.raises(lbi_fx.RegionSpecError, match=r"blocks.1.*(not listed|unlisted|add it)"):
        transform(net(wire=_skip_over_unlisted), [["inp"], ["blocks.0", "blocks.2"]])


# ------------------------------------------------------------------ ranks


@pytest.mark.parametrize("rank, match", [
    (0, "rank for interface 1 must be an int >= 1, got 0"),
    (-4, "got -4"),
    (2.5, "got 2.5"),
    ("16", "got '16'"),
    (True, "got True"),
    (None, "rank= is required"),
    ([2, 0], "rank for interface 2 must be an int >= 1, got 0"),
    ([2], "rank has 1 entries but the spec has 2 boundaries"),
    ([2, 2, 2], "rank has 3 entries but the spec has 2 boundaries"),
], ids=["zero", "negative", "float", "str", "bool", "none", "list-zero", "short", "long"])
def test_bad_rank_is_input_error(rank, match):
    with pytest.raises(lbi_fx.InputError, match=match):
        transform(net(), rank=rank)


def test_rank_not_below_dense_separator_warns_per_boundary():
    with pytest.warns(UserWarning) as record:
        lbi = lbi_fx.transform(net(), lbi_fx.every(1, "blocks"), [3, D],
                               example_inputs=(x64(),))
    msgs = [str(w.message) for w in record if "compresses nothing" in str(w.message)]
    assert msgs == [f"lbi-fx: interface 2 carries {D} scalars per sample (rank {D} x 1 "
                    f"segment(s)), not below the dense separator ({D} scalars per sample): the "
                    "interface compresses nothing"]
    assert_exact(lbi)


# ------------------------------------------------------------------ dtypes


class IntScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.tensor(3))

    def forward(self, x):
        return x * self.k + 1


class IntModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(IntScale() for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("inputs", [torch.randint(0, 5, (B, D)), x64()], ids=["int-in", "float-in"])
def test_model_without_float_parameters_is_refused(inputs):
    with pytest.raises(lbi_fx.RewriteError, match=r"no floating-point parameters.*\.float\(\)"):
        transform(IntModel(), example_inputs=(inputs,))


def _argmax_wire(m, h):
    h0 = m.blocks[0](h)
    return m.blocks[2](m.blocks[1](h0.argmax(-1)) + h0)


def test_integer_tensor_crossing_a_boundary_is_refused():
    model = net(Blk, lambda: nn.Embedding(D, D), Blk, wire=_argmax_wire)
    with pytest.raises(lbi_fx.RewriteError,
                       match=r"argmax .* crosses into region 1 as a torch.int64 tensor.*compute it"):
        transform(model)


# ------------------------------------------------------------------ batch mixing


class BatchSum(Blk):
    def forward(self, x, skip=None):
        return super().forward(x - x.mean(0, keepdim=True))


def test_batch_reduction_in_a_region_is_refused():
    with pytest.raises(lbi_fx.BatchMixingError,
                       match=r"\(blocks.1, region 1\) reduces over the batch axis.*non-batch"):
        transform(net(Blk, BatchSum, Blk))


MIXERS = {  # op over the batch axis, and a rank at which the interface still fits
    "flip": (lambda x: x.flip(0), 5),
    "roll": (lambda x: x.roll(1, 0), 5),
    "cumsum": (lambda x: x.cumsum(0), 5),
    "softmax": (lambda x: x.softmax(0), 3),
    "matmul": (lambda x: x @ x.T @ x / 4, 3),
}


@pytest.mark.parametrize("op", sorted(MIXERS))
def test_batch_mixing_op_in_a_region_is_refused(op):
    mix, rank = MIXERS[op]

    class Mixer(Blk):
        def forward(self, x, skip=None):
            return super().forward(x) + mix(x)

    with pytest.raises(lbi_fx.BatchMixingError, match=r"region 1\b.*(batch axis|mixes samples)"):
        transform(net(Blk, Mixer, Blk), rank=rank)


# ------------------------------------------------------------------ in-place and state


class AddInPlace(Blk):
    def forward(self, x, skip=None):
        x.add_(1.0)  # mutates the tensor that came from the previous region
        return super().forward(x)


def test_inplace_on_a_crossing_tensor_is_exact():
    def wire(m, h):  # region 2 reads blocks.0's output too, after region 1 mutated it
        h0 = m.blocks[0](h)
        return m.blocks[2](m.blocks[1](h0), h0)

    assert_exact(transform(net(Blk, AddInPlace, Blk, wire=wire)))


def test_inplace_on_canvas_in_later_region():
    class Mutator(Blk):
        def forward(self, x, skip=None):
            return super().forward(x) + skip.mul_(2.0)

    def wire(m, h):  # blocks.1 reads (and doubles) the canvas h; blocks.2 reads it after
        return m.blocks[2](m.blocks[1](m.blocks[0](h), h), h)

    with pytest.raises(lbi_fx.RewriteError, match=r"mul_ \(blocks.1, region 1\) modifies inp "
                                                  r"\(inp, prologue\) in place.*clone it inside"):
        transform(net(Blk, Mutator, Blk, wire=wire))


class DeadBranchInPlace(Blk):
    """Returns ``(y, side(y))`` after mutating ``y``, which ``side`` saved for backward:
    fine for PyTorch as long as the loss never differentiates ``side``."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(D, D)

    def forward(self, x, skip=None):
        y = super().forward(x)
        side = self.side(y)
        return y.mul_(0.5), side


class TanhInPlace(Blk):
    """``tanh(x).add_(c)``: autograd saves tanh's output only if x needs a gradient - the
    raw input does not, the decoded canvas of the rewritten model does."""

    def forward(self, x, skip=None):
        return super().forward(torch.tanh(x).add_(0.25))


def _dead_side_branch(m, h):
    h1, side = m.blocks[1](m.blocks[0](h))
    m.blocks[2](side)  # region 2 reads the side branch, and drops the result
    return m.blocks[2](h1)


@pytest.mark.parametrize("model, region", [
    (lambda: net(Blk, DeadBranchInPlace, Blk, wire=_dead_side_branch), "region 1"),
    (lambda: net(TanhInPlace, Blk, Blk, raw=True), "region 0"),
], ids=["dead-branch", "input-only-branch"])
def test_region_that_cannot_be_differentiated_is_named(model, region):
    model = model()
    params = [p for p in model.parameters()]
    torch.autograd.grad(model(x64()).sum(), params, allow_unused=True)  # fine for PyTorch
    with pytest.raises(lbi_fx.RewriteError, match=rf"{region}.*plain PyTorch .*fails on this "
                                                  "region too.*inplace"):
        transform(model)


@pytest.mark.xfail(strict=True, raises=lbi_fx.RewriteError, reason=(
    "MISSING: the rewrite feeds every region output into its interface and makes region "
    "inputs depend on m_k, so an in-place write that PyTorch tolerates in the original (a "
    "branch the loss ignores, a tensor of the inputs only) breaks the rewritten region"))
@pytest.mark.parametrize("model", [
    lambda: net(Blk, DeadBranchInPlace, Blk, wire=_dead_side_branch),
    lambda: net(TanhInPlace, Blk, Blk, raw=True),
], ids=["dead-branch", "input-only-branch"])
def test_in_place_writes_the_original_tolerates_transform_exactly(model):
    assert_exact(transform(model()))


def test_batchnorm_in_train_mode_is_refused():
    class BN(Blk):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(D)

        def forward(self, x, skip=None):
            return super().forward(self.bn(x))

    with pytest.raises(lbi_fx.BatchMixingError,
                       match=r"blocks_1_bn \(blocks.1.bn, region 1\) is a BatchNorm in training "
                             r"mode.*\.eval\(\)"):
        transform(net(Blk, BN, Blk))


class Counter(Blk):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, x, skip=None):
        self.count += 1
        return super().forward(x)


def test_buffer_counter_in_forward_is_refused_by_name():
    """FX records no ``self.count += 1``: the rewritten model would drop the update."""
    with pytest.raises(lbi_fx.TraceError, match=r"updates buffer blocks.1.count.*Move the state"):
        transform(net(Blk, Counter, Blk))


class BatchStat(Blk):
    def __init__(self):
        super().__init__()
        self.register_buffer("stat", torch.zeros((), dtype=torch.float64))

    def forward(self, x, skip=None):
        self.stat.copy_(x.mean())
        return super().forward(x) + self.stat


def test_buffer_written_from_batch_statistic_is_refused():
    with pytest.raises(lbi_fx.BatchMixingError, match=r"\(blocks.1, region 1\).*batch axis"):
        transform(net(Blk, BatchStat, Blk))


class Memory(Blk):
    """Writes per-sample data into a buffer that blocks.2 reads: a dynamic channel that
    bypasses the interface and that the graph shows only as a static get_attr."""

    def __init__(self, detach: bool):
        super().__init__()
        self.detach = detach
        self.register_buffer("mem", torch.zeros(B, D, dtype=torch.float64))

    def forward(self, x, skip=None):
        y = super().forward(x)
        self.mem.copy_(y.detach() if self.detach else y)
        return y


@pytest.mark.parametrize("detach", [False, True], ids=["attached", "detached"])
def test_buffer_carrying_data_between_regions_is_refused(detach):
    def wire(m, h):
        h1 = m.blocks[1](m.blocks[0](h))
        return m.blocks[2](h1, m.blocks[1].mem)

    model = Net(Blk, lambda: Memory(detach), Blk, wire=wire).double()
    with pytest.raises(lbi_fx.LBIError, match=r"blocks.1.mem"):
        transform(model)


# ------------------------------------------------------------------ dead code and the loss


def _dead_middle(m, h):  # region 1's output reaches nothing
    h0 = m.blocks[0](h)
    m.blocks[1](h0)
    return m.blocks[2](h0)


def _dead_inside(m, h):  # region 1 computes something it throws away
    h1 = m.blocks[1](m.blocks[0](h))
    torch.tanh(3 * h1)
    return m.blocks[2](h1)


def _loss_skips_last(m, h):  # the output comes from region 1; region 2 is dead
    h1 = m.blocks[1](m.blocks[0](h))
    m.blocks[2](h1)
    return h1


@pytest.mark.parametrize("wire", [_dead_middle, _dead_inside, _loss_skips_last],
                         ids=["dead-region", "dead-code", "loss-skips-last-region"])
def test_dead_regions_and_dead_code_are_exact(wire):
    assert_exact(transform(net(wire=wire), rank=3))


def test_output_the_loss_never_reads_gives_none_as_autograd_does():
    """The epilogue computes on the last region's output and drops it; the loss reads
    region 0's output (carried through region 1's interface). Plain autograd gives region
    1's own parameters no gradient (None); the scan backward used to give them zeros
    (found by the long fuzz: a "gap" spec leaving the last block to the epilogue)."""
    def wire(m, h):
        h0 = m.blocks[0](h)
        m.blocks[2](m.blocks[1](h0))
        return h0

    report = gradient_parity(transform(net(wire=wire), [["blocks.0"], ["blocks.1"]]), (x64(),))
    assert not report.missing and not report.extra, report
    assert report.ok and report.rel_l2 <= EXACT, report


def test_last_region_ignoring_the_interface_gives_the_same_grads():
    def wire(m, h):
        m.blocks[1](m.blocks[0](h))
        return m.blocks[2](h)  # reads only the canvas

    report = gradient_parity(transform(net(wire=wire), rank=3), (x64(),))
    assert report.ok and report.rel_l2 <= EXACT and report.loss_error == 0, report
    assert not report.missing and not report.extra, report


def test_module_shared_by_two_regions_is_exact():
    model = net()
    model.blocks[2].lin = model.blocks[0].lin
    assert_exact(transform(model))


def test_weight_tied_across_regions_is_exact():
    model = net()
    model.blocks[2].lin.weight = model.blocks[0].lin.weight
    assert_exact(transform(model))


# ------------------------------------------------------------------ non-finite Jacobians


class SqrtZero(Blk):
    def forward(self, x, skip=None):  # forward adds sqrt(0) = 0; its derivative is inf * 0
        return super().forward(x) + torch.sqrt(x - x)


def test_nan_interface_jacobian_with_check_finite_names_the_region():
    with pytest.raises(lbi_fx.NonFiniteError, match=r"J_1 of region 1 .*NaN or Inf"):
        lbi = transform(net(Blk, SqrtZero, Blk), check_finite=True)
        lbi(x64()).sum().backward()


def test_inf_weights_with_check_finite_name_the_region():
    model = net()
    with torch.no_grad():
        model.blocks[1].lin.weight.fill_(float("inf"))
    with pytest.raises(lbi_fx.NonFiniteError, match="region 1"):
        lbi = transform(model, check_finite=True)
        lbi(x64()).sum().backward()


# ------------------------------------------------------------------ command line


def raising_factory():
    raise RuntimeError("dataset not found")


def args_factory(width):
    return net(), (x64(),)


def none_factory():
    return None


def factory():
    return net(), (x64(),)


@pytest.fixture
def cli(monkeypatch, capsys):
    from lbi_fx.cli import main

    monkeypatch.chdir(ROOT)

    def run(target: str, *extra: str) -> str:
        code = main(["verify", target, "--regions", "blocks:1", *extra])
        out = capsys.readouterr()
        assert code == 2 and out.out == "", (code, out)
        err = out.err.strip()
        assert "\n" not in err and "Traceback" not in err and err.startswith("lbi-fx: error:")
        return err

    return run


@pytest.mark.parametrize("target, match", [
    ("tests.no_such_module:factory", "cannot import module 'tests.no_such_module'"),
    ("tests.test_bad_inputs:no_such_factory", "has no callable 'no_such_factory'"),
    ("tests.test_bad_inputs:D", "has no callable 'D'"),
    ("tests.test_bad_inputs", "must look like pkg.module:function"),
    ("tests.test_bad_inputs:none_factory", "must return (model, example_inputs), got NoneType"),
    ("tests.models:not_a_module_factory", "returned str as the model, not an nn.Module"),
], ids=["no-module", "no-function", "not-callable", "no-colon", "returns-none", "not-a-module"])
def test_cli_bad_factory_exits_2_on_one_line(cli, target, match):
    assert match in cli(target)


def test_cli_spec_error_exits_2_naming_the_path(cli):
    assert "RegionSpecError: region 1: unknown module path 'blocks.9'" in cli(
        "tests.test_bad_inputs:factory", "--regions", "blocks.0;blocks.9")


@pytest.mark.parametrize("target", ["raising_factory", "args_factory"])
def test_cli_factory_that_raises_exits_2(cli, target):
    assert target in cli(f"tests.test_bad_inputs:{target}")


@pytest.mark.parametrize("rank", ["0", "-3", "2,0"])
def test_cli_inspect_refuses_a_bad_rank_as_verify_does(rank, monkeypatch, capsys):
    """``inspect --rank 0`` used to become rank 16 without a word."""
    from lbi_fx.cli import main

    monkeypatch.chdir(ROOT)
    for command in ("verify", "inspect"):
        code = main([command, "tests.test_bad_inputs:factory", "--regions", "blocks:1",
                     "--rank", rank])
        out = capsys.readouterr()
        assert code == 2 and out.out == "", (command, code, out)
        assert "must be an int >= 1" in out.err and "\n" not in out.err.strip(), out.err
