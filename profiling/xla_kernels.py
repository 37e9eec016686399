"""List the kernels XLA launches for one optimizer step on an H100, compiled on a CPU machine.

    python profiling/xla_kernels.py --workload 1e7 --backend triton adam
    python profiling/xla_kernels.py --workload conv:64 --backend triton pallas --list
    python profiling/xla_kernels.py --workload 1e8 --donate     # the state donated
    python profiling/xla_kernels.py --local --workload conv:64  # on a GPU machine: its GPU
    python profiling/xla_kernels.py --workload conv:64 --launcher xla   # triton_update's launcher

XLA:GPU compiles "deviceless" for a described GPU (`jax.experimental.topologies` with an
H100 target config), so the step is compiled by the same passes, with the same fusion
decisions, as on an H100, and nothing runs. The compiled HLO's entry computation is the
launch sequence: each fusion, custom call (jax-triton / Pallas kernels) and copy is one
kernel. The tool counts them by kind and by `jax.named_scope` (`adafac_fused_leaf_<i>`,
`adafac_fused_packed`, `adafac_apply`, ...), so the glue between the fused passes can be
cut without a GPU. It also reads XLA's thunk sequence (`--xla_dump_to`): what the host
launches per step, where XLA records runs of kernels into command buffers (CUDA graphs,
one host launch each) and which thunks stay outside them (a legacy custom call, such
as jax-triton 0.3.1's `triton_kernel_call`, cannot be recorded and splits the graph).
What it cannot say is how long any kernel takes.

Needs the jax CUDA plugin of the installed jax (`pip install "jax[cuda12]==<jax version>"`,
several GB) and, for the triton backend, jax-triton and triton; on a machine without a GPU
the plugin's driver check must be skipped, which this script does
(`JAX_SKIP_CUDA_CONSTRAINTS_CHECK`) before importing jax.

Workloads: `1e5`... a square matrix and its bias with about that many parameters (as
`benchmarks/step.py`), `conv:T` T vmapped tasks x the small convnet with per-task theta,
`blocks:L` a width-256 transformer of L blocks (14 tensors each, `transformer_shapes`).
Backends: triton, pallas, reference, adam (`optax.adam`). As in `benchmarks/step.py`, the
state is not donated and the kernels write fresh outputs (`in_place=False`), or with
`--donate` it is donated and updated in place; `--in-place` / `--no-in-place` override
the kernels' choice (copies appear where it does not match the donation).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import sys
import tempfile
from typing import NamedTuple

# The "kernel" lines of an entry computation: every op but these launches (or copies) on a GPU.
_NOT_KERNELS = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant"}
# A result is a type or a tuple of them, which XLA numbers past 5 elements: /*index=5*/.
_OP = re.compile(r"^\s*(?:ROOT )?%(\S+) = ((?:\((?:[^()=]|/\*index=\d+\*/)*?\)|\S+)) "
                 r"([a-z][\w-]*)\(")
_SCOPE = re.compile(r"(adafac_\w+)")

# An H100 SXM as XLA's GPU compiler sees it (`stream_executor::GpuTargetConfigProto`).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


class Kernel(NamedTuple):
    name: str
    kind: str  # "fusion:kLoop", "custom-call:triton_kernel_call", "copy", ...
    shape: str
    scope: str  # outermost-first adafac_* scopes joined by "/", or "-"
    empty: bool  # a zero-element result: nothing to move


def entry_kernels(hlo_text: str) -> list[Kernel]:
    """The kernels of a compiled module's entry computation, in launch order."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    out = []
    for line in entry.splitlines()[1:]:
        m = _OP.match(line)
        if not m or m.group(3) in _NOT_KERNELS:
            continue
        name, shape, op = m.groups()
        if op == "fusion":
            op += ":" + re.search(r"kind=(\w+)", line).group(1)
        elif op == "custom-call":
            op += ":" + re.search(r'custom_call_target="([^"]+)"', line).group(1)
        op_name = re.search(r'op_name="([^"]*)"', line)
        scopes = _SCOPE.findall(op_name.group(1)) if op_name else []
        dims = re.findall(r"\[([\d,]*)\]", shape)
        empty = bool(dims) and all("0" in d.split(",") for d in dims)
        out.append(Kernel(name, op, shape, "/".join(scopes) or "-", empty))
    return out


class Launches(NamedTuple):
    host: int  # top-level thunks: what the host launches per step
    graphs: int  # of which command buffers (CUDA graphs)
    in_graphs: int  # thunks recorded inside those graphs
    custom_calls_outside: int  # custom-call thunks launched on their own
    loops: int  # while loops: what their bodies launch is not counted here


