"""Pictures and sound of piano rolls: PNG, animated GIF, TensorBoard images, WAV via FluidSynth.

Image layout (`roll_image`): row = pitch with pitch 0 at the bottom, column = step, on
black. Rolls wider than CHUNK_STEPS (256 steps = 16 bars of 4/4) are cut into chunks
stacked top to bottom, so a 128 x 512 roll is a 256 x 256 picture (times `scale`): long
pieces stay readable instead of becoming a thin strip. The last chunk is padded with
dark grey. The grey separator between chunks takes no rows of its own: it is drawn on
the top row (pitch 127, above the piano's range) of every chunk after the first, on
silent cells only, so a note there still shows through the line.

Colours: velocity like Logic Pro's piano roll (quiet = green, medium = yellow/orange,
loud = red); silence is black. Faint lines at every C (pitch % 12 == 0) and every bar line
are drawn on silent cells only, so they never hide a note. Bar lines are the steps the
caller gives (`bar_lines`: `midi.bar_lines` of the piece's meter, so a 3/4 piece has one every
12 steps), else every 16 steps from the start of the roll (4/4). PNG files (`save_png`) add
axes: note names at every C on the left and bar numbers above each chunk.

Audio (`save_wav`, `audio`): FluidSynth with a General MIDI sound font when both are
installed; otherwise pretty_midi's own synthesiser (sine tones, numpy only), so there is
always something to listen to. `audio_backend` says which one will play, and why.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fractalmidi_jax import midi

CHUNK_STEPS = 256  # steps per stacked chunk: 16 bars of 4/4
OCTAVE = 12
TILE_GAP = 4  # pixels between the tiles of grid_image

_GRID_RGB = (30, 30, 30)
_PAD_RGB = (48, 48, 48)
_SEPARATOR_RGB = (112, 112, 112)
_TILE_GAP_RGB = (80, 80, 80)

# (velocity, RGB) anchors, linearly interpolated: quiet notes stay visible on black
_VELOCITY_ANCHORS = (
    (1, (40, 130, 80)),
    (40, (70, 200, 60)),
    (72, (235, 220, 40)),
    (100, (250, 140, 30)),
    (127, (240, 30, 30)),
)


def _velocity_lut() -> np.ndarray:
    """uint8 [128, 3]: the colour of each velocity, black for 0."""
    velocities = np.array([v for v, _ in _VELOCITY_ANCHORS], float)
    colours = np.array([c for _, c in _VELOCITY_ANCHORS], float)
    steps = np.arange(128)
    lut = np.stack([np.interp(steps, velocities, colours[:, c]) for c in range(3)], axis=1)
    lut[0] = 0
    return np.rint(lut).astype(np.uint8)


VELOCITY_RGB = _velocity_lut()

_INSTALL_HINT = (
    "install FluidSynth and a General MIDI sound font: on Debian/Ubuntu "
    "`sudo apt install fluidsynth fluid-soundfont-gm`; on macOS `brew install fluid-synth`, "
    "then pass a .sf2 file with --soundfont or set FRACTALMIDI_SOUNDFONT"
)
SOUNDFONT_ENV = "FRACTALMIDI_SOUNDFONT"
SOUNDFONT_PATHS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
)


class AudioUnavailable(RuntimeError):
    """FluidSynth or a sound font is missing; the message says how to install them."""


def _velocities(roll) -> np.ndarray:
    """A 2-D roll as uint8 velocities 0..127 (rounded and clipped)."""
    cells = np.asarray(roll)
    if cells.ndim != 2 or cells.shape[0] == 0 or cells.shape[1] == 0:
        raise ValueError(f"expected a non-empty [pitches, steps] roll, got shape {cells.shape}")
    if cells.dtype != np.uint8:
        cells = np.clip(np.rint(cells.astype(np.float64)), 0, 127)
    return np.minimum(cells, 127).astype(np.uint8)


def _check_scale(scale: int) -> int:
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    return int(scale)


def _bar_lines(bar_lines, steps: int) -> np.ndarray:
    """The given bar lines inside [0, steps), or 4/4's from step 0 when none are given."""
    lines = midi.bar_lines((), steps) if bar_lines is None else np.asarray(bar_lines, np.int64)
    return lines[(lines >= 0) & (lines < steps)]


