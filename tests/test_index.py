"""The FAISS side of the index (index.py): exact inner-product search, storage dtypes, save and load.

These compare with numpy brute force on random vectors; tests/test_retrieval.py checks `search_both`
against two FAISS searches on a built index.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from rapidin_index import index as vector_index
from rapidin_index.errors import StoreError

DIMENSION = 16
ROWS = 40


def _filled(vector_dtype: str, rows: int = ROWS, seed: int = 0):
    """(index, ids, vectors): ``rows`` random vectors with ids 1000, 1003, ... (not positions)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, DIMENSION)).astype(np.float32)
    ids = 1000 + 3 * np.arange(rows)
    index = vector_index.new_index(DIMENSION, vector_dtype)
    vector_index.add_vectors(index, vectors, ids)
    return index, ids, vectors


def _queries(count: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIMENSION)).astype(np.float32)


# --------------------------------------------------------------------------- new, add, stored vectors


def test_float32_index_stores_the_vectors_exactly():
    index, ids, vectors = _filled("float32")
    assert vector_index.vector_dtype_of(index) == "float32"
    stored_ids, stored = vector_index.stored_vectors(index)
    np.testing.assert_array_equal(stored_ids, ids)
    np.testing.assert_array_equal(stored, vectors)
    assert stored_ids.dtype == np.int64 and stored.dtype == np.float32


def test_float16_index_stores_half_precision_and_scores_close_to_numpy():
    index, ids, vectors = _filled("float16")
    assert vector_index.vector_dtype_of(index) == "float16"
    stored_ids, stored = vector_index.stored_vectors(index)
    np.testing.assert_array_equal(stored_ids, ids)
    np.testing.assert_array_equal(stored, vectors.astype(np.float16).astype(np.float32))
    queries = _queries()
    scores, found = vector_index.search(index, queries, ROWS)
    brute = queries @ vectors.T  # [queries, rows]
    expected = np.take_along_axis(brute, (found - 1000) // 3, axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-2, atol=1e-2)


def test_an_unknown_vector_dtype_is_refused_by_name():
    with pytest.raises(StoreError, match="'int8' is not one of float32, float16"):
        vector_index.new_index(DIMENSION, "int8")


def test_stored_vectors_keep_insertion_order():
    index = vector_index.new_index(4)
    vector_index.add_vectors(index, np.full((2, 4), 7.0), np.array([9, 2]))  # float64 in, float32 kept
    vector_index.add_vectors(index, np.zeros((0, 4)), np.array([], np.int64))  # nothing to add
    vector_index.add_vectors(index, np.full((1, 4), 5.0), np.array([4]))
    ids, vectors = vector_index.stored_vectors(index)
    assert ids.tolist() == [9, 2, 4]
    np.testing.assert_array_equal(vectors[:, 0], [7.0, 7.0, 5.0])


def test_stored_vectors_of_an_empty_index():
    ids, vectors = vector_index.stored_vectors(vector_index.new_index(DIMENSION))
    assert ids.shape == (0,) and vectors.shape == (0, DIMENSION)


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
def test_save_and_load_round_trip_leave_no_temporary(tmp_path, vector_dtype):
    index, ids, _ = _filled(vector_dtype)
    path = tmp_path / "vectors.faiss"
    vector_index.save_index(index, path)
    vector_index.save_index(index, path)  # over an existing file
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]
    loaded = vector_index.load_index(path)
    assert vector_index.vector_dtype_of(loaded) == vector_dtype
    for before, after in zip(
        vector_index.stored_vectors(index), vector_index.stored_vectors(loaded), strict=True
    ):
        np.testing.assert_array_equal(before, after)


# --------------------------------------------------------------------------- search


def test_search_is_exact_best_first_and_stops_at_the_row_count():
    index, ids, vectors = _filled("float32", rows=6)
    queries = _queries()
    scores, found = vector_index.search(index, queries, 50)
    assert scores.shape == found.shape == (len(queries), 6)
    brute = queries @ vectors.T
    np.testing.assert_array_equal(found, ids[np.argsort(-brute, axis=1)])
    np.testing.assert_allclose(scores, -np.sort(-brute, axis=1), rtol=1e-5, atol=1e-5)


def _brute_force_both(queries, ids, vectors, top_k):
    brute = queries @ vectors.T  # [queries, rows]
    top_k = min(top_k, len(ids))
    best = np.argsort(-brute, axis=1)[:, :top_k]
    worst = np.argsort(brute, axis=1)[:, :top_k]
    take = np.take_along_axis
    return take(brute, best, 1), ids[best], take(brute, worst, 1), ids[worst]


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
@pytest.mark.parametrize("top_k", [1, 7, ROWS, ROWS + 10])
def test_search_both_equals_brute_force(vector_dtype, top_k):
    index, ids, vectors = _filled(vector_dtype)
    _, vectors = vector_index.stored_vectors(index)  # float16: the values the index actually holds
    queries = _queries()
    found = vector_index.search_both(index, queries, top_k)
    expected = _brute_force_both(queries, ids, vectors, top_k)
    width = min(top_k, ROWS)
    assert [got.shape for got in found] == [(len(queries), width)] * 4
    np.testing.assert_array_equal(found[1], expected[1])  # helpful ids, best first
    np.testing.assert_array_equal(found[3], expected[3])  # harmful ids, most negative first
    tolerance = 1e-4 if vector_dtype == "float32" else 2e-2
    np.testing.assert_allclose(found[0], expected[0], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(found[2], expected[2], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("scan_rows", [1, 7, ROWS - 1])
def test_search_both_merges_blocks_of_rows_exactly(monkeypatch, scan_rows):
    """The float32 scan keeps a running top-k over blocks; small blocks force the merge path."""
    index, ids, vectors = _filled("float32")
    monkeypatch.setattr(vector_index, "_SCAN_ROWS", scan_rows)
    queries = _queries()
    found = vector_index.search_both(index, queries, 5)
    expected = _brute_force_both(queries, ids, vectors, 5)
    for got, want in zip(found, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_search_both_of_a_non_flat_index_uses_one_faiss_search():
    inner = faiss.IndexFlatIP(DIMENSION)
    index = faiss.IndexIDMap(inner)  # not IndexIDMap2: no in-place matrix, FAISS answers
    _, ids, vectors = _filled("float32")
    index.add_with_ids(vectors, ids)
    queries = _queries()
    found = vector_index.search_both(index, queries, 4)
    expected = _brute_force_both(queries, ids, vectors, 4)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[3], expected[3])
    np.testing.assert_allclose(found[2], expected[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
def test_search_both_of_an_empty_index_finds_nothing(vector_dtype):
    index = vector_index.new_index(DIMENSION, vector_dtype)
    found = vector_index.search_both(index, _queries(3), 5)
    assert [array.shape for array in found] == [(3, 0)] * 4
