"""The routed int4 experts kernel's multiply-add form (memfit.kernels.triton_moe.FMA_ROWS) on one
GPU: a random-weight Mixtral-8x7B-shaped model (benchmarks/moe_decode.py's `build`), decode
tokens/s at batch 1 in memfit's CUDA-graph decode loop for bf16 routed experts, int4 g128 with
the shipped FMA_ROWS and with 0 (tensor cores always), then one layer's gate and down calls
alone for 1, 2 and 4 routed rows, each form and two launch shapes (µs a call in a CUDA graph).

    python benchmarks/moe_fma_rows.py [--json OUT]       # session 32's runs, in one script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import memfit.kernels.triton_moe as tm
    from benchmarks.moe_decode import build, graph_us, loop_tps, to_int4
    from memfit.moe import unfuse_experts_

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    shipped = tm.FMA_ROWS
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "fma_rows": shipped}
    m = build(32)
    unfuse_experts_(m)
    os.environ["MEMFIT_MOE_ROUTED"] = "1"
    out["bf16_routed_graph_tps"] = [loop_tps(m, 32) for _ in range(2)]
    to_int4(m)
    out["int4_routed_graph_tps"] = [loop_tps(m, 32) for _ in range(2)]
    tm.FMA_ROWS = 0
    out["int4_routed_graph_tps_fma0"] = [loop_tps(m, 32)]
    print(json.dumps(out), flush=True)
    ex = m.model.layers[0].mlp.experts
    gate, _, down = ex._tables
    for r in (1, 2, 4):
        ids = torch.arange(r, device="cuda", dtype=torch.int32) % ex.num_experts
        x = torch.randn(r, gate.shape[1], device="cuda", dtype=torch.bfloat16)
        h = torch.randn(r, down.shape[1], device="cuda", dtype=torch.bfloat16)
        for bn, w in ((64, 4), (128, 4)):
            tm.BN_ROWS, tm.WARPS = bn, w
            for fma in (0, 4):
                tm.FMA_ROWS = fma
                out[f"gate_r{r}_fma{fma}_bn{bn}_us"] = graph_us(
                    lambda x=x, ids=ids: tm.moe_linear(x, ids, gate))
                out[f"down_r{r}_fma{fma}_bn{bn}_us"] = graph_us(
                    lambda h=h, ids=ids: tm.moe_linear(h, ids, down))
    tm.FMA_ROWS, tm.BN_ROWS, tm.WARPS = shipped, 64, 4
    print(json.dumps(out), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
