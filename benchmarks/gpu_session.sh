#!/usr/bin/env bash
# Everything a lent GPU machine should run (the machine keeps nothing between calls):
#
#   bash benchmarks/gpu_session.sh [SECTION ...]
#   # default: env tests launchers sweep ncu step donated profile
#
# Sections: env, launchers, tests, compare, step, ncu, xla_step, graphs, donated, sweep,
# profile, meta. Each writes $OUT/<section>.log (OUT defaults to ./out) and runs under its
# own time limit, so one failure or hang does not cost the rest. The default list is about
# 11-13 minutes (estimated from session 15's section times), and a task's device time is
# 15 minutes in all, each machine start (30-60 s) and idle minute included, so run it as
# two calls. First decide, `env tests launchers sweep` (about 7 minutes): the kernels
# tested on the GPU, a one-step check of each Triton launcher (else jax-triton's legacy
# call for the rest), then the tile / precision / layer-1 / tile-order / reduction-tile
# sweeps, each with Adam and the copy / matmul ceilings timed in the same run, so each
# configuration's "x adam" and "% floor" are the issue's targets, Triton's last (the first
# to give up), and `pick_default.py`'s verdict on them ($OUT/pick.json; it needs no GPU,
# so run it here on the returned JSON if the call ran out first). Then, with that
# pick.json copied to benchmarks/pick.json (git-ignored: carry it with .whl), record:
# `ncu step donated` (about 5 minutes: the kernels' hardware counters, step.py with the
# state kept and donated at 1e7, 1e8 and 64 tasks, each backend's pick timed next to its
# default, `step.py --pick`; `pick_default.py --step` on those JSONs says whether the
# pick holds there: docs/KERNELS.md, "Where it stands"); `profile` (where the time goes)
# only if time is left. Left out:
# the diagnostic compare, xla_step (step.py's Triton rows through XLA's own Triton
# calls), graphs (host launches per step) and meta-training. jax-triton is not in the
# device image: carry its wheel in .whl/ (docs/KERNELS.md).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || echo "wheel install failed"
fi
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
SECTIONS=("$@")
# Call 1's pick (pick_default.py --json), which step.py then times next to the defaults.
PICK=${PICK:-benchmarks/pick.json}
PICK_ARGS=()
[ -f "$PICK" ] && PICK_ARGS=(--pick "$PICK")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(env tests launchers sweep ncu step donated profile)

run() {  # run SECONDS SECTION CMD...: time-limited, logged, never stops the script
  local limit=$1 name=$2
  shift 2
  echo "=== $name: $* (limit ${limit}s)" | tee -a "$OUT/$name.log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "=== $name: rc=${PIPESTATUS[0]} in $((SECONDS - t0))s" | tee -a "$OUT/$name.log"
}

