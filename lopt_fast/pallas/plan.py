"""Layout and between-pass math of the fused AdafacMLP step (shared by Pallas and Triton).

The kernels see two kinds of operand, both chosen so every access is a plain tile:

* a **factored** tensor (ndim >= 2) as a canonical view [B, U, V]: the two factored
  axes d1, d0 (`adafac_math.factored_dims`) last, in their original order, every
  other axis folded into B. When d0 and d1 already are the last two axes (matrices,
  HWIO convolutions, [heads, in, out] ...) the view is a free reshape; otherwise
  the tensor is transposed once on the way in and once on the way out. Whether U is
  the d1 axis (`u_is_row`) only decides which small per-row / per-column tables the
  wrapper hands the kernel, so the kernels never branch on it.
* all **non-factored** tensors (scalars and vectors) of a model **packed** into one
  [rows, 128] buffer, each tensor padded to whole tiles, so they take one launch per
  pass instead of one per tensor. Each tile knows its tensor through a static
  block -> segment map (the first-layer weights of its tensor) and its count of
  valid elements (masking pass 2's sums). Backends with **member** launchers (Triton,
  `lopt_fast.kernels.members`; Pallas for up to `blocks.PALLAS_MAX_MEMBERS` of them)
  tile the tensors the same way but read and write them where they lie, which saves
  the packing and unpacking kernels (17 of a 1e7-parameter step's 30 compiled for an
  H100).

The factored tensors take three passes, the non-factored ones two:
  1. `row_col_sums`: sum over V and over U of G = g^2 + 1e-30 (Adafactor's means);
  2. `moments`: per-tile sums of the squared per-element features (16 factored,
     22 not) from the recomputed accumulators; the wrapper adds the per-row /
     per-column feature moments;
  3. `apply`: recompute accumulators and features, layer 1 with the normalisation
     folded into w0 (and the per-row / per-column features folded into [U, H] /
     [V, H] tables, b0 and the time features into the row table), the rest of the
     MLP, and write params (in their dtype) and float32 accumulators.
Between passes the wrapper does only O(rows + cols) work per tensor, once for all
factored tensors together on flat row / column sides (`FactoredGroup`). Both backends
launch each pass once per run of (up to `blocks.MAX_MEMBERS`) tensors alike in tile and
dtype (Triton's member kernels, `lopt_fast.kernels.members`; Pallas' `MemberTiles`, at
most `blocks.PALLAS_MAX_MEMBERS` per launch).

`jax.vmap` over a task axis (with per-task theta) batches every `pallas_call` into
a leading grid axis, so all tasks share these launches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lopt_fast.learned import adafac_math as am
from lopt_fast.pallas.blocks import (
    FP16_MAX,
    BlockSizes,
    group_block_sizes,
    packed_block_sizes,
    padded_hidden,
    plane_tile,
)

NUM_SUMS = 32  # per-tile partial sums: 16 (factored) or 22 (packed) features, padded to 2^k
NUM_EW_FACTORED = 16
# Lanes of a factored tensor's sums that hold the sums of squares of its U / V side
# features (new accumulators v, rsqrt(v + 1e-8)), 3 planes each (`Kernels.group_moments`).
SIDE_LANES_U, SIDE_LANES_V = 16, 22
# Width of the per-row / per-column feature tables when a kernel runs those features
# through its layer-1 dot (`Kernels.row_col_in_dot`): 6 features, a 1 for b0, padding.
ROW_COL_TABLE_WIDTH = 8
ROW_COL_U_PLANES, ROW_COL_V_PLANES = 7, 6  # their columns before the padding
NUM_EW_PACKED = 22
# Layout of the `consts` vector every kernel reads (float32, length 16).
C_MOM, C_RMS, C_FAC, C_BOUT = 0, 3, 4, 7
NUM_CONSTS = 16
# The apply kernels update the state in place: each tile reads, then writes, only its own
# elements of p, mom, rms (and v_diag), so aliasing them to the outputs is safe; with the
# state donated the step needs no second copy of it, and without donation XLA copies first.
P, MOM, RMS, V_DIAG = 0, 2, 3, 4  # state arrays in a member launch's operands (g is 1)


def in_place_aliases(count: int, arrays: tuple[int, ...], in_place: bool) -> dict[int, int]:
    """An apply launch's operand -> output aliases, or none when not `in_place`. Its operands
    are consts, then each state array of its `count` tensors (p_0 .. p_{count-1}, g_0 ..,
    mom .., rms .., v_diag ..); output group o updates state array arrays[o] in place.

    Aliasing pays only when the caller donates the state (or carries it through a loop):
    XLA then updates it in its buffers. When the state is not donated, XLA must keep the
    operands, so it copies p, mom and rms first: 40 B/param moved on top of the step's
    72. Without aliases the kernels write fresh buffers and nothing is copied, but a
    donated state then costs the same copies at the end. Compiled for an H100
    (`profiling/xla_kernels.py`, 1e7 parameters): 3 copies either way round, 0 when
    aliasing matches donation.
    """
    if not in_place:
        return {}
    return {1 + a * count + i: o * count + i for o, a in enumerate(arrays) for i in range(count)}


class FactoredLayout(NamedTuple):
    """Static description of a factored tensor's canonical [B, U, V] view."""

    shape: tuple[int, ...]
    perm: tuple[int, ...] | None  # transpose into canonical axis order (None: identity)
    B: int
    U: int
    V: int
    u_is_row: bool  # U is the d1 axis (indexes v_row); else U is d0 (indexes v_col)
    row_perm: tuple[int, ...] | None  # v_row planes ([*shape \ d0]) to (others, d1)
    col_perm: tuple[int, ...] | None  # v_col planes ([*shape \ d1]) to (others, d0)
    row_shape: tuple[int, ...]  # v_row plane shape in canonical order
    col_shape: tuple[int, ...]


