"""Fused `AdafacMLPLOpt` step in Pallas: accumulators, 39 features, MLP and update on chip.

Math per parameter (decays b_m [3], c_r = clip(b_r), c_f = clip(b_f) [3]; see
`lopt_fast.learned.adafac_math` for the full statement, which this matches):

    m_k   = b_m,k m_k + (1 - b_m,k) g             r = rsqrt(rms + 1e-6)
    rms   = c_r rms + (1 - c_r) g^2
    factored  (tile of the canonical [B, U, V] view; fu [3, U], fv [3, V] from the wrapper)
        F_k = fu_k[u] fv_k[v];  fac_g_k = g F_k;  fac_m_k = m_k F_k
    packed    (scalars / vectors)
        v_k = c_f,k v_k + (1 - c_f,k)(g^2 + 1e-30)
        fac_g_k = g rsqrt(max(v_k + 1e-9, 1e-9));  fac_m_k = m_k rsqrt(v_k + 1e-6)
        + the features v_k, rsqrt(v_k + 1e-8)
    x = [g, p, m, rms, m r, r, fac_g, fac_m (, v, rsqrt(v + 1e-8))]   16 or 22 planes
    pre0 = tu[u] + tv[v] + sum_f x_f w_f      (w = w0 rows scaled by rsqrt(1e-5 + E[x_f^2]),
                                               tu / tv = per-row / per-column features @ w0
                                               plus b0 with the time features; with
                                               layer1="dot_all" the 12 features and a 1
                                               for b0 are 16 more planes x_f instead, or a
                                               second dot's operand under tf32_fp16)
    h = relu(pre0); h = max(h W_l, floor_l) ...; (d, mag) = h W_out + b_out'
                                              (the biases folded into the floors and
                                               b_out': `plan.mlp_weights`)
    p <- p - d exp(mag exp_mult) step_mult

Kernels (all `pl.pallas_call`s are named). Each pass is one launch per run of up to
`blocks.PALLAS_MAX_MEMBERS` (4) tensors alike in tile and dtype
(`lopt_fast.pallas.members.MemberTiles`: a 1-D grid over their tiles, each program loading
its tensor's blocks through a `lax.switch`; compile time grows with the square of the
members), or, for more vectors than that, one launch over all of them packed into one
buffer. The factored kernels read each tensor's rows and columns of the flat U / V
sides (`plan.FactoredGroup`) in place. `jax.vmap` adds a leading task axis to every grid.
    adafac_row_col_sums      reads g                         4 B / param
                             (`blocks.sums_tile`: up to 8 reduction tiles of rows, so
                             up to 8x fewer partial column sums than elements)
      or, when every factored tensor's [U, V] plane fits one tile (`blocks.plane_tile`),
    adafac_row_col_sides     reads g, old v; writes the new v and their factors
                             (the sums and the math between the passes, one program a plane)
    adafac_moments           reads p, g, m, rms              24 B / param (+ packed: v 12 B)
    adafac_apply             reads p, g, m, rms; writes p, m, rms   24 + 20 B / param
  = 72 B / param of float32 traffic for a factored tensor (the issue's floor), plus
    O(rows + cols) for the tables.
FLOPs per parameter: pass 1 ~3, pass 2 ~60, pass 3 ~40 + 2 (16 H) + 2 H^2 (L - 1) + 4 H + 5
  (H = 32, 2 layers: ~3.2 kFLOP; layer 1 runs with `layer1="dot"` (the default) as one
  `jnp.dot` of the stacked features, with "dot_all" as one or two, the H x H layers
  through `jnp.dot` -> tensor cores on GPU).

GPU: lowered through Pallas' Triton backend (`pltriton.CompilerParams`); see
docs/KERNELS.md for why not Mosaic GPU. Dots run at `mlp_precision` ("tf32" default on
GPU: |rel err| ~ 3e-4; "ieee" for full float32; "tf32_fp16": the raw features' dot
TF32, the rest (operands of unit scale) on fp16, the same mantissa; "bf16" operands:
faster, coarser, see docs/KERNELS.md's tolerance table). CPU: `interpret=True` (the
tests).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lopt_fast.learned import adafac_math as am
from lopt_fast.pallas import plan
from lopt_fast.pallas.blocks import (
    FLOOR_CASTS,
    FP16_MAX,
    LAYER1_FORMS,
    MLP_PRECISIONS,
    PALLAS_MAX_MEMBERS,
    RELU_CASTS,
    TILE_ORDERS,
    BlockSizes,
    check_choice,
    member_runs,
    sums_tile,
)
from lopt_fast.pallas.members import MemberTiles, segment

C_MOM, C_RMS, C_FAC, C_BOUT = plan.C_MOM, plan.C_RMS, plan.C_FAC, plan.C_BOUT


# ----------------------------------------------------------------------------- kernel bodies

# Pallas' Triton lowering neither masks nor clips the blocks at the ragged edge of a grid
# (a tile past the last row or column reads, and writes, other elements of the array, or
# past its end), while the interpreter pads them: every access of a factored tile is
# masked explicitly (`mask` [rows, cols]). The kernels therefore lower through Triton only.

def _load(ref, mask, plane=None):
    """This program's block of `ref` (or plane `plane` of it) as float32, zeros outside."""
    if plane is None:
        x = pltriton.load(ref, mask=jnp.broadcast_to(mask, ref.shape), other=0)
    else:
        block = ref.shape[1:]
        x = pltriton.load(ref.at[pl.ds(plane, 1)], mask=jnp.broadcast_to(mask, block)[None],
                          other=0)[0]
    return x.astype(jnp.float32)


def _store(ref, value, mask, plane=None):
    """Write `value` into this program's block of `ref` (or plane `plane`) where `mask`."""
    value = value.astype(ref.dtype)
    if plane is None:
        pltriton.store(ref, value, mask=jnp.broadcast_to(mask, value.shape))
    else:
        pltriton.store(ref.at[pl.ds(plane, 1)], value[None],
                       mask=jnp.broadcast_to(mask, value.shape)[None])


def _updated(p_ref, step, mask=None):
    """The new p, p - step (step [n], the MLP's output), with this program's block of
    p_ref read again for it (zeros outside `mask`, if given).

    Why read it again: Triton gives the subtraction the layout of the last layout-fixing
    op (a load, a dot) before it. With the first read's p that is the output dot, so it
    moved p into the step's layout (8 rows per thread, each on 4 threads) right after
    p's load, which made the program wait for p before its other loads and hold it in
    registers through the MLP, and moved the result back for its store. Read again, p
    (a cache hit: the features read it first) fixes the loads' layout, and only the step
    is moved. Compiled for sm_90 (1x256 tile; `profiling/pallas_resources.py`), this
    change alone: one shared-memory exchange and two barriers fewer; "dot_all" +
    tf32_fp16 136 registers (was 152); the default ("dot", TF32) 1192 instructions per
    thread (was 1216); the packed kernel with TF32 167 registers (was 173: 12 warps per
    SM, not 8). The
    eviction policy keeps the two reads apart (CSE merges equal ones).
    `tests/test_pallas_step.py` checks that the new p is not moved before its store.
    In float32, or float64 for float64 params (`adafac_math.step_dtype`)."""
    where = {} if mask is None else {"mask": jnp.broadcast_to(mask, p_ref.shape), "other": 0}
    p = pltriton.load(p_ref, eviction_policy="evict_first", **where)
    dtype = am.step_dtype(p.dtype)
    return p.astype(dtype) - step.reshape(p.shape).astype(dtype)


def _store_updated(tiles: MemberTiles, seg, p_refs, po, step, mask):
    """Member `seg`'s new p (`_updated`, from its p_refs[seg]) into its po[seg]."""
    count = len(tiles.shapes)
    new_p = tiles.switch(seg, count, lambda member: _updated(p_refs[member], step, mask))
    tiles.each(seg, count, lambda a: _store(po[a], new_p, mask))


def _side_load(ref, start, ok, plane=None):
    """Entries start .. start + len(ok) of a flat side: plane `plane` of ref [planes, n]
    -> [len(ok)], or rows of a table ref [n, width] -> [len(ok), width]; zeros where not
    `ok`. A tensor's rows (columns) sit at its offset in the flat U (V) side of all
    factored tensors (`plan.FactoredGroup`), read in place rather than sliced out by XLA."""
    size = ok.shape[0]
    if plane is None:
        width = ref.shape[1]
        x = pltriton.load(ref.at[pl.ds(start, size), :],
                          mask=jnp.broadcast_to(ok[:, None], (size, width)), other=0)
    else:
        x = pltriton.load(ref.at[pl.ds(plane, 1), pl.ds(start, size)], mask=ok[None],
                          other=0)[0]
    return x.astype(jnp.float32)


