"""The FAISS side of the index: exact inner-product search over the sketches, ids = training example ids."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from rapidin_index.files import atomic_file
from rapidin_index.store.vector_file import (
    FLOAT_CHUNK_BYTES,
    HALF_CHUNK_BYTES,
    SCAN_BLOCK_BYTES,
    StoredVectors,
    half_to_float,
    score_codes,
)

# The FAISS file's own primitives live beside its reader (vector_file), re-exported here for callers.
from rapidin_index.store.vector_file import MAX_DIMENSION as MAX_DIMENSION  # noqa: E402
from rapidin_index.store.vector_file import load_index as load_index  # noqa: E402
from rapidin_index.store.vector_file import new_index as new_index  # noqa: E402


def vector_dtype_of(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index if hasattr(index, "id_map") else index)
    return "float16" if isinstance(inner, faiss.IndexScalarQuantizer) else "float32"


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    if len(ids) == 0:
        return
    index.add_with_ids(
        np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
    )


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Atomic (`files.atomic_file`): a reader sees the old file or the new one."""
    with atomic_file(path) as temporary:
        faiss.write_index(index, str(temporary))


def stored_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int64, vectors [n, dim] float32) in insertion order."""
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    flat = faiss.downcast_index(index.index)
    vectors = flat.reconstruct_n(0, flat.ntotal) if flat.ntotal else np.zeros((0, flat.d), np.float32)
    return ids, vectors


def vectors_of(index, ids: list[int]) -> np.ndarray:
    """The stored vectors [len(ids), dim] float32 of these training example ids (an IndexIDMap2 or a
    `StoredVectors`)."""
    if isinstance(index, StoredVectors):
        return index.vectors_of(ids)
    if not ids:
        return np.zeros((0, index.d), np.float32)
    return np.stack([index.reconstruct(int(row_id)) for row_id in ids])


def search(index: faiss.Index, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN by inner product: (scores [q, k] float32, ids [q, k] int64), best first."""
    top_k = min(top_k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), top_k)


