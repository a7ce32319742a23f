"""Portable bundles: export an index to one checksummed tar / tar.gz / tar.zst / zip file, verify it, import it.

The bundle layout and format version are in `rapidin_index.store.bundle`.

Plain ``tar -xf`` or ``unzip`` of a bundle gives a folder ``Index.open`` reads (it ignores bundle.json);
``import_bundle`` is the checked way in. The model is not in the bundle: the manifest names it and holds
its fingerprint, so the receiving team opens the index with ``Index.open(dir, model=their_copy)`` and a
model with other weights is refused.

What an import verifies, refusing with the bad member's name before anything reaches the index folder
(it unpacks into a hidden folder beside it and renames that into place only at the end):
the bundle format version; bundle.json's own checksum; every member is a regular file with a relative
name (no absolute path, '..', backslash, symlink, hard link, device or fifo) and appears once; the
members are exactly those bundle.json lists, each with its size and sha256 (and fit in the free space);
manifest.json matches bundle.json's manifest_sha256 and key facts; every file the manifest lists is
present and matches the manifest's checksum, and nothing else is in the bundle; then every member is
opened as a query opens it (`bundle_check`: FAISS header, LanceDB ids). This catches corruption,
truncation and careless or partial edits. Checksums do not prove who made a bundle: someone who edits a
file and recomputes every checksum (manifest, bundle.json) produces a bundle that verifies. To rule out
forgery, sign bundles (``export --sign KEY``) and import with ``--require-signature PUBKEY``, or compare
the bundle file's sha256 (printed by ``export``) with one published through a channel you trust.

The Parquet export is for analysis (pandas, DuckDB, Spark), not for import: one row per indexed
example with its vector and text, the manifest in the schema metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import stat
import tarfile
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rapidin_index.errors import BundleError, IntegrityError
from rapidin_index.files import atomic_file, sha256_file, sha256_tree, writing
from rapidin_index.store import index_folder, row_table
from rapidin_index.store.bundle import (
    BLOCK,
    BUNDLE_NAME,
    GZIP_LEVEL,
    PARQUET_BUNDLE_KEY,
    PARQUET_MANIFEST_KEY,
    PARQUET_REJECTED_KEY,
    ZSTD_LEVEL,
    check_version,
    describe,
    format_for,
    header,
)
from rapidin_index.store.bundle_check import load_private_key, read_faiss_header
from rapidin_index.store.index_folder import check_listed, read_rejected
from rapidin_index.store.manifest import MANIFEST_NAME, Manifest, read_manifest

# --------------------------------------------------------------------------- export


def export_index(
    index_dir: str | Path, out: str | Path, format: str | None = None, sign_with: str | Path | None = None
) -> Path:
    """Write the index in ``index_dir`` to ``out`` atomically (temporary file beside it, then rename).

    ``sign_with``: an ed25519 private key file; bundle.json then carries its signature (`bundle_check`).
    """
    index_dir, out = Path(index_dir), Path(out)
    format = format_for(out, format)
    if sign_with is not None:
        if format == "parquet":
            raise BundleError(
                "--sign signs tar and zip bundles; a Parquet export is for analysis, not import"
            )
        load_private_key(sign_with)  # a bad key is refused before any work
    read_manifest(index_dir)  # its errors say what is wrong with the folder
    manifest_bytes = (index_dir / MANIFEST_NAME).read_bytes()  # exported as read, even if a build replaces it
    manifest = Manifest.from_dict(json.loads(manifest_bytes))
    needed = len(manifest_bytes) + sum(entry.get("bytes", 0) for entry in manifest.files.values())
    with writing(out.parent, needed), atomic_file(out) as temporary:  # a full disk: one line (files.py)
        if format == "parquet":
            _verify_index(index_dir, manifest)
            _write_parquet(index_dir, manifest, temporary)
        else:
            members = _member_files(index_dir, manifest)
            entries = [{"path": MANIFEST_NAME, "sha256": hashlib.sha256(manifest_bytes).hexdigest()}]
            entries[0]["bytes"] = len(manifest_bytes)
            entries += [
                {"path": name, "sha256": _sha256(p), "bytes": p.stat().st_size} for name, p in members
            ]
            _verify_index(index_dir, manifest, {entry["path"]: entry["sha256"] for entry in entries})
            description = describe(manifest, entries, format, sign_with)
            members = [(MANIFEST_NAME, manifest_bytes), *members]
            _write_archive(temporary, format, description, members, entries)
    return out


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise BundleError(f"{path} vanished while it was exported (a build running?); export again") from None


def _verify_index(index_dir: Path, manifest: Manifest, known: dict[str, str] | None = None) -> None:
    """The index's files against its manifest; ``known`` holds checksums already computed (no re-read).
    Then the counts, read from the files themselves: a manifest edited after the build is not exported."""
    known = known or {}
    try:
        check_listed(index_dir, manifest)
    except IntegrityError as error:
        raise BundleError(f"refusing to export: {error}") from None
    for relative, expected in sorted(manifest.files.items()):
        path = index_dir / relative
        if relative in known:
            actual = known[relative]
        elif path.exists():
            actual = sha256_tree(path) if path.is_dir() else sha256_file(path)
        else:
            raise BundleError(f"refusing to export {index_dir}: {relative} is missing")
        if actual != expected["sha256"]:
            raise BundleError(
                f"refusing to export {index_dir}: {relative} does not match its checksum in the manifest "
                "(corrupted or edited; rebuild the index)"
            )
    _check_counts(index_dir, manifest)


def _check_counts(index_dir: Path, manifest: Manifest) -> None:
    """row_count against the FAISS header and the LanceDB table, rejected_count against its file."""
    generation = manifest.generation
    headers = read_faiss_header(index_dir / index_folder.vector_file(generation))
    counts = {
        index_folder.vector_file(generation): None if headers is None else headers[1]["count"],
        index_folder.table_name(generation): _table_count(index_dir, generation),
    }
    rejected = index_dir / index_folder.rejected_file(generation)
    for name, count in counts.items():
        if count != manifest.row_count:
            raise BundleError(
                f"refusing to export {index_dir}: its manifest says row_count {manifest.row_count:,} but {name} "
                f"holds {count if count is not None else 'no readable count of'} rows (the manifest was edited?); "
                "rebuild the index"
            )
    lines = sum(1 for line in rejected.read_bytes().splitlines() if line.strip())
    if lines != manifest.rejected_count:
        raise BundleError(
            f"refusing to export {index_dir}: its manifest says rejected_count {manifest.rejected_count:,} but "
            f"{rejected.name} holds {lines:,} rows (the manifest was edited?); rebuild the index"
        )


def _table_count(index_dir: Path, generation: int) -> int | None:
    try:
        return index_folder.count_rows(index_dir, generation)
    except Exception:  # lance reports a damaged table in its own (Rust) types: named by the caller
        return None


def _member_files(index_dir: Path, manifest: Manifest) -> list[tuple[str, Path]]:
    """(archive name, path) of every file the manifest lists, sorted (a listed folder: all its files)."""
    members = []
    for relative in manifest.files:
        path = index_dir / relative
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        members.extend((p.relative_to(index_dir).as_posix(), p) for p in files)
    return sorted(members)


def _write_archive(path: Path, format: str, description: dict, members, entries: list[dict]) -> None:
    """bundle.json first, then each file, copied while hashed: a file changed since it was hashed aborts."""
    data = (json.dumps(description, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    stamp = int(datetime.fromisoformat(description["exported_at"]).timestamp())
    writer = _TarWriter(path, format, stamp) if format != "zip" else _ZipWriter(path, stamp)
    with writer:
        writer.add(BUNDLE_NAME, io.BytesIO(data), len(data))
        for (name, source), entry in zip(members, entries, strict=True):
            changed = BundleError(f"{name} changed while it was exported (a build running?); export again")
            try:
                file = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
            except FileNotFoundError:
                raise changed from None
            with file:
                reader = _HashingReader(file)
                try:
                    writer.add(name, reader, entry["bytes"])
                except OSError:
                    if reader.copied == entry["bytes"]:
                        raise  # writing failed (disk full?), the file did not change
                    raise changed from None
            if reader.copied != entry["bytes"] or reader.digest.hexdigest() != entry["sha256"]:
                raise changed


class _HashingReader:
    def __init__(self, file):
        self.file, self.digest, self.copied = file, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        block = self.file.read(size)
        self.digest.update(block)
        self.copied += len(block)
        return block


class _TarWriter:
    """A tar, tar.gz or tar.zst written in one pass: each member goes through the compressor as it is read."""

    def __init__(self, path: Path, format: str, stamp: int):
        self.stamp, self.compressed = stamp, None
        if format == "tar.zst":
            import zstandard

            compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1, write_checksum=True)
            self.compressed = compressor.stream_writer(open(path, "wb"), closefd=True)
            self.archive = tarfile.open(fileobj=self.compressed, mode="w|", format=tarfile.PAX_FORMAT)
        elif format == "tar.gz":
            self.archive = tarfile.open(path, "w:gz", compresslevel=GZIP_LEVEL, format=tarfile.PAX_FORMAT)
        else:
            self.archive = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, file, size: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, self.stamp
        self.archive.addfile(info, file)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.archive.close()
        finally:
            if self.compressed is not None:
                self.compressed.close()  # ends the zstd frame (its checksum) and closes the file


class _ZipWriter:
    def __init__(self, path: Path, stamp: int):
        self.archive = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED)
        self.date_time = datetime.fromtimestamp(max(stamp, 315532800)).timetuple()[:6]  # zip starts in 1980

    def add(self, name: str, file, size: int) -> None:
        info = zipfile.ZipInfo(name, date_time=self.date_time)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        info.file_size = size  # lets zipfile pick zip64 for members past 2 GiB
        with self.archive.open(info, "w") as target:
            shutil.copyfileobj(file, target, BLOCK)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.archive.close()


# --------------------------------------------------------------------------- parquet


def _write_parquet(index_dir: Path, manifest: Manifest, path: Path) -> None:
    """One row per indexed example, in id order: id, vector (fixed_size_list<float32>[dim]), the LanceDB
    columns. Written a page of `row_table.ROW_BATCH` rows at a time: the vectors read in place, the rows'
    text paged from LanceDB, so memory does not grow with the index."""
    stored = index_folder.open_vectors(index_dir, manifest.generation)
    stored.drop_pages = True  # read once: its pages need not stay
    vector_order = np.argsort(stored.ids, kind="stable")
    row_ids = index_folder.read_row_ids(index_dir, manifest.generation)
    row_order = np.argsort(row_ids, kind="stable")
    ids = stored.ids[vector_order]  # [n], ascending
    if not np.array_equal(ids, row_ids[row_order]):
        raise BundleError(f"{index_dir}: the FAISS ids and the LanceDB rows differ; the index is damaged")
    dimension = stored.dimension
    columns = [field for field in row_table.SCHEMA if field.name != "id"]
    rejected = [{"id": row.example_id, "reason": row.reason} for row in read_rejected(index_dir, manifest)]
    schema = pa.schema(
        [pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float32(), dimension)), *columns],
        metadata={
            PARQUET_MANIFEST_KEY: json.dumps(manifest.to_dict(), sort_keys=True),
            PARQUET_BUNDLE_KEY: json.dumps(header(manifest, "parquet"), sort_keys=True),
            PARQUET_REJECTED_KEY: json.dumps(rejected),
        },
    )
    pages = index_folder.iter_rows(index_dir, manifest.generation, row_order)
    with pq.ParquetWriter(path, schema) as writer:
        if len(ids) == 0:
            writer.write_table(schema.empty_table())
        for start, rows in zip(range(0, len(ids), row_table.ROW_BATCH), pages, strict=True):
            positions = vector_order[start : start + len(rows)]
            flat = pa.array(stored.read_positions(positions).reshape(-1), pa.float32())  # [rows * dim]
            stored.release(int(positions.min()), int(positions.max()) + 1)
            batch = {
                "id": pa.array(ids[start : start + len(rows)], pa.int64()),
                "vector": pa.FixedSizeListArray.from_arrays(flat, dimension),
            }
            for field in columns:
                batch[field.name] = pa.array([row[field.name] for row in rows], field.type)
            writer.write_table(pa.table(batch, schema=schema))


def read_parquet_export(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[dict], dict]:
    """(ids [n] int64, vectors [n, dim] float32, rows without the vector, manifest dict) of a Parquet export."""
    table = pq.read_table(path)
    found = table.schema.metadata or {}
    if PARQUET_MANIFEST_KEY not in found:
        raise BundleError(
            f"{path} is not a rapidin-index Parquet export (no manifest in its schema metadata)"
        )
    version = json.loads(found.get(PARQUET_BUNDLE_KEY, b"{}")).get("bundle_format_version", 0)
    check_version(version)
    manifest = json.loads(found[PARQUET_MANIFEST_KEY])
    vector_type = table.schema.field("vector").type
    ids = table.column("id").to_numpy().astype(np.int64)
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = flat.astype(np.float32).reshape(len(ids), vector_type.list_size)
    rows = table.drop_columns(["vector"]).to_pylist()
    return ids, vectors, rows, manifest
