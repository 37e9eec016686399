"""The `lopt-fast` command line: a tiny end-to-end demo and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from lopt_fast import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DEMO = ["demo", "--inner-steps", "20", "--num-tasks", "2", "--trunc-length", "5",
             "--outer-steps", "3", "--adam-lrs", "0.01,0.1", "--adam-seeds", "1",
             "--eval-seeds", "2", "--eval-every", "5", "--ckpt-every", "2", "--no-progress",
             "--hidden-size", "4"]


def _run(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_demo_smoke(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    rc, out, err = _run(TINY_DEMO + ["--out", str(out_dir)], capsys)
    assert rc == 0, err
    assert {"curves.json", "demo.png", "summary.md", "theta.npz", "checkpoint.npz"} <= set(
        os.listdir(out_dir))
    curves = json.loads((out_dir / "curves.json").read_text())
    assert set(curves["adam"]) == {"0.01", "0.1"} and len(curves["learned"]) == 2
    assert len(curves["meta_training"]) == 3
    summary = (out_dir / "summary.md").read_text()
    assert "| optimizer | mean train loss | final train loss |" in summary
    assert "inner steps x tasks/s" in out and "outer steps/s" in out


def test_meta_train_resume_then_eval(tmp_path, capsys):
    out_dir = tmp_path / "mt"
    argv = ["meta-train", "--task", "quadratic", "--inner-steps", "10", "--num-tasks", "2",
            "--trunc-length", "5", "--outer-steps", "2", "--hidden-size", "4", "--no-progress",
            "--out", str(out_dir)]
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    assert {"theta.npz", "checkpoint.npz", "metrics.jsonl"} <= set(os.listdir(out_dir))
    # Re-running the finished command resumes from its checkpoint; other flags are refused.
    rc, out, err = _run(argv, capsys)
    assert rc == 0 and "resumed from checkpoint at outer step 2" in out, err
    rc, out, err = _run(argv[:-2] + ["--seed", "5", "--out", str(out_dir)], capsys)
    assert rc == 2 and "seed" in err
    rc, out, err = _run(["eval", "--task", "quadratic", "--theta", str(out_dir / "theta.npz"),
                         "--hidden-size", "4", "--inner-steps", "10", "--seeds", "1",
                         "--out", str(tmp_path / "ev")], capsys)
    assert rc == 0, err
    assert "mean train loss" in out and (tmp_path / "ev" / "curves.json").exists()


def test_bench_cifar10_on_synthetic_data(capsys):
    """The GPU throughput target's command runs without CIFAR-10 (or tfds); the kernels'
    `--mlp-precision` reaches the optimizer (the reference ignores it)."""
    rc, out, err = _run(["bench", "--task", "cifar10_conv", "--synthetic-data", "--num-tasks", "1",
                         "--trunc-length", "2", "--inner-steps", "4", "--steps", "1",
                         "--mlp-precision", "tf32_fp16"], capsys)
    assert rc == 0, err
    assert "task=cifar10_conv data=synthetic" in out
    match = re.search(r"throughput: ([\d,.]+) inner steps x tasks/s, ([\d.]+) outer steps/s", out)
    assert match and float(match.group(2)) > 0, out


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--task", "no-such-task"], "unknown task 'no-such-task'"),
    (["demo", "--num-tasks", "0"], "expected a positive integer"),
    (["demo", "--outer-lr", "-1"], "expected a positive number"),
    (["demo", "--adam-lrs", "0.1,x"], "comma-separated"),
    (["demo", "--backend", "cuda"], "backend"),
    (["bench", "--mlp-precision", "fp8"], "invalid choice: 'fp8'"),
    (["eval", "--theta", "/no/such/theta.npz"], "no file"),
    (["eval"], "exactly one of --theta"),
    (["meta-train"], "--out"),
    (["frobnicate"], "invalid choice"),
    (["bench", "--task", "digits_mlp", "--synthetic-data"], "--synthetic-data is for tasks"),
])
def test_bad_arguments_give_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    rc, out, err = _run(argv + (["--out", str(tmp_path)] if argv[0] == "demo" else []), capsys)
    assert rc == 2, (out, err)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lopt-fast: error:"), err
    assert needle in lines[0] and "Traceback" not in err


def test_console_script_reports_errors_without_traceback():
    exe = os.path.join(os.path.dirname(sys.executable), "lopt-fast")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "lopt_fast.cli"]
    proc = subprocess.run(cmd + ["eval", "--task", "nope", "--adam", "0.1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("lopt-fast: error: unknown task 'nope'")
    assert "Traceback" not in proc.stderr
