"""The vectors file through builds (store/vector_file.py with build.py and store/shards.py): the default dtype, appends
and merges written as streams; the scan's scores against float64 products of the stored values (issue 27
item 3). The file format itself and the block scan are tested in tests/store/test_vector_index.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_settings

from rapidin_index.build import build_index
from rapidin_index.store import index_folder, vector_file, vector_index
from rapidin_index.store.manifest import read_manifest
from rapidin_index.store.vector_file import StoredVectors, VectorWriter, score_codes


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
    assert StoredVectors(tmp_path / "new" / index_folder.vector_file(1)).vector_dtype == "float16"
    old = build_settings(tiny_model_dirs["llama"], sketch_dim=256, vector_dtype="float32")
    build_index(first, tmp_path / "old", old, progress=False)
    before = StoredVectors(tmp_path / "old" / index_folder.vector_file(1))
    old_ids, old_vectors = before.ids.copy(), before.read(0, before.count)
    build_index(second, tmp_path / "old", default, append=True, progress=False)  # no dtype given
    manifest = read_manifest(tmp_path / "old")
    assert manifest.vector_dtype == "float32" and manifest.row_count == 14
    after = StoredVectors(tmp_path / "old" / index_folder.vector_file(2))
    assert after.vector_dtype == "float32" and after.ids.tolist() == list(range(14))
    np.testing.assert_array_equal(after.ids[:10], old_ids)
    np.testing.assert_array_equal(after.read(0, 10), old_vectors)  # the old rows copied as they were
    whole = build_index(  # the same 14 rows in one build: the appended rows' vectors equal its own
        _write(tmp_path / "all.jsonl", training_rows[:14]), tmp_path / "whole", old, progress=False
    )
    assert whole.rows_indexed == 14
    reference = StoredVectors(tmp_path / "whole" / index_folder.vector_file(1))
    np.testing.assert_allclose(after.read(10, 14), reference.read(10, 14), rtol=1e-4, atol=1e-5)


def test_the_default_keeps_exact_vectors_float32(tmp_path, tiny_model_dirs, training_rows):
    """K = 0 stores exact gradients, for checks against brute force: float16 would round them."""
    settings = build_settings(tiny_model_dirs["llama"], sketch_dim=0, vector_dtype=None)
    build_index(
        _write(tmp_path / "rows.jsonl", training_rows[:4]), tmp_path / "index", settings, progress=False
    )
    assert read_manifest(tmp_path / "index").vector_dtype == "float32"


# --------------------------------------------------------------------------- the scan (issue 27 item 3)


def _file(tmp_path, vector_dtype: str, rows: int, dimension: int, seed: int = 5):
    """(StoredVectors, ids, the stored values as float64): unit-norm rows written through VectorWriter;
    rows 3 and 4 repeat rows 1 and 2 (exact ties), ids shuffled."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[3:5] = vectors[1:3]
    ids = rng.permutation(7 * rows)[:rows].astype(np.int64)
    path = tmp_path / f"{vector_dtype}-{rows}.faiss"
    with VectorWriter(path, dimension, vector_dtype) as writer:
        writer.add(vectors[: rows // 2], ids[: rows // 2])
        writer.add(vectors[rows // 2 :], ids[rows // 2 :])
    stored = StoredVectors(path)
    # the stored values, decoded by numpy alone (not our conversion): float16 bytes -> float64
    raw = np.fromfile(path, np.uint8)[stored._codes_at : stored._codes_at + stored.nbytes]
    exact = raw.view(np.float16 if vector_dtype == "float16" else np.float32).reshape(rows, dimension)
    return stored, ids, exact.astype(np.float64)


def _float32_bound(queries: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|float32 sum - exact| <= d * 2^-23 * sum |q_i v_i| (a float32 dot product's rounding), [q, rows]."""
    return exact.shape[1] * 2.0**-23 * (np.abs(queries.astype(np.float64)) @ np.abs(exact).T)


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
@pytest.mark.parametrize("query_count", [1, 3, 25])
@pytest.mark.parametrize("chunk_rows", [1, 5, 300])
def test_score_codes_is_the_float64_product_of_the_stored_values(
    tmp_path, vector_dtype, query_count, chunk_rows
):
    """Every score equals the exact product of the query with the STORED (rounded) row, to float32's
    rounding of a dot product; mapped rows (not 4-byte aligned) and rows copied into RAM alike."""
    stored, _, exact = _file(tmp_path, vector_dtype, rows=200, dimension=48)
    queries = np.random.default_rng(6).standard_normal((query_count, 48)).astype(np.float32)
    expected = queries.astype(np.float64) @ exact.T  # [q, rows]
    bound = _float32_bound(queries, exact)
    for codes in (stored._codes, np.array(stored._codes)):  # in place (unaligned float32), in RAM
        out = np.full((query_count, 200), np.nan, np.float32)
        score_codes(codes, vector_dtype, queries, out, chunk_bytes=chunk_rows * 4 * 48)
        assert np.all(np.abs(out - expected) <= bound)
    out = np.full((query_count, 200), np.nan, np.float32)
    stored.scores(queries, 0, 200, out)
    assert np.all(np.abs(out - expected) <= bound)


def _assert_same_hits(found, queries, ids, exact, top_k):
    """Helpful/harmful ids hold the brute-force top and bottom k (ties: any of the equal rows), best first,
    scores within float32's rounding of the exact ones."""
    products = queries.astype(np.float64) @ exact.T  # [q, rows]
    bound = _float32_bound(queries, exact)
    position = {int(row_id): number for number, row_id in enumerate(ids)}
    for query, (helpful, harmful) in enumerate(zip(found[1], found[3], strict=True)):
        for chosen, scores, sign in ((helpful, found[0][query], 1), (harmful, found[2][query], -1)):
            columns = [position[int(row_id)] for row_id in chosen]
            assert len(set(columns)) == top_k
            chosen_exact = products[query, columns]
            best = np.sort(sign * products[query])[::-1][:top_k] * sign  # brute force, best first
            tolerance = 2 * bound[query, columns]
            assert np.all(np.abs(chosen_exact - best) <= tolerance)  # the same values: same rows or ties
            assert np.all(np.abs(scores - chosen_exact) <= bound[query, columns])


@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
@pytest.mark.parametrize("query_count", [1, 2, 7])
@pytest.mark.parametrize("top_k", [1, 4, 60, 400])
def test_search_of_few_vectors_merges_spans_and_chunks_exactly(
    tmp_path, monkeypatch, vector_dtype, query_count, top_k
):
    """Few vectors: spans of 64 scores a vector (7 vectors: 9) merged by `_TopBoth`, chunks of 3 rows;
    k from 1 to the whole index (400 > 300 rows: all of them, both ways)."""
    stored, ids, exact = _file(tmp_path, vector_dtype, rows=300, dimension=32)
    stored.drop_pages = True  # as under --max-memory: 1-2 vectors over float16 rows skip FAISS's own scan
    monkeypatch.setattr(vector_index, "SPAN_BYTES", 64 * 4)
    monkeypatch.setattr(vector_file, "HALF_CHUNK_BYTES", 3 * 4 * 32)
    monkeypatch.setattr(vector_file, "FLOAT_CHUNK_BYTES", 3 * 4 * 32)
    queries = np.random.default_rng(8).standard_normal((query_count, 32)).astype(np.float32)
    queries[0] = exact[1]  # its own row and the copy of it (ids[1], ids[3]) tie at the top
    found = vector_index.search_both(stored, queries, top_k)
    width = min(top_k, 300)
    assert [part.shape for part in found] == [(query_count, width)] * 4
    _assert_same_hits(found, queries, ids, exact, width)
    assert (np.diff(found[0], axis=1) <= 0).all() and (np.diff(found[2], axis=1) >= 0).all()
    assert set(found[1][0, :2]) == {ids[1], ids[3]} or width == 1


@pytest.mark.parametrize("query_count", [1, 25])
def test_a_capped_float16_search_finds_the_same_hits_block_by_block(tmp_path, query_count):
    stored, ids, exact = _file(tmp_path, "float16", rows=2000, dimension=32)
    capped = StoredVectors(stored.path, max_memory=16 * 2000 + 2 * 40 * (4 * 32 + 8 * 25))
    assert capped.drop_pages and capped.max_block_bytes < 2000 * 4 * 32
    queries = np.random.default_rng(9).standard_normal((query_count, 32)).astype(np.float32)
    found = vector_index.search_both(capped, queries, 7)
    _assert_same_hits(found, queries, ids, exact, 7)
    uncapped = vector_index.search_both(stored, queries, 7)  # other block sizes: sums rounded otherwise
    for got, want in zip(found, uncapped, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_the_scan_spawns_no_threads_beyond_torch_s_own(tmp_path):
    """One torch thread set by the caller: the scan leaves the setting alone and starts no thread."""
    import threading

    import torch

    stored, _, _ = _file(tmp_path, "float16", rows=500, dimension=64)
    before_threads, before_count = torch.get_num_threads(), threading.active_count()
    torch.set_num_threads(1)
    try:
        vector_index.search_both(stored, np.ones((1, 64), np.float32), 5)
        assert torch.get_num_threads() == 1 and threading.active_count() == before_count
    finally:
        torch.set_num_threads(before_threads)


@pytest.mark.parametrize("limit, fused", [(1 << 30, True), (1000, False)])
def test_one_vector_over_a_large_float16_file_takes_one_chunked_pass(tmp_path, monkeypatch, limit, fused):
    """FAISS's fused scan reads the file once per stacked vector (the vector and its negation): only for a
    file the page cache holds twice over; a larger one is scanned once, in chunks, with the same hits."""
    stored, ids, exact = _file(tmp_path, "float16", rows=300, dimension=32)
    monkeypatch.setattr(vector_index, "_FUSED_HALF_MAX_BYTES", limit)
    stacked = []
    monkeypatch.setattr(vector_index, "_search_stacked", lambda *args: stacked.append(args) or None)
    queries = np.random.default_rng(10).standard_normal((1, 32)).astype(np.float32)
    found = vector_index.search_both(stored, queries, 5)
    assert bool(stacked) == fused
    if not fused:
        _assert_same_hits(found, queries, ids, exact, 5)
