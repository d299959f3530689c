"""The benchmark tool runs end to end on CPU (its timings only mean something on a GPU)."""

import gzip
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import TINY

from fractalmidi_jax import bench
from fractalmidi_jax import roll as roll_lib


def test_realistic_rolls_are_sparse_notes():
    rolls = bench.realistic_rolls(2, 128)
    assert rolls.shape == (2, 128, 128) and rolls.dtype == np.uint8
    sounding = (rolls > 0).mean(axis=(1, 2))
    assert np.all((sounding >= 0.025) & (sounding < 0.06)), sounding  # overlapping notes merge
    assert roll_lib.SUSTAIN in rolls and bench.realistic_rolls(1, 64, "velocity").max() < roll_lib.SUSTAIN


def test_train_and_sample_cases_report_a_row():
    """Training cases (one and two micro-steps per call) and a sampling case on the tiny model:
    times, samples/s, MFU and compile time are positive, and they format as a table row."""
    train = bench.bench_train(TINY, batch=2, width=64, num_steps=1)
    scanned = bench.bench_train(TINY, batch=2, width=64, num_steps=1, steps_per_call=2)
    sample = bench.bench_sample(TINY, batch=1, width=64, num_iter=(1, 1, 1, 1), repeats=1)
    for row in (train, scanned, sample):
        assert row["seconds"] > 0 and row["compile_s"] > 0 and row["samples_per_s"] > 0
    assert 0 < train["mfu"] < 1
    train.update(name="train tiny", reference_seconds=1.0, speedup=1.0 / train["seconds"])
    assert bench._format_row(train).startswith("train tiny")


