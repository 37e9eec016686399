"""Fused optimizer-step kernels in Pallas (interpret mode on CPU, Triton lowering on GPU).

The kernels (and Pallas with its Triton lowering) load on first use of `pallas_update` or
`PallasKernels`, so that `blocks`' constants (the precision and layer-1 choices that
backend dispatch and the CLI validate) cost no more than their own module.
"""

from lopt_fast.pallas.blocks import BlockSizes, block_sizes, packed_block_sizes, padded_hidden

__all__ = ["BlockSizes", "PallasKernels", "abstract_gpu", "block_sizes", "packed_block_sizes",
           "padded_hidden", "pallas_update"]


def __getattr__(name):
    if name in ("PallasKernels", "pallas_update"):
        from lopt_fast.pallas import adafac_step

        return getattr(adafac_step, name)
    if name == "abstract_gpu":
        from lopt_fast.pallas import gpu_target

        return gpu_target.abstract_gpu
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
