"""The vectors file through builds (vector_file.py with build.py and shards.py): the default dtype, appends
and merges written as streams. The file format itself and the scan are tested in tests/test_index.py."""

from __future__ import annotations

import json

import numpy as np
from conftest import build_settings

from rapidin_index import store
from rapidin_index.build import build_index
from rapidin_index.manifest import read_manifest
from rapidin_index.vector_file import StoredVectors


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_new_index_stores_float16_and_an_old_one_keeps_float32_when_appended(
    tmp_path, tiny_model_dirs, training_rows
):
    first = _write(tmp_path / "first.jsonl", training_rows[:10])
    second = _write(tmp_path / "second.jsonl", training_rows[10:14])
    default = build_settings(tiny_model_dirs["llama"], sketch_dim=256, vector_dtype=None)
    build_index(first, tmp_path / "new", default, progress=False)
    assert read_manifest(tmp_path / "new").vector_dtype == "float16"
    assert StoredVectors(tmp_path / "new" / store.vector_file(1)).vector_dtype == "float16"
    old = build_settings(tiny_model_dirs["llama"], sketch_dim=256, vector_dtype="float32")
    build_index(first, tmp_path / "old", old, progress=False)
    before = StoredVectors(tmp_path / "old" / store.vector_file(1))
    old_ids, old_vectors = before.ids.copy(), before.read(0, before.count)
    build_index(second, tmp_path / "old", default, append=True, progress=False)  # no dtype given
    manifest = read_manifest(tmp_path / "old")
    assert manifest.vector_dtype == "float32" and manifest.row_count == 14
    after = StoredVectors(tmp_path / "old" / store.vector_file(2))
    assert after.vector_dtype == "float32" and after.ids.tolist() == list(range(14))
    np.testing.assert_array_equal(after.ids[:10], old_ids)
    np.testing.assert_array_equal(after.read(0, 10), old_vectors)  # the old rows copied as they were
    whole = build_index(  # the same 14 rows in one build: the appended rows' vectors equal its own
        _write(tmp_path / "all.jsonl", training_rows[:14]), tmp_path / "whole", old, progress=False
    )
    assert whole.rows_indexed == 14
    reference = StoredVectors(tmp_path / "whole" / store.vector_file(1))
    np.testing.assert_allclose(after.read(10, 14), reference.read(10, 14), rtol=1e-4, atol=1e-5)


def test_the_default_keeps_exact_vectors_float32(tmp_path, tiny_model_dirs, training_rows):
    """K = 0 stores exact gradients, for checks against brute force: float16 would round them."""
    settings = build_settings(tiny_model_dirs["llama"], sketch_dim=0, vector_dtype=None)
    build_index(
        _write(tmp_path / "rows.jsonl", training_rows[:4]), tmp_path / "index", settings, progress=False
    )
    assert read_manifest(tmp_path / "index").vector_dtype == "float32"
