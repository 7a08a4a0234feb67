"""Launch plans (memfit.kernels.replay): an eager CUDA call of a packed layer replays its first
call's launches. The bookkeeping runs on the CPU with a stand-in plan; the GPU tests check that a
replayed launch computes exactly what the ordinary path does."""

from __future__ import annotations

import pytest
import torch

from memfit.formats.grid import IntFormat
from memfit.formats.quant_linear import QuantLinear
from memfit.kernels import linear as kernels_linear
from memfit.kernels import replay, triton_int, triton_mma
from memfit.kernels.weights import IntWeight

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _weight(n=32, k=64, device="cpu") -> IntWeight:
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    s = torch.rand(n, k // 32, device=device)
    z = torch.randint(0, 256, (n, k // 64), dtype=torch.uint8, device=device)
    return IntWeight(q, s, z, (n, k), 4, 32, "int")


class Builds(list):
    """A stand-in for triton_int.plan that counts its builds: y = the row sums + builds."""

    def __call__(self, x2, w, bias):
        self.append(x2.shape)
        made = self

        def call(x2):
            return x2.sum(-1, keepdim=True).expand(-1, w.shape[0]) + len(made)
        return call(x2), call


class Planned(replay.Plans):
    def __init__(self, build):
        super().__init__()
        self.build = build

    def run(self, x, w, bias):
        return super().run(x, w, bias, self.build)


@pytest.fixture
def builds():
    return Builds()


def test_a_plan_is_built_once_per_activation_shape_and_follows_its_weight(builds):
    p, w = Planned(builds), _weight()
    x = torch.arange(64.0).reshape(1, 1, 64)
    y1 = p.run(x, w, None)
    y2 = p.run(x + 1, w, None)
    assert y1.shape == y2.shape == (1, 1, 32)
    assert builds == [(1, 64)]  # the second call replayed the plan
    assert torch.equal(y2[0, 0], torch.full((32,), float((x + 1).sum()) + 1))
    p.run(torch.zeros(3, 64), w, None)  # another M: a plan of its own
    assert builds == [(1, 64), (3, 64)]
    w2 = w._replace(scale=w.scale.clone())  # the layer's tensors changed: every plan is stale
    p.run(x, w2, None)
    assert builds == [(1, 64), (3, 64), (1, 64)]
    assert len(p.by_shape) == 1
    p.run(x, w2, torch.zeros(32))  # a bias that was not there: stale too
    assert len(builds) == 4


def test_a_layer_with_plans_copies_and_pickles_without_them(builds):
    import copy
    import pickle
    p, w = replay.Plans(), _weight()
    p.run(torch.zeros(1, 64), w, None, builds)
    assert p.by_shape  # a closure: neither deepcopy nor pickle could take it
    for q in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert type(q) is replay.Plans and q.by_shape == {} and q.tensors == ()


def test_activations_a_plan_cannot_take_go_the_ordinary_way(builds):
    p, w = Planned(builds), _weight()
    buf = torch.zeros(2 * 64 + 1)
    odd = buf[1:65].view(1, 64)  # 4-byte offset: not the 16-byte alignment a kernel assumed
    assert odd.data_ptr() % 16
    assert p.run(odd, w, None) is None and builds == []
    strided = torch.zeros(64, 2)[:, 0].view(1, 64)
    assert p.run(strided, w, None) is None and builds == []
    assert p.run(torch.zeros(0, 64), w, None) is None and builds == []
    x = torch.zeros(1, 64)
    p.run(x, w, None)
    assert p.run(odd, w, None) is None and builds == [(1, 64)]  # a plan exists, still not this


def test_prefill_lengths_share_a_plan_per_bucket_and_a_layer_keeps_few_shapes(builds):
    p, w = Planned(builds), _weight()
    m = replay.MAX_M + 1  # a prefill: one plan for every length of its power-of-two bucket
    y = p.run(torch.ones(1, m, 64), w, None)
    assert y.shape == (1, m, 32) and builds == [(m, 64)]
    y = p.run(torch.ones(2, 100, 64), w, None)  # 200 rows: the same bucket (256), replayed
    assert y.shape == (2, 100, 32) and builds == [(m, 64)]
    assert torch.equal(y, torch.full((2, 100, 32), 64.0 + 1))
    p.run(torch.ones(1, 257, 64), w, None)  # the next bucket: a plan of its own
    assert builds == [(m, 64), (257, 64)]
    p.run(torch.ones(1, 257, 32), w, None)  # another width: another plan
    assert len(builds) == 3
    builds.clear()
    p = Planned(builds)
    for m in range(1, replay.MAX_SHAPES + 2):
        p.run(torch.zeros(m, 64), w, None)
    assert len(builds) == replay.MAX_SHAPES + 1
    assert len(p.by_shape) == 1  # the 65th shape found 64 kept: they were dropped


def test_a_plan_that_cannot_launch_is_dropped_with_one_warning(monkeypatch):
    def build(x2, w, bias):
        def call(x2):
            raise TypeError("function takes exactly 24 arguments (40 given)")
        return x2.sum(-1, keepdim=True).expand(-1, w.shape[0]), call
    monkeypatch.setattr(replay, "_WARNED", [])
    p, w = replay.Plans(), _weight()
    x = torch.ones(1, 64)
    with pytest.warns(UserWarning, match="launch plans are off"):
        y = p.run(x, w, None, build)  # the first call's output still comes back
    assert torch.equal(y, torch.full((1, 32), 64.0))
    assert p.by_shape[(x.shape, x.dtype)] is False
    assert p.run(x, w, None, build) is None  # the ordinary path from then on


def test_a_layout_with_no_plan_is_not_asked_again():
    asked = []

    def plan(x2, w, bias):
        asked.append(1)
        return None, None
    p, w = Planned(plan), _weight()
    assert p.run(torch.zeros(1, 64), w, None) is None
    assert p.run(torch.zeros(1, 64), w, None) is None
    assert asked == [1]


# ---- GPU: replayed launches against the ordinary path -----------------------------------------


def _layer(n, k, group, dtype, bias, seed=0) -> QuantLinear:
    q = QuantLinear(k, n, IntFormat(bits=4, group_size=group), bias=bias, device="cuda",
                    dtype=dtype)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q.qdata.copy_(torch.randint(0, 256, q.qdata.shape, device="cuda", generator=g))
    q.zero.copy_(torch.randint(0, 256, q.zero.shape, device="cuda", generator=g))
    q.scale.copy_(torch.rand(q.scale.shape, device="cuda", generator=g) * 0.01)
    if bias:
        q.bias.copy_(torch.randn(n, device="cuda", generator=g).to(dtype))
    return q


@gpu
@pytest.mark.parametrize("m", [1, 3, 16, 32])
@pytest.mark.parametrize("group,dtype,bias", [(128, torch.bfloat16, False),
                                              (64, torch.bfloat16, True),
                                              (128, torch.float16, True)])
def test_a_layers_replayed_calls_equal_the_ordinary_path(m, group, dtype, bias):
    q = _layer(384, 1024, group, dtype, bias)
    with torch.no_grad():
        for i in range(3):  # the first call builds the plan, the later ones replay it
            x = torch.randn(1, m, 1024, device="cuda", dtype=dtype)
            got = q(x)
            want = kernels_linear(x, q.kernel_weight(), q.bias, None)  # no plans
            assert torch.equal(got, want), (m, i)
    assert isinstance(q._cpu_cache, replay.Plans) and q._cpu_cache.by_shape


@gpu
@pytest.mark.parametrize("bias", [False, True])
def test_prefill_plans_equal_the_ordinary_path_for_any_length_of_a_bucket(bias, monkeypatch):
    q = _layer(384, 1024, 128, torch.bfloat16, bias)
    with torch.no_grad():
        for m in (129, 200, 256, 300):  # two buckets (256, 512); the first call of each builds
            x = torch.randn(1, m, 1024, device="cuda", dtype=torch.bfloat16)
            got = q(x)
            want = kernels_linear(x, q.kernel_weight(), q.bias, None)  # no plans
            assert torch.equal(got, want), m
        assert len(q._cpu_cache.by_shape) == 2
        # the same with the kernel's launch fixed: dequantize + cuBLAS whatever was timed fastest
        monkeypatch.setattr(triton_int, "choose", lambda *a: triton_int.Config(0, 0, 0))
        q._drop_cache()
        for m in (129, 200):
            x = torch.randn(1, m, 1024, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(q(x), kernels_linear(x, q.kernel_weight(), q.bias, None)), m


@gpu
def test_tiled_weights_keep_a_prefill_plan_that_gives_the_ordinary_output():
    """The decode loop's tiled layout past 128 rows (memfit's own prompt forward): one plan a
    bucket, its outputs those of the ordinary path for every M in the bucket."""
    from memfit.kernels.weights import tile
    w = tile(_layer(256, 1024, 128, torch.bfloat16, False).kernel_weight(), 64)
    p = replay.Plans()
    for m in (200, 256, 129):  # one bucket (256): the plan made at 200 serves the others
        x = torch.randn(1, m, 1024, device="cuda", dtype=torch.bfloat16)
        y, want = p.run(x, w, None, triton_int.plan).float(), kernels_linear(x, w).float()
        assert (y - want).norm() <= 1e-3 * want.norm()  # a K split may sum in any order
    key = (256, 1024, torch.bfloat16)
    assert list(p.by_shape) == [key] and p.by_shape[key]


@gpu
@pytest.mark.parametrize("split_k,epi,prefetch", [(1, False, 1), (4, False, 2), (2, True, 1),
                                                  (8, False, 1)])
def test_mma_plans_equal_run_mma_for_every_split(split_k, epi, prefetch):
    w = _layer(512, 2048, 128, torch.bfloat16, False).kernel_weight()
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    y0, call = triton_mma.run_mma(x, w, None, 128, split_k, 4, epi=epi, reps=4,
                                  prefetch=prefetch, plan=True)
    assert torch.equal(y0, triton_mma.run_mma(x, w, None, 128, split_k, 4, epi=epi, reps=4,
                                              prefetch=prefetch))
    for _ in range(3):
        x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(call(x), triton_mma.run_mma(x, w, None, 128, split_k, 4, epi=epi,
                                                       reps=4, prefetch=prefetch))


@gpu
def test_replays_call_tritons_launch_hooks_and_are_captured_by_cuda_graphs():
    from triton import knobs
    q = _layer(256, 1024, 128, torch.bfloat16, False)
    x = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        q(x)  # builds the plan
        seen = []
        hook = knobs.runtime.launch_enter_hook
        if not hasattr(hook, "add"):
            pytest.skip("this Triton's launch hooks are not a HookChain")
        hook.add(lambda meta: seen.append(1))
        try:
            got = q(x)
        finally:
            hook.calls.clear()
        assert seen and torch.equal(got, kernels_linear(x, q.kernel_weight(), None, None))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            y = q(x)
        torch.cuda.current_stream().wait_stream(stream)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, kernels_linear(x, q.kernel_weight(), None, None))


@gpu
def test_swapped_weight_tensors_and_odd_activations_take_the_right_path():
    q = _layer(256, 1024, 128, torch.bfloat16, False)
    x = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        q(x)
        other = _layer(256, 1024, 128, torch.bfloat16, False, seed=1)
        q.qdata = other.qdata.clone()  # a buffer replaced without the layer knowing
        assert torch.equal(q(x), kernels_linear(x, q.kernel_weight(), None, None))
        buf = torch.randn(1025, device="cuda", dtype=torch.bfloat16)
        odd = buf[1:].view(1, 1, 1024)  # 2 bytes off the 16-byte alignment
        assert torch.equal(q(odd), kernels_linear(odd, q.kernel_weight(), None, None))


@gpu
@pytest.mark.parametrize("m", [4, 16, 64])
def test_tile_kernel_plans_equal_run_for_its_launch_shapes(m):
    w = _layer(512, 2048, 64 if m < 9 else 128, torch.bfloat16, False).kernel_weight()
    cands = [c for c in triton_int.candidates(m, w, torch.bfloat16)
             if c.BM and not c.words and not c.gemv]
    picked = {}
    for c in cands:  # one of each kind: split-K by atomics or partials, permuted or not, pairs
        picked.setdefault((c.SPLIT_K > 1, c.wa, c.dq, c.pair), c)
    assert picked
    if m >= 16:
        assert {c.dq >= 2 for c in picked.values()} == {True, False}
    for c in picked.values():
        x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        y0, call = triton_int.run(x, w, None, c, plan=True)
        atomic = c.SPLIT_K > 1 and not c.wa  # float32 atomics: the summation order varies
        for xi, got in ((x, y0), (x, None), (torch.randn_like(x), None)):
            want = triton_int.run(xi, w, None, c)
            got = call(xi) if got is None else got
            if atomic:
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
            else:
                assert torch.equal(got, want), c
