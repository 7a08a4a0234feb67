"""A quantized KV cache with fixed buffers, for memfit's own decode step (memfit.fastdecode), so
that a decode step with it is one CUDA graph like the 16-bit cache's.

The format and its rules are memfit.kvcache's (KIVI-style, `KVFormat`): keys quantized per
channel over groups of `group` tokens, values per token over groups of channels, float16 scales
and minima, and a token is quantized once, when more than `residual` tokens are dense: with n
tokens in the cache, the first Q(n) = floor((n - residual) / group) * group are packed and the
rest dense. Here the state is a pure function of the position p of the step (n = p + 1), held
in a device tensor, so no host value enters the step:

- the packed store: the six tensors of QuantizedKVLayer.store sized for every token the cache
  can pack (packed_count(max_len)), filled in order;
- the dense tokens live in a ring of W = residual + group slots (token t in slot t % W): at
  most residual + group - 1 tokens are dense before a step writes its own, and the slot it
  overwrites held token p - W, packed already;
- the flush: if token p brought the dense count to residual + group, the oldest dense group is
  quantized into the store; any other step returns at once. On a GPU (and under the Triton
  interpreter) it runs in the decode step's rope + cache-write launch (extra programs,
  memfit.kernels.triton_rope), elsewhere in torch (`flush`);
- `attend`: the packed splits (memfit.kernels.triton_kv's kernels, or triton_kv_mma's, with
  the packed count read from pos) and the merge over the ring (kv_merge), two launches
  (memfit.kernels.kv_static.attention).

Measured (one H200, random-weight Llama-3-8B shape, int4 g128 weights, batch 1,
benchmarks/decode_kv.py; RESULTS.md, session 15): `int4` at 32k context 313 tok/s with 1176 MiB
of KV against 284 with the 16-bit cache's 4112 MiB; at 1k 367 against 393 (a layer has one more
launch than the 16-bit cache's fused rope-attention and its merge).

The quantized values are bit for bit those of memfit.kvcache's `_quantize` (IEEE division,
round half to even), so generating with this cache gives the tokens that transformers'
`generate` with QuantizedKVCache(fused=True) gives (tests/eval/test_fastdecode.py).
Takes the formats the GPU kernels read with a packed count from the device: 8 bits, or 4 bits
with key groups >= 64 (`ineligibility`); anything else stays on transformers' `generate`.
"""

from __future__ import annotations

import os

import torch

from memfit.kernels import kv_static as kernels
from memfit.kvcache import KVFormat, dequantize_store, quantize_store, value_group

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def ineligibility(fmt: KVFormat, head_dim: int) -> str | None:
    """Why the static cache cannot hold `fmt` at this head_dim (None when it can)."""
    from memfit.kernels import triton_kv
    if fmt.bits not in (4, 8):
        return f"{fmt.bits}-bit codes (the static cache packs 8 or 4)"
    if fmt.bits == 4 and fmt.group < 64:
        return f"4-bit key groups of {fmt.group} tokens (the static cache takes 64 or more)"
    if fmt.group & (fmt.group - 1) or head_dim & (head_dim - 1):
        return f"group {fmt.group} or head_dim {head_dim} not a power of two"
    gv = value_group(fmt, head_dim)
    if not triton_kv.uses_new_kernel(fmt.bits, head_dim, fmt.group, gv):
        return triton_kv.kv_ineligibility(fmt.bits, head_dim, fmt.group, gv) or "no kernel"
    return None


