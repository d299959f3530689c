"""Speed of training and sampling against the PyTorch reference (DESIGN.md section 5).

    python -m fractalmidi_jax.bench                  # every case, one table
    python -m fractalmidi_jax.bench --only train     # cases whose name contains 'train'

Each case compiles once (compile time reported), runs warm-up steps, then reports the median
seconds per step over `--steps` timings of 20 steps dispatched back to back with one device
synchronisation (as in training, where the host waits only at logging steps); sampling times each
batch on its own. Inputs are realistic sparse rolls
(about 3% of cells sounding, notes of 1-16 steps). Memory is XLA's own account of the
compiled program (arguments + temporaries + outputs). Model FLOP utilisation counts the
matmul and attention FLOPs the budgets compute (fractal.train_flops_per_sample) against the
chip's dense bf16 peak.
"""

import collections
import gzip
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax import sampler as sampler_lib
from fractalmidi_jax import sharding, steps
from fractalmidi_jax.cli import Parser
from fractalmidi_jax.config import Config, set_xla_flags
from fractalmidi_jax.fractal import train_flops_per_sample
from fractalmidi_jax.generation import load_model
from fractalmidi_jax.head import Sampling

PEAK_BF16_FLOPS = 989e12  # H200 dense bf16, the vendor's figure
ALL_AR = ("ar", "ar", "ar", "ar")
# The FractalMIDI-faithful model (--faithful): all MAR levels over the per-cell velocity roll, each
# handing down the mean share of tokens it hides, uniformly.
FAITHFUL = dict(
    roll="velocity",
    generator_types=("mar", "mar", "mar", "mar"),
    border_context=False,
    skip_empty=0,
    token_budget=0.0,
    empty_budget=0.0,
)

# name: (kind, width, batch, precision, generator types, reference seconds per step or batch)
CASES = {
    "train 128x128 b16 fp32": ("train", 128, 16, "32", None, 0.083),
    "train 128x128 b16 bf16": ("train", 128, 16, "bf16", None, 0.106),
    "train 128x512 b4 bf16": ("train", 512, 4, "bf16", None, 0.118),
    "train 128x512 b16 fp32": ("train", 512, 16, "32", None, 0.165),
    "train 128x512 b16 bf16": ("train", 512, 16, "bf16", None, 0.149),
    "train 128x128 b64 bf16": ("train", 128, 64, "bf16", None, 0.133),
    "train 128x512 b64 bf16": ("train", 512, 64, "bf16", None, 0.382),
    "train all-AR 128x128 b16 bf16": ("train", 128, 16, "bf16", ALL_AR, 0.074),
    "sample 128x128 b4": ("sample", 128, 4, "bf16", None, 1.87),
    "sample 128x512 b4": ("sample", 512, 4, "bf16", None, 1.93),
    "sample 128x128 b16": ("sample", 128, 16, "bf16", None, 1.83),
    "sample 128x512 b16": ("sample", 512, 16, "bf16", None, 1.91),
    "sample 128x512 b64": ("sample", 512, 64, "bf16", None, 3.31),
}
BEST_BATCHES = (16, 32, 64, 128, 256)
REFERENCE_BEST = 168.0  # samples/s, 128x512 batch 64 bf16
TRAIN_BURST = 20  # training steps per timing, synchronised once (the trainer: every 50-100)
PROFILED_RUNS = 5  # steps (or sampled batches) in a --profile trace
HLO_FILE = "optimized_hlo.txt"  # the profiled program's optimised HLO, beside its trace


def realistic_rolls(batch: int, width: int, kind: str = "note", seed: int = 0) -> np.ndarray:
    """Sparse token rolls like POP909 crops: notes of 1-16 steps, ~3% of cells sounding."""
    rng = np.random.default_rng(seed)
    rolls = np.zeros((batch, 128, width), np.uint8)
    for b in range(batch):
        notes, cells = [], 0
        while cells < 0.03 * 128 * width:
            onset, length = rng.integers(0, width), rng.integers(1, 17)
            notes.append((onset, onset + length, rng.integers(36, 96), rng.integers(40, 110)))
            cells += length
        rolls[b] = roll_lib.crop_tokens(roll_lib.notes_to_roll(notes, width, kind), kind)
    return rolls


