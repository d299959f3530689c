"""Tests of fractalmidi_jax.config: shipped YAML files, refusals that name the field, flags over YAML,
YAML round trips and device lists."""

import os
from pathlib import Path

import pytest

from fractalmidi_jax.config import Config, ConfigError, load_yaml, parse_devices, parse_flags, save_yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_configs_folder_is_not_empty():
    """The parametrised test below would pass vacuously without files."""
    assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    """Every YAML file under configs/ reads without unknown keys and passes validation."""
    config = load_yaml(path).validate()
    assert isinstance(config, Config)


def test_unknown_yaml_key_is_refused_with_the_valid_names(tmp_path):
    """A misspelt key is named, and the message lists the valid keys."""
    path = tmp_path / "bad.yaml"
    path.write_text("crop_length: 64\ncrop_lenght: 128\n")
    with pytest.raises(ConfigError) as error:
        load_yaml(path)
    message = str(error.value)
    assert "unknown config keys: crop_lenght" in message
    assert "valid keys:" in message and "crop_length" in message.split("valid keys:")[1]


def test_unknown_flag_is_refused_with_the_closest_name(capsys):
    """A misspelt flag exits with status 2, naming it and the flag it probably meant."""
    with pytest.raises(SystemExit) as exit_info:
        parse_flags(["--crop_lenght", "64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--crop_lenght: did you mean --crop_length?" in err


def test_unreadable_flag_value_names_the_field(capsys):
    """A value that is not of the field's type is refused with the field named."""
    with pytest.raises(SystemExit):
        parse_flags(["--crop_length", "long"])
    assert "crop_length: cannot read 'long' as int" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(embed_dim_list=(512, 256, 128)), "embed_dim_list has 3 entries"),
        (dict(num_blocks_list=(12, 3, 2, 1, 1)), "num_blocks_list has 5 entries"),
        (dict(img_size_list=(128, 16, 5, 1)), "img_size_list[2]=5"),
        (dict(img_size_list=(64, 16, 4, 1)), "img_size_list[0]"),
        (dict(num_heads_list=(8, 3, 2, 2)), "num_heads_list[1]=3"),
        (dict(generator_types=("mar", "gpt", "mar")), "generator_types[1]"),
        (dict(generator_types=("mar", "mar")), "generator_types has 2 entries"),
        (dict(scan_order="diagonal"), "scan_order"),
        (dict(crop_length=130), "crop_length=130"),
        (dict(precision="fp8"), "precision"),
        (dict(fused_attention="True"), "fused_attention is 'True'; use one of gpu, always, never"),
        (dict(num_iter_list=(12, 8, 4)), "num_iter_list"),
        (dict(devices="gpu"), "devices='gpu'"),
        (dict(temperature=0.0), "temperature=0.0 must be positive"),
        (dict(min_p=1.0), "min_p=1.0 must be in [0, 1)"),
    ],
)
def test_bad_value_is_refused_naming_the_field(changes, named):
    """validate() refuses each bad value with a message that names the offending field."""
    Config().validate()  # the base is valid: the change alone is refused
    with pytest.raises(ConfigError) as error:
        Config(**changes).validate()
    assert named in str(error.value)


def test_flags_override_yaml(tmp_path):
    """Flags win over the YAML file; YAML values without a flag survive; list and boolean flags parse."""
    path = tmp_path / "base.yaml"
    path.write_text(
        "crop_length: 128\ntrain_batch_size: 16\nprecision: '32'\nlr: 3.0e-4\n"
        "generator_types: [mar, mar, mar, mar]\nnum_iter_list: [2, 2, 2, 1]\n"
        "cache_in_memory: true\ngrad_checkpoint: false\n"
    )
    config = parse_flags(
        [
            "--config",
            str(path),
            "--crop_length",
            "512",
            "--train_batch_size",
            "4",
            "--precision",
            "bf16",
            "--generator_types",
            "mar,mar,ar,ar",
            "--num_iter_list",
            "12",
            "8",
            "4",
            "1",
            "--no_cache_in_memory",
            "--grad_checkpoint",
        ]
    )
    assert config.crop_length == 512 and config.train_batch_size == 4 and config.precision == "bf16"
    assert config.generator_types == ("mar", "mar", "ar", "ar")
    assert config.num_iter_list == (12, 8, 4, 1)
    assert config.cache_in_memory is False and config.grad_checkpoint is True
    assert config.lr == 3.0e-4


def test_yaml_round_trip(tmp_path):
    """save_yaml then load_yaml gives back an equal config (tuples, booleans, floats, strings)."""
    config = Config(
        crop_length=512,
        generator_types=("mar", "ar", "ar", "ar"),
        scan_order="column_major",
        num_iter_list=(16, 4, 2, 1),
        cache_in_memory=False,
        lr=2.5e-4,
        precision="bf16",
        devices="0,1",
    ).validate()
    path = tmp_path / "config.yaml"
    save_yaml(config, path)
    assert load_yaml(path) == config


@pytest.mark.parametrize("spec, devices", [("all", None), ("2", [0, 1]), ("0,1", [0, 1]), (" 1,3 ", [1, 3])])
def test_devices_parsing(spec, devices):
    """'all', a count and a list of indices follow Lightning's convention."""
    assert parse_devices(spec) == devices


@pytest.mark.parametrize("spec", ["gpu", "0", "-2", "1,x", ""])
def test_bad_devices_are_refused(spec):
    """Anything but 'all', a positive count or a list of indices is refused."""
    with pytest.raises(ValueError, match="devices="):
        parse_devices(spec)


def test_process_xla_flags_are_added_unless_given(monkeypatch):
    """Commands add their XLA flags to the user's, and a flag the user set keeps its value."""
    from fractalmidi_jax.config import PROCESS_XLA_FLAGS, set_xla_flags

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
    set_xla_flags()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_dump_to=/tmp/d"
    assert set(flags[1:]) == {f"--{name}={value}" for name, value in PROCESS_XLA_FLAGS.items()}
    set_xla_flags()
    assert os.environ["XLA_FLAGS"].split() == flags  # once only
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_graph_min_graph_size=5")
    set_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_graph_min_graph_size=5"


@pytest.mark.parametrize("choice, kernels", [("gpu", False), ("always", True), ("never", False)])
def test_fused_attention_names_where_the_kernels_run(choice, kernels):
    """The default runs the Pallas kernels on the GPU only: the tests' CPU gets XLA's attention
    unless a test asks for the kernels (interpreted) with "always"."""
    assert Config().fused_attention == "gpu"
    assert Config(fused_attention=choice).validate().attention_kernels() is kernels
