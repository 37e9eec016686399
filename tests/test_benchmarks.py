"""The benchmark scripts run end to end on CPU at tiny sizes, so a lent GPU's few minutes
are not lost to a broken script (`benchmarks/gpu_session.sh` runs them there)."""

import json
import os

from tests.helpers import run_python


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


def test_tile_sweep_times_configurations_against_adam():
    out = _run("tile_sweep.py", "--backend", "pallas", "--sizes", "2e3", "--tiles", "1x16",
               "--warps", "4", "--layer1", "fma", "dot", "--repeats", "2")
    rows = [line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| 2,070")]
    assert sorted(rows) == ["1x16 w4 dot", "1x16 w4 fma", "default", "optax.adam"], out


def test_reference_update_benchmark(tmp_path):
    path = tmp_path / "ref.json"
    _run("reference_update.py", "--trees", "1M", "--repeats", "1", "--no-literal", "--json",
         str(path))
    (row,) = json.loads(path.read_text())["rows"]
    assert row["params"] == 1024 * 1024 + 1024 and row["lopt_over_adam"] > 1, row
