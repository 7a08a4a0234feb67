"""The decode-attention kernel over the packed KV cache (memfit.kernels.triton_kv) against float64
attention over the dequantized states: 8/4/2 bits, GQA and MHA, key groups 16-128, head_dim
16-128, one and several splits, merged with a dense window; the fused cache path of
memfit.kvcache inside a model's decode steps (same output as the dequantizing path), and its
one-warning fallback where the kernel cannot take the cache. On the CPU it runs in Triton's
interpreter (float32 dots, codes unpacked in Triton); on a GPU, float16 tensor-core dots with the
inline-PTX code conversion (GPU runs: benchmarks/RESULTS.md, gpu10d)."""

import pytest
import torch

pytest.importorskip("triton")

from memfit.kernels import triton_kv
from memfit.kvcache import (
    KVFormat,
    QuantizedKVCache,
    _dequantize,
    _quantize,
    cache_kwarg,
    enable_fused_kv_attention,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _store(k, v, bits, g, gv):
    b, h, t, d = k.shape
    kq, ks, km, ksh = _quantize(k.reshape(b, h, t // g, g, d), bits, 3)
    vq, vs, vm, vsh = _quantize(v.reshape(b, h, t, d // gv, gv), bits, 4)
    kd = _dequantize(((kq, ks, km, ksh), k.shape), bits, torch.float32)
    vd = _dequantize(((vq, vs, vm, vsh), v.shape), bits, torch.float32)
    store = [kq.reshape(b, h, t, -1), ks.reshape(b, h, t // g, d), km.reshape(b, h, t // g, d),
             vq.reshape(b, h, t, -1), vs.reshape(b, h, t, d // gv), vm.reshape(b, h, t, d // gv)]
    return [s.to(DEV) for s in store], kd, vd


@pytest.mark.parametrize("b,hq,hkv,t,d,bits,g", [
    (1, 4, 2, 160, 32, 4, 32), (2, 8, 2, 96, 64, 8, 16), (1, 2, 1, 64, 64, 2, 64),
    (1, 8, 8, 192, 32, 4, 32), (1, 4, 1, 32, 128, 4, 32), (1, 4, 1, 256, 128, 4, 64),
    (1, 6, 2, 256, 128, 4, 128), (1, 3, 1, 48, 16, 8, 16), (1, 4, 2, 128, 128, 2, 64)])
@pytest.mark.parametrize("splits", [1, 3])
def test_kv_attention_matches_reference(b, hq, hkv, t, d, bits, g, splits):
    """Odd cases: 6 query heads over 2 kv heads (G = 3, padded to 16 rows); g 128 (one value
    group per token); head_dim 16 at 8 bits; 2-bit with value groups of 64 channels."""
    gen = torch.Generator().manual_seed(t + d)
    k, v = torch.randn(b, hkv, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen)
    kr, vr = torch.randn(b, hkv, 7, d, generator=gen), torch.randn(b, hkv, 7, d, generator=gen)
    q = torch.randn(b, hq, d, generator=gen).to(torch.bfloat16).to(DEV)
    gv = min(g, d)
    store, kd, vd = _store(k, v, bits, g, gv)
    assert triton_kv.kv_ineligibility(bits, d, g, gv) is None
    sc = d ** -0.5
    parts = triton_kv.kv_attention_parts(q, *store, bits, g, sc, splits=splits)
    got = triton_kv.combine([parts, triton_kv.dense_part(q, kr.to(DEV), vr.to(DEV), sc)])
    fused = triton_kv.kv_attention(q, store, bits, g, sc, kr.to(DEV), vr.to(DEV), splits=splits)
    want = triton_kv.reference(q.float().cpu(), torch.cat([kd, kr], 2), torch.cat([vd, vr], 2), sc)
    assert not got.isnan().any() and not fused.isnan().any()
    err = ((got.double().cpu() - want).norm() / want.norm()).item()
    err2 = ((fused.double().cpu() - want).norm() / want.norm()).item()
    print(f"{b}x{hq}/{hkv} T={t} D={d} int{bits} g{g} splits={splits}: rel err {err:.2e} "
          f"(one call: {err2:.2e})")
    tol = 1e-5 if DEV == "cpu" else 1e-2  # GPU: bfloat16 operands, as bf16 SDPA
    assert err < tol and err2 < tol


def test_kv_kernel_refuses_what_it_cannot_take():
    new = triton_kv._new_ineligibility
    assert "3-bit" in triton_kv.kv_ineligibility(3, 64, 32, 32)
    assert "power of two" in triton_kv.kv_ineligibility(4, 80, 32, 16)
    assert "< 32" in triton_kv.kv_ineligibility(4, 16, 32, 16)  # a plane narrower than a dot
    assert "< 64" in new(2, 32, 32, 16)
    assert triton_kv.kv_ineligibility(8, 16, 32, 16) is None
    assert "power of two" in triton_kv.kv_ineligibility(4, 64, 48, 32)
    assert "power of two >= 16" in new(4, 64, 8, 32)
    assert "value group" in new(2, 64, 32, 32)  # 8 columns a plane
    # what the new kernel refuses, the previous one takes where it can (groups dividing 64)
    for args in ((2, 32, 32, 16), (4, 64, 8, 32), (2, 64, 32, 32)):
        assert triton_kv.kv_ineligibility(*args) is None
        assert not triton_kv.uses_new_kernel(*args)
    # int4 with key groups < 64: the previous kernel (measured faster there); int8, g >= 64: new
    assert not triton_kv.uses_new_kernel(4, 128, 32, 32)
    assert triton_kv.uses_new_kernel(8, 128, 32, 32)
    assert triton_kv.uses_new_kernel(4, 128, 64, 64) and triton_kv.uses_new_kernel(4, 64, 128, 64)
    with pytest.raises(ValueError, match="whole key groups"):
        triton_kv.n_splits(40, 1, 1, 32, torch.zeros(1))


@pytest.mark.parametrize("bits", [4, 8])  # int4 g32: the previous kernel; int8: the new one
def test_fused_cache_matches_dequantizing_cache_in_a_model(tiny_config, monkeypatch, bits):
    from transformers import AutoModelForCausalLM

    from memfit.kvcache import QuantizedKVLayer
    calls = []
    attend = QuantizedKVLayer.attend
    monkeypatch.setattr(QuantizedKVLayer, "attend",
                        lambda self, *a: calls.append(1) or attend(self, *a))
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config("llama", head_dim=32)).eval().to(DEV)
    ids = torch.randint(0, 30522, (1, 80), generator=torch.Generator().manual_seed(1)).to(DEV)
    fmt = KVFormat(bits, 32, 32)
    outs = {}
    for fused in (False, True):
        if fused:
            enable_fused_kv_attention(m)
        cache = QuantizedKVCache(m.config, fmt, fused=fused)
        kw = {cache_kwarg(m): cache}
        with torch.no_grad():
            m(ids[:, :72], use_cache=True, **kw)
            steps = [m(ids[:, i:i + 1], use_cache=True, **kw).logits for i in range(72, 80)]
        outs[fused] = torch.cat(steps, 1).float()
        assert cache.layers[0].quantized_tokens == 32
    assert len(calls) == 2 * 8  # every decode step of both layers went through the kernel
    err = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
    print(f"fused vs dequantizing cache: rel err {err:.2e}")
    assert err < (1e-4 if DEV == "cpu" else 2e-2)
    with pytest.raises(ValueError, match="memfit_kv"):
        m.config._attn_implementation = "sdpa"
        QuantizedKVCache(m.config, fmt, fused=True)


def test_fused_cache_falls_back_with_one_warning_where_the_kernel_cannot(tiny_config):
    """Key groups of 48 tokens (neither kernel: not a power of two, and 48 does not divide the
    previous kernel's 64-token tile): the fused cache warns once and dequantizes; the logits
    equal the dequantizing cache's."""
    import warnings

    from transformers import AutoModelForCausalLM

    from memfit import kvcache
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config("llama", head_dim=32)).eval().to(DEV)
    ids = torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(2)).to(DEV)
    fmt = KVFormat(4, 48, 48)
    kvcache._WARNED.clear()
    outs = {}
    for fused in (False, True):
        if fused:
            enable_fused_kv_attention(m)
        cache = QuantizedKVCache(m.config, fmt, fused=fused)
        with warnings.catch_warnings(record=True) as seen, torch.no_grad():
            warnings.simplefilter("always")
            m(ids[:, :120], use_cache=True, **{cache_kwarg(m): cache})
            outs[fused] = torch.cat([m(ids[:, i:i + 1], use_cache=True,
                                       **{cache_kwarg(m): cache}).logits for i in range(120, 128)], 1)
        assert cache.layers[0].quantized_tokens == 48
        hits = [w for w in seen if "cannot take this cache" in str(w.message)]
        assert len(hits) == (1 if fused else 0)
    assert torch.equal(outs[True], outs[False])


@pytest.mark.parametrize("channels,tokens", [(32, 64), (64, 32), (128, 128)])
def test_merge_in_channel_blocks_matches_reference(monkeypatch, channels, tokens):
    """The merge split over channel blocks (more programs) and the dense window a few tokens a
    step: the same attention."""
    wide = channels == 128  # all 128 channels a program through the many-rows rule
    monkeypatch.setitem(triton_kv.MERGE, "channels", 32 if wide else channels)
    monkeypatch.setitem(triton_kv.MERGE, "tokens", tokens)
    monkeypatch.setitem(triton_kv.MERGE, "wide_channels", channels)
    monkeypatch.setitem(triton_kv.MERGE, "wide_rows", 1 if wide else 10**9)
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, t, d, g = 2, 4, 2, 128, 128, 64
    k, v = torch.randn(b, hkv, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen)
    kr, vr = torch.randn(b, hkv, 77, d, generator=gen), torch.randn(b, hkv, 77, d, generator=gen)
    q = torch.randn(b, hq, d, generator=gen).to(DEV)
    store, kd, vd = _store(k, v, 4, g, 64)
    sc = d ** -0.5
    got = triton_kv.kv_attention(q, store, 4, g, sc, kr.to(DEV), vr.to(DEV), splits=2)
    want = triton_kv.reference(q.float().cpu(), torch.cat([kd, kr], 2), torch.cat([vd, vr], 2), sc)
    assert ((got.double().cpu() - want).norm() / want.norm()).item() < 5e-3
