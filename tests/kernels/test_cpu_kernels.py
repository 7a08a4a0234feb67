"""The fast CPU paths against the reference: tiled dequantize+GEMM (float32, tight) and torch's
bfloat16 weight-only kernels (within bfloat16 rounding); exact integer checks of their layouts."""

import pytest
import torch

from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.intq import PackedIntWeight
from memfit.kernels import cpu
from memfit.kernels.reference import linear_reference


def packed_weight(fmt, out=1536, k=576, seed=0, view=True):
    w = torch.randn(out, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    scale, zero = grid.round_params(*grid.minmax_params(w, fmt), fmt)
    codes = grid.quantize(w, scale, zero, fmt)
    p = PackedIntWeight.from_codes(codes, scale, None if fmt.symmetric else zero, fmt)
    return p.kernel_weight() if view else p


def errors(name, y, ref):
    err = (y.float() - ref.float()).abs()
    print(f"{name}: max abs err {err.max().item():.3g}, mean {err.mean().item():.3g}, "
          f"max |ref| {ref.abs().max().item():.3g}")
    return err


TILED = [
    IntFormat(bits=2, group_size=64),
    IntFormat(bits=3, group_size=128),  # ragged: 576 = 4 * 128 + 64
    IntFormat(bits=4, group_size=32, zero_point="float", scale_dtype="bfloat16"),
    IntFormat(bits=8, group_size=None, scale_dtype="float32"),
]


@pytest.mark.parametrize("fmt", TILED, ids=str)
def test_tiled_matches_reference_float32(fmt, monkeypatch):
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 576 * 100)  # 16 tiles, the last one short
    w = packed_weight(fmt)
    bias = torch.randn(1536)
    for m in (1, 16, 33):
        x = torch.randn(m, 576)
        ref = linear_reference(x, w, bias)
        err = errors(f"tiled {fmt} M={m}", cpu.tiled_linear(x, w, bias), ref)
        assert err.max() <= 2e-6 * ref.abs().max() and err.mean() <= 1e-7 * ref.abs().max()


KERNEL = [
    IntFormat(bits=4, group_size=64),  # fp16 scales: head + tail kernel calls
    IntFormat(bits=4, group_size=128, symmetric=True),
    IntFormat(bits=4, group_size=32, scale_dtype="bfloat16"),  # one call + group correction
    IntFormat(bits=4, group_size=256, symmetric=True, scale_dtype="bfloat16"),  # one call
    IntFormat(bits=8, group_size=None, symmetric=True),
    IntFormat(bits=3, group_size=64),  # 3- and 2-bit codes through the int4 kernel
    IntFormat(bits=2, group_size=128, symmetric=True, scale_dtype="bfloat16"),
]


def rounded_terms(x: torch.Tensor, cache) -> torch.Tensor:
    """|each bfloat16 result the kernel path adds up|, summed per output: the int8 call's
    (times its float32 scales), or the int4 call's plus its tail call's. Split calls cancel:
    with fp16 scales the head and tail can each be much larger than their sum."""
    if cache.kind == "int8":
        ones = torch.ones(cache.params.shape[0], dtype=torch.bfloat16)
        raw = torch.ops.aten._weight_int8pack_mm(x, cache.qweight, ones).float()
        return raw.abs() * cache.params.abs()
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    terms = mm(x, cache.qweight, cache.group_size, cache.params).float().abs()
    if cache.tail is not None:
        terms += mm(x, cache.qweight, cache.group_size, cache.tail).float().abs()
    return terms


