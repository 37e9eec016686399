"""Fused `AdafacMLPLOpt` step as Triton kernels launched through jax-triton (`triton_call`).

Same math, passes and canonical layouts as `lopt_fast.pallas.adafac_step` (see its
docstring for the formulas and the 72 B / ~3.2 kFLOP per parameter budget), written
against raw pointers: every operand is a contiguous canonical array
(p, g [B, U, V]; mom [3, B, U, V]; rms [1, B, U, V]); offsets are int64.

Launches are multi-tensor (member kernels, `lopt_fast.kernels.members`): each pass is one
launch for up to 32 tensors alike in tile and dtype (`plan.FactoredGroup`; small factored
tensors share a tile, `blocks.group_block_sizes`), its grid tasks x all their tiles,
each program selecting its tensor's pointers and sizes. The per-row / per-column
operands of all factored tensors live in flat sides (fu [3, sum BU], tu [sum BU, TW],
...) at each tensor's offset; the apply pass also writes each tensor's new v_row /
v_col, and the moments pass the sums of squares of the side features (lanes 16-27), so
that the XLA work between passes runs once for all tensors. The non-factored tensors
are tiled where they lie, in tiles of the packed layout's shape, without packing. When
every factored tensor's [U, V] plane fits one tile, a single launch replaces the row /
column sums and the XLA work that turns them into new accumulators and factors
(`_row_col_sides_body`). Compiled for an H100 (`profiling/xla_kernels.py`, XLA
launcher), a 64-task convnet step is 16 kernels, a 1e7-parameter one 17, a 12-block
transformer's (168 tensors) 29 (per-tensor launches with packing: 65, 29 and 327;
optax.adam: 7, 4 and 146).

MLP, layer 1 of factored tensors (`layer1`; the packed tensors' 22 inputs go through a
[tile, 32] x [32, Hp] dot, padded with zero planes):
  * "dot" (the default): the 16 per-element features as a [tile, 16] x [16, Hp] `tl.dot`,
    plus the per-row / per-column tables tu [U, Hp] and tv [V, Hp] (their 12 features'
    layer-1 products, b0 in tu), loaded per tile;
  * "dot_all": the 12 row / column features themselves (and a 1 for b0), from tu [U, 8] /
    tv [V, 8]: 8 floats per column instead of Hp; a second [tile, 16] x [16, Hp] dot, or
    with bf16 / float32 dots 16 more planes of the first, [tile, 32] x [32, Hp]
    (`TritonKernels.row_col_planes`).
The H x H layers always use `tl.dot`. Tensor cores accumulate in float32; the operands
(`mlp_precision`) are TF32 ("tf32", the default), float32 ("ieee"), bf16 ("bf16"), or
TF32 for the raw per-element features and fp16 for the rest ("tf32_fp16": the H x H
and output layers and "dot_all"'s normalised row / column features; fp16 has TF32's
10-bit mantissa at twice its tensor rate; activations saturate at fp16's 65504). Each
dot takes the accumulator before it as its operand without shuffles: fp16's converts
in registers as it stands, TF32's once its columns are in `plan.tf32_operand_order`
(`_in_tf32_order`). The output layer is a dot too (`_output_layer`; FMAs under "ieee"),
and with 16-bit operands each ReLU one PTX instruction per pair (`_half_relu`):
compiled for sm_90 the "dot" apply kernel has 11% fewer instructions under "tf32_fp16"
than TF32's (928 against 1040 per thread) at 150 registers instead of 158.
Compiled for sm_90 (`profiling/triton_resources.py`, H = 32, a 256-element tile at 4
warps, TF32) the apply kernel needs 158 registers with "dot", 160 with "dot_all" (also
39 global-load instructions against 53: session 20's counts); it needed 202 with layer 1
as 16 outer-product FMAs on the vector units, the form before "dot", with which the whole
step was 1.2x / 1.3x slower at 1e7 / 1e8 parameters on an H100 (`benchmarks/tile_sweep.py`,
benchmarks/RESULTS.md; removed in session 27). "dot_all" and bf16 operands are not yet
timed on a GPU. Tolerances against the float32 reference: docs/KERNELS.md (TF32 on
an H100: params up to 3.1e-5 off after 3 steps; bf16 in Triton's interpreter: 1.2e-4).

Apply launch (`persistent`): one program per tile (the default; a tensor's tiles walk
down the rows of a column block, then across them, then over B), or a persistent kernel,
a grid of `PERSISTENT_PROGRAMS_PER_SM` programs per SM that loop over the tiles. Its
loop is software-pipelined (`tl.range(..., num_stages)`): Triton issues the next tiles'
loads as asynchronous copies into shared memory (cp.async, LDGSTS), so they are in flight
while the program computes, without registers to hold them. One program per tile has
its tile's bytes in flight only before it computes: two or three programs per SM keep
far fewer bytes in flight than the memory's bandwidth x latency (docs/KERNEL-SESSIONS.md,
"Session 10"). Not yet timed on a GPU.

Only on NVIDIA GPUs with the `gpu` extra (jax-triton needs a CUDA jaxlib). jax-triton has
no vmap rule of its own; `_over_tasks` gives each launch one: `jax.vmap` over tasks (each
with its own theta) folds the task axis into grid axis 0, and the kernels move every
pointer to their task (one level of vmap).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from lopt_fast.kernels import ffi_call, members, xla_call
from lopt_fast.pallas import blocks, plan
from lopt_fast.pallas.blocks import (
    LAYER1_FORMS,
    MLP_PRECISIONS,
    PERSISTENT_PROGRAMS_PER_SM,
    TRITON_LAUNCHER_ENV_VAR,
    TRITON_LAUNCHERS,
    BlockSizes,
    check_choice,
    member_runs,
    sums_row_chunks,
)

NUM_SUMS = tl.constexpr(plan.NUM_SUMS)
NUM_CONSTS = tl.constexpr(plan.NUM_CONSTS)
FP16_MAX = tl.constexpr(blocks.FP16_MAX)
FP16_RELU_CAST = tl.constexpr(blocks.RELU_CASTS["fp16"])
BF16_RELU_CAST = tl.constexpr(blocks.RELU_CASTS["bf16"])
C_FAC = tl.constexpr(plan.C_FAC)


# ----------------------------------------------------------------------------- kernel bodies
# Kernel parameters follow `jax_triton.triton_call`'s order: the call's arguments as given
# (input arrays, then the Python-int sizes), then one pointer per output, then the
# constexpr metaparameters (passed by name).

@triton.jit
def _add8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7


@triton.jit
def _sq(x, mask):
    return tl.where(mask, x * x, 0.0)


@triton.jit
def _lanes8(vec, L0: tl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7, mask, N: tl.constexpr = 8):
    """vec [32]: lane L0 + k = the sum over the [R, C] tile of x_k^2 (masked), k < N.
    One reduction of 8 operands, not 8 reductions: they share its shared-memory round
    trips and barriers."""
    s = tl.reduce((_sq(x0, mask), _sq(x1, mask), _sq(x2, mask), _sq(x3, mask), _sq(x4, mask),
                   _sq(x5, mask), _sq(x6, mask), _sq(x7, mask)), 1, _add8)
    s = tl.reduce(s, 0, _add8)
    lane = tl.arange(0, NUM_SUMS)
    for k in tl.static_range(N):
        vec = tl.where(lane == L0 + k, s[k], vec)
    return vec


@triton.jit
def _element_lanes(g, p, m0, m1, m2, rms, r, x10, x11, x12, x13, x14, x15, mask):
    """Lanes 0-15: g, p, m, rms, m r, r (r = rsqrt(rms + 1e-6)), the same in factored and
    packed tiles, then the tile's own 6 (factored: g f_k, m_k f_k)."""
    s = _lanes8(tl.zeros((NUM_SUMS,), tl.float32), 0, g, p, m0, m1, m2, rms, m0 * r, m1 * r,
                mask)
    return _lanes8(s, 8, m2 * r, r, x10, x11, x12, x13, x14, x15, mask)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """a @ b (+ acc) on tensor cores for layer 1, float32 accumulation; PREC "bf16" rounds
    both operands to bfloat16, "tf32" / "ieee" is the float32 operands' `input_precision`
    ("tf32_fp16": "tf32", for the raw features; its fp16 is for operands of unit scale,
    `_unit_dot` and `_hidden_dot`)."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PREC == "tf32_fp16":
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _fp16_weights(w):
    """A dot's float32 weights as fp16 operands, clamped to its finite range first."""
    return tl.clamp(w, -FP16_MAX, FP16_MAX).to(tl.float16)


@triton.jit
def _unit_dot(a, b, acc, PREC: tl.constexpr):
    """a @ b (+ acc) for operands of unit scale ("dot_all"'s per-row / per-column features,
    normalised and clamped to fp16's range by `plan`): fp16 ones under "tf32_fp16"; as
    `_dot` otherwise."""
    if PREC == "tf32_fp16":
        return tl.dot(a.to(tl.float16), _fp16_weights(b), acc)
    else:
        return _dot(a, b, acc, PREC)


