"""Splitting a model over devices and offloading blocks (memfit.parallel.place), on the CPU:
the plan's accounting, and CPU + disk runs against the unsplit model (same logits, same text)."""

import pytest
import torch

from memfit.errors import UserError
from memfit.formats.grid import IntFormat
from memfit.parallel.place import Device, load_placed, parse_devices, plan_placement

MB = 10**6


def test_parse_devices_reads_sizes_and_order():
    d = parse_devices("cpu=1.5GB, disk")
    assert d == [Device("cpu", 1_500_000_000), Device("disk", None)]
    assert parse_devices("cpu")[0].budget > 0  # what this process may still use


@pytest.mark.parametrize("text, words", [
    ("disk,cpu=1GB", "disk must come last"),
    ("cpu=1GB,cpu=2GB", "twice"),
    ("gpu=1GB", "cannot read 'gpu=1GB'"),
    ("cpu=12parsecs", "cannot read the size"),
    ("disk=1GB", "disk takes no size"),
    ("cuda:7=1GB", "CUDA device(s)"),
    ("", "empty"),
])
def test_parse_devices_refuses_bad_descriptions(text, words):
    if words == "CUDA device(s)" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_devices(text)


def _sizes(model, parts):
    return {p: sum(t.nbytes for t in list(model.get_submodule(p).parameters())
                   + list(model.get_submodule(p).buffers())) for p in parts}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    from memfit.models import load_model
    from tests.conftest import save_tiny
    return load_model(str(save_tiny(tmp_path_factory.mktemp("tied") / "m", tie_word_embeddings=True,
                                    num_hidden_layers=6, intermediate_size=1024)))


def test_plan_fills_devices_in_order_within_budgets(tied):
    from memfit.eval.memory import activation_peak_estimate
    model = tied.model  # embeddings 7.8 MB (the head tied to them), six blocks of 0.9 MB
    emb = model.model.embed_tokens.weight.nbytes
    block = sum(t.nbytes for t in model.model.layers[0].parameters())
    act = activation_peak_estimate(model.config, 64, 1, torch.float32)
    budget = emb + act + 3.5 * block  # room for two blocks and one staged, not three
    plan = plan_placement(model, [Device("cpu", budget), Device("disk", None)], context=64)
    parts = list(plan.device_map)
    assert plan.device_map["lm_head"] == "cpu"  # tied to the embeddings: goes where they are
    order = [plan.device_map[p] for p in parts if p != "lm_head"]
    assert order == sorted(order, key=["cpu", "disk"].index)  # one contiguous run per device
    cpu, disk = plan.shares
    assert cpu.total <= budget
    assert cpu.parts[:3] == ["model.embed_tokens", "model.layers.0", "model.layers.1"]
    assert disk.parts[0] == "model.layers.2"
    # every part's tensors are counted once, on the device that stores them
    sizes = _sizes(model, parts)
    assert cpu.weights == sum(sizes[p] for p in cpu.parts if p != "lm_head")  # counted once
    assert disk.weights == sum(sizes[p] for p in disk.parts)
    # the CPU computes the disk parts: it holds their KV cache and stages the largest of them
    kv_layer = 2 * 2 * 16 * 4 * 64  # K and V, 2 KV heads of 16, float32, 64 tokens
    assert cpu.kv == 6 * kv_layer
    assert cpu.staging == max(sizes[p] for p in disk.parts)
    assert cpu.activations > 0 and disk.activations == disk.kv == 0


def test_plan_with_an_accelerator_offloads_to_cpu_and_computes_on_it(tied):
    """The accounting with a GPU in the description (planning only: no GPU needed)."""
    from memfit.eval.memory import activation_peak_estimate
    model = tied.model
    emb = model.model.embed_tokens.weight.nbytes
    block = sum(t.nbytes for t in model.model.layers[0].parameters())
    act = activation_peak_estimate(model.config, 64, 1, torch.float32)
    gpu, cpu = Device("cuda:0", emb + act + 3.5 * block), Device("cpu", 10**9)
    plan = plan_placement(model, [gpu, cpu], context=64)
    assert plan.main == "cuda:0"
    g, c = plan.shares
    assert g.parts[:3] == ["model.embed_tokens", "model.layers.0", "model.layers.1"]
    assert c.parts[0] == "model.layers.2"
    assert g.total <= gpu.budget
    assert c.kv == 0 and c.activations == 0  # offloaded parts compute on the GPU
    assert g.kv == 6 * 2 * 2 * 16 * 4 * 64  # all six layers' KV cache on the GPU
    sizes = _sizes(model, list(plan.device_map))
    assert g.staging == max(sizes[p] for p in c.parts)
    assert "offloaded to cuda:0" in plan.table()


