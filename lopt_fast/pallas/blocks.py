"""Block sizes and launch settings of the fused AdafacMLP step: the one place they are chosen.

Both the Pallas kernels (`lopt_fast.pallas.adafac_step`) and the Triton kernels
(`lopt_fast.kernels.adafac_triton`) take their tiles from `block_sizes` (the apply pass)
and `reduction_block_sizes` (the two reduction passes).

Constraints behind the numbers:
  * Triton (and the Pallas Triton lowering) needs power-of-two array shapes, and
    `tl.dot` needs M, N, K >= 16: tiles are powers of two with rows * cols >= 16, the
    MLP width is padded to `padded_hidden(H)` >= 16 (zero rows/columns are exact:
    relu(0) = 0 contributes nothing).
  * Pass 3 holds a [rows * cols, H] activation tile in registers; about 8K float32
    values per program (64 per thread at 4 warps) keeps it out of local memory, so a
    tile has `8192 // H_pad` elements (512 at H <= 16, 256 at H = 32), capped at 1024.
    The reduction passes hold no activations: `REDUCTION_TILE` (1024) elements.
  * Tiles never exceed the (power-of-two-rounded) tensor, so small tensors get small
    tiles; edges are masked in-kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

TILE_VALUES = 8192  # float32 activations per program in pass 3
MAX_TILE = 1024
PACKED_COLS = 128  # lane width of the packed buffer for non-factored tensors
REDUCTION_TILE = 1024  # elements per program of the reduction passes (`reduction_block_sizes`)
# Factored tensors whose [U, V] planes all fit one tile of this many elements get their
# row / column sums, new Adafactor accumulators and factors from one launch (`plane_tile`,
# `Kernels.group_sides`), not the sums pass and XLA's kernels between the passes.
PLANE_TILE_MAX = 4096
SHARED_TILE_MAX_ELEMENTS = 1 << 18  # factored tensors this small share a tile (`group_block_sizes`)
SHARED_TILE_SLACK = 1 << 14  # lanes a shared tile may cover whatever the tensor's own cover
# The row / column sums pass sums up to this many reduction tiles of rows per program
# (`sums_row_chunks`): its per-column partial sums (summed afterwards) are then up to 8x
# fewer than the tensor's elements, where one 1 x 1024 tile per program wrote as many as
# it read (8 B / param of extra traffic for a large matrix).
REDUCTION_ROW_CHUNKS = 8
# How the apply kernels run layer 1 and the dots' operands (`triton_update`'s and
# `pallas_update`'s `layer1` / `mlp_precision`; lopt_fast/kernels/adafac_triton.py says
# what each does). Here, not there, so tools can offer them without importing triton.
LAYER1_FORMS = ("dot", "dot_all")
MLP_PRECISIONS = ("tf32", "ieee", "bf16", "tf32_fp16")
# "tf32_fp16" runs the dots whose operands have unit scale (the H x H layers and the
# output layer; "dot_all"'s normalised per-row / per-column features) on fp16, whose
# 10-bit mantissa is TF32's, clamped to fp16's largest finite value; the raw per-element
# features' dot stays TF32, their range being too wide for fp16.
FP16_MAX = 65504.0
# The compiled apply kernels of both backends turn a ReLU's float32 result into a 16-bit
# dot operand with one PTX instruction per pair of elements (cvt with .relu, and for
# fp16 .satfinite, which saturates at FP16_MAX: PTX 8.1, sm_80+, as bf16 and TF32 dots
# are), as inline assembly whose $1 is the pair's first element (the low half).
RELU_CASTS = {"fp16": "cvt.rn.relu.satfinite.f16x2.f32 $0, $2, $1;",
              "bf16": "cvt.rn.relu.bf16x2.f32 $0, $2, $1;"}
# Against a floor other than 0 (the Pallas kernels' H x H layers, `plan.mlp_weights`):
# the rounding, then a packed max with the floor pair ($3, already of the 16-bit type),
# two instructions per pair.
FLOOR_CASTS = {
    "fp16": "{ .reg .b32 t; cvt.rn.satfinite.f16x2.f32 t, $2, $1; max.f16x2 $0, t, $3; }",
    "bf16": "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $2, $1; max.bf16x2 $0, t, $3; }"}
# The order in which the Pallas kernels walk a factored tensor's tiles
# (`pallas_update(..., tile_order=...)`): "rows", across a row block's column blocks,
# then down (row-major, the default); "columns", down a column block's row blocks, then
# across, the Triton kernels' fixed order (`adafac_triton._member_tile`). Consecutive
# programs run on different SMs, so with "columns" (and more row blocks than programs in
# flight) every SM works on one column block at a time, and the per-column operands of
# the apply kernel (tv: "dot"'s table, [256, Hp] floats per 1x256 tile, 128 B per
# element, or "dot_all"'s 8 features, 32 B) can come from L2 once per SM and then from
# its L1, unless the stream of p, g, m, rms evicts them first; with "rows" the programs
# an SM runs are in different column blocks, so each reads its own from L2. Untimed
# (session 23, no GPU): `benchmarks/tile_sweep.py --tile-order`, with ncu's L2
# throughput (`profiling/ncu_step.py`).
TILE_ORDERS = ("rows", "columns")
# How `triton_update` launches its kernels (`launcher`, or this environment variable):
# through jax-triton as jaxlib's FFI Triton call (`lopt_fast.kernels.ffi_call`), through
# jax-triton's own legacy call, or as XLA's own Triton calls (`lopt_fast.kernels.xla_call`).
TRITON_LAUNCHERS = ("jax_triton", "jax_triton_legacy", "xla")
TRITON_LAUNCHER_ENV_VAR = "LOPT_FAST_TRITON_LAUNCHER"
# Triton's persistent apply kernel (`triton_update(..., persistent=True)`): programs per SM.
# Compiled for sm_90 (H = 32, 1x256 or 4x64 tiles, 4 warps, 2-3 stages) it needs 178-255
# registers, so two programs of 4 warps fit on an SM.
PERSISTENT_PROGRAMS_PER_SM = 2
# Tensors per multi-tensor launch (both backends' member launches): the Triton apply pass
# takes 9 pointers per member, 2.3 KB of kernel parameters at 32 (4 KB on older CUDA).
MAX_MEMBERS = 32
# Pallas' member launches give each tensor refs and memory operations of its own, and
# Triton's coalescing pass walks the whole kernel once per memory operation, so compile
# time grows with the square of the members. Compiled for sm_90 on the 2-core CPU machine
# (triton 3.6.0, H = 32, layer 1 as a dot): the apply kernel of 1 / 4 / 8 factored
# tensors took 1.9 / 7.3 / 34.9 s, the vectors' 1.2 / 3.4 / 15.7 / 88.8 s at 1 / 4 / 8 /
# 16. At 4 a launch costs what its tensors' own launches would; Pallas packs more
# vectors than this into one buffer instead (`plan._packed_leaves`). Triton's member
# kernels select one set of pointers instead, so their compile time does not grow so.
PALLAS_MAX_MEMBERS = 4


def check_choice(name: str, value, choices: tuple) -> None:
    """A ValueError naming the choices unless `value` (the option `name`) is one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def member_runs(keys: Sequence, max_members: int | None = None) -> list[range]:
    """Consecutive runs of members with equal `keys` (e.g. their dtypes), at most
    `max_members` (default `MAX_MEMBERS`, read at call time) long: the members that can
    share a launch, in order."""
    max_members = max_members or MAX_MEMBERS
    runs, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start] or i - start == max_members:
            runs.append(range(start, i))
            start = i
    return runs


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def padded_hidden(hidden: int) -> int:
    """MLP width inside the kernels: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(hidden))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile of one program: `rows` x `cols` of the canonical [B, U, V] view of a
    tensor (cols along the minor axis), plus GPU launch settings."""

    rows: int
    cols: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 1, got {v}")
        if self.rows * self.cols < 16:
            raise ValueError(f"a tile needs >= 16 elements (tl.dot's M), got {self.rows}x{self.cols}")

    @classmethod
    def parse(cls, text: str, **launch) -> BlockSizes:
        """A tile written "RxC" (the tools' command lines), with launch settings `launch`."""
        rows, cols = (int(x) for x in text.split("x"))
        return cls(rows, cols, **launch)


