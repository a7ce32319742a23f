"""The build journal: a folder of finished chunks that lets a killed build resume where it stopped.

``plan.json`` records the build's arguments; a resume with other arguments is refused. Each chunk is
two files written atomically: the vectors (``.npy``) first, then a JSON record holding their sha256,
so a chunk counts as finished only when its record exists and matches the vectors on disk.
"""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import numpy as np

from rapidin_index.errors import JournalError
from rapidin_index.files import atomic_write_bytes, atomic_write_json, sha256_file
from rapidin_index.manifest import differences
from rapidin_index.store import JOURNAL_DIR

# Test-only fault injection: SIGKILL this process right after chunk N's vectors are written.
CRASH_AFTER_VECTORS_ENV = "RAPIDIN_INDEX_CRASH_AFTER_VECTORS"


def open_journal(index_dir: Path, plan: dict) -> Path:
    """The journal folder of this build; an unfinished build with a different plan is not mixed in."""
    journal = index_dir / JOURNAL_DIR
    plan_path = journal / "plan.json"
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        changed = differences(previous, plan)
        if changed:
            raise JournalError(
                f"{journal} holds an unfinished build with other arguments:\n  "
                + "\n  ".join(changed)
                + f"\nRerun with the original arguments to finish it, or delete {journal} to start over."
            )
        return journal
    journal.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_path, plan)
    return journal


def _chunk_paths(journal: Path, chunk_number: int) -> tuple[Path, Path]:
    stem = journal / f"chunk-{chunk_number:06d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def chunk_complete(journal: Path, chunk_number: int) -> bool:
    vectors_path, record_path = _chunk_paths(journal, chunk_number)
    if not record_path.exists() or not vectors_path.exists():
        return False
    record = json.loads(record_path.read_text())
    return record["vectors_sha256"] == sha256_file(vectors_path)


def write_chunk(journal: Path, chunk_number: int, record: dict, vectors: np.ndarray) -> None:
    """Vectors first, then the record naming their checksum: the record's presence marks completion."""
    vectors_path, record_path = _chunk_paths(journal, chunk_number)
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    atomic_write_bytes(vectors_path, buffer.getvalue())
    if os.environ.get(CRASH_AFTER_VECTORS_ENV) == str(chunk_number):
        os.kill(os.getpid(), signal.SIGKILL)
    record["vectors_sha256"] = sha256_file(vectors_path)
    atomic_write_json(record_path, record)


def read_chunk(journal: Path, chunk_number: int) -> tuple[dict, np.ndarray]:
    vectors_path, record_path = _chunk_paths(journal, chunk_number)
    return json.loads(record_path.read_text()), np.load(vectors_path, allow_pickle=False)