def _median_seconds(run, count: int, burst: int = 1) -> float:
    """Median over `count` repetitions of the seconds per call, with `burst` calls dispatched
    back to back and one device synchronisation at the end (the training loop never waits for
    a step, so the host prepares the next step while the device runs this one)."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        for _ in range(burst):
            out = run()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / burst)
    return statistics.median(times)


def _memory_gib(compiled) -> float:
    stats = compiled.memory_analysis()
    if stats is None:
        return float("nan")
    used = stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
    return (used - stats.alias_size_in_bytes) / 2**30


def _profile(run, profile_dir: str, compiled):
    """A Perfetto trace of 5 runs in `profile_dir` (none if empty) with `compiled`'s optimised HLO
    beside it (`optimized_hlo.txt`), and its tables (`print_profile`)."""
    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            _median_seconds(run, PROFILED_RUNS)
        Path(profile_dir, HLO_FILE).write_text(compiled.as_text())
        print_profile(profile_dir)


def print_profile(profile_dir: str):
    """The tables of a `--profile` folder (its trace and HLO; `--read_profile` prints them again
    from a folder brought back from the GPU): its kernels by kind, by level, by level and source
    line, and its longest kernels with the HLO instructions they run."""
    kernels = device_kernels(profile_dir)
    instructions = hlo_instructions(Path(profile_dir, HLO_FILE).read_text())
    print(format_kernel_table(kernel_table(kernels, PROFILED_RUNS)), flush=True)
    if kernels:
        busy, short, long = device_idle(kernels, PROFILED_RUNS)
        print(
            f"device per run: busy {busy:.2f} ms, idle {short:.2f} ms in gaps under "
            f"{HOST_WAIT_US / 1000:g} ms and {long:.2f} ms in longer ones (waiting on the host)",
            flush=True,
        )
    print(format_kernel_table(level_table(kernels, PROFILED_RUNS, instructions), "by level"), flush=True)
    print(
        format_kernel_table(source_table(kernels, PROFILED_RUNS, instructions), "by level and line", 30),
        flush=True,
    )
    longest = fusion_table(kernels, PROFILED_RUNS, instructions)
    if longest:
        print(format_fusion_table(longest), flush=True)


GEMM_PREFIXES = ("nvjet", "cutlass", "magma", "sm90_", "sm80_", "ampere_", "cublas")


def kernel_kind(name: str) -> str:
    """A kernel's group: library GEMMs (cuBLAS, CUTLASS, MAGMA) as one, XLA fusions by name
    without their numbering."""
    if name.removeprefix("void ").startswith(GEMM_PREFIXES):
        return "library GEMM"
    return re.sub(r"([._]\d+)+$", "", name)


class Kernel(NamedTuple):
    """A device kernel of a trace: its name, microseconds, the HLO instruction it runs where
    the trace names one (a library GEMM's kernel is named by the library, its instruction in
    `hlo_op`), else "", and when it started (microseconds)."""

    name: str
    microseconds: float
    hlo_op: str
    start: float


def device_kernels(profile_dir: str) -> list[Kernel]:
    """Every device kernel in the newest Perfetto trace under `profile_dir`: the events on device
    streams (their `Stream` threads; the `XLA Ops` line repeats them)."""
    traces = list(Path(profile_dir).glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not traces:
        raise FileNotFoundError(f"no plugins/profile/*/perfetto_trace.json.gz under {profile_dir}")
    trace = max(traces, key=os.path.getmtime)
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    names = {
        (e["pid"], e.get("tid")): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e["name"] in ("process_name", "thread_name")
    }
    devices = {pid for (pid, tid), name in names.items() if tid is None and "/device:" in name}
    return [
        Kernel(e["name"], e["dur"], e.get("args", {}).get("hlo_op", ""), e["ts"])
        for e in events
        if e.get("ph") == "X"
        and e["pid"] in devices
        and names.get((e["pid"], e["tid"]), "").startswith("Stream")
    ]


def _sum_kernels(kernels: list[Kernel], runs: int, key) -> list[tuple[str, float, float]]:
    """(key, ms per run, kernels per run) of a trace's device kernels grouped by `key(kernel)`,
    longest first."""
    time_ms, count = collections.Counter(), collections.Counter()
    for kernel in kernels:
        group = key(kernel)
        time_ms[group] += kernel.microseconds / 1000 / runs
        count[group] += 1 / runs
    return [(group, ms, count[group]) for group, ms in time_ms.most_common()]


HOST_WAIT_US = 1000.0  # an idle device gap this long is the device waiting on the host


def device_idle(kernels: list[Kernel], runs: int) -> tuple[float, float, float]:
    """(busy, idle in short gaps, idle in gaps of HOST_WAIT_US or more), ms per run, from the
    first kernel's start to the last one's end, the device's streams taken together. The profile
    synchronises every run, so its long gaps include the host's time before a step's first
    kernel; a step whose back-to-back time exceeds its busy time is waiting on the host."""
    busy = short = long = 0.0
    end = None
    for kernel in sorted(kernels, key=lambda kernel: kernel.start):
        finish = kernel.start + kernel.microseconds
        if end is not None and kernel.start < end:  # overlaps the work before it
            busy += max(0.0, finish - end)
        else:
            gap = 0.0 if end is None else kernel.start - end
            short, long = (short + gap, long) if gap < HOST_WAIT_US else (short, long + gap)
            busy += kernel.microseconds
        end = finish if end is None else max(end, finish)
    return busy / 1000 / runs, short / 1000 / runs, long / 1000 / runs


def kernel_table(kernels: list[Kernel], runs: int) -> list[tuple[str, float, float]]:
    """(kind, ms per run, kernels per run) of a trace's device kernels, longest first."""
    return _sum_kernels(kernels, runs, lambda kernel: kernel_kind(kernel.name))


