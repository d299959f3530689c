"""One frozen config schema for training, sampling and evaluation.

Every field is a command-line flag of the same name (`--crop_length 512`); a YAML file
(`--config configs/x.yaml`) fills fields first, flags override it. Lists accept
`--generator_types mar,mar,ar,ar` or `--num_iter_list 12 8 4 1`. A boolean field `f` has
`--f` and `--no_f`. `validate()` refuses a bad config, naming the field and the fix,
before anything is compiled.
"""

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import math
import os
import textwrap
import tokenize
import typing
from pathlib import Path

import yaml

from fractalmidi_jax.cli import Parser
from fractalmidi_jax.roll import KINDS as ROLL_KINDS
from fractalmidi_jax.roll import NUM_PITCHES

GENERATOR_TYPES = ("mar", "ar", "column")
SCAN_ORDERS = ("row_major", "column_major")
PRECISIONS = ("32", "16", "bf16")
FUSED_ATTENTION = ("gpu", "always", "never")


@dataclasses.dataclass(frozen=True)
class Config:
    # --- data ---
    train_data: str = "bach"  # file list (.txt), folder of MIDI files, or "bach" (the built-in corpus)
    val_data: str = "bach"  # as train_data; "bach" takes the corpus' validation list
    crop_length: int = 128  # training crop width in sixteenth-note steps (a multiple of 4)
    crop_alignment: int = 0  # 0: crops start on bar lines, in each piece's meter; N: on multiples of N steps
    augment_factor: int = 1  # random crops per file per epoch
    pitch_shift_min: int = -3  # lowest random transposition, semitones
    pitch_shift_max: int = 3  # highest random transposition, semitones
    include_drums: bool = False  # merge drum tracks (MIDI channel 10) into the roll
    sustain_pedal: bool = False  # extend notes held by the sustain pedal (CC 64) to its release
    cache_dir: str = ""  # parsed-roll cache folder ("" = ~/.cache/fractalmidi_jax/rolls)
    cache_in_memory: bool = True  # keep parsed rolls in RAM (--no_cache_in_memory re-reads the disk cache)
    num_workers: int = 2  # background batch-building threads (0 = build batches in the main thread)
    val_crops_per_file: int = 4  # fixed validation crops taken from each validation file

    # --- model ---
    roll: str = "note"  # cells: note (silence, onset of velocity v, sustain) or velocity (the original's)
    img_size_list: tuple[int, ...] = (128, 16, 4, 1)  # canvas side per level; the last level is one cell
    embed_dim_list: tuple[int, ...] = (512, 256, 128, 64)  # transformer width per level
    num_blocks_list: tuple[int, ...] = (12, 3, 2, 1)  # transformer blocks per level
    num_heads_list: tuple[int, ...] = (8, 4, 2, 2)  # attention heads per level
    generator_types: tuple[str, ...] = ("mar", "column", "column", "column")  # per level: mar, ar, column
    scan_order: str = "row_major"  # AR order: row_major (pitch band by band) or column_major (bar by bar)
    mask_ratio_loc: float = 1.0  # MAR mask ratio ~ truncated normal(loc, scale) on [loc - 4 scale, loc]
    mask_ratio_scale: float = 0.5  # see mask_ratio_loc
    border_context: bool = True  # each patch below level 0 also sees the cells left of its border
    partial_known: bool = False  # partly known patches show their known cells (trained on prompts)
    skip_empty: int = 1  # levels, from level 0, that hand down only the non-empty child patches (sparse.py)
    skip_empty_budget: float = 0.35  # skip_empty, training: non-empty patches handed down, of all tokens
    skip_empty_capacity: float = 0.6  # skip_empty, sampling: slots per pass, of the patches drawn (sparse.py)
    empty_budget: float = 0.2  # training, levels that do not skip: slots kept for empty patches (0 = uniform)
    skip_empty_round_buckets: int = 1  # skip_empty, sampling: level-0 round shapes compiled (mar.py)
    conditions: tuple[str, ...] = ()  # per-bar level-0 conditions computed from the roll: chords, density
    condition_dropout: float = 0.1  # training: chance a sample loses all its conditions, and each alone
    token_budget: float = 0.375  # tokens passed down per sequence, as a fraction (0 = the mean mask ratio)
    attn_dropout: float = 0.1  # dropout on attention weights
    proj_dropout: float = 0.1  # dropout after attention and MLP projections
    max_crop_length: int = 512  # widest roll the level-0 time positions cover (steps)
    grad_checkpoint: bool = False  # rematerialise transformer blocks in the backward pass
    scan_layers: bool = False  # run level 0's blocks under lax.scan: compiles faster, steps slower
    fused_attention: str = "gpu"  # attention without a KV cache in Pallas kernels: gpu (there only), always (interpreted off it: slow), never
    precision: str = "32"  # compute dtype: 32, 16 (float16) or bf16; weights stay float32

    # --- optimisation ---
    train_batch_size: int = 16  # samples per device per step
    val_batch_size: int = 16  # samples per device per validation batch
    max_steps: int = 200000  # optimizer steps
    lr: float = 1e-4  # peak learning rate after warmup
    warmup_steps: int = 2000  # linear warmup from 0, then cosine decay to 0 at max_steps
    weight_decay: float = 0.05  # AdamW decay on dense kernels only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 3.0  # global gradient-norm clip (0 = off)
    accumulate_grad_batches: int = 1  # micro-batches summed into one optimizer step
    ema_decay: float = 0.999  # EMA of weights for validation and sampling (0 = off)
    seed: int = 0  # seeds initialisation, data order, masks and samples

    # --- hardware ---
    devices: str = "all"  # "all", a count ("2") or comma-separated device indices ("0,1")

    # --- logging and checkpoints ---
    output_dir: str = "outputs/fractalmidi"  # checkpoints/ and logs/ go here
    log_every_n_steps: int = 50  # training scalars to TensorBoard
    val_check_interval_steps: int = 2000  # validation loss
    num_val_batches: int = 0  # validation batches per check (0 = the whole fixed set)
    checkpoint_every_n_steps: int = 5000  # checkpoint period (also saved at the end and on SIGINT/SIGTERM)
    log_images_every_n_steps: int = 5000  # piano-roll images of samples and validation crops (0 = off)
    num_iter_list: tuple[int, ...] = (12, 8, 4, 1)  # MAR rounds per level for samples made during training
    temperature: float = 0.97  # the head's sampling temperature, generate.py's default (tuned on valid)
    min_p: float = 0.0  # generate.py's default min-p: tokens below min_p x the likeliest are never drawn
    save_top_k: int = 3  # checkpoints kept, best by validation loss (plus the latest)
    max_train_minutes: float = 0.0  # stop (saving a checkpoint) after this many minutes (0 = no limit)
    resume_from_checkpoint: str = ""  # checkpoint folder, or <output_dir>/checkpoints/latest|best
    overwrite: bool = False  # a fresh run into an output_dir with checkpoints deletes them (else refused)

    @property
    def num_levels(self) -> int:
        """Generator levels; the last entry of img_size_list is the velocity head."""
        return len(self.img_size_list) - 1

    def compute_dtype(self):
        import jax.numpy as jnp

        return {"32": jnp.float32, "16": jnp.float16, "bf16": jnp.bfloat16}[self.precision]

    def attention_kernels(self) -> bool:
        """Whether attention without a KV cache runs in short_ and long_attention.py's kernels here
        (they compute what XLA's attention does; off the GPU they run interpreted, far slower)."""
        import jax

        return self.fused_attention == "always" or (
            self.fused_attention == "gpu" and jax.default_backend() == "gpu"
        )

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: _to_yaml_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def validate(self) -> "Config":
        """Raises ConfigError naming the field and the fix."""
        errors = []
        n = len(self.img_size_list)
        for name in ("embed_dim_list", "num_blocks_list", "num_heads_list"):
            if len(getattr(self, name)) != n:
                errors.append(
                    f"{name} has {len(getattr(self, name))} entries but img_size_list has {n}: give one per level"
                )
        if len(self.generator_types) not in (n - 1, n):
            errors.append(
                f"generator_types has {len(self.generator_types)} entries; give {n - 1} (one per generator "
                f"level) or {n} (the last, for the velocity head, is then ignored)"
            )
        for i, g in enumerate(self.generator_types):
            if g not in GENERATOR_TYPES:
                errors.append(f"generator_types[{i}] is {g!r}; use one of {', '.join(GENERATOR_TYPES)}")
        if self.scan_order not in SCAN_ORDERS:
            errors.append(f"scan_order is {self.scan_order!r}; use one of {', '.join(SCAN_ORDERS)}")
        if self.roll not in ROLL_KINDS:
            errors.append(f"roll is {self.roll!r}; use one of {', '.join(ROLL_KINDS)}")
        if self.fused_attention not in FUSED_ATTENTION:
            errors.append(
                f"fused_attention is {self.fused_attention!r}; use one of {', '.join(FUSED_ATTENTION)}"
            )
        if self.precision not in PRECISIONS:
            errors.append(f"precision is {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if n < 2:
            errors.append("img_size_list needs at least two levels, e.g. [128, 16, 4, 1]")
        elif self.img_size_list[0] != NUM_PITCHES:
            errors.append(
                f"img_size_list[0] is {self.img_size_list[0]}; it must be {NUM_PITCHES} (the pitches)"
            )
        elif self.img_size_list[-1] != 1:
            errors.append(f"img_size_list ends with {self.img_size_list[-1]}; it must end with 1 (one cell)")
        else:
            for k in range(n - 1):
                big, small = self.img_size_list[k], self.img_size_list[k + 1]
                if small <= 0 or big % small or big == small:
                    errors.append(
                        f"img_size_list[{k + 1}]={small} must be smaller than and divide img_size_list[{k}]={big}"
                    )
        for k, (dim, heads) in enumerate(zip(self.embed_dim_list, self.num_heads_list)):
            if dim <= 0 or heads <= 0 or dim % heads:
                errors.append(f"num_heads_list[{k}]={heads} must divide embed_dim_list[{k}]={dim}")
        for k, blocks in enumerate(self.num_blocks_list):
            if blocks < 1:
                errors.append(f"num_blocks_list[{k}]={blocks}; every level needs at least one block")
        if len(self.img_size_list) > 1 and not errors:
            patch0 = self.img_size_list[1]
            if self.max_crop_length % patch0:
                errors.append(
                    f"max_crop_length={self.max_crop_length} must be a multiple of the level-0 patch ({patch0})"
                )
        if self.crop_length <= 0 or self.crop_length % 4:
            errors.append(f"crop_length={self.crop_length} must be a positive multiple of 4")
        elif self.crop_length > self.max_crop_length:
            errors.append(
                f"crop_length={self.crop_length} exceeds max_crop_length={self.max_crop_length}; "
                "raise max_crop_length (a new model) or crop shorter"
            )
        if self.pitch_shift_min > self.pitch_shift_max:
            errors.append("pitch_shift_min must not exceed pitch_shift_max")
        for name in ("pitch_shift_min", "pitch_shift_max"):
            if abs(getattr(self, name)) >= NUM_PITCHES:
                errors.append(
                    f"{name}={getattr(self, name)} shifts every note off the {NUM_PITCHES} pitches; "
                    f"use -{NUM_PITCHES - 1}..{NUM_PITCHES - 1} (a few semitones is usual)"
                )
        for name in [name for name, kind in _field_types().items() if kind is float]:
            if not math.isfinite(getattr(self, name)):
                errors.append(f"{name}={getattr(self, name)} must be a finite number")
        if not 0.0 < self.mask_ratio_loc <= 1.0:
            errors.append(
                f"mask_ratio_loc={self.mask_ratio_loc} must be in (0, 1]: it is a fraction of tokens"
            )
        errors += self._condition_errors()
        if self.seed < 0:
            errors.append(f"seed={self.seed} must not be negative")
        for name in ("skip_empty_budget", "skip_empty_capacity"):
            if not 0.0 < getattr(self, name) <= 1.0:
                errors.append(f"{name}={getattr(self, name)} must be in (0, 1]: it is a fraction of patches")
        if self.skip_empty_round_buckets < 1:
            errors.append(
                f"skip_empty_round_buckets={self.skip_empty_round_buckets} must be at least 1 "
                "(1: one level-0 round compiled; the number of rounds: exact sizes)"
            )
        if not 0 <= self.skip_empty < max(n - 1, 1):
            errors.append(
                f"skip_empty={self.skip_empty} must be in 0..{max(n - 2, 0)}: a level skips empty patches only "
                "above the last generator level (1 = bars, 2 = bars and 4 x 4s in the default sizes)"
            )
        if not 0.0 <= self.empty_budget < 1.0:
            errors.append(
                f"empty_budget={self.empty_budget} must be in [0, 1): a share of each budget (0 = one uniform budget)"
            )
        if not 0.0 <= self.token_budget <= 1.0:
            errors.append(f"token_budget={self.token_budget} must be in [0, 1] (0 = the mean mask ratio)")
        if self.mask_ratio_scale <= 0:
            errors.append("mask_ratio_scale must be positive")
        for name in ("attn_dropout", "proj_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                errors.append(f"{name} must be in [0, 1)")
        if self.temperature <= 0:
            errors.append(
                f"temperature={self.temperature} must be positive (1 = the model's own distribution)"
            )
        if not 0.0 <= self.min_p < 1.0:
            errors.append(f"min_p={self.min_p} must be in [0, 1) (0 = off)")
        if not 0.0 <= self.ema_decay < 1.0:
            errors.append("ema_decay must be in [0, 1) (0 turns the EMA off)")
        for name in (
            "augment_factor",
            "train_batch_size",
            "val_batch_size",
            "max_steps",
            "accumulate_grad_batches",
            "val_crops_per_file",
        ):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be at least 1")
        for name in (
            "crop_alignment",
            "warmup_steps",
            "num_workers",
            "log_every_n_steps",
            "val_check_interval_steps",
            "checkpoint_every_n_steps",
            "log_images_every_n_steps",
            "num_val_batches",
            "save_top_k",
        ):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must not be negative")
        if self.max_train_minutes < 0:
            errors.append("max_train_minutes must not be negative (0 = no limit)")
        if self.lr <= 0:
            errors.append("lr must be positive")
        if self.grad_clip < 0 or self.weight_decay < 0:
            errors.append("grad_clip and weight_decay must not be negative")
        if len(self.num_iter_list) != n or any(i < 1 for i in self.num_iter_list):
            errors.append(
                f"num_iter_list needs {n} positive entries (rounds per level), got {self.num_iter_list}"
            )
        try:
            parse_devices(self.devices)
        except ValueError as e:
            errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(f"invalid config: {errors[0]}")
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
        return self

    def _condition_errors(self) -> list[str]:
        errors = []
        if not 0.0 <= self.condition_dropout < 1.0:
            errors.append(f"condition_dropout={self.condition_dropout} must be in [0, 1)")
        if not self.conditions:
            return errors
        from fractalmidi_jax.conditions import BAR_STEPS, CONDITIONS  # JAX: only for a conditional model

        errors += [
            f"conditions: {name!r} is not a condition; use some of {', '.join(CONDITIONS)}"
            for name in self.conditions
            if name not in CONDITIONS
        ]
        if len(set(self.conditions)) != len(self.conditions):
            errors.append(f"conditions {','.join(self.conditions)} names one twice")
        if self.img_size_list[1:2] != (BAR_STEPS,):
            errors.append(
                f"conditions are per bar: they need img_size_list[1] = {BAR_STEPS} (a level-0 patch is a bar)"
            )
        if self.generator_types[:1] == ("ar",):
            errors.append(
                "conditions need a MAR level 0 (generator_types mar,...): an AR level 0 would see a bar's "
                "conditions only after predicting its first patch"
            )
        return errors


class ConfigError(ValueError):
    pass


def cache_root() -> Path:
    """Where parsed rolls and the built-in corpus are cached: $FRACTALMIDI_CACHE, or
    ~/.cache/fractalmidi_jax."""
    return Path(os.environ.get("FRACTALMIDI_CACHE") or Path.home() / ".cache" / "fractalmidi_jax")


# XLA flags the training command sets for its process (XLA reads XLA_FLAGS once, when JAX starts
# its backend), unless XLA_FLAGS already names them. CUDA graphs of any length: by default XLA
# launches runs of fewer than 5 kernels one by one from the host; with the Pallas attention
# kernels (which presumably split the graphs) a batch-16 step took 18-23 ms for 15.7 ms of GPU work,
# 17-18.5 ms with this. The sampler was slower with it, so generate.py does not set it (BENCHMARKS.md).
PROCESS_XLA_FLAGS = {"xla_gpu_graph_min_graph_size": "1"}


def set_xla_flags() -> None:
    """Adds PROCESS_XLA_FLAGS to XLA_FLAGS; train.py calls it before its first computation."""
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f"--{name}={value}" for name, value in PROCESS_XLA_FLAGS.items() if f"--{name}=" not in flags]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


def use_compilation_cache() -> None:
    """Keep compiled XLA programs under cache_root()/xla, so a second run with the same shapes
    (another generate.py call, a resumed training) skips its compiles. A cache folder already
    chosen (JAX_COMPILATION_CACHE_DIR, or a test's) is kept."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def parse_devices(spec: str) -> list[int] | None:
    """'all' -> None; '2' -> first two; '0,1' -> those indices (Lightning's convention)."""
    spec = str(spec).strip()
    if spec == "all":
        return None
    try:
        if "," in spec:
            indices = [int(s) for s in spec.split(",") if s.strip()]
            if len(set(indices)) != len(indices) or min(indices, default=-1) < 0:
                raise ValueError
            return indices
        count = int(spec)
    except ValueError:
        raise ValueError(
            f"devices={spec!r}; use 'all', a count like 2, or distinct indices like 0,1"
        ) from None
    if count < 1:
        raise ValueError(f"devices={spec!r}; a count must be at least 1")
    return list(range(count))


def mean_mask_ratio(loc: float, scale: float) -> float:
    """Mean of normal(loc, scale) truncated to [loc - 4 scale, loc]."""
    pdf = lambda z: math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    a, b = -4.0, 0.0
    return loc + scale * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))


