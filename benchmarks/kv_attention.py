"""Decode attention over memfit's quantized KV cache (memfit.kernels.triton_kv) against bf16 SDPA,
one run, Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128), batch 1, at 8k
and 32k context: µs per layer call (CUDA-graph replays over enough cache copies to pass the L2,
median of 5), bytes held, and the error of each against float64 attention over the same states
(the dequantized states for memfit; the bf16 states for SDPA).

memfit's call is the whole decode-time path of a fused layer (triton_kv.kv_attention: the split
kernel over the packed tokens, the dense 128-token residual window, the exact merge; for int4
with key groups < 64 that is the previous kernel, triton_kv_legacy); "kernel alone" is the new
kernel's packed splits only (row field "whole_call_kernel" says which kernel the call used). Value groups are as memfit.kvcache makes them (gv = min(g, 128)).
--sweep first times launch settings (tile, warps, stages, programs per SM) on 32k int4 g64 and
g128 and runs the rows with the fastest of their group (g32 rows: g64's).

    python benchmarks/kv_attention.py [--sweep] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from benchmarks.kernel_speed import copies, graph_time_us
from memfit.kernels import triton_kv, triton_kv_mma
from memfit.kvcache import _dequantize, _quantize

HQ, HKV, D, RES = 32, 8, 128, 128
ROWS = ((4, 128), (4, 64), (4, 32), (8, 32), (8, 64))  # (bits, key group)


def store(k, v, bits, g):
    b, h, t, d = k.shape
    gv = min(g, d)
    kq, ks, km, ksh = _quantize(k.reshape(b, h, t // g, g, d), bits, 3)
    vq, vs, vm, vsh = _quantize(v.reshape(b, h, t, d // gv, gv), bits, 4)
    st = [kq.reshape(b, h, t, -1), ks.reshape(b, h, t // g, d), km.reshape(b, h, t // g, d),
          vq.reshape(b, h, t, -1), vs.reshape(b, h, t, d // gv), vm.reshape(b, h, t, d // gv)]
    kd = _dequantize(((kq, ks, km, ksh), k.shape), bits, torch.float32)
    vd = _dequantize(((vq, vs, vm, vsh), v.shape), bits, torch.float32)
    return st, kd, vd


def states(ctx, gen):
    q = torch.randn(1, HQ, D, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, HKV, ctx, D, device="cuda", generator=gen)
    k = k + torch.linspace(-3, 3, D, device="cuda")  # offset key channels, as real keys
    v = torch.randn(1, HKV, ctx, D, device="cuda", generator=gen)
    return q, k, v


def _case32k(gen, g: int):
    """The 32k int4 case of the sweeps: q, enough copies of the packed store to pass the L2,
    and the dense recent window."""
    q, k, v = states(32768, gen)
    t = 32768 - RES
    st, _, _ = store(k[:, :, :t], v[:, :, :t], 4, g)
    sts = [[x.clone() for x in st] for _ in range(copies(sum(x.nbytes for x in st)))]
    return q, sts, k[:, :, t:].to(torch.bfloat16), v[:, :, t:].to(torch.bfloat16)


def _best(label: str, grid: list[dict], apply, call, sts) -> dict:
    """Time call(store) over the copies for each setting of `grid` (after apply(setting));
    print each, return the fastest setting (one that does not compile is reported, skipped)."""
    best = None
    for setting in grid:
        apply(setting)
        name = " ".join(f"{k} {v}" for k, v in setting.items())
        try:
            us = graph_time_us([lambda s=s: call(s) for s in sts])
        except Exception as e:  # noqa: BLE001 (a setting that does not compile: shared memory)
            print(f"{label} {name}: {type(e).__name__}", flush=True)
            continue
        print(f"{label} {name}: {us:.2f} us", flush=True)
        if best is None or us < best[0]:
            best = (us, setting)
    print(f"{label} best: {best}", flush=True)
    return best[1]


def sweep(gen, sc) -> dict:
    """Fastest (tile, warps, stages, per_sm) of triton_kv's kernel for the whole call at 32k,
    int4, key groups 64 and 128: {group: settings}."""
    found = {}
    for g in (64, 128):
        q, sts, kr, vr = _case32k(gen, g)
        grid = [{"tile": tile, "warps": warps, "stages": 3, "per_sm": per_sm}
                for tile, warps, per_sm in itertools.product((64, 128), (2, 4), (4, 8, 16))
                if tile <= g]
        found[g] = _best(f"sweep g{g}", grid, triton_kv.TUNE.update,
                         lambda s, q=q, g=g, kr=kr, vr=vr: triton_kv.kv_attention(
                             q, s, 4, g, sc, kr, vr), sts)
        del sts
    return found


def mma_sweep(gen, sc) -> dict:
    """Fastest programs per SM and L2 prefetch of triton_kv_mma (the packed part alone) at 32k
    int4 g128."""
    q, sts, _, _ = _case32k(gen, 128)
    grid = [{"per_sm": per_sm, "prefetch": pf}
            for per_sm, pf in itertools.product((6, 8, 9, 12, 16), (0, 1, 2))]
    return _best("mma sweep", grid, triton_kv_mma.TUNE.update,
                 lambda s: triton_kv_mma.packed_parts(q, s, 128, sc), sts)


def merge_sweep(gen, sc) -> dict:
    """Fastest merge settings (kv_merge.MERGE) for the whole call at 32k int4 g128."""
    q, sts, kr, vr = _case32k(gen, 128)
    grid = [{"channels": ch, "tokens": tok, "warps": warps}
            for ch, tok, warps in itertools.product((128, 64, 32, 16), (128, 32), (8, 4, 2))]
    return _best("merge sweep", grid, triton_kv.MERGE.update,
                 lambda s: triton_kv.kv_attention(q, s, 4, 128, sc, kr, vr), sts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="int4 g128 and g64 rows only")
    ap.add_argument("--merge-sweep", action="store_true",
                    help="first time the merge's launch settings at 32k int4 g128")
    ap.add_argument("--mma-sweep", action="store_true",
                    help="first time the mma kernel's programs per SM at 32k int4 g128")
    args = ap.parse_args()
    import triton
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "command": "python " + " ".join(sys.argv)}
    print(json.dumps(head), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    sc = D ** -0.5
    tune = {}
    default = dict(triton_kv.TUNE)
    if args.sweep:
        tune = sweep(gen, sc)
        head["tune"] = {str(g): t for g, t in tune.items()}
    print(f"launch settings: default {default}, swept {tune}", flush=True)
    if args.mma_sweep:
        head["mma_tune"] = mma_sweep(gen, sc)
        triton_kv_mma.TUNE.update(head["mma_tune"])
    if args.merge_sweep:
        head["merge"] = merge_sweep(gen, sc)
        triton_kv.MERGE.update(head["merge"])
    rows = []
    for ctx in (8192, 32768):
        t = ctx - RES  # quantized tokens; the last RES stay dense
        q, k, v = states(ctx, gen)
        kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
        dense = [(kb.clone(), vb.clone()) for _ in range(copies(2 * kb.numel() * 2))]
        q4 = q[:, :, None]  # (1, HQ, 1, D)
        sdpa = graph_time_us([lambda kv=kv: F.scaled_dot_product_attention(
            q4, kv[0], kv[1], scale=sc, enable_gqa=True) for kv in dense])
        want_bf16 = triton_kv.reference(q.float().cpu(), kb.float().cpu(), vb.float().cpu(), sc)
        got = F.scaled_dot_product_attention(q4, kb, vb, scale=sc, enable_gqa=True)[:, :, 0]
        err_sdpa = ((got.double().cpu() - want_bf16).norm() / want_bf16.norm()).item()
        bf16_bytes = 2 * kb.numel() * 2
        del dense
        for bits, g in (ROWS[:2] if args.quick else ROWS):
            st, kd, vd = store(k[:, :, :t], v[:, :, :t], bits, g)
            kr, vr = kb[:, :, t:], vb[:, :, t:]
            held = sum(x.numel() * x.element_size() for x in st) + 2 * kr.numel() * 2
            sts = [[x.clone() for x in st] for _ in range(copies(held))]
            triton_kv.TUNE.update(tune.get(g, tune.get(64, default)))
            us = graph_time_us([lambda s=s: triton_kv.kv_attention(q, s, bits, g, sc, kr, vr)
                                for s in sts])
            kern = graph_time_us([lambda s=s: triton_kv.kv_attention_parts(q, *s, bits, g, sc)
                                  for s in sts])
            mma = triton_kv_mma.ineligibility(bits, D, g, min(g, D), HQ // HKV) is None
            extra = {}
            if mma:  # the same call with the previous kernel, and the mma kernel's part alone
                triton_kv_mma.ENABLED = False
                extra["previous_kernel_us"] = graph_time_us(
                    [lambda s=s, q=q, g=g, kr=kr, vr=vr: triton_kv.kv_attention(
                        q, s, 4, g, sc, kr, vr) for s in sts])
                triton_kv_mma.ENABLED = True
                extra["mma_kernel_only_us"] = graph_time_us(
                    [lambda s=s, q=q, g=g: triton_kv_mma.packed_parts(q, s, g, sc) for s in sts])
                extra["mma_splits"] = triton_kv_mma.packed_parts(q, st, g, sc)[0].shape[2]
            out = triton_kv.kv_attention(q, st, bits, g, sc, kr, vr)
            want = triton_kv.reference(q.float().cpu(), torch.cat([kd, kr.float()], 2).cpu(),
                                       torch.cat([vd, vr.float()], 2).cpu(), sc)
            err = ((out.double().cpu() - want).norm() / want.norm()).item()
            gbs = sum(x.nbytes for x in st) / kern / 1e3
            new = triton_kv.uses_new_kernel(bits, D, g, min(g, D))
            new = "mma" if mma else ("new" if new else "legacy")
            row = {"context": ctx, "bits": bits, "group": g, "tune": dict(triton_kv.TUNE),
                   "whole_call_kernel": new,
                   "sdpa_bf16_us": sdpa,
                   "memfit_us": us, "memfit_kernel_only_us": kern, "x_sdpa": sdpa / us,
                   "kernel_GBps": gbs, "bf16_bytes": bf16_bytes, "memfit_bytes": held,
                   "memory_x_less": bf16_bytes / held, "rel_err_vs_f64": err,
                   "sdpa_rel_err_vs_f64": err_sdpa, "mma": mma} | extra
            rows.append(row)
            print(f"ctx {ctx} int{bits} g{g}: SDPA bf16 {sdpa:.1f} us, memfit "
                  f"({new}) {us:.1f} us "
                  f"(kernel alone {kern:.1f}, {gbs:.0f} GB/s) = {sdpa / us:.2f}x; "
                  f"KV bytes {bf16_bytes / 2**20:.1f} "
                  f"-> {held / 2**20:.1f} MiB ({bf16_bytes / held:.2f}x less); rel err {err:.1e} "
                  f"(SDPA {err_sdpa:.1e}) {extra if mma else ''}", flush=True)
            del sts
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"head": head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
