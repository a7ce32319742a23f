"""Portable bundles: export an index to one checksummed tar / tar.gz / zip file, verify it, import it.

Bundle layout (members at the archive root, in this order; regular files only)::

    bundle.json                 bundle format version, software, export date, the manifest's key facts,
                                manifest_sha256, {path, sha256, bytes} of every other member, and its
                                own checksum (bundle_sha256, over its JSON without that key)
    manifest.json               the index's manifest, unchanged
    metadata/rows_gNNNN.lance/  every file of the LanceDB table, sorted
    rejected-gNNNN.jsonl
    vectors-gNNNN.faiss

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
present and matches the manifest's checksum, and nothing else is in the bundle. This catches
corruption, truncation and careless or partial edits. It does not prove who made a bundle: someone who
edits a file and recomputes every checksum (manifest, bundle.json) produces a bundle that verifies.
Changed vector counts or model fingerprints then still fail at ``Index.open``; to rule out forgery,
compare the bundle file's sha256 (printed by ``export``) with one published through a channel you trust.

The Parquet export is for analysis (pandas, DuckDB, Spark), not for import: one row per indexed
example with its vector and text, the manifest in the schema metadata.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rapidin_index import index as vector_index
from rapidin_index import metadata
from rapidin_index.build import read_rejected
from rapidin_index.manifest import (
    MANIFEST_NAME,
    SOFTWARE_NAME,
    IntegrityError,
    Manifest,
    ManifestError,
    differences,
    read_manifest,
    sha256_file,
    sha256_tree,
    software_version,
    utc_now,
    verify_files,
)

BUNDLE_FORMAT_VERSION = 1
BUNDLE_NAME = "bundle.json"
FORMATS = ("tar", "tar.gz", "zip", "parquet")
PARQUET_MANIFEST_KEY = b"rapidin_index.manifest"
PARQUET_BUNDLE_KEY = b"rapidin_index.bundle"
PARQUET_REJECTED_KEY = b"rapidin_index.rejected"
MAX_BUNDLE_JSON_BYTES = 64 << 20
BLOCK = 1 << 20
# What a damaged or truncated archive raises while it is read (our own write errors are not among them).
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError)


class BundleError(ValueError):
    """A bundle that cannot be written, or one that is refused on import; the message names the member."""


def format_for(out: str | Path, format: str | None = None) -> str:
    """The bundle format: ``format`` if given, else from the extension (.tar, .tar.gz/.tgz, .zip, .parquet)."""
    if format is not None:
        if format not in FORMATS:
            raise BundleError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
        return format
    name = Path(out).name.lower()
    for suffix, found in ((".tar.gz", "tar.gz"), (".tgz", "tar.gz"), (".tar", "tar"), (".zip", "zip")):
        if name.endswith(suffix):
            return found
    return "parquet" if name.endswith(".parquet") else "tar.gz"


# --------------------------------------------------------------------------- export


def export_index(index_dir: str | Path, out: str | Path, format: str | None = None) -> Path:
    """Write the index in ``index_dir`` to ``out`` atomically (temporary file beside it, then rename)."""
    index_dir, out = Path(index_dir), Path(out)
    format = format_for(out, format)
    read_manifest(index_dir)  # its errors say what is wrong with the folder
    manifest_bytes = (index_dir / MANIFEST_NAME).read_bytes()  # exported as read, even if a build replaces it
    manifest = Manifest.from_dict(json.loads(manifest_bytes))
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(handle)
    try:
        if format == "parquet":
            _verify_index(index_dir, manifest)
            _write_parquet(index_dir, manifest, Path(temporary))
        else:
            members = _member_files(index_dir, manifest)
            entries = [{"path": MANIFEST_NAME, "sha256": hashlib.sha256(manifest_bytes).hexdigest()}]
            entries[0]["bytes"] = len(manifest_bytes)
            entries += [
                {"path": name, "sha256": _sha256(p), "bytes": p.stat().st_size} for name, p in members
            ]
            _verify_index(index_dir, manifest, {entry["path"]: entry["sha256"] for entry in entries})
            description = _describe(manifest, entries, format)
            members = [(MANIFEST_NAME, manifest_bytes), *members]
            _write_archive(Path(temporary), format, description, members, entries)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise BundleError(f"{path} vanished while it was exported (a build running?); export again") from None


def _verify_index(index_dir: Path, manifest: Manifest, known: dict[str, str] | None = None) -> None:
    """The index's files against its manifest; ``known`` holds checksums already computed (no re-read)."""
    known = known or {}
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


