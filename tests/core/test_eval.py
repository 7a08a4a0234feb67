import math

import torch

from memfit.eval.lm import evaluate_lm
from memfit.eval.memory import inspect_model, kv_bytes_per_token, weight_table


def _wins(n=3, t=48, vocab=30522, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_perplexity_matches_plain_transformers_loss(tiny_llama):
    m = tiny_llama.model
    w = _wins()
    res = evaluate_lm(m, w, progress=False, chunk=7)  # odd chunk exercises the streaming path
    with torch.no_grad():
        losses = [m(w[i:i + 1], labels=w[i:i + 1]).loss.item() for i in range(len(w))]
    assert res["tokens"] == 3 * 47 and res["windows"] == 3 and res["seq_len"] == 48
    assert math.isclose(res["nll"], sum(losses) / 3, rel_tol=1e-5), (res["nll"], losses)
    assert math.isclose(res["perplexity"], math.exp(res["nll"]), rel_tol=1e-9)


def test_kld_self_zero_and_perturbed_positive(tiny_llama, save_tiny, tmp_path):
    from memfit.models import load_model
    m = tiny_llama.model
    w = _wins()
    same = evaluate_lm(m, w, ref=m, progress=False, batch_size=2)
    assert same["kld"] == 0.0 and same["top1_agreement"] == 1.0
    other = load_model(str(save_tiny(tmp_path / "other", seed=1))).model
    diff = evaluate_lm(other, w, ref=m, progress=False, chunk=16)
    assert diff["kld"] > 0.01 and diff["top1_agreement"] < 0.5
    assert math.isclose(diff["ref_perplexity"], same["perplexity"], rel_tol=1e-5)


def test_weight_bytes_equal_tensor_bytes(tiny_llama):
    m = tiny_llama.model
    table = weight_table(m)
    seen, expected = set(), 0
    for t in m.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            expected += t.numel() * t.element_size()
    assert table["weight_bytes"] == expected
    assert sum(r["bytes"] for r in table["rows"]) == expected
    assert table["parameters"] == sum(p.numel() for p in m.parameters())


def test_kv_bytes_gqa(tiny_config):
    cfg = tiny_config("llama")  # 2 layers, 2 KV heads of 16
    assert kv_bytes_per_token(cfg, torch.float16) == 2 * 2 * 2 * 16 * 2
    cfg4 = tiny_config("llama", num_key_value_heads=4)
    assert kv_bytes_per_token(cfg4, torch.float16) == 2 * kv_bytes_per_token(cfg, torch.float16)


def test_inspect_scales_with_context(tiny_llama):
    a = inspect_model(tiny_llama.model, context=100, batch=1)
    b = inspect_model(tiny_llama.model, context=200, batch=2)
    assert b["kv_bytes"] == 4 * a["kv_bytes"] == 4 * 100 * a["kv_bytes_per_token"]
    assert b["activation_bytes_estimate"] > a["activation_bytes_estimate"]


def test_inspect_counts_the_cpu_kernel_layouts_packed_linears_keep(tiny_llama_dir):
    """On the CPU a packed linear keeps torch's kernel layout beside its stored bytes after its
    first forward; inspect left it out of its total (for the default model at w4g64, ~50 MB)."""
    from memfit.api import compress_
    from memfit.models import load_model

    m = load_model(str(tiny_llama_dir)).model
    assert inspect_model(m, context=64)["cpu_layout_bytes"] == 0
    compress_(m, "w4g64", progress=False)
    info = inspect_model(m, context=64)
    with torch.inference_mode():
        m(torch.randint(0, 100, (1, 1)))
    kept = sum(q.cache_nbytes() for q in m.modules() if hasattr(q, "cache_nbytes"))
    assert info["cpu_layout_bytes"] == kept > 0
    assert info["total_bytes_estimate"] == (info["weight_bytes"] + kept + info["kv_bytes"]
                                            + info["activation_bytes_estimate"])