def roll_image(roll, scale: int = 2, bar_lines=None) -> np.ndarray:
    """uint8 [H, W, 3] picture of a [pitches, steps] velocity roll (layout in the module docstring);
    bar_lines: the steps where bars start (default: 4/4 from step 0).

    A P x W roll gives H = P * ceil(W / 256) and W' = min(W, 256), both times scale."""
    scale = _check_scale(scale)
    cells = _velocities(roll)
    pitches, steps = cells.shape
    sounding = cells > 0
    rgb = VELOCITY_RGB[cells]
    on_bar_line = np.zeros(steps, bool)
    on_bar_line[_bar_lines(bar_lines, steps)] = True
    on_grid = (np.arange(pitches)[:, None] % OCTAVE == 0) | on_bar_line[None, :]
    rgb[on_grid & ~sounding] = _GRID_RGB

    chunks = -(-steps // CHUNK_STEPS)
    width = min(steps, CHUNK_STEPS)
    padded_rgb = np.empty((pitches, chunks * width, 3), np.uint8)
    padded_rgb[:, :steps] = rgb
    padded_rgb[:, steps:] = _PAD_RGB
    padded_sounding = np.zeros((pitches, chunks * width), bool)
    padded_sounding[:, :steps] = sounding

    def stack(a: np.ndarray) -> np.ndarray:
        """[P, chunks * width, ...] -> [chunks * P, width, ...], pitch flipped, first chunk on top."""
        a = a[::-1].reshape(pitches, chunks, width, *a.shape[2:])
        return np.swapaxes(a, 0, 1).reshape(chunks * pitches, width, *a.shape[3:])

    image, image_sounding = stack(padded_rgb), stack(padded_sounding)
    separator = np.zeros(image.shape[:2], bool)
    separator[pitches::pitches] = True
    image[separator & ~image_sounding] = _SEPARATOR_RGB
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def grid_image(rolls, columns: int | None = None, scale: int = 1, bar_lines=None) -> np.ndarray:
    """uint8 [H, W, 3]: a [B, pitches, steps] batch of rolls tiled row by row, TILE_GAP pixels apart.

    One picture per batch because TensorBoard shows one image per tag. columns defaults to
    ceil(sqrt(B)); empty tiles of the last row are left in the gap colour. bar_lines: one
    roll_image bar_lines per roll (default: 4/4 for all)."""
    rolls = np.asarray(rolls)
    if rolls.ndim != 3 or rolls.shape[0] == 0:
        raise ValueError(f"expected a non-empty [batch, pitches, steps] array, got shape {rolls.shape}")
    count = rolls.shape[0]
    columns = math.ceil(math.sqrt(count)) if columns is None else int(columns)
    if columns < 1:
        raise ValueError(f"columns must be positive, got {columns}")
    columns = min(columns, count)
    rows = -(-count // columns)
    bar_lines = [None] * count if bar_lines is None else bar_lines
    tiles = [roll_image(roll, scale, lines) for roll, lines in zip(rolls, bar_lines, strict=True)]
    height, width = tiles[0].shape[:2]
    image = np.empty(
        (rows * height + (rows - 1) * TILE_GAP, columns * width + (columns - 1) * TILE_GAP, 3), np.uint8
    )
    image[:] = _TILE_GAP_RGB
    for i, tile in enumerate(tiles):
        top, left = (i // columns) * (height + TILE_GAP), (i % columns) * (width + TILE_GAP)
        image[top : top + height, left : left + width] = tile
    return image


NOTE_AXIS_PIXELS = 30  # the note-name margin on the left of a PNG
BAR_AXIS_PIXELS = 12  # the bar-number strip above each chunk of a PNG


def labelled_image(roll, scale: int = 2, bar_lines=None) -> Image.Image:
    """roll_image with axes a musician can read: C-1..C9 beside every C, and above each 256-step
    chunk the number of every bar starting in it (every 2nd or 4th when bars are narrow); bar
    lines as in roll_image, numbered from 1."""
    picture = roll_image(roll, scale, bar_lines)
    pitches, steps = _velocities(roll).shape
    lines = _bar_lines(bar_lines, steps)
    narrowest = int(np.diff(lines).min(initial=steps))
    chunk_rows, width = pitches * scale, picture.shape[1]
    chunks = picture.shape[0] // chunk_rows
    image = Image.new(
        "RGB", (NOTE_AXIS_PIXELS + width, chunks * (BAR_AXIS_PIXELS + chunk_rows)), (255, 255, 255)
    )
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    every = next(k for k in (1, 2, 4, 8, 16, 64) if k * narrowest * scale >= 18)
    for chunk in range(chunks):
        top = chunk * (BAR_AXIS_PIXELS + chunk_rows) + BAR_AXIS_PIXELS
        image.paste(
            Image.fromarray(picture[chunk * chunk_rows : (chunk + 1) * chunk_rows]), (NOTE_AXIS_PIXELS, top)
        )
        for pitch in range(0, pitches, OCTAVE):
            y = top + (pitches - 1 - pitch) * scale
            draw.text((2, y - 5), f"C{pitch // OCTAVE - 1}", fill=(0, 0, 0), font=font)
        first = chunk * CHUNK_STEPS
        for bar in np.flatnonzero((lines >= first) & (lines < first + CHUNK_STEPS)):
            if bar % every == 0:
                x = NOTE_AXIS_PIXELS + int(lines[bar] - first) * scale
                draw.text((x + 1, top - BAR_AXIS_PIXELS), str(bar + 1), fill=(0, 0, 0), font=font)
    return image


def save_png(path, roll, scale: int = 2, bar_lines=None) -> None:
    """Write labelled_image(roll, scale, bar_lines) as a PNG file."""
    labelled_image(roll, scale, bar_lines).save(path, format="PNG")


def save_gif(path, frames, duration_ms: int = 250, scale: int = 2, bar_lines=None) -> None:
    """Write a [F, pitches, steps] sequence of rolls (e.g. generation steps) as a looping animated GIF.

    Each frame shows duration_ms, the last one 4x longer so the finished roll can be read.
    Pillow merges identical consecutive frames into one (their durations summed), so the
    file can hold fewer than F frames but plays for the same time."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected a non-empty [frames, pitches, steps] array, got shape {frames.shape}")
    images = [Image.fromarray(roll_image(frame, scale, bar_lines)) for frame in frames]
    durations = [int(duration_ms)] * (len(images) - 1) + [4 * int(duration_ms)]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)


def find_soundfont(soundfont=None) -> Path | None:
    """The sound font to use: the argument, else $FRACTALMIDI_SOUNDFONT, else the first common path
    that exists; None if there is none. A path given explicitly must be a SoundFont file."""
    given = soundfont or os.environ.get(SOUNDFONT_ENV)
    if given:
        font = Path(given).expanduser()
        source = "the soundfont argument" if soundfont else SOUNDFONT_ENV
        if not font.is_file():
            raise AudioUnavailable(f"sound font {str(font)!r} (from {source}) is not a file; {_INSTALL_HINT}")
        with open(font, "rb") as f:
            header = f.read(12)
        if header[:4] != b"RIFF" or header[8:12] != b"sfbk":
            raise AudioUnavailable(f"{str(font)!r} (from {source}) is not a SoundFont (.sf2) file")
        return font
    return next((Path(p) for p in SOUNDFONT_PATHS if Path(p).is_file()), None)


def audio_backend(soundfont=None) -> tuple[Path | None, str]:
    """(the sound font FluidSynth will use, or None for pretty_midi's synthesiser; a sentence
    saying which synthesiser plays and, for the fallback, how to get a piano sound)."""
    font = find_soundfont(soundfont)  # a bad explicit font is an error, not a silent fallback
    if shutil.which("fluidsynth") is None:
        missing = "the fluidsynth command was not found"
    elif font is None:
        missing = f"no sound font was given, {SOUNDFONT_ENV} is unset and none of {', '.join(SOUNDFONT_PATHS)} exists"
    else:
        return font, f"FluidSynth with {font}"
    return None, f"pretty_midi's own synthesiser (sine tones): {missing}; for a piano sound {_INSTALL_HINT}"


def audio(midi_path, soundfont=None, sample_rate: int = 22050) -> tuple[np.ndarray, str]:
    """(mono float32 samples in [-1, 1] of a MIDI file, which synthesiser made them)."""
    font, backend = audio_backend(soundfont)
    if font is None:
        import pretty_midi

        samples = pretty_midi.PrettyMIDI(str(midi_path)).synthesize(fs=sample_rate)
        return (samples / max(1.0, float(np.abs(samples).max(initial=0.0)))).astype(np.float32), backend
    with tempfile.TemporaryDirectory() as folder:
        rendered = Path(folder) / "audio.wav"
        _fluidsynth_wav(rendered, midi_path, font, sample_rate)
        with wave.open(str(rendered)) as f:
            pcm = np.frombuffer(f.readframes(f.getnframes()), np.int16).reshape(-1, f.getnchannels())
    return (pcm.mean(axis=1) / 32768).astype(np.float32), backend


def save_wav(path, midi_path, soundfont=None, sample_rate: int = 44100) -> str:
    """Render a MIDI file to a 16-bit WAV file: FluidSynth when installed, else pretty_midi's
    synthesiser. Returns audio_backend's sentence; raises AudioUnavailable for a bad sound font."""
    font, backend = audio_backend(soundfont)
    if not Path(midi_path).is_file():
        raise FileNotFoundError(f"no MIDI file at {midi_path}")
    if font is not None:
        _fluidsynth_wav(path, midi_path, font, sample_rate)
        return backend
    samples, _ = audio(midi_path, None, sample_rate)
    Path(path).write_bytes(wav_bytes(samples, sample_rate))
    return backend


def wav_bytes(samples, sample_rate: int) -> bytes:
    """Mono float samples in [-1, 1] as the bytes of a 16-bit WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def _fluidsynth_wav(path, midi_path, font: Path, sample_rate: int) -> None:
    """FluidSynth renders midi_path to a WAV file; RuntimeError if it writes none."""
    fluidsynth = shutil.which("fluidsynth")
    # fluidsynth exits 0 even when it cannot read its inputs, so the output is checked instead
    out = Path(path)
    out.unlink(missing_ok=True)
    command = [fluidsynth, "-ni", "-F", str(out), "-T", "wav", "-r", str(int(sample_rate)), str(font)]
    result = subprocess.run([*command, str(midi_path)], capture_output=True, text=True, check=False)
    header = b""
    if out.is_file():
        with open(out, "rb") as f:
            header = f.read(4)
    if result.returncode != 0 or header != b"RIFF":
        details = (result.stderr or result.stdout).strip()[-500:]
        raise RuntimeError(f"fluidsynth exited {result.returncode} without writing a WAV to {out}: {details}")