def _hlo_name(name: str) -> str:
    """A kernel's name as the trace spells it: XLA's `loop_add_fusion.12` runs as `loop_add_fusion_12`."""
    return re.sub(r"[.\-]", "_", name)


def _hlo_table(hlo_text: str, title: str) -> dict[str, str]:
    """{id: entry} of one of the tables an HLO module's text opens with (`FileNames`, ...)."""
    block = hlo_text.partition(f"\n{title}\n")[2].partition("\n\n")[0]
    return dict(re.findall(r"^(\d+) (.*)$", block, re.M))


def _field(entry: str, name: str) -> str:
    return re.search(rf"\b{name}=(\d+)", entry)[1]


def _stack_frames(hlo_text: str) -> dict[str, str]:
    """{stack frame id: 'file.py:line function'} from an HLO module's FileNames, FunctionNames,
    FileLocations and StackFrames tables (an instruction names its innermost frame)."""
    names = lambda title: {i: n.strip('"') for i, n in _hlo_table(hlo_text, title).items()}
    files, functions = names("FileNames"), names("FunctionNames")
    locations = {
        i: f"{os.path.basename(files.get(_field(entry, 'file_name_id'), '?'))}:{_field(entry, 'line')} "
        f"{functions.get(_field(entry, 'function_name_id'), '?')}"
        for i, entry in _hlo_table(hlo_text, "FileLocations").items()
    }
    return {
        i: locations.get(_field(entry, "file_location_id"), "?")
        for i, entry in _hlo_table(hlo_text, "StackFrames").items()
    }


class Instruction(NamedTuple):
    """An instruction of an optimised HLO module: its result shape without layouts, its JAX op
    name (the named scopes it was traced under, then the op) and the source line it comes from."""

    shape: str
    op_name: str
    source: str

    def where(self) -> str:
        """The end of its op name and its source line."""
        return " ".join(w for w in (self.op_name.rsplit("/", 2)[-1], self.source) if w)


def hlo_instructions(hlo_text: str) -> dict[str, Instruction]:
    """{kernel name: Instruction} of every instruction in an HLO module's text."""
    frames = _stack_frames(hlo_text)
    found = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) (.*)$", hlo_text, re.M):
        name, shape, rest = match.groups()
        op = re.search(r'op_name="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        found[_hlo_name(name)] = Instruction(
            re.sub(r"\{[^}]*\}", "", shape), op[1] if op else "", frames.get(frame[1], "") if frame else ""
        )
    return found


def _instruction_of(kernel: Kernel, instructions: dict[str, Instruction]) -> Instruction | None:
    """The instruction a kernel runs: a fusion's kernel bears its name; a library kernel is named by
    its library and the trace's `hlo_op` names its instruction, unless the kernel ran inside a
    CUDA graph (then `hlo_op` names the graph: XLA_FLAGS=--xla_gpu_enable_command_buffer= runs
    without them)."""
    return instructions.get(_hlo_name(kernel.name)) or instructions.get(_hlo_name(kernel.hlo_op))


