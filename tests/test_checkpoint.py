"""Checkpoint layout, retention, pointers and path resolution (checkpoint.py), on small states."""

import gc
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractalmidi_jax import checkpoint as ckpt
from fractalmidi_jax.config import from_dict

VAL_LOSSES = {1: 0.5, 2: 0.3, 3: 0.4, 4: 0.2, 5: 0.6}  # step -> validation loss


def small_state(step: int) -> dict:
    return {"params": {"w": jnp.full((3, 2), float(step))}, "step": jnp.int32(step)}


def target() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), small_state(0))


def kept_steps(directory) -> list[int]:
    return [ckpt.read_meta(p)["step"] for p in ckpt.list_checkpoints(directory)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """<output>/checkpoints after five saves with VAL_LOSSES and save_top_k=2, plus the
    retention seen after each save was published."""
    directory = tmp_path_factory.mktemp("output") / "checkpoints"
    manager = ckpt.CheckpointManager(directory, save_top_k=2)
    history = {}
    for step, val_loss in VAL_LOSSES.items():
        manager.save(step, small_state(step), val_loss, {"config": {"seed": 0}})
        manager.finish()
        history[step] = kept_steps(directory)
    manager.close()
    return directory, history


def test_names_follow_the_guide():
    """step_<8 digits>-val_loss_<4 decimals>, or step_<8 digits> without a validation loss."""
    assert ckpt.checkpoint_name(5000, 0.0234) == "step_00005000-val_loss_0.0234"
    assert ckpt.checkpoint_name(5000, 0.02345678) == "step_00005000-val_loss_0.0235"
    assert ckpt.checkpoint_name(12, None) == "step_00000012"


def test_top_k_by_val_loss_plus_latest(checkpoints):
    """After every save the best save_top_k by validation loss and the newest are kept (older
    ones deleted); latest and best are relative links to them; meta.json holds step and loss."""
    directory, history = checkpoints
    assert history == {1: [1], 2: [1, 2], 3: [2, 3], 4: [2, 4], 5: [2, 4, 5]}
    assert sorted(p.name for p in directory.iterdir()) == [
        "best",
        "latest",
        "step_00000002-val_loss_0.3000",
        "step_00000004-val_loss_0.2000",
        "step_00000005-val_loss_0.6000",
    ]
    for link, name in (
        ("latest", "step_00000005-val_loss_0.6000"),
        ("best", "step_00000004-val_loss_0.2000"),
    ):
        assert (directory / link).is_symlink()
        assert str((directory / link).readlink()) == name
    meta = ckpt.read_meta(directory / "best")
    assert (meta["step"], meta["val_loss"], meta["config"]) == (4, 0.2, {"seed": 0})
    assert not list(directory.glob(".*tmp"))


def refusal(path, abstract) -> str:
    """The CheckpointError message of restoring `path` as `abstract` ("" if it restores)."""
    try:
        ckpt.restore(path, abstract)
    except ckpt.CheckpointError as error:
        return str(error)
    return ""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
def test_saved_state_restores(checkpoints):
    """A checkpoint restores the arrays it saved; a state of another shape is refused clearly."""
    directory, _ = checkpoints
    restored = ckpt.restore(ckpt.resolve(directory / "best"), target())
    np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 4.0))
    assert int(restored["step"]) == 4
    wrong = {"params": {"w": jax.ShapeDtypeStruct((5, 2), jnp.float32)}, "step": target()["step"]}
    assert "does not fit this model" in refusal(ckpt.resolve(directory / "best"), wrong)
    gc.collect()  # orbax's abandoned reads are finalised here, where their warnings are expected


def test_best_is_latest_without_validation(tmp_path):
    """Without validation losses only the newest checkpoint is kept, and best points to it."""
    manager = ckpt.CheckpointManager(tmp_path / "checkpoints", save_top_k=2)
    for step in (1, 2, 3):
        manager.save(step, small_state(step), None, {})
    manager.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "latest", "step_00000003"]
    assert ckpt.resolve(tmp_path / "checkpoints" / "best").name == "step_00000003"


