"""The KV decode-attention asm (memfit.kernels.kv_mma_ptx) run on the CPU: its PTX text executed
for one warp by tests/kernels/ptx_warp.py over a whole split (prologue, each tile's key and value
phases, epilogue), operands laid out as triton_kv_mma's (64, 16) tiles give them to each lane,
against float64 attention over the dequantized states. The GPU tests
(tests/kernels/test_triton_kv_mma.py) run the same text on the hardware; this one runs in CI."""

import numpy as np
import pytest
import torch

from memfit.kernels import kv_mma_ptx as ptx
from memfit.kvcache import _dequantize, _quantize
from tests.kernels.ptx_warp import LANES, Warp, _pack

G_, J_ = LANES // 4, LANES % 4  # lane (g, j)


def _frag(x: np.ndarray) -> list[np.ndarray]:
    """A (64, 16) tile as 32 operands: element 4i + e of lane (g, j) is x[8i + g, 4j + e]."""
    return [np.asarray(x[8 * (k // 4) + G_, 4 * J_ + k % 4]) for k in range(32)]


def _unfrag(ops: list[np.ndarray]) -> np.ndarray:
    x = np.zeros((64, 16), ops[0].dtype)
    for k in range(32):
        x[8 * (k // 4) + G_, 4 * J_ + k % 4] = ops[k]
    return x


def _call(warp, text, outs, ins):
    ops = [np.zeros(32, np.uint32)] * (32 * outs) + [o for t in ins for o in t]
    res = warp.run(text, ops)
    return [res[32 * n:32 * (n + 1)] for n in range(outs)]


def _case(gq, t, g, seed, ng=1):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, t, 128, generator=gen) + torch.linspace(-3, 3, 128)
    v = torch.randn(1, 1, t, 128, generator=gen) * 0.5 + 0.25
    q = torch.randn(gq, 128, generator=gen).to(torch.bfloat16).float()
    kq, ks, km, ksh = _quantize(k.reshape(1, 1, t // g, g, 128), 4, 3)
    vq, vs, vm, vsh = _quantize(v.reshape(1, 1, t, ng, 128 // ng), 4, 4)
    kd = _dequantize(((kq, ks, km, ksh), k.shape), 4, torch.float32)[0, 0]
    vd = _dequantize(((vq, vs, vm, vsh), v.shape), 4, torch.float32)[0, 0]
    return q, kq.reshape(t, 64), ks.reshape(t // g, 128), km.reshape(t // g, 128), \
        vq.reshape(t, 64), vs.reshape(t, ng), vm.reshape(t, ng), kd, vd


@pytest.mark.parametrize("gq,t,g,ng", [(4, 128, 128, 1), (8, 192, 64, 1), (1, 64, 64, 1),
                                        (3, 256, 256, 1), (4, 128, 64, 2), (8, 192, 64, 2),
                                        (2, 128, 128, 2)])
def test_kv_asm_on_one_warp_matches_reference(gq, t, g, ng):
    """ng = 2: two value groups a token (int4-g64), the value words transposed across lanes."""
    q, kq, ks, km, vq, vs, vm, kd, vd = _case(gq, t, g, seed=gq + t, ng=ng)
    scale = 128 ** -0.5 * 1.4426950408889634
    r = np.arange(64)[:, None]
    cc = np.arange(16)[None, :]
    gi, ii, jj, ee = r % 8, r // 8, cc // 4, cc % 4
    # the query pairs (odd channel / 16) of head g, word m = 4i + e of lane j's channels
    m = np.broadcast_to(4 * ii + ee, (64, 16))
    qn = np.zeros((8, 128), np.float32)
    qn[:gq] = q.numpy()
    ch = np.broadcast_to(32 * jj + 2 * m, (64, 16)) % 128
    hd = np.broadcast_to(gi, (64, 16))
    qh = np.where(m < 16, _pack((qn[hd, ch] * scale).astype(np.float16),
                                (qn[hd, ch + 1] * scale / 16).astype(np.float16)), 0)
    qh = _frag(qh.astype(np.uint32))
    kw = kq.numpy().view(np.uint32)  # (t, 16) words
    vw = vq.numpy().view(np.uint32)
    ksw = ks.numpy().view(np.uint32)  # (t / g, 64) words
    kmw = km.numpy().view(np.uint32)
    memory = np.concatenate([vs.numpy().reshape(-1).view(np.uint8), vm.numpy().reshape(-1).view(np.uint8)])
    vsa, vma = 0, 2 * t * ng  # byte addresses of the scale and minimum arrays
    warp = Warp(memory)
    st = np.where((ii == 0) & (ee < 2), np.float32(-np.inf), np.float32(0)) + np.zeros((64, 16),
                                                                                     np.float32)
    st = _frag(st.view(np.uint32))
    ptr = lambda a: [np.full(32, a, np.uint64)] * 32
    (st,) = _call(warp, ptx.prologue_asm(ng), 1, [st, ptr(vsa), ptr(vma)])
    acc = _frag(np.zeros((64, 16), np.uint32))
    word = 16 * jj + 4 * (ii % 4) + ee
    for tb in range(0, t, 64):
        grp = tb // g
        kp = np.where(ii < 4, ksw[grp][np.broadcast_to(word, (64, 16))],
                      kmw[grp][np.broadcast_to(word, (64, 16))])
        tn = min(tb + 64, t - 64)
        st, pb = _call(warp, ptx.keys_asm(ng=ng), 2,
                       [st, _frag(kw[tb:tb + 64]), qh, _frag(kp), ptr(vsa + 2 * ng * tn),
                        ptr(vma + 2 * ng * tn)])
        acc, st = _call(warp, ptx.values_asm(ng), 2, [acc, st, _frag(vw[tb:tb + 64]), pb])
    y, z = _call(warp, ptx.epi_asm(ng), 2, [acc, st])
    y = _unfrag(y).view(np.float32)
    z = _unfrag(z).view(np.float32)
    # element (8i + g, 4j + c): head 2j + c % 2, channel 32(g // 2) + 8(i // 2) + 4(g % 2) +
    # 2(i % 2) + c // 2 (the same mapping triton_kv_mma stores with)
    head = np.broadcast_to(2 * jj + ee % 2, (64, 16))
    if ng == 1:
        chan = 32 * (gi // 2) + 8 * (ii // 2) + 4 * (gi % 2) + 2 * (ii % 2) + ee // 2
    else:  # words transposed across the lane quad: m-tile i holds channels 32(i // 2)..
        chan = 32 * (ii // 2) + 4 * gi + 2 * (ii % 2) + ee // 2
    chan = np.broadcast_to(chan, (64, 16))
    got = np.zeros((8, 128))
    got[head, chan] = y
    s = (q.double() @ kd.double().T) * 128 ** -0.5
    want = torch.softmax(s, -1) @ vd.double()
    lse = torch.logsumexp(s, -1) / np.log(2)
    err = np.linalg.norm(got[:gq] - want.numpy()) / np.linalg.norm(want.numpy())
    assert err < 2e-3, err
    zl = np.zeros(8)
    zl[head[0]] = z[0]  # row 0 (lanes g = 0): each head's base-2 log-sum-exp
    assert np.abs(zl[:gq] - lse.numpy()).max() < 2e-3