def test_plan_refuses_when_nothing_fits(tiny_llama):
    with pytest.raises(UserError, match="does not fit on the devices"):
        plan_placement(tiny_llama.model, [Device("cpu", 9 * MB)], context=64)
    with pytest.raises(UserError, match="needs at least .* use a shorter --context"):
        plan_placement(tiny_llama.model, [Device("cpu", 1 * MB), Device("disk", None)],
                       context=64)


def test_tied_head_goes_with_the_embeddings(tied):
    m = tied
    plan = plan_placement(m.model, [Device("cpu", 12 * MB), Device("disk", None)], context=64)
    assert plan.device_map["lm_head"] == plan.device_map["model.embed_tokens"] == "cpu"
    assert plan.device_map["model.layers.5"] == "disk"
    head = plan.shares[[s.device.name for s in plan.shares].index(plan.device_map["lm_head"])]
    emb = m.model.model.embed_tokens.weight.nbytes
    assert head.weights >= emb and sum(s.weights for s in plan.shares) < emb + 7 * MB


@torch.inference_mode()
def test_cpu_and_disk_run_gives_the_same_logits(tiny_llama_dir, tiny_llama):
    m, plan = load_placed(str(tiny_llama_dir), [Device("cpu", 12 * MB), Device("disk", None)],
                          context=64)
    assert "disk" in plan.device_map.values()
    ids = torch.randint(0, 30000, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.model(ids).logits, tiny_llama.model(ids).logits, rtol=0, atol=0)
    a = tiny_llama.model.generate(ids[:1], max_new_tokens=12, do_sample=False)
    b = m.model.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert a.tolist() == b.tolist()


