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
  `lopt_fast.kernels.members`) tile the tensors the same way but read and write them
  where they lie, which saves the packing and unpacking kernels (17 of a 1e7-parameter
  step's 30 compiled for an H100).

Per factored tensor the step is three launches; the packed buffer takes two:
  1. `row_col_sums`: sum over V and over U of G = g^2 + 1e-30 (Adafactor's means);
  2. `moments`: per-tile sums of the squared per-element features (16 factored,
     22 not) from the recomputed accumulators; the wrapper adds the per-row /
     per-column feature moments from the small tables;
  3. `apply`: recompute accumulators and features, layer 1 with the normalisation
     folded into w0 (and the per-row / per-column features folded into [U, H] /
     [V, H] tables, b0 and the time features into the row table), the rest of the
     MLP, and write params (in their dtype) and float32 accumulators.
Between passes the wrapper does only O(rows + cols) work per tensor.

`jax.vmap` over a task axis (with per-task theta) batches every `pallas_call` into
a leading grid axis, so all tasks share these launches.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lopt_fast.learned import adafac_math as am
from lopt_fast.pallas.blocks import (
    BlockSizes,
    block_sizes,
    packed_block_sizes,
    padded_hidden,
    reduction_block_sizes,
)

NUM_SUMS = 32  # per-tile partial sums: 16 (factored) or 22 (packed) features, padded to 2^k
NUM_EW_FACTORED = 16
# Width of the per-row / per-column feature tables when a kernel runs those features
# through its layer-1 dot (`Kernels.row_col_in_dot`): 6 features, a 1 for b0, padding.
ROW_COL_TABLE_WIDTH = 8
NUM_EW_PACKED = 22
# Layout of the `consts` vector every kernel reads (float32, length 16).
C_MOM, C_RMS, C_FAC, C_BOUT = 0, 3, 4, 7
NUM_CONSTS = 16
# The apply kernels update the state in place: operand -> output index, in the operand
# order both backends launch them with (consts, p, g, mom, rms[, vd], ...). Each tile
# reads, then writes, only its own elements of these, so aliasing is safe; with the state
# donated the step needs no second copy of it, and without donation XLA copies first.
FACTORED_APPLY_ALIASES = {1: 0, 3: 1, 4: 2}  # p, mom, rms
PACKED_APPLY_ALIASES = {1: 0, 3: 1, 4: 2, 5: 3}  # p, mom, rms, v_diag


def in_place_aliases(aliases: dict[int, int], in_place: bool) -> dict[int, int]:
    """The apply kernels' operand -> output aliases, or none when not `in_place`.

    Aliasing pays only when the caller donates the state (or carries it through a loop):
    XLA then updates it in its buffers. When the state is not donated, XLA must keep the
    operands, so it copies p, mom and rms first: 40 B/param moved on top of the step's
    72. Without aliases the kernels write fresh buffers and nothing is copied, but a
    donated state then costs the same copies at the end. Compiled for an H100
    (`profiling/xla_kernels.py`, 1e7 parameters): 3 copies either way round, 0 when
    aliasing matches donation.
    """
    return aliases if in_place else {}


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
    """Layers after the first, padded to width Hp (zeros are exact through relu)."""

    w_hidden: Any  # [L-1, Hp, Hp] or None when hidden_layers == 1
    b_hidden: Any  # [L-1, Hp] or None
    w_out_t: Any  # [2, Hp]: the output layer, transposed (b_out lives in `consts`)


def _pad_last(x, n):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def _pad_axis(x, axis, n):
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pads)


def mlp_weights(nn, hp: int) -> tuple[MLPWeights, jax.Array]:
    last = sum(1 for k in nn if k.startswith("w")) - 1
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    if last > 1:
        wh = jnp.stack([_pad_axis(_pad_last(f32(nn[f"w{i}"]), hp), 0, hp) for i in range(1, last)])
        bh = jnp.stack([_pad_last(f32(nn[f"b{i}"]), hp) for i in range(1, last)])
    else:
        wh = bh = None
    w_out_t = _pad_last(f32(nn[f"w{last}"]).T, hp)
    return MLPWeights(wh, bh, w_out_t), f32(nn[f"b{last}"])


class Kernels(NamedTuple):
    """The launchers a backend provides (all arrays canonical, see module docstring).

    row_col_sums(g[B,U,V], blocks) -> (sum over V [B,U], sum over U [B,V]) of g^2 + 1e-30
    factored_moments(p, g, mom, rms, fu, fv, consts, blocks) -> partial sums [..., 32]
    factored_apply(p, g, mom, rms, fu, fv, consts, tu, tv, w_ew, mlp, mults, blocks)
        -> (new_p [B,U,V] in p.dtype, new_mom [3,B,U,V], new_rms [1,B,U,V])
    and for the non-factored tensors either the packed buffer's launchers
    packed_moments(p, g, mom, rms, vd, counts, consts, blocks) -> partial sums [nblocks, 32]
        (counts: a static numpy [nblocks, 1], the valid elements of each tile)
    packed_apply(p, g, mom, rms, vd, consts, w_seg, b0, seg_starts, mlp, mults, blocks)
        -> (new_p, new_mom, new_rms, new_vd), all float32, packed
    or member launchers, which read and write the tensors where they are (no packing):
    member_moments(p, g, mom, rms, vd, consts, blocks), each a tuple over the tensors
        (p_i, g_i [n_i], mom_i, vd_i [3, n_i], rms_i [1, n_i]) -> partial sums [nblocks, 32],
        the same rows as packed_moments'
    member_apply(p, g, mom, rms, vd, consts, w_seg, b0, mlp, mults, blocks)
        -> (new_p, new_mom, new_rms, new_vd), each a tuple like its input (p_i in its dtype)
    `mults` is the static (exp_mult, step_mult) pair.

    `row_col_in_dot` picks what `factored_apply` gets for the 12 per-row / per-column
    features: False, their layer-1 products as tables tu [B, U, Hp] (b0 included) and
    tv [B, V, Hp] with w_ew [16, Hp]; True, the features themselves, tu [B, U, 8] and
    tv [B, V, 8], with w_ew [32, Hp] (`_row_col_feature_operands`).
    """

    row_col_sums: Any
    factored_moments: Any
    factored_apply: Any
    packed_moments: Any = None
    packed_apply: Any = None
    member_moments: Any = None
    member_apply: Any = None
    row_col_in_dot: bool = False

    @classmethod
    def of(cls, launchers) -> Kernels:
        """The launchers (and options) of an object that has one attribute per field."""
        return cls(**{name: getattr(launchers, name) for name in cls._fields
                      if hasattr(launchers, name)})


def _ms(x):
    """Mean square over all but the leading (decay) axis."""
    return jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim)))


