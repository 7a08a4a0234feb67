"""memfit.stream (compress --low-memory): one block at a time from sharded safetensors gives the
normal path's folder byte for byte, holds far less memory, and refuses what it cannot stream."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memfit.compress import CompressOptions, compress_to
from memfit.errors import UserError

FAST = {"samples": 4, "seq_len": 64, "smoke_windows": 2, "smoke_seq_len": 64, "format": "memfit",
            "progress": False}


def save_sharded(path: Path, **kw) -> Path:
    """A random Llama written in several safetensors shards, with the embedded tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from memfit.models import resolve

    torch.manual_seed(0)
    cfg = {"vocab_size": 30522, "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102,
               "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 512}
    cfg.update(kw)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg)).eval()
    model.save_pretrained(path, max_shard_size="2MB")
    AutoTokenizer.from_pretrained(resolve("default-encoder")[1]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = save_sharded(tmp_path_factory.mktemp("stream") / "llama")
    assert len(list(path.glob("*.safetensors"))) > 3 and (path / "model.safetensors.index.json").exists()
    return path


@pytest.mark.parametrize("recipe", ["w4g64", "w4g64-gptq-e8"])
def test_streamed_folder_is_the_normal_one(sharded, tmp_path, recipe):
    normal = compress_to(str(sharded), recipe, tmp_path / "normal",
                         CompressOptions(low_memory=False, **FAST))
    streamed = compress_to(str(sharded), recipe, tmp_path / "stream",
                           CompressOptions(low_memory=True, **FAST))
    names = sorted(p.name for p in (tmp_path / "normal").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "stream").iterdir())
    for name in names:  # every tensor, memfit.json, config.json: the same bytes
        assert (tmp_path / "normal" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes(), name
    assert streamed["smoke"] == normal["smoke"] and streamed["low_memory"]
    for k in ("bytes_before", "bytes_after", "modules", "calib_windows"):
        assert streamed[k] == normal[k], k


def test_tied_head_streams_to_the_same_folder(tmp_path):
    """A tied head is not in the checkpoint: it is tied back to the embedding, and the folder
    records the tie as the normal path does."""
    src = save_sharded(tmp_path / "tied", num_hidden_layers=2, tie_word_embeddings=True)
    for low, out in ((False, "n"), (True, "s")):
        compress_to(str(src), "w4g64", tmp_path / out, CompressOptions(low_memory=low, **FAST))
    for name in ("model.safetensors", "memfit.json", "config.json"):
        assert (tmp_path / "n" / name).read_bytes() == (tmp_path / "s" / name).read_bytes(), name
    assert json.loads((tmp_path / "s" / "memfit.json").read_text())["tied"]


def test_streamed_folder_loads(sharded, tmp_path):
    from memfit.models import load_model

    compress_to(str(sharded), "w4g64", tmp_path / "out", CompressOptions(low_memory=True, **FAST))
    loaded = load_model(str(tmp_path / "out"))
    ids = torch.randint(0, 30000, (1, 16))
    with torch.inference_mode():
        assert torch.isfinite(loaded.model(input_ids=ids).logits).all()


@pytest.mark.parametrize("recipe,why", [("drop2", "structured pruning ranks every block"),
                                        ("wanda-50-owl", "OWL measures the outliers")])
def test_whole_model_recipes_are_refused(sharded, tmp_path, recipe, why):
    with pytest.raises(UserError, match=why):
        compress_to(str(sharded), recipe, tmp_path / "out", CompressOptions(low_memory=True, **FAST))
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_is_refused(sharded, tmp_path):
    with pytest.raises(UserError, match="memfit's format only"):
        compress_to(str(sharded), "w4g64", tmp_path / "out",
                    CompressOptions(low_memory=True, **{**FAST, "format": "compressed-tensors"}))


def test_auto_streams_when_the_weights_do_not_fit(sharded, monkeypatch):
    from memfit import stream

    monkeypatch.setattr("memfit.eval.memory.available_memory", lambda: 8 << 20)
    assert stream.should_stream(str(sharded), torch.float32)[0]
    monkeypatch.setattr("memfit.eval.memory.available_memory", lambda: 64 << 30)
    assert not stream.should_stream(str(sharded), torch.float32)[0]


def test_writer_is_safetensors_byte_for_byte(tmp_path):
    from safetensors.torch import save_file

    from memfit.io.stream import StreamWriter

    tensors = {"b.weight": torch.randn(3, 5).half(), "a": torch.randn(7), "z": torch.zeros(0),
               "codes": torch.randint(0, 255, (4, 9), dtype=torch.uint8),
               "s": torch.randn(2).bfloat16(), "i": torch.arange(5, dtype=torch.int32),
               "j": torch.arange(2), "m": torch.ones(3, dtype=torch.bool)}
    save_file(tensors, str(tmp_path / "ref.st"), metadata={"format": "pt"})
    w = StreamWriter(tmp_path / "data")
    for name in sorted(tensors, reverse=True):
        w.add(name, tensors[name])
    w.finish(tmp_path / "got.st", {"format": "pt"})
    assert (tmp_path / "got.st").read_bytes() == (tmp_path / "ref.st").read_bytes()
    assert not (tmp_path / "data").exists()


_MEASURE = """
import json, sys
from memfit.compress import CompressOptions, compress_to
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
import memfit.stream, memfit.api, transformers.models.llama.modeling_llama  # imports first
base, growth = hwm(), []
for src, out in zip(sys.argv[1::2], sys.argv[2::2]):
    compress_to(src, "w4g64", out, CompressOptions(low_memory=True, samples=4, seq_len=64,
                smoke_windows=2, smoke_seq_len=64, format="memfit", progress=False))
    growth.append(hwm() - base)
print(json.dumps(growth))
"""


def peak_growth(*runs: tuple[Path, Path]) -> list[int]:
    """VmHWM after each streamed compress (source, out) minus VmHWM after the imports, run one
    after the other in one fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [str(p) for run in runs for p in run]
    done = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_streamed_peak_does_not_grow_with_the_blocks(tmp_path):
    """Two models that differ only in depth (2 and 26 blocks of 3.9 MB fp32; both hold a 62.5 MB
    embedding and a 62.5 MB head), streamed one after the other in one process: the deep run
    raises the peak by less than two blocks + 16 MB over the shallow one (one block is held at a
    time) although its 24 extra blocks are 94 MB of weights (measured: 4.1-4.5 MB in 3 runs since
    the streamed compress holds glibc's mmap threshold, steady_malloc; before, 7-45 MB, the
    heap's fragmentation varying run to run); and its peak growth over the imports
    stays under the embedding and head + 3 blocks (one loaded, its replacement, the algorithm's
    copies) + 128 MB for what does not depend on the model's depth (the tokenizer, calibration
    text and windows, the smoke check's logits, the writer's copy buffer: 94 MB measured
    here)."""
    from memfit.io.stream import CheckpointIndex

    shape = {"hidden_size": 256, "intermediate_size": 1024}
    shallow = save_sharded(tmp_path / "a", num_hidden_layers=2, **shape)
    deep = save_sharded(tmp_path / "b", num_hidden_layers=26, **shape)
    weights = CheckpointIndex(deep).nbytes(torch.float32)
    block = (weights - CheckpointIndex(shallow).nbytes(torch.float32)) // 24
    outside = weights - 26 * block
    first, second = peak_growth((shallow, tmp_path / "sa"), (deep, tmp_path / "sb"))
    print(f"fp32 weights {weights / 1e6:.1f} MB (block {block / 1e6:.2f} MB, embedding and head "
          f"{outside / 1e6:.1f} MB); peak growth: 2 blocks {first / 1e6:.1f} MB, then 26 blocks "
          f"{second / 1e6:.1f} MB")
    assert second - first < 2 * block + (16 << 20)
    assert second < outside + 3 * block + (128 << 20)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_tensors_are_transformers_own(sharded, tmp_path, qtype):
    """memfit.io.stream.gguf_tensors (one tensor at a time, what the GGUF cache is converted
    with) gives the tensors of transformers' whole-file GGUF loader, bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from memfit.io.export_gguf import export_gguf
    from memfit.io.stream import gguf_tensors
    from memfit.models import load_model

    path = export_gguf(load_model(str(sharded)).model, tmp_path / "m.gguf", qtype)
    config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    got = dict(gguf_tensors(path, model))
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)


