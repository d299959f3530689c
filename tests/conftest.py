"""Test settings, applied before JAX starts: eight fake CPU devices (so sharded code runs as on
an 8-GPU host) and a cheaper CPU backend optimisation level (tests compile many small programs;
the results are the same, only compile time drops)."""

import os

import pytest

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_backend_optimization_level=0",
        "--xla_cpu_use_fusion_emitters=false",
    ]
).strip()


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for a module (shared with the other training test modules of
    the session and with subprocesses), undone afterwards."""
    import jax  # here, not above: the settings above must come first
    from jax.experimental.compilation_cache import compilation_cache as cc

    directory = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    yield directory
    for name, value in previous.items():
        jax.config.update(name, value)
    cc.reset_cache()