def _table(f, w):
    """sum_k f[k, ..., None] * w[k]: the [.., H] layer-1 table of 6 per-row / per-column
    features f [6, B, n] with their w0 rows w [6, H]. As multiply-adds, not a dot: XLA
    fuses them with the features' concatenation and the padding into one kernel, where a
    K = 6 dot is a GEMM launch of its own with a fusion on either side."""
    return sum(f[k][..., None] * w[k] for k in range(f.shape[0]))


def _row_col_feature_operands(f_u, f_v, w_ew, w_u, w_v, b0):
    """`factored_apply`'s operands when the kernel runs the row / column features through
    its layer-1 dot (`Kernels.row_col_in_dot`).

    f_u [6, B, U], f_v [6, B, V]: the features on U's and V's side; w_u, w_v their w0 rows.
    Returns tu [B, U, 8] (the 6 features, then 1 so that b0 rides in the dot, then 0),
    tv [B, V, 8] (the 6 features, 0, 0) and w [32, H]: rows 0-15 w_ew, 16-23 the U side
    (w_u, b0, 0), 24-31 the V side (w_v, 0, 0), matching the tables' columns.
    """
    tu = jnp.moveaxis(f_u, 0, -1)
    tu = _pad_last(jnp.concatenate([tu, jnp.ones_like(tu[..., :1])], -1), ROW_COL_TABLE_WIDTH)
    tv = _pad_last(jnp.moveaxis(f_v, 0, -1), ROW_COL_TABLE_WIDTH)
    zero = jnp.zeros_like(b0)[None]
    w = jnp.concatenate([w_ew, w_u, b0[None], zero, w_v, zero, zero])
    return tu, tv, w


