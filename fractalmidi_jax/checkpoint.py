"""Checkpoints with orbax, laid out like the original's guide:

    <output_dir>/checkpoints/step_00005000-val_loss_0.0234/state/     (orbax, async)
                                                          meta.json  (step, val loss, config)

Steps in names and in meta.json are optimizer steps; meta.json also keeps `micro_step`, the
micro-batches consumed (they differ with gradient accumulation).
    <output_dir>/checkpoints/latest -> step_...    best -> step_...

A checkpoint counts once its meta.json exists: meta.json is written only after orbax has
committed the state, so an interrupted save never becomes `latest`. The newest checkpoint and
the best `save_top_k` by validation loss are kept; older ones are deleted. Saving is
asynchronous: `save` returns once the arrays are on the host, and the write finishes while
training goes on (it is completed at the next save or at `close`).
"""

import json
import os
import shutil
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

META = "meta.json"
STATE = "state"
POINTERS = ("latest", "best")


class CheckpointError(RuntimeError):
    pass


def checkpoint_name(step: int, val_loss: float | None) -> str:
    name = f"step_{step:08d}"
    return name if val_loss is None else f"{name}-val_loss_{val_loss:.4f}"


# Model fields that checkpoints written before them lack, with the value those checkpoints hold.
FIELDS_BEFORE_THEY_EXISTED = {"roll": "velocity", "border_context": False}


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())


def saved_config(meta: dict) -> dict:
    """The config a checkpoint was trained with, completed for checkpoints older than a field."""
    return dict(FIELDS_BEFORE_THEY_EXISTED, **meta["config"])


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (with meta.json), oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and not p.is_symlink() and (p / META).is_file()]
    return sorted(found, key=lambda p: read_meta(p)["step"])


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from what a user may type: the folder itself, `<...>/checkpoints/latest`
    or `best` (links or plain names), a checkpoints folder or an output folder (its latest)."""
    path = Path(path).expanduser()
    candidates = [path]
    if path.name in POINTERS and not path.exists():
        directory = path.parent
        found = list_checkpoints(directory)
        if path.name == "best":
            found = [p for p in found if read_meta(p).get("val_loss") is not None] or found
            found.sort(key=lambda p: read_meta(p).get("val_loss") or float("inf"), reverse=True)
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


def restore(path: Path, target):
    """The state saved at `path`, laid out as `target` (a tree of jax.ShapeDtypeStruct with shardings)."""
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            return checkpointer.restore(Path(path).absolute() / STATE, target)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model ({type(error).__name__}: {str(error)[:300]}); "
                "was it trained with another architecture?"
            ) from None


class CheckpointManager:
    def __init__(self, directory: Path, save_top_k: int):
        self.directory = Path(directory).absolute()  # orbax wants absolute paths
        self.save_top_k = save_top_k
        self.checkpointer = ocp.StandardCheckpointer()
        self.pending: tuple[Path, dict] | None = None
        self.is_primary = jax.process_index() == 0
        if self.is_primary:
            self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, state, val_loss: float | None, meta: dict) -> Path:
        """Starts an asynchronous save; the previous one is completed first."""
        self.finish()
        path = self.directory / checkpoint_name(step, val_loss)
        if path.exists() and self.is_primary:
            shutil.rmtree(path)
        self.checkpointer.save(path / STATE, state)
        self.pending = (
            path,
            dict(meta, step=step, val_loss=val_loss, saved_at=time.strftime("%Y-%m-%d %H:%M:%S")),
        )
        return path

    def finish(self) -> None:
        """Waits for the pending save, then publishes it (meta.json, latest/best) and prunes."""
        if self.pending is None:
            return
        self.checkpointer.wait_until_finished()
        path, meta = self.pending
        self.pending = None
        if not self.is_primary:
            return
        if not (path / STATE).is_dir():
            raise CheckpointError(f"saving {path} failed: orbax wrote no {STATE}/ there")
        (path / META).write_text(json.dumps(meta, indent=1))
        self._prune_and_point()

    def close(self) -> None:
        self.finish()
        self.checkpointer.close()

    def _prune_and_point(self) -> None:
        found = list_checkpoints(self.directory)
        latest = found[-1]
        scored = [p for p in found if read_meta(p).get("val_loss") is not None]
        scored.sort(key=lambda p: read_meta(p)["val_loss"])
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
