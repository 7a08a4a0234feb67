"""The static quantized KV cache of memfit's decode step (memfit.kvstatic; its kernels:
memfit.kernels.kv_static) against memfit.kvcache's QuantizedKVLayer fed the same states: the packed store bit for bit after every
step (the flush kernel quantizes exactly as torch does), and decode attention over the packed
store + the ring against float64 attention over that layer's dequantized history + residual.
Kernels (flush, packed splits with the packed count read from the position tensor, the merge
over the ring) in Triton's interpreter on the CPU, on the GPU as compiled; the torch path
(`fast = False`) the same way."""

import pytest
import torch

pytest.importorskip("triton")

from memfit import kvstatic
from memfit.kernels.kv_merge import reference
from memfit.kvcache import KVFormat, QuantizedKVLayer

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _run(fmt, b, hq, hkv, d, prompt, steps, fast, dtype=torch.float32, seed=0):
    """Feed a prompt and `steps` decode tokens to both caches; check the store and attention
    after every step. Returns the largest attention error seen."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):  # a few outlier channels, as keys have
        x = torch.randn(*shape, generator=gen)
        x[..., :2] *= 6
        return x.to(dtype).to(DEV)

    total = prompt + steps
    cache = kvstatic.StaticKV(fmt, b, hkv, d, total, dtype, DEV)
    cache.fast = fast and cache.fast
    layer = QuantizedKVLayer(fmt)
    k, v = rnd(b, hkv, prompt, d), rnd(b, hkv, prompt, d)
    cache.prefill(k, v)
    layer.update(k, v)
    worst = 0.0
    for p in range(prompt, total):
        k, v, q = rnd(b, hkv, 1, d), rnd(b, hkv, 1, d), rnd(b, hq, d)
        q = q.to(torch.bfloat16).to(dtype)  # the mma kernel (GPU) multiplies a 16-bit query
        slot = p % cache.ring
        cache.kr[:, :, slot] = k[:, :, 0]
        cache.vr[:, :, slot] = v[:, :, 0]
        pos = torch.tensor([p], device=DEV)
        cache.flush(pos)
        layer.update(k, v)
        packed = layer.quantized_tokens
        assert packed == kvstatic.packed_count(p + 1, fmt)
        if packed:
            g = fmt.group
            for mine, ref, n in zip(cache.store, layer.store, (packed, packed // g, packed // g,
                                                              packed, packed, packed)):
                assert torch.equal(mine[:, :, :n].cpu(), ref.cpu())
        y = cache.attend(q, pos, d ** -0.5)
        keys, values = layer.dense(layer.keys, layer.values)
        want = reference(q, keys, values, d ** -0.5)
        err = ((y.double() - want).norm() / want.norm()).item()
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("fmt,d,hq,hkv", [
    (KVFormat(8, 16, 32), 32, 4, 2),    # int8, small groups: many flushes
    (KVFormat(4, 64, 64), 64, 4, 1),    # int4 (the CLI's), one value group a token
    (KVFormat(4, 64, 64), 128, 2, 2),   # two value groups a token
])
@pytest.mark.parametrize("fast", [True, False], ids=["kernels", "torch"])
def test_static_cache_matches_the_layer(fmt, d, hq, hkv, fast):
    # the prompt packs one group and leaves residual + group - 2 dense; the steps cross two
    # flushes (at the second step and group steps later)
    worst = _run(fmt, 2, hq, hkv, d, fmt.residual + 2 * fmt.group - 2, fmt.group + 3, fast)
    assert worst < (5e-3 if DEV == "cuda" else 1e-5), worst


def test_short_prompt_and_no_capacity():
    """A prompt shorter than the residual, and a cache too short to pack anything."""
    fmt = KVFormat(8, 16, 32)
    assert _run(fmt, 1, 2, 2, 32, 3, fmt.residual + fmt.group + 2, True) < 2e-3
    cache = kvstatic.StaticKV(fmt, 1, 2, 32, fmt.residual, torch.float32, DEV)
    assert cache.store[0].shape[2] == 0
    assert _run(fmt, 1, 2, 2, 32, 5, fmt.residual - 5, True) < 2e-3


def test_bf16_ring():
    """16-bit states (the GPU's): quantized from the same 16-bit values as the layer's."""
    fmt = KVFormat(4, 64, 64)
    assert _run(fmt, 1, 4, 2, 64, 190, 70, True, dtype=torch.bfloat16) < 2e-2


def test_ineligible_formats():
    assert "2-bit" in kvstatic.ineligibility(KVFormat(2, 32, 128), 64)
    assert "64 or more" in kvstatic.ineligibility(KVFormat(4, 32, 128), 64)
    assert kvstatic.ineligibility(KVFormat(4, 64, 128), 64) is None
    with pytest.raises(ValueError, match="64 or more"):
        kvstatic.StaticKV(KVFormat(4, 32, 128), 1, 1, 64, 256, torch.float32, "cpu")