def _factored_leaf(kernels, p, g, acc: am.LeafAccumulators, consts, c_fac, nn, iteration, mlp,
                   mults, hp, blocks):
    lay = factored_layout(p.shape)
    shape3 = (lay.B, lay.U, lay.V)
    permuted = tuple(p.shape[q] for q in lay.perm) if lay.perm else p.shape
    p3, g3 = _to_canon(p, lay.perm, 0, shape3), _to_canon(g, lay.perm, 0, shape3)
    mom3 = _to_canon(acc.mom, lay.perm, 1, shape3)
    rms3 = _to_canon(acc.rms, lay.perm, 1, shape3)
    row_dims = (lay.B, lay.row_shape[-1])
    col_dims = (lay.B, lay.col_shape[-1])
    v_row = _to_canon(acc.v_row, lay.row_perm, 1, row_dims)  # [3, B, |d1|]
    v_col = _to_canon(acc.v_col, lay.col_perm, 1, col_dims)  # [3, B, |d0|]
    blk = blocks or block_sizes(lay.U, lay.V, hp)
    reduce_blk = blocks or reduction_block_sizes(lay.U, lay.V)

    with jax.named_scope("adafac_row_col_sums"):
        su, sv = kernels.row_col_sums(g3, reduce_blk)  # [B, U], [B, V]
    if lay.u_is_row:  # v_row reduces over d0 = V; v_col over d1 = U
        mean_d0, mean_d1 = su / lay.V, sv / lay.U
    else:
        mean_d0, mean_d1 = sv / lay.U, su / lay.V
    c = c_fac[:, None, None]
    new_row = c * v_row + (1 - c) * mean_d0[None]
    new_col = c * v_col + (1 - c) * mean_d1[None]
    rf = am.safe_rsqrt(new_row / (jnp.mean(new_row, axis=-1, keepdims=True) + 1e-9))
    cf = am.safe_rsqrt(new_col)
    fu, fv = (rf, cf) if lay.u_is_row else (cf, rf)

    with jax.named_scope("adafac_moments"):
        partial = kernels.factored_moments(p3, g3, mom3, rms3, fu, fv, consts, reduce_blk)
    ew = jnp.sum(partial.reshape(-1, NUM_SUMS), axis=0)[:NUM_EW_FACTORED] / p.size
    row_f = jnp.concatenate([new_row, lax.rsqrt(new_row + 1e-8)])  # [6, B, |d1|]
    col_f = jnp.concatenate([new_col, lax.rsqrt(new_col + 1e-8)])
    moments = jnp.concatenate([ew[:13], _ms(new_row), _ms(new_col), _ms(row_f[3:]),
                               _ms(col_f[3:]), ew[13:16]])
    w0_feat, b0 = am.first_layer(nn, moments, iteration)
    w_ew = w0_feat[np.asarray(am._PER_ELEMENT)]  # [16, H]
    w_row, w_col = w0_feat[np.asarray(am._PER_ROW)], w0_feat[np.asarray(am._PER_COL)]
    (f_u, w_u), (f_v, w_v) = (((row_f, w_row), (col_f, w_col)) if lay.u_is_row
                              else ((col_f, w_col), (row_f, w_row)))
    if kernels.row_col_in_dot:
        tu, tv, w_ew = _row_col_feature_operands(f_u, f_v, w_ew, w_u, w_v, b0)
    else:
        tu = _pad_last(_table(f_u, w_u) + b0, hp)  # [B, U, Hp]
        tv = _pad_last(_table(f_v, w_v), hp)
    w_ew = _pad_last(w_ew, hp)

    with jax.named_scope("adafac_apply"):
        new_p3, new_mom3, new_rms3 = kernels.factored_apply(
            p3, g3, mom3, rms3, fu, fv, consts, tu, tv, w_ew, mlp, mults, blk)
    new_row = _from_canon(new_row, lay.row_perm, 1, lay.row_shape)
    new_col = _from_canon(new_col, lay.col_perm, 1, lay.col_shape)
    return (_from_canon(new_p3, lay.perm, 0, permuted),
            am.LeafAccumulators(_from_canon(new_mom3, lay.perm, 1, permuted),
                                _from_canon(new_rms3, lay.perm, 1, permuted),
                                new_row, new_col, acc.v_diag))


def _segment_sums(partial, nblocks: list[int]):
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
    starts = np.cumsum([0] + nblocks[:-1])
    index = np.full((len(nblocks), longest), n)  # n: the zero row
    for s, (start, count) in enumerate(zip(starts, nblocks, strict=True)):
        index[s, :count] = np.arange(start, start + count)
    padded = jnp.concatenate([partial, jnp.zeros_like(partial[:1])])
    return jnp.sum(padded[index], axis=1)


