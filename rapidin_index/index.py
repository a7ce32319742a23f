"""The FAISS side of the index: exact inner-product search over the sketches, ids = training example ids."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from rapidin_index.errors import IntegrityError, StoreError
from rapidin_index.files import atomic_file
from rapidin_index.settings import MAX_VECTOR_DIMENSION, VECTOR_DTYPES

MAX_DIMENSION = MAX_VECTOR_DIMENSION  # what faiss.read_index accepts back


def new_index(dimension: int, vector_dtype: str = "float32") -> faiss.IndexIDMap2:
    """Exact, brute-force inner-product search whose ids are the training example ids.

    float32: IndexFlatIP (4 bytes a dimension). float16: a flat IndexScalarQuantizer with QT_fp16 (2 bytes
    a dimension): still an exhaustive scan, scores accumulated in float32 over the stored fp16 values.
    """
    if dimension > MAX_DIMENSION:
        raise StoreError(f"{dimension:,} dimensions: FAISS reads back indexes of at most {MAX_DIMENSION:,}")
    if vector_dtype == "float32":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
    if vector_dtype == "float16":
        quantizer = faiss.ScalarQuantizer.QT_fp16
        return faiss.IndexIDMap2(faiss.IndexScalarQuantizer(dimension, quantizer, faiss.METRIC_INNER_PRODUCT))
    raise StoreError(f"vector dtype {vector_dtype!r} is not one of {', '.join(VECTOR_DTYPES)}")


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


def load_index(path: str | Path) -> faiss.Index:
    """The FAISS file; a truncated, empty or overwritten one is refused on one line, not FAISS's trace."""
    try:
        return faiss.read_index(str(path))
    except RuntimeError as error:
        reason = next((line for line in str(error).splitlines() if "Error" in line), str(error)).strip()
        raise IntegrityError(
            f"{path} cannot be read by FAISS ({reason[:160]}): the index is damaged; re-import its bundle "
            "or rebuild it"
        ) from None


def stored_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int64, vectors [n, dim] float32) in insertion order."""
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    flat = faiss.downcast_index(index.index)
    vectors = flat.reconstruct_n(0, flat.ntotal) if flat.ntotal else np.zeros((0, flat.d), np.float32)
    return ids, vectors


def vectors_of(index: faiss.Index, ids: list[int]) -> np.ndarray:
    """The stored vectors [len(ids), dim] float32 of these training example ids (an IndexIDMap2)."""
    if not ids:
        return np.zeros((0, index.d), np.float32)
    return np.stack([index.reconstruct(int(row_id)) for row_id in ids])


def search(index: faiss.Index, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN by inner product: (scores [q, k] float32, ids [q, k] int64), best first."""
    top_k = min(top_k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), top_k)


_SCAN_ROWS = 1 << 16  # stored vectors scored per matrix product: bounds the [queries, rows] temporary


def search_both_among(
    index: faiss.Index, queries: np.ndarray, top_k: int, among: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`search_both` over the rows whose ids are in ``among`` only: the exact top and bottom k of that
    subset (never a filtered global top-k, which could hold fewer than k). ``index`` is the CPU one."""
    among = np.unique(np.asarray(among, dtype=np.int64))
    matrix = _flat_matrix(index)
    if matrix is not None:
        positions = np.nonzero(np.isin(faiss.vector_to_array(index.id_map), among))[0]
        vectors, ids = matrix[positions], faiss.vector_to_array(index.id_map)[positions].astype(np.int64)
    else:
        vectors, ids = vectors_of(index, among.tolist()), among
    subset = new_index(index.d)
    add_vectors(subset, vectors, ids)
    return search_both(subset, queries, top_k)


def search_both(
    index: faiss.Index, queries: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-k and bottom-k by inner product in one scan: (helpful scores, ids, harmful scores, ids).

    Helpful are best first, harmful most negative first; [q, k] each. A CPU float32 flat index is scanned
    with one matrix product per block of stored rows (its vectors read in place, never copied); any other
    index (float16, GPU, sharded) answers one FAISS search of the queries stacked with their negations.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    top_k = min(top_k, index.ntotal)
    if top_k < 1:  # an empty index (FAISS asserts k > 0)
        empty = (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
        return (*empty, *empty)
    matrix = _flat_matrix(index)
    if matrix is None:
        scores, ids = index.search(np.concatenate([queries, -queries]), top_k)
        count = len(queries)
        return scores[:count], ids[:count], -scores[count:], ids[count:]
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    best = [np.full((len(queries), 0), -np.inf, np.float32), np.zeros((len(queries), 0), np.int64)]
    worst = [np.full((len(queries), 0), np.inf, np.float32), np.zeros((len(queries), 0), np.int64)]
    for start in range(0, len(ids), _SCAN_ROWS):
        scores = queries @ matrix[start : start + _SCAN_ROWS].T  # [q, rows]
        rows = np.broadcast_to(ids[start : start + _SCAN_ROWS], scores.shape)
        best = _keep(np.concatenate([best[0], scores], 1), np.concatenate([best[1], rows], 1), top_k, True)
        worst = _keep(
            np.concatenate([worst[0], scores], 1), np.concatenate([worst[1], rows], 1), top_k, False
        )
    return best[0], best[1], worst[0], worst[1]


def _keep(scores: np.ndarray, ids: np.ndarray, top_k: int, largest: bool) -> list[np.ndarray]:
    """The ``top_k`` largest (or smallest) scores of each row, sorted, with their ids."""
    keyed = -scores if largest else scores
    if keyed.shape[1] > top_k:
        part = np.argpartition(keyed, top_k - 1, axis=1)[:, :top_k]
        keyed, scores, ids = (np.take_along_axis(a, part, 1) for a in (keyed, scores, ids))
    order = np.argsort(keyed, axis=1, kind="stable")
    return [np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)]


def _flat_matrix(index: faiss.Index) -> np.ndarray | None:
    """The [n, d] float32 vectors of a CPU IndexIDMap2(IndexFlatIP), as a view; None for other kinds."""
    if not isinstance(index, faiss.IndexIDMap2):
        return None
    flat = faiss.downcast_index(index.index)
    if not isinstance(flat, faiss.IndexFlatIP) or flat.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
