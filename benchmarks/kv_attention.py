"""Decode attention over memfit's quantized KV cache (memfit.kernels.triton_kv) against bf16 SDPA,
one run, Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), batch 1, at 8k
and 32k context: µs per layer call (CUDA-graph replays over enough cache copies to pass the L2,
median of 5), bytes held, and the error of each against float64 attention over the same states
(the dequantized states for memfit; the bf16 states for SDPA).

memfit's call is the whole decode-time path of a fused layer (triton_kv.kv_attention: the split
kernel over the packed tokens, the dense 128-token residual window, the exact merge); "kernel
alone" is the packed splits only.

    python benchmarks/kv_attention.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from benchmarks.kernels import copies, graph_time_us
from memfit.kernels import triton_kv
from memfit.kvcache import _dequantize, _quantize

HQ, HKV, D, RES = 32, 8, 128, 128


def store(k, v, bits, g, gv=32):
    b, h, t, d = k.shape
    kq, ks, km, ksh = _quantize(k.reshape(b, h, t // g, g, d), bits, 3)
    vq, vs, vm, vsh = _quantize(v.reshape(b, h, t, d // gv, gv), bits, 4)
    st = [kq.reshape(b, h, t, -1), ks.reshape(b, h, t // g, d), km.reshape(b, h, t // g, d),
          vq.reshape(b, h, t, -1), vs.reshape(b, h, t, d // gv), vm.reshape(b, h, t, d // gv)]
    kd = _dequantize(((kq, ks, km, ksh), k.shape), bits, torch.float32)
    vd = _dequantize(((vq, vs, vm, vsh), v.shape), bits, torch.float32)
    return st, kd, vd


def attend(q, st, kr, vr, bits, g, sc):
    return triton_kv.kv_attention(q, st, bits, g, sc, kr, vr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import triton
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "command": "python " + " ".join(sys.argv)}
    print(json.dumps(head), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    sc = D ** -0.5
    rows = []
    for ctx in (8192, 32768):
        t = ctx - RES  # quantized tokens; the last RES stay dense
        q = torch.randn(1, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
        k = torch.randn(1, HKV, ctx, D, device="cuda", generator=gen)
        k = k + torch.linspace(-3, 3, D, device="cuda")  # offset key channels, as real keys
        v = torch.randn(1, HKV, ctx, D, device="cuda", generator=gen)
        kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
        n = copies(2 * kb.numel() * 2)
        dense = [(kb.clone(), vb.clone()) for _ in range(n)]
        q4 = q[:, :, None]  # (1, HQ, 1, D)
        sdpa = graph_time_us([lambda kv=kv: F.scaled_dot_product_attention(
            q4, kv[0], kv[1], scale=sc, enable_gqa=True) for kv in dense])
        want_bf16 = triton_kv.reference(q.float().cpu(), kb.float().cpu(), vb.float().cpu(), sc)
        got = F.scaled_dot_product_attention(q4, kb, vb, scale=sc, enable_gqa=True)[:, :, 0]
        err_sdpa = ((got.double().cpu() - want_bf16).norm() / want_bf16.norm()).item()
        bf16_bytes = 2 * kb.numel() * 2
        for bits in (4, 8):
            g = 32
            st, kd, vd = store(k[:, :, :t], v[:, :, :t], bits, g)
            kr, vr = kb[:, :, t:], vb[:, :, t:]
            held = sum(x.numel() * x.element_size() for x in st) + 2 * kr.numel() * 2
            m = copies(held)
            sts = [[x.clone() for x in st] for _ in range(m)]
            us = graph_time_us([lambda s=s: attend(q, s, kr, vr, bits, g, sc) for s in sts])
            kern = graph_time_us([lambda s=s: triton_kv.kv_attention_parts(q, *s, bits, g, sc)
                                  for s in sts])
            out = attend(q, st, kr, vr, bits, g, sc)
            want = triton_kv.reference(q.float().cpu(), torch.cat([kd, kr.float()], 2).cpu(),
                                       torch.cat([vd, vr.float()], 2).cpu(), sc)
            err = ((out.double().cpu() - want).norm() / want.norm()).item()
            row = {"context": ctx, "bits": bits, "group": g, "sdpa_bf16_us": sdpa,
                   "memfit_us": us, "memfit_kernel_only_us": kern, "x_sdpa": sdpa / us,
                   "bf16_bytes": bf16_bytes, "memfit_bytes": held,
                   "memory_x_less": bf16_bytes / held, "rel_err_vs_f64": err,
                   "sdpa_rel_err_vs_f64": err_sdpa}
            rows.append(row)
            print(f"ctx {ctx} int{bits} g{g}: SDPA bf16 {sdpa:.1f} us, memfit {us:.1f} us "
                  f"(kernel alone {kern:.1f}) = {sdpa / us:.2f}x; "
                  f"KV bytes {bf16_bytes / 2**20:.1f} "
                  f"-> {held / 2**20:.1f} MiB ({bf16_bytes / held:.2f}x less); rel err {err:.1e} "
                  f"(SDPA {err_sdpa:.1e})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"head": head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
