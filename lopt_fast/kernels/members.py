"""Multi-tensor launches: one Triton kernel over the tiles of several separate arrays.

The non-factored tensors of a model (biases, scales, scalars) are small and many. Packing
them into one buffer gives one launch per pass, but the packing and unpacking are XLA
kernels of their own: compiled for an H100 (`profiling/xla_kernels.py`), 5 concatenations
before the passes and 4 to 12 slices after them, 17 of the 30 kernels of a 1e7-parameter
step. A *member kernel* reads and writes the tensors where they are instead: program
`pid` of the grid (tasks x the members' tiles) finds its member by comparing its tile
with the members' first tiles, selects that member's pointers and size, and runs the
per-tile `body` on them.

The member structure (sizes, tiles, segment ids) is bound into the kernel's source, so
each tree shape gets its own kernel (cached here), and the selection is a few scalar
compares and selects per member and operand. Arrays of different dtypes cannot share a
select, and a kernel's parameters are limited (4 KB on older CUDA): launchers split the
members into runs (`member_runs`).

    body(task, tile, n, seg, *before, *member inputs, *between, *member outputs,
         *after, *constexprs)

`tile` is the program's tile within its member, `n` the member's elements (per plane of
a [planes, n] operand) and `seg` its segment id (its index among all members).
"""

from __future__ import annotations

import functools
import hashlib
import linecache
from collections.abc import Sequence

import numpy as np

MAX_MEMBERS = 32  # per launch: 9 pointers each in the apply pass, 2.3 KB of parameters


def member_runs(keys: Sequence, max_members: int | None = None) -> list[range]:
    """Consecutive runs of members with equal `keys` (e.g. their dtypes), at most
    `max_members` (default `MAX_MEMBERS`) long: the members that can share a launch, in
    order."""
    max_members = max_members or MAX_MEMBERS
    runs, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start] or i - start == max_members:
            runs.append(range(start, i))
            start = i
    return runs


def _names(base: str, count: int) -> list[str]:
    return [f"{base}{i}_ptr" for i in range(count)]  # "_ptr": tools read these as pointers


@functools.cache
def member_kernel(body, name: str, sizes: tuple[int, ...], tiles: tuple[int, ...],
                  segs: tuple[int, ...], before: tuple[str, ...], member_in: tuple[str, ...],
                  between: tuple[str, ...], member_out: tuple[str, ...], after: tuple[str, ...],
                  constexprs: tuple[str, ...]):
    """A `@triton.jit` kernel `name` running `body` over the members' tiles (grid: tasks x
    sum(tiles)). Its parameters, in jax-triton's order: `before`, then each of `member_in`
    once per member (`p0_ptr, p1_ptr, ...`), `between`, each of `member_out` per member,
    `after`, then the `constexprs`. `sizes`, `tiles`, `segs`: per member."""
    import triton
    import triton.language as tl

    count = len(sizes)
    if not count == len(tiles) == len(segs):
        raise ValueError(f"sizes, tiles and segs differ in length: {sizes}, {tiles}, {segs}")
    starts = np.cumsum((0,) + tuple(tiles[:-1])).tolist()
    per_member = [(base, _names(base, count)) for base in member_in + member_out]
    params = [*before, *(n for base, names in per_member[:len(member_in)] for n in names),
              *between, *(n for base, names in per_member[len(member_in):] for n in names),
              *after, *(f"{c}: tl.constexpr" for c in constexprs)]
    lines = [f"def {name}({', '.join(params)}):",
             "    pid = tl.program_id(0).to(tl.int64)",
             f"    task = pid // {sum(tiles)}",
             f"    t = pid % {sum(tiles)}",
             "    start = tl.zeros((), tl.int64)",
             f"    n = tl.full((), {sizes[0]}, tl.int64)",
             f"    seg = tl.full((), {segs[0]}, tl.int64)"]
    lines += [f"    {base} = {names[0]}" for base, names in per_member]
    for i in range(1, count):
        lines += [f"    here = t >= {starts[i]}",
                  f"    start = tl.where(here, {starts[i]}, start)",
                  f"    n = tl.where(here, {sizes[i]}, n)",
                  f"    seg = tl.where(here, {segs[i]}, seg)"]
        lines += [f"    {base} = tl.where(here, {names[i]}, {base})" for base, names in per_member]
    body_args = [*before, *member_in, *between, *member_out, *after, *constexprs]
    lines.append(f"    _body(task, t - start, n, seg, {', '.join(body_args)})")
    source = "\n".join(lines) + "\n"
    # inspect.getsource (which triton.jit reads) finds generated code through linecache.
    filename = f"<lopt_fast member kernel {hashlib.sha1(source.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": __name__, "tl": tl, "_body": body}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return triton.jit(namespace[name])
