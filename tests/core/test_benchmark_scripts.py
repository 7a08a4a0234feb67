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