for s in "${SECTIONS[@]}"; do
  case $s in
    env)
      run 60 env nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv
      run 60 env python3 -c "import jax, jaxlib, triton, jax_triton; print('jax', jax.__version__, \
'jaxlib', jaxlib.__version__, 'triton', triton.__version__, 'jax_triton', \
jax_triton.__version__); print(jax.devices())" ;;
    launchers)
      # How the Triton backend launches (all three right on an H200 since session 15): one
      # step per launcher against the reference; if the default (jax-triton through
      # jaxlib's FFI call) fails, every later section uses jax-triton's legacy call.
      run 150 launchers python3 benchmarks/launcher_check.py
      if ! grep -q "rc=0" <(tail -1 "$OUT/launchers.log"); then
        export LOPT_FAST_TRITON_LAUNCHER=jax_triton_legacy
        echo "=== launchers: default launcher failed; LOPT_FAST_TRITON_LAUNCHER=jax_triton_legacy from here" \
          | tee -a "$OUT/launchers.log"
      fi ;;
    graphs)
      # What the host launches per step, compiled for this GPU (compiled for an H100 on jax
      # 0.10.2: jax-triton 40 host launches for the 64-task convnet, launcher="xla" and
      # Pallas 1 CUDA graph).
      run 120 graphs python3 profiling/xla_kernels.py --local --workload conv:64 \
        --backend triton pallas
      run 90 graphs python3 profiling/xla_kernels.py --local --workload conv:64 \
        --backend triton --launcher xla ;;
    tests)
      # The kernels compiled for this GPU; the interpreted Triton tests are CI's (CPU) job.
      # Workers compile in parallel (compiling, not the GPU, is most of the time); without
      # preallocation each worker's JAX takes only the GPU memory it uses.
      run "${TESTS_LIMIT:-300}" tests env XLA_PYTHON_CLIENT_PREALLOCATE=false \
        python3 -m pytest -q -rs --tb=short --durations=10 -p no:cacheprovider \
        -n "${TESTS_WORKERS:-8}" -k "not interpreted" tests/test_pallas_step.py \
        tests/test_triton_step.py tests/test_backends.py ;;
    compare)
      # Each Pallas launcher compiled against itself interpreted: float32 dots, then
      # tf32_fp16 (the compiled ReLUs are inline assembly since session 18).
      run 120 compare python3 profiling/compare_pallas_kernels.py
      run 120 compare python3 profiling/compare_pallas_kernels.py --precision tf32_fp16 ;;
    ncu)
      # Hardware counters (Nsight Compute, --set full, clocks as found) of the moments and
      # apply kernels at 1e7 parameters: what the apply kernel waits on (warp stall
      # reasons), occupancy, DRAM / L2 traffic (profiling/ncu_step.py). One run per line of
      # NCU_RUNS; each writes its report, details page and raw metrics to $OUT/ncu_<n>.
      # A run that fails (no ncu, no counters) ends the section: the rest would too.
      # The second run is "dot_all" at the default TF32: against the first it shows what
      # the "dot" form's per-column tables cost in L2 traffic (docs/KERNEL-SESSIONS.md,
      # "Session 22": 128 B per element at 1x256, three times the tile's DRAM bytes). The third
      # walks the tiles down the column blocks (session 23, `blocks.TILE_ORDERS`): its L2
      # throughput against the first's says whether the SMs' L1 then serves the tables.
      # Triton's last, the first to go if the call runs out.
      n=0
      while IFS= read -r args; do
        n=$((n + 1))
        # shellcheck disable=SC2086
        run "${NCU_LIMIT:-150}" ncu python3 profiling/ncu_step.py --out "$OUT/ncu_$n" $args
        grep -q "rc=0" <(tail -1 "$OUT/ncu.log") || break
      done <<< "${NCU_RUNS:-"--backend pallas
