import os

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from memfit.archs import ARCHS, arch_for, block_list, kv_shape
from memfit.errors import UserError
from memfit.models import load_model, resolve

FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16}, "gemma3_text": {"head_dim": 16},
    "phi": {}, "phi3": {}, "gpt_neox": {},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4},
    "granite": {}, "stablelm": {}, "olmo2": {}, "starcoder2": {}, "cohere": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_decoder_families_expose_blocks_and_groups(model_type, tiny_config):
    cfg = tiny_config(model_type, **FAMILIES[model_type])
    model = AutoModelForCausalLM.from_config(cfg)
    arch = arch_for(cfg)
    blocks = block_list(model, arch)
    assert len(blocks) == 2
    for group in arch.groups:
        for name in group:
            mod = blocks[0].get_submodule(name)
            assert hasattr(mod, "weight") and mod.weight.ndim == 2, (model_type, name)
    layers, kv_heads, head_dim = kv_shape(cfg)
    assert layers == 2 and kv_heads in (2, 4) and head_dim == 16


@pytest.mark.parametrize("model_type", ["bert", "roberta", "mpnet", "distilbert", "deberta-v2",
                                        "modernbert", "nomic_bert"])
def test_encoder_family_groups(tiny_config, model_type):
    cfg = tiny_config(model_type, num_key_value_heads=None)
    model = AutoModel.from_config(cfg)
    arch = arch_for(cfg)
    assert arch.kind == "encoder"
    blocks = block_list(model, arch)
    for group in arch.groups:
        for name in group:
            assert isinstance(blocks[1].get_submodule(name), torch.nn.Linear)


def test_tiny_folder_loads_with_dtype(tiny_llama_dir):
    m = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert m.kind == "decoder" and next(m.model.parameters()).dtype == torch.bfloat16
    assert not m.model.training


