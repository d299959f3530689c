"""Checkpoints with orbax, laid out like the original's guide:

    <output_dir>/checkpoints/step_00005000-val_loss_0.0234/state/     (orbax, async)
                                                          meta.json  (step, val loss, config, checksums)
    <output_dir>/checkpoints/latest -> step_...    best -> step_...

Steps in names and in meta.json are optimizer steps; meta.json also keeps `micro_step`, the
micro-batches consumed (they differ with gradient accumulation). The validation loss in a name
was measured at that checkpoint's own step.

What makes a checkpoint safe to resume from:
- It counts once its meta.json exists: meta.json is written only after orbax has committed the
  state, so an interrupted save never becomes `latest`.
- A non-finite state (NaN or inf in the weights, EMA or optimizer moments) is never saved
  (`NonFiniteState`), so `latest` and `best` always restore to finite weights.
- meta.json keeps a SHA-256 of every file orbax wrote; `restore` checks them first and refuses a
  damaged checkpoint naming the file and the newest intact checkpoint beside it.
- A full disk stops the run naming the folder and the free space; the partial save is removed
  and the last complete checkpoint stays `latest`.
- Folders of saves a kill interrupted (`*.orbax-checkpoint-tmp-*`) are removed when the next
  run opens the folder.

The newest checkpoint and the best `save_top_k` by validation loss are kept; older ones are
deleted. Saving is asynchronous: `save` returns once the arrays are on the host, and the write
finishes while training goes on (it is completed at the next save or at `close`).

Why not orbax's CheckpointManager: it names step folders by the step alone (its NameFormat
builds a name from an int), so the guide's `step_XXXXXXXX-val_loss_Y.YYYY` names, and the
`latest` / `best` links, would need a second layer of our own anyway; it keeps no per-file
checksums. Its atomic commit (temporary folder, then rename) is what StandardCheckpointer
does here too.
"""

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fractalmidi_jax.output_dir import free_space, is_disk_full

META = "meta.json"
STATE = "state"
POINTERS = ("latest", "best")
TMP_MARK = ".orbax-checkpoint-tmp"
_NAME = re.compile(r"step_(\d+)(?:-val_loss_.*)?$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written; the message names it and the way out."""


class NonFiniteState(CheckpointError):
    """The state to save holds NaN or inf values."""


def checkpoint_name(step: int, val_loss: float | None) -> str:
    name = f"step_{step:08d}"
    return name if val_loss is None else f"{name}-val_loss_{val_loss:.4f}"


# Fields that checkpoints written before them lack, with the value those checkpoints hold (an
# old checkpoint's NLL is then estimated with the budget it trained with).
FIELDS_BEFORE_THEY_EXISTED = {
    "roll": "velocity",
    "border_context": False,
    "partial_known": False,
    "skip_empty": 0,
    "empty_budget": 0.0,
    "temperature": 1.0,
    "min_p": 0.0,
    "conditions": [],
}


def read_meta(path: Path) -> dict:
    path = Path(path) / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path} is unreadable ({type(error).__name__}): the checkpoint is damaged; resume from another one"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(
            f"{path} holds no checkpoint step: the checkpoint is damaged; resume from another one"
        )
    return meta


def read_config(path: Path) -> dict:
    """The config a checkpoint was trained with, as saved in its meta.json (completed with the
    values that checkpoints older than a model field hold)."""
    config = read_meta(path).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{Path(path) / META} holds no config: the checkpoint is damaged; use another one"
        )
    config = dict(FIELDS_BEFORE_THEY_EXISTED, **config)
    if isinstance(config.get("fused_attention"), bool):  # before it named where the kernels run
        del config["fused_attention"]  # how attention ran is not the model: today's default applies
    return config


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (with meta.json), oldest first by the step in their names."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if _NAME.match(p.name) and p.is_dir() and not p.is_symlink() and (p / META).is_file()
    ]
    return sorted(found, key=_step_of)


