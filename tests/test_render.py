"""Tests of fractalmidi_jax.render: image layout and colours, PNG/GIF files with axes, WAV via
FluidSynth or pretty_midi's synthesiser."""

import shutil
import wave

import numpy as np
import pytest
from PIL import Image

from fractalmidi_jax import midi, render
from fractalmidi_jax.midi import write_midi
from fractalmidi_jax.render import AudioUnavailable, grid_image, roll_image, save_gif, save_png, save_wav


def empty(width):
    return np.zeros((128, width), np.uint8)


@pytest.mark.parametrize(
    "width, shape", [(128, (128, 128, 3)), (512, (256, 256, 3)), (300, (256, 256, 3)), (256, (128, 256, 3))]
)
def test_shapes(width, shape):
    image = roll_image(empty(width), scale=1)
    assert image.shape == shape and image.dtype == np.uint8
    assert roll_image(empty(width), scale=2).shape == (2 * shape[0], 2 * shape[1], 3)


def test_pitch_orientation_and_chunks():
    roll = empty(512)
    roll[0, 1:4] = 100  # first chunk, lowest pitch
    roll[127, 5:8] = 100  # first chunk, highest pitch
    roll[0, 301:304] = 100  # second chunk starts at step 256
    image = roll_image(roll, scale=1)
    note = tuple(render.VELOCITY_RGB[100])
    assert tuple(image[127, 2]) == note  # bottom row of the first chunk
    assert tuple(image[0, 6]) == note  # top row of the first chunk
    assert tuple(image[255, 302 - 256]) == note  # bottom row of the second chunk
    assert tuple(image[127, 302 - 256]) != note and tuple(image[0, 2]) != note


def test_separator_is_drawn_over_the_top_row_of_the_next_chunk():
    roll = empty(512)
    roll[127, 260:263] = 90  # a note under the separator shows through it
    roll[126, 0:256] = 50  # the first chunk's second row is untouched
    image = roll_image(roll, scale=1)
    assert image.shape == (256, 256, 3)
    assert tuple(image[128, 0]) == render._SEPARATOR_RGB
    assert tuple(image[128, 100]) == render._SEPARATOR_RGB
    assert tuple(image[128, 261 - 256]) == tuple(render.VELOCITY_RGB[90])
    assert (image[1] == render.VELOCITY_RGB[50]).all()
    assert tuple(image[0, 0]) != render._SEPARATOR_RGB  # no separator above the first chunk


def test_short_last_chunk_is_padded_dark_grey():
    image = roll_image(empty(300), scale=1)
    assert (image[129:, 300 - 256 :] == render._PAD_RGB).all()
    assert (image[129:, 1 : 300 - 256] != render._PAD_RGB).any(axis=-1).all()


def test_colours():
    roll = empty(64)
    roll[61, 1:5] = 20
    roll[62, 1:5] = 120
    image = roll_image(roll, scale=1)
    quiet, loud = image[127 - 61, 2].astype(int), image[127 - 62, 2].astype(int)
    assert quiet[1] > quiet[0] and loud[0] > loud[1] + 100  # green vs red
    silent = image[127 - 70, 2:15]  # between the C lines and bar lines
    assert silent.max() == 0
    grid = np.concatenate([image[127 - 60, 1:15], image[:, 16]])  # a C row and a bar column
    assert (grid == render._GRID_RGB).all() and max(render._GRID_RGB) < 40
    assert (
        len({tuple(c) for c in render.VELOCITY_RGB[1:]}) > 100
        and (render.VELOCITY_RGB[1:].max(axis=1) >= 120).all()
    )


def test_grid_lines_never_hide_notes():
    roll = empty(64)
    roll[60, 10:20] = 64  # a C, across the bar line at step 16
    image = roll_image(roll, scale=1)
    assert (image[127 - 60, 10:20] == render.VELOCITY_RGB[64]).all()


def test_grid_image():
    rolls = np.zeros((5, 128, 512), np.uint8)
    image = grid_image(rolls)  # 3 columns, 2 rows
    gap = render.TILE_GAP
    assert image.shape == (2 * 256 + gap, 3 * 256 + 2 * gap, 3) and image.dtype == np.uint8
    assert grid_image(rolls, columns=5, scale=2).shape == (512, 5 * 512 + 4 * gap, 3)
    assert grid_image(rolls[:1]).shape == (256, 256, 3)