def search_both_among(
    index, queries: np.ndarray, top_k: int, among: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`search_both` over the rows whose ids are in ``among`` only: the exact top and bottom k of that
    subset (never a filtered global top-k, which could hold fewer than k). ``index``: a `StoredVectors`
    or a CPU FAISS index."""
    among = np.unique(np.asarray(among, dtype=np.int64))
    if isinstance(index, StoredVectors):
        positions = np.sort(index.positions_of(among))
        positions = positions[positions >= 0]
        step = _block_rows(index.dimension, len(queries), index.max_block_bytes)
        blocks = (
            (
                index.read_positions(positions[start : start + step]),
                index.ids[positions[start : start + step]],
            )
            for start in range(0, len(positions), step)
        )
        return _scan_both(blocks, queries, min(top_k, len(positions)))
    codes = _flat_codes(index)
    if codes is not None:
        all_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        positions = np.nonzero(np.isin(all_ids, among))[0]
        vectors, ids = _decode(codes[0][positions], codes[1], index.d), all_ids[positions]
    else:
        vectors, ids = vectors_of(index, among.tolist()), among
    return _scan_both([(vectors, ids)], queries, min(top_k, len(ids)))


def search_both(
    index, queries: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-k and bottom-k by inner product in one scan: (helpful scores, ids, harmful scores, ids).

    Helpful are best first, harmful most negative first; [q, k] each. A `StoredVectors` (a vectors file
    read in place) or a CPU flat FAISS index, float32 or float16, is scanned once, scored chunk by chunk
    (`vector_file.score_codes`: float16 converted in cache just before its product). Few vectors (fewer
    than `_PRODUCT_QUERIES`): into spans of scores whose two ends one partition takes (`_TopBoth`); more:
    into blocks of scores offered to a running top and bottom k (`_TopK`). One or two vectors over a
    float16 file: FAISS's fused scan of it (`_FUSED_HALF_QUERIES`).
    Scores accumulate in float32 over the stored values. Any other index (GPU, sharded) answers one FAISS
    search of the queries stacked with their negations.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    top_k = min(top_k, len(index.ids) if isinstance(index, StoredVectors) else index.ntotal)
    if top_k < 1:  # an empty index (FAISS asserts k > 0)
        empty = (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
        return (*empty, *empty)
    few = len(queries) < _PRODUCT_QUERIES
    fused = len(queries) <= _FUSED_HALF_QUERIES and getattr(index, "vector_dtype", "") == "float16"
    if isinstance(index, StoredVectors) and fused and not index.drop_pages and _fits_twice(index):
        return _search_stacked(index.faiss_index(), queries, top_k)
    if isinstance(index, StoredVectors):
        dimension, budget, ids = index.dimension, index.max_block_bytes, index.ids

        def scores(queries, start, stop, out):
            index.scores(queries, start, stop, out, None if few else _many_chunk_bytes(dimension))

    else:
        codes = _flat_codes(index)
        if codes is None:
            return _search_stacked(index, queries, top_k)
        (rows, dtype), dimension, budget = codes, index.d, SCAN_BLOCK_BYTES
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        chunk = (HALF_CHUNK_BYTES if dtype == "float16" else FLOAT_CHUNK_BYTES) if few else None

        def scores(queries, start, stop, out):
            score_codes(rows[start:stop], dtype, queries, out, chunk or _many_chunk_bytes(dimension))

    if few:
        return _scan_spans(scores, ids, queries, top_k, budget)
    return _scan_blocks(scores, ids, queries, top_k, budget)


def _search_stacked(index: faiss.Index, queries: np.ndarray, top_k: int):
    """One FAISS search of the queries stacked with their negations."""
    scores, ids = index.search(np.concatenate([queries, -queries]), top_k)
    count = len(queries)
    return scores[:count], ids[:count], -scores[count:], ids[count:]


_FUSED_HALF_QUERIES = 2

# FAISS's fused scan reads the file once per stacked vector (a vector and its negation: twice). Above this
# size (a file the page cache may not hold) the single chunked pass wins: a cold 13 GB float16 file took
# 18+ minutes fused, 36 s chunked (BENCHMARKS.md, issue 27 item 4).
_FUSED_HALF_MAX_BYTES = 1 << 30


def _fits_twice(index: StoredVectors) -> bool:
    return index.nbytes <= _FUSED_HALF_MAX_BYTES


"""Up to this many vectors, a float16 file is searched by FAISS's own scalar-quantizer scan of the mapped
file (float16 decoded in registers, one pass per vector and per negation): 5-20% faster here than converting
it chunk by chunk for one product (BENCHMARKS.md, issue 27 item 3) until the passes add up."""

_PRODUCT_QUERIES = 20
"""Fewer query vectors than this are scored into spans of scores whose top and bottom k are taken at once
(`_TopBoth`); more are compute-bound: blocks of scores and a running-threshold top-k (`_TopK`)."""

SPAN_BYTES = 4 << 20
"""Scores kept before their top-k is taken, with fewer than `_PRODUCT_QUERIES` vectors (4 MiB: a million
rows for one vector): the bookkeeping then costs one partition per span, not two per block."""


def _block_rows(dimension: int, queries: int, block_bytes: int) -> int:
    """Rows a block holds: ``block_bytes`` of float32 rows and their [queries, rows] scores (x2)."""
    return max(1, block_bytes // (4 * dimension + 8 * queries))


def _many_chunk_bytes(dimension: int) -> int:
    """float32 bytes of rows multiplied at once with many vectors: 4 MiB, so that float16 rows converted
    into it are still in cache for the product (a 32 MiB block cost 0.2x the product more), but at least
    128 rows (a shorter product re-reads the queries more than its rows: slower at K = 65,536)."""
    return max(4 << 20, 128 * 4 * dimension)


def _scan_blocks(scores_of, ids: np.ndarray, queries: np.ndarray, top_k: int, budget: int):
    """Helpful and harmful top-k of many ``queries``: ``scores_of`` fills blocks of scores [q, rows] (rows
    and scores within ``budget``, `_block_rows`), each offered to a running top and bottom k (`_TopK`)."""
    step = _block_rows(queries.shape[1], len(queries), budget)
    scores = np.empty((len(queries), min(step, len(ids))), np.float32)
    best, worst = _TopK(len(queries), top_k), _TopK(len(queries), top_k)
    for start in range(0, len(ids), step):
        stop = min(start + step, len(ids))
        block = scores[:, : stop - start]
        scores_of(queries, start, stop, block)
        best.offer(block, ids[start:stop])
        worst.offer(np.negative(block, out=block), ids[start:stop])
    helpful_scores, helpful_ids = best.result()
    harmful_scores, harmful_ids = worst.result()
    return helpful_scores, helpful_ids, -harmful_scores, harmful_ids


def _scan_spans(scores_of, ids: np.ndarray, queries: np.ndarray, top_k: int, budget: int):
    """Helpful and harmful top-k of few ``queries``: ``scores_of(queries, start, stop, out)`` fills a span of
    scores [q, rows] (at most half of ``budget`` bytes, see `SPAN_BYTES`), then `_TopBoth` takes its ends."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    span = max(1, min(SPAN_BYTES, budget // 2) // (4 * len(queries)))
    scores = np.empty((len(queries), min(span, len(ids))), np.float32)
    both = _TopBoth(len(queries), top_k)
    for start in range(0, len(ids), span):
        stop = min(start + span, len(ids))
        scores_of(queries, start, stop, scores[:, : stop - start])
        both.offer(scores[:, : stop - start], ids[start:stop])
    return both.result()


class _TopBoth:
    """The ``k`` largest and ``k`` smallest scores of each query row, kept over spans of columns: each span
    is partitioned once at both ends (argpartition with two kth), its 2k ends merged with the 2k kept."""

    def __init__(self, queries: int, k: int):
        self.k = k
        self.scores = np.zeros((queries, 0), np.float32)
        self.ids = np.zeros((queries, 0), np.int64)

    def offer(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """``scores`` [q, rows] and the rows' ``ids`` [rows] (or [q, rows])."""
        scores, ids = self._ends(scores, np.broadcast_to(ids, scores.shape))
        self.scores, self.ids = self._ends(
            np.concatenate([self.scores, scores], 1), np.concatenate([self.ids, ids], 1)
        )

    def _ends(self, scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k, width = self.k, scores.shape[1]
        if width <= 2 * k:
            return np.array(scores), np.array(ids)
        part = np.argpartition(scores, (k - 1, width - k), axis=1)  # [:, :k] smallest, [:, -k:] largest
        part = np.concatenate([part[:, :k], part[:, width - k :]], 1)  # [q, 2k]
        return np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(helpful scores, ids, harmful scores, ids) [q, k]: largest first, smallest first; ties by id."""
        down = np.lexsort((self.ids, -self.scores), axis=-1)[:, : self.k]
        up = np.lexsort((self.ids, self.scores), axis=-1)[:, : self.k]
        take = np.take_along_axis
        return (
            take(self.scores, down, 1),
            take(self.ids, down, 1),
            take(self.scores, up, 1),
            take(self.ids, up, 1),
        )


def _scan_both(blocks, queries: np.ndarray, top_k: int):
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best, worst = _TopK(len(queries), top_k), _TopK(len(queries), top_k)
    for vectors, ids in blocks:
        _offer_block(queries, vectors, ids, best, worst)
    helpful_scores, helpful_ids = best.result()
    harmful_scores, harmful_ids = worst.result()
    return helpful_scores, helpful_ids, -harmful_scores, harmful_ids


def _offer_block(queries, vectors: np.ndarray, ids: np.ndarray, best: _TopK, worst: _TopK) -> None:
    """Score one block ``vectors`` [rows, d] float32 with every query and offer the scores to the running
    helpful (``best``) and harmful (``worst``, negated keys) top-k."""
    scores = queries @ vectors.T  # [q, rows]
    best.offer(scores, ids)
    worst.offer(np.negative(scores, out=scores), ids)


class _TopK:
    """The ``k`` largest keys of each query row seen so far, kept over blocks of columns.

    A block first meets the running threshold (each row's k-th largest key so far): only the keys above it
    are candidates. While most keys pass (the first blocks), the block is partitioned row by row
    (argpartition) and merged; once few pass, only those are gathered and merged. The sort happens once,
    in `result`.
    """

    def __init__(self, queries: int, k: int):
        self.k = k
        self.keys = np.full((queries, 0), -np.inf, np.float32)
        self.ids = np.zeros((queries, 0), np.int64)
        self.threshold = np.full((queries, 1), -np.inf, np.float32)

    def offer(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """``keys`` [q, rows] and the rows' ``ids`` [rows] (or [q, rows], one list per query)."""
        ids = np.broadcast_to(ids, keys.shape)
        above = keys > self.threshold  # [q, rows]
        passing = int(np.count_nonzero(above))
        if passing == 0:
            return
        if passing * 4 > keys.size:  # dense: the block's own top k of each row
            if keys.shape[1] > self.k:
                part = np.argpartition(keys, keys.shape[1] - self.k, axis=1)[:, -self.k :]
                keys, ids = np.take_along_axis(keys, part, 1), np.take_along_axis(ids, part, 1)
        else:  # sparse: the passing keys, padded to the widest row
            rows, columns = np.nonzero(above)
            counts = np.bincount(rows, minlength=len(keys))
            slots = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
            gathered = np.full((len(keys), counts.max()), -np.inf, np.float32)
            gathered_ids = np.full((len(keys), counts.max()), -1, np.int64)
            gathered[rows, slots], gathered_ids[rows, slots] = keys[rows, columns], ids[rows, columns]
            keys, ids = gathered, gathered_ids
        keys, ids = np.concatenate([self.keys, keys], 1), np.concatenate([self.ids, ids], 1)
        if keys.shape[1] > self.k:
            part = np.argpartition(keys, keys.shape[1] - self.k, axis=1)[:, -self.k :]
            keys, ids = np.take_along_axis(keys, part, 1), np.take_along_axis(ids, part, 1)
        self.keys, self.ids = keys, ids
        if keys.shape[1] == self.k:
            self.threshold = keys.min(axis=1, keepdims=True)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, ids) [q, k], largest first; equal keys by id."""
        order = np.lexsort((self.ids, -self.keys), axis=-1)
        return np.take_along_axis(self.keys, order, 1), np.take_along_axis(self.ids, order, 1)


def _flat_codes(index: faiss.Index) -> tuple[np.ndarray, str] | None:
    """(codes [n, bytes a row] uint8, dtype) of a CPU IndexIDMap2 over a flat index, as a view; None for
    other kinds (GPU, sharded, IndexIDMap) and empty ones."""
    if not isinstance(index, faiss.IndexIDMap2):
        return None
    flat = faiss.downcast_index(index.index)
    if not isinstance(flat, (faiss.IndexFlatIP, faiss.IndexScalarQuantizer)) or flat.ntotal == 0:
        return None
    dtype = vector_dtype_of(index)
    row_bytes = flat.d * (4 if dtype == "float32" else 2)
    codes = faiss.rev_swig_ptr(flat.codes.data(), flat.ntotal * row_bytes)
    return codes.reshape(flat.ntotal, row_bytes), dtype


def _decode(codes: np.ndarray, dtype: str, dimension: int) -> np.ndarray:
    """Rows in byte form [n, bytes a row] (a fresh, aligned copy: `search_both_among`) -> float32 [n, d]:
    float32 a view, float16 converted."""
    codes = np.ascontiguousarray(codes)
    if dtype == "float32":
        return codes.view(np.float32).reshape(len(codes), dimension)
    return half_to_float(codes, np.empty((len(codes), dimension), np.float32))