def _member_files(index_dir: Path, manifest: Manifest) -> list[tuple[str, Path]]:
    """(archive name, path) of every file the manifest lists, sorted (a listed folder: all its files)."""
    members = []
    for relative in manifest.files:
        path = index_dir / relative
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        members.extend((p.relative_to(index_dir).as_posix(), p) for p in files)
    return sorted(members)


def manifest_facts(manifest: Manifest) -> dict:
    """What a recipient needs to know before opening: model, tokenizer, template, sketch, counts, dates."""
    return {
        "format_version": manifest.format_version,
        "model": manifest.model,
        "adapter": manifest.adapter,
        "tokenizer": manifest.tokenizer,
        "template": manifest.template,
        "max_length": manifest.max_length,
        "normalize": manifest.normalize,
        "sketch": manifest.sketch,
        "vector_dtype": manifest.vector_dtype,
        "row_count": manifest.row_count,
        "rejected_count": manifest.rejected_count,
        "generation": manifest.generation,
        "built_by": manifest.software,
        "created_at": manifest.created_at,
        "updated_at": manifest.updated_at,
    }


def _header(manifest: Manifest, format: str) -> dict:
    return {
        "bundle_format_version": BUNDLE_FORMAT_VERSION,
        "software": {"name": SOFTWARE_NAME, "version": software_version()},
        "exported_at": utc_now(),
        "archive_format": format,
        "index": manifest_facts(manifest),
    }


def _describe(manifest: Manifest, entries: list[dict], format: str) -> dict:
    """bundle.json: the header, the manifest's and every member's checksum, then its own checksum."""
    description = {**_header(manifest, format), "manifest_sha256": entries[0]["sha256"], "members": entries}
    description["bundle_sha256"] = _self_checksum(description)
    return description


