"""A quantized KV cache with fixed buffers, for memfit's own decode step (memfit.fastdecode), so
that a decode step with it is one CUDA graph like the 16-bit cache's.

The format and its rules are memfit.kvcache's (KIVI-style, `KVFormat`): keys quantized per
channel over groups of `group` tokens, values per token over groups of channels, float16 scales
and minima, and a token is quantized once, when more than `residual` tokens are dense: with n
tokens in the cache, the first Q(n) = floor((n - residual) / group) * group are packed and the
rest dense. Here the state is a pure function of the position p of the step (n = p + 1), held
in a device tensor, so no host value enters the step:

- the packed store: the six tensors of QuantizedKVLayer.store sized for every token the cache
  can pack (`capacity`), filled in order;
- the dense tokens live in a ring of W = residual + group slots (token t in slot t % W; a step
  writes its token before the group leaving the ring is quantized, and that group is then at
  least residual + 1 tokens old, so W slots always hold every dense token);
- `flush` (one launch a layer and step): if token p made the dense count reach residual +
  group, quantize the oldest dense group into the store; any other step returns at once;
- `attend`: the packed splits (memfit.kernels.triton_kv's kernels, or triton_kv_mma's, with
  the packed count read from pos) and the merge over the ring (kv_merge), two launches.

The quantized values are bit for bit those of memfit.kvcache's `_quantize` (IEEE division,
round half to even), so generating with this cache gives the tokens that transformers'
`generate` with QuantizedKVCache(fused=True) gives (tests/eval/test_kv_static.py).
Takes the formats the GPU kernels read with a packed count from the device: 8 bits, or 4 bits
with key groups >= 64 (`ineligibility`); anything else stays on transformers' `generate`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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


@triton.jit
def _round_even(y):
    """Round half to even (torch.round), exactly: the fraction y - floor(y) is exact."""
    f = tl.floor(y)
    r = y - f
    up = (r > 0.5) | ((r == 0.5) & (f - 2.0 * tl.floor(f * 0.5) == 1.0))
    return tl.where(up, f + 1.0, f)


@triton.jit
def _pack(c, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """(R, D) float32 codes -> (R, D * BITS / 8) uint8 (memfit.kernels.packing's layout)."""
    ci = c.to(tl.int32)
    if BITS == 4:
        lo, hi = tl.split(tl.reshape(ci, (R, D // 2, 2)))
        ci = lo | (hi << 4)
    return ci.to(tl.uint8)


@triton.jit
def _kv_flush(pos_ptr, kr_ptr, vr_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, HKV, W,
              s_rb, s_rh, s_rt, s_kb, s_kh, s_kt, s_sb, s_sh, s_sg, s_vb, s_vh, s_vt, s_wb, s_wh,
              s_wt, RES: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, GV: tl.constexpr,
              BITS: tl.constexpr):
    """If the token at pos brought the dense count to RES + GROUP: quantize dense group j
    (tokens j * GROUP ...) of kv head pid from the rings into the store (else nothing)."""
    n = tl.load(pos_ptr).to(tl.int32) + 1
    if (n > RES) & ((n - RES) % GROUP == 0):
        QMAX: tl.constexpr = 2 ** BITS - 1
        NB: tl.constexpr = D * BITS // 8
        pid = tl.program_id(0)
        b = pid // HKV
        h = pid % HKV
        j = (n - RES) // GROUP - 1
        t = j * GROUP + tl.arange(0, GROUP)
        rd = tl.arange(0, D)
        rb = tl.arange(0, NB)
        ring = b * s_rb + h * s_rh + ((t % W) * s_rt)[:, None] + rd[None, :]
        k = tl.load(kr_ptr + ring).to(tl.float32)  # (GROUP, D): one scale per channel
        lo = tl.min(k, axis=0)
        scale = tl.maximum(tl.math.div_rn(tl.max(k, axis=0) - lo, QMAX * 1.0), 2.0 ** -14)
        scale = scale.to(tl.float16)
        low = lo.to(tl.float16)
        y = tl.math.div_rn(k - low.to(tl.float32)[None, :], scale.to(tl.float32)[None, :])
        c = tl.minimum(tl.maximum(_round_even(y), 0.0), QMAX * 1.0)
        tl.store(kq_ptr + b * s_kb + h * s_kh + t[:, None] * s_kt + rb[None, :],
                 _pack(c, GROUP, D, BITS))
        tl.store(ks_ptr + b * s_sb + h * s_sh + j * s_sg + rd, scale)
        tl.store(km_ptr + b * s_sb + h * s_sh + j * s_sg + rd, low)
        v = tl.reshape(tl.load(vr_ptr + ring).to(tl.float32), (GROUP, D // GV, GV))
        lo = tl.min(v, axis=2)  # (GROUP, D / GV): one scale per token and channel group
        scale = tl.maximum(tl.math.div_rn(tl.max(v, axis=2) - lo, QMAX * 1.0), 2.0 ** -14)
        scale = scale.to(tl.float16)
        low = lo.to(tl.float16)
        y = tl.math.div_rn(v - low.to(tl.float32)[:, :, None], scale.to(tl.float32)[:, :, None])
        c = tl.reshape(tl.minimum(tl.maximum(_round_even(y), 0.0), QMAX * 1.0), (GROUP, D))
        tl.store(vq_ptr + b * s_vb + h * s_vh + t[:, None] * s_vt + rb[None, :],
                 _pack(c, GROUP, D, BITS))
        rw = tl.arange(0, D // GV)
        par = b * s_wb + h * s_wh + t[:, None] * s_wt + rw[None, :]
        tl.store(vs_ptr + par, scale)
        tl.store(vm_ptr + par, low)


class StaticKV:
    """One layer's cache for `batch` rows, `kv_heads` heads and up to `max_len` tokens."""

    def __init__(self, fmt: KVFormat, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device):
        why = ineligibility(fmt, head_dim)
        if why is not None:
            raise ValueError(f"memfit.kernels.kv_static: {why}")
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

    def flush(self, pos: torch.Tensor) -> None:
        """After the step at pos (1,) wrote its token into the ring: quantize the group leaving
        it, when one does."""
        fmt, d = self.fmt, self.head_dim
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
        kq, ks, km, vq, vs, vm = self.store
        if kq.shape[2] == 0:
            return
        b, h = self.kr.shape[:2]
        _kv_flush[(b * h,)](
            pos, self.kr, self.vr, kq, ks, km, vq, vs, vm, h, self.ring, self.kr.stride(0),
            self.kr.stride(1), self.kr.stride(2), kq.stride(0), kq.stride(1), kq.stride(2),
            ks.stride(0), ks.stride(1), ks.stride(2), vq.stride(0), vq.stride(1), vq.stride(2),
            vs.stride(0), vs.stride(1), vs.stride(2), RES=fmt.residual, GROUP=fmt.group, D=d,
            GV=value_group(fmt, d), BITS=fmt.bits, num_warps=4)

    def attend(self, q: torch.Tensor, pos: torch.Tensor, scaling: float) -> torch.Tensor:
        """Decode attention (B, Hq, D) float32 of q (B, Hq, D) over the cache at position pos
        (its own token already in the ring)."""
        fmt = self.fmt
        if not self.fast:
            return self._attend_ref(q, int(pos[0]), scaling)
        from memfit.kernels import triton_kv
        from memfit.kernels.kv_merge import merge
        b, hq, d = q.shape
        q = q.contiguous()
        cap = self.store[0].shape[2]
        dyn = (pos, fmt.residual)
        parts = None
        if cap:
            parts = triton_kv._mma_parts(q, self.store, fmt.bits, fmt.group, scaling, None,
                                         dyn=dyn)
        if parts is None:
            hkv = self.kr.shape[1]
            n = triton_kv.n_splits(cap, b, hkv, fmt.group, q) if cap else 0
            out = torch.empty(b, hq, n, d, dtype=torch.float32, device=q.device)
            lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
            if n:
                triton_kv._launch_packed(q, self.store, out, lse, fmt.bits, fmt.group, scaling, n,
                                         dyn=dyn)
            parts = (out, lse)
        return merge(*parts, q, self.kr, self.vr, scaling, ring=(pos, fmt.residual, fmt.group))

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
