"""2:4 SparseLinear on CUDA runs through cuSPARSELt's semi-structured matmul (GPU only)."""

import pytest
import torch

from memfit.formats.sparse import SparseLinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_semi_structured_path_matches_dense(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256, bias=True)
    with torch.no_grad():
        mask = torch.tensor([1, 0, 1, 0], dtype=torch.bool).repeat(256, 128)
        lin.weight.mul_(mask)
    m = SparseLinear.from_linear(lin, "2:4").cuda()
    x = torch.randn(64, 512, device="cuda", dtype=dtype)
    want = torch.nn.functional.linear(x.float(), lin.weight.cuda(), lin.bias.cuda())
    with torch.inference_mode():
        got = m(x)
    assert m.cache_nbytes() > 0  # the cuSPARSELt copy was built and used
    assert got.dtype == dtype
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
