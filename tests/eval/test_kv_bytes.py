"""inspect's KV-cache bytes equal the bytes of the cache transformers really builds."""

import pytest
import torch

from memfit.eval.memory import inspect_model
from memfit.kvcache import cache_kwarg


def _storage_bytes(cache) -> int:
    """Bytes of the storages the cache's tensors keep alive (a view keeps its whole base)."""
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {}),
    ("gemma3_text", dict(num_hidden_layers=5, head_dim=16, sliding_window=16,
                         layer_types=["sliding_attention"] * 2 + ["full_attention"]
                         + ["sliding_attention", "full_attention"])),
    ("mistral", dict(sliding_window=16)),
])
def test_inspect_kv_bytes_equal_the_real_cache(tiny_config, model_type, extra):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **extra)).eval()
    ids = torch.randint(0, 30522, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    info = inspect_model(model, context=64, batch=2)
    real = _cache_bytes(cache)
    print(model_type, "inspect", info["kv_bytes"], "real", real)
    assert info["kv_bytes"] == real
    if model_type != "llama":  # windowed layers hold less than the whole context
        assert info["kv_bytes"] < info["kv_bytes_per_token"] * 64 * 2
    # right after the prefill, the storages alive are the whole prompt's on every layer
    assert info["kv_prefill_peak_bytes"] == _storage_bytes(cache) == info["kv_bytes_per_token"] * 64 * 2
    with torch.no_grad():
        model(input_ids=ids[:, :1], use_cache=True, **{cache_kwarg(model): cache})
    if model_type != "llama":  # one decode step later the windowed layers let go of the prompt
        assert _storage_bytes(cache) < info["kv_prefill_peak_bytes"]


def _layer_types_5_17(config):
    """transformers 5.17's reading of a config: layer types, one kwargs dict for every windowed
    layer, and the layers that reuse another's KV cache left off the end."""
    types = list(getattr(config, "layer_types", None) or
                 ["sliding_attention" if getattr(config, "sliding_window", None) else
                  "full_attention"] * config.num_hidden_layers)
    shared = getattr(config, "num_kv_shared_layers", 0) or 0
    types = types[:-shared] if shared else types
    kwargs = {"sliding_window": config.sliding_window} if "sliding_attention" in types else {}
    return types, kwargs


@pytest.mark.parametrize("model_type,extra,expect", [
    ("llama", {}, [64] * 2),
    ("gemma3_text", dict(num_hidden_layers=5, head_dim=16, sliding_window=16,
                         layer_types=["sliding_attention"] * 2 + ["full_attention"]
                         + ["sliding_attention", "full_attention"]), [15, 15, 64, 15, 64]),
    ("mistral", dict(sliding_window=16), [15] * 2),
])
def test_cached_tokens_reads_older_transformers_alike(tiny_config, monkeypatch, model_type, extra,
                                                      expect):
    """The first H200 run of `--place` failed on transformers 5.17 (IndexError): its
    get_layer_types_and_kwargs returns one dict, not one per layer. Both shapes give the same
    tokens per layer; layers 5.17 leaves off (KV shared) hold none."""
    import transformers.cache_utils as cu

    from memfit.eval.memory import cached_tokens

    cfg = tiny_config(model_type, **extra)
    assert cached_tokens(cfg, 64) == expect  # this transformers
    monkeypatch.setattr(cu, "get_layer_types_and_kwargs", _layer_types_5_17)
    assert cached_tokens(cfg, 64) == expect
    cfg.num_kv_shared_layers = 1  # the last layer reads another's cache
    assert cached_tokens(cfg, 64) == expect[:-1] + [0]
