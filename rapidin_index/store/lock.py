"""Who may write an index folder, and which generation's files a reader still needs.

Writers (build, resume, append, merge, import) hold an exclusive ``flock`` on ``DIR/.lock`` for as long as
they write; a second writer is refused at once, with the holder's pid and command read from the lock file.
The kernel drops the lock when the holder dies, so a ``kill -9`` never leaves the folder locked.

Readers never block. A reader holds a shared ``flock`` on ``DIR/.readers/gNNNN`` (a *lease*) for the
generation it opened; a writer that has committed a newer generation removes an old one's files only
when it can take that lease file exclusively, i.e. when nobody reads it. A generation still being read is
left in place and removed by a later writer. The manifest stays the commit point: a reader only ever
opens the files of the manifest it read, and checks after taking its lease that the manifest still names
that generation (else a writer may have removed its files in between, and it reads the new manifest).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rapidin_index.errors import IndexLockedError, ManifestError
from rapidin_index.files import writing
from rapidin_index.store import index_folder
from rapidin_index.store.manifest import MANIFEST_NAME, Manifest, read_manifest, utc_now

LOCK_NAME = ".lock"
READERS_DIR = ".readers"
# Names of the lock files a writer and readers keep in an index folder (an import's target may hold them).
LOCK_FILES = (LOCK_NAME, READERS_DIR)
# Test-only: "POINT:PATH" makes a writer that reaches pause POINT ("locked": the writer lock was just
# taken; "before-commit": a build wrote its new generation, not yet its manifest; "import-moved-N": an
# import moved its Nth file into place, not yet its manifest) create PATH.paused and
# wait while PATH exists (at most two minutes). The tests use it to hold a writer still at that point.
PAUSE_ENV = "RAPIDIN_INDEX_TEST_PAUSE"


# --------------------------------------------------------------------------- the writer lock


@contextmanager
def writer_lock(index_dir: str | Path, action: str) -> Iterator[None]:
    """Hold the folder's writer lock while the block runs (creating the folder if needed).

    Raises :class:`IndexLockedError` at once when another process holds it. On exit the lock file is
    removed (while still locked, so no one can hold a lock on a file that is gone) and a folder this call
    created is removed again if nothing else was written to it.
    """
    index_dir = Path(index_dir)
    created = not index_dir.exists()
    descriptor = _acquire(index_dir, action)
    try:
        remove_debris(index_dir)
        pause_point("locked")
        yield
    finally:
        (index_dir / LOCK_NAME).unlink(missing_ok=True)
        os.close(descriptor)
        if created:
            _remove_if_empty(index_dir)


def remove_debris(index_dir: Path) -> list[str]:
    """What a killed writer left (temporaries, an uncommitted generation), removed by the next writer
    (`index_folder.remove_debris`); a manifest that cannot be read leaves every generation in place."""
    manifest_path = index_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return index_folder.remove_debris(index_dir, None)
    try:
        committed = read_manifest(index_dir).generation
    except (ManifestError, OSError, ValueError):
        return index_folder.remove_debris(index_dir, None, generations=False)
    return index_folder.remove_debris(index_dir, committed)


def _acquire(index_dir: Path, action: str) -> int:
    path = index_dir / LOCK_NAME
    for _ in range(100):  # a releaser may remove the lock file (or the folder) between our steps
        index_dir.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise IndexLockedError(_locked_message(index_dir, path)) from None
        if _same_file(descriptor, path):
            try:
                with writing(index_dir, 4096):  # a full disk refuses even the holder's record
                    _write_holder(descriptor, action)
            except BaseException:
                os.close(descriptor)
                raise
            return descriptor
        os.close(descriptor)  # we locked a lock file its holder had just removed: take the new one
    raise IndexLockedError(f"{index_dir}: could not take the writer lock {path}; retry")


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _write_holder(descriptor: int, action: str) -> None:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _command_line(),
        "action": action,
        "since": utc_now(),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)


def _command_line() -> str:
    """How this process was started, as a shell would show it: ``rapidin-index build ...``."""
    if Path(sys.argv[0]).name == "rapidin-index":
        arguments = ["rapidin-index", *sys.argv[1:]]
    else:  # python -m ..., python -c ..., a script
        arguments = list(getattr(sys, "orig_argv", sys.argv))
        arguments[0] = Path(arguments[0]).name
    text = " ".join(shlex.join(arguments).split())  # one line, even for python -c "..."
    return text if len(text) <= 200 else text[:197] + "..."


def read_holder(index_dir: str | Path) -> dict | None:
    """The lock file's holder record ({pid, host, command, action, since}), or None if there is none."""
    path = Path(index_dir) / LOCK_NAME
    for _ in range(20):  # the holder writes its record just after locking: give it a moment
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        if text.strip():
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass
        time.sleep(0.01)
    return None


