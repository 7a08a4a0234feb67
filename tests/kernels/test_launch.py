"""memfit.kernels.launch: the second launch with the same specialization goes straight to the
compiled kernel's launcher with every parameter in order; anything Triton specializes on that
changes (an integer's divisibility by 16, a tensor's alignment or dtype, a keyword) binds again.
The launchers themselves run on a GPU only (tests/kernels/test_triton_int.py there)."""

from types import SimpleNamespace

import torch

from memfit.kernels import launch


def _body(x_ptr, n, A=5, B=7):  # a kernel's Python signature: two runtime, two constexpr
    pass


class FakeKernel:
    function, packed_metadata = "fn-handle", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, *a):
        self.log.append(("fast", a))


class FakeJit:
    fn = staticmethod(_body)

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def runner(*args, **kw):
            self.log.append(("bound", grid, args, kw))
            return FakeKernel(self.log)
        return runner


def _patch(monkeypatch):
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "knobs", SimpleNamespace(
        runtime=SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)))
    monkeypatch.setattr(launch, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda dev: 1234)))
    monkeypatch.setattr(launch, "_KERNELS", {})


def test_second_launch_skips_binding_and_passes_every_parameter(monkeypatch):
    _patch(monkeypatch)
    fn, x = FakeJit(), torch.zeros(64)
    launch.launch(fn, (3, 2), x, 32, A=9, num_warps=4)
    launch.launch(fn, (3, 2), x, 48, A=9, num_warps=4)
    assert [e[0] for e in fn.log] == ["bound", "fast"]
    assert fn.log[1][1] == (3, 2, 1, 1234, "fn-handle", "meta", None, None, None, x, 48, 9, 7)


def test_a_new_specialization_binds_again(monkeypatch):
    _patch(monkeypatch)
    fn, x = FakeJit(), torch.zeros(64)
    launch.launch(fn, (1,), x, 32)
    launch.launch(fn, (1,), x, 33)            # no longer a multiple of 16
    launch.launch(fn, (1,), x, 1)             # 1 is specialized as a constant
    launch.launch(fn, (1,), x[1:], 32)        # 4 bytes off a 16-byte boundary
    launch.launch(fn, (1,), x.half(), 32)     # another dtype
    launch.launch(fn, (1,), x, 32, A=6)       # another constexpr
    launch.launch(fn, (1,), x, 2**40)         # a 64-bit integer
    assert [e[0] for e in fn.log] == ["bound"] * 7
    launch.launch(fn, (1,), x, 64)
    assert fn.log[-1][0] == "fast"


def test_launch_hooks_or_switch_off_always_bind(monkeypatch):
    _patch(monkeypatch)
    fn, x = FakeJit(), torch.zeros(64)
    launch.launch(fn, (1,), x, 32)
    launch.knobs.runtime.launch_enter_hook = print  # a profiler's hook needs Triton's metadata
    launch.launch(fn, (1,), x, 32)
    launch.knobs.runtime.launch_enter_hook = None
    monkeypatch.setattr(launch, "ENABLED", False)
    launch.launch(fn, (1,), x, 32)
    assert [e[0] for e in fn.log] == ["bound"] * 3