def host_launches(thunk_sequence: str) -> Launches:
    """Read XLA:GPU's `*thunk_sequence_after_thunk_passes.txt` dump of a step without loops:
    top-level thunks start a line with their number, thunks inside a command buffer are
    indented (so are a while loop's, which is why loops are only counted)."""
    top = re.findall(r"^\d+: (\w+)", thunk_sequence, re.M)
    nested = re.findall(r"^\s+\d+: (\w+)", thunk_sequence, re.M)
    return Launches(len(top), top.count("kCommandBuffer"), len(nested), top.count("kCustomCall"),
                    top.count("kWhile"))


def _step_thunk_sequence(dump_dir: str) -> str | None:
    """The step's thunk-sequence dump: of the modules XLA dumped (on a GPU its autotuner
    compiles small ones too), the one with the longest sequence; after XLA's thunk passes
    (command buffers), or before them where they changed nothing and XLA wrote only that."""
    modules: dict[str, list[str]] = {}
    for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence*.txt")):
        modules.setdefault(os.path.basename(path).split(".thunk_sequence")[0], []).append(path)
    if not modules:
        return None
    step = max(modules.values(), key=lambda paths: max(map(os.path.getsize, paths)))
    return max(step, key=lambda path: "after_thunk_passes" in path)


def summary(kernels: list[Kernel]) -> dict[str, int]:
    """Kernels by kind; zero-element results (nothing to move) counted apart."""
    counts = collections.Counter(k.kind for k in kernels if not k.empty)
    empty = sum(k.empty for k in kernels)
    if empty:
        counts["(zero-element, nothing to move)"] = empty
    return dict(counts)


def by_leaf(kernels: list[Kernel]) -> dict[str, int]:
    """Launched kernels per outermost adafac scope (a fused leaf, the packed tensors)."""
    return dict(collections.Counter(k.scope.split("/")[0] for k in kernels if not k.empty))


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA PJRT plugin (`jax[cuda12]`) is installed: the deviceless compiler."""
    try:
        import importlib.util

        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


def transformer_shapes(blocks: int, d: int = 256) -> dict:
    """A transformer's parameter tree, `blocks` blocks of width d (qkv, projection and a 4x
    MLP with biases, two layer-norm scales and offsets each): many tensors of few shapes."""
    block = {"qkv": {"w": (d, 3 * d), "b": (3 * d,)}, "proj": {"w": (d, d), "b": (d,)},
             "mlp_in": {"w": (d, 4 * d), "b": (4 * d,)}, "mlp_out": {"w": (4 * d, d), "b": (d,)},
             "ln1": {"scale": (d,), "bias": (d,)}, "ln2": {"scale": (d,), "bias": (d,)}}
    return {f"block{i}": block for i in range(blocks)}


def _step(backend: str, workload: str, in_place: bool, compute_capability: int | None = 90,
          launcher: str | None = None):
    """(fn, args, what --donate donates: as `benchmarks/step.py`) of one step of `backend` on
    `workload`, arrays on the CPU; Triton kernels for `compute_capability` (None: the local
    GPU's), launched by `launcher` (`triton_update`'s)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "benchmarks"))
    from step import CONV_MODEL, adam_step, model_shapes, random_tree  # benchmarks/step.py

    from lopt_fast.learned import AdafacMLPLOpt

    tasks = int(workload.split(":")[1]) if workload.startswith("conv:") else None
    if workload.startswith("blocks:"):
        shapes = transformer_shapes(int(workload.split(":")[1]))
    else:
        shapes = CONV_MODEL if tasks else model_shapes(int(float(workload)))
    if backend == "adam":  # step.py's: donating params and state
        fn, carry, rest = adam_step(shapes, tasks)
        return fn, (*carry, *rest), (0, 1)
    lead = (tasks,) if tasks else ()
    params = random_tree(shapes, jax.random.key(1), lead)
    grad = random_tree(shapes, jax.random.key(2), lead)
    batch = jax.vmap if tasks else (lambda f: f)
    lopt = AdafacMLPLOpt(hidden_size=32)
    theta = lopt.init(jax.random.key(0))
    state = batch(lambda p: lopt.opt_fn(theta, backend="reference").init(p, num_steps=1000))(
        params)
    if backend == "triton":
        from lopt_fast.kernels import triton_update

        update = lambda th, s, g: triton_update(  # noqa: E731
            lopt, th, s, g, compute_capability=compute_capability, in_place=in_place,
            launcher=launcher)
    elif backend == "pallas":
        from lopt_fast.pallas import pallas_update

        update = lambda th, s, g: pallas_update(lopt, th, s, g, interpret=False,  # noqa: E731
                                                in_place=in_place)
    else:
        update = lambda th, s, g: lopt.opt_fn(th, backend="reference").update(s, g)  # noqa: E731
    if tasks:  # per-task theta, as PES perturbs it
        theta = jax.tree.map(lambda x: jnp.stack([x] * tasks), theta)
    return batch(update), (theta, state, grad), (1,)