@torch.inference_mode()
def test_packed_model_offloaded_to_disk_keeps_no_layout(tmp_path, tiny_llama_dir):
    from memfit.compress import CompressOptions, compress_to
    from memfit.models import load_model

    out = tmp_path / "w4"
    compress_to(str(tiny_llama_dir), "w4g64", out, CompressOptions(progress=False, max_kld=100))
    whole = load_model(str(out))
    m, plan = load_placed(str(out), [Device("cpu", 10 * MB), Device("disk", None)], context=64)
    on_disk = [p for p, d in plan.device_map.items() if d == "disk" and "layers" in p]
    assert on_disk, plan.device_map
    ids = torch.randint(0, 30000, (1, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m.model(ids).logits, whole.model(ids).logits, rtol=0, atol=0)
    packed = [q for p in on_disk for q in m.model.get_submodule(p).modules()
              if hasattr(q, "cache_nbytes")]
    assert packed and all(q.cache_nbytes() == 0 for q in packed)
    # decode-sized calls prepare nothing: the offloaded layers never (made and dropped at every
    # call, the layout cost 5.5x the tiled path's time), the others kept theirs from the first
    import memfit.kernels as kernels

    prepared = []
    real = kernels.prepare
    kernels.prepare = lambda w: prepared.append(w.shape) or real(w)
    try:
        step = [m.model(ids[:, :1]).logits for _ in range(3)]
    finally:
        kernels.prepare = real
    assert prepared == [] and all(q.cache_nbytes() == 0 for q in packed)
    torch.testing.assert_close(step[2], whole.model(ids[:, :1]).logits, rtol=0.02, atol=0.02)


def test_cli_generate_with_place_matches_plain(tiny_llama_dir, capsys):
    from memfit.cli import main

    args = [str(tiny_llama_dir), "--prompt", "hello world", "--max-new-tokens", "8", "--no-chat"]
    assert main(["generate", *args]) == 0
    plain = capsys.readouterr().out.strip()
    assert main(["generate", *args, "--place", "cpu=12MB,disk", "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "(offloaded to cpu)" in out and out.strip().endswith(plain.splitlines()[-1])
    assert main(["generate", *args, "--place", "cpu=1MB"]) == 2
    assert "does not fit on the devices" in capsys.readouterr().err
    assert main(["generate", *args, "--place", "cpu=12MB,disk", "--device", "cuda"]) == 2


def test_a_gpu_plan_is_made_without_a_gpu(tiny_llama_dir):
    """inspect's path: the plan for a GPU is made (nothing loaded) on a machine without one."""
    _, plan = load_placed(str(tiny_llama_dir), [Device("cuda:0", 10**9)], context=64,
                          dispatch=False)
    assert set(plan.device_map.values()) == {"cuda:0"}


def test_a_gpu_keeps_at_least_one_part(tmp_path):
    """With room on cuda:0 only for the KV cache, activations and staging, the plan would offload
    every part and accelerate would then run the model on the CPU: refused, with what it needs;
    a little more room and cuda:0 holds the embeddings (the first part) and computes."""
    from tests.conftest import save_tiny

    path = save_tiny(tmp_path / "m", hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    devices = [Device("cuda:0", 30 * 10**6), Device("cpu", 4 * 10**6), Device("disk", None)]
    with pytest.raises(UserError, match="largest part staged and its first part"):
        load_placed(str(path), devices, context=64, dispatch=False)
    devices[0] = Device("cuda:0", 34 * 10**6)
    _, plan = load_placed(str(path), devices, context=64, dispatch=False)
    assert plan.device_map["model.embed_tokens"] == "cuda:0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_split_over_a_gpu_cpu_and_disk_generates_the_whole_models_text(tmp_path):
    """Embeddings on cuda:0, two blocks offloaded to the CPU and the rest to disk (all computed
    on the GPU): the same greedy tokens as the whole model on the GPU."""
    from memfit.models import input_device, load_model
    from tests.conftest import save_tiny

    path = save_tiny(tmp_path / "m", hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    whole = load_model(str(path), device="cuda").model
    ref = whole.generate(ids.cuda(), max_new_tokens=12, do_sample=False)
    del whole
    m, plan = load_placed(str(path), parse_devices("cuda:0=34MB,cpu=4MB,disk"), context=64)
    assert list(plan.device_map.values())[:4] == ["cuda:0", "cpu", "cpu", "disk"]
    out = m.model.generate(ids.to(input_device(m.model)), max_new_tokens=12, do_sample=False)
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("fmt", [
    IntFormat(bits=4, group_size=64), IntFormat(bits=4, group_size=64, zero_point="float"),
    IntFormat(bits=4, group_size=32, scale_dtype="bfloat16"),
    IntFormat(bits=4, group_size=64, symmetric=True, scale_dtype="bfloat16"),
    IntFormat(bits=3, group_size=64), IntFormat(bits=8, group_size=None, symmetric=True),
], ids=str)
@pytest.mark.parametrize("out", [1536, 1037])
def test_the_cpu_layout_bytes_a_placement_counts_are_the_layers_own(fmt, out):
    """The plan prices a packed layer's CPU kernel layout from its shape before any forward;
    after one forward the layer holds exactly that (bfloat16 scales with integer zeros keep a
    float32 rest of their offsets, which the count missed; 1037 rows are padded to 1040)."""
    from memfit.algos.rtn import rtn
    from memfit.formats.quant_linear import QuantLinear
    from memfit.eval.memory import cpu_layout_bytes

    lin = torch.nn.Linear(576, out, bias=False)
    r = rtn(lin.weight.detach(), fmt)
    q = QuantLinear.from_linear(lin, r.codes, r.scale, r.zero, fmt)
    priced = cpu_layout_bytes(q)
    with torch.inference_mode():
        q(torch.randn(1, 576))
    assert priced == q.cache_nbytes() > 0


@pytest.mark.parametrize("layout", ["bitmask", "2:4"])
def test_a_pruned_and_quantized_layers_cpu_layout_is_counted_too(layout):
    """SparseLinear with integer values prepares the dense codes' kernel layout at decode; the
    plan counted nothing for it."""
    from memfit.algos.prune import magnitude_mask
    from memfit.formats import grid
    from memfit.formats.sparse import SparseIntWeight, SparseLinear
    from memfit.eval.memory import cpu_layout_bytes

    fmt = IntFormat(bits=4, group_size=64)
    w = torch.randn(1037, 576)
    keep = magnitude_mask(w, **({"nm": (2, 4)} if layout == "2:4" else {"sparsity": 0.5}))
    s, z = grid.round_params(*grid.minmax_params(w * keep, fmt), fmt)
    w_hat = grid.dequantize(grid.quantize(w * keep, s, z, fmt), s, z, fmt) * keep
    m = SparseLinear(SparseIntWeight.from_dense(w_hat, s, z, fmt, layout))
    priced = cpu_layout_bytes(m)
    with torch.inference_mode():
        m(torch.randn(1, 576))
    assert priced == m.cache_nbytes() > 0
