"""profiling/trace_step.py: a trace of one reference step on CPU reads as named scopes, and
GPU kernel events (pallas_call names, jax-triton kernel functions) map to their launches.
profiling/xla_kernels.py: a compiled module's kernels and host launches.
profiling/ncu_step.py: its reading of ncu's raw page and its profiled workload.
profiling/triton_resources.py: the load round trips it reads off a kernel's SASS.
profiling/compare_pallas_kernels.py: its comparison, both sides interpreted."""

import importlib.util
import os
import subprocess
import sys

from tests.helpers import ROOT, needs_triton, run_python

SCRIPT = os.path.join(ROOT, "profiling", "trace_step.py")
XLA_KERNELS = os.path.join(ROOT, "profiling", "xla_kernels.py")


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _module():
    return _load(SCRIPT)


def _xla_kernels():
    return _load(XLA_KERNELS)


def test_kernel_events_map_to_their_launch():
    mod = _module()
    scopes = {"fusion.3": "adafac_leaf_0"}
    assert mod.scope_of("fusion.3", scopes) == "adafac_leaf_0"
    assert mod.scope_of("adafac_apply", scopes) == "adafac_apply"  # a named pallas_call
    assert mod.scope_of("_factored_apply_kernel", scopes) == "adafac_apply"  # jax-triton
    assert mod.scope_of("memcpy32_post", scopes) == "(other)"


def test_trace_of_a_reference_step_on_cpu(tmp_path):
    stdout = run_python([SCRIPT, "--params", "1e4", "--steps", "1", "--logdir", str(tmp_path)],
                        "trace_step.py", timeout=300)
    assert "adafac_leaf_" in stdout, stdout[-3000:]


def test_xla_kernels_reads_the_launch_sequence():
    """`entry_kernels` lists the compiled entry computation's kernels with their adafac
    scope, and tells zero-element copies apart (here from XLA's CPU compiler)."""
    import jax
    import jax.numpy as jnp

    mod = _xla_kernels()

    def f(x, empty):
        with jax.named_scope("adafac_fused_leaf_3"):
            s = jnp.sum(jnp.sin(x) * 2.0, axis=0)
        with jax.named_scope("adafac_fused_packed"):
            t = jnp.cos(x[:, :5]) + 1
        return s, t, x, empty  # x, empty: returned undonated, so XLA copies them

    text = jax.jit(f).lower(jnp.ones((64, 32)), jnp.ones((3, 0))).compile().as_text()
    kernels = mod.entry_kernels(text)
    copies = [k for k in kernels if k.kind == "copy"]
    assert sorted((k.shape.split("{")[0], k.empty) for k in copies) == [
        ("f32[3,0]", True), ("f32[64,32]", False)], copies
    scopes = mod.by_leaf(kernels)
    assert scopes.get("adafac_fused_leaf_3", 0) >= 1 and scopes.get("adafac_fused_packed") == 1, \
        kernels
    counts = mod.summary(kernels)
    assert counts["copy"] == 1 and counts["(zero-element, nothing to move)"] == 1, counts
    assert sum(counts.values()) == len(kernels)


def test_xla_kernels_reads_results_of_long_tuples():
    """XLA numbers the elements of a result tuple past 5 (`/*index=5*/`): a launch with
    such a result (a member kernel writing several tensors) is still a kernel."""
    f4 = "f32[4]{0}"
    result = f"({', '.join([f4] * 5)}, /*index=5*/{f4}, {f4})"
    text = (f"HloModule m\n\nENTRY %main (p: f32[4]) -> f32[4] {{\n"
            f"  %p = {f4} parameter(0)\n"
            f"  %call = {result} custom-call(%p), custom_call_target=\"__gpu$xla.gpu.triton\", "
            f'metadata={{op_name="jit(f)/adafac_fused_factored/adafac_apply"}}\n'
            f"  ROOT %gte = {f4} get-tuple-element(%call), index=6\n}}\n")
    (kernel,) = _xla_kernels().entry_kernels(text)
    assert kernel.kind == "custom-call:__gpu$xla.gpu.triton" and kernel.shape == result, kernel
    assert kernel.scope == "adafac_fused_factored/adafac_apply", kernel


