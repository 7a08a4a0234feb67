"""memfit.kernels.triton_decode against its torch references: on the CPU under TRITON_INTERPRET=1
(CI), and on a GPU when there is one. bfloat16 on the CPU is held in float32 by the interpreter,
so the 16-bit rounding steps are checked on the GPU; float32 everywhere."""

import os

import pytest
import torch

from memfit.kernels import triton_decode as td

DEVS = ["cuda"] if torch.cuda.is_available() else []
if os.environ.get("TRITON_INTERPRET") == "1":
    DEVS.append("cpu")
pytestmark = pytest.mark.skipif(not DEVS, reason="needs a GPU or TRITON_INTERPRET=1")


def _tol(dt):
    return 1e-5 if dt == torch.float32 else 2e-2


def _dtypes(dev):
    return [torch.float32] + ([torch.bfloat16] if dev == "cuda" else [])


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("rows,n", [(1, 64), (3, 100), (2, 4096)])
@pytest.mark.parametrize("with_r", [False, True])
def test_add_rmsnorm(dev, rows, n, with_r):
    for dt in _dtypes(dev):
        g = torch.Generator().manual_seed(rows * n)
        h = torch.randn(rows, n, generator=g).to(dev, dt)
        r = torch.randn(rows, n, generator=g).to(dev, dt) if with_r else None
        w = torch.randn(n, generator=g).to(dev, dt)
        h1, h2 = h.clone(), h.clone()
        y = td.add_rmsnorm(h1, r, w, 1e-5)
        want = td.add_rmsnorm_ref(h2, r, w, 1e-5)
        assert _rel(h1, h2) < _tol(dt), (dt, _rel(h1, h2))
        assert _rel(y, want) < _tol(dt), (dt, _rel(y, want))


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("b,t,heads,kvh,d", [(1, 1, 4, 2, 16), (2, 5, 8, 2, 32), (1, 3, 32, 8, 128)])
def test_rope_cache(dev, b, t, heads, kvh, d):
    for dt in _dtypes(dev):
        g = torch.Generator().manual_seed(b * t * d)
        length = 17
        qkv = torch.randn(b * t, (heads + 2 * kvh) * d, generator=g).to(dev, dt)
        pos = (torch.arange(t) + 4).to(dev)
        ang = torch.randn(length, d, generator=g)
        cos, sin = ang.cos().to(dev, dt), ang.sin().to(dev, dt)
        caches = [torch.randn(b, kvh, length, d, generator=g).to(dev, dt) for _ in range(2)]
        k1, v1 = (c.clone() for c in caches)
        k2, v2 = (c.clone() for c in caches)
        q = td.rope_cache(qkv, pos, cos, sin, k1, v1, heads)
        want = td.rope_cache_ref(qkv, pos, cos, sin, k2, v2, heads)
        assert q.shape == want.shape == (b, heads, t, d)
        for got, ref in ((q, want), (k1, k2), (v1, v2)):
            assert _rel(got, ref) < _tol(dt) / 4, (dt, _rel(got, ref))


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("b,heads,kvh,d,length,p", [(1, 4, 2, 16, 9, 0), (2, 8, 2, 32, 70, 66),
                                                    (1, 32, 8, 128, 200, 130),
                                                    (3, 6, 6, 64, 40, 39)])
@pytest.mark.parametrize("split", [1, 4])
def test_decode_attention(dev, b, heads, kvh, d, length, p, split):
    for dt in _dtypes(dev):
        g = torch.Generator().manual_seed(length + p)
        q = torch.randn(b, heads, 1, d, generator=g).to(dev, dt)
        kc = torch.randn(b, kvh, length, d, generator=g).to(dev, dt)
        vc = torch.randn(b, kvh, length, d, generator=g).to(dev, dt)
        pos = torch.tensor([p], device=dev)
        got = td.decode_attention(q, kc, vc, pos, d ** -0.5, split)
        want = td.attention_ref(q.float(), kc.float(), vc.float(), pos, d ** -0.5)
        assert got.shape == (b, 1, heads * d)
        tol = 1e-3 if dt == torch.float32 and dev == "cpu" else 2e-2  # tf32 dots on a GPU
        assert _rel(got, want) < tol, (dt, _rel(got, want))


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("rows,n", [(1, 96), (2, 1500)])
def test_silu_mul(dev, rows, n):
    for dt in _dtypes(dev):
        gu = torch.randn(rows, 2 * n, generator=torch.Generator().manual_seed(n)).to(dev, dt)
        got, want = td.silu_mul(gu), td.silu_mul_ref(gu)
        assert _rel(got, want) < _tol(dt) / 4, (dt, _rel(got, want))


def test_attn_split():
    assert td.attn_split(97, 8) == 1
    assert td.attn_split(4096, 8) == 8
    assert td.attn_split(32768, 8) == 32
    assert td.attn_split(4096, 256) == 1


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("rows,n", [(1, 7), (2, 5000), (3, 128256)])
def test_argmax_rows_takes_the_first_of_ties(dev, rows, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-50, 50, (rows, n), generator=g).float()
    x[:, n // 3] = 60.0
    x[:, n - 1] = 60.0  # a tie in a later chunk
    for dt in _dtypes(dev):
        xd = x.to(dev, dt)
        assert torch.equal(td.argmax_rows(xd).cpu(), xd.argmax(-1).cpu())


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("b,heads,kvh,d,length,p", [(1, 4, 2, 32, 9, 0), (2, 8, 2, 32, 70, 66),
                                                    (1, 32, 8, 128, 200, 130),
                                                    (3, 6, 6, 64, 40, 39)])
@pytest.mark.parametrize("split", [1, 4])
def test_rope_attention_equals_rope_cache_then_attention(dev, b, heads, kvh, d, length, p, split):
    for dt in _dtypes(dev):
        g = torch.Generator().manual_seed(length * 7 + p)
        qkv = torch.randn(b, (heads + 2 * kvh) * d, generator=g).to(dev, dt)
        ang = torch.randn(length, d, generator=g)
        cos, sin = ang.cos().to(dev, dt), ang.sin().to(dev, dt)
        caches = [torch.randn(b, kvh, length, d, generator=g).to(dev, dt) for _ in range(2)]
        k1, v1 = (c.clone() for c in caches)
        k2, v2 = (c.clone() for c in caches)
        pos = torch.tensor([p], device=dev)
        got = td.rope_attention(qkv, pos, cos, sin, k1, v1, heads, d ** -0.5, split)
        q = td.rope_cache_ref(qkv, pos, cos, sin, k2, v2, heads)
        want = td.attention_ref(q.float(), k2.float(), v2.float(), pos, d ** -0.5)
        assert got.shape == (b, 1, heads * d)
        tol = 1e-3 if dt == torch.float32 and dev == "cpu" else 2e-2
        assert _rel(got, want) < tol, (dt, _rel(got, want))
        assert _rel(k1, k2) < _tol(dt) / 4 and _rel(v1, v2) < _tol(dt) / 4
