"""Cheap checks first (preflight.py): files, K and the model files' stat, before anything heavy."""

from __future__ import annotations

import pytest

from rapidin_index import preflight
from rapidin_index.errors import IndexMismatchError, IntegrityError
from rapidin_index.store.manifest import Manifest


def _manifest(**overrides) -> Manifest:
    values = {
        "model": {"name_or_path": "/models/tiny", "fingerprint": "model-sha", "dtype": "float32"},
        "adapter": None,
        "tokenizer": {"fingerprint": "tokenizer-sha"},
        "template": {"name": "alpaca"},
        "max_length": None,
        "parameters": {},
        "normalize": "layer",
        "sketch": {"sketch_dim": 4096},
        "vector_dtype": "float32",
        "files": {"vectors-g0001.faiss": {"sha256": "x", "bytes": 1}},
    }
    return Manifest(**{**values, **overrides})


# --------------------------------------------------------------------------- files and K


def test_check_files_names_a_missing_file(tmp_path):
    with pytest.raises(IntegrityError, match="vectors-g0001.faiss is missing .*rebuild it"):
        preflight.check_files(tmp_path, _manifest())
    (tmp_path / "vectors-g0001.faiss").write_bytes(b"any bytes: only presence is checked")
    assert preflight.check_files(tmp_path, _manifest()) is None


def test_check_query_refuses_another_k_and_names_both(tmp_path):
    (tmp_path / "vectors-g0001.faiss").write_bytes(b"")
    with pytest.raises(IndexMismatchError, match="built with K=4096, query asked for K=8192; drop --k"):
        preflight.check_query(tmp_path, _manifest(), 8192)
    assert preflight.check_query(tmp_path, _manifest(), 4096) is None
    assert preflight.check_query(tmp_path, _manifest(), None) is None  # no K asked: the index's own


def test_check_query_checks_the_files_too(tmp_path):
    with pytest.raises(IntegrityError, match="vectors-g0001.faiss is missing"):
        preflight.check_query(tmp_path, _manifest(), None)


# --------------------------------------------------------------------------- model files' stat


def test_model_files_stat_is_none_for_a_hub_id_or_no_folder(tmp_path):
    assert preflight.model_files_stat(None) is None
    assert preflight.model_files_stat("owner/name") is None
    (tmp_path / "file").write_text("x")
    assert preflight.model_files_stat(tmp_path / "file") is None


def test_model_files_stat_is_none_for_files_changed_just_now(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"new")
    assert preflight.model_files_stat(tmp_path) is None  # racily clean: no proof they will not change


def test_model_files_stat_is_stable_and_changes_with_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "_SETTLED_NS", 0)  # every file counts as settled
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"weights")
    (tmp_path / "model" / "config.json").write_text("{}")
    first = preflight.model_files_stat(tmp_path / "model")
    assert first is not None and len(first) == 64
    assert preflight.model_files_stat(str(tmp_path / "model")) == first
    (tmp_path / "model" / "weights.bin").write_bytes(b"weights, retrained")
    changed = preflight.model_files_stat(tmp_path / "model")
    assert changed not in (None, first)
    (tmp_path / "model" / "extra.txt").write_text("")
    assert preflight.model_files_stat(tmp_path / "model") not in (None, first, changed)
