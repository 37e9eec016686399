"""Multi-tensor `pallas_call`s: one 1-D grid over the tiles of several [B, U, V] tensors.

A Pallas kernel sees each operand through a BlockSpec, so it cannot pick one of several
arrays by a pointer select as the Triton member kernels do (`lopt_fast.kernels.members`).
Instead each member tensor gets a BlockSpec of its own whose index map sends program `i`
to its tile `i - start` of that member, clamped into the member's tiles; the kernel finds
its member `seg` by comparing `i` with the members' first tiles, loads through a
`lax.switch` on `seg` (only the member's own branch reads memory) and stores under
`pl.when(seg == m)`. On a GPU the other members' refs are pointers nobody touches. In
Pallas' interpreter every program copies every member's (clamped) block in and out, and
a program that does not store writes back the block as it read it, so a tile is only
ever overwritten with its own values or its member's result.

Every member brings memory operations of its own, and Triton's coalescing pass walks the
whole kernel once per memory operation, so compile time grows with the square of the
members: launchers take at most `blocks.PALLAS_MAX_MEMBERS` (the measurements are there).

Tiles of a member walk its [B, U / rows, V / cols] grid in row-major order, or with
`order="columns"` down each column block's rows first (`blocks.TILE_ORDERS`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from lopt_fast.pallas import plan
from lopt_fast.pallas.blocks import BlockSizes


def segment(i, starts) -> jnp.ndarray:
    """Which of the consecutive ranges beginning at the static `starts` (the first at 0)
    the traced index `i` falls in."""
    seg = jnp.int32(0)
    for start in starts[1:]:
        seg = seg + (i >= start).astype(jnp.int32)
    return seg


@dataclasses.dataclass(frozen=True)
class MemberTiles:
    """Static tiling of member tensors [B, U, V] that share one launch and one tile."""

    shapes: tuple[tuple[int, int, int], ...]
    tile: BlockSizes
    order: str = "rows"  # `blocks.TILE_ORDERS`

    @property
    def grids(self) -> tuple[tuple[int, int, int], ...]:
        """Each member's tile grid: (B, row blocks, column blocks)."""
        r, c = self.tile.rows, self.tile.cols
        return tuple((b, -(-u // r), -(-v // c)) for b, u, v in self.shapes)

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(int(np.prod(g)) for g in self.grids)

    @property
    def starts(self) -> tuple[int, ...]:
        return plan.starts(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def segment(self, i):
        """The member that tile `i` (traced) of the launch belongs to."""
        return segment(i, self.starts)

    def pick(self, seg, values):
        """values[seg] of one static int per member, for a traced `seg`."""
        out = jnp.int32(values[0])
        for m in range(1, len(values)):
            out = jnp.where(seg == m, values[m], out)
        return out

    def _walk(self, t, nu, nv):
        """(b, row block, column block) of a member's tile t in `order`."""
        if self.order == "columns":
            return t // (nu * nv), t % nu, (t // nu) % nv
        return t // (nu * nv), (t // nv) % nu, t % nv

    def _block(self, i, m: int):
        """(b, row block, column block) of launch tile i within member m, clamped."""
        _, nu, nv = self.grids[m]
        return self._walk(jnp.clip(i - self.starts[m], 0, self.counts[m] - 1), nu, nv)

    def specs(self, block_shape, dims: str) -> list[pl.BlockSpec]:
        """Each member's BlockSpec for a ref whose block dims are `dims`: "b" the tile's B
        (squeezed), "u" / "v" its row / column block (also as the leading dim of partial
        sums over the other axis), "0" the whole dim in one block."""
        def spec(m):
            def index(i):
                b, j, k = self._block(i, m)
                return tuple({"b": b, "u": j, "v": k, "0": 0}[d] for d in dims)
            return pl.BlockSpec(block_shape, index)
        return [spec(m) for m in range(len(self.shapes))]

    def stacked_spec(self, array, first: int) -> pl.BlockSpec:
        """The BlockSpec of a per-tensor array [tensors, ...] (e.g. first-layer weights):
        each program's member's entry, this launch's members being `first`, `first + 1`,
        ... of its tensors."""
        return pl.BlockSpec((None,) + array.shape[1:],
                            lambda i: (first + self.segment(i),) + (0,) * (array.ndim - 1))

    def locate(self, i):
        """(member, b, row block, column block, U, V) of launch tile i, all traced."""
        seg = self.segment(i)
        t = i - self.pick(seg, self.starts)
        nu = self.pick(seg, [g[1] for g in self.grids])
        nv = self.pick(seg, [g[2] for g in self.grids])
        u = self.pick(seg, [s[1] for s in self.shapes])
        v = self.pick(seg, [s[2] for s in self.shapes])
        return (seg, *self._walk(t, nu, nv), u, v)

    @staticmethod
    def switch(seg, count: int, branch):
        """branch(m) of member `seg` (traced): only that member's refs are read."""
        if count == 1:
            return branch(0)
        return lax.switch(seg, [functools.partial(branch, m) for m in range(count)])

    @staticmethod
    def each(seg, count: int, body):
        """body(m) for member `seg` only: its stores."""
        for m in range(count):
            pl.when(seg == m)(functools.partial(body, m))