def test_png_reads_back_with_axes(tmp_path):
    """The PNG is roll_image's chunks, each below a strip of bar numbers, right of note names."""
    roll = empty(300)
    roll[64, 10:20] = 80
    save_png(tmp_path / "roll.png", roll, scale=2)
    left, strip = render.NOTE_AXIS_PIXELS, render.BAR_AXIS_PIXELS
    with Image.open(tmp_path / "roll.png") as png:
        assert png.format == "PNG" and png.size == (left + 512, 2 * (strip + 256))
        pixels = np.asarray(png.convert("RGB"))
    picture = roll_image(roll, scale=2)
    assert (pixels[strip : strip + 256, left:] == picture[:256]).all()
    assert (pixels[2 * strip + 256 :, left:] == picture[256:]).all()
    assert (pixels[:, :left] < 128).any() and (pixels[:strip, left:] < 128).any()  # labels are drawn


def test_bar_lines_follow_the_meter():
    """The bar lines of 3/4 (midi.bar_lines) are drawn every 12 steps instead of 16."""
    columns = lambda image: {x for x in range(64) if (image[127 - 70, x] == render._GRID_RGB).all()}
    waltz = midi.bar_lines([(0, 3, 4)], 64)
    assert columns(roll_image(empty(64), scale=1, bar_lines=waltz)) == {0, 12, 24, 36, 48, 60}
    assert columns(roll_image(empty(64), scale=1)) == {0, 16, 32, 48}


def test_gif_frames(tmp_path):
    frames = np.zeros((5, 128, 128), np.uint8)
    for i in range(5):
        frames[i:, 60 + i, 8 * i : 8 * i + 6] = 30 + 20 * i  # each frame adds a note
    save_gif(tmp_path / "gen.gif", frames, duration_ms=100, scale=1)
    with Image.open(tmp_path / "gen.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (128, 128)
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
        assert (np.asarray(gif.convert("RGB")) == roll_image(frames[-1], scale=1)).all()
    assert durations == [100, 100, 100, 100, 400]


def test_save_wav_without_fluidsynth_uses_pretty_midi(tmp_path, monkeypatch):
    """Without FluidSynth the WAV comes from pretty_midi's synthesiser, and the returned sentence
    says so, with the install hint."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    write_midi(tmp_path / "in.mid", [[0, 8, 60, 100], [4, 12, 64, 80]])
    backend = save_wav(tmp_path / "out.wav", tmp_path / "in.mid", sample_rate=8000)
    assert backend.startswith("pretty_midi's own synthesiser") and "apt install fluidsynth" in backend
    with wave.open(str(tmp_path / "out.wav")) as wav:
        assert wav.getframerate() == 8000 and wav.getnframes() >= 8000  # 12 steps at 120 bpm = 1.5 s
        assert np.abs(np.frombuffer(wav.readframes(wav.getnframes()), np.int16)).max() > 1000


def test_without_soundfont_falls_back_but_a_bad_one_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/fluidsynth")
    monkeypatch.setattr(render, "SOUNDFONT_PATHS", (str(tmp_path / "missing.sf2"),))
    monkeypatch.delenv(render.SOUNDFONT_ENV, raising=False)
    font, backend = render.audio_backend()
    assert font is None and "no sound font was given" in backend and "fluid-soundfont-gm" in backend
    monkeypatch.setenv(render.SOUNDFONT_ENV, str(tmp_path / "missing.sf2"))
    with pytest.raises(AudioUnavailable, match="FRACTALMIDI_SOUNDFONT"):
        save_wav(tmp_path / "out.wav", tmp_path / "in.mid")


def test_save_wav_renders(tmp_path):
    if shutil.which("fluidsynth") is None:
        pytest.skip("fluidsynth is not installed")
    try:
        font = render.find_soundfont()
    except AudioUnavailable:
        font = None
    if font is None:
        pytest.skip("no General MIDI sound font found")
    write_midi(tmp_path / "in.mid", [[0, 8, 60, 100], [4, 12, 64, 80], [8, 16, 67, 60]])
    save_wav(tmp_path / "out.wav", tmp_path / "in.mid", soundfont=font, sample_rate=22050)
    with wave.open(str(tmp_path / "out.wav")) as wav:
        assert wav.getframerate() == 22050 and wav.getnframes() > 22050  # 16 steps at 120 bpm = 2 s
        samples = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    assert np.abs(samples).max() > 0