def factored_layout(shape: tuple[int, ...]) -> FactoredLayout:
    d1, d0 = am.factored_dims(shape)
    a, b = sorted((d0, d1))
    others = [ax for ax in range(len(shape)) if ax not in (d0, d1)]
    order = others + [a, b]
    ident = lambda p: None if list(p) == list(range(len(p))) else tuple(p)  # noqa: E731
    row_axes = [ax for ax in range(len(shape)) if ax != d0]
    col_axes = [ax for ax in range(len(shape)) if ax != d1]
    row_order = [row_axes.index(ax) for ax in others + [d1]]
    col_order = [col_axes.index(ax) for ax in others + [d0]]
    return FactoredLayout(
        shape=tuple(shape), perm=ident(order),
        B=int(np.prod([shape[ax] for ax in others], dtype=np.int64)), U=shape[a], V=shape[b],
        u_is_row=(a == d1), row_perm=ident(row_order), col_perm=ident(col_order),
        row_shape=tuple(shape[ax] for ax in others + [d1]),
        col_shape=tuple(shape[ax] for ax in others + [d0]))


def _to_canon(x, perm, lead: int, shape3):
    if perm is not None:
        x = jnp.transpose(x, tuple(range(lead)) + tuple(lead + q for q in perm))
    return x.reshape(x.shape[:lead] + tuple(shape3))


def _from_canon(x, perm, lead: int, permuted_shape):
    x = x.reshape(x.shape[:lead] + tuple(permuted_shape))
    if perm is not None:
        inv = np.argsort(perm)
        x = jnp.transpose(x, tuple(range(lead)) + tuple(lead + int(q) for q in inv))
    return x


class MLPWeights(NamedTuple):
    """Layers after the first, padded to width Hp (zeros are exact through relu), as the
    apply kernels run them (`mlp_weights`): the weights in the dtype of their dots'
    operands (`later_weights_dtype`), the H x H layers' biases float32, or, with
    `Kernels.relu_floors`, their ReLU floors: h_l = max(h_(l-1) W_l, floor_l)."""

    w_hidden: Any  # [L-1, Hp, Hp] or None when hidden_layers == 1
    b_hidden: Any  # [L-1, Hp] or None: the biases, or the ReLU floors
    w_out_t: Any  # [2, Hp]: the output layer, transposed (its bias lives in `consts`)


def _pad_last(x, n):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _flat(x, lead: int):
    """x with all axes after the first `lead` flattened into one."""
    return x.reshape(x.shape[:lead] + (-1,))


def _pad_axis(x, axis, n):
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pads)


def later_weights_dtype(mlp_precision: str):
    """The dtype of the H x H and output layers' dot operands under `mlp_precision`
    (`blocks.MLP_PRECISIONS`), in which the kernels take those layers' weights
    (`mlp_weights`): float16 / bfloat16, or None for float32 (TF32 rounds in the tensor
    core; "ieee"'s output layer is multiply-adds)."""
    return {"tf32_fp16": jnp.float16, "bf16": jnp.bfloat16}.get(mlp_precision)


def round_weights(w, dtype):
    """w in a dot's operand dtype (None: as it is); fp16 clamped to its finite range
    first, so that no weight becomes inf (and then NaN in the dot)."""
    if dtype is None:
        return w
    if jnp.dtype(dtype) == jnp.float16:
        w = jnp.clip(w, -FP16_MAX, FP16_MAX)
    return w.astype(dtype)