def _side_store(ref, start, ok, plane, value):
    """Write value [len(ok)] into entries start .. start + len(ok) of plane `plane` of a
    flat side ref [3, n] where `ok` (`_side_load`'s counterpart). The plane index is an
    int32 as `start` is: with jax_enable_x64 a Python int would be an int64, and the
    interpreter's store rejects indices of two integer types."""
    pltriton.store(ref.at[pl.ds(jnp.int32(plane), 1), pl.ds(start, ok.shape[0])], value[None],
                   mask=ok[None])


def _accumulators(c_ref, g, mom, rms):
    """New momenta (3 planes) and rms from the gradient tile g [rows, cols] and the old
    ones (float32 tiles)."""
    m = [c_ref[C_MOM + k] * mom[k] + (1 - c_ref[C_MOM + k]) * g for k in range(3)]
    c_r = c_ref[C_RMS]
    return m, c_r * rms + (1 - c_r) * (g * g)


def _features_factored(g, p, m, rms, fac_u, fac_v):
    """16 per-element feature planes of a factored tile (order of `adafac_math._PER_ELEMENT`)
    from its rows' and columns' factors fac_u [3 x (rows,)], fac_v [3 x (cols,)]."""
    r = lax.rsqrt(rms + 1e-6)
    fac = [fu[:, None] * fv[None, :] for fu, fv in zip(fac_u, fac_v, strict=True)]
    return ([g, p, *m, rms, *(mk * r for mk in m), r]
            + [g * f for f in fac] + [mk * f for mk, f in zip(m, fac, strict=True)])


def _features_packed(c_ref, g, p, m, rms, vd):
    """22 per-element planes of a non-factored tile, and the new v planes (from the old
    ones, vd: 3 tiles)."""
    g2 = g * g + 1e-30
    v = [c_ref[C_FAC + k] * vd[k] + (1 - c_ref[C_FAC + k]) * g2 for k in range(3)]
    r = lax.rsqrt(rms + 1e-6)
    feats = ([g, p, *m, rms, *(mk * r for mk in m), r]
             + [g * lax.rsqrt(jnp.maximum(vk + 1e-9, 1e-9)) for vk in v]
             + [mk * lax.rsqrt(vk + 1e-6) for mk, vk in zip(m, v, strict=True)]
             + v + [lax.rsqrt(vk + 1e-8) for vk in v])
    return feats, v


def _sums_vector(feats, mask):
    """[1, 32]: sum over the tile of each feature squared (masked), lane f = feature f.

    One reduction of the squares stacked as [tile, 32] columns (zeros past the features),
    not one per feature: they share its shared-memory round trips and barriers. Compiled
    for sm_90 (4096 x 4096, 1 x 1024 tiles) the moments kernel then has 22 barriers where
    it had 65 (about 15 of them the side lanes', in branches few tiles take: stacking
    those too cost 6 registers more), 64 registers instead of 80; the vectors' moments 4
    instead of 65, 40 registers instead of 56."""
    n = mask.size
    sq = [jnp.where(mask, x * x, 0.0).reshape(n) for x in feats]
    sq += [jnp.zeros_like(sq[0])] * (plan.NUM_SUMS - len(sq))
    return jnp.sum(_columns(sq), axis=0)[None, :]


def _columns(planes):
    """[N, len(planes)] with column k = planes[k] (each [N]; a power of two of them).

    Pallas' Triton lowering only stacks two arrays along a new minor axis (`tt.join`):
    stacking the even- and odd-numbered halves puts plane 2 j + i at [j, i], so column
    2 j + i once the result is flattened."""
    if len(planes) == 2:
        return jnp.stack(planes, axis=-1)
    even, odd = _columns(planes[0::2]), _columns(planes[1::2])
    return jnp.stack([even, odd], axis=-1).reshape(even.shape[0], len(planes))


_DOT_PRECISIONS = {"tf32": lax.Precision.DEFAULT, "ieee": lax.Precision.HIGHEST}
_HALF_TYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


def _layer_precision(precision: str, unit_scale: bool) -> str:
    """The precision of a dot under `mlp_precision`: "tf32_fp16" is fp16 for operands of
    unit scale (the hidden activations; "dot_all"'s per-row / per-column features,
    normalised by `plan`) and TF32 for the raw per-element features, whose normalisation
    is folded into w (`blocks.MLP_PRECISIONS`); the others are one precision for all."""
    if precision == "tf32_fp16":
        return "fp16" if unit_scale else "tf32"
    return precision


def _dot(a, b, precision: str):
    """a @ b, accumulated in float32, at a `_layer_precision`: "tf32", "ieee", or "bf16" /
    "fp16" (both operands rounded to it). fp16's a is in its range already (`_relu`'s fp16
    activations; the row / column features `plan` clamps); float32 weights b are clamped
    here (the layers after the first come rounded: `plan.mlp_weights`)."""
    if precision in _HALF_TYPES:
        half = _HALF_TYPES[precision]
        if precision == "fp16" and b.dtype != half:
            b = jnp.clip(b, -FP16_MAX, FP16_MAX)
        return jnp.dot(a.astype(half), b.astype(half), preferred_element_type=jnp.float32)
    return jnp.dot(a, b, precision=_DOT_PRECISIONS[precision], preferred_element_type=jnp.float32)


def _dot_weights(w_ref, mlp_refs, layer1, precision):
    """The weights of the MLP's dots: layer 1's (w [K, Hp] for "dot"; w's per-element and
    row / column halves [16, Hp] for "dot_all"), and those of the layers
    after it: each H x H layer's, with its ReLU floor [Hp] (`plan.MLPWeights`), and, where
    the output layer is a dot (`_output_layer`), its [Hp, 16] (else None).

    Triton stages a dot's weights in shared memory right after their load, so the
    program waits there for that load: read where each is used, each weight cost a
    round trip after the dot before it. The kernels read them after the tile's own loads
    and before any math: compiled for sm_90 the factored apply kernel waits on 4 memory
    round trips in sequence, not 5-6 (`profiling/pallas_resources.py`'s RT)."""
    if _row_col_as_planes(layer1, precision):
        first = w_ref[...]
    elif layer1 == "dot_all":
        k = plan.NUM_EW_FACTORED
        first = (w_ref[pl.ds(0, k), :], w_ref[pl.ds(k, k), :])
    else:
        first = w_ref[...]
    wh_ref, floor_ref, wo_ref = mlp_refs
    hidden = [(wh_ref[i], floor_ref[i, :])
              for i in range(0 if wh_ref is None else wh_ref.shape[0])]
    out = None
    if _layer_precision(precision, unit_scale=True) != "ieee":
        col = lax.broadcasted_iota(jnp.int32, (wo_ref.shape[1], _OUTPUT_COLS), 1)
        out = jnp.where(col % 2 == 0, wo_ref[0, :][:, None], wo_ref[1, :][:, None])
    return first, (hidden, out)


def _vector_weights(mlp_refs, c_ref):
    """The MLP's weights that stay in registers: the output layer's direction and
    magnitude rows [Hp] and biases."""
    wo_ref = mlp_refs[2]
    return wo_ref[0, :], wo_ref[1, :], c_ref[C_BOUT], c_ref[C_BOUT + 1]


def _mlp_weights(w_ref, mlp_refs, c_ref, layer1, early_weights, precision):
    """What an apply kernel reads of the MLP before its math: the dots' weights
    (`_dot_weights`: first, later) and, with `early_weights`, the rest
    (`_vector_weights`; else None, and `_mlp_step` reads them where they are used)."""
    first, later_w = _dot_weights(w_ref, mlp_refs, layer1, precision)
    return first, later_w, _vector_weights(mlp_refs, c_ref) if early_weights else None


def _first_layer(pre0, feats, w, precision, layer1):
    """Layer 1's pre-activations [rows cols, Hp] of feats (planes [rows, cols]); w: layer
    1's weights as `_dot_weights` reads them.

    layer1 "dot": pre0 [rows, cols, Hp] (tables and bias) + the features as [rows cols, K]
    x w [K, Hp] (K = 16 factored, 32 packed: the 22 features padded with zero planes,
    whose rows of w are zero too); "dot_all" (factored): pre0 holds the per-row /
    per-column features (normalised) instead of tables: as 16 more planes
    (`_row_col_planes`) of one [rows cols, 32] x w [32, Hp] dot (`_row_col_as_planes`),
    or, where their precision differs from the per-element features', as [rows cols, 16]
    (`_row_col_operand`), a dot of its own with w's rows 16-31."""
    planes = [x.reshape(x.size) for x in feats]
    raw = _layer_precision(precision, unit_scale=False)
    if _row_col_as_planes(layer1, precision):
        return _dot(_columns(planes + pre0), w, raw)
    if layer1 == "dot_all":  # tf32_fp16: the row / column features' fp16 dot
        # first, the per-element one accumulating onto it: compiled for sm_90 (1x256) 3
        # load round trips in sequence instead of 4
        return (_dot(pre0, w[1], _layer_precision(precision, unit_scale=True))
                + _dot(_columns(planes), w[0], raw))
    planes += [jnp.zeros_like(planes[0])] * (w.shape[0] - len(planes))
    return pre0.reshape(-1, pre0.shape[-1]) + _dot(_columns(planes), w, raw)