def compiled_hlo(fn, args, donate_argnums=(), local: bool = False) -> str:
    """The optimised HLO text of `jax.jit(fn)(*args)` compiled for one H100, no GPU needed,
    or with `local` for the default device (with `--xla_dump_to` in XLA_FLAGS, XLA also
    writes its thunk sequence there)."""
    import jax
    from jax.experimental import topologies

    if local:
        specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
        return jax.jit(fn, donate_argnums=donate_argnums).lower(*specs).compile().as_text()

    topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG,
                                            topology="1x1x1")
    mesh = topologies.make_mesh(topology, (1,), ("x",))
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), args)
    return jax.jit(fn, donate_argnums=donate_argnums).lower(*specs).compile().as_text()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="1e7",
                    help="1e5 .. 1e8, conv:T (T tasks x the small convnet) or blocks:L (a "
                         "transformer of L blocks, 14 tensors each)")
    ap.add_argument("--backend", nargs="+", default=["triton", "adam"],
                    choices=["triton", "pallas", "reference", "adam"])
    ap.add_argument("--donate", action="store_true",
                    help="donate the state (Adam: and the params), as step.py --donate")
    ap.add_argument("--in-place", action=argparse.BooleanOptionalAction, default=None,
                    help="the kernels' in_place (default: as --donate)")
    ap.add_argument("--local", action="store_true",
                    help="compile for the default device (a GPU machine's own GPU) instead")
    ap.add_argument("--launcher", choices=["jax_triton", "jax_triton_legacy", "xla"], default=None,
                    help="how the triton backend launches its kernels (triton_update's launcher)")
    ap.add_argument("--list", action="store_true", help="every kernel, in launch order")
    args = ap.parse_args(argv)
    in_place = args.donate if args.in_place is None else args.in_place

    if not (args.local or cuda_plugin_installed()):
        sys.exit("xla_kernels.py needs the jax CUDA plugin of this jax: "
                 "pip install \"jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')\"")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check
    with tempfile.TemporaryDirectory(prefix="xla_kernels_") as dump_dir:
        # XLA reads XLA_FLAGS when its backends start, below.
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir}"
        _report(args, in_place, dump_dir)


def _report(args, in_place: bool, dump_dir: str):
    import jax

    target = jax.devices()[0].device_kind if args.local else "NVIDIA H100 80GB HBM3 (deviceless)"
    print(f"jax {jax.__version__}, compiled for: {target}, "
          f"workload {args.workload}, state {'donated' if args.donate else 'not donated'}, "
          f"kernels {'in place' if in_place else 'writing fresh outputs'}")
    for backend in args.backend:
        with jax.default_device(jax.devices("cpu")[0]):
            fn, fn_args, donated = _step(backend, args.workload, in_place,
                                         None if args.local else 90, args.launcher)
        try:
            kernels = entry_kernels(compiled_hlo(fn, fn_args, donated if args.donate else (),
                                                 local=args.local))
        except Exception as e:  # noqa: BLE001 -- report and go on with the other backends
            print(f"\n{backend}: XLA could not compile it: {str(e).strip().splitlines()[0][:300]}")
            continue
        launched = [k for k in kernels if not k.empty]
        print(f"\n{backend}: {len(launched)} kernels")
        sequence = _step_thunk_sequence(dump_dir)
        if sequence:
            with open(sequence) as f:
                launches = host_launches(f.read())
            print(f"  host launches per step: {launches.host} ({launches.graphs} CUDA graph(s) "
                  f"holding {launches.in_graphs} thunks; {launches.custom_calls_outside} custom "
                  f"calls launched outside them)"
                  + (f"; {launches.loops} loops, uncounted" if launches.loops else ""))
        shutil.rmtree(dump_dir)  # the next backend's module alone
        os.makedirs(dump_dir)
        for kind, n in sorted(summary(kernels).items(), key=lambda kv: -kv[1]):
            print(f"  {n:4d}  {kind}")
        if backend not in ("adam", "reference"):
            print("  by scope: " + ", ".join(f"{s} {n}" for s, n in by_leaf(kernels).items()))
        if args.list:
            for k in launched:
                print(f"    {k.kind:34s} {k.scope[:48]:48s} {k.shape[:70]}")


if __name__ == "__main__":
    main()
