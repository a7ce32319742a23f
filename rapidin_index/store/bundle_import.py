"""Import a bundle made by `rapidin-index export`: verify everything, then move it into place.

Every member's size and sha256 are checked against bundle.json, bundle.json against its own checksum and
format version, the manifest against bundle.json and the files it lists; unsafe members (absolute paths,
'..', links, devices) are refused. The bundle is unpacked into a hidden folder beside the target, which is
renamed into place only when everything verifies, so a refused bundle writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

import xxhash

from rapidin_index.errors import BundleError, ManifestError
from rapidin_index.files import atomic_write_json, no_space, sha256_file, tree_bytes, writing
from rapidin_index.store import index_folder
from rapidin_index.store.bundle import (
    BLOCK,
    BUNDLE_NAME,
    MAX_BUNDLE_JSON_BYTES,
    READ_ERRORS,
    ZSTD_MAGIC,
    check_version,
    manifest_facts,
    self_checksum,
)
from rapidin_index.store.bundle_check import check_members, check_signature
from rapidin_index.store.checksums import FAST
from rapidin_index.store.identity import differences
from rapidin_index.store.lock import LOCK_FILES, pause_point, remove_unread_generations, writer_lock
from rapidin_index.store.manifest import (
    MANIFEST_NAME,
    Manifest,
    read_manifest,
    write_manifest,
)
from rapidin_index.store.verify import stamp_written

MOVING_NAME = ".import-moving.json"
"""In an import's target while its files are moved in: which ones (`roll_back_import`)."""


def verify_bundle(bundle: str | Path, require_signature: str | Path | None = None) -> dict:
    """Every import check, in a scratch folder that is then removed; returns bundle.json."""
    with tempfile.TemporaryDirectory(prefix="rapidin-verify-") as scratch:
        description, _ = _extract_verified(Path(bundle), Path(scratch) / "index", require_signature)
    return description


def import_bundle(
    bundle: str | Path,
    index_dir: str | Path,
    force: bool = False,
    require_signature: str | Path | None = None,
) -> Manifest:
    """Verify ``bundle`` while extracting it beside ``index_dir``, then move it into place.

    ``index_dir`` must not exist or be empty; with ``force`` it may hold an index, which is replaced only
    once the bundle has verified. On any refusal nothing in ``index_dir`` changes. ``require_signature``:
    an ed25519 public key file; the bundle must be signed by it (`bundle_check`). The folder's writer
    lock is held throughout (store/lock.py), and the manifest is moved in last: it is the commit point, as in a
    build. A replaced index's files stay until no reader holds them.
    """
    bundle, index_dir = Path(bundle), Path(index_dir)
    _check_target(index_dir, force)
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(index_dir, "import"):
        roll_back_import(index_dir)
        _check_target(index_dir, force)
        staging = Path(tempfile.mkdtemp(dir=index_dir.parent, prefix=_staging_prefix(index_dir)))
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; an index is meant to be shared
        unpacked = []  # bytes unpacked when a write failed: the free space is reported after the cleanup
        with writing(index_dir.parent, lambda: max(bundle.stat().st_size, *unpacked)):
            try:
                _, manifest = _extract_verified(bundle, staging, require_signature)
                _move_into_place(staging, index_dir, manifest)
            except BaseException:
                unpacked.append(tree_bytes(staging))
                roll_back_import(index_dir)  # a move that failed half-way: no partial folder
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return read_manifest(index_dir)


def _staging_prefix(index_dir: Path) -> str:
    return f".{index_dir.name}.import-"