def _row_col_as_planes(layer1: str, precision: str) -> bool:
    """Whether layer 1 takes the per-row / per-column features as 16 more planes of its one
    dot (`_row_col_planes`): "dot_all", unless they take another precision than the
    per-element features ("tf32_fp16": fp16 against TF32), which gives them a dot of their
    own (`_row_col_operand`).

    Compiled for sm_90 (4096 x 4096, 1x256 tile, 4 warps), one dot against two: TF32 680
    SASS instructions per thread and 3 barriers against 768 and 13 (the [tile, 16]
    operand of [cols, 8] tables crossed shared memory in four chunks), bf16 576 and 3
    against 616 and 6, "ieee" 5240 and 5 against 5328 and 23, at the same registers and
    warps per SM. With tf32_fp16 one TF32 dot would take 608 and 3 against 640 and 6, but
    155 registers (12 warps per SM) against 128 (16): not taken untimed."""
    return layer1 == "dot_all" and (_layer_precision(precision, unit_scale=True)
                                    == _layer_precision(precision, unit_scale=False))


def _row_col_planes(tu_ref, tv_ref, starts, row_ok, col_ok):
    """The per-row / per-column features as 16 planes [rows cols] in `_row_col_operand`'s
    column order: 2 i the tile's rows' feature i, 2 i + 1 its columns'; tu_ref / tv_ref
    plane-major [8, sum BU | sum BV], loaded as the factors are (a plane's entries
    contiguous: no layout change on the way into the features' planes); the planes
    `plan._row_col_features` pads with zeros are not read."""
    rows, cols = row_ok.shape[0], col_ok.shape[0]
    planes = []
    for i in range(plan.ROW_COL_TABLE_WIDTH):
        for ref, start, ok, used, axis in (
                (tu_ref, starts[0], row_ok, plan.ROW_COL_U_PLANES, 1),
                (tv_ref, starts[1], col_ok, plan.ROW_COL_V_PLANES, 0)):
            if i < used:
                x = jnp.expand_dims(_side_load(ref, start, ok, i), axis)
                planes.append(jnp.broadcast_to(x, (rows, cols)).reshape(rows * cols))
            else:
                planes.append(jnp.zeros((rows * cols,), jnp.float32))
    return planes


def _row_col_operand(fu, fv):
    """[rows cols, 16] from the per-row fu [rows, 8] and per-column fv [cols, 8] features
    (`plan._row_col_features`): column 2 i holds fu[:, i], column 2 i + 1 fv[:, i] (the
    join's order; `_row_col_rows` orders w's rows to match)."""
    shape = (fu.shape[0], fv.shape[0], fu.shape[1])
    xu = jnp.broadcast_to(fu[:, None, :], shape).reshape(-1, shape[2])
    xv = jnp.broadcast_to(fv[None, :, :], shape).reshape(-1, shape[2])
    return jnp.stack([xu, xv], axis=-1).reshape(xu.shape[0], 2 * shape[2])


def _row_col_rows():
    """w's row order for "dot_all": the 16 per-element rows, then for column j of
    `_row_col_operand` the U side's row j // 2 (rows 16-23 of `plan._row_col_weights`) or
    the V side's (24-31)."""
    k, width = plan.NUM_EW_FACTORED, plan.ROW_COL_TABLE_WIDTH
    return np.concatenate([np.arange(k), k + np.arange(2 * width).reshape(2, width).T.ravel()])


# The output layer as a dot ([n, Hp] x [Hp, 2]) repeats its 2 columns to this width:
# Triton lowers N = 16 to a wgmma, N = 8 to an mma.sync and selects (session 16).
_OUTPUT_COLS = 16
_LOG2_E = float(np.log2(np.e))


def _relu(x, floor, precision: str, compiled: bool):
    """max(x, floor) (floor None: 0; else [1, Hp], `plan.MLPWeights`); with a bf16 /
    fp16 precision, rounded to that type (every ReLU's result then goes into a dot,
    which would round it anyway: rounding commutes with the max, the floors being of
    that type), fp16 saturated at its largest finite value (`_dot` relies on it).
    Compiled, max(x, 0) and the rounding are one instruction per pair
    (`blocks.RELU_CASTS`; for sm_90, 1x256, "dot_all", tf32_fp16: 64 instructions per
    thread fewer than a cast, a packed max and a packed min), against a floor two
    (`blocks.FLOOR_CASTS`); interpreted, the same math in jnp."""
    low = 0.0 if floor is None else floor
    if precision not in _HALF_TYPES:
        return jnp.maximum(x, low)
    half = _HALF_TYPES[precision]
    if compiled and floor is None:
        return pltriton.elementwise_inline_asm(
            RELU_CASTS[precision], args=[x], constraints="=r,r,r", pack=2,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, half)])[0]
    if compiled:
        return pltriton.elementwise_inline_asm(
            FLOOR_CASTS[precision], args=[x, jnp.broadcast_to(floor.astype(half), x.shape)],
            constraints="=r,r,r,r", pack=2,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, half)])[0]
    x = jnp.maximum(x.astype(half), jnp.asarray(low, half))
    return jnp.minimum(x, FP16_MAX) if precision == "fp16" else x


def _in_tf32_order(h):
    """h [n, Hp] with its columns in `plan.tf32_operand_order`: a reshape, a transpose
    and a reshape, which compiled are a relabelling of the registers that make the
    accumulator h the next TF32 dot's operand without shuffles."""
    n, hp = h.shape
    return h.reshape(n, hp // 8, 4, 2).transpose(0, 1, 3, 2).reshape(n, hp)


def _later_dot(h, w, precision: str):
    """h @ w for a layer after the first (`_layer_precision` precision): under TF32 h's
    columns go in `plan.tf32_operand_order`, the order of w's rows
    (`plan.mlp_weights`)."""
    if precision == "tf32":
        h = _in_tf32_order(h)
    return _dot(h, w, precision)


def _output_layer(h, out_w, output_w, precision: str):
    """(direction, magnitude before its bias, `_step_exponent`) of the last activations h
    [n, Hp].

    On tensor cores (TF32, fp16, bf16) a dot with out_w [Hp, 16] (`_dot_weights`: w_dir
    and w_mag alternating), whose column 8 j + 2 t + s sits in lane t of a quad (see
    `plan.tf32_operand_order`): each lane holds both outputs of its rows. So they come
    back [n, 4], a column per lane, all equal (`_mlp_step` takes their max once the step
    is computed), picked with selects against -0.0 (x + -0.0 = x: compiled, no
    instruction), not summed across the quad: compiled for sm_90 (1x256) 64 instructions
    per thread fewer (TF32 "dot" 944 -> 880). The dot itself saved 72 over multiply-adds
    with tf32_fp16 ("dot_all": 920 -> 848), 64 with TF32 ("dot": 1008 -> 944).

    With float32 operands ("ieee", which Triton's dot would run as 8 times as many
    FMAs) [n] from multiply-adds with the rows of output_w (`_vector_weights`)."""
    w_dir, w_mag, b_dir, _ = output_w
    if out_w is None:
        return (jnp.sum(h * w_dir[None, :], axis=1) + b_dir,
                jnp.sum(h * w_mag[None, :], axis=1))
    out = _later_dot(h, out_w, precision)
    x = out.reshape(out.shape[0], _OUTPUT_COLS // 8, 4, 2)  # [n, j, t, s]
    x = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, x.shape, 1) == 0, x, -0.0), axis=1)
    s = lax.broadcasted_iota(jnp.int32, x.shape, 2)
    return (jnp.sum(jnp.where(s == 0, x, -0.0), axis=2) + b_dir,
            jnp.sum(jnp.where(s == 1, x, -0.0), axis=2))


def _step_exponent(exp_mult: float, step_mult: float, b_mag):
    """direction exp((m + b_mag) exp_mult) step_mult = sign direction 2^(m scale + offset)
    for the output layer's magnitude m before its bias: (scale, offset, sign), scale and
    sign static (offset: b_mag's scalar type; step_mult 0: -inf, a zero step)."""
    scale = exp_mult * _LOG2_E
    log_step = math.log2(abs(step_mult)) if step_mult else -math.inf
    return scale, b_mag * scale + log_step, -1.0 if step_mult < 0 else 1.0


