"""The index folder: where each generation's files live, and how a generation is written, read and removed.

Layout of an index folder (generation g, four digits; the manifest names the current one)::

    manifest.json                 the commit point: written last, atomically (`manifest`)
    vectors-gNNNN.faiss           FAISS exact inner-product index of the sketches, ids = example ids
                                  (read in place and written as a stream: `vector_file`)
    rejected-gNNNN.jsonl          {"id", "reason"} of every row that could not be indexed
    metadata/rows_gNNNN.lance/    LanceDB table: one row per indexed example (`row_table.SCHEMA`), written
                                  as a stream through .rows-gNNNN.arrow.tmp (its rows until their column
                                  types are known; removed once the table is written)
    .build/                       the journal of an unfinished build (`journal`)
    .lock, .readers/gNNNN         the writer lock and reader leases (`lock`)

A build writes generation g + 1 beside g and switches by writing the manifest; the old generation's
files are removed once no reader holds a lease on them. This module is the only one that knows these
names; FAISS (`vector_index`) and LanceDB (`row_table`) are read and written through it. Both are imported on
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
from rapidin_index.errors import IntegrityError, StoreError
from rapidin_index.files import atomic_write_bytes, writing
from rapidin_index.store.checksums import file_entry

if TYPE_CHECKING:
    import faiss
    import numpy as np

    from rapidin_index.store.manifest import Manifest
    from rapidin_index.store.vector_file import VectorWriter

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


def check_listed(index_dir: str | Path, manifest: Manifest) -> None:
    """Every file of the manifest's generation (vectors, rows, rejected rows) is listed in its ``files``."""
    from rapidin_index.store.manifest import DAMAGED

    generation = manifest.generation
    names = [
        vector_file(generation),
        table_path(".", generation).as_posix(),
        rejected_file(generation),
    ]
    unlisted = [name for name in names if name not in manifest.files]
    if unlisted:
        raise IntegrityError(
            f"{index_dir}: the manifest names generation {generation} but does not list its "
            f"{', '.join(unlisted)} (it lists {', '.join(sorted(manifest.files)) or 'nothing'}); {DAMAGED}"
        )


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
    from rapidin_index.store import vector_index

    return vector_index.load_index(Path(index_dir) / vector_file(generation), mapped)


def open_vectors(index_dir: str | Path, generation: int, max_memory: int | None = None):
    """The generation's vectors file read in place (`vector_file.StoredVectors`)."""
    from rapidin_index.store.vector_file import StoredVectors

    return StoredVectors(Path(index_dir) / vector_file(generation), max_memory)


def load_vectors(index_dir: str | Path, generation: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int64, vectors [n, dim] float32) of a generation, in insertion order."""
    from rapidin_index.store import vector_index

    return vector_index.stored_vectors(load_faiss(index_dir, generation))


def read_all_rows(index_dir: str | Path, generation: int) -> list[dict]:
    """Every metadata row of a generation (``source`` still JSON text)."""
    from rapidin_index.store import row_table

    return row_table.read_all(Path(index_dir) / DATABASE_DIR, table_name(generation))


def read_row_ids(index_dir: str | Path, generation: int) -> np.ndarray:
    """The ids [n] of a generation's LanceDB rows, in table order (the text is not read)."""
    from rapidin_index.store import row_table

    return row_table.read_ids(Path(index_dir) / DATABASE_DIR, table_name(generation))


def iter_rows(index_dir: str | Path, generation: int, order=None) -> Iterable[list[dict]]:
    """A generation's metadata rows a page at a time (`row_table.iter_rows`): in table order, or in the
    order of the table positions ``order``; what an append or merge copies into its new generation."""
    from rapidin_index.store import row_table

    return row_table.iter_rows(Path(index_dir) / DATABASE_DIR, table_name(generation), order)


def open_rows(index_dir: str | Path, generation: int):
    """The generation's LanceDB table, for `row_table.read_rows` joins."""
    from rapidin_index.store import row_table

    return row_table.open_table(Path(index_dir) / DATABASE_DIR, table_name(generation))


def rows_of_hits(index_dir: str | Path, table, ids: list[int]) -> dict[int, dict]:
    """{id: row} of the hits FAISS found (`row_table.read_rows`); a hit whose row the LanceDB table lost
    is refused on one line naming the index, never answered without its text (or with a KeyError)."""
    from rapidin_index.store import row_table

    rows = row_table.read_rows(table, ids)
    missing = sorted(set(ids) - set(rows))
    if missing:
        raise IntegrityError(
            f"{index_dir}: row {missing[0]} is in the FAISS file but not in the LanceDB table {table.name} "
            f"({len(missing)} such rows): the index is damaged; re-import its bundle or rebuild it"
        )
    return rows