def fusion_table(kernels: list[Kernel], runs: int, instructions: dict[str, Instruction], top: int = 25):
    """(kernel, ms per run, kernels per run, shape, where from: the end of its op name and its
    source line) of the `top` longest kernels by exact name, each with the HLO instruction
    (`hlo_instructions`) it runs (kernels the trace ties to no instruction get empty fields)."""
    by_name = {kernel.name: kernel for kernel in kernels}
    rows = []
    for name, ms, n in _sum_kernels(kernels, runs, lambda kernel: kernel.name)[:top]:
        found = _instruction_of(by_name[name], instructions) or Instruction("", "", "")
        rows.append((name, ms, n, found.shape, found.where()))
    return rows


# The named scopes fractal_loss and the sampler trace each level and the cell head under.
LEVEL_SCOPE = re.compile(r"\b(level_\d+|head)\b")
OUTSIDE_LEVELS = "outside the levels (optimizer, inputs, loss)"
UNNAMED = "no HLO instruction named by the trace"


def part_of_model(instruction: Instruction | None) -> str:
    """The level (`level_k`) or `head` whose scope an instruction was traced under, the
    innermost where scopes nest (a sampler level calls the levels below)."""
    if instruction is None:
        return UNNAMED
    scopes = LEVEL_SCOPE.findall(instruction.op_name)
    return scopes[-1] if scopes else OUTSIDE_LEVELS


def level_table(
    kernels: list[Kernel], runs: int, instructions: dict[str, Instruction]
) -> list[tuple[str, float, float]]:
    """(level, ms per run, kernels per run) of a trace's device kernels, by the model part
    (`part_of_model`) of the instruction (`hlo_instructions`) each runs, longest first."""
    return _sum_kernels(kernels, runs, lambda kernel: part_of_model(_instruction_of(kernel, instructions)))


def source_table(
    kernels: list[Kernel], runs: int, instructions: dict[str, Instruction]
) -> list[tuple[str, float, float]]:
    """('level pass file:line function', ms per run, kernels per run): `level_table` with each level
    split by pass (the backward pass's ops carry `transpose(`) and by the source line of the
    instruction: which line of which level the time goes to."""

    def key(kernel: Kernel) -> str:
        instruction = _instruction_of(kernel, instructions)
        if instruction is None:
            return UNNAMED
        direction = "backward" if "transpose(" in instruction.op_name else "forward"
        return f"{part_of_model(instruction)} {direction} {instruction.source or '?'}"

    return _sum_kernels(kernels, runs, key)


def format_fusion_table(rows) -> str:
    lines = [f"{'longest kernels (per run)':40s} {'ms':>8s} {'count':>7s}  shape, from"]
    lines += [f"{name[:40]:40s} {ms:8.2f} {n:7.0f}  {shape} {where}" for name, ms, n, shape, where in rows]
    return "\n".join(lines)


def format_kernel_table(rows, grouped: str = "", top: int = 15) -> str:
    if not rows:
        return "no device kernels in the trace (a CPU run)"
    title = f"kernels {grouped} (per run)" if grouped else "kernels (per run)"
    width = max(40, min(80, max(len(kind) for kind, _, _ in rows[:top])))
    lines = [f"{title:{width}s} {'ms':>8s} {'count':>7s}"]
    lines += [f"{kind[:width]:{width}s} {ms:8.2f} {n:7.0f}" for kind, ms, n in rows[:top]]
    lines.append(
        f"{'all ' + str(len(rows)) + ' kinds':{width}s} {sum(r[1] for r in rows):8.2f} {sum(r[2] for r in rows):7.0f}"
    )
    return "\n".join(lines)