def _val_loss(path: Path) -> float | None:
    try:
        return read_meta(path).get("val_loss")
    except CheckpointError:
        return None


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from what a user may type: the folder itself, `<...>/checkpoints/latest`
    or `best` (links or plain names), a checkpoints folder or an output folder (its latest)."""
    path = Path(path).expanduser()
    candidates = [path]
    if path.name in POINTERS and not path.exists():
        found = list_checkpoints(path.parent)
        if path.name == "best":
            found = [p for p in found if _val_loss(p) is not None] or found
            found.sort(key=lambda p: _val_loss(p) or float("inf"), reverse=True)
        candidates = found[-1:]
    if path.is_dir() and not (path / META).is_file():
        inner = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        candidates = list_checkpoints(inner)[-1:]
    for candidate in candidates:
        if (candidate / META).is_file() and (candidate / STATE).is_dir():
            return candidate.resolve()
    near = path if path.is_dir() and path.name not in POINTERS else path.parent
    available = [
        p.name for p in list_checkpoints(near / "checkpoints" if (near / "checkpoints").is_dir() else near)
    ]
    hint = f" Available here: {', '.join(available)}." if available else ""
    raise CheckpointError(
        f"no checkpoint at {path}: expected a folder with {STATE}/ and {META} (a training run writes them "
        f"under <output_dir>/checkpoints/), or <output_dir>/checkpoints/latest or best.{hint}"
    )


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_checksums(state_dir: Path) -> dict[str, str]:
    """SHA-256 of every file under a committed state/ folder, by path relative to it."""
    return {str(p.relative_to(state_dir)): _sha256(p) for p in sorted(state_dir.rglob("*")) if p.is_file()}


def damage(path: Path) -> str:
    """'' if every file meta.json lists is there with its checksum, else what is wrong (one file)."""
    path = Path(path)
    try:
        files = read_meta(path).get("files")
    except CheckpointError as error:
        return str(error)
    if files is None:
        return ""  # saved before checksums were kept: nothing to check against
    for name, digest in files.items():
        file = path / STATE / name
        if not file.is_file():
            return f"{file} is missing"
        if _sha256(file) != digest:
            return f"{file} does not match the checksum it was saved with (changed or truncated since)"
    return ""


def _newest_intact(directory: Path, besides: Path) -> str:
    for candidate in reversed(list_checkpoints(directory)):
        if candidate.resolve() != besides.resolve() and not damage(candidate):
            return f"the newest intact checkpoint is {candidate}: resume or generate from it"
    return f"no intact checkpoint is left in {directory}"


def restore(path: Path, target):
    """The state saved at `path`, laid out as `target` (a tree of jax.ShapeDtypeStruct with
    shardings), after checking every file against its checksum."""
    path = Path(path)
    problem = damage(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; {_newest_intact(path.parent, path)}")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            return checkpointer.restore(path.absolute() / STATE, target)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model ({type(error).__name__}: {str(error)[:300]}); "
                "was it trained with another architecture?"
            ) from None
        except Exception as error:  # orbax and tensorstore raise many kinds for unreadable files
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error)[:200]}); "
                f"{_newest_intact(path.parent, path)}"
            ) from None


@jax.jit
def _all_finite(state) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def is_finite(state) -> bool:
    """True when every float array of the state is finite (one reduction; one bool to the host)."""
    return bool(jax.device_get(_all_finite(state)))


def remove_orphans(directory: Path) -> list[Path]:
    """Removes the temporary folders of saves that a kill interrupted; returns them."""
    orphans = [*directory.glob(f"*{TMP_MARK}*"), *directory.glob(f"step_*/*{TMP_MARK}*")]
    for orphan in orphans:
        shutil.rmtree(orphan, ignore_errors=True)
        parent = orphan.parent
        if parent != directory and not any(parent.iterdir()):
            parent.rmdir()
    return orphans


class CheckpointManager:
    def __init__(self, directory: Path, save_top_k: int):
        self.directory = Path(directory).absolute()  # orbax wants absolute paths
        self.save_top_k = save_top_k
        self.checkpointer = ocp.StandardCheckpointer()
        self.pending: tuple[Path, dict] | None = None
        self.is_primary = jax.process_index() == 0
        self.orphans_removed: list[Path] = []
        if self.is_primary:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.orphans_removed = remove_orphans(self.directory)

    def save(self, step: int, state, val_loss: float | None, meta: dict) -> Path:
        """Starts an asynchronous save; the previous one is completed first. Raises NonFiniteState
        (saving nothing) if the state holds NaN or inf."""
        self.finish()
        if not is_finite(state):
            raise NonFiniteState(f"the state at step {step} holds NaN or inf values; it was not saved")
        if val_loss is not None and not math.isfinite(val_loss):
            val_loss = None
        path = self.directory / checkpoint_name(step, val_loss)
        with self._disk_full_is_an_error(path):
            if path.exists() and self.is_primary:
                shutil.rmtree(path)
            self.checkpointer.save(path / STATE, state)
        self.pending = (
            path,
            dict(meta, step=step, val_loss=val_loss, saved_at=time.strftime("%Y-%m-%d %H:%M:%S")),
        )
        return path

    def finish(self) -> None:
        """Waits for the pending save, then publishes it (checksums, meta.json, latest/best) and prunes."""
        if self.pending is None:
            return
        path, meta = self.pending
        self.pending = None
        with self._disk_full_is_an_error(path):
            self.checkpointer.wait_until_finished()
            if not self.is_primary:
                return
            if not (path / STATE).is_dir():
                raise CheckpointError(f"saving {path} failed: orbax wrote no {STATE}/ there")
            meta["files"] = file_checksums(path / STATE)
            partial = path / f".{META}.partial"
            partial.write_text(json.dumps(meta, indent=1))
            os.replace(partial, path / META)
        self._prune_and_point()

    def close(self) -> None:
        self.finish()
        self.checkpointer.close()

    @contextlib.contextmanager
    def _disk_full_is_an_error(self, path: Path):
        """A full disk becomes a CheckpointError naming the folder and the free space; the partial
        save is removed, so the last complete checkpoint stays the latest."""
        try:
            yield
        except Exception as error:
            if not is_disk_full(error):
                raise
            if self.is_primary:
                shutil.rmtree(path, ignore_errors=True)
            kept = list_checkpoints(self.directory)
            last = (
                f"the last complete checkpoint {kept[-1]} is intact"
                if kept
                else "no checkpoint was completed"
            )
            raise CheckpointError(
                f"the disk is full writing {path} ({free_space(self.directory)}); {last}: free space, then resume"
            ) from None

    def _prune_and_point(self) -> None:
        found = list_checkpoints(self.directory)
        latest = found[-1]
        scored = [p for p in found if _val_loss(p) is not None]
        scored.sort(key=_val_loss)
        keep = set(scored[: self.save_top_k]) | {latest}
        for path in found:
            if path not in keep:
                shutil.rmtree(path)
        _point(self.directory / "latest", latest)
        _point(self.directory / "best", scored[0] if scored else latest)


def _point(link: Path, target: Path) -> None:
    """Atomically (re)points a relative symlink."""
    temporary = link.with_name(f".{link.name}.tmp")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    os.symlink(target.name, temporary)
    os.replace(temporary, link)
