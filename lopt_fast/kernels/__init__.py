"""Fused optimizer-step kernels in Triton, launched through jax-triton (the `gpu` extra).

Importing this package needs `triton`; `jax_triton` is imported at launch time.
"""

from lopt_fast.kernels.adafac_triton import TritonKernels, triton_update

__all__ = ["TritonKernels", "triton_update"]
