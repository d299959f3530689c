"""TensorBoard logs under <output_dir>/logs/version_N/ (a new N per run, as Lightning does).
Only process 0 writes.

Besides scalars, images and audio, each run records its resolved config three ways: hparams.yaml
(for people and scripts), the HParams dashboard (every field, with val/loss as the metric, so runs
can be compared by their settings) and a text entry (the YAML, readable in TensorBoard's Text tab).
"""

from pathlib import Path

import jax
import numpy as np
import yaml

from fractalmidi_jax.config import Config, save_yaml

VAL_METRIC = "val/loss"  # the HParams dashboard's metric: the scalar the trainer logs after validation


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
        self._hparams(config)
        text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        self.summary.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)

    def _hparams(self, config: Config) -> None:
        """The HParams dashboard entry, in this run's own event file (add_hparams would open a
        second run for it); lists become strings, as HParams takes only scalars."""
        from tensorboardX.summary import hparams

        values = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in config.to_dict().items()}
        experiment, session_start, self._session_end = hparams(values, {VAL_METRIC: None})
        for summary in (experiment, session_start):
            self.summary.file_writer.add_summary(summary)

    def audio(self, step: int, name: str, samples: np.ndarray, sample_rate: int) -> None:
        """Mono float samples in [-1, 1], as WAV (tensorboardX's add_audio would need soundfile)."""
        if self.summary is not None:
            from tensorboardX.proto.summary_pb2 import Summary

            from fractalmidi_jax.render import wav_bytes

            clip = Summary.Audio(
                sample_rate=sample_rate,
                num_channels=1,
                length_frames=len(samples),
                encoded_audio_string=wav_bytes(samples, sample_rate),
                content_type="audio/wav",
            )
            self.summary.file_writer.add_summary(Summary(value=[Summary.Value(tag=name, audio=clip)]), step)

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
            self.summary.file_writer.add_summary(self._session_end)
            self.summary.close()
