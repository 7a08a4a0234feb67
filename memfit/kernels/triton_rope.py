"""The rope + cache-write kernel of memfit's native decode step (memfit.kernels.triton_decode
re-exports it; see there): q and k rotated, k and v written into the cache at their positions
(modulo its length, so a static quantized cache's rings take them too), q returned; with a
static quantized cache's store (memfit.kernels.kv_static) the same launch also runs its flush
(extra programs, one a KV head), so a decode step with that cache spends no launch on it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memfit.kernels import kv_static, pdl


@triton.jit
def _rope_cache(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, T, H, KVH, L,
                D: tl.constexpr, PDL: tl.constexpr, kq_ptr=None, ks_ptr=None, km_ptr=None,
                vq_ptr=None, vs_ptr=None, vm_ptr=None, CAP=0, RES: tl.constexpr = 0,
                GROUP: tl.constexpr = 1, GV: tl.constexpr = 1, BITS: tl.constexpr = 4):
    pdl.wait(PDL)
    r = tl.program_id(0)        # token row b * T + t
    hd = tl.program_id(1)       # head among H query, KVH key, KVH value heads (RES: and KVH
    b = r // T                  # flush programs, T = 1)
    t = r % T
    if RES:  # a static quantized cache's flush (memfit.kernels.kv_static) in the same launch
        if hd >= H + 2 * KVH:
            kv_static.flush_group(pos_ptr, kc_ptr, vc_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr,
                                  vm_ptr, b, hd - H - 2 * KVH, KVH, L, CAP, RES, GROUP, D, GV,
                                  BITS)
        else:
            _rope_write(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, b, t, hd, T,
                        H, KVH, L, D)
    else:
        _rope_write(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, b, t, hd, T, H,
                    KVH, L, D)


@triton.jit
def _rope_write(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, b, t, hd, T, H, KVH,
                L, D: tl.constexpr):
    """Head hd of token (b, t): q rotated into q_ptr, k rotated and v into the cache at its
    position (modulo L)."""
    r = b * T + t
    HALF: tl.constexpr = D // 2
    i = tl.arange(0, HALF)
    src = qkv_ptr + r * (H + 2 * KVH) * D + hd * D
    x1 = tl.load(src + i)
    x2 = tl.load(src + HALF + i)
    p = tl.load(pos_ptr + t)
    if hd < H + KVH:
        c1 = tl.load(cos_ptr + p * D + i).to(tl.float32)
        c2 = tl.load(cos_ptr + p * D + HALF + i).to(tl.float32)
        s1 = tl.load(sin_ptr + p * D + i).to(tl.float32)
        s2 = tl.load(sin_ptr + p * D + HALF + i).to(tl.float32)
        dt = x1.dtype
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        # q * cos + rotate_half(q) * sin, each product rounded like the 16-bit torch ops
        o1 = ((a1 * c1).to(dt).to(tl.float32) - (a2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((a2 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)).to(dt)
        if hd < H:
            dst = q_ptr + ((b * H + hd) * T + t) * D
        else:
            dst = kc_ptr + ((b * KVH + hd - H) * L + p % L) * D
        tl.store(dst + i, o1)
        tl.store(dst + HALF + i, o2)
    else:
        dst = vc_ptr + ((b * KVH + hd - H - KVH) * L + p % L) * D
        tl.store(dst + i, x1)
        tl.store(dst + HALF + i, x2)


def rope_cache(qkv, pos, cos, sin, kc, vc, heads: int,
               flush: tuple | None = None) -> torch.Tensor:
    """qkv (B*T, (H + 2 KVH) * D), pos (T,) long, cos/sin (max_len, D), kc/vc (B, KVH, L, D)
    -> q (B, H, T, D); k, v written into kc, vc at `pos` (modulo L: a ring). flush = (store,
    bits, group, residual), T = 1: kc/vc are a static quantized cache's rings, and the same
    launch quantizes the group leaving them (memfit.kernels.kv_static.flush_group)."""
    bsz, kvh, length, d = kc.shape
    t = pos.shape[0]
    q = torch.empty(bsz, heads, t, d, dtype=qkv.dtype, device=qkv.device)
    if flush is None or t != 1:
        _rope_cache[(bsz * t, heads + 2 * kvh)](qkv, pos, cos, sin, q, kc, vc, t, heads, kvh,
                                                 length, D=d, num_warps=1, **pdl.launch_kw())
        return q
    store, bits, group, residual = flush
    _rope_cache[(bsz, heads + 3 * kvh)](
        qkv, pos, cos, sin, q, kc, vc, t, heads, kvh, length, D=d, num_warps=4,
        **pdl.launch_kw(), kq_ptr=store[0], ks_ptr=store[1], km_ptr=store[2], vq_ptr=store[3],
        vs_ptr=store[4], vm_ptr=store[5], CAP=store[0].shape[2], RES=residual, GROUP=group,
        GV=d // store[4].shape[-1], BITS=bits)
    return q


def rope_cache_ref(qkv, pos, cos, sin, kc, vc, heads: int):
    bsz, kvh, _, d = kc.shape
    t = pos.shape[0]
    x = qkv.view(bsz, t, heads + 2 * kvh, d).transpose(1, 2)  # (B, heads, T, D)
    c, s = cos[pos].to(qkv.dtype), sin[pos].to(qkv.dtype)    # (T, D)

    def rot(y):
        return y * c + torch.cat((-y[..., d // 2:], y[..., : d // 2]), -1) * s

    q, k, v = x[:, :heads], x[:, heads: heads + kvh], x[:, heads + kvh:]
    kc.index_copy_(2, pos % kc.shape[2], rot(k))
    vc.index_copy_(2, pos % vc.shape[2], v)
    return rot(q).contiguous()