def _mlp_step(pre, later_w, vector_w, mlp_refs, c_ref, mults, precision, compiled):
    """Layer 1's pre-activations pre [n, Hp] -> the step [n]: relu, the H x H layers and
    the output layer (later_w: their dots' weights, `_dot_weights`; vector_w:
    `_vector_weights`, read here if None) and direction exp(magnitude exp_mult)
    step_mult."""
    if vector_w is None:
        vector_w = _vector_weights(mlp_refs, c_ref)
    (hidden_w, out_w), output_w = later_w, vector_w
    precision = _layer_precision(precision, unit_scale=True)
    h = _relu(pre, None, precision, compiled)
    for w, floor in hidden_w:
        # no bias: it is in the floor (`plan.mlp_weights`), so the dot starts from zero
        h = _relu(_later_dot(h, w, precision), floor[None, :], precision, compiled)
    direction, magnitude = _output_layer(h, out_w, output_w, precision)
    # exp(x) as 2^(x log2 e): Pallas' Triton lowering makes jnp.exp libdevice's accurate
    # expf (~10 instructions), jnp.exp2 one ex2.approx (2^-22 relative error), which is
    # what Triton's own tl.exp does. The values live in the output layer's reduced layout,
    # 8 rows per thread (each on 4 threads): compiled for sm_90 (1x256) 64 instructions
    # per thread fewer, TF32 or not. With the magnitude's bias and step_mult in the
    # exponent (`_step_exponent`), one FFMA per value where an add and two multiplies
    # were.
    scale, offset, sign = _step_exponent(*mults, output_w[3])
    step = direction * jnp.exp2(magnitude * scale + offset)
    step = -step if sign < 0 else step
    # the output dot's form: a column per lane of the quad, all equal (`_output_layer`)
    return jnp.max(step, axis=1) if step.ndim == 2 else step


def _packed_apply(c_ref, loaded, w_ref, b0_ref, mlp_refs, store_accumulators, mults,
                  precision, early_weights, compiled):
    """A non-factored tile's step [n] from its loads (g, p, mom, rms, v_diag), w_ref [32,
    Hp] (its tensor's first-layer rows) and b0 [1, Hp], after handing its new accumulators
    to store_accumulators(m, rms, v) (stored before the MLP, as the factored kernel's).
    These tensors have no per-row / per-column features: layer 1 is "dot" whatever the
    factored tensors' form."""
    first, later_w, vector_w = _mlp_weights(w_ref, mlp_refs, c_ref, "dot", early_weights,
                                            precision)
    b0 = b0_ref[...]
    m, rms, v, feats = _packed_features(c_ref, *loaded)
    store_accumulators(m, rms, v)
    rows, cols = feats[0].shape
    pre0 = jnp.broadcast_to(b0[None, :, :], (rows, cols, b0.shape[-1]))
    pre = _first_layer(pre0, feats, first, precision, "dot")
    return _mlp_step(pre, later_w, vector_w, mlp_refs, c_ref, mults, precision, compiled)


def _tile_masks(tile: BlockSizes, j, k, u_size, v_size):
    """Which rows [rows], columns [cols] and elements [rows, cols] of the tile in row
    block j and column block k of a [U, V] plane exist."""
    u = j * tile.rows + lax.broadcasted_iota(jnp.int32, (tile.rows,), 0)
    v = k * tile.cols + lax.broadcasted_iota(jnp.int32, (tile.cols,), 0)
    row_ok, col_ok = u < u_size, v < v_size
    return row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


def _member_tile(tiles: MemberTiles):
    """This program's member, place (b, row block j, column block k), member sizes and masks."""
    seg, b, j, k, u_size, v_size = tiles.locate(pl.program_id(0))
    return seg, b, j, k, u_size, v_size, _tile_masks(tiles.tile, j, k, u_size, v_size)


def _row_col_sums_kernel(*refs, tiles: MemberTiles):
    # per member m: g_m [rows, cols]; outputs su_m [rows] (sums over this tile's columns:
    # a row of its partial sums [column blocks, B, U]) and sv_m [cols] (over its rows)
    count = len(tiles.shapes)
    g_refs, su_refs, sv_refs = refs[:count], refs[count:2 * count], refs[2 * count:]
    seg, _, _, _, _, _, (row_ok, col_ok, mask) = _member_tile(tiles)
    g = tiles.switch(seg, count, lambda m: _load(g_refs[m], mask))
    sq = jnp.where(mask, g * g + 1e-30, 0.0)
    su, sv = jnp.sum(sq, axis=1), jnp.sum(sq, axis=0)

    def store(m):
        _store(su_refs[m], su, row_ok)
        _store(sv_refs[m], sv, col_ok)

    tiles.each(seg, count, store)


def _new_side(c_ref, v_old, mean_g, ok, length, normalise, new_ref, f_ref, start):
    """One line's new Adafactor accumulators c v_old + (1 - c) mean_g (3 planes, valid
    where `ok`: the line's `length` entries) and their factors rsqrt(v / mean(v))
    (`normalise`: the row side) or rsqrt(v), floored as `adafac_math.safe_rsqrt`, into the
    flat sides new_ref / f_ref at `start`."""
    for q in range(3):
        c = c_ref[C_FAC + q]
        new = c * v_old[q] + (1 - c) * mean_g
        mean = jnp.sum(jnp.where(ok, new, 0.0)) / length
        f = lax.rsqrt(jnp.maximum(jnp.where(normalise, new / (mean + 1e-9), new), 1e-9))
        _side_store(new_ref, start, ok, q, new)
        _side_store(f_ref, start, ok, q, f)


def _row_col_sides_kernel(c_ref, *refs, tiles: MemberTiles, offsets, u_is_row):
    # per member m: g_m [rows, cols] (a whole [U, V] plane b, padded to the tile), its
    # state's v planes on its U side vu_m [3, rows] and V side vv_m [3, cols]; outputs
    # the flat sides nu, fu [3, sum BU] and nv, fv [3, sum BV], whole, written at the
    # member's offsets + b U / b V (a later launch's inputs before them: the earlier
    # launches' sides, aliased to the outputs)
    count = len(tiles.shapes)
    g_refs, vu_refs, vv_refs = (refs[a * count:(a + 1) * count] for a in range(3))
    nu_ref, nv_ref, fu_ref, fv_ref = refs[-4:]
    seg, b, _, _, u_size, v_size, (row_ok, col_ok, mask) = _member_tile(tiles)

    def load(m):  # only member m's branch reads
        return (_load(g_refs[m], mask), [_load(vu_refs[m], row_ok, q) for q in range(3)],
                [_load(vv_refs[m], col_ok, q) for q in range(3)])

    g, vu, vv = tiles.switch(seg, count, load)
    sq = jnp.where(mask, g * g + 1e-30, 0.0)
    u_len, v_len = u_size.astype(jnp.float32), v_size.astype(jnp.float32)
    row_is_u = tiles.pick(seg, u_is_row) == 1
    _new_side(c_ref, vu, jnp.sum(sq, axis=1) / v_len, row_ok, u_len, row_is_u, nu_ref, fu_ref,
              tiles.pick(seg, offsets[0]) + b * u_size)
    _new_side(c_ref, vv, jnp.sum(sq, axis=0) / u_len, col_ok, v_len, ~row_is_u, nv_ref, fv_ref,
              tiles.pick(seg, offsets[1]) + b * v_size)


class _FactoredTile(NamedTuple):
    """What a program reads of its factored tile (`_factored_loads`)."""

    seg: jax.Array  # its member
    blocks: tuple  # (row block j, column block k)
    masks: tuple  # rows [rows], columns [cols], elements [rows, cols] that exist
    starts: tuple  # where its rows / columns sit on the flat U / V sides
    g: jax.Array
    p: jax.Array
    mom: list
    rms: jax.Array
    fac_u: list  # its rows' factors, 3 x [rows]
    fac_v: list  # its columns', 3 x [cols]


def _factored_loads(state_refs, fu_ref, fv_ref, tiles: MemberTiles, offsets) -> _FactoredTile:
    """This program's factored tile: its member, (row, column) blocks, masks, where its
    rows / columns sit on the flat sides, and its loads: g, p, mom, rms and the factors.
    state_refs: p, g, mom, rms of every member (p_0 .. p_{S-1}, g_0, ...); offsets: each
    member's (U side offsets, V side offsets) (`FactoredGroup.u_offsets`, `v_offsets`)."""
    count = len(tiles.shapes)
    seg, b, j, k, u_size, v_size, (row_ok, col_ok, mask) = _member_tile(tiles)
    # on the flat sides: the member's offset, its earlier [U] / [V] lines, earlier tiles
    starts = (tiles.pick(seg, offsets[0]) + b * u_size + j * tiles.tile.rows,
              tiles.pick(seg, offsets[1]) + b * v_size + k * tiles.tile.cols)

    def load(m):  # only member m's branch reads: the others' blocks are not its tile
        p_ref, g_ref, mom_ref, rms_ref = (state_refs[a * count + m] for a in range(4))
        return (_load(g_ref, mask), _load(p_ref, mask),
                [_load(mom_ref, mask, q) for q in range(3)], _load(rms_ref, mask, 0))

    g, p, mom, rms = tiles.switch(seg, count, load)
    return _FactoredTile(seg, (j, k), (row_ok, col_ok, mask), starts, g, p, mom, rms,
                         [_side_load(fu_ref, starts[0], row_ok, q) for q in range(3)],
                         [_side_load(fv_ref, starts[1], col_ok, q) for q in range(3)])


