"""GGUF export beyond Llama (memfit.io.gguf_families): Qwen2 (q/k/v biases), Qwen3 (q/k norms,
a head_dim that is not hidden / heads), Phi-3 (fused qkv and gate/up, partial rotary), Gemma 2
(norms stored as 1 + w, soft-capping, sliding window) and the mixtures of experts Mixtral (llama.cpp's `llama`
with experts), Qwen2-MoE (a shared expert and its gate) and Qwen3-MoE. Each tiny model is
written as F32 and read back through memfit's GGUF loader, which must give the model's logits
exactly (names, stacking, metadata and rotary layout all right); packed experts on a GGUF block
grid keep their codes inside the stacked tensor; what llama.cpp would compute differently is
refused with nothing written."""

import numpy as np
import pytest
import torch

from memfit.errors import UserError
from memfit.io.export_gguf import export_gguf
from memfit.models import load_model
from memfit.moe import unfuse_experts_

VOCAB = 512  # a byte-level BPE tokenizer trained here: the files carry it (a 49k one is slow)
FAMILIES = {
    "qwen2": {},
    "qwen3": {"head_dim": 32},  # not hidden / heads = 16: the file must say so
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "head_dim": 16, "norm_topk_prob": True},
    "phi3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5}},
    "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16,
               "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
    "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16,
                    "num_hidden_layers": 6,  # five sliding layers, then a full one
                    "rope_parameters": {
                        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}},
}
ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "llama", "qwen2_moe": "qwen2moe",
        "qwen3_moe": "qwen3moe", "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3"}