def tf32_operand_order(hp: int) -> np.ndarray:
    """The order in which the apply kernels feed a TF32 dot after the first layer (the
    H x H layers', the output layer's) its input's Hp columns (mlp_precision "tf32"):
    position 8 b + 4 s + t holds column 8 b + 2 t + s (t < 4, s < 2). `mlp_weights`
    orders those dots' weights the same way, which leaves the products as they were.

    Why: of every 8 columns, a wgmma accumulator holds columns 2 t and 2 t + 1 in lane t
    of each quad, where a TF32 A operand in registers wants t and t + 4. Fed in their
    own order, the previous layer's activations take 2 selects and a shuffle per value
    to become the next dot's operand; fed in this one, the accumulator is the operand
    as it stands. The kernels reorder with a reshape and a transpose, which Triton
    lowers to a relabelling of registers. Compiled for sm_90, 1x256, the default apply
    kernels need 1208 -> 1008 SASS instructions per thread (Pallas; Triton 1384 -> 1176)
    for the H x H layer, and the output layer, which the shuffles had kept on FMAs, is
    then a dot too: 944 (Triton 1128); 880 (1080) once each lane takes its rows' outputs
    from its own columns of that dot (`adafac_step._output_layer`)."""
    k = np.arange(hp)
    return k // 8 * 8 + k % 4 * 2 + k % 8 // 4


def _operand_round(x, mlp_precision: str):
    """x rounded to the later layers' dot operands' precision (TF32 keeps float32's
    exponent and 10 mantissa bits), as float32; "ieee": x."""
    dtype = later_weights_dtype(mlp_precision)
    if dtype is not None:
        return round_weights(x, dtype).astype(jnp.float32)
    return lax.reduce_precision(x, 8, 10) if mlp_precision == "tf32" else x


def mlp_weights(nn, hp: int, mlp_precision: str = "ieee",
                relu_floors: bool = False) -> tuple[MLPWeights, jax.Array]:
    """The layers after the first (`MLPWeights`), and the output layer's bias, as the
    apply kernels take them under `mlp_precision` (`Kernels.mlp_precision`).

    With `relu_floors` (`Kernels.relu_floors`) the H x H layers' biases become ReLU
    floors: relu(x + c) = max(x, -c) + c, and the + c, a constant of the layer, goes
    through the next layer's weights into its bias. So layer l runs as
    h_l = max(h_(l-1) W_l, -c_l) with c_l = b_l + c_(l-1) W_l (c_1 = b_1), and the output
    layer's bias is b_out + c_(L-1) W_out. The kernels' dots then start from zero rather
    than from the bias, copied into every accumulator register (compiled for sm_90, the
    Pallas apply kernels 48-64 SASS instructions per thread fewer, `PallasKernels`). Each
    c_l is rounded to the dots' operand precision (`_operand_round`), so that a unit off
    (max = -c_l) is exact in the next dot, as relu's 0 was; c_l W_l is computed in
    float32 from the weights as the dots take them.

    The weights: with 16-bit operands rounded to their dots' operand type
    (`later_weights_dtype`), fp16's clamped to its finite range first
    (`blocks.FP16_MAX`), once per step here, not in every program; under "tf32" the H x H
    layers' weight rows and the output layer's (w_out_t's columns) in
    `tf32_operand_order`, the order in which the kernels feed those dots."""
    last = sum(1 for k in nn if k.startswith("w")) - 1
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    weights = functools.partial(round_weights, dtype=later_weights_dtype(mlp_precision))
    order = tf32_operand_order(hp) if mlp_precision == "tf32" else slice(None)
    through = lambda c, w: jnp.dot(c, f32(w), precision=lax.Precision.HIGHEST)  # noqa: E731
    wh, bh, shift = [], [], jnp.zeros((hp,), jnp.float32)
    for i in range(1, last):
        w = weights(_pad_axis(_pad_last(f32(nn[f"w{i}"]), hp), 0, hp))
        b = _pad_last(f32(nn[f"b{i}"]), hp)
        if relu_floors:
            shift = _operand_round(b + through(shift, w), mlp_precision)
        wh.append(w[order, :])
        bh.append(-shift if relu_floors else b)
    wh, bh = (jnp.stack(wh), jnp.stack(bh)) if wh else (None, None)
    w_out_t = weights(_pad_last(f32(nn[f"w{last}"]).T, hp))
    b_out = f32(nn[f"b{last}"])
    if relu_floors:
        b_out = b_out + through(shift, w_out_t.T)
    return MLPWeights(wh, bh, w_out_t[:, order]), b_out


