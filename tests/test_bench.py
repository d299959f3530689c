"""The benchmark tool runs end to end on CPU (its timings only mean something on a GPU)."""

import gzip
import json

import numpy as np
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
    """A training and a sampling case on the tiny model: times, samples/s, MFU and compile
    time are positive, and they format as a table row."""
    train = bench.bench_train(TINY, batch=2, width=64, num_steps=1)
    sample = bench.bench_sample(TINY, batch=1, width=64, num_iter=(1, 1, 1, 1), repeats=1)
    for row in (train, sample):
        assert row["seconds"] > 0 and row["compile_s"] > 0 and row["samples_per_s"] > 0
    assert 0 < train["mfu"] < 1
    train.update(name="train tiny", reference_seconds=1.0, speedup=1.0 / train["seconds"])
    assert bench._format_row(train).startswith("train tiny")


def test_kernel_table_sums_the_device_streams_per_run(tmp_path):
    """Kernels on a device's Stream threads are grouped by kind (library GEMMs as one, fusions
    without their numbers) and divided by the runs; the host and the XLA Ops line are left out."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_sort_index", "args": {"sort_index": 2}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]
    kernel = lambda pid, tid, name, dur: {
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "name": name,
        "dur": dur,
        "ts": 0,
    }
    events = meta + [
        kernel(2, 7, "loop_add_fusion_12", 3000.0),
        kernel(2, 7, "loop_add_fusion.3", 1000.0),
        kernel(2, 7, "nvjet_tst_128x64_64x4", 4000.0),
        kernel(2, 7, "void cutlass::Kernel2<cutlass_80_tensorop>", 2000.0),
        kernel(2, 8, "loop_add_fusion_12", 3000.0),
        kernel(1, 5, "PjitFunction(step)", 9000.0),
    ]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert bench.kernel_table(str(tmp_path), runs=2) == [
        ("library GEMM", 3.0, 1.0),
        ("loop_add_fusion", 2.0, 1.0),
    ]
    assert "loop_add_fusion" in bench.format_kernel_table(bench.kernel_table(str(tmp_path), runs=2))
