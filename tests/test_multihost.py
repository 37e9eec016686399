"""Multi-host meta-training, run as two CPU processes joined by `jax.distributed`.

Two processes with 2 CPU devices each (4 global devices) run `lopt-fast meta-train`
into one output folder, as docs/META.md describes, stop after 2 outer steps and resume
to 3; the result must equal one uninterrupted process with 4 devices.
"""

import json
import socket
import subprocess
import sys

import numpy as np

from tests.helpers import host_devices_env

LAUNCH = """
import sys
import jax
process_id, num_processes, port, out, steps = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                               sys.argv[4], sys.argv[5])
if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id)
assert jax.device_count() == 4, jax.devices()
from lopt_fast import cli
sys.exit(cli.main(["meta-train", "--num-tasks", "4", "--outer-steps", steps, "--inner-steps", "12",
                   "--trunc-length", "4", "--outer-lr", "OUTER_LR", "--no-progress",
                   "--out", out]))
"""
OUTER_LR = 3e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _theta(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files if data[k].dtype.kind == "f"}


def _run(process_id, num_processes, port, out, steps, devices):
    launch = LAUNCH.replace("OUTER_LR", str(OUTER_LR))
    return subprocess.Popen([sys.executable, "-c", launch, str(process_id), str(num_processes), port,
                             str(out), str(steps)], env=host_devices_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs):
    outs = [p.communicate(timeout=540)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_processes_resume_and_equal_one(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    port = str(_free_port())
    _finish([_run(i, 2, port, multi, 2, devices=2) for i in range(2)])
    port = str(_free_port())
    outs = _finish([_run(i, 2, port, multi, 3, devices=2) for i in range(2)])
    assert all("resumed from checkpoint at outer step 2" in out for out in outs)
    _finish([_run(0, 1, port, single, 3, devices=4)])

    got, want = _theta(multi / "theta.npz"), _theta(single / "theta.npz")
    assert got.keys() == want.keys()
    # The two runs sum the tasks' meta-gradients across devices in different orders, and
    # Adam divides each entry by its own scale, so a near-cancelling entry's rounding can
    # move theta by a small fraction of the learning rate (1.4e-6, 5e-4 of it, in one clean-clone CI run).
    # A lost or repeated step, or a wrong shard, moves entries by about the lr itself.
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-2 * OUTER_LR, err_msg=k)
    # Only process 0 writes: one metrics line per logged step, not one per process.
    steps = [json.loads(x)["step"] for x in (multi / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3]