def _packed_first_layer(partial, nblocks, sizes, nn, iteration, hp):
    """Per-tile feature sums [sum(nblocks), 32] -> each non-factored tensor's normalised
    first-layer weights w_seg [S, 32, Hp] (rows: the 22 features, zeros) and b0 [1, Hp]."""
    sums = _segment_sums(partial, nblocks)
    ew = sums[:, :NUM_EW_PACKED] / jnp.asarray(sizes, jnp.float32)[:, None]  # [S, 22]
    moments = jnp.concatenate([ew[:, :13], ew[:, 16:19], ew[:, 16:19], ew[:, 19:22],
                               ew[:, 19:22], ew[:, 13:16]], axis=1)
    w0_feat, b0 = jax.vmap(lambda m: am.first_layer(nn, m, iteration))(moments)
    w_ew = jnp.concatenate([w0_feat[:, np.asarray(am._PER_ELEMENT)],
                            w0_feat[:, np.asarray(am._PER_ROW)] + w0_feat[:, np.asarray(am._PER_COL)]],
                           axis=1)  # [S, 22, H]
    return _pad_axis(_pad_last(w_ew, hp), 1, NUM_SUMS), _pad_last(b0[:1], hp)


def _packed_leaves(kernels, items, consts, nn, iteration, mlp, mults, hp, blocks):
    """items: [(p, g, acc)] of non-factored tensors -> [(new_p, new_acc)]."""
    blk = blocks or packed_block_sizes(hp)
    tile = blk.rows * blk.cols
    sizes = [max(1, int(np.prod(p.shape))) for p, _, _ in items]
    nblocks = [-(-n // tile) for n in sizes]
    if kernels.member_moments is not None:
        return _member_leaves(kernels, items, sizes, nblocks, consts, nn, iteration, mlp, mults,
                              hp, blk)
    padded = [n * tile for n in nblocks]
    seg_ids = np.repeat(np.arange(len(items)), nblocks)
    seg_starts = tuple(int(s) for s in np.cumsum([0] + nblocks[:-1]))
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
    unflat = lambda x, lead: x.reshape(x.shape[:lead] + (-1,))  # noqa: E731
    new_p, new_mom, new_rms, new_vd = (unflat(new_p, 0), unflat(new_mom, 1), unflat(new_rms, 1),
                                       unflat(new_vd, 1))
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
    flat = lambda x, lead: x.reshape(x.shape[:lead] + (-1,))  # noqa: E731
    p = tuple(flat(p, 0) for p, _, _ in items)
    g = tuple(flat(g, 0) for _, g, _ in items)
    mom, rms, vd = (tuple(flat(getattr(a, k), 1) for _, _, a in items)
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


def fused_update(kernels: Kernels, lopt, theta, state, grad, *, blocks: BlockSizes | None = None,
                 packed_blocks: BlockSizes | None = None):
    """All tensors of `state.params` through `kernels`: the `reference_update` signature.

    Returns (new params tree, `LeafAccumulators` of trees), like
    `lopt_fast.learned.adafac_mlp.reference_update`.
    """
    decays = am.decays_from_theta(theta, lopt.initial_decays)
    nn = theta["nn"]["~"]
    hp = padded_hidden(lopt.hidden_size)
    mlp, b_out = mlp_weights(nn, hp)
    c_fac = jnp.clip(decays.fac, 0.0, 1.0)
    mults = (float(lopt.exp_mult), float(lopt.step_mult))
    consts = jnp.concatenate([decays.mom, jnp.clip(decays.rms, 0.0, 1.0), c_fac, b_out,
                              jnp.zeros((NUM_CONSTS - 9,), jnp.float32)]).astype(jnp.float32)
    treedef = jax.tree.structure(state.params)
    leaves = [jax.tree.leaves(t) for t in (state.params, grad, state.mom, state.rms,
                                           state.v_row, state.v_col, state.v_diag)]
    results: list[Any] = [None] * len(leaves[0])
    packed = []
    for i, (p, g, *acc) in enumerate(zip(*leaves, strict=True)):
        acc = am.LeafAccumulators(*acc)
        if math.prod(p.shape) == 0:
            results[i] = (p, acc)
        elif am.factored_dims(p.shape) is None:
            packed.append(i)
        else:
            with jax.named_scope(f"adafac_fused_leaf_{i}"):
                results[i] = _factored_leaf(kernels, p, g, acc, consts, c_fac, nn, state.iteration,
                                            mlp, mults, hp, blocks)
    if packed:
        items = [(leaves[0][i], leaves[1][i], am.LeafAccumulators(*(lv[i] for lv in leaves[2:])))
                 for i in packed]
        with jax.named_scope("adafac_fused_packed"):
            for i, r in zip(packed, _packed_leaves(kernels, items, consts, nn, state.iteration, mlp,
                                                   mults, hp, packed_blocks), strict=True):
                results[i] = r
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
    new_p = unflat([r[0] for r in results])
    accs = [unflat([r[1][k] for r in results]) for k in range(5)]
    return new_p, am.LeafAccumulators(*accs)