class Kernels(NamedTuple):
    """The launchers a backend provides (all arrays canonical, see module docstring).

    Factored tensors, all of them together (a `FactoredGroup`): p, g, mom, rms are tuples
    over the tensors, their per-row / per-column operands live on the flat U / V sides
    (fu [3, sum BU], tu [sum BU, TW], ...) at each tensor's offsets:
    group_row_col_sums(g, group) -> (su [sum BU], sv [sum BV])
    group_sides(g, v_u, v_v, consts, group, tile) (optional) -> (new_u, new_v, f_u, f_v),
        the new accumulators and factors on the flat sides from each tensor's state v_u
        [3, B U], v_v [3, B V]; called when every tensor's [U, V] plane fits `tile`
        (`blocks.plane_tile`), else row_col_sums and XLA do it
    group_moments(p, g, mom, rms, fu, fv, new_u, new_v, consts, group) -> per-tensor
        sums [S, 32]: of the 16 squared per-element features, then (lanes 16-21 and
        22-27) of the squares of the U / V side features new and rsqrt(new + 1e-8)
    group_apply(p, g, mom, rms, fu, fv, consts, tu, tv, w [S, WR, Hp], mlp, mults, new_u,
                new_v, group)
        -> (new_p, new_mom, new_rms, U side, V side), tuples; the last two each tensor's
        [3, B, U] / [3, B, V] planes of the new accumulators new_u [3, sum BU], new_v
    Non-factored tensors, either in the packed buffer:
    packed_moments(p, g, mom, rms, vd, counts, consts, blocks) -> partial sums [nblocks, 32]
        (counts: a static numpy [nblocks, 1], the valid elements of each tile)
    packed_apply(p, g, mom, rms, vd, consts, w_seg, b0, seg_starts, mlp, mults, blocks)
        -> (new_p, new_mom, new_rms, new_vd), all float32, packed
    or where they lie (member launchers, no packing; at most `member_limit` tensors, else
    packed), each in tiles of `blocks`' elements:
    member_moments(p, g, mom, rms, vd, consts, blocks), each a tuple over the tensors
        (p_i, g_i [n_i], mom_i, vd_i [3, n_i], rms_i [1, n_i]) -> partial sums [nblocks, 32],
        the same rows as packed_moments'
    member_apply(p, g, mom, rms, vd, consts, w_seg, b0, mlp, mults, blocks)
        -> (new_p, new_mom, new_rms, new_vd), each a tuple like its input (p_i in its dtype)
    `mults` is the static (exp_mult, step_mult) pair.

    `row_col_in_dot` picks what the apply launchers get for the 12 per-row / per-column
    features: False, their layer-1 products as tables tu [.., U, Hp] (b0 included) and
    tv [.., V, Hp] with w_ew [16, Hp]; True, the features themselves, normalised, tu
    [.., U, 8] and tv [.., V, 8] (plane-major, [.., 8, U] and [.., 8, V], with
    `row_col_planes`), with w_ew [32, Hp] (`_row_col_features`, `_row_col_weights`: w0's
    rows for them unscaled). `mlp_precision`
    (`blocks.MLP_PRECISIONS`) is the apply launchers' dots' precision, which decides the
    dtype and order in which they take `MLPWeights`' weights (`mlp_weights`);
    `relu_floors`, whether they take the H x H layers' biases as ReLU floors.
    """

    group_row_col_sums: Any = None
    group_sides: Any = None
    group_moments: Any = None
    group_apply: Any = None
    packed_moments: Any = None
    packed_apply: Any = None
    member_moments: Any = None
    member_apply: Any = None
    member_limit: int | None = None
    row_col_in_dot: bool = False
    row_col_planes: bool = False
    mlp_precision: str = "ieee"
    relu_floors: bool = False

    @classmethod
    def of(cls, launchers) -> Kernels:
        """The launchers (and options) of an object that has one attribute per field."""
        return cls(**{name: getattr(launchers, name) for name in cls._fields
                      if hasattr(launchers, name)})


def _table(f, w):
    """sum_k f[k, :, None] * w[k]: the [n, H] layer-1 table of 6 per-row / per-column
    features f [6, n] with their tensors' w0 rows w [6, n, H]. As multiply-adds, not a
    dot: XLA fuses them with the features' concatenation and the padding into one kernel,
    where a K = 6 dot is a GEMM launch of its own with a fusion on either side."""
    return sum(f[k][:, None] * w[k] for k in range(f.shape[0]))


def _row_col_features(f_u, f_v, planes: bool):
    """The per-row / per-column features as `factored_apply` takes them when the kernel runs
    them through its layer-1 dot (`Kernels.row_col_in_dot`): f_u [6, n] (the U side's),
    f_v [6, n] -> tu [n, 8] (the 6 features, then 1 so that b0 rides in the dot, then 0),
    tv [n, 8] (the 6 features, 0, 0); with `planes` (`Kernels.row_col_planes`) [8, n]."""
    tu = _pad_axis(jnp.concatenate([f_u, jnp.ones_like(f_u[:1])]), 0, ROW_COL_TABLE_WIDTH)
    tv = _pad_axis(f_v, 0, ROW_COL_TABLE_WIDTH)
    assert (f_u.shape[0] + 1, f_v.shape[0]) == (ROW_COL_U_PLANES, ROW_COL_V_PLANES)
    return (tu, tv) if planes else (tu.T, tv.T)


def _row_col_weights(w_ew, w_u, w_v, b0):
    """w [32, H] matching `_row_col_features`' columns: rows 0-15 w_ew, 16-23 the U side
    (w_u, b0, 0), 24-31 the V side (w_v, 0, 0)."""
    zero = jnp.zeros_like(b0)[None]
    return jnp.concatenate([w_ew, w_u, b0[None], zero, w_v, zero, zero])


