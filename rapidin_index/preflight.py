"""Cheap checks first: an index's manifest against a request, before torch, the vectors or the model load.

Everything here reads the manifest, stats files or loads a tokenizer, and nothing imports torch at module
level, so ``rapidin-index query`` refuses a wrong K or a damaged index in a fraction of a second, and
(`identity.check_tokenizer`) a wrong tokenizer before the model loads. ``Index.open`` runs them unless its
caller already has (``checked``); ``build_index`` compares the stat fingerprint of the model's files
(`model_files_stat`) to find a no-op rebuild without loading the model.
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib import metadata as package_metadata
from pathlib import Path

from rapidin_index.errors import IntegrityError
from rapidin_index.store.identity import check_sketch_dim
from rapidin_index.store.manifest import Manifest


def check_files(index_dir: str | Path, manifest: Manifest) -> None:
    """Every file the manifest names is there (a stat each; ``verify_files`` checks their bytes)."""
    for relative in sorted(manifest.files):
        if not (Path(index_dir) / relative).exists():
            raise IntegrityError(
                f"{relative} is missing from {index_dir}, though its manifest names it: the index is "
                "damaged; rebuild it, or import it again from its bundle"
            )


def check_query(index_dir: str | Path, manifest: Manifest, sketch_dim: int | None) -> None:
    """A query's requested K (`identity.check_sketch_dim`), and the index's files, before anything heavy
    is imported."""
    check_sketch_dim(manifest, sketch_dim)
    check_files(index_dir, manifest)


# --------------------------------------------------------------------------- model files, unchanged?

# A file changed less than this long before its stat was recorded may change again within the same
# timestamp tick (git's "racily clean" problem): such a record is not made.
_SETTLED_NS = 2_000_000_000


def model_files_stat(folder: str | Path | None) -> str | None:
    """A cheap fingerprint of a local model or adapter folder: path, and every file's size, mtime, ctime
    and inode, plus the versions of the libraries that read them. Equal means the very same files (a
    write changes ctime, which no user can set back). None for a hub id, or files changed just now."""
    if folder is None or not Path(folder).is_dir():
        return None
    root = Path(folder).resolve()
    now, entries = time.time_ns(), []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        status = path.stat()  # follows links: the hub cache's snapshots link to their blobs
        if now - max(status.st_mtime_ns, status.st_ctime_ns) < _SETTLED_NS:
            return None
        entries.append(
            [path.relative_to(root).as_posix(), status.st_size, status.st_mtime_ns, status.st_ctime_ns]
            + [status.st_ino, status.st_dev]
        )
    versions = {name: _version(name) for name in ("torch", "transformers", "tokenizers", "peft")}
    text = json.dumps({"path": str(root), "files": entries, "versions": versions}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None