def _to_yaml_value(value):
    return list(value) if isinstance(value, tuple) else value


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(name: str, kind, value):
    """Converts a YAML or flag value to the field's type, with a clear error."""
    origin = typing.get_origin(kind)
    try:
        if origin is tuple:
            (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
            if isinstance(value, str):
                value = [value]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                value = [v for text in value for v in text.replace(",", " ").split()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(_coerce(name, item, v) for v in value)
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {getattr(kind, '__name__', kind)}") from None


def from_dict(values: dict, base: Config | None = None) -> Config:
    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown config keys: {', '.join(unknown)}\nvalid keys: {', '.join(sorted(types))}"
        )
    coerced = {k: _coerce(k, types[k], v) for k, v in values.items()}
    return dataclasses.replace(base or Config(), **coerced)


def load_yaml(path: str | Path, base: Config | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must be a mapping of field: value")
    try:
        return from_dict(values, base)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_yaml(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


CHOICES = {
    "generator_types": GENERATOR_TYPES,
    "scan_order": SCAN_ORDERS,
    "precision": PRECISIONS,
    "roll": ROLL_KINDS,
}


@functools.cache
def field_help() -> dict[str, tuple[str, str]]:
    """{field: (section, comment)}, read once from Config's source: the one-line comment beside a
    field is both the schema's documentation and its flag's --help, and the `# --- data ---`
    lines above the fields name the help's groups. Comments rather than
    dataclasses.field(metadata=...), so the schema stays one readable line per field."""
    try:
        source = textwrap.dedent(inspect.getsource(Config))
    except (OSError, TypeError):  # no source (a frozen app): the flags still work, without help
        return {}
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    class_body = ast.parse(source).body[0].body
    fields = {n.lineno: n.target.id for n in class_body if isinstance(n, ast.AnnAssign)}
    section, result = "", {}
    for line in sorted(set(comments) | set(fields)):
        if line in fields:
            result[fields[line]] = (section, comments.get(line, ""))
        elif comments[line].startswith("---"):
            section = comments[line].strip("- ")
    return result


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, grouped by the schema's sections, its help the field's comment
    and its default; every flag defaults to 'not given' so YAML values survive."""
    parser.add_argument("--config", help="YAML file of config values; flags override it")
    groups, defaults, docs = {}, Config(), field_help()
    for name, kind in _field_types().items():
        section, comment = docs.get(name, ("", ""))
        if section not in groups:
            groups[section] = parser.add_argument_group(section or None)
        add = groups[section].add_argument
        default = getattr(defaults, name)
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        if kind is bool:
            shown = f"on; --no_{name} turns it off" if default else "off"
        help_text = f"{comment} (default: {shown})".lstrip() if shown != "" else comment
        choices = CHOICES.get(name)
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
        metavar = "{" + ",".join(choices) + "}" if choices else item.__name__.upper()
        if kind is bool:
            add(f"--{name}", dest=name, action="store_const", const=True, default=None, help=help_text)
            add(
                f"--no_{name}",
                dest=name,
                action="store_const",
                const=False,
                default=None,
                help=argparse.SUPPRESS,
            )
        elif typing.get_origin(kind) is tuple:
            add(f"--{name}", nargs="+", default=None, metavar=metavar, help=help_text)
        else:
            add(f"--{name}", default=None, choices=choices, metavar=metavar, help=help_text)


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    config = load_yaml(args.config, base) if getattr(args, "config", None) else (base or Config())
    flags = {name: getattr(args, name) for name in _field_types() if getattr(args, name, None) is not None}
    return from_dict(flags, config).validate()


def parse_flags(argv: list[str] | None = None, description: str = "") -> Config:
    parser = Parser(description=description, usage="%(prog)s [--config FILE.yaml] [--field value ...]")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
