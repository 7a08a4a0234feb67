"""Trainable stand-ins: exact start, on-grid repack, fixed sparsity pattern, dispatch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memfit.algos.prune import nm_mask
from memfit.algos.rtn import rtn
from memfit.distill.trainable import (FakeQuantLinear, MaskedSparseLinear, make_trainable_,
                                      repack_)
from memfit.formats.grid import IntFormat
from memfit.formats.quant_linear import QuantLinear
from memfit.formats.lowrank import LowRankLinear
from memfit.formats.sparse import SparseLinear

FORMATS = [IntFormat(bits=3, group_size=64), IntFormat(bits=4, group_size=32, zero_point="float"),
           IntFormat(bits=8, group_size=None, symmetric=True),
           IntFormat(bits=4, group_size=48, scale_dtype="bfloat16")]  # ragged last group


def _quant_linear(fmt, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(160, 24)
    r = rtn(lin.weight.detach(), fmt)
    return QuantLinear.from_linear(lin, r.codes, r.scale, None if fmt.symmetric else r.zero, fmt)


def _train(module, steps=20, lr=1e-2):
    x = torch.randn(64, module.in_features)
    target = torch.randn(64, module.out_features)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = (module(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_fake_quant_starts_exact_and_repacks_on_grid(fmt):
    q = _quant_linear(fmt)
    fq = FakeQuantLinear(q)
    x = torch.randn(5, 160)
    with torch.no_grad():
        torch.testing.assert_close(fq(x), q(x), rtol=1e-5, atol=1e-5)
        same = fq.repack()
    for name in ("qdata", "scale", "zero"):
        if hasattr(q, name):
            assert torch.equal(getattr(same, name), getattr(q, name)), name
    x = _train(fq)
    assert fq.log_scale.grad is not None and fq.weight.grad is not None
    new = fq.repack()
    assert new.fmt == q.fmt and new.nbytes() == q.nbytes()
    codes = new.packed().codes()
    assert int(codes.max()) <= fmt.qmax
    assert not torch.equal(new.qdata, q.qdata) or not torch.equal(new.scale, q.scale)
    with torch.no_grad():
        err = (new(x) - fq(x)).abs()
    print(f"{fmt}: repacked vs trained forward max {err.max():.3g} mean {err.mean():.3g}")
    assert err.max() < 1e-5


def test_integer_zeros_stay_fixed():
    fq = FakeQuantLinear(_quant_linear(IntFormat(bits=3, group_size=64)))
    assert not isinstance(fq.zero, nn.Parameter)
    fq_float = FakeQuantLinear(_quant_linear(IntFormat(bits=3, group_size=64, zero_point="float")))
    assert isinstance(fq_float.zero, nn.Parameter)


@pytest.mark.parametrize("layout", ["2:4", "bitmask"])
def test_sparse_pattern_holds_after_training(layout):
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight.abs(), 2, 4))
    sparse = SparseLinear.from_linear(lin, layout)
    before = sparse.dequantize() != 0
    ms = MaskedSparseLinear(sparse)
    x = _train(ms)
    new = ms.repack()
    assert new.layout == layout
    dense = new.dequantize()
    assert not torch.equal(dense, sparse.dequantize())
    assert ((dense != 0) & ~before).sum() == 0  # nothing outside the original pattern
    assert (dense.view(16, 16, 4) != 0).sum(-1).max() <= 2
    with torch.no_grad():
        torch.testing.assert_close(new(x), ms(x))


def test_dispatch_swaps_and_repacks_every_kind():
    q = _quant_linear(IntFormat(bits=4, group_size=32))
    sparse = SparseLinear.from_linear(nn.Linear(32, 8), "bitmask")
    low = LowRankLinear(32, 16, 4)
    model = nn.Sequential(q, sparse, low, nn.Linear(16, 4), nn.LayerNorm(4))
    names = make_trainable_(model, skip=("3",))
    assert names == ["0", "1", "2"]
    assert isinstance(model[0], FakeQuantLinear) and isinstance(model[1], MaskedSparseLinear)
    assert model[2].up.weight.requires_grad and model[2].down.weight.requires_grad
    assert not model[3].weight.requires_grad and not model[4].weight.requires_grad
    assert repack_(model) == 2
    assert type(model[0]) is QuantLinear and type(model[1]) is SparseLinear
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_w8a8_stand_in_rounds_activations_and_repacks(static):
    """A W8A8 layer heals (it was a traceback in distill): the stand-in starts at the int8
    product's output, trains its weight grid, and repacks to a W8A8Linear of the same
    activation mode whose output is the trained forward's."""
    from memfit.distill.trainable import FakeQuantW8A8Linear
    from memfit.formats.intq import PackedIntWeight
    from memfit.formats.w8a8 import W8_FORMAT, W8A8Linear

    torch.manual_seed(0)
    lin = nn.Linear(160, 24)
    r = rtn(lin.weight.detach(), W8_FORMAT)
    packed = PackedIntWeight.from_codes(r.codes, r.scale, None, W8_FORMAT)
    w = W8A8Linear.from_packed(packed, lin.bias.detach(), static=static)
    if static:
        w.set_input_scale(3.0)
    model = nn.Sequential(w)
    assert make_trainable_(model) == ["0"]
    fq = model[0]
    assert isinstance(fq, FakeQuantW8A8Linear)
    x = torch.randn(5, 160)
    with torch.no_grad():
        torch.testing.assert_close(fq(x), w(x), rtol=1e-5, atol=1e-5)
        # the activation rounding is in it: a plain float product differs
        assert (F.linear(x, w.dequantize(), w.bias) - w(x)).abs().max() > 1e-4
    x = _train(fq)
    assert fq.weight.grad is not None and fq.log_scale.grad is not None
    assert repack_(model) == 1
    new = model[0]
    assert type(new) is W8A8Linear and new.static == static and new.nbytes() == w.nbytes()
    assert not torch.equal(new.qdata, w.qdata)
    if static:
        assert torch.equal(new.input_scale, w.input_scale)
    with torch.no_grad():
        torch.testing.assert_close(new(x), fq(x), rtol=1e-4, atol=1e-4)