class FactoredGroup(NamedTuple):
    """Static layout of the factored tensors of a step, updated together.

    Their per-row and per-column vectors live in two flat spaces: the U side holds each
    tensor's [B, U] plane after the previous tensors' (`u_offsets`), the V side its [B, V]
    plane. The between-pass math runs once on these flat vectors for all tensors, and
    kernels read a tensor's factors and tables at its offsets.
    """

    layouts: tuple[FactoredLayout, ...]
    blocks: tuple[BlockSizes, ...]  # the apply pass's tiles
    reduce_blocks: tuple[BlockSizes, ...]  # the reduction passes' tiles

    @property
    def u_sizes(self) -> tuple[int, ...]:
        return tuple(lay.B * lay.U for lay in self.layouts)

    @property
    def v_sizes(self) -> tuple[int, ...]:
        return tuple(lay.B * lay.V for lay in self.layouts)

    @property
    def u_offsets(self) -> tuple[int, ...]:
        return starts(self.u_sizes)

    @property
    def v_offsets(self) -> tuple[int, ...]:
        return starts(self.v_sizes)


def starts(sizes) -> tuple[int, ...]:
    return tuple(int(x) for x in np.cumsum((0,) + tuple(sizes[:-1])))


def _new_sides(v_u, v_v, su, sv, c_fac, lays, u_is_row, seg_u, seg_v):
    """The flat sides' new Adafactor accumulators c v + (1 - c) mean(G) from the row /
    column sums su, sv, and their factors: the row side's rsqrt(v / v's mean over its line,
    a tensor's row), the column side's rsqrt(v). -> (new_u, new_v, f_u, f_v)."""
    u_len = np.asarray([lay.U for lay in lays], np.float32)
    v_len = np.asarray([lay.V for lay in lays], np.float32)
    c = c_fac[:, None]
    new_u = c * v_u + (1 - c) * (su / v_len[seg_u])[None]
    new_v = c * v_v + (1 - c) * (sv / u_len[seg_v])[None]

    def factor(new, seg, lens, is_row):
        runs = [int(lens[j]) for j, lay in enumerate(lays) for _ in range(lay.B)]
        means = segment_sums(new.T, runs).T / np.asarray(runs, np.float32)  # [3, lines]
        per_element = means[:, np.repeat(np.arange(len(runs)), runs)]
        return jnp.where(is_row[seg][None], am.safe_rsqrt(new / (per_element + 1e-9)),
                         am.safe_rsqrt(new))

    return new_u, new_v, factor(new_u, seg_u, u_len, u_is_row), factor(new_v, seg_v, v_len,
                                                                         ~u_is_row)