def tile_elements(hidden: int) -> int:
    return max(16, min(MAX_TILE, TILE_VALUES // padded_hidden(hidden)))


def _tile_of(u: int, v: int, target: int) -> BlockSizes:
    """About `target` elements: along the contiguous axis first, never past the tensor."""
    cols = min(next_pow2(v), target)
    rows = min(next_pow2(u), max(1, target // cols))
    rows = max(rows, 16 // cols)  # tl.dot needs M >= 16; extra rows are masked
    return BlockSizes(rows=rows, cols=cols)


def block_sizes(u: int, v: int, hidden: int) -> BlockSizes:
    """Tile of the apply pass for a canonical [B, u, v] tensor view with MLP width `hidden`."""
    return _tile_of(u, v, tile_elements(hidden))


def reduction_block_sizes(u: int, v: int) -> BlockSizes:
    """Tile of the two reduction passes (row / column sums, feature moments) of a [B, u, v]
    view. They hold no activations, so a tile can be 4x the apply pass's: each tile ends
    in 16 block-wide sums (shuffles and barriers), which a bigger tile amortises. Compiled
    for sm_90 at 4 warps the Triton moments kernel issues 133 instructions per parameter
    at 1024 elements against 348 at 256 (96 registers, 20 warps per SM)."""
    return _tile_of(u, v, REDUCTION_TILE)


def sums_row_chunks(tile: BlockSizes, us: Sequence[int]) -> int:
    """Reduction tiles of rows that one program of the row / column sums pass sums, for
    tensors of `us` rows sharing `tile`: up to `REDUCTION_ROW_CHUNKS`, never more than the
    tallest has. Triton loops over them; Pallas takes them as one taller tile
    (`sums_tile`)."""
    return max(min(REDUCTION_ROW_CHUNKS, -(-u // tile.rows)) for u in us)


def sums_tile(tile: BlockSizes, us: Sequence[int]) -> BlockSizes:
    """The Pallas row / column sums pass's tile: `tile` with `sums_row_chunks` (rounded up to
    a power of two) times its rows, at 8 warps past 4096 elements (the tile is loaded
    whole: 32 floats per thread)."""
    rows = tile.rows * next_pow2(sums_row_chunks(tile, us))
    return dataclasses.replace(tile, rows=rows,
                               num_warps=8 if rows * tile.cols > 4096 else tile.num_warps)


def _lanes(view: tuple[int, int, int], tile: BlockSizes) -> int:
    """The elements a [B, U, V] tensor's tiles cover, masked ones included."""
    b, u, v = view
    return b * -(-u // tile.rows) * tile.rows * -(-v // tile.cols) * tile.cols


def _shared_tile(views: list[tuple[int, int, int]], elements: int) -> BlockSizes:
    """Of the tiles of `elements` elements with rows of at least 32 floats (a warp reads
    whole 128-byte lines), the one that covers `views` with the fewest lanes."""
    tiles = [BlockSizes(rows=elements // c, cols=c)
             for c in (1 << k for k in range(5, elements.bit_length())) if c <= elements]
    return min(tiles, key=lambda t: (sum(_lanes(x, t) for x in views), -t.cols))


def group_block_sizes(views: list[tuple[int, int, int]], hidden: int
                      ) -> tuple[list[BlockSizes], list[BlockSizes]]:
    """Apply and reduction tiles of factored tensors [B, U, V] updated together.

    Each gets its own, except that the tensors of at most `SHARED_TILE_MAX_ELEMENTS`
    elements take one tile where it costs them little: a launch covers tensors of one
    tile (both backends' member launches), and small tensors are many (a convnet's 4
    took 9 launches with their own tiles, 3 with one). The shared tile is the full-size
    one that covers the small tensors with the fewest lanes; a tensor keeps its own if
    the shared one would cover more than twice its own tiles' lanes and over
    `SHARED_TILE_SLACK` of them (a tall, narrow tensor under a wide tile). The reduction
    passes' shared tile is instead the widest, up to the small tensors' widest rows,
    that all of them take. The small convnet's 4 share 8 x 32 (apply, 95% of the lanes
    used) and 16 x 64 tiles.
    """
    apply = [block_sizes(u, v, hidden) for _, u, v in views]
    reduce = [reduction_block_sizes(u, v) for _, u, v in views]
    small = [j for j, (b, u, v) in enumerate(views) if b * u * v <= SHARED_TILE_MAX_ELEMENTS]
    if not small:
        return apply, reduce

    def fits(j, tile, own):
        return _lanes(views[j], tile) <= max(2 * _lanes(views[j], own[j]), SHARED_TILE_SLACK)

    # The reduction passes' masked lanes cost little (no loads), partial sums over several
    # column tiles a kernel: the widest tile up to the small tensors' widest rows that
    # all of them take, else the apply rule.
    widest = min(max(32, next_pow2(max(views[j][2] for j in small))), REDUCTION_TILE)
    wide = [BlockSizes(rows=REDUCTION_TILE // c, cols=c)
            for c in (widest >> k for k in range(widest.bit_length())) if c >= 32]
    shared_reduce = next((t for t in wide if all(fits(j, t, reduce) for j in small)),
                         _shared_tile([views[j] for j in small], REDUCTION_TILE))
    shared_apply = _shared_tile([views[j] for j in small], tile_elements(hidden))
    for tiles, shared in ((apply, shared_apply), (reduce, shared_reduce)):
        for j in [j for j in small if fits(j, shared, tiles)]:
            tiles[j] = shared
    return apply, reduce


def plane_tile(planes: Sequence[tuple[int, int]]) -> BlockSizes | None:
    """The one tile that holds each of the [U, V] `planes` of factored tensors whole (the
    row / column sides pass, `Kernels.group_sides`), or None past `PLANE_TILE_MAX`
    elements."""
    rows = next_pow2(max(u for u, _ in planes))
    cols = max(16 // rows, next_pow2(max(v for _, v in planes)))
    if rows * cols > PLANE_TILE_MAX:
        return None
    return BlockSizes(rows=rows, cols=cols, num_warps=4 if rows * cols <= 2048 else 8,
                      num_stages=1)


def packed_block_sizes(hidden: int) -> BlockSizes:
    """Tile of the packed buffer that holds all non-factored (scalar / vector) tensors."""
    cols = PACKED_COLS
    return BlockSizes(rows=max(1, tile_elements(hidden) // cols), cols=cols)
