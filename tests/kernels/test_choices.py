"""memfit.kernels.choices: the chooser's winners kept on disk between processes, taken back only
when still a candidate and still agreeing with dequantize + cuBLAS."""

import itertools
import json
from dataclasses import asdict

import pytest
import torch

triton_int = pytest.importorskip("memfit.kernels.triton_int")

from memfit.kernels import choices
from tests.kernels.test_triton_int import DEV, make_weight

KEY = (1, (64, 256), 4, 128, "int", torch.bfloat16, 0)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    monkeypatch.delenv("MEMFIT_KERNEL_CHOICES", raising=False)
    return tmp_path


def test_a_choice_round_trips_per_device_and_key(cache):
    dev = torch.device("cpu")
    assert choices.load(dev, KEY) is None
    choices.store(dev, KEY, {"BM": 16, "BN": 64})
    choices.store(dev, KEY[:-1] + (64,), {"BM": 0})
    assert choices.load(dev, KEY) == {"BM": 16, "BN": 64}
    assert choices.load(dev, KEY[:-1] + (64,)) == {"BM": 0}
    data = json.loads((cache / "kernel_choices.json").read_text())
    (name,) = data
    assert name == choices.device_key(dev) and "torch " + torch.__version__ in name
    assert "1|64x256|4|128|int|torch.bfloat16|0" in data[name]
    assert not list(cache.glob("*.tmp-*"))  # written under a temporary name, then renamed


def test_a_broken_file_is_ignored_then_replaced(cache):
    (cache / "kernel_choices.json").write_text("{not json")
    dev = torch.device("cpu")
    assert choices.load(dev, KEY) is None
    choices.store(dev, KEY, {"BM": 0})
    assert choices.load(dev, KEY) == {"BM": 0}


def test_switched_off_it_neither_reads_nor_writes(cache, monkeypatch):
    monkeypatch.setenv("MEMFIT_KERNEL_CHOICES", "0")
    choices.store(torch.device("cpu"), KEY, {"BM": 0})
    assert not (cache / "kernel_choices.json").exists()
    assert choices.load(torch.device("cpu"), KEY) is None


def test_a_stored_choice_is_taken_only_if_a_candidate_that_agrees():
    w = make_weight(64, 256, 4, 128, "int", seed=3)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(DEV)
    cands = triton_int.candidates(1, w, torch.bfloat16)
    want = triton_int.run(x, w, None, triton_int.Config(0, 0, 0)).float()
    pick = cands[3]  # not the default: taken because it was stored
    choices.store(x.device, KEY, asdict(pick))
    assert triton_int.stored_choice(x, w, None, KEY, cands, want) == pick
    assert triton_int.stored_choice(x, w, None, KEY, cands, 2 * want) is None  # disagrees
    assert triton_int.stored_choice(x, w, None, KEY, cands[:3], want) is None  # not offered
    choices.store(x.device, KEY, {**asdict(pick), "retired_field": 1})
    assert triton_int.stored_choice(x, w, None, KEY, cands, want) is None


@pytest.mark.skipif(DEV != "cuda", reason="the chooser times candidates on a GPU only")
def test_the_chooser_times_once_then_a_new_process_takes_the_kept_choice(monkeypatch):
    monkeypatch.delenv("MEMFIT_TRITON_CHOICE", raising=False)
    w = make_weight(256, 512, 4, 128, "int", seed=5)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(DEV)
    key = (1, w.shape, 4, 128, "int", torch.bfloat16, 0)
    triton_int._CHOICE.pop(key, None)
    triton_int.TIMES.pop(key, None)
    best = triton_int.choose(x, w, None)
    assert triton_int.TIMES[key][0][1] == best  # timed: the fastest that agreed
    assert choices.load(x.device, key) == asdict(best)
    triton_int._CHOICE.pop(key)  # as a new process
    triton_int.TIMES.pop(key)
    assert triton_int.choose(x, w, None) == best and key not in triton_int.TIMES  # not timed