def roll_back_import(index_dir: Path) -> list[str]:
    """Undo what a killed import left (call with the writer lock held): its staging folders beside
    ``index_dir``, and the files a half-finished move brought in that no manifest names yet (listed in
    the `MOVING_NAME` marker). Returns what was removed."""
    removed = []
    prefix = _staging_prefix(index_dir)
    for staging in index_dir.parent.iterdir():
        if staging.name.startswith(prefix) and staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging.name)
    marker = index_dir / MOVING_NAME
    if not marker.is_file():
        return removed
    try:
        moved = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        moved = []  # a torn marker: it was written before any move
    committed = read_manifest(index_dir).generation if (index_dir / MANIFEST_NAME).is_file() else None
    for relative in moved:
        generation = index_folder.generation_of(Path(relative).name)
        path = index_dir / relative
        if committed is None or (generation is not None and generation > committed):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            removed.append(relative)
    database = index_dir / index_folder.DATABASE_DIR
    if committed is None and database.is_dir() and not any(database.iterdir()):
        database.rmdir()
    marker.unlink()
    return removed


def _check_target(index_dir: Path, force: bool) -> None:
    if not index_dir.exists() or (index_dir.is_dir() and not _entries(index_dir)):
        return
    if (index_dir / MOVING_NAME).is_file():
        return  # a half-moved import: rolled back under the writer lock (`roll_back_import`)
    if not (index_dir / MANIFEST_NAME).is_file():
        raise BundleError(f"{index_dir} is not empty and holds no index; import into a new or empty folder")
    if not force:
        raise BundleError(
            f"{index_dir} already holds an index; import into a new folder, or pass --force to replace it "
            "(the old index is removed only after the bundle verifies)"
        )


def _entries(index_dir: Path) -> list[Path]:
    """The folder's entries, less the lock files of writers and readers (store/lock.py)."""
    return [path for path in index_dir.iterdir() if path.name not in LOCK_FILES]


def _move_into_place(staging: Path, index_dir: Path, manifest: Manifest) -> None:
    """Move the verified files in, manifest last. Over an existing index they become its next generation
    (renamed), so the old one's files stay intact for its readers until the new manifest is in place.
    The moved files are then stamped (`verify.stamp_written`) with the digests checked while extracting.
    The `MOVING_NAME` marker lists what is being moved, so that a killed move is rolled back."""
    marker = index_dir / MOVING_NAME
    if not (index_dir / MANIFEST_NAME).is_file():
        atomic_write_json(marker, {"files": sorted(manifest.files)})
        for moved, relative in enumerate(manifest.files, 1):
            _move(staging / relative, index_dir / relative)
            pause_point(f"import-moved-{moved}")  # test-only: a kill after each move
        os.replace(staging / MANIFEST_NAME, index_dir / MANIFEST_NAME)
        marker.unlink()
        stamp_written(
            index_dir, manifest, manifest.files
        )  # hashed while extracted: the first open stats them
        return
    generation = read_manifest(index_dir).generation + 1
    index_folder.remove_generation(index_dir, generation)  # torn files of an unfinished build
    files = {
        index_folder.renamed_to_generation(relative, generation): entry
        for relative, entry in manifest.files.items()
    }
    atomic_write_json(marker, {"files": sorted(files)})
    for moved, (relative, renamed) in enumerate(zip(manifest.files, files, strict=True), 1):
        _move(staging / relative, index_dir / renamed)
        pause_point(f"import-moved-{moved}")
    manifest.files, manifest.generation = files, generation
    write_manifest(index_dir, manifest)  # sealed with its own checksum
    marker.unlink()
    stamp_written(index_dir, manifest, manifest.files)
    index_folder.remove_journal(index_dir)  # an unfinished build of the old index
    remove_unread_generations(index_dir, generation)


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(source, target)


