"""profiling/trace_step.py: a trace of one reference step on CPU reads as named scopes, and
GPU kernel events (pallas_call names, jax-triton kernel functions) map to their launches."""

import importlib.util
import os

from tests.helpers import ROOT, run_python

SCRIPT = os.path.join(ROOT, "profiling", "trace_step.py")


def _module():
    spec = importlib.util.spec_from_file_location("trace_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_events_map_to_their_launch():
    mod = _module()
    scopes = {"fusion.3": "adafac_leaf_0"}
    assert mod.scope_of("fusion.3", scopes) == "adafac_leaf_0"
    assert mod.scope_of("adafac_apply", scopes) == "adafac_apply"  # a named pallas_call
    assert mod.scope_of("_factored_apply_kernel", scopes) == "adafac_apply"  # jax-triton
    assert mod.scope_of("memcpy32_post", scopes) == "(other)"


def test_trace_of_a_reference_step_on_cpu(tmp_path):
    stdout = run_python([SCRIPT, "--params", "1e4", "--steps", "1", "--logdir", str(tmp_path)],
                        "trace_step.py", timeout=300)
    assert "adafac_leaf_" in stdout, stdout[-3000:]
