"""The register-only decode attention over 4-bit KV codes (memfit.kernels.triton_kv_mma, inline
PTX: GPU only) against float64 attention over the dequantized states: GQA 1-8 query heads per KV
head, batches, one to many splits, key groups 128 and 256, bfloat16/float16/float32 queries, keys
with large per-channel offsets (the minima the kernel folds in), a long single split (the
1024 + c code offset summed over 8k tokens), and through triton_kv.kv_attention with a dense
window. On the CPU: what it refuses (the GPU runs: benchmarks/RESULTS.md)."""

import pytest
import torch

pytest.importorskip("triton")

from memfit.kernels import triton_kv, triton_kv_mma
from tests.kernels.test_triton_kv import _store

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="inline PTX: needs a CUDA GPU")


def _case(b, hq, hkv, t, g, seed, offset=3.0, gv=128):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, t, 128, generator=gen) + torch.linspace(-offset, offset, 128)
    v = torch.randn(b, hkv, t, 128, generator=gen) * 0.5 + 0.25
    q = torch.randn(b, hq, 128, generator=gen)
    store, kd, vd = _store(k, v, 4, g, gv)
    return q, store, kd, vd


def _err(got, want):
    return ((got.double().cpu() - want).norm() / want.norm()).item()


@GPU
@pytest.mark.parametrize("b,hq,hkv,t,g,splits,qdt,gv", [
    (1, 32, 8, 1024, 128, None, torch.bfloat16, 128), (2, 8, 1, 512, 128, 3, torch.bfloat16, 128),
    (1, 2, 2, 256, 128, 1, torch.float16, 128), (1, 12, 4, 640, 128, 2, torch.float32, 128),
    (1, 8, 2, 768, 256, None, torch.bfloat16, 128), (3, 6, 6, 128, 64, 2, torch.float16, 128),
    (1, 32, 8, 1024, 64, None, torch.bfloat16, 64), (2, 8, 1, 512, 64, 3, torch.float16, 64),
    (1, 3, 3, 384, 128, 1, torch.bfloat16, 64)])
def test_mma_parts_match_reference(b, hq, hkv, t, g, splits, qdt, gv):
    """gv 64: two value groups a token (int4-g64)."""
    q, store, kd, vd = _case(b, hq, hkv, t, g, seed=t + hq, gv=gv)
    sc = 128 ** -0.5
    qd = q.to(qdt).cuda()
    out, lse = triton_kv_mma.packed_parts(qd, store, g, sc, splits=splits)
    assert out.shape[:2] == (b, hq) and lse.shape == out.shape[:3]
    got = triton_kv.combine([(out, lse)])
    want = triton_kv.reference(qd.float().cpu(), kd, vd, sc)
    assert not got.isnan().any()
    assert _err(got, want) < 4e-3
    again = triton_kv.combine([triton_kv_mma.packed_parts(qd, store, g, sc, splits=splits)])
    assert torch.equal(got, again)  # deterministic


@GPU
def test_long_single_split_keeps_precision():
    """8192 tokens in one split: O' carries 1024 * sum P' beside sum P' c for 128 tiles."""
    q, store, kd, vd = _case(1, 4, 1, 8192, 128, seed=5)
    sc = 128 ** -0.5
    qd = q.to(torch.bfloat16).cuda()
    got = triton_kv.combine([triton_kv_mma.packed_parts(qd, store, 128, sc, splits=1)])
    want = triton_kv.reference(qd.float().cpu(), kd, vd, sc)
    assert _err(got, want) < 4e-3


@GPU
def test_kv_attention_takes_the_mma_kernel_with_a_dense_window(monkeypatch):
    q, store, kd, vd = _case(1, 8, 2, 512, 128, seed=9)
    gen = torch.Generator().manual_seed(1)
    kr, vr = torch.randn(1, 2, 37, 128, generator=gen), torch.randn(1, 2, 37, 128, generator=gen)
    sc = 128 ** -0.5
    qd = q.to(torch.bfloat16).cuda()
    calls = []
    monkeypatch.setattr(triton_kv_mma, "ENABLED", True)
    real = triton_kv_mma.packed_parts
    monkeypatch.setattr(triton_kv_mma, "packed_parts", lambda *a, **k: calls.append(1) or
                        real(*a, **k))
    got = triton_kv.kv_attention(qd, store, 4, 128, sc, kr.cuda(), vr.cuda())
    assert calls
    want = triton_kv.reference(qd.float().cpu(), torch.cat([kd, kr], 2), torch.cat([vd, vr], 2),
                               sc)
    assert _err(got, want) < 4e-3
    monkeypatch.setattr(triton_kv_mma, "ENABLED", False)
    prev = triton_kv.kv_attention(qd, store, 4, 128, sc, kr.cuda(), vr.cuda())
    assert len(calls) == 1 and _err(prev, want) < 4e-3


def test_what_the_mma_kernel_refuses():
    ok = triton_kv_mma.ineligibility
    assert ok(4, 128, 128, 128, 4) is None and ok(4, 128, 256, 128, 8) is None
    assert "8-bit" in ok(8, 128, 128, 128, 4)
    assert "head_dim 64" in ok(4, 64, 128, 64, 4)
    assert "16 query heads" in ok(4, 128, 128, 128, 16)
    assert "key group 32" in ok(4, 128, 32, 32, 4)
    assert ok(4, 128, 64, 64, 4) is None
    assert "value group 32" in ok(4, 128, 64, 32, 4)
    if not torch.cuda.is_available():  # the CPU path never reaches the PTX
        q = torch.randn(1, 4, 128)
        st = [torch.zeros(1, 1, 64, 64, dtype=torch.uint8), torch.ones(1, 1, 1, 128),
              torch.zeros(1, 1, 1, 128), torch.zeros(1, 1, 64, 64, dtype=torch.uint8),
              torch.ones(1, 1, 64, 1), torch.zeros(1, 1, 64, 1)]
        assert triton_kv._mma_parts(q, st, 4, 128, 0.1, None) is None