def test_xla_kernels_compiles_for_an_h100_or_says_what_it_needs():
    """With the jax CUDA plugin installed the script compiles a Pallas step for an H100
    without one; without it (as in CI) it exits saying what to install."""
    if not _xla_kernels().cuda_plugin_installed():
        out = subprocess.run([sys.executable, XLA_KERNELS, "--backend", "adam"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "jax[cuda12]" in out.stderr, out.stderr[-2000:]
        return
    stdout = run_python([XLA_KERNELS, "--workload", "1e5", "--backend", "pallas", "adam"],
                        "xla_kernels.py", timeout=600)
    assert "custom-call:__gpu$xla.gpu.triton" in stdout and "adam:" in stdout, stdout


def test_trace_of_vmapped_tasks_reports_wall_time(tmp_path):
    """--tasks T traces T vmapped tasks x the small convnet and reports the step's wall
    time next to the per-kernel table."""
    stdout = run_python([SCRIPT, "--tasks", "2", "--steps", "1", "--logdir", str(tmp_path)],
                        "trace_step.py --tasks", timeout=300)
    assert "2 tasks x the small convnet" in stdout and "wall ms/step" in stdout, stdout[-3000:]
    assert "adafac_leaf_" in stdout, stdout[-3000:]


def test_xla_kernels_counts_host_launches():
    """Top-level thunks are host launches; indented ones run inside a command buffer."""
    sequence = """001: kCustomKernel  [source | next=002 (1)] loop_clamp_fusion grid: [1, 1, 1]
002: kCustomCall    [prev=001 (1) | next=000 (1)] kCustomCall
000: kCommandBuffer [prev=002 (1) | next=006 (1)]
    003: kCustomKernel [source | next=004 (1)] loop_reduce_fusion grid: [1, 1, 1]
    004: kCustomKernel [prev=003 (1) | sink] loop_multiply_fusion grid: [56, 1, 1]
    005: kCopy         [source | sink] kCopy
006: kCustomCall    [prev=000 (1) | sink] kCustomCall
"""
    launches = _xla_kernels().host_launches(sequence)
    assert launches == (4, 1, 3, 2, 0), launches


def test_xla_kernels_reads_the_step_module(tmp_path):
    """Of the modules XLA dumped (a GPU's autotuner compiles small ones too), the step is
    the one with the longest thunk sequence, read after XLA's thunk passes when it wrote
    that file."""
    for name, text in {"module_0007.jit_step.thunk_sequence.txt": "001: a\n" * 9,
                       "module_0007.jit_step.thunk_sequence_after_thunk_passes.txt": "000: b\n",
                       "module_0009.gemm.thunk_sequence.txt": "001: c\n"}.items():
        (tmp_path / name).write_text(text)
    chosen = _xla_kernels()._step_thunk_sequence(str(tmp_path))
    assert chosen.endswith("module_0007.jit_step.thunk_sequence_after_thunk_passes.txt"), chosen
    assert _xla_kernels()._step_thunk_sequence(str(tmp_path / "nothing")) is None


NCU_STEP = os.path.join(ROOT, "profiling", "ncu_step.py")


def test_ncu_step_reads_the_raw_page():
    """profiling/ncu_step.py: ncu's raw CSV (metric-name header, units row, a row per
    kernel) -> each kernel's headline metrics and its stall reasons, largest first."""
    mod = _load(NCU_STEP)
    stalled = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    header = ["ID", "Kernel Name", "gpu__time_duration.sum", stalled.format("barrier"),
              stalled.format("long_scoreboard"), stalled.format("wait")]
    text = "\n".join(",".join(f'"{x}"' for x in row) for row in [
        header, ["", "", "usecond", "", "", ""],
        ["0", "adafac_moments", "93.5", "0.5", "2.25", "1.5"],
        ["1", "adafac_apply", "1,690.2", "3.5", "7.75", "0.5"]])
    kernels = mod.parse_raw_csv(text)
    assert [k["Kernel Name"][0] for k in kernels] == ["adafac_moments", "adafac_apply"]
    assert kernels[1]["gpu__time_duration.sum"] == ("1,690.2", "usecond")
    summary = mod.summarize(kernels)
    apply = summary.split("== adafac_apply")[1]
    assert "1,690.2 usecond" in apply and "(sum 11.75)" in apply, summary
    order = [line.split()[0] for line in apply.splitlines() if line.startswith("    ")]
    assert order == ["long_scoreboard", "barrier", "wait"], summary


def test_ncu_step_reads_the_source_page():
    """profiling/ncu_step.py: ncu's SASS source page (per kernel a header and a row per
    instruction, a title line between kernels) -> each kernel's instructions with the most
    stall samples, and the samples by opcode (predicates dropped)."""
    mod = _load(NCU_STEP)
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)",
              "Warp Stall Sampling (Not-issued Samples)"]
    row = lambda *cells: ",".join(f'"{c}"' for c in cells)  # noqa: E731
    text = "\n".join([
        "adafac_moments (1, 1, 1)x(128, 1, 1)", row(*header),
        row("0x10", "LDG.E R2, desc[UR4][R2.64]", "10", "9"),
        row("0x20", "FADD R3, R2, R2", "30", "30"),
        "adafac_apply (1, 1, 1)x(128, 1, 1)", row(*header),
        row("0x10", "HGMMA.64x32x8.F32.TF32 R56, R72, gdesc[UR12], R56", "5", "1"),
        row("0x20", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "60", "60"),
        row("0x30", "@!P0 FMNMX R56, RZ, R56, !PT", "25", "20"),
        row("0x40", "FMNMX R57, RZ, R57, !PT", "1,010", "1,000")])
    tables = mod.parse_source_csv(text)
    assert [len(rows) for _, rows in tables] == [2, 4], tables
    report = mod.source_hotspots(*tables[1], top=2)
    lines = report.splitlines()
    assert "(All Samples): 1,100" in lines[0], report
    assert lines[1].split()[:2] == ["91.8%", "0x40"] and "DEPBAR" in lines[2], report
    assert "by opcode: FMNMX 94.1%, WARPGROUP 5.5%, HGMMA 0.5%" in report, report
    assert "no stall samples" in mod.source_hotspots(header, [["0x10", "NOP", "0", "0"]])


