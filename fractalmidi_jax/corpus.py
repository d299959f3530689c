"""The built-in default corpus: the Bach works that music21 carries offline, as MIDI files.

music21 ships 433 Bach works (chorales as .mxl/.xml, a few Humdrum .krn files and 20
Riemenschneider roman-numeral analyses as .rntxt). The analyses are chord labels, not music
(as MIDI they become block chords), so they are left out (`CHORD_ANALYSES`).
`prepare_bach_corpus` converts each remaining work once to a MIDI file under a cache folder, in a pool of worker processes (music21
takes about 0.2 s a file), and skips the works music21 cannot convert. It then writes
train.txt and valid.txt (relative paths, one a line; a work goes to valid when a hash
of its file name says so, about 1 in 10, so the split never changes) and a marker file.

Interruption is safe: each MIDI file is written under a temporary name and renamed
when complete, and the marker is written last. A later call skips the files already
converted and finishes the job; once the marker is there, a call returns at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

from fractalmidi_jax import progress
from fractalmidi_jax.config import cache_root

MARKER = "DONE.json"
_VERSION = 2  # bump when the conversion or the split changes
CHORD_ANALYSES = (".rntxt",)  # roman-numeral analyses: chord labels, not a score


def default_root() -> Path:
    """$FRACTALMIDI_CACHE/bach_chorales, or ~/.cache/fractalmidi_jax/bach_chorales."""
    return cache_root() / "bach_chorales"


def prepare_bach_corpus(
    root: Path | None = None, workers: int | None = None, limit: int | None = None
) -> Path:
    """Convert music21's Bach works to MIDI under root (once) and return root.

    limit converts only the first `limit` works (sorted by path), for tests."""
    root = Path(root) if root is not None else default_root()
    if _is_done(root, limit):
        return root
    try:
        from music21 import common, corpus
    except ImportError as err:
        raise ImportError(
            "the built-in Bach corpus needs music21: pip install -e '.[demo]' (or pip install music21)"
        ) from err

    corpus_dir = Path(common.getCorpusFilePath())
    works = (Path(p) for p in corpus.getComposer("bach"))
    sources = sorted(p for p in works if p.suffix.lower() not in CHORD_ANALYSES)[:limit]
    names = [str(p.relative_to(corpus_dir)) + ".mid" for p in sources]  # e.g. bach/bwv1.6.mxl.mid
    todo = [(str(src), str(root / name)) for src, name in zip(sources, names) if not (root / name).exists()]
    for _, target in todo:
        Path(target).parent.mkdir(parents=True, exist_ok=True)

    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    if todo:
        print(
            f"converting {len(todo)} Bach works from music21 to MIDI under {root} (once; about a second each per core)"
        )
    if workers == 1:
        failures = [
            reason for reason in progress.track(map(_convert, todo), "converting", len(todo)) if reason
        ]
    else:
        # spawn, not fork: the caller may hold JAX or other threads that fork would copy mid-flight
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            converted = progress.track(
                pool.imap_unordered(_convert, todo, chunksize=4), "converting", len(todo)
            )
            failures = [reason for reason in converted if reason]
    for reason in sorted(failures):
        print(f"skipped {reason}")

    done = [name for name in names if (root / name).exists()]
    valid = [name for name in done if _is_valid(name)]
    train = [name for name in done if not _is_valid(name)]
    _write_atomic(root / "train.txt", "".join(f"{name}\n" for name in train))
    _write_atomic(root / "valid.txt", "".join(f"{name}\n" for name in valid))
    marker = {
        "version": _VERSION,
        "limit": limit,
        "train": len(train),
        "valid": len(valid),
        "skipped": sorted(failures),
    }
    _write_atomic(root / MARKER, json.dumps(marker, indent=1))
    print(f"built-in corpus ready: {len(train)} train and {len(valid)} valid MIDI files under {root}")
    return root


def _is_done(root: Path, limit: int | None) -> bool:
    """True when root holds a finished corpus of this version, made with this limit."""
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == _VERSION and marker.get("limit") == limit


def _is_valid(name: str) -> bool:
    """The fixed split: about one file name in ten goes to validation."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % 10 == 0


def _convert(job: tuple[str, str]) -> str | None:
    """Convert one work to MIDI (in a worker process); returns a one-line reason on failure."""
    from music21 import corpus

    source, target = job
    part = Path(target).with_suffix(".part.mid")
    try:
        corpus.parse(source).write("midi", fp=part)
        os.replace(part, target)
    except Exception as err:  # music21 raises many kinds of errors on works it cannot convert
        part.unlink(missing_ok=True)
        message = str(err).splitlines()[0] if str(err) else ""
        return f"{Path(source).name}: {type(err).__name__}: {message}"
    return None


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so readers never see half a file."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert music21's Bach works to MIDI (once).")
    parser.add_argument("--root", type=Path, default=None, help="output folder (default: the cache folder)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    args = parser.parse_args()
    start = time.perf_counter()
    root = prepare_bach_corpus(args.root, args.workers)
    marker = json.loads((root / MARKER).read_text())
    print(
        f"{root}: {marker['train']} train + {marker['valid']} valid MIDI files, "
        f"{len(marker['skipped'])} skipped ({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
