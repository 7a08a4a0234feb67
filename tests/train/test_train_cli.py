"""`memfit train`: a plain run that saves, distillation with --teacher, torchrun with 2 ranks, and
bad input as one line with exit code 2."""

import json
import os
import subprocess
import sys

import pytest

from memfit.cli.main import main

from .conftest import ROOT, free_port

SMALL = ["--steps", "3", "--seq-len", "32", "--batch-size", "2", "--samples", "16", "--lr", "1e-3"]
# every step sees the same two windows, so its loss compares with the first step's (with 16 the
# steps' batches differ, and which loss is lower depended on the text: CPython's own prose,
# which differs between its patch releases)
FIXED = ["--steps", "3", "--seq-len", "32", "--batch-size", "2", "--samples", "2", "--lr", "1e-3"]


def test_plain_run_trains_and_saves(train_llama_dir, tmp_path, capsys):
    out = tmp_path / "trained"
    assert main(["train", str(train_llama_dir), *FIXED, "--ac", "selective", "--optim",
                 "adamw8bit", "--out", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["world_size"] == 1 and rep["ac_blocks"] == [0] and len(rep["loss"]) == 3
    assert rep["loss"][-1] < rep["loss"][0]
    assert rep["predicted"]["total_bytes"] > 0 and rep["peak_memory_kind"] == "process_peak_rss"
    assert rep["peak_memory_bytes"] > rep["rss_before_training_bytes"]  # the steps' own peak
    meta = json.loads((out / "memfit.json").read_text())
    assert meta["train"]["optim"] == "adamw8bit" and meta["train"]["steps"] == 3
    from memfit.models import load_model
    assert load_model(str(out)).kind == "decoder"


def test_table_output(train_llama_dir, capsys):
    assert main(["train", str(train_llama_dir), *SMALL]) == 0
    text = capsys.readouterr().out
    for word in ("trained", "grad comm", "memory/rank  predicted", "process peak RSS"):
        assert word in text


def test_distillation_lowers_the_kl(train_llama_dir, save_tiny, tmp_path, capsys):
    teacher = save_tiny(tmp_path / "teacher", seed=1)
    assert main(["train", str(train_llama_dir), "--teacher", str(teacher), "--steps", "6",
                 "--seq-len", "32", "--batch-size", "2", "--samples", "4", "--lr", "3e-3",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    print(f"KL(teacher || student) {rep['loss'][0]:.5f} -> {rep['loss'][-1]:.5f}")
    assert rep["loss"][-1] < 0.9 * rep["loss"][0]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "train at least 1 step"),
    (["--grad-comm", "powersgd", "--powersgd-rank", "0"], "needs rank >= 1"),
    (["--lr", "0"], "must be positive"),
    (["--seq-len", "1"], "--seq-len 1 >= 2"),
    (["--seq-len", "600"], "--seq-len 600 is longer than the model supports (512 positions"),
])
def test_bad_input_is_one_line_and_exit_2(train_llama_dir, capsys, args, message):
    assert main(["train", str(train_llama_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("memfit: error:")


def test_existing_out_is_refused(train_llama_dir, tmp_path, capsys):
    (tmp_path / "there").mkdir()
    (tmp_path / "there" / "notes.txt").write_text("keep me")
    assert main(["train", str(train_llama_dir), "--out", str(tmp_path / "there")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "there" / "notes.txt").read_text() == "keep me"


def test_torchrun_two_ranks_prints_once(train_llama_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        f"--master-port={free_port()}", "-m", "memfit", "train",
                        str(train_llama_dir), *SMALL, "--grad-comm", "int8", "--out", str(out),
                        "--json"], env=env, capture_output=True, text=True, timeout=120,
                       check=False, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 only
    rep = json.loads(lines[0])
    assert rep["world_size"] == 2 and rep["reduce_dtype"] == "int8"
    assert (out / "model.safetensors").exists()


def test_a_compressed_student_is_refused_a_compressed_teacher_is_not(train_llama_dir, tmp_path,
                                                                      capsys):
    """A memfit-compressed folder as the trained model: one line before any step and nothing
    written (its packed codes are buffers, so the steps ran and the save died of a state-dict
    traceback); as the teacher it only runs forward, and trains the student."""
    out = tmp_path / "o"
    packed = tmp_path / "packed"
    assert main(["compress", str(train_llama_dir), "--recipe", "w4g64", "--out", str(packed),
                 "--format", "memfit"]) == 0
    capsys.readouterr()
    assert main(["train", str(packed), *FIXED, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds memfit's compressed modules (kind int)" in err and "memfit distill" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    assert main(["train", str(train_llama_dir), "--teacher", str(packed), *FIXED,
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    # the student is the teacher's own dense original: their KL starts near 0 (4-bit rounding)
    assert len(rep["loss"]) == 3 and 0 < rep["loss"][0] < 0.01, rep["loss"]