def test_ncu_step_profiled_workload_runs():
    """The process ncu_step.py runs under ncu (here: interpreted Pallas on CPU, a small
    tree, layer 1 and precision passed through)."""
    stdout = run_python([NCU_STEP, "--target", "--params", "200", "--warmup", "0",
                         "--layer1", "dot_all", "--precision", "ieee"], "ncu_step.py",
                        timeout=300)
    assert "finite: True" in stdout and "'layer1': 'dot_all'" in stdout, stdout[-2000:]


@needs_triton
def test_load_round_trips_reads_the_sass_order():
    """profiling/triton_resources.py's RT column: runs of global loads, each ended by the
    first instruction that reads what one of them loaded; stores read registers too, and
    loads after the first branch are not counted (the factored apply kernels' side
    copies)."""
    sys.path.insert(0, os.path.join(ROOT, "profiling"))
    from triton_resources import load_round_trips

    sass = "\n".join(f"        /*{16 * i:04x}*/                   {ins} ;" for i, ins in enumerate([
        "LDG.E.64 R14, desc[UR10][R14.64]",
        "LDG.E R20, desc[UR10][R4.64]",  # in flight with the first: one run
        "FADD R2, R3, R4",  # reads nothing loaded
        "STS [R161+UR6], R15",  # waits for the first run (R15: the 64-bit load's second word)
        "LDG.E R22, desc[UR10][R6.64]",  # a second run
        "HGMMA.64x32x8.F32.TF32 R56, R72, gdesc[UR12], R56",
        "@!P0 FMUL R5, R22, R20",  # waits for it
        "LDG.E.128 R40, desc[UR10][R8.64]",  # a third
        "STG.E desc[UR10][R8.64], R40",  # waits for it
        "LDG.E R24, desc[UR10][R12.64]",  # after a store: a fourth
        "STG.E desc[UR10][R12.64], R24",
        "@P0 BRA `(.L_x_0)",
        "LDG.E R30, desc[UR10][R10.64]",  # after the first branch: not counted
        "FADD R31, R30, R30",
    ]))
    assert load_round_trips(sass) == 4


@needs_triton
def test_warps_per_sm_allocates_registers_in_units():
    """Registers go to a warp in units of 256 (8 per thread), so 162-168 registers fit 3
    programs of 4 warps on an SM (65536 registers) and 169-176 only 2."""
    sys.path.insert(0, os.path.join(ROOT, "profiling"))
    from triton_resources import warps_per_sm

    assert [warps_per_sm(r, 4) for r in (128, 129, 162, 168, 169, 176)] == [16, 12, 12, 12, 8, 8]
    assert warps_per_sm(32, 4) == 64  # the cap
    assert warps_per_sm(255, 8) == 8  # 256 x 32 registers a warp: one program of 8


def test_compare_pallas_kernels_runs_its_comparison(monkeypatch, capsys):
    """profiling/compare_pallas_kernels.py, its compiled side interpreted too (this CPU has
    no GPU): each launcher's outputs compared, the 16-bit precisions' weights rounded as
    plan rounds them, and nothing differs when both sides run the same code."""
    compare = _load(os.path.join(ROOT, "profiling", "compare_pallas_kernels.py"))
    kernels = compare.PallasKernels
    monkeypatch.setattr(compare, "PallasKernels", lambda interpret, precision:
                        kernels(True, precision))
    monkeypatch.setattr(compare, "CASES", compare.CASES[2:3])  # two members, ragged tiles
    compare.main(["--precision", "tf32_fp16"])
    out = capsys.readouterr().out
    assert "tf32_fp16 dots" in out and out.rstrip().endswith("0 outputs differ"), out
    rows = [line for line in out.splitlines() if line.startswith("apply")]
    assert len(rows) == 2 * 2 * 5, rows  # (vmapped or not) x 2 members x (p, m, rms, 2 sides)
