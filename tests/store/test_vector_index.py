"""The FAISS side of the index (store/vector_index.py): exact inner-product search, storage dtypes, save and load.

These compare with numpy brute force on random vectors; tests/test_retrieval.py checks `search_both`
against two FAISS searches on a built index.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from rapidin_index.errors import IntegrityError, StoreError
from rapidin_index.store import vector_index
from rapidin_index.store.vector_file import StoredVectors, VectorWriter

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
    """The scan keeps a running top-k over blocks; small blocks force the merge path."""
    index, ids, vectors = _filled("float32")
    monkeypatch.setattr(vector_index, "SCAN_BLOCK_BYTES", scan_rows * (4 * DIMENSION + 8 * 5))
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


# --------------------------------------------------------------------------- the vectors file in place


def _written(tmp_path, vector_dtype: str, rows: int = 500, seed: int = 3):
    """(path, ids, stored float32 vectors): a vectors file written by FAISS, ids shuffled (not positions)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, DIMENSION)).astype(np.float32)
    ids = rng.permutation(10 * rows)[:rows].astype(np.int64)
    index = vector_index.new_index(DIMENSION, vector_dtype)
    vector_index.add_vectors(index, vectors, ids)
    path = tmp_path / f"{vector_dtype}.faiss"
    vector_index.save_index(index, path)
    return path, ids, vector_index.stored_vectors(index)[1]


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows", [0, 1, 300])
def test_vector_writer_writes_the_bytes_faiss_writes(tmp_path, vector_dtype, rows):
    """Chunked, streamed writing gives the file faiss.write_index gives (float16: FAISS's own rounding)."""
    rng = np.random.default_rng(rows)
    vectors = rng.standard_normal((rows, DIMENSION)).astype(np.float32)
    vectors[:, 0] = np.float32(
        -0.66137695
    )  # an exact float16 tie: FAISS rounds away from zero, numpy to even
    ids = rng.permutation(4 * rows + 1)[:rows]
    reference = vector_index.new_index(DIMENSION, vector_dtype)
    vector_index.add_vectors(reference, vectors, ids)
    vector_index.save_index(reference, tmp_path / "faiss.faiss")
    with VectorWriter(tmp_path / "streamed.faiss", DIMENSION, vector_dtype) as writer:
        for start in range(0, rows, 7):
            writer.add(vectors[start : start + 7], ids[start : start + 7])
    assert (tmp_path / "streamed.faiss").read_bytes() == (tmp_path / "faiss.faiss").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_vector_writer_leaves_nothing_behind_on_an_error(tmp_path):
    with pytest.raises(StoreError, match="vectors for 2 ids"):
        with VectorWriter(tmp_path / "v.faiss", DIMENSION, "float32") as writer:
            writer.add(np.zeros((3, DIMENSION)), np.arange(2))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
def test_stored_vectors_read_the_file_in_place(tmp_path, vector_dtype):
    path, ids, vectors = _written(tmp_path, vector_dtype)
    stored = StoredVectors(path)
    assert (stored.count, stored.dimension, stored.vector_dtype) == (len(ids), DIMENSION, vector_dtype)
    np.testing.assert_array_equal(stored.ids, ids)
    np.testing.assert_array_equal(stored.read(0, len(ids)), vectors)  # float16 -> float32 is exact
    np.testing.assert_array_equal(stored.vectors_of([int(ids[9]), int(ids[2])]), vectors[[9, 2]])
    with pytest.raises(StoreError, match="no vector with id -5"):
        stored.vectors_of([-5])
    mapped = vector_index.load_index(path, mapped=True)  # FAISS's own mmap read of the same file
    assert not faiss.downcast_index(mapped.index).codes.is_owned
    np.testing.assert_array_equal(vector_index.stored_vectors(mapped)[1], vectors)


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
@pytest.mark.parametrize("top_k", [1, 10, 500, 600])
@pytest.mark.parametrize("block_rows", [3, 64, 1000])
@pytest.mark.parametrize("query_count", [1, 7, 25])
def test_search_of_the_file_in_place_equals_numpy_brute_force(
    tmp_path, vector_dtype, top_k, block_rows, query_count
):
    """25 query vectors take one matrix product a block of ``block_rows`` (3 rows force the sparse merge:
    few candidates pass the running threshold); 1 and 7 are scored in chunks of ``block_rows`` into spans
    of 16 x block_rows / vectors scores (float32 rows in place by FAISS's kernel, float16 converted)."""
    path, ids, vectors = _written(tmp_path, vector_dtype)
    stored = StoredVectors(path)
    queries = _queries(query_count)
    if query_count < 20:
        stored.max_block_bytes = 2 * block_rows * 4 * DIMENSION  # chunks: half of it; spans: half of it
    else:
        stored.max_block_bytes = block_rows * (4 * DIMENSION + 8 * len(queries))
        assert vector_index._block_rows(DIMENSION, query_count, stored.max_block_bytes) == block_rows
    found = vector_index.search_both(stored, queries, top_k)
    expected = _brute_force_both(queries, ids, vectors, top_k)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[3], expected[3])
    np.testing.assert_allclose(found[0], expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(found[2], expected[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
def test_search_among_of_the_file_in_place_equals_brute_force_over_the_subset(tmp_path, vector_dtype):
    path, ids, vectors = _written(tmp_path, vector_dtype)
    stored = StoredVectors(path)
    stored.max_block_bytes = 5 * (4 * DIMENSION + 8 * 5)
    among = ids[::4][:60]
    kept = np.isin(ids, among)
    found = vector_index.search_both_among(stored, _queries(), 9, among.tolist())
    expected = _brute_force_both(_queries(), ids[kept], vectors[kept], 9)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[3], expected[3])


def test_a_memory_cap_scans_in_smaller_blocks_with_the_same_hits(tmp_path):
    path, ids, vectors = _written(tmp_path, "float32", rows=2000)
    capped = StoredVectors(path, max_memory=16 * 2000 + 2 * 40 * (4 * DIMENSION + 8 * 5))
    assert capped.drop_pages and capped.max_block_bytes < 2000 * 4 * DIMENSION
    found = vector_index.search_both(capped, _queries(), 5)
    expected = _brute_force_both(_queries(), ids, vectors, 5)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[3], expected[3])


def test_a_memory_cap_below_the_ids_is_refused_on_one_line(tmp_path):
    path, _, _ = _written(tmp_path, "float32", rows=2000)
    with pytest.raises(StoreError, match=r"--max-memory 1.0KB is too small for .*give at least") as error:
        StoredVectors(path, max_memory=1024)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("cut", [0, 20, 100, -8])
def test_a_damaged_vectors_file_is_refused_on_one_line(tmp_path, cut):
    path, _, _ = _written(tmp_path, "float32")
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(IntegrityError, match="cannot be read by FAISS .*re-import its bundle or rebuild it"):
        StoredVectors(path)


def test_float16_storage_finds_the_float32_hits():
    """Unit-norm rows and queries, as sketches are: the same top-10, scores within float16's rounding."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((3000, 256)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:5] + 0.5 * rng.standard_normal((5, 256)).astype(np.float32) / 16
    found = {}
    for vector_dtype in ("float32", "float16"):
        index = vector_index.new_index(256, vector_dtype)
        vector_index.add_vectors(index, vectors, np.arange(3000))
        found[vector_dtype] = vector_index.search_both(index, queries, 10)
    exact, half = found["float32"], found["float16"]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact[1], half[1], strict=True)])
    assert overlap >= 0.9
    assert np.abs(exact[0] - half[0]).max() < 2e-3 and np.abs(exact[2] - half[2]).max() < 2e-3
