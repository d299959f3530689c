"""The TensorBoard writer: the HParams dashboard entry (every config field, val/loss as the metric)
and the config as text sit in the run's own event file, beside images and audio."""

import struct

import numpy as np

from fractalmidi_jax.config import Config
from fractalmidi_jax.writer import Writer


def events(log_dir):
    from tensorboardX.proto import event_pb2

    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):
            (length,) = struct.unpack_from("<Q", raw, pos)
            yield event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4


def test_hparams_text_image_and_audio(tmp_path):
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    config = Config(lr=3e-4, generator_types=("mar", "ar", "ar"))
    writer = Writer(tmp_path, config)
    writer.scalars(2, {"val/loss": 0.5})
    writer.image(2, "samples/generated", np.zeros((256, 64, 3), np.uint8))
    writer.audio(2, "samples/generated_0", np.sin(np.arange(1600) / 5).astype(np.float32), 16000)
    writer.close()
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["version_0"]
    values = {v.tag: v for e in events(tmp_path / "logs" / "version_0") for v in e.summary.value}
    plugin = lambda tag: HParamsPluginData.FromString(values[tag].metadata.plugin_data.content)
    experiment = plugin("_hparams_/experiment").experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/loss"]
    assert {h.name for h in experiment.hparam_infos} == set(config.to_dict())
    start = plugin("_hparams_/session_start_info").session_start_info.hparams
    assert start["lr"].number_value == 3e-4 and start["generator_types"].string_value == "mar,ar,ar"
    assert "_hparams_/session_end_info" in values
    text = values["config/text_summary"].tensor.string_val[0].decode()
    assert "lr: 0.0003" in text and "crop_length: 128" in text
    assert values["samples/generated_0"].audio.sample_rate == 16000
    assert values["samples/generated"].image.height == 256 and values["val/loss"].simple_value == 0.5
