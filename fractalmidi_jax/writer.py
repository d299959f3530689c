"""TensorBoard logs under <output_dir>/logs/version_N/ (a new N per run, as Lightning does),
with the run's resolved config as hparams.yaml. Only process 0 writes."""

from pathlib import Path

import jax
import numpy as np

from fractalmidi_jax.config import Config, save_yaml


def next_numbered_dir(parent: Path, prefix: str) -> Path:
    """parent/<prefix>_N for the first N above every one taken (logs' version_N, generate's run_N)."""
    taken = [
        int(p.name.split("_")[-1]) for p in parent.glob(f"{prefix}_*") if p.name.split("_")[-1].isdigit()
    ]
    return parent / f"{prefix}_{max(taken, default=-1) + 1}"


class Writer:
    def __init__(self, output_dir: Path, config: Config):
        self.directory = None
        self.summary = None
        if jax.process_index() != 0:
            return
        from tensorboardX import SummaryWriter

        self.directory = next_numbered_dir(Path(output_dir) / "logs", "version")
        self.directory.mkdir(parents=True)
        save_yaml(config, self.directory / "hparams.yaml")
        self.summary = SummaryWriter(str(self.directory))

    def scalars(self, step: int, values: dict) -> None:
        if self.summary is not None:
            for name, value in values.items():
                self.summary.add_scalar(name, float(value), step)

    def image(self, step: int, name: str, image_HxWx3: np.ndarray) -> None:
        if self.summary is not None:
            self.summary.add_image(name, image_HxWx3, step, dataformats="HWC")

    def flush(self) -> None:
        if self.summary is not None:
            self.summary.flush()

    def close(self) -> None:
        if self.summary is not None:
            self.summary.close()
