"""The fast CPU paths against the reference: tiled dequantize+GEMM (float32, tight) and torch's
bfloat16 weight-only kernels (within bfloat16 rounding); exact integer checks of their layouts."""

import pytest
import torch

from memfit.formats import grid
from memfit.formats.grid import IntFormat
from memfit.formats.intq import PackedIntWeight
from memfit.kernels import cpu
from memfit.kernels.reference import linear_reference
from memfit.kernels.weights import dequantize


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
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 576 * 350)  # tiles of 320 rows, the last 256
    assert cpu.tile_rows(1536, 576) == 320
    w = packed_weight(fmt)
    bias = torch.randn(1536)
    for m in (1, 16, 33):
        x = torch.randn(m, 576)
        ref = linear_reference(x, w, bias)
        err = errors(f"tiled {fmt} M={m}", cpu.tiled_linear(x, w, bias), ref)
        assert err.max() <= 2e-6 * ref.abs().max() and err.mean() <= 1e-7 * ref.abs().max()


def test_tile_rows_whole_multiples_of_64_unless_one_tile():
    assert cpu.tile_rows(1536, 576) == 1536  # 884736 weights: one tile
    assert cpu.tile_rows(4096, 4096) == 256  # 1M // 4096
    assert cpu.tile_rows(14336, 4096) == 256
    assert cpu.tile_rows(4096, 14336) == 64  # 73 rows -> 64
    assert cpu.tile_rows(8, 1 << 21) == 1  # rows longer than a tile: one at a time
    assert cpu.tile_rows(100, 1 << 15) == 32  # fewer than 64 rows fit: as many as fit


BF16_TILED = [
    IntFormat(bits=4, group_size=64),  # fp16 scales: weights with up to 15 significant bits
    IntFormat(bits=3, group_size=128),  # ragged last group
    IntFormat(bits=4, group_size=32, zero_point="float", scale_dtype="bfloat16"),
    IntFormat(bits=8, group_size=None, scale_dtype="float32"),
]


