"""The benchmark scripts run end to end on CPU at tiny sizes, so a lent GPU's few minutes
are not lost to a broken script (`benchmarks/gpu_session.sh` runs them there)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from lopt_fast.pallas.blocks import TRITON_LAUNCHERS
from tests.helpers import ROOT, run_python


def _run(script, *args):
    return run_python([os.path.join("benchmarks", script), *args], script)


def test_step_benchmark_with_and_without_donation(tmp_path):
    for donate in ([], ["--donate"]):
        path = tmp_path / "step.json"
        _run("step.py", "--sizes", "2e3", "--tasks", "2", "--repeats", "2",
             "--backends", "reference", "--json", str(path), *donate)
        result = json.loads(path.read_text())
        assert result["info"]["donate"] == bool(donate)
        rows = {(r["workload"], r["backend"]): r for r in result["rows"]}
        assert set(rows) == {(w, b) for w in ("model 2e+03", "2 tasks x conv")
                             for b in ("optax.adam", "reference")}
        for (_, backend), row in rows.items():
            assert row["ms"] > 0 and row["GBps"] > 0, row
            if backend == "optax.adam":
                assert row["x_adam"] == 1.0


def test_step_benchmark_times_each_mlp_precision(tmp_path):
    path = tmp_path / "step.json"
    _run("step.py", "--sizes", "2e3", "--tasks", "--repeats", "1", "--backends", "reference",
         "pallas", "--mlp-precision", "tf32", "tf32_fp16", "--json", str(path))
    result = json.loads(path.read_text())
    assert result["info"]["mlp_precision"] == ["tf32", "tf32_fp16"]
    assert [r["backend"] for r in result["rows"]] == ["optax.adam", "reference", "pallas",
                                                      "pallas tf32_fp16"], result["rows"]


def test_tile_sweep_times_configurations_against_adam(tmp_path):
    path = tmp_path / "sweep.json"
    out = _run("tile_sweep.py", "--backend", "pallas", "--sizes", "2e3", "--tiles", "1x16",
               "--warps", "4", "--layer1", "dot", "dot_all", "--early-weights", "off", "on",
               "--repeats", "2", "--json", str(path))
    rows = [line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| 2,070")]
    expected = ["1x16 w4 dot tf32", "1x16 w4 dot tf32 early", "1x16 w4 dot_all tf32",
                "1x16 w4 dot_all tf32 early", "default", "optax.adam"]
    assert sorted(rows) == expected, out
    result = json.loads(path.read_text())
    assert result["ceilings"]["copy_GBps"] > 0 and result["ceilings"]["matmul_GFLOPs"] > 0
    rows = {r["config"]: r for r in result["rows"]}
    assert sorted(rows) == expected
    assert rows["optax.adam"]["x_adam"] == 1.0 and rows["default"]["x_default"] == 1.0
    for row in rows.values():  # against the same run's ceilings: a share, not a time
        assert 0 < row["pct_of_floor"] < 100, row
    out = _run("tile_sweep.py", "--backend", "pallas", "--sizes", "2e3", "--tiles", "1x16",
               "--warps", "4", "--reduction-tiles", "library", "same", "2x32", "--repeats", "1")
    rows = [line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| 2,070")]
    assert sorted(rows) == ["1x16 w4 dot tf32", "1x16 w4 dot tf32 reduction 2x32",
                            "1x16 w4 dot tf32 reduction same", "default", "optax.adam"], out


def test_reference_update_benchmark(tmp_path):
    path = tmp_path / "ref.json"
    _run("reference_update.py", "--trees", "1M", "--repeats", "1", "--no-literal", "--json",
         str(path))
    (row,) = json.loads(path.read_text())["rows"]
    assert row["params"] == 1024 * 1024 + 1024 and row["lopt_over_adam"] > 1, row


def test_launcher_check_reports_every_launcher():
    """benchmarks/launcher_check.py tries one Triton step per launcher: on a GPU all pass; on
    CPU each reports why it cannot run (jax-triton missing, XLA's Triton calls GPU-only) and
    the script exits non-zero, which is what makes gpu_session.sh fall back."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed (pip install 'lopt-fast[gpu]')")
    out = subprocess.run([sys.executable, os.path.join("benchmarks", "launcher_check.py")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    for launcher in TRITON_LAUNCHERS:
        assert f"{launcher}: " in out.stdout, out.stdout + out.stderr[-2000:]
    if jax.default_backend() == "cpu":
        assert out.returncode == 1 and "NVIDIA GPUs" in out.stdout, out.stdout
    else:
        assert out.returncode == 0, out.stdout + out.stderr[-2000:]
