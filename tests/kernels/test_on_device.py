"""Triton launches on the current CUDA device, whatever device its tensors are on, so a packed
layer that accelerate placed on cuda:1 (`--place cuda:0=...,cuda:1=...`) must make cuda:1
current around its kernels (memfit.kernels.on_device). Off a GPU: torch.cuda's device state is
a stand-in here, and the activations a stand-in with a CUDA device."""

import contextlib
import types

import torch

from memfit import kernels
from memfit.kernels.weights import IntWeight


def _fake_cuda(monkeypatch, current: int) -> list:
    """torch.cuda.current_device / torch.cuda.device over a stand-in device index; returns the
    log of devices made current."""
    state, made = [current], []

    @contextlib.contextmanager
    def device(d):
        before = state[0]
        state[0] = d.index
        made.append(d.index)
        try:
            yield
        finally:
            state[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    return made


def test_on_device_makes_the_tensors_gpu_current_only_when_it_is_not():
    assert isinstance(kernels.on_device(torch.zeros(2)), contextlib.nullcontext)


def test_on_device_switches_to_another_gpu_and_back(monkeypatch):
    made = _fake_cuda(monkeypatch, current=0)
    on1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    on0 = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert isinstance(kernels.on_device(on0), contextlib.nullcontext)
    with kernels.on_device(on1):
        assert torch.cuda.current_device() == 1
    assert torch.cuda.current_device() == 0 and made == [1]


def test_a_packed_linear_on_the_second_gpu_runs_its_kernels_there(monkeypatch):
    """memfit.kernels.linear's CUDA path (the layer's launch plans and triton_linear) sees the
    activations' GPU as the current device, and the caller's device is current again after."""
    _fake_cuda(monkeypatch, current=0)
    seen = []

    def triton_linear(x, w, bias):
        seen.append(torch.cuda.current_device())
        return "y"

    monkeypatch.setattr(kernels, "_triton", lambda: types.SimpleNamespace(
        triton_linear=triton_linear))
    x = types.SimpleNamespace(device=torch.device("cuda", 1), requires_grad=False)
    w = IntWeight(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1), None, (4, 16), 4, 16,
                  "symmetric")
    assert kernels.linear(x, w) == "y"
    assert seen == [1] and torch.cuda.current_device() == 0