def test_candidates_are_checked_on_threads_and_answered_in_order(monkeypatch):
    import threading
    import time
    seen = []

    def agrees(x2, w, bias, c, want):
        time.sleep(0.05 * (3 - c % 3))  # later ones finish first; none so quick a thread idles
        seen.append(threading.current_thread().name)
        return c % 2 == 0

    monkeypatch.setattr(triton_int, "_agrees", agrees)
    monkeypatch.setattr(triton_int, "INTERPRET", False)
    x = torch.zeros(1, 8)
    monkeypatch.setenv("MEMFIT_COMPILE_THREADS", "4")
    assert triton_int.compile_threads() == 4
    assert triton_int.checked(x, None, None, list(range(9)), None) == [c % 2 == 0 for c in range(9)]
    assert len(set(seen)) == 4 and all(n.startswith("memfit-compile") for n in seen)
    seen.clear()
    monkeypatch.setenv("MEMFIT_COMPILE_THREADS", "1")
    assert triton_int.checked(x, None, None, list(range(5)), None) == [c % 2 == 0 for c in range(5)]
    assert set(seen) == {threading.current_thread().name}
    monkeypatch.setenv("MEMFIT_COMPILE_THREADS", "many")
    with pytest.raises(ValueError, match="whole number"):
        triton_int.compile_threads()


def _table(tmp_path, monkeypatch, entries: dict, arch: str = "sm90"):
    path = tmp_path / "shortlists.json"
    path.write_text(json.dumps({"arch": {arch: entries}}))
    monkeypatch.setattr(choices, "TABLE", path)
    monkeypatch.delenv("MEMFIT_KERNEL_SEARCH", raising=False)


def test_the_shipped_shortlist_narrows_candidates_on_its_architecture_only(tmp_path, monkeypatch):
    w = make_weight(64, 256, 4, 128, "int", seed=3)
    cands = triton_int.candidates(1, w, torch.bfloat16)
    retired = {**asdict(cands[0]), "retired_field": 1}
    older = {k: v for k, v in asdict(cands[7]).items() if k != "pair"}  # a field added later
    assert cands[7].pair is False  # ... whose default the entry means
    key = choices.shape_key(KEY)
    _table(tmp_path, monkeypatch, {key: {"configs": [asdict(cands[5]), retired, older,
                                                    asdict(cands[2]), asdict(cands[5])]}})
    assert choices.shortlisted("sm90", KEY, cands) == [cands[5], cands[7], cands[2]]  # its order
    assert choices.shortlisted("sm90", KEY, cands[:3]) == [cands[2]]  # only what is offered
    assert choices.shortlisted("sm80", KEY, cands) == []  # measured on another architecture
    assert choices.shortlisted("", KEY, cands) == []  # not a GPU
    assert choices.shortlisted("sm90", KEY[:-1] + (64,), cands) == []  # a key it lacks
    monkeypatch.setenv("MEMFIT_KERNEL_SEARCH", "full")
    assert choices.shortlisted("sm90", KEY, cands) == []
    monkeypatch.delenv("MEMFIT_KERNEL_SEARCH")
    choices.TABLE.write_text("{not json")
    assert choices.shortlisted("sm90", KEY, cands) == []


def test_the_search_times_the_shortlist_then_everything_if_none_of_it_agrees(tmp_path,
                                                                             monkeypatch):
    w = make_weight(64, 256, 4, 128, "int", seed=3)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cands = triton_int.candidates(1, w, torch.bfloat16)
    _table(tmp_path, monkeypatch, {choices.shape_key(KEY): {"configs": [asdict(cands[4]),
                                                                       asdict(cands[1])]}})
    speed = {c: 10.0 + i for i, c in enumerate(cands)}  # earlier candidates are faster
    bad: set = set()
    checked, timed = [], []

    def agrees(x2, w, bias, c, want):
        checked.append(c)
        return c not in bad

    def graph_us_each(fn_lists):
        out = []
        for fns in fn_lists:
            fns[0]()
            out.append(timed[-1])
        return out

    def run(x2, w, bias, c):
        timed.append(speed.get(c, 0.0))
        return torch.zeros(1, 64)

    monkeypatch.setattr(triton_int, "_agrees", agrees)
    monkeypatch.setattr(triton_int, "_graph_us_each", graph_us_each)
    monkeypatch.setattr(triton_int, "run", run)
    monkeypatch.setattr(triton_int, "weight_copies", lambda w: [w])
    monkeypatch.setattr(triton_int, "INTERPRET", True)  # checks in order, on this thread
    assert triton_int._search(x, w, None, KEY, cands, "sm90") == cands[1]
    assert checked == [cands[4], cands[1]]  # nothing else compiled or timed
    assert choices.load(x.device, KEY) == asdict(cands[1])  # kept like any timed choice
    (tmp_path / "kernel_choices.json").unlink()
    checked.clear()
    bad.update({cands[4], cands[1]})
    assert triton_int._search(x, w, None, KEY, cands, "sm90") == cands[0]  # full search
    assert checked == [cands[4], cands[1]] + cands
    checked.clear()
    (tmp_path / "kernel_choices.json").unlink()
    bad.clear()
    assert triton_int._search(x, w, None, KEY, cands, "sm80") == cands[0]
    assert checked == cands


