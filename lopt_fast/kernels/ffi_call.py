"""jax-triton launches lowered to jaxlib's FFI Triton call, `triton_kernel_call_ffi`.

jax-triton 0.3.1 (its newest release) lowers every `triton_call` to the legacy custom call
`triton_kernel_call`. XLA cannot record a legacy custom call into a command buffer (a CUDA
graph), so each launch splits the step's graphs into pieces the host launches one by one:
compiled for an H100 with jax 0.10.2 (`profiling/xla_kernels.py`), a step of 64 tasks x
the small convnet is 40 host launches with the Triton backend and 1 with the Pallas
backend, whose kernels are XLA's own Triton fusions (one graph of 77 thunks).

jaxlib registers the same kernel-call handler through XLA's FFI as `triton_kernel_call_ffi`:
the same zlib-compressed `TritonKernelCall` proto, passed as the `opaque` attribute of an
API-version-4 custom call. It is what Pallas lowers to after jaxlib 0.10.2 and what
jax-triton's unreleased main branch emits, and a jaxlib source newer than 0.10.2 declares
that handler command-buffer compatible (which release ships that is unchecked; 0.10.2's
handler is not: its FFI calls stay outside graphs too).
`call_target()` names the target the Triton backend launches with: the FFI one where
jaxlib registers it and this jax-triton's lowering is the one wrapped here (0.3.x), unless
the launcher is "jax_triton_legacy"; jax-triton's lowering is wrapped once so that a launch
with that target is rewritten to the FFI form after jax-triton builds it (its own lowering
would mark it API version 2).
"""

from __future__ import annotations

import functools

FFI_TARGET = "triton_kernel_call_ffi"
LEGACY_TARGET = "triton_kernel_call"


def ffi_target_registered() -> bool:
    """Whether this jaxlib's CUDA plugin registers the FFI Triton call (private jaxlib API:
    any surprise reads as no)."""
    try:
        from jax._src.lib import gpu_triton

        return FFI_TARGET in gpu_triton._cuda_triton.registrations()
    except Exception:  # noqa: BLE001 -- no plugin (None), another jaxlib layout, ...
        return False


def call_target(legacy: bool = False) -> str:
    """The custom-call target for the next jax-triton launch (see the module docstring)."""
    if legacy or not ffi_target_registered():
        return LEGACY_TARGET
    return FFI_TARGET if _wrap_jax_triton_lowering() else LEGACY_TARGET


@functools.cache
def _wrap_jax_triton_lowering() -> bool:
    """Wrap jax-triton's CUDA lowering (once); False where this jax-triton has not the
    lowering it is written for."""
    from jax.interpreters import mlir
    from jax_triton import triton_lib

    if not all(hasattr(triton_lib, name) for name in
               ("triton_kernel_call_lowering", "get_cuda_backend", "triton_kernel_call_p")):
        return False
    jax_triton_lowering = functools.partial(triton_lib.triton_kernel_call_lowering,
                                            triton_lib.get_cuda_backend)

    def lowering(ctx, *args, custom_call_target_name, **params):
        results = jax_triton_lowering(ctx, *args, custom_call_target_name=custom_call_target_name,
                                      **params)
        if custom_call_target_name == FFI_TARGET:
            _as_ffi_call(results[0].owner)
        return results

    mlir.register_lowering(triton_lib.triton_kernel_call_p, lowering, platform="cuda")
    return True


def _as_ffi_call(op) -> None:
    """jax-triton's custom call (API version 2, the proto as its backend config) as an FFI
    call: API version 4, the proto as the `opaque` attribute. Operands, results, layouts
    and in-place aliases stay as jax-triton made them."""
    from jax._src.lib.mlir import ir

    opaque = op.attributes["backend_config"]
    op.attributes["api_version"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 4)
    op.attributes["backend_config"] = ir.DictAttr.get({"opaque": opaque})
