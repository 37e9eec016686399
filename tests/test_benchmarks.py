"""The benchmark scripts run end to end on CPU at tiny sizes, so a lent GPU's few minutes
are not lost to a broken script (`benchmarks/gpu_session.sh` runs them there)."""

import json
import os
import subprocess
import sys

import jax

from lopt_fast.pallas.blocks import TRITON_LAUNCHERS
from tests.helpers import ROOT, needs_triton, run_python


def _run(script, *args):
    return run_python([os.path.join("benchmarks", script), *args], script)


def test_step_benchmark_with_and_without_donation_and_each_mlp_precision(tmp_path):
    """Both timing modes; the donated run also times each MLP precision asked for."""
    path = tmp_path / "step.json"
    _run("step.py", "--sizes", "2e3", "--tasks", "2", "--repeats", "2",
         "--backends", "reference", "--json", str(path))
    result = json.loads(path.read_text())
    assert result["info"]["donate"] is False
    rows = {(r["workload"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {(w, b) for w in ("model 2e+03", "2 tasks x conv")
                         for b in ("optax.adam", "reference")}
    for (_, backend), row in rows.items():
        assert row["ms"] > 0 and row["GBps"] > 0, row
        if backend == "optax.adam":
            assert row["x_adam"] == 1.0

    _run("step.py", "--sizes", "2e3", "--tasks", "--repeats", "1", "--backends", "reference",
         "pallas", "--mlp-precision", "default", "tf32_fp16", "--donate", "--json", str(path))
    result = json.loads(path.read_text())
    assert result["info"]["donate"] is True
    assert result["info"]["mlp_precision"] == ["default", "tf32_fp16"]
    assert [r["backend"] for r in result["rows"]] == ["optax.adam", "reference", "pallas",
                                                      "pallas tf32_fp16"], result["rows"]
    assert all(r["ms"] > 0 for r in result["rows"]), result["rows"]


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
    assert rows["1x16 w4 dot_all tf32 early"]["options"] == {
        "tile": "1x16", "warps": 4, "layer1": "dot_all", "mlp_precision": "tf32",
        "early_weights": True, "tile_order": "rows", "reduction": "library"}
    assert rows["default"]["options"] == {} and rows["optax.adam"]["options"] is None
    pick = _run("pick_default.py", str(path), "--json", str(tmp_path / "pick.json"))
    assert "pick for pallas: " in pick, pick
    out = _run("tile_sweep.py", "--backend", "pallas", "--sizes", "2e3", "--tiles", "1x16",
               "--warps", "4", "--reduction-tiles", "library", "same", "2x32", "--repeats", "1")
    rows = [line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| 2,070")]
    assert sorted(rows) == ["1x16 w4 dot tf32", "1x16 w4 dot tf32 reduction 2x32",
                            "1x16 w4 dot tf32 reduction same", "default", "optax.adam"], out


def _sweep_row(params, config, ms, iqr_ms, options):
    return {"params": params, "config": config, "ms": ms, "iqr_ms": iqr_ms,
            "pct_of_floor": 10.0, "x_default": None, "x_adam": ms, "options": options}


def test_pick_default_takes_only_a_win_beyond_the_spread_at_every_size(tmp_path):
    form = {"tile": "1x256", "warps": 4, "layer1": "dot_all", "reduction": "library"}
    rows = []
    for n, (default, fast, close, bf16, fast_then_slow) in {
            10: (1.0, 0.8, 0.95, 0.5, 0.7), 100: (7.0, 5.0, 6.5, 3.0, 7.5)}.items():
        rows += [_sweep_row(n, "optax.adam", 1.0, 0.01, None),
                 _sweep_row(n, "default", default, 0.02, {}),
                 _sweep_row(n, "fast", fast, 0.02, {**form, "mlp_precision": "tf32_fp16"}),
                 # beats the default by 0.05 at 10 against iqrs of 0.02 + 0.04
                 _sweep_row(n, "close", close, 0.04 if n == 10 else 0.02,
                            {**form, "mlp_precision": "tf32"}),
                 _sweep_row(n, "bf16", bf16, 0.02, {**form, "mlp_precision": "bf16"}),
                 _sweep_row(n, "fast then slow", fast_then_slow, 0.02,
                            {**form, "mlp_precision": "tf32"})]
    rows.append(_sweep_row(10, "one size only", 0.1, 0.01, {**form, "mlp_precision": "tf32"}))
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"backend": "pallas", "device": "test", "rows": rows}))
    out = _run("pick_default.py", str(path), "--json", str(tmp_path / "pick.json"))
    assert "1 configuration(s) beat the default" in out, out
    pick = json.loads((tmp_path / "pick.json").read_text())["pallas"]
    assert pick["config"] == "fast" and pick["options"]["mlp_precision"] == "tf32_fp16", out
    assert abs(pick["x_default"] - (0.8 * 5.0 / 7.0) ** 0.5) < 1e-9
    out = _run("pick_default.py", str(path), "--precisions", "tf32", "bf16",
               "--json", str(tmp_path / "pick.json"))
    assert json.loads((tmp_path / "pick.json").read_text())["pallas"]["config"] == "bf16", out
    out = _run("pick_default.py", str(path), "--precisions", "tf32",
               "--json", str(tmp_path / "pick.json"))
    assert "pick for pallas: none" in out, out
    assert json.loads((tmp_path / "pick.json").read_text()) == {"pallas": None}


def _step_file(path, pick_config, rows):
    path.write_text(json.dumps({"info": {"pick": {"pallas": {"config": pick_config}}},
                                "rows": [{"workload": w, "backend": b, "ms": ms, "iqr_ms": 0.01}
                                         for w, b, ms in rows]}))
    return str(path)


def test_step_times_the_pick_and_pick_default_checks_it(tmp_path):
    """The pick of a sweep goes through step.py --pick (as swept on the matrix, its kernel
    form on the tasks) and back into pick_default.py --step, whose verdict follows the
    iqr rule at every workload of every file that timed that pick."""
    form = {"tile": "1x16", "warps": 4, "layer1": "dot_all", "mlp_precision": "tf32",
            "early_weights": True, "tile_order": "rows", "reduction": "library"}
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"backend": "pallas", "device": "test", "rows": [
        _sweep_row(n, name, ms, 0.01, options) for n in (10, 100)
        for name, ms, options in (("default", 1.0, {}), ("fast", 0.5, form))]}))
    _run("pick_default.py", str(sweep), "--json", str(tmp_path / "pick.json"))
    out = _run("step.py", "--sizes", "2e3", "--tasks", "1", "--repeats", "1", "--backends",
               "pallas", "--pick", str(tmp_path / "pick.json"), "--json", str(tmp_path / "s.json"))
    assert "pallas pick on the tasks workloads: its kernel form" in out, out
    step = json.loads((tmp_path / "s.json").read_text())
    assert step["info"]["pick"]["pallas"]["config"] == "fast"
    assert [(r["workload"], r["backend"]) for r in step["rows"] if r["backend"] != "optax.adam"] \
        == [(w, b) for w in ("model 2e+03", "1 tasks x conv") for b in ("pallas", "pallas pick")]
    out = _run("pick_default.py", str(sweep), "--step", str(tmp_path / "s.json"))
    assert "pallas pick in" in out and "x default model 2e+03" in out, out

    kept = _step_file(tmp_path / "kept.json", "fast", [
        ("model", "pallas", 1.0), ("model", "pallas pick", 0.6),
        ("tasks", "pallas", 1.0), ("tasks", "pallas pick", 1.015)])  # within 2 x 0.01
    donated = _step_file(tmp_path / "donated.json", "fast", [
        ("model", "pallas", 1.0), ("model", "pallas pick", 0.6),
        ("tasks", "pallas", 1.0), ("tasks", "pallas pick", 1.03)])  # slower beyond them
    other = _step_file(tmp_path / "other.json", "another", [
        ("tasks", "pallas", 1.0), ("tasks", "pallas pick", 2.0)])
    out_json = tmp_path / "checked.json"
    out = _run("pick_default.py", str(sweep), "--step", kept, other, "--json", str(out_json))
    assert "step check for pallas: confirmed" in out, out
    check = json.loads(out_json.read_text())["pallas"]["step_check"]
    assert check["confirmed"] is True and list(check["x_default"]) == [kept], check
    out = _run("pick_default.py", str(sweep), "--step", kept, donated, "--json", str(out_json))
    assert f"step check for pallas: slower at {donated}: tasks" in out, out
    assert json.loads(out_json.read_text())["pallas"]["step_check"]["confirmed"] is False
    out = _run("pick_default.py", str(sweep), "--step", other)
    assert "step check for pallas: not timed by step.py --pick" in out, out


def test_reference_update_benchmark(tmp_path):
    path = tmp_path / "ref.json"
    _run("reference_update.py", "--trees", "1M", "--repeats", "1", "--no-literal", "--json",
         str(path))
    (row,) = json.loads(path.read_text())["rows"]
    assert row["params"] == 1024 * 1024 + 1024 and row["lopt_over_adam"] > 1, row


@needs_triton
def test_launcher_check_reports_every_launcher():
    """benchmarks/launcher_check.py tries one Triton step per launcher: on a GPU all pass; on
    CPU each reports why it cannot run (jax-triton missing, XLA's Triton calls GPU-only) and
    the script exits non-zero, which is what makes gpu_session.sh fall back."""
    out = subprocess.run([sys.executable, os.path.join("benchmarks", "launcher_check.py")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    for launcher in TRITON_LAUNCHERS:
        assert f"{launcher}: " in out.stdout, out.stdout + out.stderr[-2000:]
    if jax.default_backend() == "cpu":
        assert out.returncode == 1 and "NVIDIA GPUs" in out.stdout, out.stdout
    else:
        assert out.returncode == 0, out.stdout + out.stderr[-2000:]