def _factored_group(kernels, items, consts, c_fac, nn, iteration, mlp, mults, hp, blocks,
                    reduction_blocks=None):
    """items: [(p, g, acc)] of factored tensors -> [(new_p, new_acc)], every pass once for
    all of them (see `FactoredGroup`). `blocks`: every pass's tile, `reduction_blocks`
    the reduction passes' (over `blocks`); else the library's, and small tensors share a
    tile where they share launches."""
    lays = [factored_layout(p.shape) for p, _, _ in items]
    tiles, reduce_tiles = group_block_sizes([(lay.B, lay.U, lay.V) for lay in lays], hp)
    if blocks:
        tiles = reduce_tiles = [blocks] * len(lays)
    if reduction_blocks:
        reduce_tiles = [reduction_blocks] * len(lays)
    # Tensors alike in tiles and dtypes next to each other: a backend launches each such
    # run of them together.
    order = sorted(range(len(items)), key=lambda j: (
        dataclasses.astuple(tiles[j]), dataclasses.astuple(reduce_tiles[j]),
        str(items[j][0].dtype), str(items[j][1].dtype)))
    if order != list(range(len(items))):
        outs = _factored_group(kernels, [items[j] for j in order], consts, c_fac, nn, iteration,
                               mlp, mults, hp, blocks)
        return [outs[order.index(j)] for j in range(len(items))]
    group = FactoredGroup(tuple(lays), tuple(tiles), tuple(reduce_tiles))

    def canonical(xs, lead):
        return tuple(_to_canon(x, lay.perm, lead, (lay.B, lay.U, lay.V))
                     for x, lay in zip(xs, lays, strict=True))

    p3, g3 = canonical([p for p, _, _ in items], 0), canonical([g for _, g, _ in items], 0)
    mom3 = canonical([a.mom for _, _, a in items], 1)
    rms3 = canonical([a.rms for _, _, a in items], 1)
    # v_row [3, B, |d1|] and v_col [3, B, |d0|] on the U / V sides, flat: [3, sum BU], [3, sum BV]
    v_u, v_v = [], []
    for (_, _, a), lay in zip(items, lays, strict=True):
        row = _to_canon(a.v_row, lay.row_perm, 1, (lay.B, lay.row_shape[-1])).reshape(3, -1)
        col = _to_canon(a.v_col, lay.col_perm, 1, (lay.B, lay.col_shape[-1])).reshape(3, -1)
        v_u.append(row if lay.u_is_row else col)
        v_v.append(col if lay.u_is_row else row)
    # Static per-element facts of the two sides: tensor, U or V of the tensor, row side or not.
    seg_u = np.repeat(np.arange(len(lays)), group.u_sizes)
    seg_v = np.repeat(np.arange(len(lays)), group.v_sizes)
    u_is_row = np.asarray([lay.u_is_row for lay in lays])

    plane = (plane_tile([(lay.U, lay.V) for lay in lays]) if kernels.group_sides is not None
             else None)
    if plane is not None:  # every tensor's [U, V] plane fits one tile
        with jax.named_scope("adafac_row_col_sides"):
            sides = kernels.group_sides(g3, v_u, v_v, consts, group, plane)
    else:
        with jax.named_scope("adafac_row_col_sums"):
            su, sv = kernels.group_row_col_sums(g3, group)  # [sum BU] over V, [sum BV] over U
        sides = _new_sides(jnp.concatenate(v_u, axis=1), jnp.concatenate(v_v, axis=1), su, sv,
                           c_fac, lays, u_is_row, seg_u, seg_v)
    new_u, new_v, f_u, f_v = sides

    with jax.named_scope("adafac_moments"):
        sums = kernels.group_moments(p3, g3, mom3, rms3, f_u, f_v, new_u, new_v, consts, group)
    ew = sums[:, :NUM_EW_FACTORED] / np.asarray([p.size for p, _, _ in items], np.float32)[:, None]
    ms_u = sums[:, SIDE_LANES_U:SIDE_LANES_U + 6] / np.asarray(group.u_sizes, np.float32)[:, None]
    ms_v = sums[:, SIDE_LANES_V:SIDE_LANES_V + 6] / np.asarray(group.v_sizes, np.float32)[:, None]
    row_side = u_is_row[:, None]
    ms_row, ms_col = jnp.where(row_side, ms_u, ms_v), jnp.where(row_side, ms_v, ms_u)
    moments = jnp.concatenate([ew[:, :13], ms_row[:, :3], ms_col[:, :3], ms_row[:, 3:],
                               ms_col[:, 3:], ew[:, 13:16]], axis=1)  # [S, 28]
    w0_feat, b0 = jax.vmap(lambda m: am.first_layer(nn, m, iteration))(moments)
    w_ew = w0_feat[:, np.asarray(am._PER_ELEMENT)]  # [S, 16, H]
    feat_u = jnp.concatenate([new_u, lax.rsqrt(new_u + 1e-8)])  # [6, sum BU]
    feat_v = jnp.concatenate([new_v, lax.rsqrt(new_v + 1e-8)])
    rows, cols = np.asarray(am._PER_ROW), np.asarray(am._PER_COL)
    # The U / V sides' rows of layer 1 [S, 6, H]: w0's own where the kernels take the
    # features normalised (their row / column dot), else w0's rows scaled by them.
    side_w = nn["w0"].astype(jnp.float32)[None] if kernels.row_col_in_dot else w0_feat
    u_side = u_is_row[:, None, None]
    w_u = jnp.where(u_side, side_w[:, rows], side_w[:, cols])
    w_v = jnp.where(u_side, side_w[:, cols], side_w[:, rows])
    if kernels.row_col_in_dot:
        # Normalised here rather than in w's rows, so that the kernels' row / column dot
        # takes operands of unit scale, which fp16 holds ("tf32_fp16"), and clamped to its
        # range here, once per row / column: a normalised feature is at most sqrt(rows) (or
        # sqrt(columns)) times its root mean square, so the clamp acts only past 4e9 of them.
        scale = am.feature_scale(moments)  # [S, 28]
        s_u = jnp.where(row_side, scale[:, rows], scale[:, cols])  # [S, 6]
        s_v = jnp.where(row_side, scale[:, cols], scale[:, rows])
        normalised = [jnp.clip(f * s[seg].T, -FP16_MAX, FP16_MAX)
                      for f, s, seg in ((feat_u, s_u, seg_u), (feat_v, s_v, seg_v))]
        tu, tv = _row_col_features(*normalised, kernels.row_col_planes)
        w_ew = jax.vmap(_row_col_weights)(w_ew, w_u, w_v, b0)  # [S, 32, H]
    else:
        tu = _pad_last(_table(feat_u, w_u[seg_u].swapaxes(0, 1)) + b0[seg_u], hp)  # [sum BU, Hp]
        tv = _pad_last(_table(feat_v, w_v[seg_v].swapaxes(0, 1)), hp)
    w_ew = _pad_last(w_ew, hp)

    with jax.named_scope("adafac_apply"):
        new_p3, new_mom3, new_rms3, sides_u, sides_v = kernels.group_apply(
            p3, g3, mom3, rms3, f_u, f_v, consts, tu, tv, w_ew, mlp, mults, new_u, new_v, group)
    out = []
    for j, ((p, _, a), lay) in enumerate(zip(items, lays, strict=True)):
        u_j = sides_u[j].reshape(3, lay.B, lay.U)
        v_j = sides_v[j].reshape(3, lay.B, lay.V)
        row, col = (u_j, v_j) if lay.u_is_row else (v_j, u_j)
        permuted = tuple(p.shape[q] for q in lay.perm) if lay.perm else p.shape
        out.append((_from_canon(new_p3[j], lay.perm, 0, permuted),
                    am.LeafAccumulators(_from_canon(new_mom3[j], lay.perm, 1, permuted),
                                        _from_canon(new_rms3[j], lay.perm, 1, permuted),
                                        _from_canon(row, lay.row_perm, 1, lay.row_shape),
                                        _from_canon(col, lay.col_perm, 1, lay.col_shape),
                                        a.v_diag)))
    return out


