"""memfit.decode.greedy_static (static KV cache, one CUDA graph per step on CUDA) gives the same
greedy tokens as transformers' `generate` with its dynamic cache: eagerly on the CPU (what CI
runs), and with graph capture and replay on a GPU."""

import pytest
import torch

from memfit.decode import greedy_static


def _tiny(tiny_config, device):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval().to(device)


def _reference(model, ids, new):
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("batch,prompt,new", [(1, 5, 9), (3, 11, 6), (2, 4, 1)])
def test_static_loop_matches_generate_on_cpu(tiny_config, batch, prompt, new):
    model = _tiny(tiny_config, "cpu")
    ids = torch.randint(0, 30000, (batch, prompt), generator=torch.Generator().manual_seed(prompt))
    got = greedy_static(model, ids, new, graph=False)
    assert torch.equal(got, _reference(model, ids, new))


def test_static_loop_stops_at_eos_and_streams(tiny_config):
    model = _tiny(tiny_config, "cpu")
    ids = torch.randint(0, 30000, (1, 6), generator=torch.Generator().manual_seed(1))
    full = greedy_static(model, ids, 8, graph=False)
    seen = []
    got = greedy_static(model, ids, 8, graph=False, eos_token_id=int(full[0, 3]),
                        on_token=lambda t: seen.append(int(t[0])))
    first = int((full[0] == full[0, 3]).nonzero()[0])  # the eos id may occur before index 3
    assert got.tolist() == [full[0, :first + 1].tolist()] and seen == got[0].tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("batch", [1, 4])
def test_graph_loop_matches_generate_on_gpu(tiny_config, batch):
    model = _tiny(tiny_config, "cuda")
    ids = torch.randint(0, 30000, (batch, 9), generator=torch.Generator().manual_seed(batch)).cuda()
    timings = {}
    got = greedy_static(model, ids, 20, graph=True, timings=timings)
    assert torch.equal(got, _reference(model, ids, 20))
    assert timings["steps"] == 19


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["falcon", "opt"])
def test_a_step_that_cannot_be_captured_decodes_without_a_graph(tiny_config, family):
    """Falcon's forward copies a CPU tensor to the GPU, which a CUDA graph capture refuses:
    the loop warns and goes on eagerly, with the same tokens as transformers' `generate`."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    kw = {"new_decoder_architecture": True, "num_kv_heads": 2} if family == "falcon" else \
        {"ffn_dim": 128, "word_embed_proj_dim": 64}
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw)).eval().cuda()
    ids = torch.randint(5, 30000, (1, 9), generator=torch.Generator().manual_seed(3)).cuda()
    got = greedy_static(model, ids, 12, graph=True)
    assert torch.equal(got, _reference(model, ids, 12))


def test_generate_text_of_the_static_loop_equals_generates(tiny_llama):
    """memfit generate's CUDA path (`_generate_static`, run here on the CPU without a graph)
    streams the same text as the transformers `generate` path it replaces."""
    from memfit.generate import _generate_static, build_prompt, generate

    model, tok = tiny_llama.model, tiny_llama.tokenizer
    want = generate(model, tok, "hello there", max_new_tokens=12, stream=lambda s: None)
    enc = tok(build_prompt(tok, "hello there"), return_tensors="pt", return_token_type_ids=False)
    pieces = []
    got = _generate_static(model, tok, enc["input_ids"], 12, pieces.append)
    assert got == want and "".join(pieces) == got
