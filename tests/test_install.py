"""A plain install works: the wheel, built once and installed into a fresh venv, trains, generates
and evaluates through its console scripts and through the Python API, from a folder outside the
repository (so nothing is imported from the source tree).

The venv reuses this environment's installed dependencies through a .pth file (jax, flax, ... are
not downloaded again); only fractalmidi-jax itself comes from the wheel, installed --no-deps.
About a minute on two CPU cores, most of it the tiny model's compiles.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from tiny import write_song

pytestmark = pytest.mark.install
REPO = Path(__file__).resolve().parents[1]
TINY_YAML = """\
train_data: songs
val_data: songs
crop_length: 32
img_size_list: [128, 16, 4, 1]
embed_dim_list: [32, 16, 16, 8]
num_blocks_list: [1, 1, 1, 1]
num_heads_list: [2, 2, 2, 2]
attn_dropout: 0.0
proj_dropout: 0.0
devices: "1"
train_batch_size: 4
val_batch_size: 4
val_crops_per_file: 1
max_steps: 2
warmup_steps: 1
num_workers: 0
log_every_n_steps: 1
val_check_interval_steps: 2
checkpoint_every_n_steps: 2
log_images_every_n_steps: 2
num_iter_list: [2, 2, 2, 1]
output_dir: run
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(a work folder with songs/ and tiny.yaml, the environment whose PATH starts at the new venv)."""
    root = tmp_path_factory.mktemp("install")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", root / "dist", REPO], check=True)
    (wheel,) = (root / "dist").glob("fractalmidi_jax-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "dependencies.pth").write_text("\n".join(sorted(here)) + "\n")
    subprocess.run([*pip, "--python", python, "install", "--no-deps", wheel], check=True)
    work = root / "work"
    for k in range(3):
        write_song(work / "songs" / f"song_{k}.mid", seed=k)
    (work / "tiny.yaml").write_text(TINY_YAML)
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", JAX_PLATFORMS="cpu")
    env.update(JAX_COMPILATION_CACHE_DIR=str(root / "xla"), FRACTALMIDI_CACHE=str(root / "cache"))
    env.pop("PYTHONPATH", None)
    return work, env


def run(installed, *command) -> str:
    work, env = installed
    done = subprocess.run([str(c) for c in command], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"{command} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_console_scripts_train_generate_and_evaluate(installed):
    work, _ = installed
    out = run(installed, "fractalmidi-train", "--config", "tiny.yaml")
    assert "done: run" in out and (work / "run" / "checkpoints" / "latest").exists()
    out = run(
        installed,
        "fractalmidi-generate",
        "--checkpoint",
        "run/checkpoints/latest",
        "--num_samples",
        2,
        "--save_png",
        "--save_wav",
        "--output_dir",
        "generated",
    )
    report = json.loads((work / "generated" / "run_0" / "generation.json").read_text())
    assert [s["files"] for s in report["samples"]] == [
        [f"sample_{k:03d}.mid", f"sample_{k:03d}.png", f"sample_{k:03d}.wav"] for k in range(2)
    ]
    assert (work / "generated" / "run_0" / "index.html").is_file() and "audio:" in out
    out = run(
        installed,
        "fractalmidi-evaluate",
        "music",
        "--generated",
        "generated",
        "--reference",
        "songs",
        "--bootstrap",
        10,
    )
    assert "mean OA" in out
    assert "3 files" in run(installed, "fractalmidi-data", "check", "songs")
    for command in ("fractalmidi-bench", "fractalmidi-data"):
        assert "usage:" in run(installed, command, "--help")
    assert "--checkpoint" in run(installed, "python", "-m", "fractalmidi_jax.generation", "--help")


def test_python_api_from_the_wheel(installed):
    work, _ = installed
    code = (
        "import fractalmidi_jax\n"
        "model = fractalmidi_jax.load('run/checkpoints/latest')\n"
        "songs = model.generate(num_samples=2, target_width=32, seed=0, temperature=1.0, num_iter_list=(2, 2, 2, 1))\n"
        "songs[0].write('api.mid')\n"
        "print(fractalmidi_jax.__file__, len(songs))\n"
    )
    if not (work / "run" / "checkpoints" / "latest").exists():
        run(installed, "fractalmidi-train", "--config", "tiny.yaml")
    where, count = run(installed, "python", "-c", code).split()
    assert "site-packages" in where and str(REPO) not in where and count == "2"
    assert (work / "api.mid").stat().st_size > 0