def write_trace(folder, events):
    """A Perfetto trace of `events` on one host and one GPU (stream thread 7, XLA Ops line 8),
    where bench looks for it under `folder`."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_sort_index", "args": {"sort_index": 2}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]
    trace = folder / "plugins" / "profile" / "run"
    trace.mkdir(parents=True)
    with gzip.open(trace / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def kernel(pid, tid, name, dur, ts=0.0):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "dur": dur, "ts": ts}


def test_kernel_table_sums_the_device_streams_per_run(tmp_path):
    """Kernels on a device's Stream threads are grouped by kind (library GEMMs as one, fusions
    without their numbers) and divided by the runs; the host and the XLA Ops line are left out."""
    events = [
        kernel(2, 7, "loop_add_fusion_12", 3000.0),
        kernel(2, 7, "loop_add_fusion.3", 1000.0),
        kernel(2, 7, "nvjet_tst_128x64_64x4", 4000.0),
        kernel(2, 7, "void cutlass::Kernel2<cutlass_80_tensorop>", 2000.0),
        kernel(2, 8, "loop_add_fusion_12", 3000.0),
        kernel(1, 5, "PjitFunction(step)", 9000.0),
    ]
    write_trace(tmp_path, events)
    kernels = bench.device_kernels(str(tmp_path))
    assert bench.kernel_table(kernels, runs=2) == [
        ("library GEMM", 3.0, 1.0),
        ("loop_add_fusion", 2.0, 1.0),
    ]
    assert "loop_add_fusion" in bench.format_kernel_table(bench.kernel_table(kernels, runs=2))


def test_device_idle_splits_short_gaps_from_waits_on_the_host(tmp_path):
    """Busy time counts overlapping kernels (of several streams) once; gaps between kernels are idle,
    short ones apart from those of a millisecond or more (the device waiting on the host)."""
    events = [
        kernel(2, 7, "a", 100.0, ts=0.0),
        kernel(2, 7, "b", 100.0, ts=150.0),  # 50 us after a
        kernel(2, 7, "d", 200.0, ts=3250.0),  # 3 ms after b
        kernel(2, 7, "e", 150.0, ts=3300.0),  # inside d
        kernel(2, 8, "d", 200.0, ts=3250.0),  # the XLA Ops line repeats it: not counted
    ]
    write_trace(tmp_path, events)
    busy, short, long = bench.device_idle(bench.device_kernels(str(tmp_path)), runs=2)
    assert (busy, short, long) == (0.2, 0.025, 1.5)


def doubled_sine(x):
    return jnp.sin(x) * 2  # the line the fusion table must name


def test_fusion_table_names_each_kernels_hlo_instruction(tmp_path):
    """The longest kernels by exact name come with the instruction of the optimised HLO they
    run (XLA's `name.N` runs as `name_N`): its shape and the op and source line it comes from;
    a library GEMM, which is no instruction, gets empty fields."""
    hlo = jax.jit(doubled_sine).lower(jnp.ones((3, 5))).compile().as_text()
    (fusion,) = re.findall(r"%([\w.]*fusion[\w.]*) = ", hlo)
    kernel_name = fusion.replace(".", "_")
    write_trace(tmp_path, [kernel(2, 7, kernel_name, 3000.0), kernel(2, 7, "nvjet_tst_64x8", 1000.0)])
    rows = bench.fusion_table(bench.device_kernels(str(tmp_path)), 1, bench.hlo_instructions(hlo))
    line = doubled_sine.__code__.co_firstlineno + 1
    assert rows[0][:4] == (kernel_name, 3.0, 1.0, "f32[3,5]")
    assert f"test_bench.py:{line} doubled_sine" in rows[0][4]
    assert rows[1] == ("nvjet_tst_64x8", 1.0, 1.0, "", "")
    assert kernel_name in bench.format_fusion_table(rows)


def two_levels(x):
    with jax.named_scope("level_0"):
        x = jnp.sin(x @ x.T) * 2
    with jax.named_scope("head"):
        return jnp.cos(x @ x) * 3


def test_level_table_times_each_level_by_the_scope_its_instruction_was_traced_under(tmp_path):
    """Kernels go to the level (or head) whose named scope their HLO instruction carries, the
    innermost where scopes nest; a library kernel is found through the trace's `hlo_op`, a fusion
    by its name (inside a CUDA graph `hlo_op` names the graph); a kernel the trace ties to no
    instruction is counted apart."""
    hlo = jax.jit(two_levels).lower(jnp.ones((5, 5))).compile().as_text()
    instructions = bench.hlo_instructions(hlo)
    fusions = {bench.part_of_model(i): name for name, i in instructions.items() if "fusion" in name}
    (product,) = [name for name, i in instructions.items() if i.op_name.endswith("level_0/dot_general")]
    assert {"level_0", "head"} <= set(fusions)
    library_gemm = kernel(2, 7, "nvjet_tst_64x8", 500.0)
    library_gemm["args"] = {"hlo_op": product[::-1].replace("_", ".", 1)[::-1]}  # dot_general.2
    events = [
        kernel(2, 7, fusions["level_0"], 3000.0),
        kernel(2, 7, fusions["head"], 1000.0),
        library_gemm,
        kernel(2, 7, "nvjet_in_a_cuda_graph", 250.0),
    ]
    for event in events[:2] + events[3:]:  # kernels run in a CUDA graph: `hlo_op` names the graph
        event["args"] = {"hlo_op": "command_buffer_1"}
    write_trace(tmp_path, events)
    assert bench.level_table(bench.device_kernels(str(tmp_path)), 1, instructions) == [
        ("level_0", 3.5, 2.0),
        ("head", 1.0, 1.0),
        (bench.UNNAMED, 0.25, 1.0),
    ]
    nested = bench.Instruction("f32[2]", "jit(run)/level_0/while/body/level_1/head/mul", "")
    assert bench.part_of_model(nested) == "head"
    backward = bench.Instruction("f32[2]", "jit(step)/transpose(jvp(level_2))/dot_general", "")
    assert bench.part_of_model(backward) == "level_2"
    assert bench.part_of_model(bench.Instruction("f32[]", "jit(step)/adamw/add", "")) == bench.OUTSIDE_LEVELS


def test_source_table_splits_each_level_by_pass_and_line(tmp_path, capsys):
    """A level's kernels are split by pass (backward ops carry `transpose(`) and source line; a
    --profile folder's tables print again from its trace and HLO alone (--read_profile), and a
    folder without them is refused in one line."""
    loss = lambda x: jnp.sum(two_levels(x))
    hlo = jax.jit(jax.grad(loss)).lower(jnp.ones((5, 5))).compile().as_text()
    instructions = bench.hlo_instructions(hlo)

    def fusion_of(level: str, backward: bool) -> str:
        return next(
            name
            for name, i in instructions.items()
            if "fusion" in name
            and bench.part_of_model(i) == level
            and ("transpose(" in i.op_name) == backward
            and i.source
        )

    forward, backward = fusion_of("level_0", False), fusion_of("level_0", True)
    write_trace(tmp_path, [kernel(2, 7, forward, 2000.0), kernel(2, 7, backward, 1000.0)])
    rows = bench.source_table(bench.device_kernels(str(tmp_path)), 1, instructions)
    assert [row[1:] for row in rows] == [(2.0, 1.0), (1.0, 1.0)]
    assert rows[0][0] == f"level_0 forward {instructions[forward].source}"
    assert rows[1][0] == f"level_0 backward {instructions[backward].source}"
    assert "test_bench.py" in rows[0][0]

    (tmp_path / bench.HLO_FILE).write_text(hlo)
    bench.main(["--read_profile", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "by level and line" in printed and rows[0][0] in printed
    with pytest.raises(SystemExit, match="--read_profile: no plugins/profile.*written by --profile"):
        bench.main(["--read_profile", str(tmp_path / "missing")])