@pytest.fixture(scope="module")
def bpe():
    from pydoc_data.topics import topics

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(list(topics.values())[:40], vocab_size=VOCAB, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")
    assert len(fast) == VOCAB
    return fast


def _tiny(tiny_config, family, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(family, **{"vocab_size": VOCAB, **FAMILIES.get(family, {}), **kw})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # spread the router's logits: every expert gets tokens
        for p in model.parameters():
            p.normal_(0, 0.2)
    unfuse_experts_(model)
    return model


def _field(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]].tolist()[0] if f.types[0].name != "STRING" else \
        bytes(f.parts[f.data[0]]).decode()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_f32_file_reads_back_as_the_same_function(family, tiny_config, bpe, tmp_path,
                                                  monkeypatch):
    import gguf

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    model = _tiny(tiny_config, family)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    path = export_gguf(model, tmp_path / f"{family}.gguf", "F32", tokenizer=bpe)
    reader = gguf.GGUFReader(str(path))
    arch = ARCH[family]
    assert _field(reader, "general.architecture") == arch
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # GGUF order
    if "experts" in str(model):
        assert _field(reader, f"{arch}.expert_count") == 4
        assert _field(reader, f"{arch}.expert_used_count") == 2
        inter = getattr(model.config, "moe_intermediate_size", None) or \
            model.config.intermediate_size
        assert shapes["blk.1.ffn_gate_exps.weight"] == (64, inter, 4)  # (in, out, experts)
        assert shapes["blk.1.ffn_down_exps.weight"] == (inter, 64, 4)
        assert shapes["blk.0.ffn_gate_inp.weight"] == (64, 4)
    if family == "qwen2_moe":
        assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (64,)
        assert shapes["blk.0.ffn_up_shexp.weight"] == (64, 48)
    if family.startswith("qwen3"):
        assert _field(reader, f"{arch}.attention.key_length") == model.config.head_dim
        assert "blk.0.attn_k_norm.weight" in shapes
    if family.startswith("qwen2"):
        assert "blk.0.attn_q.bias" in shapes
    back = load_model(str(path), dtype="float32", need_tokenizer=False)  # none: not a BPE one
    assert type(back.model).__name__ == type(model).__name__
    with torch.no_grad():
        got = back.model(ids).logits
    diff = (got - ref).abs().max().item()
    print(f"{family}: max |logit difference| {diff:.2e}")
    assert diff < 1e-5


def test_packed_experts_keep_their_codes_in_the_stacked_tensor(tiny_config, bpe, tmp_path,
                                                                 monkeypatch, capsys):
    """Qwen3-MoE with every matrix int4 symmetric g32 (GGUF's Q4_0 grid), experts included:
    --exact holds; each expert's slice of blk.N.ffn_*_exps decodes to memfit's weight bit for
    bit; the file loads back as memfit's function."""
    import gguf

    from memfit.api import compress_
    from memfit.configs import RTN
    from memfit.formats.grid import IntFormat
    from memfit.recipe import Recipe

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    model = _tiny(tiny_config, "qwen3_moe")
    fmt = IntFormat(bits=4, group_size=32, symmetric=True)
    compress_(model, Recipe(quant=RTN(format=fmt), embeddings=fmt, head=fmt), None,
              progress=False)
    path = export_gguf(model, tmp_path / "q.gguf", "Q4_0", tokenizer=bpe, exact=True)
    err = capsys.readouterr().err
    n = 2 * (4 + 3) + 2  # per block q k v o + 3 expert stacks; embeddings, head
    assert f"{n} of {n} matrices keep memfit's codes" in err
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    stack = tensors["blk.1.ffn_down_exps.weight"]
    assert stack.tensor_type.name == "Q4_0"
    back = gguf.quants.dequantize(np.asarray(stack.data), stack.tensor_type)
    assert back.shape == (4, 64, 32)
    for e in range(4):
        mine = model.get_submodule(f"model.layers.1.mlp.experts.{e}.down_proj").dequantize()
        assert torch.equal(torch.from_numpy(back[e]), mine.float()), e
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"  # the router
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    loaded = load_model(str(path), dtype="float32")
    with torch.no_grad():
        diff = (loaded.model(ids).logits - model(ids).logits).abs().max().item()
    print(f"Q4_0 qwen3_moe: max |logit difference| {diff:.2e}")
    assert diff < 1e-4


def test_rows_that_are_not_whole_blocks_are_stored_as_f16(tiny_config, tmp_path, capsys):
    """Qwen2-MoE's 48-wide shared expert cannot be Q8_0 blocks of 32: F16, as llama.cpp does."""
    import gguf

    path = export_gguf(_tiny(tiny_config, "qwen2_moe"), tmp_path / "m.gguf", "Q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down_shexp.weight"] == "F16"
    assert types["blk.0.ffn_up_shexp.weight"] == types["blk.0.ffn_gate_exps.weight"] == "Q8_0"
    assert "2 of 22 matrices stored as F16 (rows not whole blocks of Q8_0)" in \
        capsys.readouterr().err


def test_a_sliding_window_llama_cpp_ignores_is_said(tiny_config, tmp_path, capsys):
    """llama.cpp's phi3 attends to the whole context (checked with llama-cpp-python 0.3.36: its
    logits leave the model's at the window's first position past 16 tokens)."""
    export_gguf(_tiny(tiny_config, "phi3", sliding_window=16), tmp_path / "m.gguf", "F32")
    assert "beyond 16 tokens it computes another function" in capsys.readouterr().err
    export_gguf(_tiny(tiny_config, "phi3"), tmp_path / "n.gguf", "F32")
    assert "sliding window" not in capsys.readouterr().err
    qwen = _tiny(tiny_config, "qwen2", use_sliding_window=True, sliding_window=16,
                 max_window_layers=1)  # block 1 slides
    export_gguf(qwen, tmp_path / "q.gguf", "F32")
    assert "llama.cpp's qwen2 attends to the whole context" in capsys.readouterr().err
    export_gguf(_tiny(tiny_config, "qwen2"), tmp_path / "r.gguf", "F32")
    assert "sliding window" not in capsys.readouterr().err


def test_llama3_rope_scaling_is_written_as_rope_freqs(tiny_config, tmp_path):
    import gguf

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    model = _tiny(tiny_config, "llama", vocab_size=30522, rope_parameters=rope)
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    t = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["rope_freqs.weight"]
    freqs = np.asarray(t.data)
    assert freqs.shape == (8,)  # head_dim 16 / 2
    # high frequencies (wavelength < 256 / 4) unscaled, the lowest divided by the factor 8,
    # the ones between smoothly in between
    assert freqs[0] == 1.0 and freqs[-1] == pytest.approx(8.0)
    assert np.all(np.diff(freqs) >= 0) and np.any((freqs > 1.0) & (freqs < 8.0))


@pytest.mark.parametrize("family, kw, match", [
    ("qwen2_moe", {"mlp_only_layers": [1]}, "dense MLP blocks"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob=False"),
    ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob=True"),
    ("llama", {"attention_bias": True}, "bias in model.layers.0.self_attn.q_proj"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
     "rope scaling 'yarn'"),
    ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256"),
    ("gemma2", {"query_pre_attn_scalar": 32, "tie_word_embeddings": False}, "untied head"),
])
def test_what_llama_cpp_would_compute_differently_is_refused(family, kw, match, tiny_config,
                                                             tmp_path):
    model = _tiny(tiny_config, family, vocab_size=30522, **kw)
    with pytest.raises(UserError, match=match):
        export_gguf(model, tmp_path / "m.gguf", "Q8_0")
    assert not list(tmp_path.iterdir())


def test_cli_exports_a_mixture_of_experts_folder(tiny_config, bpe, tmp_path, capsys):
    from memfit.cli import main

    src = tmp_path / "moe"
    _tiny(tiny_config, "mixtral").save_pretrained(src)
    bpe.save_pretrained(src)
    out = tmp_path / "m.gguf"
    assert main(["export", str(src), "--format", "gguf", "--type", "Q4_0", "--out",
                 str(out)]) == 0
    import gguf
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.1.ffn_up_exps.weight"] == "Q4_0"
    said = capsys.readouterr().out
    assert "GGUF Q4_0" in said and "loads with llama.cpp and memfit)" in said


def _write(path, model, bpe, rename):
    """A GGUF of `model` with memfit's tensors passed through `rename(name, data) -> [(name,
    data)]`: files laid out as other writers lay them out."""
    import gguf

    from memfit.io import gguf_families
    from memfit.io.export_gguf import Notes, _tensors, _tokenizer_metadata

    fam = gguf_families.FAMILIES[model.config.model_type]
    writer = gguf.GGUFWriter(str(path), fam.arch)
    gguf_families.metadata(writer, model.config, fam)
    _tokenizer_metadata(writer, bpe)
    for name, data, raw in _tensors(model, gguf.GGMLQuantizationType.F32, Notes()):
        for n, d in rename(name, data):
            writer.add_tensor(n, d, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("layout", ["first_mixtral", "converter_shared_gate"])
def test_other_writers_layouts_read_back(layout, tiny_config, bpe, tmp_path, monkeypatch):
    """llama.cpp's Mixtral files from before April 2024 hold `blk.N.ffn_gate.E.weight` per
    expert; llama.cpp's converter writes Qwen2-MoE's shared-expert gate (1, hidden) where
    transformers' reader expects a vector. memfit's loader reads both as the model."""
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    family = "mixtral" if layout == "first_mixtral" else "qwen2_moe"
    model = _tiny(tiny_config, family)
    changed = []

    def rename(name, data):
        if layout == "first_mixtral" and "_exps." in name:  # experts first
            changed.append(name)
            return [(name.replace("_exps.", f".{e}."), one) for e, one in enumerate(data)]
        if layout == "converter_shared_gate" and "ffn_gate_inp_shexp" in name:
            changed.append(name)
            return [(name, data.reshape(1, -1))]
        return [(name, data)]

    _write(tmp_path / "other.gguf", model, bpe, rename)
    assert len(changed) == (2 * 3 if layout == "first_mixtral" else 2)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    back = load_model(str(tmp_path / "other.gguf"), dtype="float32")
    with torch.no_grad():
        diff = (back.model(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-5