def _factored_features(c_ref, t: _FactoredTile):
    """The tile's new accumulators m (3 planes), rms and its 16 feature planes."""
    m, rms = _accumulators(c_ref, t.g, t.mom, t.rms)
    return m, rms, _features_factored(t.g, t.p, m, rms, t.fac_u, t.fac_v)


def _side_lanes(sums, new_ref, start, ok, lane0):
    """sums [1, 32] with lanes lane0 + q and lane0 + 3 + q (q < 3) = the sums of n^2 and
    rsqrt(n + 1e-8)^2 over the entries `ok` of plane q of the line n of a flat side of new
    accumulators new_ref [3, sum BU | sum BV] that starts at `start`."""
    lane = lax.broadcasted_iota(jnp.int32, (1, plan.NUM_SUMS), 1)
    for q in range(3):
        n = _side_load(new_ref, start, ok, q)
        sums = jnp.where(lane == lane0 + q, jnp.sum(jnp.where(ok, n * n, 0.0)), sums)
        sums = jnp.where(lane == lane0 + 3 + q, jnp.sum(jnp.where(ok, 1 / (n + 1e-8), 0.0)),
                         sums)
    return sums


def _factored_moments_kernel(c_ref, *refs, tiles: MemberTiles, offsets):
    # per member: p, g [rows, cols]; mom [3, rows, cols]; rms [1, rows, cols]; then fu
    # [3, sum BU], fv [3, sum BV], nu [3, sum BU] and nv [3, sum BV] whole (the flat
    # sides' factors and new accumulators); s_ref [1, 32]: this tile's sums of squared
    # features (lanes 0-15), and, in the first column block, of its rows' side features
    # (lanes 16-21, from nu), in the first row block of its columns' (lanes 22-27, from nv)
    state_refs, (fu_ref, fv_ref, nu_ref, nv_ref, s_ref) = refs[:-5], refs[-5:]
    t = _factored_loads(state_refs, fu_ref, fv_ref, tiles, offsets)
    (j, k), (row_ok, col_ok, mask), starts = t.blocks, t.masks, t.starts
    _, _, feats = _factored_features(c_ref, t)
    # Branches, not masks: the other tiles (most of them) skip the 12 block-wide sums.
    sums = lax.cond(k == 0, lambda s: _side_lanes(s, nu_ref, starts[0], row_ok,
                                                  plan.SIDE_LANES_U),
                    lambda s: s, _sums_vector(feats, mask))
    s_ref[...] = lax.cond(j == 0, lambda s: _side_lanes(s, nv_ref, starts[1], col_ok,
                                                        plan.SIDE_LANES_V),
                          lambda s: s, sums)


def _factored_apply_kernel(c_ref, *refs, tiles: MemberTiles, offsets, mults, precision, layer1,
                           hidden, early_weights, compiled):
    # per member: p, g, mom, rms as in the moments kernel; then fu, fv, tu [sum BU, Hp] (row
    # tables + b0), tv [sum BV, Hp] whole, w [16, Hp] (the member's), the MLP, nu [3, sum BU]
    # and nv [3, sum BV] whole (the new accumulators). Outputs per member: p [rows, cols] in
    # p's dtype, mom [3, rows, cols], rms [1, rows, cols], its new v planes on its U side
    # [3, rows] and V side [3, cols].
    count = len(tiles.shapes)
    state_refs, (fu_ref, fv_ref, tu_ref, tv_ref, w_ref) = refs[:4 * count], refs[4 * count:
                                                                                 4 * count + 5]
    mlp_refs, rest = _split_mlp(refs[4 * count + 5:], hidden)
    (nu_ref, nv_ref), outs = rest[:2], rest[2:]
    po, mo, ro, uo, vo = (outs[a * count:(a + 1) * count] for a in range(5))
    # The tile's loads, then the MLP's (`_mlp_weights`), then the math.
    t = _factored_loads(state_refs, fu_ref, fv_ref, tiles, offsets)
    seg, (j, k), (row_ok, col_ok, mask), starts = t.seg, t.blocks, t.masks, t.starts
    if _row_col_as_planes(layer1, precision):
        pre0 = _row_col_planes(tu_ref, tv_ref, starts, row_ok, col_ok)
    else:
        tu, tv = _side_load(tu_ref, starts[0], row_ok), _side_load(tv_ref, starts[1], col_ok)
        pre0 = (_row_col_operand(tu, tv) if layer1 == "dot_all"
                else tu[:, None, :] + tv[None, :, :])
    first, later_w, vector_w = _mlp_weights(w_ref, mlp_refs, c_ref, layer1, early_weights,
                                            precision)
    m, rms, feats = _factored_features(c_ref, t)

    # Stored before the MLP, not held in registers through it: compiled for sm_90 (1x256)
    # the default ("dot", TF32) then needs 162 registers, "dot_all" with TF32 and
    # early_weights 168 (was 198: 12 warps per SM, not 8), with tf32_fp16 134.
    def store_accumulators(a):
        for q in range(3):
            _store(mo[a], m[q], mask, q)
        _store(ro[a], rms, mask, 0)

    tiles.each(seg, count, store_accumulators)
    pre = _first_layer(pre0, feats, first, precision, layer1)
    step = _mlp_step(pre, later_w, vector_w, mlp_refs, c_ref, mults, precision, compiled)
    _store_updated(tiles, seg, state_refs, po, step, mask)
    # The state's new v_row / v_col, copied here rather than sliced out of the flat sides
    # by an XLA kernel per tensor and side: the first column block's programs write their
    # rows', the first row block's their columns'.
    # (Loaded once, outside the members' branches: each memory operation in a branch
    # costs compile time, `blocks.PALLAS_MAX_MEMBERS`.)
    for first, src, dst, start, ok in ((k == 0, nu_ref, uo, starts[0], row_ok),
                                       (j == 0, nv_ref, vo, starts[1], col_ok)):
        @pl.when(first)
        def _copy(src=src, dst=dst, start=start, ok=ok):
            planes = [_side_load(src, start, ok, q) for q in range(3)]

            def store(a):
                for q in range(3):
                    _store(dst[a], planes[q], ok, q)

            tiles.each(seg, count, store)


def _vector_loads(state_refs, tiles: MemberTiles):
    """This program's tile of a non-factored tensor (each viewed as [1, 1, n]): its member,
    mask and loads (g, p, mom, rms, v_diag). state_refs: p, g, mom, rms, v_diag of every
    member."""
    count = len(tiles.shapes)
    seg, _, _, _, _, _, (_, _, mask) = _member_tile(tiles)

    def load(m):  # only member m's branch reads: the others' blocks are not its tile
        p_ref, g_ref, mom_ref, rms_ref, vd_ref = (state_refs[a * count + m] for a in range(5))
        return (_load(g_ref, mask), _load(p_ref, mask),
                [_load(mom_ref, mask, q) for q in range(3)], _load(rms_ref, mask, 0),
                [_load(vd_ref, mask, q) for q in range(3)])

    return seg, mask, tiles.switch(seg, count, load)


def _packed_features(c_ref, g, p, mom, rms, vd):
    """A non-factored tile's new accumulators (m, rms, v) and its 22 feature planes."""
    m, rms = _accumulators(c_ref, g, mom, rms)
    feats, v = _features_packed(c_ref, g, p, m, rms, vd)
    return m, rms, v, feats


def _vector_moments_kernel(c_ref, *refs, tiles: MemberTiles):
    # per member: p, g [1, T]; mom, v_diag [3, 1, T]; rms [1, 1, T] (T = the tile's
    # elements); s_ref [1, 32]: this tile's sums of squared features
    _, mask, loaded = _vector_loads(refs[:-1], tiles)
    refs[-1][...] = _sums_vector(_packed_features(c_ref, *loaded)[3], mask)


def _vector_apply_kernel(c_ref, *refs, tiles: MemberTiles, **form):
    # per member: p, g, mom, rms, v_diag as in the moments kernel; then w [32, Hp] (this
    # tile's tensor's first-layer rows), b0 [1, Hp], the MLP. Outputs per member: p [1, T]
    # in p's dtype, mom [3, 1, T], rms [1, 1, T], v_diag [3, 1, T]
    count = len(tiles.shapes)
    w_ref, b0_ref = refs[5 * count:5 * count + 2]
    mlp_refs, outs = _split_mlp(refs[5 * count + 2:], form.pop("hidden"))
    po, mo, ro, vo = (outs[a * count:(a + 1) * count] for a in range(4))
    seg, mask, loaded = _vector_loads(refs[:5 * count], tiles)

    def store_accumulators(m, rms, v):
        def store(a):
            for q in range(3):
                _store(mo[a], m[q], mask, q)
                _store(vo[a], v[q], mask, q)
            _store(ro[a], rms, mask, 0)

        tiles.each(seg, count, store)

    step = _packed_apply(c_ref, loaded, w_ref, b0_ref, mlp_refs, store_accumulators, **form)
    _store_updated(tiles, seg, refs, po, step, mask)


