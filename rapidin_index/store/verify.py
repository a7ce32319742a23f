"""Checksums of an index's files, and the stamps that let an unchanged file skip its re-hash on open.

Every entry of a manifest's ``files`` holds the file's sha256 (what bundles publish and ``--verify``
checks) and, since issue 25, its xxh3-128 (``xxh3_128``, about ten times faster to compute). A listed
folder (a LanceDB table) is hashed as one tree: each file's relative path and checksum, in order.

`check_files` runs on every ``Index.open``: it hashes each listed file with the fast checksum (sha256 for
manifests from before it) and records a *stamp* beside the index (``.verified.json``; under
``~/.cache/rapidin-index`` when the folder is read-only): the file's size, mtime, ctime, inode and
device, and the digest that matched. The next open re-hashes a file only if one of those changed; an
unchanged file costs a ``stat``. The stamp file is a cache, never an authority: a damaged one is ignored,
and an entry counts only for the exact stat and expected digest it was written for. ``full=True`` (append,
merge) ignores the stamps and hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rapidin_index.errors import IntegrityError
from rapidin_index.files import atomic_write_json
from rapidin_index.store.checksums import FAST, checksum, file_entry, tree_files
from rapidin_index.store.index_folder import check_listed

__all__ = ["FAST", "check_files", "checksum", "file_entry"]
STAMP_NAME = ".verified.json"
STAMP_VERSION = 1
FIX = "the index is damaged: re-import its bundle (import --force) or rebuild it"


# --------------------------------------------------------------------------- checks


def check_files(index_dir: str | Path, manifest, full: bool = False) -> None:
    """Every file the manifest lists matches its fast checksum (sha256 where it has none).

    Files whose stamp still fits are only stat'ed unless ``full``. Raises IntegrityError naming the first
    missing or changed file and the fix.
    """
    index_dir = Path(index_dir)
    if not manifest.files:
        raise IntegrityError(f"{index_dir}: the manifest lists no files to verify; {FIX}")
    check_listed(index_dir, manifest)
    stamps = {} if full else read_stamps(index_dir)
    fresh, changed = {}, False
    for relative, expected in sorted(manifest.files.items()):
        algorithm = FAST if isinstance(expected.get(FAST), str) else "sha256"
        path = index_dir / relative
        key = stat_key(path)
        if key is None:
            raise IntegrityError(
                f"{relative} is missing from {index_dir}, though its manifest names it; {FIX}"
            )
        stamp = {"stat": key, "algorithm": algorithm, "digest": expected.get(algorithm)}
        if stamps.get(relative) == stamp:
            fresh[relative] = stamp
            continue
        if checksum(path, algorithm) != expected.get(algorithm):
            raise IntegrityError(
                f"{index_dir / relative} does not match its checksum in the manifest (corrupted or edited); "
                f"{FIX}"
            )
        fresh[relative], changed = stamp, True
    if changed or set(fresh) != set(stamps):
        write_stamps(index_dir, fresh)


def stamp_written(index_dir: str | Path, manifest, written) -> None:
    """Stamp the files a writer has just hashed into ``manifest`` (``written``: their relative paths), so
    the first open after a build, ``--append``, merge or import does not hash them again (13 GB: minutes).
    The writer hashed each file moments before, under its lock (read back after writing it, or, for an
    import, while extracting it); the stamp pairs that digest with the file's stat now."""
    index_dir = Path(index_dir)
    stamps = read_stamps(index_dir)
    for relative in written:
        expected, key = manifest.files.get(relative, {}), stat_key(index_dir / relative)
        if key is not None and isinstance(expected.get(FAST), str):
            stamps[relative] = {"stat": key, "algorithm": FAST, "digest": expected[FAST]}
    write_stamps(index_dir, {relative: stamps[relative] for relative in stamps if relative in manifest.files})


def stat_key(path: Path) -> list | None:
    """[[relative name, size, mtime_ns, ctime_ns, inode, device], ...] of a file or of every file in a
    folder (sorted), or None when ``path`` does not exist."""
    try:
        if not path.is_dir():
            return [_stat_row(".", path.stat())]
        return [_stat_row(relative, file.stat()) for relative, file in tree_files(path)]
    except FileNotFoundError:
        return None


def _stat_row(name: str, found: os.stat_result) -> list:
    return [name, found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino, found.st_dev]


# --------------------------------------------------------------------------- the stamp file


def stamp_path(index_dir: Path) -> Path:
    """``.verified.json`` in the index folder, or a file under ~/.cache when the folder is read-only."""
    if os.access(index_dir, os.W_OK):
        return index_dir / STAMP_NAME
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rapidin-index" / "verified"
    name = hashlib.sha256(str(index_dir.resolve()).encode()).hexdigest()[:32]
    return cache / f"{name}.json"


def read_stamps(index_dir: Path) -> dict:
    """{relative path: stamp}; a missing, unreadable or malformed stamp file reads as no stamps."""
    try:
        value = json.loads(stamp_path(index_dir).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(value, dict) or value.get("version") != STAMP_VERSION:
        return {}
    if value.get("index") != str(index_dir.resolve()) or not isinstance(value.get("files"), dict):
        return {}
    return value["files"]


def write_stamps(index_dir: Path, stamps: dict) -> None:
    """Best effort: an index that cannot hold a stamp is hashed again on the next open."""
    value = {"version": STAMP_VERSION, "index": str(index_dir.resolve()), "files": stamps}
    try:
        atomic_write_json(stamp_path(index_dir), value)
    except OSError:
        pass