def test_bad_specs_name_the_problem(tmp_path, tiny_llama_dir):
    with pytest.raises(UserError, match="does not exist"):
        resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no model"):
        resolve(str(tmp_path / "empty"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(UserError, match="wrong magic"):
        resolve(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        resolve("./missing.gguf")


def test_truncated_safetensors_is_refused(tmp_path, tiny_llama_dir):
    import shutil
    d = tmp_path / "trunc"
    shutil.copytree(tiny_llama_dir, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_model(str(d))


def test_unknown_architecture(tmp_path, tiny_config):
    from transformers import AutoConfig
    cfg = AutoConfig.for_model("t5", vocab_size=100, d_model=32, num_layers=1)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unknown architecture 't5'"):
        load_model(str(tmp_path))
    assert "t5" not in ARCHS


def test_offline_hub_id_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load_model("someorg/some-model-that-is-not-cached")
    assert "\n" not in str(e.value) and "cannot be reached (or HF_HUB_OFFLINE" in str(e.value)


def test_an_unreachable_hub_is_probed_once_then_read_from_the_cache(monkeypatch):
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    from memfit.io.checkpoint import offline_unless_hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test
    tried = []

    def no_network(address, timeout=None):
        tried.append(address)
        raise OSError("Name or service not known")
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(UserError, match="is not a local folder or file, and the hub") as e:
        load_model("someorg/some-model-that-is-not-cached")
    assert "\n" not in str(e.value)
    # one probe, then the cache only: no ~25 s of huggingface_hub's retries and warnings
    assert tried == [(urlparse(constants.ENDPOINT).hostname, 443)] and constants.HF_HUB_OFFLINE
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # behind a proxy: no probe
    offline_unless_hub_reachable()
    assert len(tried) == 1 and not constants.HF_HUB_OFFLINE


def _bare_copy(src, dst):
    """`src`'s config and weights without its tokenizer files."""
    import shutil
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith(
                ("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, dst / f.name)
    return dst


def test_a_decoder_without_tokenizer_loads_only_where_no_text_is_read(tmp_path, tiny_llama_dir,
                                                                       capsys):
    from memfit.cli.main import main
    from memfit.io.save import save

    bare = _bare_copy(tiny_llama_dir, tmp_path / "bare")
    packed = tmp_path / "packed"  # a memfit folder written without a tokenizer
    save(load_model(str(bare), need_tokenizer=False).model, None, packed, recipe={})
    for folder in (bare, packed):
        with pytest.raises(UserError, match="has no tokenizer") as e:
            load_model(str(folder))
        assert "\n" not in str(e.value) and "save_pretrained" in str(e.value)
        m = load_model(str(folder), need_tokenizer=False)
        assert m.tokenizer is None and m.kind == "decoder"
        assert main(["inspect", str(folder)]) == 0
        assert "KV cache" in capsys.readouterr().out
        compress = ["compress", str(folder), "--recipe", "w8", "--out", str(tmp_path / "o")]
        for argv in (["eval", str(folder)], ["generate", str(folder), "--max-new-tokens", "2"],
                     *([compress] if folder == bare else [])):  # a packed one is refused apart
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert "has no tokenizer" in err and "\n" not in err, err
        assert not (tmp_path / "o").exists()


def test_a_tokenizer_that_cannot_tokenize_is_refused(tmp_path, tiny_llama_dir):
    empty = _bare_copy(tiny_llama_dir, tmp_path / "empty")  # a config alone: no vocabulary
    (empty / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(UserError, match="turns text into no tokens"):
        load_model(str(empty))
    broken = _bare_copy(tiny_llama_dir, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="could not load the tokenizer of") as e:
        load_model(str(broken))
    assert "\n" not in str(e.value)
    assert load_model(str(broken), need_tokenizer=False).tokenizer is None  # inspect goes on
    assert len(load_model(str(tiny_llama_dir)).tokenizer) == 30522  # a whole one still loads


def test_packed_folders_with_a_broken_tokenizer_still_inspect(tmp_path, tiny_llama_dir, capsys):
    from memfit.api import compress_
    from memfit.cli.main import main
    from memfit.io.export_ct import is_memfit_ct, save_ct
    from memfit.io.save import save
    from memfit.recipe import Recipe

    m = load_model(str(tiny_llama_dir))
    recipe = Recipe.from_dict({"quant": {"algo": "rtn", "bits": 4, "group_size": 32}})
    compress_(m.model, recipe, None, progress=False)
    packed, ct = tmp_path / "packed", tmp_path / "ct"
    save(m.model, m.tokenizer, packed, recipe=recipe.to_dict())
    save_ct(m.model, m.tokenizer, ct, recipe=recipe.to_dict())
    assert is_memfit_ct(ct)  # read by memfit's own loader, as the memfit folder is
    for folder in (packed, ct):
        (folder / "tokenizer.json").write_text("{not json")
        with pytest.raises(UserError, match="could not load the tokenizer of") as e:
            load_model(str(folder))
        assert "\n" not in str(e.value)
        assert load_model(str(folder), need_tokenizer=False).tokenizer is None
        assert main(["inspect", str(folder)]) == 0
        assert "KV cache" in capsys.readouterr().out
        assert main(["eval", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert "could not load the tokenizer of" in err and "\n" not in err, err


def test_another_models_tokenizer_is_refused(tmp_path, save_tiny, capsys):
    from memfit.cli.main import main

    small = save_tiny(tmp_path / "small", vocab_size=256)  # carries a 30522-token tokenizer
    with pytest.raises(UserError, match="has 30522 tokens but the model's embedding has 256 rows"):
        load_model(str(small))
    assert main(["compress", str(small), "--recipe", "w8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "another model's tokenizer" in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()
    assert load_model(str(save_tiny(tmp_path / "wide", vocab_size=30600))).tokenizer.vocab_size \
        == 30522  # a table with spare rows (padded for speed) is fine