def packed_count(n: int, fmt: KVFormat) -> int:
    """Tokens packed when the cache holds n."""
    return max(0, (n - fmt.residual) // fmt.group * fmt.group)


class StaticKV:
    """One layer's cache for `batch` rows, `kv_heads` heads and up to `max_len` tokens."""

    def __init__(self, fmt: KVFormat, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device):
        why = ineligibility(fmt, head_dim)
        if why is not None:
            raise ValueError(f"memfit.kvstatic: {why}")
        self.fmt, self.head_dim = fmt, head_dim
        self.ring = fmt.residual + fmt.group
        shape = (batch, kv_heads, self.ring, head_dim)
        self.kr = torch.zeros(shape, dtype=dtype, device=device)
        self.vr = torch.zeros(shape, dtype=dtype, device=device)
        cap = packed_count(max_len, fmt)
        g, gv, nb = fmt.group, value_group(fmt, head_dim), head_dim * fmt.bits // 8
        rows = (batch, kv_heads)
        f16 = dict(dtype=torch.float16, device=device)
        self.store = [torch.zeros(*rows, cap, nb, dtype=torch.uint8, device=device),
                      torch.zeros(*rows, cap // g, head_dim, **f16),
                      torch.zeros(*rows, cap // g, head_dim, **f16),
                      torch.zeros(*rows, cap, nb, dtype=torch.uint8, device=device),
                      torch.zeros(*rows, cap, head_dim // gv, **f16),
                      torch.zeros(*rows, cap, head_dim // gv, **f16)]
        self.fast = torch.device(device).type == "cuda" or INTERPRET

    def nbytes(self) -> int:
        """Bytes allocated: the store at capacity and the two rings."""
        return sum(t.numel() * t.element_size() for t in [*self.store, self.kr, self.vr])

    def prefill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Tokens 0..P-1's (B, H, P, D) states: the first Q(P) packed, the rest into the ring."""
        p = keys.shape[2]
        q = packed_count(p, self.fmt)
        if q:
            for dst, src in zip(self.store, quantize_store(keys[:, :, :q], values[:, :, :q],
                                                           self.fmt)):
                dst[:, :, :src.shape[2]].copy_(src)
        slots = torch.arange(q, p, device=keys.device) % self.ring
        self.kr.index_copy_(2, slots, keys[:, :, q:].to(self.kr.dtype))
        self.vr.index_copy_(2, slots, values[:, :, q:].to(self.vr.dtype))

    def flush_args(self) -> tuple | None:
        """What memfit.kernels.triton_decode.rope_cache takes to flush in its own launch (None:
        the cache packs nothing)."""
        fmt = self.fmt
        return (self.store, fmt.bits, fmt.group, fmt.residual) if self.store[0].shape[2] else None

    def flush(self, pos: torch.Tensor) -> None:
        """After the step at pos (1,) wrote its token into the ring: quantize the group leaving
        it, when one does."""
        fmt = self.fmt
        if not self.fast:
            n = int(pos[0]) + 1
            if n > fmt.residual and (n - fmt.residual) % fmt.group == 0:
                j = (n - fmt.residual) // fmt.group - 1
                slots = torch.arange(j * fmt.group, (j + 1) * fmt.group) % self.ring
                new = quantize_store(self.kr[:, :, slots], self.vr[:, :, slots], fmt)
                for dst, src, per in zip(self.store, new, (1, 0, 0, 1, 1, 1)):
                    at = j * fmt.group if per else j
                    dst[:, :, at:at + src.shape[2]].copy_(src)
            return
        if self.store[0].shape[2]:
            kernels.flush(pos, self.kr, self.vr, self.store, fmt.bits, fmt.group, fmt.residual)

    def attend(self, q: torch.Tensor, pos: torch.Tensor, scaling: float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode attention (B, Hq, D) of q (B, Hq, D) over the cache at position pos (its own
        token already in the ring), float32 sums written as `dtype`."""
        fmt = self.fmt
        if not self.fast:
            return self._attend_ref(q, int(pos[0]), scaling).to(dtype)
        return kernels.attention(q, self.store, self.kr, self.vr, pos, fmt.bits, fmt.group,
                                 fmt.residual, scaling, dtype)

    def _attend_ref(self, q: torch.Tensor, p: int, scaling: float) -> torch.Tensor:
        from memfit.kernels.kv_merge import reference
        fmt, n = self.fmt, p + 1
        packed = packed_count(n, fmt)
        slots = torch.arange(packed, n, device=q.device) % self.ring
        k, v = self.kr[:, :, slots].float(), self.vr[:, :, slots].float()
        if packed:
            store = [self.store[0][:, :, :packed], self.store[1][:, :, :packed // fmt.group],
                     self.store[2][:, :, :packed // fmt.group],
                     *(t[:, :, :packed] for t in self.store[3:])]
            kp, vp = dequantize_store(store, fmt, self.head_dim)
            k, v = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
        return reference(q, k, v, scaling).float()
