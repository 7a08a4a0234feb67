"""memfit's owned-memory safetensors reader gives exactly what safetensors' own loader gives."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from memfit.io.checkpoint import read_safetensors


def test_same_tensors_as_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(7, 5, generator=g),
        "f16": torch.randn(3, 64, generator=g).half(),
        "bf16": torch.randn(33, generator=g).bfloat16(),
        "i8": torch.randint(-128, 127, (4, 9), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (11,), generator=g, dtype=torch.uint8),
        "i32": torch.randint(-1000, 1000, (2, 2, 3), generator=g, dtype=torch.int32),
        "bool": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    ours, theirs = read_safetensors(path), load_file(str(path))
    assert set(ours) == set(theirs) == set(tensors)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert torch.equal(ours[k], v), k


def test_truncated_file_is_an_error(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(path)


def test_cast_while_reading_equals_cast_after(tmp_path, monkeypatch):
    import memfit.io.checkpoint as ck
    monkeypatch.setattr(ck, "CAST_CHUNK", 64)  # many chunks, a ragged last one
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(37, 11, generator=g).half(), "b": torch.randn(301, generator=g).bfloat16(),
               "codes": torch.randint(0, 255, (50,), generator=g, dtype=torch.uint8)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    ours = read_safetensors(path, lambda name, dt: torch.float32 if dt.is_floating_point else None)
    assert ours["a"].dtype == ours["b"].dtype == torch.float32 and ours["codes"].dtype == torch.uint8
    for k, v in tensors.items():
        assert torch.equal(ours[k], v.float() if v.is_floating_point() else v), k