def test_cli_low_memory_on(sharded, tmp_path, capsys):
    from memfit.cli import main

    out = tmp_path / "cli"
    main(["compress", str(sharded), "--recipe", "w4g64", "--out", str(out), "--low-memory", "on",
          "--format", "memfit", "--samples", "4", "--seq-len", "64", "--json"])
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["low_memory"] and rep["format"] == "memfit" and (out / "memfit.json").exists()


def test_auto_falls_back_for_whole_model_recipes(sharded, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("memfit.eval.memory.available_memory", lambda: 8 << 20)
    rep = compress_to(str(sharded), "wanda-50-owl", tmp_path / "owl",
                      CompressOptions(**{**FAST, "progress": True}))
    assert "low_memory" not in rep
    assert "OWL measures" in capsys.readouterr().err


def test_failed_smoke_check_writes_nothing(sharded, tmp_path):
    from memfit.compress import SmokeCheckFailed

    with pytest.raises(SmokeCheckFailed, match="KLD"):
        compress_to(str(sharded), "w4g64", tmp_path / "out",
                    CompressOptions(low_memory=True, **{**FAST, "max_kld": 1e-9}))
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary data file


def test_gguf_conversion_racing_another_process_keeps_one_whole_copy(sharded, tmp_path,
                                                                     monkeypatch):
    """Two conversions of the same GGUF into the cache at once (CI's test workers, two commands
    started together) each write a folder of their own; the rename that comes second finds the
    winner's copy and returns it; no temporary folder is left. The two writers are held until
    both have written (a barrier), so the race happens on every run."""
    import threading

    from memfit.io import stream
    from memfit.io.export_gguf import export_gguf
    from memfit.models import load_model

    path = export_gguf(load_model(str(sharded)).model, tmp_path / "m.gguf", "F32")
    both = threading.Barrier(2, timeout=60)

    def write(path, model, tied, tmp, dtype, kw, reader):  # files, then wait for the other one
        (tmp / "config.json").write_text(json.dumps({"writer": threading.get_ident()}))
        both.wait()

    monkeypatch.setattr(stream, "_write_converted", write)
    out = tmp_path / "cache" / "m"
    got, errors = [], []

    def convert():
        try:
            got.append(stream.convert_gguf(path, out))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [out, out]
    writer = json.loads((out / "config.json").read_text())["writer"]
    assert writer in {t.ident for t in threads}
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # no .tmp- folder left


def test_a_killed_conversions_folder_is_removed_and_a_live_ones_kept(tmp_path):
    """A conversion killed outright (no `finally`) leaves its temporary folder; the next
    conversion removes it once nothing has been written into it for STALE_S seconds, and
    leaves a folder still being written (another process's live conversion) alone."""
    import os
    import time

    from memfit.io import stream

    dead, live = tmp_path / "m.tmp-dead", tmp_path / "m.tmp-live"
    for f in (dead, live):
        (f / "sub").mkdir(parents=True)
        (f / "sub" / "weights.data").write_bytes(b"x" * 10)
    old = time.time() - stream.STALE_S - 60
    for p in (dead, dead / "sub", dead / "sub" / "weights.data", live, live / "sub"):
        os.utime(p, (old, old))  # live's data file was written just now
    stream._drop_stale(tmp_path.glob("m.tmp-*"))
    assert not dead.exists() and (live / "sub" / "weights.data").exists()