def test_every_shipped_launch_shape_is_still_a_candidate_for_its_key():
    """The table is measured data: a Config change that retires its shapes shows here."""
    from memfit.kernels.weights import IntWeight
    data = json.loads(choices.TABLE.read_text())
    n_keys = 0
    for entries in data["arch"].values():
        for key, entry in entries.items():
            m, shape, bits, group, zp, dtype, rows = key.split("|")
            n, k = map(int, shape.split("x"))
            w = IntWeight(torch.empty(0, dtype=torch.uint8), torch.empty(0), None, (n, k),
                          int(bits), int(group), zp, int(rows))
            cands = triton_int.candidates(int(m), w, getattr(torch, dtype.split(".")[1]))
            assert entry["configs"], key
            got = choices.shortlisted("sm90", (int(m), (n, k), int(bits), int(group), zp,
                                               getattr(torch, dtype.split(".")[1]), int(rows)),
                                      cands)
            assert len(got) == len(entry["configs"]), key
            n_keys += 1
    assert n_keys >= 40


def test_a_candidate_whose_launch_fails_is_left_out_with_a_warning(monkeypatch):
    """A launch shape this device refuses at run time (RuntimeError) is not a candidate; the
    default (dequantize + cuBLAS) failing is not hidden."""
    w = make_weight(64, 256, 4, 128, "int", seed=3)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(DEV)
    bad = triton_int.Config(16, 64, 128, 1, 4, 3, magic=True)
    real = triton_int.run

    def run(x2, w, bias, cfg, plan=False):
        if cfg in (bad, triton_int.Config(0, 0, 0)):
            raise RuntimeError("Triton Error [CUDA]: invalid argument")
        return real(x2, w, bias, cfg, plan)
    monkeypatch.setattr(triton_int, "run", run)
    monkeypatch.setattr(triton_int, "_WARNED", set())
    with pytest.warns(UserWarning, match="failed on this device"):
        assert triton_int._agrees(x, w, None, bad, torch.zeros(2, 64, device=DEV)) is False
    with pytest.raises(RuntimeError, match="invalid argument"):
        triton_int._agrees(x, w, None, triton_int.Config(0, 0, 0), torch.zeros(2, 64, device=DEV))


def test_timing_turns_give_every_graph_the_same_mean_place():
    """`graph_us_each` replays its graphs forward, then backward: with an even number of
    replays a drift linear in time adds the same to every graph's mean (the first graph timed
    alone first would have had the coolest device)."""
    from memfit.kernels.gpu_timing import turns
    assert turns(3, 3) == [0, 1, 2, 2, 1, 0, 0, 1, 2]
    for n, r in ((1, 4), (5, 6), (8, 2)):
        order = turns(n, r)
        assert sorted(order) == sorted(list(range(n)) * r)
        places = [sum(i for i, j in enumerate(order) if j == g) / r for g in range(n)]
        assert max(places) - min(places) < 1e-9, places
    order = turns(4, 5)  # odd: the last pass forward, the spread is one pass's, not five
    places = [sum(i for i, j in enumerate(order) if j == g) / 5 for g in range(4)]
    assert abs(max(places) - min(places) - 3 / 5) < 1e-9


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs")
def test_graphs_timed_in_turns_keep_their_order_and_size():
    """Three lists of busy-wait kernels 1x, 2x and 4x as long: timed in turns, each graph's
    figure is its own (ordered, about doubling), as each timed alone is."""
    from memfit.kernels.gpu_timing import graph_us, graph_us_each
    spin = [lambda c=c: torch.cuda._sleep(c) for c in (20_000, 40_000, 80_000)]
    each = graph_us_each([[f] for f in spin], lambda fns: 10, 6, min)
    alone = [graph_us([f], 10, 6, min) for f in spin]
    assert each[0] < each[1] < each[2]
    assert 1.6 < each[1] / each[0] < 2.4 and 1.6 < each[2] / each[1] < 2.4, each
    for a, b in zip(each, alone):
        assert abs(a - b) < 0.15 * b, (each, alone)
    assert graph_us_each([[f] for f in spin], lambda fns: 10, 2, min, alive=2)[2] > each[1]


