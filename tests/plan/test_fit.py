"""`memfit fit` end to end on a tiny random Llama: the plan fits, is measured, beats or matches
the uniform baselines it was compared with, and refuses to write what fails its check."""

import json
import re
import subprocess
import sys

import pytest

from memfit.plan import FitFailed, FitOptions, fit

SMALL = dict(samples=4, seq_len=128, probe_windows=4, probe_seq_len=128, eval_windows=4,
             eval_seq_len=128)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import save_tiny
    return save_tiny(tmp_path_factory.mktemp("fit") / "llama", hidden_size=128,
                     intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)


@pytest.fixture(scope="module")
def weights_plan(model_dir):
    from memfit.models import load_model
    dense = load_model(str(model_dir))
    full = sum(p.numel() for p in dense.model.parameters()) * 2  # 16-bit bytes (tied once)
    plan = fit(dense, budget=int(0.35 * full), kind="weights", context=128,
               options=FitOptions(**SMALL))
    return plan, full


def test_weights_plan_fits_and_is_measured(weights_plan, tmp_path):
    plan, full = weights_plan
    built = plan.build(tmp_path / "out")
    assert built["stored_weight_bytes"] <= plan.target.budget
    assert abs(built["memory_error"]) < 0.01  # the stored bytes are predicted exactly
    assert 0 < built["measured_kld"] < 1
    assert (tmp_path / "out" / "memfit.json").exists()
    assert not (tmp_path / "out.fit-tmp").exists()
    meta = json.loads((tmp_path / "out" / "memfit.json").read_text())
    assert meta["recipe"]["fit"]["choices"] == plan.choices()
    from memfit.io.save import load
    reloaded = load(tmp_path / "out")
    kinds = {type(m).__name__ for m in reloaded.model.modules()}
    assert kinds & {"QuantLinear", "SparseLinear", "LowRankLinear"}
    # a plan prints as one line: what it fits, what it predicts and the choices' counts
    text = repr(plan)
    assert "\n" not in text and len(text) < 400, text
    assert text.startswith(f"Plan({plan.loaded.source!r}, weights budget ") and \
        f"; {plan.choices_line()})" in text
    assert sum(int(n) for n in re.findall(r" x(\d+)", plan.choices_line())) == len(plan.units)


def test_plan_matches_or_beats_uniform_baselines(weights_plan, tmp_path):
    plan, _ = weights_plan
    paths = plan.report(tmp_path)
    summary = json.loads(open(paths["json"]).read())
    ours = plan.points[-1]["measured_kld"]
    size = plan.predicted_total()
    fitting = [b for b in summary["pareto"]["baselines"] if b["bytes"] <= size]
    print("plan", size, ours, "baselines", [(b["name"], b["bytes"], b["kld"]) for b in fitting])
    assert fitting, "some uniform baseline fits the budget"
    assert ours <= 1.05 * min(b["kld"] for b in fitting)
    for key in ("html", "pareto", "layers"):
        assert open(paths[key], "rb").read(4)  # written
    assert open(paths["pareto"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_failed_check_writes_nothing(model_dir, tmp_path):
    plan = fit(str(model_dir), budget="6MB", kind="weights", context=128,
               options=FitOptions(**SMALL, max_kld=1e-12))
    with pytest.raises(FitFailed, match="nothing written.*closest plan"):
        plan.build(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.fit-tmp").exists()


def test_memory_budget_is_never_exceeded_by_what_is_written(model_dir, tmp_path):
    """The run-time memory check is measured in a fresh process: either the folder is written
    and its measured peak is within the budget, or nothing is written and the error names the
    budget that would hold it. Every build's predicted peak is within 5% of its measurement
    (the issue's target; 0.4% and 0.03% here, 2 threads, with glibc's mmap threshold held)."""
    plan = fit(str(model_dir), budget=None, kind="memory", context=256, kv="none",
               options=FitOptions(**SMALL))
    try:
        built = plan.build(tmp_path / "out")
    except FitFailed as e:
        assert "would hold this plan as measured" in str(e)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.fit-tmp").exists()
        return
    assert built["measured_bytes"] <= plan.target.budget
    assert (tmp_path / "out" / "memfit.json").exists()
    for b in built["builds"]:
        assert abs(b["memory_error"]) < 0.05, built["builds"]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "memfit", "fit", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--budget", "12parsecs"], "cannot read the size '12parsecs'"),
    (["--budget", "0.5"], "the size '0.5' has no unit, so it would count bytes"),
    # the blocks' linears at 2 bits: 4 x 147456 weights = 147.5 KB, known before calibrating
    (["--weights-budget", "100KB"], "linear weights at 2 bits a weight need 0.1 MB (4 of 4"),
    (["--budget", "100MB"], "and the runtime (Python, torch, transformers)"),
    (["--weights-budget", "150KB"], "below the smallest possible plan"),
    (["--context", "100000"], "longer than the model supports"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(model_dir, tmp_path, args, message):
    r = _cli(str(model_dir), "--out", str(tmp_path / "out"), "--samples", "2",
             "--eval-windows", "2", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("memfit: error:") and message in last
    assert not (tmp_path / "out").exists()