--backend pallas --layer1 dot_all
--backend pallas --tile-order columns
--backend triton"}" ;;
    step)
      # The default sizes fit the limit (all of step.py's GPU defaults at 20 repeats took
      # over 200 s on an H100; 1e7 + 1e8 + 64 tasks at 10 repeats took 95 s there with the
      # reference, 34-48 s on an H200 without it: its >= 5x target was met in session 5).
      # shellcheck disable=SC2086
      # Each kernel backend at TF32 and "tf32_fp16" (session 17; rows "pallas tf32", ...),
      # against Adam and the ceilings of the same run: % of the floor for both.
      run "${STEP_LIMIT:-240}" step python3 benchmarks/step.py --json "$OUT/step.json" \
        "${PICK_ARGS[@]}" ${STEP_ARGS:---sizes 1e7 1e8 --tasks 64 --repeats 10 --backends pallas triton \
          --mlp-precision tf32 tf32_fp16} ;;
    xla_step)
      # step.py's Triton rows again with launcher="xla" (XLA's own Triton calls, inside CUDA
      # graphs): compare with step.log's triton rows and Adam in each run.
      # shellcheck disable=SC2086
      run "${STEP_LIMIT:-240}" xla_step env LOPT_FAST_TRITON_LAUNCHER=xla python3 benchmarks/step.py \
        --backends triton --json "$OUT/step_xla.json" ${XLA_STEP_ARGS:---sizes 1e7 1e8 --tasks 64 --repeats 10} ;;
    donated)
      # shellcheck disable=SC2086
      run "${STEP_LIMIT:-240}" donated python3 benchmarks/step.py --donate \
        --json "$OUT/step_donated.json" "${PICK_ARGS[@]}" \
        ${DONATED_ARGS:---sizes 1e7 1e8 --tasks 64 --repeats 10 --backends pallas triton} ;;
    sweep)
      # pallas first (the default backend on a GPU): 4 warps, layer 1 as "dot" (the
      # default) and "dot_all", TF32 and "tf32_fp16" (the H x H and output layers on fp16
      # operands, TF32's mantissa at twice its tensor rate), three apply tiles (the
      # reduction passes at the library's tile, 1x1024, in every row since session 21).
      # Compiled for sm_90 (docs/KERNEL-SESSIONS.md, "Session 22"), instructions per element of
      # the apply kernel (dot / dot_all): 1x256 (the default) 408 / 340 with TF32, 376 /
      # 320 with tf32_fp16 (12 warps per SM; dot_all tf32_fp16 16); 8x32 376 / 336 and
      # 344 / 320 (12, tf32_fp16 16 warps per SM), reading 5 floats of the per-row /
      # per-column tables per element where 1x256 reads 32 ("dot": tv [256, Hp] per
      # program, from L2; "dot_all" 1.25 where 8); 1x128 568 / 488 and 520 / 472 at
      # 20-24 warps per SM (a program's fixed work over half the elements). Which pays:
      # fewer instructions, fp16's tensor rate, less L2 traffic or more warps per SM?
      # bf16 (a precision cost for no fewer instructions than tf32_fp16) and early
      # weights are left out: 12 configurations, as before. Then the reduction passes'
      # tile alone: 1x2048 issues 23% fewer instructions per element in the moments pass
      # than 1x1024 (124 registers, 16 warps per SM, against 64 and 32).
      # shellcheck disable=SC2086
      run "${PALLAS_SWEEP_LIMIT:-240}" sweep python3 benchmarks/tile_sweep.py --backend pallas \
        --json "$OUT/sweep_pallas.json" ${PALLAS_SWEEP_ARGS:---tiles 1x256 8x32 1x128 --warps 4 \
          --layer1 dot dot_all --precision tf32 tf32_fp16 --early-weights off}
      # The order of the tiles (session 23): "columns" keeps each SM on one column block,
      # so the apply kernel's per-column operands (tv) come from its L1 instead of L2.
      # shellcheck disable=SC2086
      run "${ORDER_SWEEP_LIMIT:-90}" sweep python3 benchmarks/tile_sweep.py --backend pallas \
        --json "$OUT/sweep_order.json" ${ORDER_SWEEP_ARGS:---tiles 1x256 --warps 4 \
          --layer1 dot dot_all --tile-order rows columns}
      # shellcheck disable=SC2086
      run "${REDUCTION_SWEEP_LIMIT:-90}" sweep python3 benchmarks/tile_sweep.py --backend pallas \
        --json "$OUT/sweep_reduction.json" ${REDUCTION_SWEEP_ARGS:---tiles 1x256 --warps 4 \
          --reduction-tiles library 1x2048 2x1024}
      # triton: 12 configurations (tile x layer 1 x precision), + default + adam, at 1e7 and
      # 1e8; session 15 on an H200: bf16 operands 1.2-1.3x faster, the 4x64 tile and the
      # persistent kernel within noise (add `--persistent off on` to SWEEP_ARGS for it).
      # shellcheck disable=SC2086
      run "${SWEEP_LIMIT:-240}" sweep python3 benchmarks/tile_sweep.py \
        --json "$OUT/sweep_triton.json" ${SWEEP_ARGS:---tiles 1x256 4x64 --warps 4 \
          --layer1 dot dot_all --precision tf32 tf32_fp16 bf16 --persistent off --stages 2}
      # Each backend's pick by docs/KERNELS.md's rule (a win beyond the iqrs at every size,
      # bf16 excluded), from whichever sweeps finished: what to make the default.
      run 30 sweep python3 benchmarks/pick_default.py "$OUT"/sweep_*.json --json "$OUT/pick.json" ;;
    profile)
      # 1e7 parameters, and the meta-training shape (64 tasks x the convnet), where the
      # wall time against the device's busy time says whether launches dominate
      # (docs/KERNEL-SESSIONS.md, "Session 11").
      for b in ${PROFILE_BACKENDS:-pallas triton}; do
        run 90 profile python3 profiling/trace_step.py --backend "$b" --params 1e7 \
          --logdir "/tmp/trace_$b"
        run 90 profile python3 profiling/trace_step.py --backend "$b" --tasks 64 \
          --logdir "/tmp/trace_tasks_$b"
      done ;;
    meta)
      for b in ${META_BACKENDS:-auto reference}; do
        run 150 meta python3 -m lopt_fast.cli bench --task cifar10_conv --synthetic-data \
          --num-tasks 32 --trunc-length 10 --steps 50 --backend "$b"
      done ;;
    *) echo "unknown section $s (env launchers tests compare ncu step xla_step graphs donated sweep profile meta)" ;;
  esac
done
