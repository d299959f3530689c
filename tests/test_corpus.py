"""Tests of the built-in Bach corpus (three works converted into a temporary folder)."""

import json
import sys

import pytest

from fractalmidi_jax import corpus
from fractalmidi_jax.midi import read_score

pytest.importorskip("music21")


def lines(path):
    return path.read_text().split()


def test_prepare_small_corpus_once_and_resume(tmp_path, monkeypatch):
    root = corpus.prepare_bach_corpus(tmp_path / "bach", workers=1, limit=3)
    assert root == tmp_path / "bach"
    names = lines(root / "train.txt") + lines(root / "valid.txt")
    assert sorted(names) == ["bach/bwv1.6.mxl.mid", "bach/bwv10.7.mxl.mid", "bach/bwv101.7.mxl.mid"]
    for name in names:
        score = read_score(root / name)
        assert len(score.notes) > 50 and score.num_steps > 16
    marker = json.loads((root / corpus.MARKER).read_text())
    assert marker["train"] + marker["valid"] == 3 and marker["skipped"] == []
    assert not list(root.rglob("*.part*"))

    converted = []
    monkeypatch.setattr(corpus, "_convert", lambda job: converted.append(job[1]))
    assert corpus.prepare_bach_corpus(root, workers=1, limit=3) == root
    assert converted == []  # the marker says it is done

    (root / corpus.MARKER).unlink()  # as if interrupted before the end
    (root / names[0]).unlink()
    corpus.prepare_bach_corpus(root, workers=1, limit=3)
    assert converted == [str(root / names[0])]  # only the missing file is converted again
    assert (root / corpus.MARKER).exists()


def test_split_is_fixed_and_about_one_in_ten():
    names = [f"bach/bwv{i}.mxl.mid" for i in range(1000)]
    valid = [n for n in names if corpus._is_valid(n)]
    assert 60 < len(valid) < 140
    assert valid == [n for n in names if corpus._is_valid(n)]


def test_default_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FRACTALMIDI_CACHE", str(tmp_path))
    assert corpus.default_root() == tmp_path / "bach_chorales"


def test_missing_music21_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "music21", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[demo\]'"):
        corpus.prepare_bach_corpus(tmp_path / "bach")
