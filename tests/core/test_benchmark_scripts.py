"""The benchmark scripts run as `python benchmarks/NAME.py`, which puts benchmarks/ first on
sys.path: a script there named like an installed top-level module hides it from every import in
the process (benchmarks/kernels.py hid the `kernels` package transformers imports, so every
script that imported transformers failed before its first line)."""

import importlib.machinery
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_benchmark_script_hides_an_installed_module():
    others = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    scripts = sorted(p.stem for p in BENCH.glob("*.py"))
    assert len(scripts) > 20
    hidden = [s for s in scripts if s in sys.builtin_module_names
              or importlib.machinery.PathFinder.find_spec(s, others) is not None]
    assert hidden == [], f"rename benchmarks/{hidden[0]}.py: it hides an installed module"


def test_a_benchmark_script_that_imports_transformers_starts():
    r = subprocess.run([sys.executable, str(BENCH / "hf_static.py"), "--help"],
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "--tiny" in r.stdout


def test_the_shortlist_builder_keeps_the_best_and_near_ties_only(tmp_path):
    """benchmarks/choice_table.py --build: per key the best launch shape and up to top - 1
    others within the margin, a later file's key replacing an earlier one's."""
    import json

    def cfg(bn):
        return {"BM": 16, "BN": bn}

    def collected(name, entries):
        p = tmp_path / name
        p.write_text(json.dumps({"device": "NVIDIA H200", "device_key": "NVIDIA H200 sm90 x132 |"
                                 " torch 2.11 | triton 3.6 | memfit source", "torch": "2.11",
                                 "triton": "3.6", "date": "today", "entries": entries}))
        return str(p)

    a = collected("a.json", {"k1": {"timed": [[10.0, cfg(64)], [10.5, cfg(128)], [11.2, cfg(32)],
                                              [11.9, cfg(16)], [20.0, cfg(8)]]},
                             "k2": {"timed": [[5.0, cfg(64)]]}, "k3": {"timed": []}})
    b = collected("b.json", {"k2": {"timed": [[4.0, cfg(256)], [4.1, cfg(64)]]}})
    out = tmp_path / "table.json"
    r = subprocess.run([sys.executable, str(BENCH / "choice_table.py"), "--build", a, b,
                        "--top", "3", "--margin", "0.1", "--out", str(out)],
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.loads(out.read_text())["arch"]["sm90"]
    assert table["k1"]["configs"] == [cfg(64), cfg(128)]  # 11.2 is past 10% of 10.0
    assert table["k1"]["of"] == 5 and table["k1"]["best_us"] == 10.0
    assert table["k2"]["configs"] == [cfg(256), cfg(64)]  # the later file's timing
    assert "k3" not in table  # nothing timed: no entry


def test_every_benchmark_import_of_another_script_names_what_it_defines():
    """`from benchmarks.X import a, b` in a script: X.py exists and defines a and b at top level
    (a script renamed or a helper moved broke six GPU scripts at once, unseen on the CPU)."""
    import ast

    trees = {p.stem: ast.parse(p.read_text()) for p in sorted(BENCH.glob("*.py"))}
    defined = {}
    for stem, tree in trees.items():
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(
                    node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        defined[stem] = names
    broken, seen = [], 0
    for stem, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                seen += 1
                mod = node.module.split(".", 1)[1]
                missing = [a.name for a in node.names if a.name not in defined.get(mod, ())]
                if mod not in defined or missing:
                    broken.append(f"{stem}.py: from {node.module} import {missing or '?'}")
    assert seen >= 5
    assert broken == [], broken


def test_eager_host_uncached_constants_are_the_kernels_own(monkeypatch):
    """benchmarks/eager_host.py's "uncached" mode rebuilds the mma kernel's launch constants on
    every call; it must build what `triton_mma.constants` does for every argument (those added
    after `prefetch`, `even` and `wide`, once landed in the wrong parameters)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import eager_host

    from memfit.kernels import triton_mma
    for args in [(1, 128, 1, "bf16", False, 128, 4, 1, 64, False, 4, False, True, 2, True),
                 (1, 64, 1, "bf16", False, 128, 4, 1, 0, True, 4, False, True, 1, True, True),
                 (16, 128, 0, "f16", True, 64, 2, 1, 0, False, 2, True, True)]:
        assert eager_host._uncached(*args) == triton_mma.constants(*args)


def test_prefill_turns_time_every_variant_in_each_round(monkeypatch):
    """benchmarks/prefill.py's `turns_ms`: each round switches to every variant in order, warms
    each prompt once, then times `reps` forwards; medians and minima per variant and prompt."""
    import types
    monkeypatch.syspath_prepend(str(BENCH))
    import decode_gpu
    import prefill
    monkeypatch.setattr(decode_gpu, "DEV", "cpu")
    now, calls = [0.0], []
    monkeypatch.setattr(prefill, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def forward(name, ms_per_token):
        def run(p):
            calls.append((name, p))
            now[0] += ms_per_token * p / 1e3 * (1 + len(calls) % 3)  # 1x, 2x or 3x: a spread
        return run
    variants = {v: (lambda v=v: calls.append(v), forward(v, c)) for v, c in (("a", 1.0),
                                                                             ("b", 2.0))}
    out = prefill.turns_ms(variants, [1, 4], rounds=2, reps=3)
    one_round = [v for name in "ab" for v in [name] + [(name, 1)] * 4 + [(name, 4)] * 4]
    assert calls == one_round * 2
    for v, c in (("a", 1.0), ("b", 2.0)):
        for p in (1, 4):
            got = out[v][f"P{p}_all"]
            assert len(got) == 6 and all(x in (c * p, 2 * c * p, 3 * c * p) for x in got)
            assert out[v][f"P{p}_min_ms"] == min(got)
            assert out[v][f"P{p}_ms"] == round(sorted(got)[2] / 2 + sorted(got)[3] / 2, 2)
