"""The smallest Triton kernel that shows the K-16 mma.sync fault behind
memfit.kernels.launch_shapes.triton_bug (session 44): x (BM, K) @ w (BN, K)^T, K tiles of BK,
with w loaded as 16-bit floats (mode 0), times a row scale (1), computed from 4-bit codes read
as bytes and split with tl.join + tl.reshape (2), and those codes times a row scale (3). It
prints the relative error of each against a float32 reference; more than 1e-2 is WRONG.

On an H100 with Triton 3.6 (benchmarks/RESULTS.md, session 44): modes 2 and 3 at BM = 16 and
BK = 16 are wrong (0.82-0.92) in float16 and bfloat16; BK = 32, BM = 64 (wgmma) and modes 0-1
are right. Run: python benchmarks/k16_dot.py (a CUDA GPU)."""

import itertools

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(x_ptr, w_ptr, q_ptr, s_ptr, y_ptr, K, MODE: tl.constexpr, BM: tl.constexpr,
         BN: tl.constexpr, BK: tl.constexpr, RAGGED: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    s = tl.load(s_ptr + rn)
    for it in range(tl.cdiv(K, BK)):
        kk = it * BK + tl.arange(0, BK)
        if RAGGED:
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0)
        else:
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :])
        if MODE <= 1:
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0)
        else:
            jb = it * (BK // 2) + tl.arange(0, BK // 2)
            qb = tl.load(q_ptr + rn[:, None] * (K // 2) + jb[None, :],
                         mask=jb[None, :] < K // 2, other=0).to(tl.int32)
            w = tl.reshape(tl.join(qb & 15, qb >> 4), (BN, BK)).to(tl.float32).to(x.dtype)
        if MODE % 2 == 1:
            w = w * s.to(x.dtype)[:, None]
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + rm[:, None] * BN + rn[None, :], acc)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    bn = 16
    for dtype, mode, bm, bk, k in itertools.product((torch.bfloat16, torch.float16), range(4),
                                                    (16, 64), (16, 32), (320, 328)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(bm, k, generator=g).to(dtype).cuda()
        q = torch.randint(0, 256, (bn, k // 2), generator=g, dtype=torch.uint8).cuda()
        codes = torch.stack([q & 15, q >> 4], -1).reshape(bn, k).float()
        w = torch.randn(bn, k, generator=g).to(dtype).cuda() if mode <= 1 else codes.to(dtype)
        s = (torch.rand(bn, generator=g) + 0.5).to(dtype).cuda()
        want = x.float() @ (w.float() * (s.float()[:, None] if mode % 2 else 1)).T
        y = torch.empty(bm, bn, device="cuda")
        _dot[(1,)](x, w, q, s, y, k, mode, bm, bn, bk, k % bk != 0, num_warps=4, num_stages=2)
        err = ((y - want).norm() / want.norm()).item()
        print(f"{str(dtype)[6:]} mode={mode} BM={bm} BK={bk} K={k}: {err:.3g}"
              + ("  WRONG" if err > 1e-2 else ""), flush=True)


if __name__ == "__main__":
    main()