@pytest.mark.parametrize("fmt", BF16_TILED, ids=str)
def test_bf16_tiles_compute_the_weight_rounded_once(fmt, monkeypatch):
    """Path 2 equals a bfloat16 F.linear over the dequantized weight rounded once to bfloat16
    (what a dense bfloat16 copy of the model computes), in several tiles too, and stays within
    bfloat16 rounding of the float32 reference."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 576 * 350)  # 320-row tiles, the last one short
    w = packed_weight(fmt)
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(1536, generator=gen).bfloat16()
    exact = dequantize(w)  # (out, in) float32, exact
    dense = exact.bfloat16()  # rounded once
    for m in (1, 40, 200):
        x = torch.randn(m, 576, generator=gen).bfloat16()
        y = cpu.tiled_linear(x, w, bias, torch.bfloat16)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 1536)
        twin = torch.nn.functional.linear(x, dense, bias)
        ref = linear_reference(x.float(), w, bias.float())
        err_twin = errors(f"bf16 tiles vs bf16 twin {fmt} M={m}", y, twin)
        # equal here (AMX); another GEMM blocking may move an output by its last bit
        assert (err_twin <= 2**-7 * twin.float().abs()).all()
        assert (err_twin > 0).float().mean() <= 0.01
        err = (y.float() - ref).abs()
        size = x.float().abs() @ exact.abs().T + bias.float().abs()  # what rounding can cost
        assert (err <= 2**-7 * size).all()  # weight and output roundings, float32 sums


def test_bf16_tiles_pad_rows_to_bound_the_gemm_shapes(monkeypatch):
    """Path 2's GEMMs see row counts rounded up to BF16_ROWS (oneDNN compiles and keeps one per
    shape: a mixture of experts' every-call row counts grew memory by hundreds of MB), and the
    padding never reaches the output."""
    w = packed_weight(IntFormat(bits=4, group_size=64))
    seen = []
    real = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: seen.append(a.shape[0]) or real(a, b, **kw))
    for m in (33, 40, 48):
        x = torch.randn(m, 576).bfloat16()
        y = cpu.tiled_linear(x, w, None, torch.bfloat16)
        assert y.shape == (m, 1536) and y.is_contiguous()
        ref = linear_reference(x.float(), w)
        assert (y.float() - ref).abs().max() <= 2**-6 * ref.abs().max()
    assert seen == [48, 48, 48]  # 33, 40 and 48 rows: one shape


def test_tile_buffers_are_reused_across_calls_and_modes():
    """The tiles' buffers outlive a call (no fresh pages each time) and serve calls inside
    and outside inference mode alike (a buffer made in inference mode would refuse the later
    in-place writes of a no_grad call); an output never aliases them."""
    w = packed_weight(IntFormat(bits=4, group_size=64))
    x = torch.randn(70, 576)
    ref = linear_reference(x, w)
    with torch.inference_mode():
        y1 = cpu.tiled_linear(x, w)
    held = cpu._local.float32_float32.data_ptr()
    with torch.no_grad():
        y2 = cpu.tiled_linear(x, w)
        y3 = cpu.tiled_linear(x.bfloat16(), w, None, torch.bfloat16)
    assert cpu._local.float32_float32.data_ptr() == held
    for y in (y1, y2):
        assert (y - ref).abs().max() <= 2e-6 * ref.abs().max()
    assert (y3.float() - ref).abs().max() <= 2**-6 * ref.abs().max()
    assert y2.data_ptr() != y1.data_ptr() and y1.data_ptr() != held


def test_bf16_policy_follows_the_cpu(monkeypatch):
    """With AMX (FAST_BF16) bfloat16 activations past FAST_KERNEL_MAX_M rows take the bfloat16
    tiles; without it, the kernels up to KERNEL_MAX_M and float32 tiles past it; float32
    activations never take bfloat16 tiles."""
    w = packed_weight(IntFormat(bits=4, group_size=64))
    cache = cpu.prepare_cpu(w)
    calls = []
    real = cpu.tiled_linear
    monkeypatch.setattr(cpu, "tiled_linear",
                        lambda x, w, b=None, dtype=torch.float32: calls.append(dtype)
                        or real(x, w, b, dtype))
    monkeypatch.setattr(cpu, "kernel_linear",
                        lambda x, c, b: calls.append("kernel") or torch.zeros(x.shape[0], 1536))
    cases = [(True, torch.bfloat16, cpu.FAST_KERNEL_MAX_M, "kernel"),
             (True, torch.bfloat16, cpu.FAST_KERNEL_MAX_M + 1, torch.bfloat16),
             (True, torch.float32, 200, torch.float32),
             (True, torch.float32, cpu.DECODE_MAX_M, "kernel"),
             (False, torch.bfloat16, cpu.KERNEL_MAX_M, "kernel"),
             (False, torch.bfloat16, cpu.KERNEL_MAX_M + 1, torch.float32)]
    for fast, dtype, m, path in cases:
        monkeypatch.setattr(cpu, "FAST_BF16", fast)
        calls.clear()
        cpu.cpu_linear(torch.randn(m, 576).to(dtype), w, None, cache)
        assert calls == [path], (fast, dtype, m)


KERNEL = [
    IntFormat(bits=4, group_size=64),  # fp16 scales: head + tail kernel calls
    IntFormat(bits=4, group_size=128, symmetric=True),
    IntFormat(bits=4, group_size=32, scale_dtype="bfloat16"),  # one call + group correction
    IntFormat(bits=4, group_size=256, symmetric=True, scale_dtype="bfloat16"),  # one call
    IntFormat(bits=8, group_size=None, symmetric=True),
    IntFormat(bits=3, group_size=64),  # 3- and 2-bit codes through the int4 kernel
    IntFormat(bits=2, group_size=128, symmetric=True, scale_dtype="bfloat16"),
    IntFormat(bits=4, group_size=64, zero_point="float"),  # HQQ: two calls + the rest of t
    IntFormat(bits=3, group_size=32, zero_point="float", scale_dtype="bfloat16"),  # one + rest
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
    return terms[:, : cache.out]


@pytest.mark.parametrize("out", [1536, 1037], ids=["out1536", "out1037"])
@pytest.mark.parametrize("fmt", KERNEL, ids=str)
def test_bf16_kernels_match_reference_within_bf16_rounding(fmt, out, monkeypatch):
    """Row counts the int4 layout does not hold in multiples of 16 (1037; GPT-2's head has
    50257) are padded with zero rows there and sliced back."""
    monkeypatch.setattr(cpu, "FAST_BF16", False)  # the kernels up to KERNEL_MAX_M rows
    w = packed_weight(fmt, out=out, k=576 if 576 % (fmt.group_size or 1) == 0 else 512)
    cache = cpu.prepare_cpu(w)
    assert cache is not None, cpu.kernel_ineligibility(w)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(out, generator=gen).bfloat16()
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


def test_int4_float_zeros_are_applied_exactly():
    """HQQ's float zeros: t = (8 - z) s in float32 is the bfloat16 head and tail the kernel
    calls take plus the float32 rest the group correction adds, to the bit."""
    w = packed_weight(IntFormat(bits=4, group_size=64, zero_point="float"))
    cache = cpu.prepare_cpu(w)
    assert cache.tail is not None and cache.group_tail is not None
    t = cache.params[..., 1].float().T + cache.tail[..., 1].float().T + cache.group_tail
    assert torch.equal(t, (8 - w.zeros()) * w.scale.float())


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


def test_int4_layout_of_rows_not_a_multiple_of_16_is_padded_with_zero_rows(monkeypatch):
    """1037 rows: the layout is the conversion of the codes with 3 zero rows appended, a ragged
    last chunk included, and those rows' scales and offsets are zero."""
    w = packed_weight(IntFormat(bits=4, group_size=64), out=1037, k=128)
    monkeypatch.setattr(cpu, "PREPARE_ROWS", 448)  # chunks of 448, 448 and 144 (141 + 3)
    cache = cpu.prepare_cpu(w)
    codes = torch.cat([w.codes().to(torch.int32), torch.zeros(3, 128, dtype=torch.int32)])
    assert torch.equal(cache.qweight, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
    assert cache.out == 1037 and cache.params.shape == cache.tail.shape == (2, 1040, 2)
    assert not cache.params[:, 1037:].any() and not cache.tail[:, 1037:].any()
    x = torch.randn(1, 1, 128)  # a decode step of float32 activations takes the kernel
    y = cpu.cpu_linear(x, w, None, cache)
    assert y.shape == (1, 1, 1037)
    ref = linear_reference(x, w)
    assert (y - ref).abs().max() <= 2**-7 * ref.abs().max()


_PREPARE_PEAK = """
import json, torch
from memfit.eval.memory import steady_malloc
from memfit.formats.grid import IntFormat
from memfit.formats.intq import PackedIntWeight
from memfit.kernels import cpu
def rss(f):
    return int(next(l for l in open('/proc/self/status') if l.startswith(f)).split()[1]) * 1024
steady_malloc()
fmt = IntFormat(bits=4, group_size=32, zero_point="float")
gen = torch.Generator().manual_seed(0)
codes = torch.randint(0, 16, (49152, 576), dtype=torch.uint8, generator=gen)
scale = (torch.rand(49152, 18, generator=gen) * 0.01 + 1e-3).half()
zero = (torch.rand(49152, 18, generator=gen) * 15).half()
w = PackedIntWeight.from_codes(codes, scale, zero, fmt).kernel_weight()
del codes
base = rss('VmRSS')
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # the peak restarts from here
cache = cpu.prepare_cpu(w)
print(json.dumps([rss('VmHWM') - base, cache.nbytes]))
"""


def test_preparing_a_head_holds_little_beyond_its_layout():
    """A 49152 x 576 head (the default model's shape), int4 g32 with float zeros: preparing its
    layout's scale and offset parts whole-matrix at a time peaked 22.9 MB above the 24.8 MB
    layout; in row chunks 3.9 MB above (most of it the codes' conversion chunk: 1024 rows of
    int32 codes, 2.4 MB)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", _PREPARE_PEAK], capture_output=True, text=True,
                          env=env, check=True)
    peak, layout = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"layout {layout / 1e6:.1f} MB, peak growth {peak / 1e6:.1f} MB")
    assert layout < peak < layout + (6 << 20)