def _extract_verified(
    bundle: Path, destination: Path, require_signature: str | Path | None = None
) -> tuple[dict, Manifest]:
    """Extract ``bundle`` into ``destination`` (created), checking everything; raise BundleError naming why."""
    if not bundle.is_file():
        raise BundleError(f"bundle {bundle} does not exist")
    destination.mkdir(parents=True, exist_ok=True)
    description, listed, extracted, digests = None, {}, set(), {}
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
                check_signature(description, require_signature)
                listed = {entry["path"]: entry for entry in description["members"]}
                _check_free_space(destination, sum(entry["bytes"] for entry in listed.values()))
            elif relative not in listed:
                raise BundleError(f"member {relative!r} is not listed in {BUNDLE_NAME}; refusing")
            else:
                digests[relative] = _extract_member(reader(), size, listed[relative], destination / relative)
                extracted.add(relative)
            reading, last = None, relative
    except READ_ERRORS as error:
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
    manifest = _check_manifest(destination, description, extracted, digests)
    check_members(destination, manifest)  # opened as a query opens them, before the target is touched
    return description, manifest


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
    if magic == ZSTD_MAGIC:
        import zstandard

        with open(bundle, "rb") as file, zstandard.ZstdDecompressor().stream_reader(file) as stream:
            yield from _tar_members(tarfile.open(fileobj=stream, mode="r|"))
        return
    yield from _tar_members(tarfile.open(bundle, "r|*"))


def _tar_members(archive: tarfile.TarFile):
    """(name, kind, size, open reader) per member of a tar read as a stream (plain, gzip or zstd)."""
    with archive:
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
    check_version(version)
    if description.get("bundle_sha256") != self_checksum(description):
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
    """Refused before a byte is written: the folder that holds ``destination`` (the import's target's
    parent, or the scratch folder of --check) has less free space than the bundle unpacks to."""
    if needed > shutil.disk_usage(destination).free:
        raise no_space(destination.parent, needed)


def _extract_member(file, size: int, entry: dict, target: Path) -> dict[str, str]:
    """Copy at most the declared bytes into ``target`` while hashing; size and sha256 must both match.
    Returns the member's digests (sha256 and xxh3-128, both computed on the bytes as they are written):
    the manifest's files are checked against them, and the first open's stamps made from them, so
    nothing extracted is read again."""
    name = entry["path"]
    if size != entry["bytes"]:
        raise BundleError(f"member {name!r} is {size:,} bytes, {BUNDLE_NAME} says {entry['bytes']:,}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, fast, copied = hashlib.sha256(), xxhash.xxh3_128(), 0
    with open(target, "xb") as out:
        while block := file.read(min(BLOCK, entry["bytes"] + 1 - copied)):
            digest.update(block)
            fast.update(block)
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
    return {"sha256": digest.hexdigest(), FAST: fast.hexdigest()}


def _check_manifest(folder: Path, description: dict, extracted: set[str], digests: dict) -> Manifest:
    """manifest.json against bundle.json, the files against the manifest (sha256 and xxh3-128, from the
    ``digests`` computed while extracting), and no file the manifest lacks."""
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
    for relative, expected in sorted(manifest.files.items()):
        found = _listed_digests(relative, digests)
        if found is None:
            raise BundleError(f"bundle refused: {relative} is missing from {folder}")
        for name, label in (("sha256", "checksum"), (FAST, FAST)):  # sha256 first: the authority
            if isinstance(expected.get(name), str) and expected[name] != found[name]:
                raise BundleError(
                    f"bundle refused: {relative} does not match its {label} in the manifest "
                    "(corrupted or edited)"
                )
    return manifest


def _listed_digests(relative: str, digests: dict) -> dict[str, str] | None:
    """The sha256 and xxh3-128 of a manifest's file entry from its members' digests, as `checksums.file_entry`
    computes them on disk (a folder: each file's relative path and digest, in order); None if absent."""
    if relative in digests:
        return digests[relative]
    prefix = relative + "/"
    inside = sorted(
        (name[len(prefix) :], found) for name, found in digests.items() if name.startswith(prefix)
    )
    if not inside:
        return None
    trees = {"sha256": hashlib.sha256(), FAST: xxhash.xxh3_128()}
    for name, found in inside:
        for algorithm, tree in trees.items():
            tree.update(f"{name}\n{found[algorithm]}\n".encode())
    return {algorithm: tree.hexdigest() for algorithm, tree in trees.items()}
