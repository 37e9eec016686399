"""A swept configuration, as `tile_sweep.py --json` records its `options` (and
`pick_default.py` its pick), -> the keyword arguments of the backend's update.

    {"tile": "8x32", "warps": 4, "layer1": "dot_all", "mlp_precision": "tf32",
     "early_weights": False, "tile_order": "rows", "reduction": "library"}
    -> {"blocks": BlockSizes(8, 32, 4, 2), "layer1": "dot_all", "mlp_precision": "tf32",
        "early_weights": False, "tile_order": "rows", "reduction_blocks": ...}

`{}` is the library's defaults. The tile keys ("tile", "warps", "stages", "reduction")
were swept on one matrix; `form_options` leaves them out, so a configuration's kernel form
can be timed on other trees with the library's tiles (`step.py --pick`).
"""

from __future__ import annotations

from lopt_fast.pallas.blocks import BlockSizes, reduction_block_sizes

TILE_KEYS = ("tile", "warps", "stages", "reduction")


def _reduction_blocks(reduction: str, matrix: tuple[int, ...]) -> dict:
    """The update's `reduction_blocks` option for a --reduction-tiles value: the library's
    tile for the swept matrix, none (the apply tile's, "same"), or RxC."""
    if reduction == "same":
        return {}
    if reduction == "library":
        return {"reduction_blocks": reduction_block_sizes(matrix[0], matrix[-1])}
    return {"reduction_blocks": BlockSizes.parse(reduction)}


def update_options(spec: dict, matrix: tuple[int, ...]) -> dict:
    """The update's keyword arguments for `spec` on the swept `matrix` shape: its apply
    tile, kernel form and reduction tile."""
    if not spec:
        return {}
    form = form_options(spec)
    blocks = BlockSizes.parse(spec["tile"], num_warps=spec["warps"],
                              num_stages=spec.get("stages", 2))
    return {"blocks": blocks, **form, **_reduction_blocks(spec["reduction"], matrix)}


def form_options(spec: dict) -> dict:
    """`spec`'s kernel form alone (layer1, mlp_precision, early_weights, tile_order,
    persistent): the keyword arguments that hold for any tree."""
    return {k: v for k, v in spec.items() if k not in TILE_KEYS}