def segment_sums(partial, nblocks: list[int]):
    """Sums of consecutive runs of `nblocks[s]` rows of partial [n, K] -> [S, K].

    A gather of each run, padded with a zero row to the longest run, then one reduction:
    XLA fuses the two into one kernel, where `segment_sum` is a scatter and the zeros it
    starts from (two kernels). When padding would read more than 4x the rows (one long
    run among short ones), `segment_sum` it is.
    """
    n, longest = partial.shape[0], max(nblocks)
    if len(nblocks) * longest > 4 * n:
        ids = np.repeat(np.arange(len(nblocks)), nblocks)
        return jax.ops.segment_sum(partial, jnp.asarray(ids), num_segments=len(nblocks))
    index = np.full((len(nblocks), longest), n)  # n: the zero row
    for s, (start, count) in enumerate(zip(starts(nblocks), nblocks, strict=True)):
        index[s, :count] = np.arange(start, start + count)
    padded = jnp.concatenate([partial, jnp.zeros_like(partial[:1])])
    return jnp.sum(padded[index], axis=1)


def _packed_first_layer(partial, nblocks, sizes, nn, iteration, hp):
    """Per-tile feature sums [sum(nblocks), 32] -> each non-factored tensor's normalised
    first-layer weights w_seg [S, 32, Hp] (rows: the 22 features, zeros) and b0 [1, Hp]."""
    sums = segment_sums(partial, nblocks)
    ew = sums[:, :NUM_EW_PACKED] / jnp.asarray(sizes, jnp.float32)[:, None]  # [S, 22]
    moments = jnp.concatenate([ew[:, :13], ew[:, 16:19], ew[:, 16:19], ew[:, 19:22],
                               ew[:, 19:22], ew[:, 13:16]], axis=1)
    w0_feat, b0 = jax.vmap(lambda m: am.first_layer(nn, m, iteration))(moments)
    w_ew = jnp.concatenate([w0_feat[:, np.asarray(am._PER_ELEMENT)],
                            w0_feat[:, np.asarray(am._PER_ROW)] + w0_feat[:, np.asarray(am._PER_COL)]],
                           axis=1)  # [S, 22, H]
    return _pad_axis(_pad_last(w_ew, hp), 1, NUM_SUMS), _pad_last(b0[:1], hp)