def _packed_moments_kernel(c_ref, p_ref, g_ref, mom_ref, rms_ref, vd_ref, n_ref, s_ref):
    # p, g [rows, cols] of the packed buffer (whole tiles: no masks); mom, vd [3, rows,
    # cols]; n [1, 1] valid count
    g, p = g_ref[...], p_ref[...]
    _, _, _, feats = _packed_features(c_ref, g, p, [mom_ref[q] for q in range(3)], rms_ref[0],
                                      [vd_ref[q] for q in range(3)])
    rows, cols = g.shape
    flat = (lax.broadcasted_iota(jnp.int32, g.shape, 0) * cols
            + lax.broadcasted_iota(jnp.int32, g.shape, 1))
    s_ref[...] = _sums_vector(feats, flat < n_ref[...])


def _packed_apply_kernel(c_ref, p_ref, g_ref, mom_ref, rms_ref, vd_ref, w_ref, b0_ref, *rest,
                         **form):
    # w [32, Hp]: this tile's tensor's first-layer rows; b0 [1, Hp]
    mlp_refs, (po_ref, mo_ref, ro_ref, vo_ref) = _split_mlp(rest, form.pop("hidden"))
    loaded = (g_ref[...], p_ref[...], [mom_ref[q] for q in range(3)], rms_ref[0],
              [vd_ref[q] for q in range(3)])

    def store_accumulators(m, rms, v):
        for k in range(3):
            mo_ref[k] = m[k]
            vo_ref[k] = v[k]
        ro_ref[0] = rms

    step = _packed_apply(c_ref, loaded, w_ref, b0_ref, mlp_refs, store_accumulators, **form)
    po_ref[...] = _updated(p_ref, step)


def _f32(shape):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def _part_major_sums(partials):
    """Whole sums [sum n_j] from each tensor's partial sums [K_j, ..., n_j], K_j parts of
    its n_j lines each: padded to the most parts, side by side, one reduction."""
    flat = [x.reshape(x.shape[0], -1) for x in partials]
    parts = max(x.shape[0] for x in flat)
    return jnp.sum(jnp.concatenate([jnp.pad(x, ((0, parts - x.shape[0]), (0, 0)))
                                    for x in flat], axis=1), axis=0)


def _split_mlp(rest, hidden: bool):
    if hidden:
        return (rest[0], rest[1], rest[2]), rest[3:]
    return (None, None, rest[0]), rest[1:]


# ----------------------------------------------------------------------------- launchers