@pytest.mark.parametrize("remove_links", [False, True])
def test_resolve_accepts_what_a_user_may_type(checkpoints, tmp_path, remove_links):
    """resolve() takes the checkpoint folder, .../latest, .../best, the checkpoints folder or
    the output folder, also when the links are gone (e.g. copied without them)."""
    source, _ = checkpoints
    directory = tmp_path / "output" / "checkpoints"
    shutil.copytree(source, directory, symlinks=True)
    if remove_links:
        for link in ("latest", "best"):
            (directory / link).unlink()
    newest = (directory / "step_00000005-val_loss_0.6000").resolve()
    best = (directory / "step_00000004-val_loss_0.2000").resolve()
    assert ckpt.resolve(directory / "latest") == newest
    assert ckpt.resolve(directory / "best") == best
    assert ckpt.resolve(directory) == newest
    assert ckpt.resolve(directory.parent) == newest
    assert ckpt.resolve(best) == best
    assert ckpt.resolve(str(directory / "step_00000002-val_loss_0.3000")).name.startswith("step_00000002")


def test_incomplete_checkpoint_is_ignored(checkpoints, tmp_path):
    """A newer folder without meta.json (an interrupted save) is never resolved nor listed, and
    pruning leaves it alone."""
    source, _ = checkpoints
    directory = tmp_path / "checkpoints"
    shutil.copytree(source, directory, symlinks=True)
    (directory / "latest").unlink()
    partial = directory / "step_00000009-val_loss_0.0100"
    (partial / "state").mkdir(parents=True)
    assert kept_steps(directory) == [2, 4, 5]
    assert ckpt.resolve(directory / "latest").name.startswith("step_00000005")
    assert ckpt.resolve(directory / "best").name.startswith("step_00000004")
    assert ckpt.resolve(directory).name.startswith("step_00000005")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at"):
        ckpt.resolve(partial)
    manager = ckpt.CheckpointManager(directory, save_top_k=1)
    manager.save(6, small_state(6), 0.9, {})
    manager.close()
    assert kept_steps(directory) == [4, 6]
    assert partial.is_dir()


def test_missing_checkpoint_message(tmp_path):
    """A path with no checkpoint gives a message naming it and what a checkpoint looks like."""
    for path in (tmp_path / "nowhere", tmp_path / "nowhere" / "checkpoints" / "latest", tmp_path):
        with pytest.raises(ckpt.CheckpointError) as error:
            ckpt.resolve(path)
        message = str(error.value)
        assert f"no checkpoint at {path}" in message
        assert "state/ and meta.json" in message and "<output_dir>/checkpoints/latest or best" in message


def test_meta_json_is_written_after_the_state(tmp_path):
    """A save becomes visible (meta.json, latest) only once it is finished."""
    manager = ckpt.CheckpointManager(tmp_path, save_top_k=1)
    path = manager.save(7, small_state(7), 0.1, {"note": "x"})
    assert not (path / ckpt.META).exists()
    assert ckpt.list_checkpoints(tmp_path) == [] and not (tmp_path / "latest").exists()
    manager.close()
    assert json.loads((path / ckpt.META).read_text())["note"] == "x"
    assert ckpt.resolve(tmp_path / "latest") == path.resolve()


def test_a_checkpoint_from_when_fused_attention_was_a_bool_takes_todays_default(tmp_path):
    """meta.json files written when fused_attention was true/false still load: how attention ran
    does not change the model, so the default applies."""
    for old in (True, False):
        (tmp_path / ckpt.META).write_text(json.dumps({"step": 1, "config": {"fused_attention": old}}))
        assert from_dict(ckpt.read_config(tmp_path)).validate().fused_attention == "gpu"
