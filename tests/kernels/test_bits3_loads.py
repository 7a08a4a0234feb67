"""benchmarks/bits3_loads.py's experiment kernels (ways of reading 3-bit codes) give memfit's
dequantized weight exactly and its product within float32 rounding, so a GPU call timing them
times correct kernels. Runs in Triton's interpreter on a CPU (tests/conftest.py)."""

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import bits3_loads as b  # noqa: E402
from memfit.kernels import triton_dequant  # noqa: E402
from memfit.kernels.packing import pack  # noqa: E402
from memfit.kernels.weights import IntWeight  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def weight(n=40, k=384, group=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 8, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).half()
    zero = pack(torch.randint(0, 8, (n, k // group), generator=g, dtype=torch.uint8), 3)
    return IntWeight(pack(codes, 3).to(DEV), scale.to(DEV), zero.to(DEV), (n, k), 3, group, "int")


def test_every_read_gives_the_dequantized_weight_and_the_product():
    w = weight()
    ref = triton_dequant.dequantize_triton(w, torch.float32)
    x = torch.randn(384, generator=torch.Generator().manual_seed(1)).to(DEV)
    want = ref @ x
    out, y = torch.empty_like(ref), torch.empty(40, device=DEV)
    for mode in (b.PLANES, b.LANES, b.WORDS):
        out.zero_()
        assert torch.equal(b.dequant(w, out, mode, True, 16, 128, mode == b.WORDS), ref), mode
        y = b.gemv(w, x, y, mode, 16, 128, 2)
        assert (y - want).abs().max() <= 1e-5 * want.abs().max(), mode

