"""memfit.kernels.int8: torch._int_mm gives the exact int32 sums of the float64 reference for
every shape the default model uses and odd ones, the fallback path gives the same numbers, and the
W8A8 linear matches the float computation of its own quantized operands."""

import pytest
import torch

from memfit.kernels import int8


def _codes(*shape, seed=0):
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m", [1, 3, 16, 64, 257])
@pytest.mark.parametrize("k,n", [(576, 192), (1536, 576), (577, 100)])
def test_int_mm_equals_reference_exactly(m, k, n):
    a, b = _codes(m, k, seed=m), _codes(n, k, seed=n)
    assert torch.equal(int8.int8_mm(a, b), int8.int8_mm_reference(a, b))


def test_extreme_codes_do_not_overflow():
    a = torch.full((4, 1536), 127, dtype=torch.int8)
    b = torch.full((8, 1536), -127, dtype=torch.int8)
    out = int8.int8_mm(a, b)
    assert out.dtype == torch.int32 and int(out[0, 0]) == -127 * 127 * 1536


def test_refused_shapes_fall_back_to_the_reference(monkeypatch):
    def refuse(*_a, **_k):
        raise RuntimeError("shape refused")
    x, w = torch.randn(5, 64), _codes(32, 64)
    s = torch.rand(32) + 0.01
    fast = int8.w8a8_linear(x, w, s)
    monkeypatch.setattr(torch, "_int_mm", refuse)
    assert torch.equal(int8.w8a8_linear(x, w, s), fast)


def test_w8a8_linear_is_its_operands_product():
    """y = (xq * sx) @ (wq * sw).T + b, computed in float64 from the same codes: equal to 1e-6
    relative (only the final float32 scaling rounds)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 7, 96, generator=g), _codes(48, 96)
    s, b = torch.rand(48, generator=g) + 0.01, torch.randn(48, generator=g)
    y = int8.w8a8_linear(x, w, s, b)
    xq, sx = int8.quantize_per_token(x.reshape(-1, 96))
    ref = (xq.double() * sx.double()) @ (w.double() * s.double()[:, None]).t() + b.double()
    err = (y.reshape(-1, 48).double() - ref).abs().max() / ref.abs().max()
    print(f"max relative error vs float64 of the same codes: {err:.2e}")
    assert err < 1e-6
    static = torch.tensor([0.05])
    ys = int8.w8a8_linear(x, w, s, b, input_scale=static)
    xq = torch.round(x.reshape(-1, 96) / 0.05).clamp(-127, 127)
    ref = (xq.double() * 0.05) @ (w.double() * s.double()[:, None]).t() + b.double()
    assert (ys.reshape(-1, 48).double() - ref).abs().max() / ref.abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_16_bit_activations_quantize_as_their_float32_values(dtype):
    """The codes and scales of 16-bit activations (scaled in float32 inside the product, the
    row's magnitude from its extremes) equal those of the same values converted to float32
    first, per token and per tensor with a 0-d or (1,) static scale; the output has x's dtype."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(9, 200, generator=g) * 3).to(dtype)
    x[3, 7] = -40.0  # a row whose extreme is negative
    q, s = int8.quantize_per_token(x)
    q32, s32 = int8.quantize_per_token(x.float())
    assert torch.equal(q, q32) and torch.equal(s, s32) and s.dtype == torch.float32
    assert int(q[3, 7]) == -127
    for scale in (torch.tensor(0.03), torch.tensor([0.03])):
        assert torch.equal(int8.quantize_per_tensor(x, scale),
                           int8.quantize_per_tensor(x.float(), scale))
        want = torch.round(x.double() / scale.double()).clamp(-127, 127).to(torch.int8)
        got = int8.quantize_per_tensor(x, scale)
        assert (got.int() - want.int()).abs().max() <= 1  # float32 reciprocal vs float64 division
    y = int8.w8a8_linear(x, _codes(16, 200), torch.rand(16, generator=g) + 0.01)
    assert y.dtype == dtype and y.shape == (9, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_buffers_give_the_same_outputs(dtype):
    """Without autograd on the CPU the codes, the int32 sums and (16-bit x) the float32 product
    live in the thread's kept buffers: two layers of different shapes called in turn give what
    the fresh-tensor path gives, and a returned output is never a kept buffer."""
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(2, 5, 96, generator=g).to(dtype), _codes(48, 96, seed=4),
              torch.rand(48, generator=g) + 0.01, torch.tensor([0.04])),
             (torch.randn(7, 64, generator=g).to(dtype), _codes(80, 64, seed=5),
              torch.rand(80, generator=g) + 0.01, None)]
    want = [int8.w8a8_linear(x, w, s, None, st) for x, w, s, st in cases]  # grad on: fresh
    with torch.inference_mode():
        outs = [int8.w8a8_linear(x, w, s, None, st) for _ in range(2) for x, w, s, st in cases]
    for got, w in zip(outs, want + want):
        assert torch.equal(got, w)
    assert outs[0].data_ptr() != outs[2].data_ptr()  # each call's output its own