def _packed_leaves(kernels, items, consts, nn, iteration, mlp, mults, hp, blocks):
    """items: [(p, g, acc)] of non-factored tensors -> [(new_p, new_acc)]: read and written
    where they lie by a backend's member launchers when it has them (and takes this many
    tensors, `Kernels.member_limit`), else packed into one [rows, 128] buffer."""
    blk = blocks or packed_block_sizes(hp)
    tile = blk.rows * blk.cols
    sizes = [max(1, int(np.prod(p.shape))) for p, _, _ in items]
    nblocks = [-(-n // tile) for n in sizes]
    if kernels.member_moments is not None and len(items) <= (kernels.member_limit or len(items)):
        return _member_leaves(kernels, items, sizes, nblocks, consts, nn, iteration, mlp, mults,
                              hp, blk)
    padded = [n * tile for n in nblocks]
    seg_ids = np.repeat(np.arange(len(items)), nblocks)
    seg_starts = starts(nblocks)
    counts = np.minimum(np.asarray(sizes)[seg_ids]
                        - (np.arange(len(seg_ids)) - np.asarray(seg_starts)[seg_ids]) * tile,
                        tile).astype(np.int32)[:, None]
    rows = sum(padded) // blk.cols

    def pack(xs, lead):
        flat = [_pad_last(jnp.asarray(x, jnp.float32).reshape(x.shape[:lead] + (-1,)), n)
                for x, n in zip(xs, padded, strict=True)]
        out = jnp.concatenate(flat, axis=-1)
        return out.reshape(out.shape[:lead] + (rows, blk.cols))

    p = pack([p for p, _, _ in items], 0)
    g = pack([g for _, g, _ in items], 0)
    mom = pack([a.mom for _, _, a in items], 1)
    rms = pack([a.rms for _, _, a in items], 1)
    vd = pack([a.v_diag for _, _, a in items], 1)

    with jax.named_scope("adafac_packed_moments"):
        partial = kernels.packed_moments(p, g, mom, rms, vd, counts, consts, blk)
    w_seg, b0 = _packed_first_layer(partial, nblocks, sizes, nn, iteration, hp)
    with jax.named_scope("adafac_packed_apply"):
        new_p, new_mom, new_rms, new_vd = kernels.packed_apply(
            p, g, mom, rms, vd, consts, w_seg, b0, seg_starts, mlp, mults, blk)

    out, start = [], 0
    new_p, new_mom, new_rms, new_vd = (_flat(new_p, 0), _flat(new_mom, 1), _flat(new_rms, 1),
                                       _flat(new_vd, 1))
    for (p0, _, a0), n, npad in zip(items, sizes, padded, strict=True):
        sl = lambda x: x[..., start:start + n]  # noqa: B023, E731
        out.append((sl(new_p).reshape(p0.shape).astype(p0.dtype),
                    am.LeafAccumulators(sl(new_mom).reshape(a0.mom.shape),
                                        sl(new_rms).reshape(a0.rms.shape), a0.v_row, a0.v_col,
                                        sl(new_vd).reshape(a0.v_diag.shape))))
        start += npad
    return out


def _member_leaves(kernels, items, sizes, nblocks, consts, nn, iteration, mlp, mults, hp, blk):
    """`_packed_leaves` through member launchers: every tensor flattened (free), no packing."""
    p = tuple(_flat(p, 0) for p, _, _ in items)
    g = tuple(_flat(g, 0) for _, g, _ in items)
    mom, rms, vd = (tuple(_flat(getattr(a, k), 1) for _, _, a in items)
                    for k in ("mom", "rms", "v_diag"))
    with jax.named_scope("adafac_packed_moments"):
        partial = kernels.member_moments(p, g, mom, rms, vd, consts, blk)
    w_seg, b0 = _packed_first_layer(partial, nblocks, sizes, nn, iteration, hp)
    with jax.named_scope("adafac_packed_apply"):
        new_p, new_mom, new_rms, new_vd = kernels.member_apply(
            p, g, mom, rms, vd, consts, w_seg, b0, mlp, mults, blk)
    return [(np_.reshape(p0.shape),
             am.LeafAccumulators(nm.reshape(a0.mom.shape), nr.reshape(a0.rms.shape), a0.v_row,
                                 a0.v_col, nv.reshape(a0.v_diag.shape)))
            for (p0, _, a0), np_, nm, nr, nv in zip(items, new_p, new_mom, new_rms, new_vd,
                                                   strict=True)]


def _place(results: list, indices: list[int], values: list) -> list:
    out = list(results)
    for i, v in zip(indices, values, strict=True):
        out[i] = v
    return out


def fused_update(kernels: Kernels, lopt, theta, state, grad, *, blocks: BlockSizes | None = None,
                 packed_blocks: BlockSizes | None = None,
                 reduction_blocks: BlockSizes | None = None):
    """All tensors of `state.params` through `kernels`: the `reference_update` signature.

    Returns (new params tree, `LeafAccumulators` of trees), like
    `lopt_fast.learned.adafac_mlp.reference_update`.
    """
    theta = am.float32_theta(theta)
    decays = am.decays_from_theta(theta, lopt.initial_decays)
    nn = theta["nn"]["~"]
    hp = padded_hidden(lopt.hidden_size)
    mlp, b_out = mlp_weights(nn, hp, kernels.mlp_precision, kernels.relu_floors)
    c_fac = jnp.clip(decays.fac, 0.0, 1.0)
    mults = (float(lopt.exp_mult), float(lopt.step_mult))
    consts = jnp.concatenate([decays.mom, jnp.clip(decays.rms, 0.0, 1.0), c_fac, b_out,
                              jnp.zeros((NUM_CONSTS - 9,), jnp.float32)]).astype(jnp.float32)
    treedef = jax.tree.structure(state.params)
    leaves = [jax.tree.leaves(t) for t in (state.params, grad, state.mom, state.rms,
                                           state.v_row, state.v_col, state.v_diag)]
    items = [(p, g, am.LeafAccumulators(*acc)) for p, g, *acc in zip(*leaves, strict=True)]
    results: list[Any] = [None] * len(items)
    factored, packed = [], []
    for i, (p, _, acc) in enumerate(items):
        if math.prod(p.shape) == 0:
            results[i] = (p, acc)
        elif am.factored_dims(p.shape) is None:
            packed.append(i)
        else:
            factored.append(i)
    if factored:
        with jax.named_scope("adafac_fused_factored"):
            outs = _factored_group(kernels, [items[i] for i in factored], consts, c_fac, nn,
                                   state.iteration, mlp, mults, hp, blocks, reduction_blocks)
        results = _place(results, factored, outs)
    if packed:
        with jax.named_scope("adafac_fused_packed"):
            outs = _packed_leaves(kernels, [items[i] for i in packed], consts, nn,
                                  state.iteration, mlp, mults, hp, packed_blocks)
        results = _place(results, packed, outs)
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
    new_p = unflat([r[0] for r in results])
    accs = [unflat([r[1][k] for r in results]) for k in range(5)]
    return new_p, am.LeafAccumulators(*accs)