class PallasKernels:
    """Launchers of the Pallas kernels (`plan.Kernels` interface).

    Args:
      interpret: run the kernels in Pallas' interpreter (CPU).
      mlp_precision: the MLP's dots: "tf32" (`lax.Precision.DEFAULT`), "ieee"
        (`HIGHEST`), "tf32_fp16" (the raw per-element features' dot TF32; the H x H
        and output layers' and "dot_all"'s row / column operands rounded to fp16, which
        has TF32's 10-bit mantissa, saturating at 65504; compiled for sm_90, 1x256, the
        apply kernel then needs 752 / 640 instructions per thread ("dot" / "dot_all")
        against TF32's 816 / 680: the ReLUs one instruction per pair, fp16 dots at twice
        TF32's rate), or "bf16"
        (operands rounded to bf16, float32 accumulation; Triton's step was 1.2-1.3x faster
        with them on an H200, at a precision cost: docs/KERNELS.md).
      layer1: the first MLP layer as "dot" (the features as one [tile, K] x [K, Hp] dot,
        at `mlp_precision`, plus the per-row / per-column tables), "dot_all" (the factored
        tensors' 12 per-row / per-column features and b0 as 16 more planes of that dot,
        [tile, 32] x [32, Hp], or with tf32_fp16 through a second [tile, 16] x [16, Hp]
        dot, instead of [U, Hp] / [V, Hp] tables: 8 floats a column read, not Hp, and no
        table sums; `_row_col_as_planes`). On an H200 the step with "dot" took 1.23 / 8.76
        ms at 1e7 / 1e8 parameters, with a multiply-add per feature instead (the form
        before session 15, removed in session 27) 2.25 / 17.6; "dot_all" is not timed yet.
      in_place: the apply kernels write into their p / state operands (`plan.in_place_aliases`).
      early_weights: the apply kernels read the MLP's biases and output layer with the
        dots' weights, before any math, not where they are used: fewer memory round trips
        in sequence per program, more registers (the bf16 / fp16 output layer, a dot,
        always reads its weights early). Compiled for sm_90 (1x256 apply tile, session
        18): "dot_all" with tf32_fp16 3 round trips in sequence instead of 4 at 166
        registers instead of 152 (12 warps per SM either way); "dot" with TF32 3 instead of
        4 at 176 registers instead of 159 (8 warps per SM instead of 12). Untimed: for the
        GPU sweep.
      tile_order: how a factored tensor's tiles are walked, "rows" or "columns"
        (`blocks.TILE_ORDERS`: which programs share an SM's L1 for the per-column operands).
    """

    def __init__(self, interpret: bool, mlp_precision: str = "tf32", layer1: str = "dot",
                 in_place: bool = True, early_weights: bool = False, tile_order: str = "rows"):
        check_choice("mlp_precision", mlp_precision, MLP_PRECISIONS)
        check_choice("layer1", layer1, LAYER1_FORMS)
        check_choice("tile_order", tile_order, TILE_ORDERS)
        self.interpret = interpret
        # the layers after the first take their weights as `plan.mlp_weights` hands them
        # under this precision: rounded to their dots' operand type once per step, not in
        # every program (compiled for sm_90, 1x256, tf32_fp16, "dot_all", 848 -> 808
        # instructions per thread), in `plan.tf32_operand_order` under TF32 (`_later_dot`)
        self.mlp_precision = mlp_precision
        self.layer1 = layer1
        self.in_place = in_place
        self.early_weights = early_weights
        self.tile_order = tile_order
        self.row_col_in_dot = layer1 == "dot_all"  # what plan hands group_apply
        self.row_col_planes = _row_col_as_planes(layer1, mlp_precision)

    member_limit = PALLAS_MAX_MEMBERS  # more vectors than this are packed (`plan.Kernels`)
    # The H x H layers' biases as ReLU floors (`plan.mlp_weights`): their dots start from
    # zero, not from the bias copied into every accumulator register. Compiled for sm_90
    # (1x256, H = 32), per thread: "dot" TF32 880 -> 832 instructions, "dot_all" TF32
    # 840 -> 784, "dot_all" tf32_fp16 680 -> 680 at 128 registers, not 138 (16 warps per
    # SM, not 12). Triton's kernels did not take it: their dots then issued as one
    # wgmma group and took 172-180 registers (8 warps per SM, not 12).
    relu_floors = True

    def _form(self, mlp: plan.MLPWeights, mults) -> dict:
        """The apply kernels' static MLP arguments (the factored one's also take `layer1`)."""
        return dict(mults=mults, precision=self.mlp_precision, hidden=mlp.w_hidden is not None,
                    early_weights=self.early_weights, compiled=not self.interpret)

    def _call(self, kernel, name, blocks: BlockSizes, **kw):
        if self.interpret:
            return pl.pallas_call(kernel, name=name, interpret=True, **kw)
        params = pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        return pl.pallas_call(kernel, name=name, compiler_params=params, **kw)

    # Factored tensors: one launch per run of them alike in tiles and dtypes, a 1-D grid
    # over their tiles (`MemberTiles`).
    @staticmethod
    def _runs(p, g, group: plan.FactoredGroup) -> list[range]:
        return member_runs([(group.blocks[j], group.reduce_blocks[j], p[j].dtype, g[j].dtype)
                            for j in range(len(p))], PALLAS_MAX_MEMBERS)

    @staticmethod
    def _whole(x):
        """A flat side's BlockSpec: the whole array (read at the tile's offsets in-kernel)."""
        return pl.BlockSpec(x.shape, lambda *idx: (0,) * x.ndim)

    @staticmethod
    def _state_specs(tiles: MemberTiles):
        """Every member's BlockSpecs of p (and g), mom and rms [3 | 1, B, U, V]."""
        r, c = tiles.tile.rows, tiles.tile.cols
        return (tiles.specs((None, r, c), "buv"), tiles.specs((3, None, r, c), "0buv"),
                tiles.specs((1, None, r, c), "0buv"))

    @staticmethod
    def _offsets(group: plan.FactoredGroup, run: range):
        return (tuple(group.u_offsets[j] for j in run), tuple(group.v_offsets[j] for j in run))

    def _tiles(self, group: plan.FactoredGroup, run: range, tile: BlockSizes) -> MemberTiles:
        """The run's tensors [B, U, V], in `tile`, walked in `tile_order`."""
        return MemberTiles(tuple((group.layouts[j].B, group.layouts[j].U, group.layouts[j].V)
                                 for j in run), tile, self.tile_order)

    def group_sides(self, g, v_u, v_v, consts, group: plan.FactoredGroup, tile: BlockSizes):
        """(new_u, new_v, f_u, f_v) on the flat sides, one program per [U, V] plane, each in
        one `tile` (`blocks.plane_tile`). v_u, v_v: each tensor's state on its U / V side,
        [3, B U] / [3, B V]."""
        lays = group.layouts
        tu, tv = sum(group.u_sizes), sum(group.v_sizes)
        sides = [_f32((3, tu)), _f32((3, tv))] * 2
        outs = ()
        for run in member_runs([x.dtype for x in g], PALLAS_MAX_MEMBERS):
            tiles = self._tiles(group, run, tile)
            vu = [v_u[j].reshape(3, lays[j].B, lays[j].U) for j in run]
            vv = [v_v[j].reshape(3, lays[j].B, lays[j].V) for j in run]
            # Each launch writes its tensors' stretches of the flat sides: a later one
            # into the earlier ones' outputs (`outs`, aliased).
            aliases = {1 + 3 * len(run) + o: o for o in range(len(outs))}
            outs = self._call(
                functools.partial(_row_col_sides_kernel, tiles=tiles,
                                  offsets=self._offsets(group, run),
                                  u_is_row=tuple(int(lays[j].u_is_row) for j in run)),
                "adafac_row_col_sides", tile, grid=(tiles.total,),
                in_specs=[pl.BlockSpec((plan.NUM_CONSTS,), lambda i: (0,)),
                          *tiles.specs((None, tile.rows, tile.cols), "buv"),
                          *tiles.specs((3, None, tile.rows), "0bu"),
                          *tiles.specs((3, None, tile.cols), "0bv"),
                          *(self._whole(x) for x in outs)],
                out_specs=[self._whole(x) for x in sides], out_shape=sides,
                input_output_aliases=aliases,
            )(consts, *(g[j] for j in run), *vu, *vv, *outs)
        return tuple(outs)

    def group_row_col_sums(self, g, group: plan.FactoredGroup):
        su, sv = [], []
        for run in self._runs(g, g, group):
            tiles = self._tiles(group, run, sums_tile(group.reduce_blocks[run[0]],
                                                      [group.layouts[j].U for j in run]))
            r, c, count = tiles.tile.rows, tiles.tile.cols, len(run)
            out = self._call(
                functools.partial(_row_col_sums_kernel, tiles=tiles), "adafac_row_col_sums",
                tiles.tile, grid=(tiles.total,), in_specs=tiles.specs((None, r, c), "buv"),
                out_specs=(tiles.specs((None, None, r), "vbu")
                           + tiles.specs((None, None, c), "ubv")),
                out_shape=([_f32((nv, b, u)) for (b, u, _), (_, _, nv)
                            in zip(tiles.shapes, tiles.grids, strict=True)]
                           + [_f32((nu, b, v)) for (b, _, v), (_, nu, _)
                              in zip(tiles.shapes, tiles.grids, strict=True)]),
            )(*(g[j] for j in run))
            su += out[:count]
            sv += out[count:]
        return _part_major_sums(su), _part_major_sums(sv)

    def group_moments(self, p, g, mom, rms, fu, fv, new_u, new_v, consts,
                      group: plan.FactoredGroup):
        partials, counts = [], []
        for run in self._runs(p, g, group):
            tiles = self._tiles(group, run, group.reduce_blocks[run[0]])
            p_specs, mom_specs, rms_specs = self._state_specs(tiles)
            partials.append(self._call(
                functools.partial(_factored_moments_kernel, tiles=tiles,
                                  offsets=self._offsets(group, run)),
                "adafac_moments", tiles.tile, grid=(tiles.total,),
                in_specs=[pl.BlockSpec((plan.NUM_CONSTS,), lambda i: (0,)), *p_specs, *p_specs,
                          *mom_specs, *rms_specs,
                          *(self._whole(x) for x in (fu, fv, new_u, new_v))],
                out_specs=pl.BlockSpec((1, plan.NUM_SUMS), lambda i: (i, 0)),
                out_shape=_f32((tiles.total, plan.NUM_SUMS)),
            )(consts, *(x[j] for x in (p, g, mom, rms) for j in run), fu, fv, new_u, new_v))
            counts += tiles.counts
        return plan.segment_sums(jnp.concatenate(partials), counts)

    def group_apply(self, p, g, mom, rms, fu, fv, consts, tu, tv, w, mlp, mults, new_u, new_v,
                    group: plan.FactoredGroup):
        if self.row_col_in_dot:  # w's rows in the order of the kernel's operand columns
            w = w[:, _row_col_rows()]
        outs = [self._apply_run(p, g, mom, rms, fu, fv, consts, tu, tv, w, mlp, mults, new_u,
                                new_v, group, run) for run in self._runs(p, g, group)]
        return tuple(tuple(x for out in outs for x in out[o]) for o in range(5))

    def _apply_run(self, p, g, mom, rms, fu, fv, consts, tu, tv, w, mlp, mults, new_u, new_v,
                   group, run: range):
        tiles = self._tiles(group, run, group.blocks[run[0]])
        r, c, count = tiles.tile.rows, tiles.tile.cols, len(run)
        p_specs, mom_specs, rms_specs = self._state_specs(tiles)
        mlp_specs, mlp_args = self._mlp_specs(mlp)
        in_specs = [
            pl.BlockSpec((plan.NUM_CONSTS,), lambda i: (0,)), *p_specs, *p_specs, *mom_specs,
            *rms_specs, self._whole(fu), self._whole(fv), self._whole(tu), self._whole(tv),
            tiles.stacked_spec(w, run.start),  # the member's first-layer rows
            *mlp_specs, self._whole(new_u), self._whole(new_v)]
        kernel = functools.partial(_factored_apply_kernel, tiles=tiles,
                                   offsets=self._offsets(group, run), layer1=self.layer1,
                                   **self._form(mlp, mults))
        aliases = plan.in_place_aliases(count, (plan.P, plan.MOM, plan.RMS), self.in_place)
        out = self._call(
            kernel, "adafac_apply", tiles.tile, grid=(tiles.total,), in_specs=in_specs,
            out_specs=(p_specs + mom_specs + rms_specs + tiles.specs((3, None, r), "0bu")
                       + tiles.specs((3, None, c), "0bv")),
            out_shape=([jax.ShapeDtypeStruct(p[j].shape, p[j].dtype) for j in run]
                       + [_f32(mom[j].shape) for j in run] + [_f32(rms[j].shape) for j in run]
                       + [_f32((3, b, u)) for b, u, _ in tiles.shapes]
                       + [_f32((3, b, v)) for b, _, v in tiles.shapes]),
            input_output_aliases=aliases,
        )(consts, *(x[j] for x in (p, g, mom, rms) for j in run), fu, fv, tu, tv, w, *mlp_args,
          new_u, new_v)
        return [out[o * count:(o + 1) * count] for o in range(5)]

    @staticmethod
    def _mlp_specs(mlp: plan.MLPWeights):
        """The MLP's layers after the first, whole in every program."""
        specs, args = [], []
        if mlp.w_hidden is not None:
            specs += [pl.BlockSpec(mlp.w_hidden.shape, lambda *i: (0, 0, 0)),
                      pl.BlockSpec(mlp.b_hidden.shape, lambda *i: (0, 0))]
            args += [mlp.w_hidden, mlp.b_hidden]
        specs.append(pl.BlockSpec(mlp.w_out_t.shape, lambda *i: (0, 0)))
        args.append(mlp.w_out_t)
        return specs, args

    # Non-factored tensors packed into one [rows, 128] buffer: grid (tiles,).
    def _packed_specs(self, blocks):
        r, c = blocks.rows, blocks.cols
        return [
            pl.BlockSpec((plan.NUM_CONSTS,), lambda i: (0,)),
            pl.BlockSpec((r, c), lambda i: (i, 0)),  # p
            pl.BlockSpec((r, c), lambda i: (i, 0)),  # g
            pl.BlockSpec((3, r, c), lambda i: (0, i, 0)),  # mom
            pl.BlockSpec((1, r, c), lambda i: (0, i, 0)),  # rms
            pl.BlockSpec((3, r, c), lambda i: (0, i, 0)),  # v_diag
        ]

    def packed_moments(self, p, g, mom, rms, vd, counts, consts, blocks: BlockSizes):
        n = p.shape[0] // blocks.rows
        return self._call(
            _packed_moments_kernel, "adafac_packed_moments", blocks, grid=(n,),
            in_specs=self._packed_specs(blocks) + [pl.BlockSpec((1, 1), lambda i: (i, 0))],
            out_specs=pl.BlockSpec((1, plan.NUM_SUMS), lambda i: (i, 0)),
            out_shape=jax.ShapeDtypeStruct((n, plan.NUM_SUMS), jnp.float32),
        )(consts, p, g, mom, rms, vd, counts)

    def packed_apply(self, p, g, mom, rms, vd, consts, w_seg, b0, seg_starts, mlp, mults,
                     blocks: BlockSizes):
        n = p.shape[0] // blocks.rows
        packed = self._packed_specs(blocks)  # consts, p, g, mom, rms, v_diag
        mlp_specs, mlp_args = self._mlp_specs(mlp)
        in_specs = packed + [
            # static block -> tensor map: segments are contiguous block ranges
            pl.BlockSpec((None,) + w_seg.shape[1:], lambda i: (segment(i, seg_starts), 0, 0)),
            pl.BlockSpec(b0.shape, lambda i: (0, 0)),
        ] + mlp_specs
        kernel = functools.partial(_packed_apply_kernel, **self._form(mlp, mults))
        return self._call(
            kernel, "adafac_packed_apply", blocks, grid=(n,), in_specs=in_specs,
            out_specs=[packed[1], *packed[3:]],  # p, mom, rms, v_diag, as read
            out_shape=[_f32(x.shape) for x in (p, mom, rms, vd)],
            input_output_aliases=plan.in_place_aliases(
                1, (plan.P, plan.MOM, plan.RMS, plan.V_DIAG), self.in_place),
        )(consts, p, g, mom, rms, vd, w_seg, b0, *mlp_args)

    # Non-factored tensors where they lie, each viewed as [1, 1, n] in tiles of the packed
    # layout's elements: one launch per pass and run of them alike in dtype.
    @staticmethod
    def _vector_runs(p, g, blocks: BlockSizes):
        """(run, its MemberTiles): the members alike in dtypes, in tiles of `blocks`' elements."""
        tile = BlockSizes(1, blocks.rows * blocks.cols, blocks.num_warps, blocks.num_stages)
        return [(run, MemberTiles(tuple((1, 1, p[j].size) for j in run), tile))
                for run in member_runs([(a.dtype, b.dtype) for a, b in zip(p, g, strict=True)],
                                       PALLAS_MAX_MEMBERS)]

    @staticmethod
    def _vector_specs(tiles: MemberTiles):
        """Every member's BlockSpecs of p (and g) [1, 1, n], then of mom, rms and v_diag
        [3 | 1 | 3, 1, 1, n] (all mom first, ...)."""
        t = tiles.tile.cols
        return (tiles.specs((None, 1, t), "buv"),
                [spec for k in (3, 1, 3) for spec in tiles.specs((k, None, 1, t), "0buv")])

    @staticmethod
    def _vector_state(run: range, p, g, mom, rms, vd):
        """p, g [1, 1, n] and mom, rms, vd [planes, 1, 1, n] of the run's members."""
        return ([p[j].reshape(1, 1, -1) for j in run] + [g[j].reshape(1, 1, -1) for j in run]
                + [x[j].reshape(x[j].shape[0], 1, 1, -1) for x in (mom, rms, vd) for j in run])

    def member_moments(self, p, g, mom, rms, vd, consts, blocks: BlockSizes):
        partials = []
        for run, tiles in self._vector_runs(p, g, blocks):
            p_specs, plane_specs = self._vector_specs(tiles)
            partials.append(self._call(
                functools.partial(_vector_moments_kernel, tiles=tiles), "adafac_packed_moments",
                tiles.tile, grid=(tiles.total,),
                in_specs=[pl.BlockSpec((plan.NUM_CONSTS,), lambda i: (0,)), *p_specs, *p_specs,
                          *plane_specs],
                out_specs=pl.BlockSpec((1, plan.NUM_SUMS), lambda i: (i, 0)),
                out_shape=_f32((tiles.total, plan.NUM_SUMS)),
            )(consts, *self._vector_state(run, p, g, mom, rms, vd)))
        return jnp.concatenate(partials) if len(partials) > 1 else partials[0]

    def member_apply(self, p, g, mom, rms, vd, consts, w_seg, b0, mlp, mults, blocks: BlockSizes):
        outs = []
        for run, tiles in self._vector_runs(p, g, blocks):
            count = len(run)
            p_specs, plane_specs = self._vector_specs(tiles)
            mlp_specs, mlp_args = self._mlp_specs(mlp)
            in_specs = [pl.BlockSpec((plan.NUM_CONSTS,), lambda i: (0,)), *p_specs, *p_specs,
                        *plane_specs, tiles.stacked_spec(w_seg, run.start),  # its first layer
                        pl.BlockSpec(b0.shape, lambda i: (0, 0)), *mlp_specs]
            kernel = functools.partial(_vector_apply_kernel, tiles=tiles,
                                       **self._form(mlp, mults))
            aliases = plan.in_place_aliases(count, (plan.P, plan.MOM, plan.RMS, plan.V_DIAG),
                                            self.in_place)
            operands = self._vector_state(run, p, g, mom, rms, vd)
            out = self._call(
                kernel, "adafac_packed_apply", tiles.tile, grid=(tiles.total,), in_specs=in_specs,
                out_specs=p_specs + plane_specs,
                out_shape=([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in operands[:count]]
                           + [_f32(x.shape) for x in operands[2 * count:]]),
                input_output_aliases=aliases,
            )(consts, *operands, w_seg, b0, *mlp_args)
            outs.append([[x.reshape(x.shape[0], -1) if o else x.reshape(-1)
                          for x in out[o * count:(o + 1) * count]] for o in range(4)])
        return tuple(tuple(x for out in outs for x in out[o]) for o in range(4))