@triton.jit
def _half_relu(x, PREC: tl.constexpr):
    """max(x, 0) as a 16-bit dot operand: fp16 saturated at its largest finite value
    (`blocks.FP16_MAX`) under "tf32_fp16", bf16 under "bf16"; one PTX instruction per
    pair of elements (`blocks.RELU_CASTS`; the interpreted tests run it in numpy)."""
    if PREC == "tf32_fp16":
        return tl.inline_asm_elementwise(FP16_RELU_CAST, "=r,r,r", [x], dtype=tl.float16,
                                         is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(BF16_RELU_CAST, "=r,r,r", [x], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)


@triton.jit
def _in_tf32_order(h):
    """h [N, HP] with its columns in `plan.tf32_operand_order`: a relabelling of the
    registers that makes the accumulator h the next TF32 dot's operand without shuffles."""
    N: tl.constexpr = h.shape[0]
    HP: tl.constexpr = h.shape[1]
    return tl.reshape(tl.permute(tl.reshape(h, (N, HP // 8, 4, 2)), (0, 1, 3, 2)), (N, HP))


@triton.jit
def _hidden_dot(pre, w, PREC: tl.constexpr):
    """relu(pre) @ w for an H x H layer (and, `_output_layer`, the output layer). Under
    "tf32_fp16" / "bf16" relu(pre) is rounded to fp16 (TF32's 10-bit mantissa at twice its
    tensor rate) / bf16 (`_half_relu`) and w comes in that type (`plan.mlp_weights`,
    fp16's clamped to its range); under "tf32" relu(pre)'s columns go in
    `plan.tf32_operand_order`, the order of w's rows (`plan.mlp_weights`); "ieee"
    as `_dot`."""
    if PREC == "tf32_fp16" or PREC == "bf16":
        return tl.dot(_half_relu(pre, PREC), w)
    elif PREC == "tf32":
        return _dot(_in_tf32_order(tl.maximum(pre, 0.0)), w, None, PREC)
    else:
        return _dot(tl.maximum(pre, 0.0), w, None, PREC)


@triton.jit
def _output_layer(h, wo_ptr, wo_dot, HP: tl.constexpr, PREC: tl.constexpr):
    """(direction, magnitude) of the last pre-activations h [n, HP] (relu'd here). On
    tensor cores (every PREC but "ieee") a `_hidden_dot` with wo_dot (`_dot_weights`: the
    output weights wo [2, HP] repeated to [HP, 16], Triton's narrowest wgmma here), whose
    column 8 j + 2 t + s sits in lane t of a quad: each lane picks its rows' outputs from
    its own columns (selects against -0.0, x + -0.0 = x, no instruction once compiled),
    so they come back [n, 4], a column per lane, all equal (`_mlp_rest` takes their max
    once the step is computed) rather than summed across the quad (compiled for sm_90,
    1x256, "dot", TF32: the dot 48 instructions per thread fewer than multiply-adds, the
    per-lane pick 48 more); "ieee" [n] from float32 multiply-adds with wo's rows (its
    dot would be 8 times as many)."""
    if PREC != "ieee":
        out = _hidden_dot(h, wo_dot, PREC)
        x = tl.reshape(out, (out.shape[0], 2, 4, 2))  # [n, j, t, s]
        j = tl.arange(0, 2)[None, :, None, None]
        x = tl.sum(tl.where(j == 0, x, -0.0), axis=1)
        s = tl.arange(0, 2)[None, None, :]
        return (tl.sum(tl.where(s == 0, x, -0.0), axis=2),
                tl.sum(tl.where(s == 1, x, -0.0), axis=2))
    else:
        k = tl.arange(0, HP)
        h = tl.maximum(h, 0.0)
        return (tl.sum(h * tl.load(wo_ptr + k)[None, :], axis=1),
                tl.sum(h * tl.load(wo_ptr + HP + k)[None, :], axis=1))


@triton.jit
def _dot_weights(wh_ptr, wo_ptr, HP: tl.constexpr, NHID: tl.constexpr, PREC: tl.constexpr):
    """The weights of the dots after layer 1, for `_mlp_rest`: the first H x H layer's
    [HP, HP] (zeros if there is none) and the output layer's as its dot takes them, wo
    [2, HP] repeated to [HP, 16] (w_dir, w_mag alternating; zeros under "ieee", whose
    output layer is FMAs). The apply kernels read them before their
    math: Triton stages a dot's weights in shared memory right after their load, so read
    where used each costs a memory round trip after the dot before (compiled for sm_90,
    1x256, "dot", TF32, the apply kernel waits on 5 round trips in sequence; 6 with the
    output layer's read where used)."""
    k = tl.arange(0, HP)
    col = tl.arange(0, 16)
    if PREC != "ieee":
        wo_dot = tl.load(wo_ptr + (col[None, :] % 2) * HP + k[:, None])
    else:
        wo_dot = tl.zeros((HP, 16), tl.float32)
    if NHID > 0:
        return tl.load(wh_ptr + k[:, None] * HP + k[None, :]), wo_dot
    else:
        return tl.zeros((HP, HP), tl.float32), wo_dot


@triton.jit
def _mlp_rest(pre, wh0, wo_dot, c_ptr, wh_ptr, bh_ptr, wo_ptr, R: tl.constexpr,
              C: tl.constexpr, HP: tl.constexpr, NHID: tl.constexpr, EXP_MULT: tl.constexpr,
              STEP_MULT: tl.constexpr, PREC: tl.constexpr):
    """pre: the layer-1 pre-activations [R C, HP] -> the step [R, C]; wh0, wo_dot:
    `_dot_weights`."""
    h = pre
    k = tl.arange(0, HP)
    for layer in tl.static_range(NHID):
        if layer == 0:
            w = wh0
        else:
            w = tl.load(wh_ptr + layer * HP * HP + k[:, None] * HP + k[None, :])
        h = _hidden_dot(h, w, PREC) + tl.load(bh_ptr + layer * HP + k)[None, :]
    d, mag = _output_layer(h, wo_ptr, wo_dot, HP, PREC)
    d += tl.load(c_ptr + 7)
    # exp((mag + b_mag) EXP_MULT) as 2^(mag s + b_mag s), s = EXP_MULT log2 e: one FFMA
    # and an ex2 per value where tl.exp's were an add and two multiplies and an ex2
    # (compiled for sm_90, 1x256, "dot", TF32: 1080 -> 1040 instructions per thread)
    scale: tl.constexpr = EXP_MULT * 1.4426950408889634
    step = d * tl.exp2(mag * scale + tl.load(c_ptr + 8) * scale) * STEP_MULT
    if PREC != "ieee":  # a column per lane of the quad, all equal (`_output_layer`)
        step = tl.max(step, axis=1)
    return tl.reshape(step, (R, C))


@triton.jit
def _task_mlp(t, wh_ptr, bh_ptr, wo_ptr, HP: tl.constexpr, NHID: tl.constexpr):
    """The MLP weight pointers moved to task t ([tasks, NHID, HP, HP], [tasks, NHID, HP],
    [tasks, 2, HP])."""
    return wh_ptr + t * NHID * HP * HP, bh_ptr + t * NHID * HP, wo_ptr + t * 2 * HP


@triton.jit
def _member_tile(t, B, U, V, R: tl.constexpr, C: tl.constexpr):
    """Tile t of a [B, U, V] tensor in R x C tiles: tiles walk down the rows of a column
    block, then across the column blocks, then over B."""
    nu = tl.cdiv(U, R)
    nv = tl.cdiv(V, C)
    b = t // (nu * nv)
    u = (t % nu) * R + tl.arange(0, R)
    v = ((t // nu) % nv) * C + tl.arange(0, C)
    mask = (u[:, None] < U) & (v[None, :] < V)
    return b, u, v, mask, b * U * V + u[:, None] * V + v[None, :]


@triton.jit
def _first_blocks(t, U, V, R: tl.constexpr, C: tl.constexpr):
    """Whether tile t (`_member_tile`'s order) is in the first column block (its rows'
    first tile) and in the first row block (its columns' first tile)."""
    nu = tl.cdiv(U, R)
    return (t // nu) % tl.cdiv(V, C) == 0, t % nu == 0


@triton.jit
def _row_col_sums_body(task, t, B, U, VQ, OU, OV, g_ptr, su_ptr, sv_ptr, TU: tl.constexpr,
                       TV: tl.constexpr, NV: tl.constexpr, NU: tl.constexpr, R: tl.constexpr,
                       C: tl.constexpr, RL: tl.constexpr, VA: tl.constexpr):
    """Sums of G = g^2 + 1e-30 over a program's RL x R rows and C columns of a [B, U, V]
    tensor, R rows at a time: per row (this column block's share, row iv of su [tasks, NV,
    TU]) and per column (these rows' share, row iu of sv [tasks, NU, TV]), at the tensor's
    offsets OU + b U / OV + b V; summed over the rows of su and sv they are whole. The
    programs of the first column (row) block also zero the rows of su (sv) past the
    tensor's own blocks. RL > 1 makes sv RL times smaller."""
    V = VQ * VA
    nu = tl.cdiv(U, R * RL)
    nv = tl.cdiv(V, C)
    b = t // (nu * nv)
    iu = t % nu
    iv = (t // nu) % nv
    v = iv * C + tl.arange(0, C)
    g_ptr = g_ptr + task * B * U * V + b * U * V
    su_ptr = su_ptr + task * NV * TU + OU + b * U
    sv_ptr = sv_ptr + task * NU * TV + OV + b * V
    col = tl.zeros((C,), tl.float32)
    for k in tl.range(RL):
        u = (iu * RL + k) * R + tl.arange(0, R)
        mask = (u[:, None] < U) & (v[None, :] < V)
        g = tl.load(g_ptr + u[:, None] * V + v[None, :], mask=mask, other=0.0).to(tl.float32)
        sq = tl.where(mask, g * g + 1e-30, 0.0)
        tl.store(su_ptr + iv * TU + u, tl.sum(sq, axis=1), mask=u < U)
        for part in tl.range(nv, NV):  # rows no column block of this tensor writes
            tl.store(su_ptr + part * TU + u, tl.zeros((R,), tl.float32), mask=(u < U) & (iv == 0))
        col += tl.sum(sq, axis=0)
    tl.store(sv_ptr + iu * TV + v, col, mask=v < V)
    for part in tl.range(nu, NU):
        tl.store(sv_ptr + part * TV + v, tl.zeros((C,), tl.float32), mask=(v < V) & (iu == 0))


@triton.jit
def _side(v_ptr, x, L, c, mean_g, normalise, out_ptr, f_ptr, O):
    """Plane k of one line's new accumulators v = c v_old + (1 - c) mean_g (positions x < L
    of v_ptr) and their factors rsqrt(v / mean(v)) (`normalise`, the row side) or rsqrt(v),
    each floored at 1e-9 (`adafac_math.safe_rsqrt`), to out / f (a flat side's plane) at O."""
    m = x < L
    new = c * tl.load(v_ptr + x, mask=m, other=0.0) + (1 - c) * mean_g
    mean = tl.sum(tl.where(m, new, 0.0), axis=0) / L
    f = tl.where(normalise, tl.rsqrt(tl.maximum(new / (mean + 1e-9), 1e-9)),
                 tl.rsqrt(tl.maximum(new, 1e-9)))
    tl.store(out_ptr + O + x, new, mask=m)
    tl.store(f_ptr + O + x, f, mask=m)


@triton.jit
def _row_col_sides_body(task, t, B, U, V, OU, OV, ROWU, c_ptr, g_ptr, vu_ptr, vv_ptr, nu_ptr,
                        nv_ptr, fu_ptr, fv_ptr, TU: tl.constexpr, TV: tl.constexpr,
                        R: tl.constexpr, C: tl.constexpr):
    """Plane t (of B) of a [B, U, V] factored tensor in one R x C tile, so that its row and
    column sums of G = g^2 + 1e-30 are whole: the new Adafactor accumulators of its rows
    (U side: c v_u + (1 - c) sum_v G / V, from the state's plane vu [tasks, 3, B U]) and
    columns, and their factors, written to the group's flat sides nu, fu [tasks, 3, TU] /
    nv, fv [tasks, 3, TV] at OU + t U / OV + t V. ROWU: U is the row side (normalised by
    its line's mean). What `row_col_sums` and XLA's kernels between the passes compute,
    for tensors whose planes fit a tile."""
    u = tl.arange(0, R)
    v = tl.arange(0, C)
    mask = (u[:, None] < U) & (v[None, :] < V)
    g = tl.load(g_ptr + task * B * U * V + t * U * V + u[:, None] * V + v[None, :], mask=mask,
                other=0.0).to(tl.float32)
    sq = tl.where(mask, g * g + 1e-30, 0.0)
    mean_u = tl.sum(sq, axis=1) / V  # per row: the mean over V
    mean_v = tl.sum(sq, axis=0) / U
    c_ptr = c_ptr + task * NUM_CONSTS
    vu_ptr = vu_ptr + task * 3 * B * U + t * U
    vv_ptr = vv_ptr + task * 3 * B * V + t * V
    for k in tl.static_range(3):
        c = tl.load(c_ptr + C_FAC + k)
        _side(vu_ptr + k * B * U, u, U, c, mean_u, ROWU == 1, nu_ptr + (task * 3 + k) * TU,
              fu_ptr + (task * 3 + k) * TU, OU + t * U)
        _side(vv_ptr + k * B * V, v, V, c, mean_v, ROWU == 0, nv_ptr + (task * 3 + k) * TV,
              fv_ptr + (task * 3 + k) * TV, OV + t * V)


@triton.jit
def _planes(c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, n, off, mask):
    """The tile's g, p and new accumulators m (3 planes of n elements) and rms, in float32."""
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32)
    b0, b1, b2 = tl.load(c_ptr + 0), tl.load(c_ptr + 1), tl.load(c_ptr + 2)
    m0 = b0 * tl.load(mom_ptr + off, mask=mask, other=0.0) + (1 - b0) * g
    m1 = b1 * tl.load(mom_ptr + n + off, mask=mask, other=0.0) + (1 - b1) * g
    m2 = b2 * tl.load(mom_ptr + 2 * n + off, mask=mask, other=0.0) + (1 - b2) * g
    cr = tl.load(c_ptr + 3)
    rms = cr * tl.load(rms_ptr + off, mask=mask, other=0.0) + (1 - cr) * g * g
    return g, p, m0, m1, m2, rms


@triton.jit
def _store_accumulators(mo_ptr, ro_ptr, n, off, mask, m0, m1, m2, rms):
    """The tile's new momenta (3 planes of n elements) and rms, stored before the MLP
    rather than held in registers through it."""
    tl.store(mo_ptr + off, m0, mask=mask)
    tl.store(mo_ptr + n + off, m1, mask=mask)
    tl.store(mo_ptr + 2 * n + off, m2, mask=mask)
    tl.store(ro_ptr + off, rms, mask=mask)


@triton.jit
def _store_updated(p_ptr, po_ptr, off, mask, step):
    """Store the new p, p - step, with the tile of p read again for it: Triton then
    computes it in the loads' layout and moves only the step there, instead of moving p
    into the step's layout right after its first load and the result back (the Pallas
    kernels' `_updated` says more). evict_first keeps the two reads apart (CSE merges
    equal ones). Triton's promotion of p - step (float32 step) is `adafac_math.step_dtype`:
    float32, or float64 for float64 params."""
    p = tl.load(p_ptr + off, mask=mask, other=0.0, eviction_policy="evict_first")
    tl.store(po_ptr + off, (p - step).to(po_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _factors(fu_ptr, fv_ptr, TU, TV, U, V, u, v, k: tl.constexpr):
    """Adafactor factor k of the tile: fu [3, TU] (this row's) x fv [3, TV]."""
    fu = tl.load(fu_ptr + k * TU + u, mask=u < U, other=0.0)
    fv = tl.load(fv_ptr + k * TV + v, mask=v < V, other=0.0)
    return fu[:, None] * fv[None, :]


@triton.jit
def _factored_tile(task, t, B, U, V, OU, OV, c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, fu_ptr,
                   fv_ptr, TU: tl.constexpr, TV: tl.constexpr, R: tl.constexpr,
                   C: tl.constexpr):
    """Tile t of task `task` of a [B, U, V] factored tensor (p, g [tasks, B, U, V], mom
    [tasks, 3, B, U, V], ...) whose per-row / per-column factors start at OU / OV of the
    group's flat sides fu [tasks, 3, TU], fv [tasks, 3, TV]: where it is, its task's consts
    pointer, the new accumulators, r = rsqrt(rms + 1e-6) and the three Adafactor factors."""
    b, u, v, mask, off = _member_tile(t, B, U, V, R, C)
    n = B * U * V
    c_ptr = c_ptr + task * NUM_CONSTS
    p_ptr, g_ptr, rms_ptr, mom_ptr = (p_ptr + task * n, g_ptr + task * n, rms_ptr + task * n,
                                      mom_ptr + task * 3 * n)
    g, p, m0, m1, m2, rms = _planes(c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, n, off, mask)
    r = tl.rsqrt(rms + 1e-6)
    fu_ptr = fu_ptr + task * 3 * TU + OU + b * U
    fv_ptr = fv_ptr + task * 3 * TV + OV + b * V
    f0 = _factors(fu_ptr, fv_ptr, TU, TV, U, V, u, v, 0)
    f1 = _factors(fu_ptr, fv_ptr, TU, TV, U, V, u, v, 1)
    f2 = _factors(fu_ptr, fv_ptr, TU, TV, U, V, u, v, 2)
    return b, u, v, mask, off, n, c_ptr, g, p, m0, m1, m2, rms, r, f0, f1, f2


@triton.jit
def _side_lanes(vec, L0: tl.constexpr, src_ptr, T, x, L):
    """vec [32]: lanes L0 + k and L0 + 3 + k (k < 3) = the sums of n^2 and rsqrt(n + 1e-8)^2
    over positions x < L of plane k of a line n of the flat side src [3, T]."""
    m = (x < L)[None, :]  # the line as a [1, L] tile
    n0 = tl.load(src_ptr + x[None, :], mask=m, other=1.0)
    n1 = tl.load(src_ptr + T + x[None, :], mask=m, other=1.0)
    n2 = tl.load(src_ptr + 2 * T + x[None, :], mask=m, other=1.0)
    return _lanes8(vec, L0, n0, n1, n2, tl.rsqrt(n0 + 1e-8), tl.rsqrt(n1 + 1e-8),
                   tl.rsqrt(n2 + 1e-8), n0, n0, m, 6)  # 6 lanes: the last 2 operands fill


@triton.jit
def _factored_moments_body(task, t, B, U, VQ, OU, OV, c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr,
                           fu_ptr, fv_ptr, su_ptr, sv_ptr, s_ptr, TU: tl.constexpr,
                           TV: tl.constexpr, R: tl.constexpr, C: tl.constexpr, VA: tl.constexpr):
    """Per-tile sums of the 16 squared per-element features (lanes 0-15); s: [tasks x
    tiles, 32]. The tiles of the first column block add the sums of squares of their rows'
    side features (lanes 16-21, `_side_lanes`) from the new accumulators of the U side su
    [tasks, 3, TU], those of the first row block their columns' (lanes 22-27) from sv."""
    V = VQ * VA
    b, u, v, mask, off, n, c_ptr, g, p, m0, m1, m2, rms, r, f0, f1, f2 = _factored_tile(
        task, t, B, U, V, OU, OV, c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, fu_ptr, fv_ptr, TU, TV,
        R, C)
    s = _element_lanes(g, p, m0, m1, m2, rms, r, g * f0, g * f1, g * f2, m0 * f0, m1 * f1,
                       m2 * f2, mask)
    # Branches, not masks: the other tiles (most of them) skip the 12 block-wide sums.
    first_col_block, first_row_block = _first_blocks(t, U, V, R, C)
    if first_col_block:
        s = _side_lanes(s, 16, su_ptr + task * 3 * TU + OU + b * U, TU, u, U)
    if first_row_block:
        s = _side_lanes(s, 22, sv_ptr + task * 3 * TV + OV + b * V, TV, v, V)
    tl.store(s_ptr + tl.program_id(0).to(tl.int64) * NUM_SUMS + tl.arange(0, NUM_SUMS), s)


@triton.jit
def _features16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                N: tl.constexpr):
    """[N, 16] from 16 feature planes [R, C] (N = R C) by nested `tl.join`s: column k
    holds plane `_bitrev4(k)` (each join adds a minor axis of 2)."""
    a0 = tl.join(tl.join(tl.reshape(x0, (N,)), tl.reshape(x1, (N,))),
                 tl.join(tl.reshape(x2, (N,)), tl.reshape(x3, (N,))))
    a1 = tl.join(tl.join(tl.reshape(x4, (N,)), tl.reshape(x5, (N,))),
                 tl.join(tl.reshape(x6, (N,)), tl.reshape(x7, (N,))))
    a2 = tl.join(tl.join(tl.reshape(x8, (N,)), tl.reshape(x9, (N,))),
                 tl.join(tl.reshape(x10, (N,)), tl.reshape(x11, (N,))))
    a3 = tl.join(tl.join(tl.reshape(x12, (N,)), tl.reshape(x13, (N,))),
                 tl.join(tl.reshape(x14, (N,)), tl.reshape(x15, (N,))))
    return tl.reshape(tl.join(tl.join(a0, a1), tl.join(a2, a3)), (N, 16))


@triton.jit
def _bitrev4(k):
    return ((k & 1) << 3) | ((k & 2) << 1) | ((k & 4) >> 1) | ((k & 8) >> 3)


@triton.jit
def _uv_row(k):
    """w's row for column k of `_row_col_features16`: U side rows 16-23, V side 24-31."""
    return 16 + (k & 1) * 8 + (k >> 1)


@triton.jit
def _row_col_features16(fu, fv, R: tl.constexpr, C: tl.constexpr):
    """[R C, 16] from the per-row fu [R, 8] and per-column fv [C, 8] features:
    column 2i holds fu[:, i], column 2i + 1 holds fv[:, i]."""
    xu = tl.reshape(tl.broadcast_to(fu[:, None, :], (R, C, 8)), (R * C, 8))
    xv = tl.reshape(tl.broadcast_to(fv[None, :, :], (R, C, 8)), (R * C, 8))
    return tl.reshape(tl.join(xu, xv), (R * C, 16))


# `_row_col_planes` loads the tables' planes before their padding
assert (plan.ROW_COL_U_PLANES, plan.ROW_COL_V_PLANES) == (7, 6)


@triton.jit
def _row_col_planes(tu_ptr, tv_ptr, TU: tl.constexpr, TV: tl.constexpr, u, v, U, V,
                    R: tl.constexpr, C: tl.constexpr):
    """[R C, 16]: the per-row / per-column features as planes, column k the plane
    `_bitrev4(k)` of fu_0, fv_0, fu_1, fv_1, ... (fu_i [R] the tile's rows' feature i, fv_i
    [C] its columns'), read from plane-major tables tu [8, TU], tv [8, TV] as the factors
    are (a plane's entries contiguous), the planes `plan` pads with zeros not at all."""
    mu, mv = u < U, v < V
    fu0 = tl.broadcast_to(tl.load(tu_ptr + u, mask=mu, other=0.0)[:, None], (R, C))
    fu1 = tl.broadcast_to(tl.load(tu_ptr + TU + u, mask=mu, other=0.0)[:, None], (R, C))
    fu2 = tl.broadcast_to(tl.load(tu_ptr + 2 * TU + u, mask=mu, other=0.0)[:, None], (R, C))
    fu3 = tl.broadcast_to(tl.load(tu_ptr + 3 * TU + u, mask=mu, other=0.0)[:, None], (R, C))
    fu4 = tl.broadcast_to(tl.load(tu_ptr + 4 * TU + u, mask=mu, other=0.0)[:, None], (R, C))
    fu5 = tl.broadcast_to(tl.load(tu_ptr + 5 * TU + u, mask=mu, other=0.0)[:, None], (R, C))
    fu6 = tl.broadcast_to(tl.load(tu_ptr + 6 * TU + u, mask=mu, other=0.0)[:, None], (R, C))
    fv0 = tl.broadcast_to(tl.load(tv_ptr + v, mask=mv, other=0.0)[None, :], (R, C))
    fv1 = tl.broadcast_to(tl.load(tv_ptr + TV + v, mask=mv, other=0.0)[None, :], (R, C))
    fv2 = tl.broadcast_to(tl.load(tv_ptr + 2 * TV + v, mask=mv, other=0.0)[None, :], (R, C))
    fv3 = tl.broadcast_to(tl.load(tv_ptr + 3 * TV + v, mask=mv, other=0.0)[None, :], (R, C))
    fv4 = tl.broadcast_to(tl.load(tv_ptr + 4 * TV + v, mask=mv, other=0.0)[None, :], (R, C))
    fv5 = tl.broadcast_to(tl.load(tv_ptr + 5 * TV + v, mask=mv, other=0.0)[None, :], (R, C))
    zero = tl.zeros((R, C), tl.float32)
    return _features16(fu0, fv0, fu1, fv1, fu2, fv2, fu3, fv3, fu4, fv4, fu5, fv5, fu6, zero,
                       zero, zero, R * C)


@triton.jit
def _copy_side(src_ptr, dst_ptr, T, O, B, L, b, x, write):
    """Planes k < 3 of positions x (of length L) of the b-th of B lines of a tensor's side,
    from the group's flat side src [3, T] (the tensor's at offset O) to dst [3, B L]."""
    m = (x < L) & write
    for k in tl.static_range(3):
        tl.store(dst_ptr + k * B * L + b * L + x, tl.load(src_ptr + k * T + O + b * L + x, mask=m),
                 mask=m)


@triton.jit
def _factored_apply_body(task, t, B, U, VQ, OU, OV, SEG, c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr,
                         fu_ptr, fv_ptr, tu_ptr, tv_ptr, w_ptr, wh_ptr, bh_ptr, wo_ptr, su_ptr,
                         sv_ptr, po_ptr, mo_ptr, ro_ptr, nu_ptr, nv_ptr, TU: tl.constexpr,
                         TV: tl.constexpr, SEGS: tl.constexpr,
                         R: tl.constexpr, C: tl.constexpr, HP: tl.constexpr,
                         NHID: tl.constexpr, EXP_MULT: tl.constexpr, STEP_MULT: tl.constexpr,
                         PREC: tl.constexpr, L1: tl.constexpr, PLANES: tl.constexpr,
                         TW: tl.constexpr, WR: tl.constexpr, VA: tl.constexpr):
    """Pass 3 on tile t of a factored tensor, the group's SEG-th (w [tasks, SEGS, WR, HP]).
    The tiles of the first column block also copy their rows' new accumulators from the
    group's flat U side su [tasks, 3, TU] to the tensor's nu [tasks, 3, B U], those of
    the first row block their columns' from sv to nv: the state's v_row and v_col,
    written here rather than by a kernel per tensor and side after the step.
    L1: layer 1 as "dot" (adding the tables tu [tasks, TU, HP], tv [tasks, TV, HP]) or
    "dot_all" (tu [tasks, TU, 8], tv [tasks, TV, 8] hold the row / column
    features; with PLANES [tasks, 8, TU | TV], `row_col_as_planes`). TW: the tables'
    width, WR: w's rows (16, or 32 for "dot_all"; see `plan.Kernels`)."""
    V = VQ * VA
    b, u, v, mask, off, n, c_ptr, g, p, m0, m1, m2, rms, r, f0, f1, f2 = _factored_tile(
        task, t, B, U, V, OU, OV, c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, fu_ptr, fv_ptr, TU, TV,
        R, C)
    w_ptr = w_ptr + (task * SEGS + SEG) * WR * HP
    wh_ptr, bh_ptr, wo_ptr = _task_mlp(task, wh_ptr, bh_ptr, wo_ptr, HP, NHID)
    h = tl.arange(0, HP)
    if PLANES:  # the row / column features as 16 more planes of one [R C, 32] x [32, HP]
        # dot, from plane-major tables [tasks, TW, TU | TV] (`row_col_as_planes`)
        tu_ptr = tu_ptr + task * TW * TU + OU + b * U
        tv_ptr = tv_ptr + task * TW * TV + OV + b * V
    else:
        tu_ptr = tu_ptr + (task * TU + OU + b * U) * TW
        tv_ptr = tv_ptr + (task * TV + OV + b * V) * TW
        k = tl.arange(0, TW)
        tu = tl.load(tu_ptr + u[:, None] * TW + k[None, :], mask=(u < U)[:, None], other=0.0)
        tv = tl.load(tv_ptr + v[:, None] * TW + k[None, :], mask=(v < V)[:, None], other=0.0)
    # the dots' weights before the math (`_dot_weights`)
    wh0, wo_dot = _dot_weights(wh_ptr, wo_ptr, HP, NHID, PREC)
    if PLANES:  # column 2 k + j: the features' column k (j = 0) or the planes' (j = 1)
        col = tl.arange(0, 32)
        q = _bitrev4(col >> 1)
        w1 = tl.load(w_ptr + tl.where((col & 1) == 0, q, _uv_row(q))[:, None] * HP
                     + h[None, :])
    else:
        w1 = tl.load(w_ptr + _bitrev4(tl.arange(0, 16))[:, None] * HP + h[None, :])
    if L1 == "dot_all" and not PLANES:
        w_uv = tl.load(w_ptr + _uv_row(tl.arange(0, 16))[:, None] * HP + h[None, :])
    if L1 != "dot_all":
        pre = tu[:, None, :] + tv[None, :, :]
    # [R C, 16] x [16, HP] on tensor cores; w's rows in the features' order
    x = _features16(g, p, m0, m1, m2, rms, m0 * r, m1 * r, m2 * r, r, g * f0, g * f1,
                    g * f2, m0 * f0, m1 * f1, m2 * f2, R * C)
    if PLANES:
        x = tl.reshape(tl.join(x, _row_col_planes(tu_ptr, tv_ptr, TU, TV, u, v, U, V, R, C)),
                       (R * C, 32))
    acc = _dot(x, w1, None, PREC)
    if PLANES:
        pre = acc
    elif L1 == "dot_all":  # and [R C, 16] x [16, HP] for the row / column features and b0
        pre = _unit_dot(_row_col_features16(tu, tv, R, C), w_uv, acc, PREC)
    else:  # the tables' sum reshaped, not the dot's result (sm_90, 1x256: 188 registers, not 228)
        pre = tl.reshape(pre, (R * C, HP)) + acc
    _store_accumulators(mo_ptr + task * 3 * n, ro_ptr + task * n, n, off, mask, m0, m1, m2, rms)
    step = _mlp_rest(pre, wh0, wo_dot, c_ptr, wh_ptr, bh_ptr, wo_ptr, R, C, HP, NHID, EXP_MULT,
                     STEP_MULT, PREC)
    _store_updated(p_ptr + task * n, po_ptr + task * n, off, mask, step)
    first_col_block, first_row_block = _first_blocks(t, U, V, R, C)
    _copy_side(su_ptr + task * 3 * TU, nu_ptr + task * 3 * B * U, TU, OU, B, U, b, u,
               first_col_block)
    _copy_side(sv_ptr + task * 3 * TV, nv_ptr + task * 3 * B * V, TV, OV, B, V, b, v,
               first_row_block)


@triton.jit
def _packed_planes(c_ptr, vd_ptr, g, n, off, mask):
    """The new Adafactor accumulators of a non-factored tile: 3 planes of n elements."""
    g2 = g * g + 1e-30
    c0, c1, c2 = tl.load(c_ptr + 4), tl.load(c_ptr + 5), tl.load(c_ptr + 6)
    v0 = c0 * tl.load(vd_ptr + off, mask=mask, other=0.0) + (1 - c0) * g2
    v1 = c1 * tl.load(vd_ptr + n + off, mask=mask, other=0.0) + (1 - c1) * g2
    v2 = c2 * tl.load(vd_ptr + 2 * n + off, mask=mask, other=0.0) + (1 - c2) * g2
    return v0, v1, v2


@triton.jit
def _packed_factor_planes(g, m0, m1, m2, v0, v1, v2):
    """The 9 features of a non-factored tile from its v accumulators (features 10-15 and
    19-21): g rsqrt(max(v + 1e-9, 1e-9)), m rsqrt(v + 1e-6), rsqrt(v + 1e-8)."""
    fg0 = g * tl.rsqrt(tl.maximum(v0 + 1e-9, 1e-9))
    fg1 = g * tl.rsqrt(tl.maximum(v1 + 1e-9, 1e-9))
    fg2 = g * tl.rsqrt(tl.maximum(v2 + 1e-9, 1e-9))
    fm0, fm1, fm2 = m0 * tl.rsqrt(v0 + 1e-6), m1 * tl.rsqrt(v1 + 1e-6), m2 * tl.rsqrt(v2 + 1e-6)
    s0, s1, s2 = tl.rsqrt(v0 + 1e-8), tl.rsqrt(v1 + 1e-8), tl.rsqrt(v2 + 1e-8)
    return fg0, fg1, fg2, fm0, fm1, fm2, s0, s1, s2


@triton.jit
def _packed_common(task, t, n, c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, vd_ptr, R: tl.constexpr,
                   C: tl.constexpr):
    """Tile t (R x C consecutive elements) of a member of n elements, of task `task`
    (operands [tasks, n], [tasks, 3, n]...): where it is, its task's consts, the tile's
    g, p and new accumulators."""
    c_ptr = c_ptr + task * NUM_CONSTS
    p_ptr, g_ptr, rms_ptr = p_ptr + task * n, g_ptr + task * n, rms_ptr + task * n
    mom_ptr, vd_ptr = mom_ptr + task * 3 * n, vd_ptr + task * 3 * n
    off = t * (R * C) + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    mask = off < n
    g, p, m0, m1, m2, rms = _planes(c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, n, off, mask)
    v0, v1, v2 = _packed_planes(c_ptr, vd_ptr, g, n, off, mask)
    return off, mask, c_ptr, g, p, m0, m1, m2, rms, v0, v1, v2


@triton.jit
def _packed_moments_body(task, t, n, seg, c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, vd_ptr, s_ptr,
                         R: tl.constexpr, C: tl.constexpr):
    """Per-tile sums of the 22 squared features of a non-factored tensor's tile (a member
    kernel's body, `members.member_kernel`); s: [tasks x tiles, 32]."""
    off, mask, c_ptr, g, p, m0, m1, m2, rms, v0, v1, v2 = _packed_common(
        task, t, n, c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, vd_ptr, R, C)
    r = tl.rsqrt(rms + 1e-6)
    fg0, fg1, fg2, fm0, fm1, fm2, s0, s1, s2 = _packed_factor_planes(g, m0, m1, m2, v0, v1, v2)
    s = _element_lanes(g, p, m0, m1, m2, rms, r, fg0, fg1, fg2, fm0, fm1, fm2, mask)
    s = _lanes8(s, 16, v0, v1, v2, s0, s1, s2, v0, v0, mask, 6)  # the last 2 operands fill
    tl.store(s_ptr + tl.program_id(0).to(tl.int64) * NUM_SUMS + tl.arange(0, NUM_SUMS), s)


@triton.jit
def _packed_apply_body(task, t, n, seg, c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, vd_ptr, w_ptr,
                       b0_ptr, wh_ptr, bh_ptr, wo_ptr, po_ptr, mo_ptr, ro_ptr, vo_ptr,
                       R: tl.constexpr, C: tl.constexpr, HP: tl.constexpr, NHID: tl.constexpr,
                       EXP_MULT: tl.constexpr, STEP_MULT: tl.constexpr, PREC: tl.constexpr,
                       SEGS: tl.constexpr):
    """Pass 3 on a non-factored tensor's tile (a member kernel's body); w: [tasks, SEGS,
    32, HP], segment `seg`'s rows. Layer 1 is one [tile, 32] x [32, HP] dot of the 22
    features and 10 zero planes (w's rows 22-31 are zero)."""
    off, mask, c_ptr, g, p, m0, m1, m2, rms, v0, v1, v2 = _packed_common(
        task, t, n, c_ptr, p_ptr, g_ptr, mom_ptr, rms_ptr, vd_ptr, R, C)
    w_ptr = w_ptr + (task * SEGS + seg) * NUM_SUMS * HP
    b0_ptr = b0_ptr + task * HP
    wh_ptr, bh_ptr, wo_ptr = _task_mlp(task, wh_ptr, bh_ptr, wo_ptr, HP, NHID)
    b0 = tl.load(b0_ptr + tl.arange(0, HP))
    # the dots' weights before the math (`_dot_weights`)
    wh0, wo_dot = _dot_weights(wh_ptr, wo_ptr, HP, NHID, PREC)
    col = tl.arange(0, 32)
    w1 = tl.load(w_ptr + ((col & 1) * 16 + _bitrev4(col >> 1))[:, None] * HP
                 + tl.arange(0, HP)[None, :])
    r = tl.rsqrt(rms + 1e-6)
    fg0, fg1, fg2, fm0, fm1, fm2, s0, s1, s2 = _packed_factor_planes(g, m0, m1, m2, v0, v1, v2)
    # [R C, 32] x [32, HP]: column 2 j + i holds feature 16 i + _bitrev4(j)
    z = tl.zeros((R, C), tl.float32)
    x = tl.reshape(tl.join(
        _features16(g, p, m0, m1, m2, rms, m0 * r, m1 * r, m2 * r, r, fg0, fg1, fg2, fm0,
                    fm1, fm2, R * C),
        _features16(v0, v1, v2, s0, s1, s2, z, z, z, z, z, z, z, z, z, z, R * C)),
        (R * C, 32))
    pre = _dot(x, w1, tl.zeros((R * C, HP), tl.float32) + b0[None, :], PREC)
    _store_accumulators(mo_ptr + task * 3 * n, ro_ptr + task * n, n, off, mask, m0, m1, m2, rms)
    vo_ptr = vo_ptr + task * 3 * n
    tl.store(vo_ptr + off, v0, mask=mask)
    tl.store(vo_ptr + n + off, v1, mask=mask)
    tl.store(vo_ptr + 2 * n + off, v2, mask=mask)
    step = _mlp_rest(pre, wh0, wo_dot, c_ptr, wh_ptr, bh_ptr, wo_ptr, R, C, HP, NHID, EXP_MULT,
                     STEP_MULT, PREC)
    _store_updated(p_ptr + task * n, po_ptr + task * n, off, mask, step)


# ----------------------------------------------------------------------------- launchers

_PACKED_STATE = ("p_ptr", "g_ptr", "mom_ptr", "rms_ptr", "vd_ptr")


def packed_moments_kernel(sizes: tuple[int, ...], tiles: tuple[int, ...], segs: tuple[int, ...]):
    """The moments pass over non-factored tensors of `sizes` elements (`tiles` tiles each,
    segment ids `segs`) where they lie: (c_ptr, p0_ptr.., g.., mom.., rms.., vd.., s_ptr;
    R, C), grid tasks x sum(tiles) (`members.member_kernel`)."""
    return members.member_kernel(_packed_moments_body, "_packed_moments_kernel", tiles,
                                 (("n", sizes), ("seg", segs)), ("c_ptr",), _PACKED_STATE, (),
                                 (), ("s_ptr",), ("R", "C"))


def packed_apply_kernel(sizes: tuple[int, ...], tiles: tuple[int, ...], segs: tuple[int, ...]):
    """The apply pass over non-factored tensors where they lie: (c_ptr, p0_ptr.., g.., mom..,
    rms.., vd.., w_ptr, b0_ptr, wh_ptr, bh_ptr, wo_ptr, po0_ptr.., mo.., ro.., vo..; R, C,
    HP, NHID, EXP_MULT, STEP_MULT, PREC, SEGS)."""
    return members.member_kernel(
        _packed_apply_body, "_packed_apply_kernel", tiles, (("n", sizes), ("seg", segs)),
        ("c_ptr",), _PACKED_STATE,
        ("w_ptr", "b0_ptr", "wh_ptr", "bh_ptr", "wo_ptr"), ("po_ptr", "mo_ptr", "ro_ptr", "vo_ptr"),
        (), ("R", "C", "HP", "NHID", "EXP_MULT", "STEP_MULT", "PREC", "SEGS"))


_FACTORED_STATE = ("p_ptr", "g_ptr", "mom_ptr", "rms_ptr")


def row_col_sides_kernel(tiles: tuple[int, ...], values: tuple):
    """The whole-plane row / column pass over factored tensors: (c_ptr, g0_ptr.., vu.., vv..,
    nu_ptr, nv_ptr, fu_ptr, fv_ptr; TU, TV, R, C); values B, U, V, OU, OV, ROWU per tensor."""
    return members.member_kernel(_row_col_sides_body, "_row_col_sides_kernel", tiles, values,
                                 ("c_ptr",), ("g_ptr", "vu_ptr", "vv_ptr"), (), (),
                                 ("nu_ptr", "nv_ptr", "fu_ptr", "fv_ptr"), ("TU", "TV", "R", "C"))


def row_col_sums_kernel(tiles: tuple[int, ...], values: tuple):
    """The row / column sums pass over factored tensors where they lie: (g0_ptr.., su_ptr,
    sv_ptr; TU, TV, NV, NU, R, C, RL, VA); values B, U, VQ, OU, OV per tensor."""
    return members.member_kernel(_row_col_sums_body, "_row_col_sums_kernel", tiles, values, (),
                                 ("g_ptr",), (), (), ("su_ptr", "sv_ptr"),
                                 ("TU", "TV", "NV", "NU", "R", "C", "RL", "VA"))


def factored_moments_kernel(tiles: tuple[int, ...], values: tuple):
    """The moments pass over factored tensors: (c_ptr, p0_ptr.., g.., mom.., rms.., fu_ptr,
    fv_ptr, su_ptr, sv_ptr, s_ptr; TU, TV, R, C, VA); values B, U, VQ, OU, OV per tensor."""
    return members.member_kernel(_factored_moments_body, "_factored_moments_kernel", tiles, values,
                                 ("c_ptr",), _FACTORED_STATE, ("fu_ptr", "fv_ptr", "su_ptr", "sv_ptr"),
                                 (), ("s_ptr",), ("TU", "TV", "R", "C", "VA"))


def factored_apply_kernel(tiles: tuple[int, ...], values: tuple, persistent: bool = False):
    """The apply pass over factored tensors: (c_ptr, p0_ptr.., g.., mom.., rms.., fu_ptr,
    fv_ptr, tu_ptr, tv_ptr, w_ptr, wh_ptr, bh_ptr, wo_ptr, su_ptr, sv_ptr, po0_ptr.., mo..,
    ro.., nu0_ptr.., nv..; TU, TV, SEGS, R, C, HP, NHID, EXP_MULT, STEP_MULT, PREC, L1,
    PLANES, TW, WR, VA[, TASKS, STAGES]);
    values B, U, VQ, OU, OV, SEG per tensor. `persistent`: a fixed grid of programs that
    loop over the tiles, their next tiles' loads in flight (`members.member_kernel`)."""
    constexprs = ("TU", "TV", "SEGS", "R", "C", "HP", "NHID", "EXP_MULT", "STEP_MULT", "PREC",
                  "L1", "PLANES", "TW", "WR", "VA") + (("TASKS", "STAGES") if persistent else ())
    return members.member_kernel(
        _factored_apply_body,
        "_factored_apply_persistent_kernel" if persistent else "_factored_apply_kernel", tiles,
        values, ("c_ptr",), _FACTORED_STATE,
        ("fu_ptr", "fv_ptr", "tu_ptr", "tv_ptr", "w_ptr", "wh_ptr", "bh_ptr", "wo_ptr", "su_ptr",
         "sv_ptr"), ("po_ptr", "mo_ptr", "ro_ptr", "nu_ptr", "nv_ptr"), (), constexprs, persistent)


def row_col_as_planes(layer1: str, mlp_precision: str) -> bool:
    """Whether the apply kernel takes "dot_all"'s row / column features as 16 more planes
    of layer 1's one dot (its PLANES, from plane-major tables), not as a [tile, 16] operand
    of their own, which crosses shared memory in four chunks. Compiled for sm_90 (4096 x
    4096, 1x256, 4 warps): bf16 688 instructions per thread and 3 barriers against 760
    and 6, "ieee" 5368 against 5472, at the same registers. TF32 would take 840 and 3
    against 944 and 13, but 174 registers (8 warps per SM) against 160 (12): not taken
    untimed; tf32_fp16 gives them their own precision (fp16), so their own dot."""
    return layer1 == "dot_all" and mlp_precision in ("bf16", "ieee")


def _tiles(lay: plan.FactoredLayout, blocks: BlockSizes) -> int:
    return lay.B * -(-lay.U // blocks.rows) * -(-lay.V // blocks.cols)


def _f32(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _row_alignment(v: int) -> int:
    """The largest power of two <= 16 that divides a row's length v.

    jax-triton passes sizes as plain runtime integers (Triton's own launcher would mark
    one divisible by 16), so a kernel cannot know that its rows start at aligned
    addresses and loads one float per instruction. The factored kernels take V / VA
    and a constexpr VA, and multiply them back: with VA >= 2 each thread's two elements
    of a 256-element tile row load and store as one 64-bit access."""
    return min(16, v & -v)


def resolve_launcher(launcher: str | None) -> str:
    """`launcher`, or by default `$LOPT_FAST_TRITON_LAUNCHER` or "jax_triton"."""
    launcher = launcher or os.environ.get(TRITON_LAUNCHER_ENV_VAR) or "jax_triton"
    check_choice("launcher", launcher, TRITON_LAUNCHERS)
    return launcher


def _num_sms() -> int:
    """Streaming multiprocessors of the GPU; an H100 / H200's 132 when lowering without one."""
    return getattr(jax.devices()[0], "core_count", None) or 132


def _over_tasks(launch, *arrays):
    """launch(tasks, *arrays with a leading task axis) on one task's `arrays`, such that
    `jax.vmap` over tasks folds the task axis into the launch (grid axis 0), not a loop.

    Under vmap every array gets the task axis (an unbatched one, e.g. a shared theta, is
    broadcast); the kernels move each pointer to their task. One level of vmap.
    """

    @jax.custom_batching.custom_vmap
    def one_task(*xs):
        return jax.tree.map(lambda o: o[0], launch(1, *(x[None] for x in xs)))

    @one_task.def_vmap
    def tasks(axis_size, in_batched, *xs):
        xs = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
              for x, batched in zip(xs, in_batched, strict=True)]
        out = launch(axis_size, *xs)
        return out, jax.tree.map(lambda _: True, out)

    return one_task(*arrays)


class TritonKernels:
    """Launchers (`plan.Kernels` interface) through `jax_triton.triton_call`."""

    def __init__(self, mlp_precision: str = "tf32", compute_capability: int | None = None,
                 layer1: str = "dot", persistent: bool = False, in_place: bool = True,
                 launcher: str | None = None):
        check_choice("mlp_precision", mlp_precision, MLP_PRECISIONS)
        check_choice("layer1", layer1, LAYER1_FORMS)
        # the H x H and output layers' weights come as `plan.mlp_weights` hands them
        # under this precision (rounded to their dots' operands; TF32's reordered)
        self.mlp_precision = mlp_precision
        self.compute_capability = compute_capability
        self.layer1 = layer1
        self.persistent = persistent
        self.in_place = in_place
        self.launcher = resolve_launcher(launcher)
        self.row_col_in_dot = layer1 == "dot_all"  # what plan hands factored_apply
        self.row_col_planes = row_col_as_planes(layer1, mlp_precision)

    def _call(self, *args, **kw):
        if self.launcher == "xla":
            return xla_call.xla_triton_call(*args, compute_capability=self.compute_capability,
                                            **kw)
        import jax_triton as jt

        target = ffi_call.call_target(legacy=self.launcher == "jax_triton_legacy")
        return jt.triton_call(*args, compute_capability=self.compute_capability,
                              custom_call_target_name=target, **kw)

    def _hidden(self, mlp, hp):
        if mlp.w_hidden is None:  # dummies: NHID = 0 never reads them
            dtype = plan.later_weights_dtype(self.mlp_precision) or jnp.float32
            return (0, jnp.zeros((1, hp, hp), dtype),
                    jnp.zeros((1, hp), jnp.float32))
        return mlp.w_hidden.shape[0], mlp.w_hidden, mlp.b_hidden

    @staticmethod
    def _runs(p, g, group: plan.FactoredGroup) -> list[range]:
        """The factored tensors that share launches: alike in tiles and dtypes."""
        return member_runs([(group.blocks[j], group.reduce_blocks[j], p[j].dtype,
                                     g[j].dtype) for j in range(len(p))])

    def group_sides(self, g, v_u, v_v, consts, group: plan.FactoredGroup, tile: BlockSizes):
        """(new_u, new_v, f_u, f_v) on the flat sides in one launch per run, each tensor's
        [U, V] plane in one `tile` (`blocks.plane_tile`). v_u, v_v: each tensor's state on
        its U / V side, [3, B U] / [3, B V]."""
        outs = [self._sides_run(g, v_u, v_v, consts, group, run, tile)
                for run in member_runs([x.dtype for x in g])]
        return tuple(jnp.concatenate([out[k] for out in outs], axis=-1) if len(outs) > 1
                     else outs[0][k] for k in range(4))

    def _sides_run(self, g, v_u, v_v, consts, group, run: range, tile: BlockSizes):
        lays = [group.layouts[j] for j in run]
        u_sizes = [lay.B * lay.U for lay in lays]
        v_sizes = [lay.B * lay.V for lay in lays]
        kernel = row_col_sides_kernel(tuple(lay.B for lay in lays), (
            ("B", tuple(lay.B for lay in lays)), ("U", tuple(lay.U for lay in lays)),
            ("V", tuple(lay.V for lay in lays)), ("OU", plan.starts(u_sizes)),
            ("OV", plan.starts(v_sizes)), ("ROWU", tuple(int(lay.u_is_row) for lay in lays))))
        tu, tv = sum(u_sizes), sum(v_sizes)

        def launch(tasks, consts, *arrays):
            sides = [_f32((tasks, 3, tu)), _f32((tasks, 3, tv))] * 2
            return self._call(consts, *arrays, kernel=kernel, out_shape=sides,
                              grid=(tasks * sum(lay.B for lay in lays),),
                              num_warps=tile.num_warps, num_stages=tile.num_stages, TU=tu,
                              TV=tv, R=tile.rows, C=tile.cols, name="adafac_row_col_sides")

        return _over_tasks(launch, consts, *(g[j] for j in run), *(v_u[j] for j in run),
                           *(v_v[j] for j in run))

    def group_row_col_sums(self, g, group: plan.FactoredGroup):
        runs = [self._row_col_sums_run(g, group, run) for run in self._runs(g, g, group)]
        return tuple(jnp.concatenate([run[k] for run in runs]) if len(runs) > 1 else runs[0][k]
                     for k in range(2))

    def _row_col_sums_run(self, g, group: plan.FactoredGroup, run: range):
        """One launch's whole row sums su [sum BU] and column sums sv [sum BV]: its partial
        sums, [column blocks, sum BU] and [row blocks, sum BV], summed over blocks."""
        lays = [group.layouts[j] for j in run]
        blk = group.reduce_blocks[run[0]]
        loop = sums_row_chunks(blk, [lay.U for lay in lays])
        va = min(_row_alignment(lay.V) for lay in lays)
        nv = [-(-lay.V // blk.cols) for lay in lays]
        nu = [-(-lay.U // (blk.rows * loop)) for lay in lays]
        u_sizes, v_sizes = [lay.B * lay.U for lay in lays], [lay.B * lay.V for lay in lays]
        tiles = tuple(lay.B * a * b for lay, a, b in zip(lays, nu, nv, strict=True))
        kernel = row_col_sums_kernel(tiles, (
            ("B", tuple(lay.B for lay in lays)), ("U", tuple(lay.U for lay in lays)),
            ("VQ", tuple(lay.V // va for lay in lays)), ("OU", plan.starts(u_sizes)),
            ("OV", plan.starts(v_sizes))))
        tu, tv = sum(u_sizes), sum(v_sizes)

        def launch(tasks, *gs):
            su, sv = self._call(*gs, kernel=kernel,
                                out_shape=[_f32((tasks, max(nv), tu)), _f32((tasks, max(nu), tv))],
                                grid=(tasks * sum(tiles),), num_warps=blk.num_warps,
                                num_stages=blk.num_stages, TU=tu, TV=tv, NV=max(nv), NU=max(nu),
                                R=blk.rows, C=blk.cols, RL=loop, VA=va, name="adafac_row_col_sums")
            return jnp.sum(su, axis=1), jnp.sum(sv, axis=1)

        return _over_tasks(launch, *(g[j] for j in run))

    @staticmethod
    def _side_values(run: range, group: plan.FactoredGroup, va: int) -> tuple:
        """The per-tensor values of the moments and apply kernels."""
        lays = [group.layouts[j] for j in run]
        return (("B", tuple(lay.B for lay in lays)), ("U", tuple(lay.U for lay in lays)),
                ("VQ", tuple(lay.V // va for lay in lays)),
                ("OU", tuple(group.u_offsets[j] for j in run)),
                ("OV", tuple(group.v_offsets[j] for j in run)))

    def group_moments(self, p, g, mom, rms, fu, fv, new_u, new_v, consts,
                      group: plan.FactoredGroup):
        runs = [self._moments_run(p, g, mom, rms, fu, fv, new_u, new_v, consts, group, run)
                for run in self._runs(p, g, group)]
        return plan.segment_sums(jnp.concatenate([partial for partial, _ in runs]),
                                 [t for _, tiles in runs for t in tiles])

    def _moments_run(self, p, g, mom, rms, fu, fv, new_u, new_v, consts, group, run: range):
        """One launch's per-tile sums [sum tiles, 32] and each tensor's tiles."""
        blk = group.reduce_blocks[run[0]]
        va = min(_row_alignment(group.layouts[j].V) for j in run)
        tiles = tuple(_tiles(group.layouts[j], blk) for j in run)
        kernel = factored_moments_kernel(tiles, self._side_values(run, group, va))

        def launch(tasks, consts, *arrays):
            return self._call(consts, *arrays, kernel=kernel,
                              out_shape=_f32((tasks, sum(tiles), plan.NUM_SUMS)),
                              grid=(tasks * sum(tiles),), num_warps=blk.num_warps,
                              num_stages=blk.num_stages, TU=fu.shape[-1], TV=fv.shape[-1],
                              R=blk.rows, C=blk.cols, VA=va, name="adafac_moments")

        state = [x[j] for x in (p, g, mom, rms) for j in run]
        return _over_tasks(launch, consts, *state, fu, fv, new_u, new_v), tiles

    def group_apply(self, p, g, mom, rms, fu, fv, consts, tu, tv, w, mlp, mults, new_u, new_v,
                    group: plan.FactoredGroup):
        outs = [self._apply_run(p, g, mom, rms, fu, fv, consts, tu, tv, w, mlp, mults, new_u,
                                new_v, group, run)
                for run in self._runs(p, g, group)]
        return tuple(tuple(x for out in outs for x in out[o]) for o in range(5))

    def _apply_run(self, p, g, mom, rms, fu, fv, consts, tu, tv, w, mlp, mults, new_u, new_v,
                   group, run: range):
        """One launch's new p, mom, rms and U / V side accumulators of the tensors of `run`."""
        blk = group.blocks[run[0]]
        lays = [group.layouts[j] for j in run]
        va = min(_row_alignment(lay.V) for lay in lays)
        tiles = tuple(_tiles(lay, blk) for lay in lays)
        kernel = factored_apply_kernel(
            tiles, self._side_values(run, group, va) + (("SEG", tuple(run)),), self.persistent)
        hp = w.shape[-1]
        nhid, wh, bh = self._hidden(mlp, hp)
        k = len(run)
        aliases = plan.in_place_aliases(k, (plan.P, plan.MOM, plan.RMS), self.in_place)

        def launch(tasks, consts, *arrays):
            lead = lambda x: jax.ShapeDtypeStruct((tasks, *x.shape), x.dtype)  # noqa: E731
            programs = tasks * sum(tiles)
            if self.persistent:  # a fixed grid of programs looping over the tiles
                grid = (min(programs, _num_sms() * PERSISTENT_PROGRAMS_PER_SM),)
                extra = dict(TASKS=tasks, STAGES=blk.num_stages)
            else:
                grid, extra = (programs,), {}
            sides = [_f32((tasks, 3, lay.B * lay.U)) for lay in lays]
            sides += [_f32((tasks, 3, lay.B * lay.V)) for lay in lays]
            outs = self._call(
                consts, *arrays, kernel=kernel,
                out_shape=[lead(x[j]) for x in (p, mom, rms) for j in run] + sides, grid=grid,
                num_warps=blk.num_warps, num_stages=blk.num_stages, TU=fu.shape[-1],
                TV=fv.shape[-1], SEGS=w.shape[0], R=blk.rows, C=blk.cols, HP=hp, NHID=nhid,
                EXP_MULT=mults[0], STEP_MULT=mults[1], PREC=self.mlp_precision, L1=self.layer1,
                PLANES=self.row_col_planes, TW=tu.shape[-2 if self.row_col_planes else -1],
                WR=w.shape[-2], VA=va, name="adafac_apply", **extra,
                input_output_aliases=aliases)
            return [outs[o * k:(o + 1) * k] for o in range(5)]

        state = [x[j] for x in (p, g, mom, rms) for j in run]
        return _over_tasks(launch, consts, *state, fu, fv, tu, tv, w, wh, bh, mlp.w_out_t, new_u,
                           new_v)

    def _member_launches(self, p, g, blocks: BlockSizes):
        """The members' runs that share a launch (`blocks.member_runs`: their p and g
        dtypes alike), and each member's size and tiles."""
        sizes = [x.size for x in p]
        tiles = [-(-n // (blocks.rows * blocks.cols)) for n in sizes]
        runs = member_runs([(a.dtype, b.dtype) for a, b in zip(p, g, strict=True)])
        return runs, sizes, tiles

    def member_moments(self, p, g, mom, rms, vd, consts, blocks: BlockSizes):
        runs, sizes, tiles = self._member_launches(p, g, blocks)
        partials = [self._member_moments_run(p, g, mom, rms, vd, consts, blocks, run, sizes, tiles)
                    for run in runs]
        return jnp.concatenate(partials) if len(partials) > 1 else partials[0]

    def _member_moments_run(self, p, g, mom, rms, vd, consts, blocks, run, sizes, tiles):
        """One launch's per-tile sums [its tiles, 32]."""
        kernel = packed_moments_kernel(tuple(sizes[i] for i in run), tuple(tiles[i] for i in run),
                                       tuple(run))
        n = sum(tiles[i] for i in run)

        def launch(tasks, consts, *arrays):
            return self._call(consts, *arrays, kernel=kernel,
                              out_shape=_f32((tasks, n, plan.NUM_SUMS)), grid=(tasks * n,),
                              num_warps=blocks.num_warps, num_stages=blocks.num_stages,
                              R=blocks.rows, C=blocks.cols, name="adafac_packed_moments")

        return _over_tasks(launch, consts, *(x[i] for x in (p, g, mom, rms, vd) for i in run))

    def member_apply(self, p, g, mom, rms, vd, consts, w_seg, b0, mlp, mults, blocks: BlockSizes):
        runs, sizes, tiles = self._member_launches(p, g, blocks)
        outs = [self._member_apply_run(p, g, mom, rms, vd, consts, w_seg, b0, mlp, mults, blocks,
                                       run, sizes, tiles) for run in runs]
        return tuple(tuple(x for out in outs for x in out[o]) for o in range(4))

    def _member_apply_run(self, p, g, mom, rms, vd, consts, w_seg, b0, mlp, mults, blocks, run,
                          sizes, tiles):
        """One launch's new p, mom, rms and v_diag of the tensors of `run`."""
        kernel = packed_apply_kernel(tuple(sizes[i] for i in run), tuple(tiles[i] for i in run),
                                     tuple(run))
        hp = b0.shape[-1]
        nhid, wh, bh = self._hidden(mlp, hp)
        k = len(run)
        aliases = plan.in_place_aliases(k, (plan.P, plan.MOM, plan.RMS, plan.V_DIAG),
                                        self.in_place)

        def launch(tasks, consts, *arrays):
            lead = lambda x: jax.ShapeDtypeStruct((tasks, *x.shape), x.dtype)  # noqa: E731
            outs = self._call(
                consts, *arrays, kernel=kernel,
                out_shape=[lead(x[i]) for x in (p, mom, rms, vd) for i in run],
                grid=(tasks * sum(tiles[i] for i in run),), num_warps=blocks.num_warps,
                num_stages=blocks.num_stages, R=blocks.rows, C=blocks.cols, HP=hp, NHID=nhid,
                EXP_MULT=mults[0], STEP_MULT=mults[1], PREC=self.mlp_precision,
                SEGS=w_seg.shape[0],
                name="adafac_packed_apply", input_output_aliases=aliases)
            return [outs[o * k:(o + 1) * k] for o in range(4)]

        state = [x[i] for x in (p, g, mom, rms, vd) for i in run]
        return _over_tasks(launch, consts, *state, w_seg, b0, wh, bh, mlp.w_out_t)


# ----------------------------------------------------------------------------- public op

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _fused(lopt, theta, state, grad, config):
    (mlp_precision, blocks, packed_blocks, reduction_blocks, compute_capability, layer1,
     persistent, in_place, launcher) = config
    kernels = plan.Kernels.of(TritonKernels(mlp_precision, compute_capability, layer1,
                                            persistent, in_place, launcher))
    return plan.fused_update(kernels, lopt, theta, state, grad, blocks=blocks,
                             packed_blocks=packed_blocks, reduction_blocks=reduction_blocks)


def _fused_fwd(lopt, theta, state, grad, config):
    return _fused(lopt, theta, state, grad, config), (theta, state, grad)


def _fused_bwd(lopt, config, residuals, cotangent):
    from lopt_fast.learned.adafac_mlp import reference_update

    _, vjp = jax.vjp(functools.partial(reference_update, lopt), *residuals)
    return vjp(cotangent)


_fused.defvjp(_fused_fwd, _fused_bwd)


def triton_update(lopt, theta, state, grad, *, mlp_precision: str = "tf32",
                  blocks: BlockSizes | None = None, packed_blocks: BlockSizes | None = None,
                  compute_capability: int | None = None, layer1: str = "dot",
                  persistent: bool = False, in_place: bool = True, launcher: str | None = None,
                  reduction_blocks: BlockSizes | None = None):
    """Fused Triton `AdafacMLPLOpt` update (jax-triton): the signature of `reference_update`.

    Forward runs the Triton kernels, backward differentiates the reference
    (`jax.custom_vjp`). Needs an NVIDIA GPU, `jax-triton` and `triton` to run.
    `compute_capability` (e.g. 90 for an H100) compiles the kernels for that GPU when
    lowering without one (`.lower(lowering_platforms=("cuda",))`); by default jax-triton
    asks the local GPU. `layer1`: the factored tensors' first MLP layer as "dot" or
    "dot_all" (the packed small tensors' is a dot); `mlp_precision`: the dots' operands,
    "tf32", "ieee", "tf32_fp16" (the raw features' dot TF32, the operands of unit scale
    after it fp16: the H x H and output layers') or "bf16" (this keyword's default is the
    backend's: `opt_fn` passes none unless asked); `persistent`: run the apply pass of
    factored tensors as a fixed grid of programs that loop over tiles with their next
    tiles' loads in flight (`blocks.num_stages` - 1 ahead); see the module docstring.
    `in_place`: update p and the state in their buffers, right when the
    caller donates the state (or carries it through `lax.scan`); otherwise XLA copies them
    first, and `in_place=False` (fresh outputs) saves those copies
    (`plan.in_place_aliases`). `launcher` (default
    `$LOPT_FAST_TRITON_LAUNCHER`, else "jax_triton"): "jax_triton" (`jax_triton.triton_call`
    as jaxlib's FFI call, `ffi_call`), "jax_triton_legacy" (jax-triton's own call) or "xla"
    (XLA's own Triton calls, which XLA records into CUDA graphs; no jax-triton needed:
    `xla_call`). `blocks` / `packed_blocks` override the tiles (`blocks`: the factored
    tensors' in every pass), `reduction_blocks` the factored tensors' in the reduction
    passes only (as `pallas_update`'s).

    Example:
        new_params, acc = triton_update(lopt, theta, opt_state, grads)
    """
    return _fused(lopt, theta, state, grad,
                  (mlp_precision, blocks, packed_blocks, reduction_blocks, compute_capability,
                   layer1, bool(persistent), bool(in_place), resolve_launcher(launcher)))
