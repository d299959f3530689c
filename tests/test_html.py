"""index.html in a real headless browser (Debian's chromium): every roll's picture loads and every
clip's audio decodes. .ci/run installs chromium; elsewhere the test skips without it."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from fractalmidi_jax import html_index, midi, render
from fractalmidi_jax import roll as roll_lib

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def samples(out, count=2):
    """count samples as generate writes them (MIDI, PNG, WAV) and their report."""
    report = {
        "checkpoint": "tiny",
        "mode": "unconditional",
        "audio": "pretty_midi's own synthesiser",
        "samples": [],
    }
    for k in range(count):
        stem = out / f"sample_{k:03d}"
        roll = np.zeros((128, 64), np.uint8)
        roll[60 + k, 0:16] = 90
        midi.write_midi(stem.with_suffix(".mid"), roll_lib.roll_to_notes(roll, "velocity"))
        render.save_png(stem.with_suffix(".png"), roll)
        render.save_wav(stem.with_suffix(".wav"), stem.with_suffix(".mid"), sample_rate=8000)
        files = [f"sample_{k:03d}{s}" for s in (".mid", ".png", ".wav")]
        report["samples"].append({"index": k, "files": files, "notes": 1})
    return report


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_index_shows_every_roll_and_plays_its_audio(tmp_path):
    page = html_index.write_index(tmp_path, samples(tmp_path))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    command += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    command += [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom"]
    dom = subprocess.run(
        [*command, page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    figures = re.findall(r"<figure[^>]*>", dom)
    assert len(figures) == 2
    for k, figure in enumerate(figures):
        assert f'id="sample_{k:03d}"' in figure
        width, height = map(int, re.search(r'data-picture="(\d+)x(\d+)"', figure).groups())
        assert (width, height) == (render.NOTE_AXIS_PIXELS + 128, render.BAR_AXIS_PIXELS + 256)
        assert float(re.search(r'data-seconds="([\d.]+)"', figure).group(1)) >= 2.0  # 16 steps at 120 bpm
    assert "audio: pretty_midi" in dom and 'href="sample_001.mid"' in dom
