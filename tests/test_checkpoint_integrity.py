"""Checkpoints that fail safe (checkpoint.py), on small states: checksums of every file checked on
restore, non-finite states never saved, a full disk reported with the last complete checkpoint
intact, unreadable meta.json refused, and unfinished saves cleared at the next start."""

import errno
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractalmidi_jax import checkpoint as ckpt


def small_state(step: int, value: float | None = None) -> dict:
    return {
        "params": {"w": jnp.full((64, 64), float(step if value is None else value))},
        "step": jnp.int32(step),
    }


def target() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), small_state(0))


def saved(directory, steps=(1, 2, 3)) -> list:
    manager = ckpt.CheckpointManager(directory, save_top_k=len(steps))
    for step in steps:
        manager.save(step, small_state(step), 1.0 / step, {"config": {}})
    manager.close()
    return ckpt.list_checkpoints(directory)


def largest_file(checkpoint):
    return max(
        (p for p in (checkpoint / ckpt.STATE).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )


def refusal(path) -> str:
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.restore(path, target())
    return str(error.value)


@pytest.mark.parametrize("fault", ["random bytes", "truncated", "missing"])
def test_damaged_checkpoint_is_refused_naming_the_file_and_the_newest_intact(tmp_path, fault):
    """4 KiB of random bytes written into an array file (or the file cut short, or gone) is refused
    on restore, naming the file and the newest intact checkpoint; intact ones still restore."""
    first, second, third = saved(tmp_path)
    damaged = largest_file(third)
    if fault == "random bytes":
        with open(damaged, "r+b") as f:
            f.seek(0)
            f.write(np.random.default_rng(0).bytes(4096))
    elif fault == "truncated":
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    else:
        damaged.unlink()
    message = refusal(third)
    assert f"checkpoint {third} is damaged: {damaged}" in message
    assert f"the newest intact checkpoint is {second}" in message
    np.testing.assert_array_equal(ckpt.restore(second, target())["params"]["w"], np.full((64, 64), 2.0))


def test_no_intact_checkpoint_left_is_said(tmp_path):
    """With no intact checkpoint beside a damaged one, the message says so."""
    (only,) = saved(tmp_path, steps=(1,))
    largest_file(only).write_bytes(b"")
    assert f"no intact checkpoint is left in {tmp_path}" in refusal(only)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"config": {}}'])
def test_garbage_or_empty_meta_json_is_refused(tmp_path, content):
    """meta.json that is empty, not JSON, or without a step is a CheckpointError, not a traceback;
    listing and pruning the folder still work."""
    first, second, third = saved(tmp_path)
    (third / ckpt.META).write_text(content)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [first.name, second.name, third.name]
    with pytest.raises(ckpt.CheckpointError, match=f"{third / ckpt.META}"):
        ckpt.read_meta(third)
    assert "is damaged" in refusal(third)
    (second / ckpt.META).write_text('{"step": 2}')
    with pytest.raises(ckpt.CheckpointError, match="holds no config"):
        ckpt.read_config(second)


def test_non_finite_state_is_never_saved(tmp_path):
    """A state with a NaN or inf anywhere is refused by save, which writes nothing; latest and best
    keep pointing to the last finite checkpoint."""
    saved(tmp_path, steps=(1,))
    manager = ckpt.CheckpointManager(tmp_path, save_top_k=3)
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(ckpt.NonFiniteState):
            manager.save(2, small_state(2, value=bad), 0.01, {"config": {}})
    manager.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step_")] == [
        "step_00000001-val_loss_1.0000"
    ]
    assert ckpt.resolve(tmp_path / "best").name == "step_00000001-val_loss_1.0000"
    assert ckpt.is_finite(small_state(3)) and not ckpt.is_finite({"a": jnp.array([1.0, jnp.nan])})


def test_full_disk_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    """A save that runs out of space raises one CheckpointError naming the folder and the free
    space; the partial save is removed and latest stays the last complete checkpoint."""
    (first,) = saved(tmp_path, steps=(1,))
    manager = ckpt.CheckpointManager(tmp_path, save_top_k=3)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "file_checksums", full)
    path = manager.save(2, small_state(2), 0.5, {"config": {}})
    with pytest.raises(ckpt.CheckpointError) as error:
        manager.finish()
    message = str(error.value)
    assert f"the disk is full writing {path}" in message and "MiB free" in message
    assert f"the last complete checkpoint {first} is intact" in message
    assert not path.exists()
    assert ckpt.resolve(tmp_path / "latest") == first.resolve()
    manager.close()


def test_unfinished_saves_are_removed_at_the_next_start(tmp_path):
    """Temporary folders that a kill left (orbax's *.orbax-checkpoint-tmp-*) are removed when the
    next manager opens the folder; complete checkpoints are untouched."""
    (first,) = saved(tmp_path, steps=(1,))
    orphans = [
        tmp_path / "step_00000002-val_loss_0.5000" / "state.orbax-checkpoint-tmp-1764580000",
        tmp_path / "step_00000003.orbax-checkpoint-tmp-1764580001",
    ]
    for orphan in orphans:
        (orphan / "d").mkdir(parents=True)
        (orphan / "d" / "x").write_bytes(b"partial")
    manager = ckpt.CheckpointManager(tmp_path, save_top_k=3)
    manager.close()
    assert sorted(manager.orphans_removed) == sorted(orphans)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best", first.name, "latest"])


def test_checksums_are_kept_in_meta_json(tmp_path):
    """meta.json lists every file of the committed state with its SHA-256."""
    (first,) = saved(tmp_path, steps=(1,))
    files = json.loads((first / ckpt.META).read_text())["files"]
    assert files and files == ckpt.file_checksums(first / ckpt.STATE)
