"""Fused optimizer-step kernels in Pallas (interpret mode on CPU, Triton lowering on GPU)."""

from lopt_fast.pallas.adafac_step import PallasKernels, pallas_update
from lopt_fast.pallas.blocks import BlockSizes, block_sizes, packed_block_sizes, padded_hidden

__all__ = ["BlockSizes", "PallasKernels", "block_sizes", "packed_block_sizes", "padded_hidden",
           "pallas_update"]
