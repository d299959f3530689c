"""Data parallelism: one mesh over the chosen devices, the batch split on its `data` axis,
everything else replicated.

Multi-host: start one process per host (or per GPU) with JAX_COORDINATOR_ADDRESS (host:port
of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID set, or under SLURM or Open MPI, whose
variables jax.distributed reads itself. `maybe_initialize_distributed` then starts
jax.distributed before anything touches a device, and every process feeds its own slice of
the global batch.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fractalmidi_jax.config import parse_devices

DATA_AXIS = "data"
_SCHEDULER_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed() -> None:
    if jax.distributed.is_initialized():
        return
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: set all three on every process"
            )
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif any(name in os.environ for name in _SCHEDULER_VARIABLES):
        jax.distributed.initialize()


def make_mesh(devices_spec: str) -> Mesh:
    """'all' -> every device of every process; '2' or '0,1' -> those local devices (one process)."""
    chosen = parse_devices(devices_spec)
    if chosen is None:
        devices = jax.devices()
    else:
        local = jax.local_devices()
        if jax.process_count() > 1:
            raise ValueError("--devices must be 'all' when running on several processes")
        if max(chosen) >= len(local):
            raise ValueError(
                f"--devices {devices_spec}: only {len(local)} device(s) here ({local[0].platform})"
            )
        devices = [local[i] for i in chosen]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Splits every array of a batch (data.py) along its samples: the first axis, or the second
    of `stacked` micro-batches (micro-batch x sample x ...)."""
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS) if stacked else PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """This process's slice of the batch (numpy) -> global arrays sharded over `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