def count_rows(index_dir: str | Path, generation: int) -> int:
    from rapidin_index.store import row_table

    return row_table.count_rows(Path(index_dir) / DATABASE_DIR, table_name(generation))


def read_rejected(index_dir: str | Path, manifest: Manifest) -> list[RejectedRow]:
    path = Path(index_dir) / rejected_file(manifest.generation)
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise IntegrityError(f"{path} is damaged (not UTF-8): {_DAMAGED_FIX}") from None
    return [_rejected_row(path, number, line) for number, line in enumerate(lines, 1) if line]


_DAMAGED_FIX = "re-import the index's bundle or rebuild it"


def _rejected_row(path: Path, number: int, line: str) -> RejectedRow:
    try:
        row = json.loads(line)
        return RejectedRow(example_id=int(row["id"]), reason=str(row["reason"]))
    except (ValueError, KeyError, TypeError) as error:
        raise IntegrityError(
            f"{path}, line {number} is damaged ({type(error).__name__}): {_DAMAGED_FIX}"
        ) from None


# --------------------------------------------------------------------------- write


def vector_writer(index_dir: Path, generation: int, dimension: int, vector_dtype: str) -> VectorWriter:
    """A streaming writer of the generation's vectors file (`vector_file.VectorWriter`), for
    `write_generation`."""
    from rapidin_index.store.vector_file import VectorWriter

    return VectorWriter(Path(index_dir) / vector_file(generation), dimension, vector_dtype)


def write_generation(
    index_dir: Path,
    generation: int,
    vectors: faiss.Index | VectorWriter,
    row_batches: Iterable[list[dict]],
    rejected: list[dict],
    expected_ids: Iterable[int] | None = None,
) -> dict:
    """Write a generation's three parts; returns the manifest's ``files`` (path: sha256, bytes).

    ``row_batches`` is consumed first (it may add to ``vectors`` and ``rejected`` as it goes, as a build
    reading its journal does); the rejected rows are written after it. ``vectors``: a FAISS index (saved
    whole) or a `vector_writer` (not yet entered: it is open while ``row_batches`` runs, so rows reach
    the file chunk by chunk, and complete once they are consumed). With ``expected_ids``, every one of
    them must then be in exactly one place (`row_id_problem`). A write the disk refuses ends in one
    `WriteError` naming the folder; on any failure the new generation's files are removed again (the
    manifest does not name them yet, so nothing committed is touched).
    """
    import faiss

    from rapidin_index.store import row_table, vector_index
    from rapidin_index.store.vector_file import VectorWriter

    index_dir.mkdir(parents=True, exist_ok=True)
    row_ids: list[int] = []
    text_bytes = [0]

    def counted():
        for rows in row_batches:
            row_ids.extend(row["id"] for row in rows)
            text_bytes[0] += sum(
                len(row["source"]) + len(row["prompt"]) + len(row["response"]) for row in rows
            )
            yield rows

    streamed = isinstance(vectors, VectorWriter)

    def needed() -> int:  # what this generation takes on disk, about: vectors, row text, rejected rows
        vector_bytes = vectors.count * vectors.row_bytes if streamed else 4 * vectors.ntotal * vectors.d
        return vector_bytes + 3 * text_bytes[0] + 64 * len(rejected) + (1 << 16)  # text: spill + table

    def check(vector_ids) -> None:
        if expected_ids is None:
            return
        problem = row_id_problem(vector_ids, row_ids, [row["id"] for row in rejected], expected_ids)
        if problem:
            raise StoreError(
                f"{index_dir}: generation {generation} would not hold every row exactly once "
                f"({problem}); nothing was committed"
            )

    database, name = index_dir / DATABASE_DIR, table_name(generation)
    spill = index_dir / f".rows-g{generation:04d}.arrow.tmp"  # a killed write's is debris (remove_debris)
    with writing(index_dir, needed):  # outermost: the free space it reports is after the cleanup
        try:
            if streamed:
                with vectors:  # the file is complete (and in place) once the block ends cleanly
                    row_table.write_table(database, name, counted(), spill)
                    check(vectors.written_ids())
            else:
                row_table.write_table(database, name, counted(), spill)
                check(faiss.vector_to_array(vectors.id_map).tolist())
                vector_index.save_index(vectors, index_dir / vector_file(generation))
            text = "".join(json.dumps(row) + "\n" for row in rejected)
            atomic_write_bytes(index_dir / rejected_file(generation), text.encode())
            return file_checksums(index_dir, generation)
        except BaseException:
            remove_generation(index_dir, generation)
            raise