# ----------------------------------------------------------------------------- public op

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _fused(lopt, theta, state, grad, config):
    (interpret, mlp_precision, blocks, packed_blocks, reduction_blocks, layer1, in_place,
     early_weights, tile_order) = config
    kernels = plan.Kernels.of(PallasKernels(interpret, mlp_precision, layer1, in_place,
                                            early_weights, tile_order))
    return plan.fused_update(kernels, lopt, theta, state, grad, blocks=blocks,
                             packed_blocks=packed_blocks, reduction_blocks=reduction_blocks)


def _fused_fwd(lopt, theta, state, grad, config):
    return _fused(lopt, theta, state, grad, config), (theta, state, grad)


def _fused_bwd(lopt, config, residuals, cotangent):
    from lopt_fast.learned.adafac_mlp import reference_update

    theta, state, grad = residuals
    _, vjp = jax.vjp(functools.partial(reference_update, lopt), theta, state, grad)
    return vjp(cotangent)


_fused.defvjp(_fused_fwd, _fused_bwd)


def pallas_update(lopt, theta, state, grad, *, interpret: bool | None = None,
                  mlp_precision: str = "tf32", blocks: BlockSizes | None = None,
                  packed_blocks: BlockSizes | None = None, layer1: str = "dot",
                  in_place: bool = True, early_weights: bool = False,
                  reduction_blocks: BlockSizes | None = None, tile_order: str = "rows"):
    """Fused Pallas `AdafacMLPLOpt` update: the signature of `reference_update`.

    Forward runs the kernels; the backward pass (`jax.custom_vjp`) differentiates the
    reference, so meta-gradients through the optimizer match `reference_update`'s.

    Args:
      lopt, theta, state, grad: as `lopt_fast.learned.adafac_mlp.reference_update`.
      interpret: run in Pallas' interpreter; default: when the default backend is CPU.
      mlp_precision: "tf32", "ieee", "tf32_fp16" or "bf16" dots for the MLP on GPU (see
        `PallasKernels`); this keyword's default is the backend's (`opt_fn` passes none
        unless asked).
      blocks, packed_blocks: override `blocks.block_sizes` / `packed_block_sizes` tiles
        (`blocks`: the factored tensors' tile in every pass).
      reduction_blocks: the factored tensors' tile in the reduction passes (row / column
        sums, moments) only, over `blocks` and `reduction_block_sizes`.
      layer1: the first MLP layer as "dot" or "dot_all" (see `PallasKernels`).
      in_place: update p and the state in their buffers: right when the caller donates
        the state (or carries it through `lax.scan`); otherwise XLA copies them first,
        and `in_place=False` (fresh outputs) saves those copies (`plan.in_place_aliases`).
      early_weights: where the apply kernels read the MLP's biases and output layer (see
        `PallasKernels`).
      tile_order: "rows" or "columns", the order of a factored tensor's tiles
        (`blocks.TILE_ORDERS`).

    Returns:
      (new params tree, `LeafAccumulators` of accumulator trees).

    Example:
        new_params, acc = pallas_update(lopt, theta, opt_state, grads, interpret=True)
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _fused(lopt, theta, state, grad,
                  (bool(interpret), mlp_precision, blocks, packed_blocks, reduction_blocks,
                   layer1, bool(in_place), bool(early_weights), tile_order))
