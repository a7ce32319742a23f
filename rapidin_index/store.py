"""The index folder: where each generation's files live, and how a generation is written, read and removed.

Layout of an index folder (generation g, four digits; the manifest names the current one)::

    manifest.json                 the commit point: written last, atomically (`manifest`)
    vectors-gNNNN.faiss           FAISS exact inner-product index of the sketches, ids = example ids
                                  (read in place and written as a stream: `vector_file`)
    rejected-gNNNN.jsonl          {"id", "reason"} of every row that could not be indexed
    metadata/rows_gNNNN.lance/    LanceDB table: one row per indexed example (`metadata.SCHEMA`)
    .build/                       the journal of an unfinished build (`journal`)
    .lock, .readers/gNNNN         the writer lock and reader leases (`lock`)

A build writes generation g + 1 beside g and switches by writing the manifest; the old generation's
files are removed once no reader holds a lease on them. This module is the only one that knows these
names; FAISS (`index`) and LanceDB (`metadata`) are read and written through it. Both are imported on
first use, so that the lock and the CLI's cheap checks do not pay for them.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from rapidin_index.data import RejectedRow
from rapidin_index.files import atomic_write_bytes, sha256_path, tree_bytes

if TYPE_CHECKING:
    import faiss
    import numpy as np

    from rapidin_index.manifest import Manifest
    from rapidin_index.vector_file import VectorWriter

JOURNAL_DIR = ".build"
DATABASE_DIR = "metadata"
_GENERATION = re.compile(r"(?:^|[-_])g(\d{4})(?:\.|$)")
_GENERATION_IN_NAME = re.compile(r"([-_])g\d{4}(\.)")


# --------------------------------------------------------------------------- names


def vector_file(generation: int) -> str:
    return f"vectors-g{generation:04d}.faiss"


def rejected_file(generation: int) -> str:
    return f"rejected-g{generation:04d}.jsonl"


def table_name(generation: int) -> str:
    return f"rows_g{generation:04d}"


def table_path(index_dir: str | Path, generation: int) -> Path:
    return Path(index_dir) / DATABASE_DIR / f"{table_name(generation)}.lance"


def generation_of(name: str) -> int | None:
    """The generation a file, table or lease name belongs to, or None."""
    match = _GENERATION.search(name)
    return int(match.group(1)) if match else None


def renamed_to_generation(relative: str, generation: int) -> str:
    """``relative`` (a path the manifest lists) with its generation number replaced by ``generation``."""
    return _GENERATION_IN_NAME.sub(lambda m: f"{m.group(1)}g{generation:04d}{m.group(2)}", relative)


def generation_paths(index_dir: Path) -> list[Path]:
    """Every data file (and torn temporary) and LanceDB table of any generation in the folder."""
    return [*index_dir.glob("*-g[0-9][0-9][0-9][0-9].*"), *(index_dir / DATABASE_DIR).glob("rows_g*.lance")]


# --------------------------------------------------------------------------- read


def load_faiss(index_dir: str | Path, generation: int, mapped: bool = False) -> faiss.Index:
    """The generation's FAISS index; ``mapped``: its vectors mapped from the file, not read (FAISS's
    ``IO_FLAG_MMAP_IFC``)."""
    from rapidin_index import index as vector_index

    return vector_index.load_index(Path(index_dir) / vector_file(generation), mapped)


def open_vectors(index_dir: str | Path, generation: int, max_memory: int | None = None):
    """The generation's vectors file read in place (`vector_file.StoredVectors`)."""
    from rapidin_index.vector_file import StoredVectors

    return StoredVectors(Path(index_dir) / vector_file(generation), max_memory)


def load_vectors(index_dir: str | Path, generation: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int64, vectors [n, dim] float32) of a generation, in insertion order."""
    from rapidin_index import index as vector_index

    return vector_index.stored_vectors(load_faiss(index_dir, generation))


def read_all_rows(index_dir: str | Path, generation: int) -> list[dict]:
    """Every metadata row of a generation (``source`` still JSON text)."""
    from rapidin_index import metadata

    return metadata.read_all(Path(index_dir) / DATABASE_DIR, table_name(generation))


def open_rows(index_dir: str | Path, generation: int):
    """The generation's LanceDB table, for `metadata.read_rows` joins."""
    from rapidin_index import metadata

    return metadata.open_table(Path(index_dir) / DATABASE_DIR, table_name(generation))


def count_rows(index_dir: str | Path, generation: int) -> int:
    from rapidin_index import metadata

    return metadata.count_rows(Path(index_dir) / DATABASE_DIR, table_name(generation))


def read_rejected(index_dir: str | Path, manifest: Manifest) -> list[RejectedRow]:
    path = Path(index_dir) / rejected_file(manifest.generation)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [RejectedRow(example_id=row["id"], reason=row["reason"]) for row in rows]


# --------------------------------------------------------------------------- write


def vector_writer(index_dir: Path, generation: int, dimension: int, vector_dtype: str) -> VectorWriter:
    """A streaming writer of the generation's vectors file (`vector_file.VectorWriter`), for
    `write_generation`."""
    from rapidin_index.vector_file import VectorWriter

    return VectorWriter(Path(index_dir) / vector_file(generation), dimension, vector_dtype)


def write_generation(
    index_dir: Path,
    generation: int,
    vectors: faiss.Index | VectorWriter,
    row_batches: Iterable[list[dict]],
    rejected: list[dict],
) -> dict:
    """Write a generation's three parts; returns the manifest's ``files`` (path: sha256, bytes).

    ``row_batches`` is consumed first (it may add to ``vectors`` and ``rejected`` as it goes, as a build
    reading its journal does); the rejected rows are written after it. ``vectors``: a FAISS index (saved
    whole) or a `vector_writer` (not yet entered: it is open while ``row_batches`` runs, so rows reach
    the file chunk by chunk, and complete once they are consumed).
    """
    from rapidin_index import index as vector_index
    from rapidin_index import metadata
    from rapidin_index.vector_file import VectorWriter

    index_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(vectors, VectorWriter):
        with vectors:
            metadata.write_table(index_dir / DATABASE_DIR, table_name(generation), row_batches)
    else:
        metadata.write_table(index_dir / DATABASE_DIR, table_name(generation), row_batches)
        vector_index.save_index(vectors, index_dir / vector_file(generation))
    text = "".join(json.dumps(row) + "\n" for row in rejected)
    atomic_write_bytes(index_dir / rejected_file(generation), text.encode())
    return file_checksums(index_dir, generation)


def file_checksums(index_dir: Path, generation: int) -> dict:
    files = {}
    for path in (
        index_dir / vector_file(generation),
        index_dir / rejected_file(generation),
        table_path(index_dir, generation),
    ):
        files[path.relative_to(index_dir).as_posix()] = {
            "sha256": sha256_path(path),
            "bytes": tree_bytes(path),
        }
    return files


def remove_generation(index_dir: Path, generation: int) -> None:
    """Remove a generation's files, torn temporaries included."""
    for path in index_dir.glob(f"*-g{generation:04d}.*"):
        path.unlink(missing_ok=True)
    shutil.rmtree(table_path(index_dir, generation), ignore_errors=True)


def remove_journal(index_dir: Path) -> None:
    shutil.rmtree(index_dir / JOURNAL_DIR, ignore_errors=True)