def row_id_problem(
    vector_ids: Iterable[int], row_ids: Iterable[int] | None, rejected_ids: Iterable[int], expected_ids
) -> str:
    """'' when every id of ``expected_ids`` is in exactly one place (the vectors, and then also the rows,
    or the rejected rows) and no other id is anywhere; else the first thing wrong, naming a row.

    The check every commit makes (build, append, merge) before it writes its manifest. In numpy (8 bytes
    an id, sorted), not Python sets: it runs over every id of the index."""
    import numpy as np

    vector_ids = _id_array(vector_ids)
    seen, counts = np.unique(np.concatenate([vector_ids, _id_array(rejected_ids)]), return_counts=True)
    twice = seen[counts > 1]
    if len(twice):
        return f"row {twice[0]} is present more than once ({len(twice)} such rows)"
    expected = np.unique(_id_array(expected_ids))
    missing = np.setdiff1d(expected, seen, assume_unique=True)
    if len(missing):
        return f"row {missing[0]} is missing ({len(missing)} rows missing)"
    unknown = np.setdiff1d(seen, expected, assume_unique=True)
    if len(unknown):
        return f"row {unknown[0]} is not a row of this index's data ({len(unknown)} such rows)"
    if row_ids is not None:
        row_ids = _id_array(row_ids)
        if not np.array_equal(np.sort(row_ids), np.sort(vector_ids)):
            everything = np.union1d(row_ids, vector_ids)
            in_rows = np.bincount(np.searchsorted(everything, row_ids), minlength=len(everything))
            in_vectors = np.bincount(np.searchsorted(everything, vector_ids), minlength=len(everything))
            odd = everything[np.flatnonzero(in_rows != in_vectors)[0]]
            return (
                f"LanceDB holds {len(row_ids)} rows and FAISS {len(vector_ids)} vectors; row {odd} "
                "is not once in each"
            )
    return ""


def _id_array(ids) -> np.ndarray:
    import numpy as np

    if isinstance(ids, range):
        return np.arange(ids.start, ids.stop, ids.step, dtype=np.int64)
    return np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)


def file_checksums(index_dir: Path, generation: int) -> dict:
    files = {}
    for path in (
        index_dir / vector_file(generation),
        index_dir / rejected_file(generation),
        table_path(index_dir, generation),
    ):
        files[path.relative_to(index_dir).as_posix()] = file_entry(path)  # sha256, xxh3_128, bytes
    return files


def remove_generation(index_dir: Path, generation: int) -> None:
    """Remove a generation's files, torn temporaries included."""
    for path in index_dir.glob(f"*-g{generation:04d}.*"):
        path.unlink(missing_ok=True)
    shutil.rmtree(table_path(index_dir, generation), ignore_errors=True)


def remove_journal(index_dir: Path) -> None:
    shutil.rmtree(index_dir / JOURNAL_DIR, ignore_errors=True)


def remove_debris(index_dir: Path, committed: int | None, generations: bool = True) -> list[str]:
    """Remove what a killed writer left in ``index_dir``: `files.atomic_file` temporaries
    (``.NAME.XXXX.tmp``) of the manifest, a generation's files and the journal, and (``generations``) every file
    and table of a generation newer than ``committed`` (the manifest's; None: no manifest, so every
    generation is uncommitted). Call with the writer lock held. Returns the names removed."""
    removed = []
    temporaries = [
        *index_dir.glob(".manifest.json.*.tmp"),
        *index_dir.glob(".import-moving.json.*.tmp"),
        *index_dir.glob(".*-g[0-9][0-9][0-9][0-9].*.tmp"),
        *(index_dir / JOURNAL_DIR).glob(".*.tmp"),
    ]  # only the names of our own files: an export may be writing its bundle into this folder
    for path in temporaries:
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.relative_to(index_dir).as_posix())
    for path in generation_paths(index_dir) if generations else []:
        generation = generation_of(path.name)
        if generation is not None and (committed is None or generation > committed):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.relative_to(index_dir).as_posix())
    database = index_dir / DATABASE_DIR
    if committed is None and database.is_dir() and not any(database.iterdir()):
        database.rmdir()
    return removed
