"""The vectors file read in place and written as a stream, in FAISS's own format (`faiss.read_index` reads it).

A generation's ``vectors-gNNNN.faiss`` is an ``IndexIDMap2`` over an ``IndexFlatIP`` (float32) or a flat
``IndexScalarQuantizer`` QT_fp16 (float16). Its bytes are::

    header            IxM2 + index header (d, ntotal, ...), then the inner index's fourcc + header
    uint64            length of the codes (float32: in floats; float16: in bytes)
    codes             [ntotal, d] float32 or float16, row after row, in insertion order
    uint64, int64[n]  the ids, in the same order

`StoredVectors` maps that file and reads the codes in blocks (never the whole matrix: see `SCAN_BLOCK_BYTES`);
`VectorWriter` writes the same bytes from chunks of rows, so that a build, an append or a merge never holds
more than a chunk of vectors. Both check the layout against the header and refuse a file they do not
recognise on one line (`IntegrityError`), as `vector_index.load_index` does.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from pathlib import Path

import faiss
import numpy as np

from rapidin_index.errors import IntegrityError, StoreError
from rapidin_index.files import atomic_file
from rapidin_index.settings import MAX_VECTOR_DIMENSION, VECTOR_DTYPES

MAX_DIMENSION = MAX_VECTOR_DIMENSION  # what faiss.read_index accepts back

SCAN_BLOCK_BYTES = 32 << 20
"""Stored bytes read per block of a scan with many query vectors (32 MiB: 2,048 rows at K = 4,096 in
float32, 4,096 in float16). A query holds one such block, its float32 copy (float16) and the [vectors, rows]
scores, plus the ids (8 bytes a row), whatever the number of rows; with few vectors, one chunk
(`HALF_CHUNK_BYTES`, `FLOAT_CHUNK_BYTES`) and a span of scores (`vector_index.SPAN_BYTES`) instead."""
HALF_CHUNK_BYTES = 1 << 20
"""float32 bytes of float16 rows converted at once before their product with few query vectors (1 MiB:
64 rows at K = 4,096). The converted rows are still in cache for the product: converting into such a
buffer cost 0.78-0.88x the float32 product of the same rows, into a 32 MiB block 1.5-2.3x (CPU time,
`benchmarks/search_profile.py`; BENCHMARKS.md, issue 27 item 3)."""
FLOAT_CHUNK_BYTES = SCAN_BLOCK_BYTES
"""float32 rows scored at once with few query vectors: read in place, one product (BLAS blocks it)."""
_INNER_KINDS = {b"IxFI": "float32", b"IxSQ": "float16"}
_INNER_HEADER_AT = 37  # the IxM2 fourcc (4) and index header (d 4, ntotal 8, 2 x 8 unused, 1, metric 4)
_PAGE = mmap.PAGESIZE


def half_to_float(codes: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float16 rows in byte form [n, 2d] -> ``out`` [n, d] float32 (exact). torch's conversion is
    vectorised (F16C); numpy's, here, converts 3x slower than torch and 5x slower than a float32 product."""
    torch_from_numpy(out).copy_(_as_half_tensor(codes))
    return out