def _self_checksum(description: dict) -> str:
    body = {key: value for key, value in description.items() if key != "bundle_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


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
    def __init__(self, path: Path, format: str, stamp: int):
        self.archive = tarfile.open(path, "w:gz" if format == "tar.gz" else "w", format=tarfile.PAX_FORMAT)
        self.stamp = stamp

    def add(self, name: str, file, size: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, self.stamp
        self.archive.addfile(info, file)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.archive.close()


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


# --------------------------------------------------------------------------- import


def verify_bundle(bundle: str | Path) -> dict:
    """Every import check, in a scratch folder that is then removed; returns bundle.json."""
    with tempfile.TemporaryDirectory(prefix="rapidin-verify-") as scratch:
        description, _ = _extract_verified(Path(bundle), Path(scratch) / "index")
    return description


def import_bundle(bundle: str | Path, index_dir: str | Path, force: bool = False) -> Manifest:
    """Verify ``bundle`` while extracting it beside ``index_dir``, then rename it into place.

    ``index_dir`` must not exist or be empty; with ``force`` it may hold an index, which is replaced only
    once the bundle has verified. On any refusal nothing in ``index_dir`` changes.
    """
    bundle, index_dir = Path(bundle), Path(index_dir)
    _check_target(index_dir, force)
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=index_dir.parent, prefix=f".{index_dir.name}.import-"))
    os.chmod(staging, 0o755)  # mkdtemp makes 0700; an index is meant to be shared
    try:
        _extract_verified(bundle, staging)
        _check_target(index_dir, force)
        _move_into_place(staging, index_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_manifest(index_dir)


def _check_target(index_dir: Path, force: bool) -> None:
    if not index_dir.exists() or (index_dir.is_dir() and not any(index_dir.iterdir())):
        return
    if not (index_dir / MANIFEST_NAME).is_file():
        raise BundleError(f"{index_dir} is not empty and holds no index; import into a new or empty folder")
    if not force:
        raise BundleError(
            f"{index_dir} already holds an index; import into a new folder, or pass --force to replace it "
            "(the old index is removed only after the bundle verifies)"
        )


def _move_into_place(staging: Path, index_dir: Path) -> None:
    if not index_dir.exists():
        os.rename(staging, index_dir)
        return
    if not any(index_dir.iterdir()):
        index_dir.rmdir()
        os.rename(staging, index_dir)
        return
    replaced = Path(tempfile.mkdtemp(dir=index_dir.parent, prefix=f".{index_dir.name}.replaced-"))
    replaced.rmdir()
    os.rename(index_dir, replaced)
    try:
        os.rename(staging, index_dir)
    except BaseException:
        os.rename(replaced, index_dir)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


def _extract_verified(bundle: Path, destination: Path) -> tuple[dict, Manifest]:
    """Extract ``bundle`` into ``destination`` (created), checking everything; raise BundleError naming why."""
    if not bundle.is_file():
        raise BundleError(f"bundle {bundle} does not exist")
    destination.mkdir(parents=True, exist_ok=True)
    description, listed, extracted = None, {}, set()
    reading, last = None, None  # the member being read, the last one read whole: named when reading fails
    try:
        for name, kind, size, reader in _archive_members(bundle):
            reading, relative = name, _safe_name(name, kind)
            if kind == "directory":
                continue
            if relative in extracted or (relative == BUNDLE_NAME and description is not None):
                raise BundleError(f"member {relative!r} appears twice in the bundle; refusing")
            if description is None:
                if relative != BUNDLE_NAME:
                    raise BundleError(
                        f"the bundle's first member is {relative!r}, not {BUNDLE_NAME}: "
                        "not a rapidin-index bundle (or one repacked by hand)"
                    )
                description = _read_description(reader(), size)
                listed = {entry["path"]: entry for entry in description["members"]}
                _check_free_space(destination, sum(entry["bytes"] for entry in listed.values()))
            elif relative not in listed:
                raise BundleError(f"member {relative!r} is not listed in {BUNDLE_NAME}; refusing")
            else:
                _extract_member(reader(), size, listed[relative], destination / relative)
                extracted.add(relative)
            reading, last = None, relative
    except _READ_ERRORS as error:
        where = (
            f"reading member {reading!r} failed"
            if reading
            else f"the archive breaks off after member {last!r}"
            if last
            else "its header or table of contents cannot be read"
        )
        raise BundleError(f"{bundle} is truncated or corrupted: {where} ({error})") from None
    if description is None:
        raise BundleError(f"{bundle} holds no {BUNDLE_NAME}: not a rapidin-index bundle")
    missing = sorted(set(listed) - extracted)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BundleError(
            f"member {missing[0]!r}{more} listed in {BUNDLE_NAME} is missing from the bundle (truncated?)"
        )
    return description, _check_manifest(destination, description, extracted)


def _archive_members(bundle: Path):
    """(name, kind, size, open reader) per member, in archive order (zip: bundle.json first)."""
    with open(bundle, "rb") as file:
        magic = file.read(4)
    if magic == b"PAR1":
        raise BundleError(f"{bundle} is a Parquet export (for analysis); import reads tar or zip bundles")
    if magic.startswith(b"PK"):
        with zipfile.ZipFile(bundle) as archive:
            infos = archive.infolist()
            infos.sort(key=lambda info: info.filename != BUNDLE_NAME)  # stable: keeps the rest in order
            for info in infos:
                yield info.filename, _zip_kind(info), info.file_size, lambda info=info: archive.open(info)
        return
    with tarfile.open(bundle, "r|*") as archive:
        for member in archive:
            yield member.name, _tar_kind(member), member.size, lambda m=member: archive.extractfile(m)


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isfile():
        return "file"
    if member.isdir():
        return "directory"
    kinds = ((member.issym, "symlink"), (member.islnk, "hard link"), (member.isfifo, "fifo"))
    for test, kind in (*kinds, (member.isdev, "device")):  # isdev() is true for fifos too
        if test():
            return kind
    return "special file"


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.flag_bits & 0x1:
        return "encrypted file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if info.is_dir():
        return "directory"
    return "file" if stat.S_IFMT(mode) in (0, stat.S_IFREG) else "special file"


def _safe_name(name: str, kind: str) -> str:
    """The member's relative posix path; refuses absolute, '..', backslash and non-file members."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    unsafe = (
        not parts or name.startswith("/") or "\\" in name or "\0" in name or ".." in parts or ":" in parts[0]
    )
    if unsafe:
        raise BundleError(f"member {name!r} has an unsafe path (absolute, '..' or odd characters); refusing")
    if kind not in ("file", "directory"):
        raise BundleError(f"member {name!r} is a {kind}; bundles hold regular files only; refusing")
    return "/".join(parts)


def _read_description(file, size: int) -> dict:
    """bundle.json, checked: readable, a format this version knows, its own checksum, a sane member list."""
    if size > MAX_BUNDLE_JSON_BYTES:
        raise BundleError(f"{BUNDLE_NAME} is {size:,} bytes: not a rapidin-index bundle")
    try:
        description = json.loads(file.read(size))
        version = description["bundle_format_version"]
    except (ValueError, KeyError, TypeError) as error:
        raise BundleError(f"{BUNDLE_NAME} is damaged or not a rapidin-index bundle ({error!r})") from None
    if not isinstance(version, int):
        raise BundleError(f"{BUNDLE_NAME} has no integer bundle_format_version")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"bundle format {version} is newer than this rapidin-index supports "
            f"({BUNDLE_FORMAT_VERSION}); upgrade rapidin-index"
        )
    if description.get("bundle_sha256") != _self_checksum(description):
        raise BundleError(
            f"{BUNDLE_NAME} does not match its own checksum (bundle_sha256): corrupted or edited"
        )
    members = description.get("members")
    well_formed = isinstance(members, list) and all(
        isinstance(entry, dict)
        and isinstance(entry.get("path"), str)
        and isinstance(entry.get("bytes"), int)
        and entry["bytes"] >= 0
        and isinstance(entry.get("sha256"), str)
        for entry in members
    )
    if not well_formed or len({entry["path"] for entry in members}) != len(members):
        raise BundleError(f"{BUNDLE_NAME} has a malformed or duplicated member list")
    return description


def _check_free_space(destination: Path, needed: int) -> None:
    free = shutil.disk_usage(destination).free
    if needed > free:
        raise BundleError(
            f"the bundle unpacks to {needed:,} bytes but only {free:,} are free beside {destination}"
        )


def _extract_member(file, size: int, entry: dict, target: Path) -> None:
    """Copy at most the declared bytes into ``target`` while hashing; size and sha256 must both match."""
    name = entry["path"]
    if size != entry["bytes"]:
        raise BundleError(f"member {name!r} is {size:,} bytes, {BUNDLE_NAME} says {entry['bytes']:,}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, copied = hashlib.sha256(), 0
    with open(target, "xb") as out:
        while block := file.read(min(BLOCK, entry["bytes"] + 1 - copied)):
            digest.update(block)
            out.write(block)
            copied += len(block)
            if copied > entry["bytes"]:
                break
        out.flush()
        os.fsync(out.fileno())
    if copied != entry["bytes"]:
        raise BundleError(f"member {name!r} is truncated ({copied:,} of {entry['bytes']:,} bytes)")
    if digest.hexdigest() != entry["sha256"]:
        raise BundleError(
            f"member {name!r} does not match its checksum in {BUNDLE_NAME} (corrupted or edited)"
        )


def _check_manifest(folder: Path, description: dict, extracted: set[str]) -> Manifest:
    """manifest.json against bundle.json, the files against the manifest, and no file the manifest lacks."""
    if MANIFEST_NAME not in extracted:
        raise BundleError(f"the bundle holds no {MANIFEST_NAME}")
    if sha256_file(folder / MANIFEST_NAME) != description.get("manifest_sha256"):
        raise BundleError(f"{MANIFEST_NAME} does not match manifest_sha256 in {BUNDLE_NAME} (edited)")
    try:
        manifest = read_manifest(folder)
    except (ManifestError, TypeError) as error:
        raise BundleError(f"{MANIFEST_NAME} in the bundle: {error}") from None
    changed = [
        line.split(":")[0] for line in differences(description.get("index", {}), manifest_facts(manifest))
    ]
    if changed:
        raise BundleError(f"{MANIFEST_NAME} disagrees with {BUNDLE_NAME} on {', '.join(changed)} (edited)")
    for listed in manifest.files:
        if _safe_name(listed, "file") != listed:
            raise BundleError(f"{MANIFEST_NAME} lists a file outside the index folder: {listed!r}")
    for relative in sorted(extracted - {MANIFEST_NAME}):
        if not any(relative == f or relative.startswith(f + "/") for f in manifest.files):
            raise BundleError(f"member {relative!r} is not a file of the index its manifest describes")
    try:
        verify_files(folder, manifest)
    except IntegrityError as error:
        raise BundleError(f"bundle refused: {error}") from None
    return manifest


# --------------------------------------------------------------------------- parquet


def _write_parquet(index_dir: Path, manifest: Manifest, path: Path, batch_rows: int = 4096) -> None:
    """One row per indexed example: id, vector (fixed_size_list<float32>[dim]), the LanceDB columns."""
    ids, vectors = vector_index.stored_vectors(
        vector_index.load_index(index_dir / vector_index.vector_file(manifest.generation))
    )
    rows = {row["id"]: row for row in metadata.read_all(index_dir, manifest.generation)}
    if set(rows) != set(ids.tolist()):
        raise BundleError(f"{index_dir}: the FAISS ids and the LanceDB rows differ; the index is damaged")
    order = np.argsort(ids, kind="stable")
    ids, vectors = ids[order], vectors[order]  # [n], [n, dim]
    dimension = vectors.shape[1]
    columns = [field for field in metadata.SCHEMA if field.name != "id"]
    rejected = [{"id": row.example_id, "reason": row.reason} for row in read_rejected(index_dir, manifest)]
    schema = pa.schema(
        [pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float32(), dimension)), *columns],
        metadata={
            PARQUET_MANIFEST_KEY: json.dumps(manifest.to_dict(), sort_keys=True),
            PARQUET_BUNDLE_KEY: json.dumps(_header(manifest, "parquet"), sort_keys=True),
            PARQUET_REJECTED_KEY: json.dumps(rejected),
        },
    )
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, max(len(ids), 1), batch_rows):
            chunk = slice(start, start + batch_rows)
            flat = pa.array(np.ascontiguousarray(vectors[chunk]).reshape(-1), pa.float32())
            batch = {
                "id": pa.array(ids[chunk], pa.int64()),
                "vector": pa.FixedSizeListArray.from_arrays(flat, dimension),
            }
            for field in columns:
                batch[field.name] = pa.array([rows[i][field.name] for i in ids[chunk].tolist()], field.type)
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
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"bundle format {version} is newer than this rapidin-index supports "
            f"({BUNDLE_FORMAT_VERSION}); upgrade rapidin-index"
        )
    manifest = json.loads(found[PARQUET_MANIFEST_KEY])
    vector_type = table.schema.field("vector").type
    ids = table.column("id").to_numpy().astype(np.int64)
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = flat.astype(np.float32).reshape(len(ids), vector_type.list_size)
    rows = table.drop_columns(["vector"]).to_pylist()
    return ids, vectors, rows, manifest
