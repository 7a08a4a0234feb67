"""QuantLinear: output equals dequantize + F.linear, state-dict and meta-device round trips,
dtype moves that must not touch the format, sizes."""

import pytest
import torch
import torch.nn.functional as F

from memfit.errors import UserError
from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.intq import format_nbytes
from memfit.formats.quant_linear import QuantLinear

FORMATS = [
    IntFormat(bits=2, group_size=32),
    IntFormat(bits=3, group_size=64),
    IntFormat(bits=4, group_size=64),
    IntFormat(bits=4, group_size=32, symmetric=True),
    IntFormat(bits=4, group_size=128),  # in=576: 4 groups of 128 + a ragged one of 64
    IntFormat(bits=4, group_size=64, zero_point="float"),
    IntFormat(bits=8, group_size=None, symmetric=True),
    IntFormat(bits=8, group_size=None),
]


def make_layer(fmt, out=1536, k=576, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, out, bias=bias)
    w = lin.weight.detach()
    scale, zero = grid.round_params(*grid.minmax_params(w, fmt), fmt)
    codes = grid.quantize(w, scale, zero, fmt)
    layer = QuantLinear.from_linear(lin, codes, scale, None if fmt.symmetric else zero, fmt)
    return layer, grid.dequantize(codes, scale, zero, fmt)


def report(name, y, ref):
    err = (y.float() - ref.float()).abs()
    print(f"{name}: max abs err {err.max().item():.3g}, mean {err.mean().item():.3g}, "
          f"max |ref| {ref.abs().max().item():.3g}")
    return err


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_output_equals_dequantize_then_linear(fmt):
    from memfit.kernels import cpu

    layer, dense = make_layer(fmt)
    kernel = cpu.prepare_cpu(layer.kernel_weight()) is not None
    for shape in [(1, 576), (2, 7, 576)]:  # 2-D and 3-D activations
        x = torch.randn(*shape)
        y = layer(x)
        ref = F.linear(x, dense, layer.bias)
        assert y.shape == (*shape[:-1], 1536) and y.dtype == torch.float32
        err = report(f"{fmt} {shape}", y, ref)
        if kernel and x.numel() // 576 <= cpu.DECODE_MAX_M:  # decode: bfloat16 activations
            assert 0 < err.max() <= 2**-7 * ref.abs().max()
        else:
            assert err.max() <= 1e-5 * ref.abs().max()
    xb = torch.randn(3, 5, 576).bfloat16()
    ref_b = F.linear(xb.float(), dense, layer.bias.float())
    err = report(f"{fmt} bf16", layer(xb), ref_b)
    assert layer(xb).dtype == torch.bfloat16
    assert (err <= 2**-7 * ref_b.abs() + 2**-9 * ref_b.abs().max()).all()


def test_state_dict_round_trip_and_meta_construction():
    fmt = IntFormat(bits=3, group_size=128)
    layer, _ = make_layer(fmt)
    sd = layer.state_dict()
    assert set(sd) == {"qdata", "scale", "zero", "bias"}
    assert sd["qdata"].shape == (1536, 216) and sd["zero"].shape == (1536, 2)
    with torch.device("meta"):
        shell = QuantLinear(576, 1536, fmt, bias=True, dtype=torch.float32)
    assert shell.qdata.is_meta
    shell.load_state_dict(sd, assign=True)
    x = torch.randn(4, 576)
    assert torch.equal(shell(x), layer(x))
    empty = QuantLinear(576, 1536, fmt, bias=True, dtype=torch.float32)
    empty.load_state_dict(sd)
    assert torch.equal(empty(x), layer(x))
    assert all(torch.equal(empty.state_dict()[k], v) for k, v in sd.items())


def test_symmetric_has_no_zero_buffer_and_load_rejects_wrong_shapes():
    fmt = IntFormat(bits=4, group_size=64, symmetric=True)
    layer, _ = make_layer(fmt, out=32, k=128, bias=False)
    assert set(layer.state_dict()) == {"qdata", "scale"}
    other = QuantLinear(256, 32, fmt, bias=False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(layer.state_dict())


def test_dtype_moves_keep_the_format_and_drop_the_cache():
    fmt = IntFormat(bits=4, group_size=64)
    layer, dense = make_layer(fmt, out=64, k=128)
    model = torch.nn.Sequential(layer)
    layer(torch.randn(1, 128).bfloat16())
    assert layer.cache_nbytes() > 0
    model.to(torch.bfloat16)
    assert layer.scale.dtype == torch.float16 and layer.zero.dtype == torch.uint8
    assert layer.bias.dtype == torch.bfloat16 and layer.cache_nbytes() == 0
    assert list(layer.state_dict()) == ["qdata", "scale", "zero", "bias"]
    assert torch.equal(layer.dequantize(), dense)
    model.half().float()
    assert layer.scale.dtype == torch.float16 and torch.equal(layer.dequantize(), dense)


def test_gradients_flow_to_activations():
    layer, dense = make_layer(IntFormat(bits=4, group_size=64), out=32, k=128)
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, dense.sum(0).expand(3, -1), atol=1e-5)


def test_sizes_and_repr():
    fmt = IntFormat(bits=4, group_size=64)
    layer, _ = make_layer(fmt)
    assert layer.nbytes() == format_nbytes(fmt, 1536, 576) == 477696
    assert layer.bits_per_weight() == pytest.approx(477696 * 8 / (1536 * 576))
    assert "bits=4, group=64" in repr(layer) and "bpw=4.319" in repr(layer)


def test_user_errors():
    layer, _ = make_layer(IntFormat(bits=4, group_size=64), out=32, k=128)
    with pytest.raises(RuntimeError):  # a caller's bug, not user input: torch's own shape error
        layer(torch.randn(2, 64))
    lin = torch.nn.Linear(64, 32)
    with pytest.raises(UserError, match="quantize this layer's own weight"):
        QuantLinear.from_linear(lin, torch.zeros(32, 128, dtype=torch.uint8),
                                torch.ones(32, 2), torch.zeros(32, 2), IntFormat(bits=4))