def bench_train(
    config: Config, batch: int, width: int, num_steps: int, profile_dir: str = "", steps_per_call: int = 1
) -> dict:
    """Per micro-step: with `steps_per_call` K, a call makes K updates and its time is divided by K."""
    config = config.replace(crop_length=width, train_batch_size=batch, max_crop_length=max(width, 512))
    mesh = sharding.make_mesh("1")
    graphdef, state = steps.init_state(config)
    state = steps.place_state(state, mesh)
    rolls = realistic_rolls(batch * steps_per_call, width, config.roll)
    if steps_per_call > 1:
        rolls = rolls.reshape(steps_per_call, batch, *rolls.shape[1:])
    train_batch = jax.device_put({"roll": rolls}, sharding.batch_sharding(mesh, stacked=steps_per_call > 1))
    key = jax.random.key(0)
    train_step = steps.make_train_step(graphdef, config, mesh, steps_per_call)
    start = time.perf_counter()
    compiled = train_step.lower(state, train_batch, key).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], train_batch, key)
        return metrics["loss"]

    for _ in range(3):
        run()
    seconds = _median_seconds(run, num_steps, TRAIN_BURST) / steps_per_call
    _profile(run, profile_dir, compiled)
    flops = train_flops_per_sample(config, width) * batch
    return {
        "compile_s": compile_s,
        "seconds": seconds,
        "samples_per_s": batch / seconds,
        "memory_gib": _memory_gib(compiled),
        "mfu": flops / seconds / PEAK_BF16_FLOPS,
    }


def bench_sample(
    config: Config,
    batch: int,
    width: int,
    num_iter: tuple[int, ...],
    repeats: int,
    profile_dir: str = "",
    params=None,
) -> dict:
    """`params`: trained weights of `config` (None: initial ones). A skip_empty model's speed
    depends on how many patches its weights say are empty, so time it trained."""
    if params is None:
        config = config.replace(max_crop_length=max(width, 512))
        params = steps.init_state(config)[1]["params"]
    run_sampler = sampler_lib.make_sampler(config, num_iter)
    cells, known = sampler_lib.unconditional_inputs(batch, width)
    sampling = Sampling.of(config, temperature=1.0, min_p=0.0)
    start = time.perf_counter()
    compiled = run_sampler.lower(params, cells, known, jax.random.key(0), sampling).compile()
    compile_s = time.perf_counter() - start
    key = jax.random.key(1)
    run = lambda: compiled(params, cells, known, key, sampling)[0]
    run()
    seconds = _median_seconds(run, repeats)
    _profile(run, profile_dir, compiled)
    return {
        "compile_s": compile_s,
        "seconds": seconds,
        "samples_per_s": batch / seconds,
        "memory_gib": _memory_gib(compiled),
    }