def test_graphs_timed_in_turns_capture_each_list_once_and_replay_it_in_turns(monkeypatch):
    """`graph_us_each` off a GPU, on a stand-in for torch.cuda whose clock advances by what
    each replayed graph's calls cost: every list captured once with its calls, `alive` graphs at
    a time, replays in `turns` order, each figure its own µs per call; a later batch replays the
    first list's graph too and is scaled by it (here its device runs twice as fast)."""
    import contextlib
    import types

    from memfit.kernels import gpu_timing

    clock, log, serials = [0.0], [], itertools.count()

    class Graph:
        def __init__(self):
            self.calls = []
            self.serial = next(serials)  # (not id(): a freed graph's id can come back)

        def replay(self):
            log.append(("replay", self.serial))
            for f in self.calls:
                f()

    capturing = [None]

    reserved, free = [0], [1 << 40]
    speed, fast_from = [1.0], [None]  # from capture fast_from on, kernels take half the time

    @contextlib.contextmanager
    def graph(g):
        capturing[0] = g
        yield
        capturing[0] = None
        reserved[0] += 100  # what each capture adds to the allocator's reserve
        if fast_from[0] is not None and reserved[0] // 100 >= fast_from[0]:
            speed[0] = 0.5

    class Event:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            self.t = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, other):  # ms
            return other.t - self.t

    class Stream:
        def wait_stream(self, other):
            pass

    fake = types.SimpleNamespace(
        Stream=Stream, current_stream=Stream, stream=lambda s: contextlib.nullcontext(),
        CUDAGraph=Graph, graph=graph, Event=Event, memory_reserved=lambda: reserved[0],
        mem_get_info=lambda: (free[0], 1 << 40))
    monkeypatch.setattr(gpu_timing, "torch", types.SimpleNamespace(cuda=fake))

    def kernel(ms):
        def f():
            if capturing[0] is not None:
                capturing[0].calls.append(f)
            else:
                clock[0] += ms * speed[0]
        return f

    lists = [[kernel(0.001), kernel(0.003)], [kernel(0.010)], [kernel(0.002)]]
    fast_from[0] = 3  # the second batch's first capture (its reference) on
    got = gpu_timing.graph_us_each(lists, lambda fns: 4 * len(fns), 4, list, alive=2)
    assert [len(t) for t in got] == [4, 4, 4]
    assert got[0] == pytest.approx([2.0] * 4) and got[1] == pytest.approx([10.0] * 4)
    assert got[2] == pytest.approx([2.0] * 4)  # read 1.0 on the faster device, scaled by 2
    replays = [g for kind, g in log if kind == "replay"]
    # each graph replayed once after its capture, then in turns: batch (0, 1), then the first
    # list's graph again (r) with 2
    a, b = replays[0], replays[1]
    assert replays[2:10] == [a, b, b, a, a, b, b, a]
    r, c = replays[10], replays[11]
    assert r != c and replays[12:] == [r, c, c, r, r, c, c, r]
    speed[0], fast_from[0] = 1.0, None
    assert gpu_timing.graph_us(lists[1], 3, 2, min) == pytest.approx(10.0)

    # a device with room for one more graph the size of the last, not two: a graph a batch
    free[0], log[:] = 199, []
    got = gpu_timing.graph_us_each(lists, lambda fns: 4 * len(fns), 2, list, alive=8)
    assert got == [pytest.approx([2.0] * 2), pytest.approx([10.0] * 2), pytest.approx([2.0] * 2)]
    replays = [g for kind, g in log if kind == "replay"]
    assert len(set(replays)) == 3 and all(replays[k] == replays[3 * (k // 3)] for k in range(9))
    free[0], log[:] = 200, []
    gpu_timing.graph_us_each(lists, lambda fns: 4 * len(fns), 2, list, alive=8)
    replays = [g for kind, g in log if kind == "replay"]
    assert replays[3:9] == [replays[0], replays[1], replays[2], replays[2], replays[1],
                            replays[0]]  # room: the three in one batch, in turns