def _locked_message(index_dir: Path, path: Path) -> str:
    holder = read_holder(index_dir)
    if holder is None:
        who = "another process"
        stop = "stop it"
    else:
        who = (
            f"pid {holder['pid']} on {holder['host']} ({holder['action']} since {holder['since']}: "
            f"{holder['command']})"
        )
        stop = f"stop it (kill {holder['pid']})"
    return (
        f"{index_dir} is being written by {who}. Wait for it to finish, or {stop} and rerun: "
        f"the lock ({path}) is released when that process ends, however it ends, and a stopped build "
        "resumes from its journal"
    )


def _remove_if_empty(index_dir: Path) -> None:
    readers = index_dir / READERS_DIR
    try:
        if readers.is_dir() and not any(readers.iterdir()):
            readers.rmdir()
        index_dir.rmdir()
    except OSError:
        pass  # not empty (or another process is using it): leave it


# --------------------------------------------------------------------------- reader leases


class ReaderLease:
    """A shared lock on one generation's lease file: while held, no writer removes that generation."""

    def __init__(self, descriptor: int | None, generation: int) -> None:
        self.descriptor = descriptor
        self.generation = generation

    def close(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def lease_path(index_dir: str | Path, generation: int) -> Path:
    return Path(index_dir) / READERS_DIR / f"g{generation:04d}"


def _take_lease(index_dir: Path, generation: int) -> ReaderLease | None:
    """A lease on ``generation``; None while a writer is removing it. A folder we may not write to gets
    a lease that holds nothing: no writer with our permissions could remove the files either."""
    path = lease_path(index_dir, generation)
    try:
        path.parent.mkdir(exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return ReaderLease(None, generation)
        if error.errno == errno.ENOENT:
            return None  # the index folder itself is going away
        raise
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return ReaderLease(descriptor, generation)


def read_generation(index_dir: str | Path) -> tuple[Manifest, ReaderLease]:
    """The index's manifest and a lease that keeps the files it names in place until released."""
    index_dir = Path(index_dir)
    for _ in range(100):
        manifest = read_manifest(index_dir)
        lease = _take_lease(index_dir, manifest.generation)
        if lease is None:
            time.sleep(0.01)
            continue
        if read_manifest(index_dir).generation == manifest.generation:
            return manifest, lease
        lease.close()  # a writer committed in between: its successor may have removed our files
    raise ManifestError(f"{index_dir} changed 100 times while it was being opened; retry")


def remove_unread_generations(index_dir: str | Path, keep: int) -> list[int]:
    """Remove every generation but ``keep`` that has files here and no reader (`index_folder.remove_generation`);
    returns the generations left in place because a reader holds them. Call with the writer lock held."""
    index_dir = Path(index_dir)
    still_read = []
    for generation in sorted(generations_on_disk(index_dir) - {keep}):
        path = lease_path(index_dir, generation)
        try:
            path.parent.mkdir(exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            still_read.append(generation)
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            still_read.append(generation)
            os.close(descriptor)
            continue
        try:
            index_folder.remove_generation(index_dir, generation)
            path.unlink(missing_ok=True)  # still locked: a reader arriving now re-reads the manifest
        finally:
            os.close(descriptor)
    return still_read


def generations_on_disk(index_dir: Path) -> set[int]:
    """Generations with a data file, LanceDB table or lease file in the folder."""
    candidates = [
        *index_folder.generation_paths(index_dir),
        *(index_dir / READERS_DIR).glob("g[0-9][0-9][0-9][0-9]"),
    ]
    return {g for g in (index_folder.generation_of(path.name) for path in candidates) if g is not None}


# --------------------------------------------------------------------------- test hook


def pause_point(name: str) -> None:
    """Test-only: hold this process at ``name`` while the file named by RAPIDIN_INDEX_TEST_PAUSE exists."""
    value = os.environ.get(PAUSE_ENV, "")
    point, _, path = value.partition(":")
    if point != name or not path:
        return
    Path(path + ".paused").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
