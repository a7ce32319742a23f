"""The checksums of an index's files: sha256 (what bundles publish and ``--verify`` checks) and xxh3-128
(``xxh3_128``, about ten times faster, checked on every open by `rapidin_index.store.verify`). A folder (a
LanceDB table) is hashed as one tree: each file's relative path and checksum, in order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import xxhash

from rapidin_index.files import BLOCK_BYTES

FAST = "xxh3_128"


def file_entry(path: str | Path) -> dict:
    """A manifest ``files`` entry for ``path`` (a file or a folder): sha256, xxh3_128, bytes; one read."""
    path = Path(path)
    if not path.is_dir():
        digests = _file_digests(path, ("sha256", FAST))
        return {"sha256": digests["sha256"], FAST: digests[FAST], "bytes": path.stat().st_size}
    tree = {"sha256": hashlib.sha256(), FAST: xxhash.xxh3_128()}
    size = 0
    for relative, file in tree_files(path):
        digests = _file_digests(file, ("sha256", FAST))
        for name, digest in tree.items():
            digest.update(f"{relative}\n{digests[name]}\n".encode())
        size += file.stat().st_size
    return {"sha256": tree["sha256"].hexdigest(), FAST: tree[FAST].hexdigest(), "bytes": size}


def checksum(path: str | Path, algorithm: str) -> str:
    """``algorithm`` (sha256 or xxh3_128) of a file, or of a folder as a tree (as in `file_entry`)."""
    path = Path(path)
    if not path.is_dir():
        return _file_digests(path, (algorithm,))[algorithm]
    tree = _new(algorithm)
    for relative, file in tree_files(path):
        tree.update(f"{relative}\n{_file_digests(file, (algorithm,))[algorithm]}\n".encode())
    return tree.hexdigest()


def _new(algorithm: str):
    return xxhash.xxh3_128() if algorithm == FAST else hashlib.new(algorithm)


def _file_digests(path: Path, algorithms: tuple[str, ...]) -> dict[str, str]:
    digests = {name: _new(name) for name in algorithms}
    with open(path, "rb") as file:
        while block := file.read(BLOCK_BYTES):
            for digest in digests.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def tree_files(folder: Path) -> list[tuple[str, Path]]:
    return sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