def score_codes(
    codes: np.ndarray, vector_dtype: str, queries: np.ndarray, out: np.ndarray, chunk_bytes: int
) -> None:
    """``out`` [q, n] = ``queries`` [q, d] float32 x rows ``codes`` [n, bytes a row] (a file's byte form)
    transposed, accumulated in float32 over the stored values, ``chunk_bytes`` of float32 rows at a time.

    float16 rows are converted chunk by chunk into one cache-sized buffer just before their product (see
    `HALF_CHUNK_BYTES`); float32 rows are multiplied where they are, aligned or not (a mapped file's rows
    are not 4-byte aligned: torch's BLAS reads them in place, where numpy's would need a copy).
    """
    import torch

    step = max(1, chunk_bytes // (4 * queries.shape[1]))
    query = torch.from_numpy(queries)  # [q, d]
    scores = torch_from_numpy(out).split(step, dim=1)  # [q, step] views of out
    if vector_dtype == "float16":
        rows = _as_half_tensor(codes)
        buffer = torch.empty((min(step, len(codes)), queries.shape[1]), dtype=torch.float32)
    else:
        rows, buffer = torch_from_numpy(codes.view(np.float32)), None  # [n, d] in place
    for chunk, into in zip(rows.split(step), scores, strict=True):
        if buffer is not None:
            chunk = (buffer if len(chunk) == len(buffer) else buffer[: len(chunk)]).copy_(chunk)  # exact
        if len(query) == 1:
            torch.mv(chunk, query[0], out=into[0])
        else:
            torch.mm(query, chunk.T, out=into)


def torch_from_numpy(array: np.ndarray):
    """``torch.from_numpy`` of a possibly read-only array (a mapping): torch warns that it could write
    there; it only reads."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _as_half_tensor(codes: np.ndarray):
    """float16 rows in byte form [n, 2d] as a torch float16 tensor [n, d] over the same memory."""
    if codes.ctypes.data % 2 or not codes.flags.c_contiguous:  # FAISS writes them 2-byte aligned
        codes = codes.copy()
    return torch_from_numpy(codes.view(np.float16))


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count}B"


def _bytes_per_row(dimension: int, vector_dtype: str) -> int:
    return dimension * (4 if vector_dtype == "float32" else 2)


class StoredVectors:
    """A vectors file mapped read-only: ids in RAM (8 bytes a row), vectors read block by block.

    ``drop_pages``: after each block, the mapping's pages are released (``madvise(DONTNEED)``), so that
    the process's resident set stays at one block whatever the file's size (a scan then reads from the
    page cache each time); without it the mapped pages stay resident, shared with every other process
    that maps the file, and a second scan finds them mapped. Searches of a float16 file with one or two
    vectors (uncapped) go through `faiss_index`, FAISS's own reading of the mapped file, which also holds
    FAISS's id maps (O(N), tens of bytes a row).
    """

    def __init__(self, path: str | Path, max_memory: int | None = None):
        self.path = Path(path)
        self.drop_pages = max_memory is not None
        try:
            with open(self.path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as error:
            raise IntegrityError(f"{self.path} cannot be read ({error.strerror})") from None
        raw = np.frombuffer(self._map, np.uint8) if self._map is not None else np.zeros(0, np.uint8)
        self.dimension, self.count, self.vector_dtype, self._codes_at = _layout(raw, self.path)
        self.row_bytes = _bytes_per_row(self.dimension, self.vector_dtype)
        self._codes = raw[self._codes_at : self._codes_at + self.count * self.row_bytes].reshape(
            self.count, self.row_bytes
        )  # [n, bytes a row] uint8: a view of the mapping
        ids_at = self._codes_at + self.count * self.row_bytes + 8
        self.ids = raw[ids_at : ids_at + 8 * self.count].copy().view(np.int64)  # [n]
        self._positions: np.ndarray | None = None
        self._faiss: faiss.Index | None = None
        self.max_block_bytes = SCAN_BLOCK_BYTES
        if max_memory is not None:
            self.max_block_bytes = min(SCAN_BLOCK_BYTES, self._block_within(max_memory))

    def _block_within(self, max_memory: int) -> int:
        """Block bytes that keep a scan within ``max_memory``: the ids and their sorted order (16 bytes a
        row) stay; the rest is halved between a block (float32 rows and scores) and its mapped pages."""
        block = (max_memory - 16 * self.count) // 2
        needed = 16 * self.count + 2 * (4 * self.dimension + 8 * 64)
        if block < 4 * self.dimension + 8 * 64:
            raise StoreError(
                f"--max-memory {format_bytes(max_memory)} is too small for {self.path}: its ids take "
                f"{format_bytes(16 * self.count)} and a block of one row more; give at least "
                f"{format_bytes(needed)}"
            )
        return block

    @property
    def nbytes(self) -> int:
        return self.count * self.row_bytes

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as float32 [rows, d] (a fresh array, or ``out``'s first rows)."""
        return self._decode(self._codes[start:stop], out)

    def scores(
        self, queries: np.ndarray, start: int, stop: int, out: np.ndarray, chunk_bytes: int | None = None
    ) -> None:
        """``out`` [q, stop - start] = the queries [q, d] float32 x rows [start, stop) (`score_codes`), read
        in chunks of ``chunk_bytes`` (default: `HALF_CHUNK_BYTES` or `FLOAT_CHUNK_BYTES`) that fit
        ``max_block_bytes`` (with ``drop_pages``, each chunk's pages released after it)."""
        chunk = chunk_bytes or (HALF_CHUNK_BYTES if self.vector_dtype == "float16" else FLOAT_CHUNK_BYTES)
        chunk = max(1, min(chunk, self.max_block_bytes // 2))
        step = stop - start
        if self.drop_pages:
            step = max(1, chunk // (4 * self.dimension))
        for first in range(start, stop, step):
            last = min(first + step, stop)
            rows = self._codes[first:last]
            score_codes(rows, self.vector_dtype, queries, out[:, first - start : last - start], chunk)
            self.release(first, last)

    def read_positions(self, positions: np.ndarray) -> np.ndarray:
        """The rows at these (sorted) positions, as float32 [len(positions), d]."""
        return self._decode(self._codes[positions], None)

    def _decode(self, codes: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        rows = len(codes)
        if out is None:
            out = np.empty((rows, self.dimension), np.float32)
        out = out[:rows]
        if self.vector_dtype == "float32":  # a byte copy: the file's rows are not 4-byte aligned
            out.reshape(-1).view(np.uint8)[:] = codes.reshape(-1)
        else:
            half_to_float(codes, out)
        return out

    def release(self, start: int, stop: int) -> None:
        """Give back the pages of rows [start, stop) (with ``drop_pages``); the file's data is untouched."""
        if not self.drop_pages or self._map is None or stop <= start:
            return
        first = self._codes_at + start * self.row_bytes
        first -= first % _PAGE
        last = self._codes_at + stop * self.row_bytes
        self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def faiss_index(self) -> faiss.Index:
        """The file as a FAISS index, its vectors mapped (read once, kept: its ids and their reverse map)."""
        if self._faiss is None:
            self._faiss = load_index(self.path, mapped=True)
        return self._faiss

    def positions_of(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of these training example ids (-1 where absent)."""
        if self._positions is None:
            self._positions = np.argsort(self.ids, kind="stable")
        ids = np.asarray(ids, dtype=np.int64)
        sorted_ids = self.ids[self._positions]
        found = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
        hit = (sorted_ids[found] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
        return np.where(hit, self._positions[found] if len(sorted_ids) else -1, -1)

    def vectors_of(self, ids: list[int]) -> np.ndarray:
        """The stored vectors [len(ids), d] float32 of these training example ids."""
        positions = self.positions_of(np.asarray(ids, dtype=np.int64))
        if (positions < 0).any():
            missing = np.asarray(ids)[positions < 0][:5].tolist()
            raise StoreError(f"{self.path} holds no vector with id {', '.join(map(str, missing))}")
        return self.read_positions(positions)

    def copy_rows_to(self, writer: VectorWriter, block_bytes: int = SCAN_BLOCK_BYTES) -> None:
        """Every row, as stored (no decode), appended to ``writer``, one block at a time."""
        if writer.vector_dtype != self.vector_dtype or writer.dimension != self.dimension:
            raise StoreError(
                f"{self.path} holds {self.vector_dtype} vectors of {self.dimension} dims; the new file "
                f"{writer.vector_dtype} of {writer.dimension}"
            )
        step = max(1, block_bytes // max(self.row_bytes, 1))
        for start in range(0, self.count, step):
            stop = min(start + step, self.count)
            writer.add_codes(self._codes[start:stop], self.ids[start:stop])
            self.release(start, stop)


def _layout(raw: np.ndarray, path: Path) -> tuple[int, int, str, int]:
    """(dimension, count, dtype, offset of the codes) of a vectors file, checked against its length."""

    def refuse(reason: str) -> IntegrityError:
        return IntegrityError(
            f"{path} cannot be read by FAISS ({reason}): the index is damaged; re-import its bundle or rebuild it"
        )

    if len(raw) < _INNER_HEADER_AT + 24 or bytes(raw[:4]) != b"IxM2":
        raise refuse("not an IndexIDMap2 vectors file" if len(raw) else "the file is empty")
    dimension, count = struct.unpack_from("<iq", bytes(raw[4:16]))
    vector_dtype = _INNER_KINDS.get(bytes(raw[_INNER_HEADER_AT : _INNER_HEADER_AT + 4]))
    if vector_dtype is None or dimension < 1 or count < 0:
        raise refuse("an index kind rapidin-index does not write")
    row_bytes = _bytes_per_row(dimension, vector_dtype)
    ids_at = len(raw) - 8 * count
    codes_at = ids_at - 8 - count * row_bytes
    if codes_at < _INNER_HEADER_AT + 8:
        raise refuse("the file is cut short")
    (codes_length,) = struct.unpack_from("<Q", bytes(raw[codes_at - 8 : codes_at]))
    (ids_length,) = struct.unpack_from("<Q", bytes(raw[ids_at - 8 : ids_at]))
    unit = 4 if vector_dtype == "float32" else 1
    if codes_length * unit != count * row_bytes or ids_length != count:
        raise refuse("its lengths do not match its header")
    return dimension, count, vector_dtype, codes_at


class VectorWriter:
    """Writes a vectors file from chunks of rows, never holding more than one chunk.

    ``with VectorWriter(path, d, dtype) as writer: writer.add(vectors, ids)``: the codes go straight to a
    temporary file beside ``path`` and the ids (8 bytes a row) are kept until the end; on a clean exit the
    header is completed and the file renamed into place (atomic, `files.atomic_file`). The bytes equal
    what ``faiss.write_index`` writes for the same rows (tested).
    """

    def __init__(self, path: str | Path, dimension: int, vector_dtype: str):
        self.path = Path(path)
        self.dimension = dimension
        self.vector_dtype = vector_dtype
        self.row_bytes = _bytes_per_row(dimension, vector_dtype)
        empty = faiss.serialize_index(new_index(dimension, vector_dtype))  # header + 2 empty vectors
        self._encoder = faiss.IndexScalarQuantizer(
            dimension, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )  # as `vector_index.new_index` makes it
        self._header = bytearray(empty[:-16].tobytes())
        self._ids: list[np.ndarray] = []
        self.count = 0

    def __enter__(self) -> VectorWriter:
        self._atomic = atomic_file(self.path)
        temporary = self._atomic.__enter__()
        self._file = open(temporary, "wb")
        self._file.write(self._header + b"\0" * 8)  # completed on close
        return self

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Rows [n, d] (any float dtype; stored as this file's dtype) with their ids [n]."""
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dimension):
            raise StoreError(f"{vectors.shape} vectors for {len(ids)} ids of {self.dimension} dims")
        if self.vector_dtype == "float32":
            codes = vectors.view(np.uint8).reshape(len(ids), self.row_bytes)
        else:  # FAISS's own float16 encoding (it rounds ties away from zero, numpy to even)
            codes = self._encoder.sa_encode(vectors)
        self.add_codes(codes, ids)

    def add_codes(self, codes: np.ndarray, ids: np.ndarray) -> None:
        """Rows already in this file's byte form [n, bytes a row] (another vectors file's codes)."""
        self._file.write(np.ascontiguousarray(codes).data)
        self._ids.append(np.asarray(ids, dtype=np.int64).copy())
        self.count += len(ids)

    def written_ids(self) -> np.ndarray:
        """The ids added so far [count] int64, in order."""
        return np.concatenate([np.zeros(0, np.int64), *self._ids])

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self._finish()
        finally:
            self._file.close()
            self._atomic.__exit__(kind, value, traceback)

    def _finish(self) -> None:
        unit = 4 if self.vector_dtype == "float32" else 1
        ids = self.written_ids()
        self._file.write(struct.pack("<Q", len(ids)))
        self._file.write(ids.tobytes())
        header = self._header
        struct.pack_into("<q", header, 8, self.count)  # the IndexIDMap2's ntotal
        struct.pack_into("<q", header, _INNER_HEADER_AT + 8, self.count)  # the inner index's
        self._file.seek(0)
        self._file.write(header + struct.pack("<Q", self.count * self.row_bytes // unit))


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


def load_index(path: str | Path, mapped: bool = False) -> faiss.Index:
    """The FAISS file; a truncated, empty or overwritten one is refused on one line, not FAISS's trace.

    ``mapped``: the flat vectors stay in the file, memory-mapped read-only (``IO_FLAG_MMAP_IFC``)."""
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mapped else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as error:
        reason = next((line for line in str(error).splitlines() if "Error" in line), str(error)).strip()
        raise IntegrityError(
            f"{path} cannot be read by FAISS ({reason[:160]}): the index is damaged; re-import its bundle "
            "or rebuild it"
        ) from None
