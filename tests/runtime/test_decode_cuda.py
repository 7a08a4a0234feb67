"""CUDA-graph greedy decoding equals transformers' eager greedy decoding (GPU only)."""

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "int4"])
def test_graph_decode_matches_generate(tiny_config, packed):
    from transformers import AutoModelForCausalLM

    from memfit.decode import greedy_cuda_graph
    from memfit.formats import grid
    from memfit.formats.grid import IntFormat
    from memfit.formats.quant_linear import QuantLinear

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    if packed:
        fmt = IntFormat(bits=4, group_size=32)
        for layer in m.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if isinstance(lin, torch.nn.Linear):
                        w = lin.weight.detach()
                        s, z = grid.round_params(*grid.minmax_params(w, fmt), fmt)
                        setattr(parent, name, QuantLinear.from_linear(
                            lin, grid.quantize(w, s, z, fmt), s, z, fmt))
    m = m.cuda().to(torch.float32)
    ids = torch.randint(3, 30000, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.inference_mode():
        want = m.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=0)[:, 12:]
        got = greedy_cuda_graph(m, ids, 12)
    assert torch.equal(got, want)
