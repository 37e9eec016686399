"""Lower the Triton backend for CUDA through the real jax-triton, on a machine with no GPU.

While lowering, jax-triton builds each kernel's signature from the call's arguments (in
its own order) and compiles the kernel with triton for the given compute capability, as
it will on a GPU: a kernel whose parameters do not match its call fails here. It needs
jax-triton and the jax CUDA plugin's `_triton` extension (`jax-cuda12-plugin` of the
installed jax's version, installed without its PJRT package, so jax stays on the CPU).
Importing that plugin logs "Could not find cuda drivers" on every `import jax`, so it is
kept in its own directory and this runs in its own process:

    PYTHONPATH=DIR python -m tests.triton_cuda_lowering    # DIR: jax-cuda12-plugin, jax-triton

Exits non-zero unless the lowered step holds the expected Triton launches, for each MLP
precision and for 3 vmapped tasks with their own theta (folded into the grid, not a loop),
4 tasks over an abstract mesh of 2 GPUs as meta-training runs them (`local_tasks`: each
device's launches take its 2 tasks' operands), and the apply launches update the state
in place: each aliases its p, mom, rms (and a small tensor's v) operands to its outputs,
and none does with `in_place=False` (fresh outputs);
and unless the launches are jaxlib's FFI Triton calls carrying the kernel-call protos
that jax-triton's legacy calls carry (`lopt_fast.kernels.ffi_call`).
"""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp

from lopt_fast.kernels import ffi_call, triton_update
from lopt_fast.learned import AdafacMLPLOpt
from lopt_fast.meta import local_tasks
from lopt_fast.pallas import abstract_gpu

# Factored tensors (3 launches per run of them alike in tile and dtype: row/col sums,
# moments, apply; here the float32 ones share a tile, the bf16 one is a run of its own)
# and non-factored ones (2 launches for both: moments, apply).
SHAPES = {"matrix": (130, 290), "conv": (3, 3, 16, 32), "bf16": (20, 6), "vector": (7,),
          "scalar": ()}
NUM_FACTORED, FACTORED_RUNS, NUM_SMALL = 3, 2, 2
H100 = 90
EXPECTED_LAUNCHES = 3 * FACTORED_RUNS + 2
# p, mom, rms per factored tensor; p, mom, rms, v_diag per small one (each in place)
EXPECTED_ALIASES = 3 * NUM_FACTORED + 4 * NUM_SMALL


def lowered_step(mlp_precision: str = "tf32", tasks: int | None = None, layer1: str = "dot",
                 persistent: bool = False, in_place: bool = True,
                 launcher: str = "jax_triton", shapes: dict | None = None,
                 devices: int | None = None) -> list[str]:
    """The step's Triton launches, lowered for CUDA (lines of StableHLO text): jax-triton's
    custom calls, or with launcher="xla" XLA's own Triton calls. `shapes`: the params'
    (default SHAPES; a key "bf16" is a bf16 tensor). `devices`: the vmapped `tasks` split
    over an abstract mesh of that many GPUs by `local_tasks`."""
    lopt = AdafacMLPLOpt(hidden_size=32)
    theta = lopt.init(jax.random.key(0))
    params = {k: jnp.full(s, 0.5, jnp.bfloat16 if k == "bf16" else jnp.float32)
              for k, s in (shapes or SHAPES).items()}
    state = lopt.opt_fn(theta, backend="reference").init(params, num_steps=50)
    step = lambda t, s, g: triton_update(lopt, t, s, g, mlp_precision=mlp_precision,  # noqa: E731
                                         compute_capability=H100, layer1=layer1,
                                         persistent=persistent, in_place=in_place,
                                         launcher=launcher)
    if tasks:
        step = jax.vmap(step)
        theta, state, params = jax.tree.map(
            lambda x: jnp.stack([x] * tasks), (theta, state, params))
    with abstract_gpu(axes={"tasks": devices}) if devices else contextlib.nullcontext():
        if devices:
            step = local_tasks(step, (0, 0, 0))
        text = jax.jit(step).trace(theta, state, params).lower(
            lowering_platforms=("cuda",)).as_text()
    return [line for line in text.splitlines()
            if "custom_call @triton_kernel_call" in line or "__gpu$xla.gpu.triton" in line]


def lowered_launches(*args, **kw) -> tuple[int, int]:
    """(Triton launches, input -> output aliases) in the step lowered for CUDA."""
    launches = lowered_step(*args, **kw)
    return len(launches), sum(line.count("stablehlo.output_operand_alias<") for line in launches)


def payloads(launches: list[str]) -> list[str]:
    """Each launch's kernel-call proto (zlib-compressed, as MLIR escapes it)."""
    return [re.search(r'(?:opaque|backend_config) = "([^"]*)"', line).group(1)
            for line in launches]


def check_ffi_form():
    """Launches go to jaxlib's FFI Triton call (API version 4, the kernel-call proto as its
    `opaque` attribute), which XLA can record into CUDA graphs where jaxlib declares it
    command-buffer compatible; the "jax_triton_legacy" launcher gives jax-triton's legacy
    call, with the same payloads."""
    ffi = lowered_step()
    assert all("custom_call @triton_kernel_call_ffi(" in line and "api_version = 4" in line
               and "backend_config = {opaque = " in line for line in ffi), ffi[0][:300]
    legacy = lowered_step(launcher="jax_triton_legacy")
    assert all("custom_call @triton_kernel_call(" in line and "api_version = 2" in line
               for line in legacy), legacy[0][:300]
    assert payloads(ffi) == payloads(legacy), "the FFI calls carry other kernel calls"
    print(f"{len(ffi)} launches as {ffi_call.FFI_TARGET} (API version 4), the same payloads "
          f"as the legacy {ffi_call.LEGACY_TARGET}")


if __name__ == "__main__":
    for precision, tasks, layer1, persistent, in_place in (
            ("tf32", None, "dot", False, True), ("ieee", None, "dot", False, True),
            ("tf32", 3, "dot", False, True),
            ("tf32", 3, "dot_all", False, True), ("bf16", None, "dot", False, True),
            ("bf16", 3, "dot_all", True, True), ("tf32", 3, "dot", False, False)):
        launches, aliases = lowered_launches(precision, tasks, layer1, persistent, in_place)
        case = (f"{precision}, {tasks or 1} task(s), layer 1 as {layer1}"
                + (", persistent apply" if persistent else "")
                + ("" if in_place else ", fresh outputs"))
        expected_aliases = EXPECTED_ALIASES if in_place else 0
        print(f"{case}: {launches} Triton launches lowered for sm_{H100} (expected "
              f"{EXPECTED_LAUNCHES}), {aliases} in-place operands (expected {expected_aliases})")
        assert launches == EXPECTED_LAUNCHES, f"{case}: {launches} launches"
        assert aliases == expected_aliases, f"{case}: {aliases} aliased operands"
    check_ffi_form()
    sharded = lowered_step(tasks=4, devices=2)
    # the matrix's operands: [tasks, B = 1, 130, 290]
    task_counts = {int(n) for line in sharded for n in re.findall(r"tensor<(\d+)x1x130x290xf32>", line)}
    print(f"4 tasks over 2 GPUs: {len(sharded)} Triton launches, the matrix's operands "
          f"for {sorted(task_counts)} task(s) (expected [2])")
    assert len(sharded) == EXPECTED_LAUNCHES and task_counts == {2}, sharded[0][-600:]