def run_cases(
    names,
    base: Config,
    num_steps: int,
    num_iter,
    profile_dir: str = "",
    trained=None,
    steps_per_call: int = 1,
) -> list[dict]:
    """`trained`: (config, params) of a checkpoint, which the sampling cases then time."""
    rows = []
    for i, name in enumerate(names):
        kind, width, batch, precision, generator_types, reference = CASES[name]
        config = base.replace(precision=precision, generator_types=generator_types or base.generator_types)
        profile = profile_dir if i == 0 else ""
        if kind == "train":
            result = bench_train(config, batch, width, num_steps, profile, steps_per_call)
        elif trained:
            result = bench_sample(
                trained[0], batch, width, num_iter, max(3, num_steps // 3), profile, trained[1]
            )
        else:
            result = bench_sample(config, batch, width, num_iter, max(3, num_steps // 3), profile)
        result.update(name=name, reference_seconds=reference, speedup=reference / result["seconds"])
        rows.append(result)
        print(_format_row(result), flush=True)
    return rows


def best_batch(base: Config, num_steps: int, batches, steps_per_call: int = 1) -> list[dict]:
    rows = []
    for batch in batches:
        try:
            result = bench_train(base.replace(precision="bf16"), batch, 512, num_steps, "", steps_per_call)
        except Exception as error:  # out of memory ends the search
            print(f"batch {batch}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            break
        result.update(
            name=f"best? train 128x512 b{batch} bf16",
            reference_seconds=batch / REFERENCE_BEST,
            speedup=result["samples_per_s"] / REFERENCE_BEST,
        )
        rows.append(result)
        print(_format_row(result), flush=True)
    return rows


# Config fields bench takes as flags of the same name and default, with their help.
CONFIG_FLAGS = {
    "skip_empty": "levels, from level 0, that skip empty patches (sparse.py; 0 = none)",
    "token_budget": "training: tokens handed down per sequence, of all (config.py; 0 = the mean mask ratio)",
    "empty_budget": "training: budget share kept for empty patches below the skipping levels (sparse.py)",
    "skip_empty_capacity": "sampling slots per pass, of the patches drawn (sparse.py); also for --checkpoint",
    "skip_empty_round_buckets": "level-0 round shapes compiled when skipping (mar.py); also for --checkpoint",
    "fused_attention": "attention in short_ and long_attention.py's Pallas kernels: gpu, always or never (XLA's)",
    "scan_layers": "level 0's blocks under lax.scan (see config.py)",
}
SAMPLING_FLAGS = ("skip_empty_capacity", "skip_empty_round_buckets")  # also applied to --checkpoint

HEADER = (
    f"{'case':34s} {'ours s':>9s} {'ref s':>7s} {'speedup':>8s} {'samples/s':>10s} "
    f"{'mem GiB':>8s} {'compile s':>9s} {'MFU':>6s}"
)


def _format_row(row: dict) -> str:
    mfu = f"{100 * row['mfu']:5.1f}%" if "mfu" in row else "     -"
    return (
        f"{row['name']:34s} {row['seconds']:9.4f} {row['reference_seconds']:7.3f} {row['speedup']:7.1f}x "
        f"{row['samples_per_s']:10.1f} {row['memory_gib']:8.2f} {row['compile_s']:9.1f} {mfu}"
    )


def main(argv=None):
    parser = Parser(description=__doc__)
    parser.add_argument(
        "--only", nargs="*", default=[], help="run the cases whose name contains any of these"
    )
    parser.add_argument("--dropout", type=float, default=0.1, help="attention and projection dropout")
    parser.add_argument(
        "--profile",
        default="",
        help="write a Perfetto trace of 5 steps (or sampled batches) of the first case here, with its "
        "optimised HLO, and print its device kernels grouped by kind, by level, and by level, pass and "
        "source line, and its longest ones with their HLO source lines",
    )
    parser.add_argument(
        "--read_profile",
        default="",
        help="print the tables of a --profile folder (brought back from the GPU) and run nothing",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per training case")
    parser.add_argument(
        "--steps_per_call",
        type=int,
        default=1,
        help="training micro-steps per dispatch, in a lax.scan (times are per micro-step)",
    )
    parser.add_argument("--num_iter_list", type=int, nargs="+", default=[12, 8, 4, 1])
    parser.add_argument("--best_batches", type=int, nargs="*", default=list(BEST_BATCHES))
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    parser.add_argument(
        "--faithful", action="store_true", help="the FractalMIDI-faithful model (all MAR, velocity roll)"
    )
    for name, text in CONFIG_FLAGS.items():
        default = getattr(Config, name)
        if isinstance(default, bool):
            parser.add_argument(f"--{name}", action="store_true", help=text)
        else:
            parser.add_argument(f"--{name}", type=type(default), default=default, help=text)
    parser.add_argument(
        "--checkpoint", default="", help="sampling cases time this checkpoint's model and weights"
    )
    args = parser.parse_args(argv)
    if args.steps_per_call < 1:
        parser.error("--steps_per_call must be at least 1")
    if args.read_profile:
        try:
            print_profile(args.read_profile)
        except FileNotFoundError as error:
            raise SystemExit(f"--read_profile: {error}; give a folder written by --profile") from None
        return
    sampling = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    base = Config(
        attn_dropout=args.dropout,
        proj_dropout=args.dropout,
        **{name: getattr(args, name) for name in CONFIG_FLAGS},
    )
    if args.faithful:
        base = base.replace(**FAITHFUL)
    names = [n for n in CASES if not args.only or any(text in n for text in args.only)]
    if all(CASES[name][0] == "train" for name in names):
        set_xla_flags()  # as train.py runs; they slowed the sampler (BENCHMARKS.md)
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    print(HEADER)
    trained = None
    if args.checkpoint:
        config, _, params, _ = load_model(args.checkpoint)
        trained = (config.replace(**sampling).validate(), params)
    rows = run_cases(
        names, base, args.steps, tuple(args.num_iter_list), args.profile, trained, args.steps_per_call
    )
    if args.best_batches:
        rows += best_batch(base, args.steps, args.best_batches, args.steps_per_call)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
