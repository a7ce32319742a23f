"""Durable files: atomic writes, checksums, and the one "written by a newer version" check.

Everything the index, its journal, exports and reports write goes through `atomic_file`: a temporary
file with a unique name beside the target, flushed and fsynced, then renamed over it; a failure removes
the temporary file, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rapidin_index.errors import RapidinIndexError, WriteError

BLOCK_BYTES = 1 << 20


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write it inside the block; on success it replaces ``path``.

    The temporary name is unique (two writers never share one) and starts with a dot; mode 0644.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; an index is meant to be shared
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# OS errors that mean the disk refused a write, not a bug: the user can fix them by freeing space or
# choosing another folder.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
# How the writers in other languages say so: FAISS's C++ ("write error in ...: No space left on device")
# and lance's Rust ("LanceError(IO): ... (os error 28)"), raised as RuntimeError or errno-less OSError.
_WRITE_ERROR_TEXTS = ("write error", "No space left", "Disk quota", "LanceError(IO)", "os error 28")


@contextmanager
def writing(folder: str | Path, needed_bytes: int | Callable[[], int]) -> Iterator[None]:
    """Turn a write that the disk refuses inside the block into one `WriteError` naming ``folder`` and
    about how many bytes the write needs (``needed_bytes``, or a function giving it once known).

    The one place that maps OSError(ENOSPC, EDQUOT, EIO, ...) and FAISS / LanceDB write failures."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, RapidinIndexError) or not _refused_write(error):
            raise
        needed = needed_bytes() if callable(needed_bytes) else needed_bytes
        raise WriteError(_write_message(Path(folder), error, needed)) from None


def no_space(folder: str | Path, needed: int) -> WriteError:
    """The `WriteError` for a write refused before it starts: ``needed`` bytes do not fit in ``folder``."""
    return WriteError(_write_message(Path(folder), OSError(errno.ENOSPC, "No space left on device"), needed))


def _refused_write(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in WRITE_ERRNOS
    return any(text in str(error) for text in _WRITE_ERROR_TEXTS)


def _write_message(folder: Path, error: BaseException, needed: int) -> str:
    text = str(error)
    if isinstance(error, OSError) and error.errno is not None:
        reason = os.strerror(error.errno).lower()
    elif "No space left" in text or "os error 28" in text:
        reason = "no space left on device"
    elif "Disk quota" in text:
        reason = "disk quota exceeded"
    else:  # the first line, without the writer's source location
        line = next((line for line in text.splitlines() if line.strip()), type(error).__name__)
        reason = line.split(", /")[0].strip()[:160]
    place = folder
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = f", {_size(shutil.disk_usage(place).free)} free"
    except OSError:
        free = ""
    return (
        f"cannot write to {folder}: {reason}; this step needs about {_size(needed)} there{free}. "
        "Nothing was committed (what was there before is untouched): free some space, or choose another "
        "folder, and rerun"
    )


def _size(count: float) -> str:
    if count < 1024:
        return f"{int(count):,} bytes"
    for unit in ("KB", "MB", "GB"):
        count /= 1024
        if count < 1024 or unit == "GB":
            return f"{count:,.1f} {unit}"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_json(path: str | Path, value) -> None:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(folder: str | Path) -> str:
    """One checksum over every file (relative path + content) under ``folder``."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\n{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """`sha256_tree` of a folder, `sha256_file` of a file."""
    path = Path(path)
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def tree_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    if folder.is_file():
        return folder.stat().st_size
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def refuse_newer(version: int, supported: int, what: str, error: type[RapidinIndexError]) -> None:
    """Raise ``error`` if a file's format ``version`` is newer than this version of rapidin-index reads."""
    if version > supported:
        raise error(
            f"{what} format version {version} is newer than this rapidin-index understands "
            f"({supported}); upgrade rapidin-index to open it"
        )
