"""Multi-tensor launches: one Triton kernel over the tiles of several separate arrays.

A model's tensors are many, and one launch per tensor and pass costs a kernel (and the
XLA work around it) each. Packing small tensors into one buffer gives one launch per
pass, but the packing and unpacking are XLA kernels of their own: compiled for an H100
(`profiling/xla_kernels.py`), 5 concatenations before the passes and 4 to 12 slices
after them, 17 of the 30 kernels of a 1e7-parameter step. A *member kernel* reads and
writes the tensors where they are instead: program `pid` of the grid (tasks x the
members' tiles) finds its member by comparing its tile with the members' first tiles,
selects that member's pointers and sizes, and runs the per-tile `body` on them. The
Triton backend launches every pass this way, for factored and non-factored tensors.

The member structure (sizes, tiles, segment ids) is bound into the kernel's source, so
each tree shape gets its own kernel (cached here), and the selection is a few scalar
compares and selects per member and operand. Arrays of different dtypes cannot share a
select, and a kernel's parameters are limited (4 KB on older CUDA): launchers split the
members into runs (`blocks.member_runs`).

    body(task, tile, *values, *before, *member inputs, *between, *member outputs,
         *after, *constexprs)

`tile` is the program's tile within its member and `values` the member's own integers
(for a flat tensor: its elements and its segment id among all members).
"""

from __future__ import annotations

import functools
import hashlib
import linecache

from lopt_fast.pallas import plan


def _names(base: str, count: int) -> list[str]:
    return [f"{base}{i}_ptr" for i in range(count)]  # "_ptr": tools read these as pointers


@functools.cache
def member_kernel(body, name: str, tiles: tuple[int, ...], values: tuple[tuple[str, tuple], ...],
                  before: tuple[str, ...], member_in: tuple[str, ...], between: tuple[str, ...],
                  member_out: tuple[str, ...], after: tuple[str, ...],
                  constexprs: tuple[str, ...], persistent: bool = False):
    """A `@triton.jit` kernel `name` running `body` over the members' tiles.

    Its parameters, in jax-triton's order: `before`, then each of `member_in` once per
    member (`p0_ptr, p1_ptr, ...`), `between`, each of `member_out` per member, `after`,
    then the `constexprs`. `tiles`: each member's tiles; `values`: (name, one int per
    member) pairs, the member's own values the body gets after (task, tile).
    The grid is tasks x sum(tiles) programs, one per tile, or with `persistent` any
    number of programs that loop over the tiles, software-pipelined (`tl.range` with
    `num_stages=STAGES`; the constexprs must include TASKS and STAGES, which the body
    does not get).
    """
    import triton
    import triton.language as tl

    count = len(tiles)
    if any(len(v) != count for _, v in values):
        raise ValueError(f"every value needs one entry per member ({count}): {values}")
    starts = plan.starts(tiles)
    per_member = [(base, _names(base, count)) for base in member_in + member_out]
    params = [*before, *(n for base, names in per_member[:len(member_in)] for n in names),
              *between, *(n for base, names in per_member[len(member_in):] for n in names),
              *after, *(f"{c}: tl.constexpr" for c in constexprs)]
    total = sum(tiles)
    if persistent:
        head = [f"    for pid in tl.range(tl.program_id(0), TASKS * {total}, tl.num_programs(0),"
                " num_stages=STAGES):"]
        indent = "        "
    else:
        head, indent = ["    pid = tl.program_id(0)"], "    "
    lines = [f"def {name}({', '.join(params)}):", *head]
    # pid + an int64 0, not pid.to(): the interpreter's loop variables are Python ints
    select = ["pid64 = pid + tl.zeros((), tl.int64)",
              f"task = pid64 // {total}",
              f"t = pid64 % {total}",
              "start = tl.zeros((), tl.int64)"]
    select += [f"{key} = tl.full((), {v[0]}, tl.int64)" for key, v in values]
    select += [f"{base} = {names[0]}" for base, names in per_member]
    for i in range(1, count):
        select += [f"here = t >= {starts[i]}", f"start = tl.where(here, {starts[i]}, start)"]
        select += [f"{key} = tl.where(here, {v[i]}, {key})" for key, v in values]
        select += [f"{base} = tl.where(here, {names[i]}, {base})" for base, names in per_member]
    loop_constexprs = ("TASKS", "STAGES") if persistent else ()
    body_args = [*(key for key, _ in values), *before, *member_in, *between, *member_out, *after,
                 *(c for c in constexprs if c not in loop_constexprs)]
    select.append(f"_body(task, t - start, {', '.join(body_args)})")
    source = "\n".join(lines + [indent + line for line in select]) + "\n"
    # inspect.getsource (which triton.jit reads) finds generated code through linecache.
    filename = f"<lopt_fast member kernel {hashlib.sha1(source.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": __name__, "tl": tl, "_body": body}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return triton.jit(namespace[name])
