"""Test settings, applied before JAX starts: eight fake CPU devices (so sharded code runs as on
an 8-GPU host) and a cheaper CPU backend optimisation level (tests compile many small programs;
the results are the same, only compile time drops)."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_backend_optimization_level=0",
        "--xla_cpu_use_fusion_emitters=false",
    ]
).strip()