@pytest.mark.parametrize("fmt", KERNEL, ids=str)
def test_bf16_kernels_match_reference_within_bf16_rounding(fmt):
    w = packed_weight(fmt, k=576 if 576 % (fmt.group_size or 1) == 0 else 512)
    cache = cpu.prepare_cpu(w)
    assert cache is not None, cpu.kernel_ineligibility(w)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(1536, generator=gen).bfloat16()
    for trial in range(8):
        for m in (1, 16, cpu.KERNEL_MAX_M):
            x = torch.randn(m, w.shape[1], generator=gen).bfloat16()
            ref = linear_reference(x.float(), w, bias)  # float32 result before the last rounding
            y = cpu.cpu_linear(x, w, bias, cache)
            assert y.dtype == torch.bfloat16
            err = errors(f"kernel {fmt} M={m}", y, ref) if trial == 0 else (y.float() - ref).abs()
            # Each bfloat16 result is off by at most half an ulp (2**-8 relative): the kernels'
            # partial sums and the final output. Twice that is allowed (worst seen over 150
            # seeds x 3 sizes: 0.51 of this bound; the bound on |x @ W.T| + |bias| used before
            # failed ~1 run in 100 where fp16 scales' head and tail calls cancel).
            bound = 2**-7 * (rounded_terms(x, cache) + ref.abs())
            assert (err <= bound).all(), float((err / bound).max())
            size = linear_reference(x.float(), w).abs() + bias.float().abs()
            assert err.mean() <= 2**-9 * size.mean()


def test_int4_layout_holds_the_codes_exactly():
    # unit scale and t = 0 turn the kernel into w = q - 8; an identity input reads it back
    fmt = IntFormat(bits=4, group_size=32)
    w = packed_weight(fmt, out=48, k=64)
    cache = cpu.prepare_cpu(w)
    unit = torch.zeros(2, 48, 2, dtype=torch.bfloat16)
    unit[..., 0] = 1
    eye = torch.eye(64, dtype=torch.bfloat16)
    back = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, cache.qweight, 32, unit)  # (in, out)
    assert torch.equal(back.T.float() + 8, w.codes().float())


def test_int4_split_is_exact():
    w = packed_weight(IntFormat(bits=4, group_size=64))
    cache = cpu.prepare_cpu(w)
    s = cache.params[..., 0].float() + cache.tail[..., 0].float()  # (G, out)
    t = cache.params[..., 1].float() + cache.tail[..., 1].float()
    assert torch.equal(s.T, w.scale.float())
    assert torch.equal(t.T, (8 - w.zeros()) * w.scale.float())


def test_int8_layout_is_codes_minus_128():
    w = packed_weight(IntFormat(bits=8, group_size=None, symmetric=True), out=16, k=32)
    cache = cpu.prepare_cpu(w)
    assert torch.equal(cache.qweight.to(torch.int16), w.codes().to(torch.int16) - 128)


@pytest.mark.parametrize("fmt, out, k, reason", [
    (IntFormat(bits=3, group_size=128), 32, 576, "dividing in_features=576"),
    (IntFormat(bits=4, group_size=128), 32, 576, "dividing in_features=576"),
    (IntFormat(bits=4, group_size=64), 40, 128, "divisible by 16"),
    (IntFormat(bits=4, group_size=64, zero_point="float"), 32, 128, "float zeros"),
    (IntFormat(bits=8, group_size=None), 32, 128, "symmetric per-channel"),
])
def test_ineligible_formats_take_the_tiled_path(fmt, out, k, reason):
    w = packed_weight(fmt, out=out, k=k)
    assert reason in cpu.kernel_ineligibility(w)
    assert cpu.prepare_cpu(w) is None


def test_float32_scales_that_do_not_split_take_the_tiled_path():
    w = packed_weight(IntFormat(bits=4, group_size=64, scale_dtype="float32"), out=32, k=128)
    assert cpu.kernel_ineligibility(w) is None and cpu.prepare_cpu(w) is None


def test_int4_layout_converted_by_row_chunks_equals_one_conversion(monkeypatch):
    """_prepare_int4 converts PREPARE_ROWS rows at a time (bounded transient); the layout must be
    exactly the one a single whole-matrix conversion gives, a ragged last chunk included."""
    w = packed_weight(IntFormat(bits=4, group_size=64), k=576)  # 1536 rows
    monkeypatch.setattr(cpu, "PREPARE_ROWS", 448)  # 3 chunks of 448 + one of 192
    chunked = cpu._int4pack_rows(w)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.codes().to(torch.int32), 2)
    assert torch.equal(chunked, whole)
