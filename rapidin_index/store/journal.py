"""The build journal: a folder of finished chunks that lets a killed build resume where it stopped.

``plan.json`` records the build's arguments; a resume with other arguments is refused, and a plan that
cannot be read is replaced by this build's (its chunks, which cannot be matched to it, are recomputed).
Each chunk is two files written atomically: the vectors (``.npy``) first, then a JSON record holding
their sha256 and a sha256 of the record itself. A chunk counts as finished only when both checksums
match; any other chunk (torn by a kill, damaged on disk, or written before records had a checksum) is
recomputed, never trusted, and the build says which and why (`chunk_problem`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rapidin_index.errors import JournalError
from rapidin_index.files import atomic_write_bytes, atomic_write_json, writing
from rapidin_index.store.identity import differences
from rapidin_index.store.index_folder import JOURNAL_DIR
from rapidin_index.store.manifest import KEYS_OF_FIELDS

# Test-only fault injection: SIGKILL this process right after chunk N's vectors are written.
CRASH_AFTER_VECTORS_ENV = "RAPIDIN_INDEX_CRASH_AFTER_VECTORS"
PLAN_NAME = "plan.json"


@dataclass(frozen=True)
class ChunkRecord:
    """What one finished chunk adds to the index, beside its vectors (row i of them is ``ids[i]``'s).

    Written as a JSON object (`to_json`) whose keys are the field names (``backward_path``'s is the
    manifest's, `manifest.KEYS_OF_FIELDS`), as the untyped records before this class were written: a
    build interrupted by an older rapidin-index resumes from its journal.
    """

    ids: list[int]
    """The indexed rows' ids (id offset of an append included), ascending."""
    rows: list[dict]
    """Their LanceDB rows, in the same order."""
    rejected: list[dict] = field(default_factory=list)
    """``{"id", "reason"}`` of each row of the chunk that was not indexed."""
    tokens: int = 0
    """Tokens of the indexed rows."""
    truncated: int = 0
    """Indexed rows cut at ``max_length``."""
    templates: dict = field(default_factory=dict)
    """``{resolved template name: rows}`` over the chunk's rows."""
    backward_path: dict = field(default_factory=dict)
    """``{parameter name: why}`` for tensors whose gradients took one plain backward per example."""
    self_checked: dict | None = None
    """Where the worker checked its hooks (`gradients.check_environment`); None: not by this worker."""

    def to_json(self) -> dict:
        return {
            "ids": list(self.ids),
            "rows": list(self.rows),
            "rejected": list(self.rejected),
            "tokens": self.tokens,
            "truncated": self.truncated,
            "templates": dict(self.templates),
            KEYS_OF_FIELDS["backward_path"]: dict(self.backward_path),
            "self_checked": self.self_checked,
        }

    @classmethod
    def from_json(cls, value: dict) -> ChunkRecord:
        """A record as `to_json` (or an older rapidin-index) wrote it; KeyError names a missing field."""
        return cls(
            ids=value["ids"],
            rows=value["rows"],
            rejected=value["rejected"],
            tokens=value["tokens"],
            truncated=value["truncated"],
            templates=value["templates"],
            backward_path=value.get(KEYS_OF_FIELDS["backward_path"], {}),  # {} in records from before it
            self_checked=value.get("self_checked"),
        )


def open_journal(index_dir: Path, plan: dict, notes: list[str] | None = None) -> Path:
    """The journal folder of this build; an unfinished build with a different plan is not mixed in.

    A ``plan.json`` that cannot be read starts the journal over, with a line in ``notes`` saying so."""
    journal = index_dir / JOURNAL_DIR
    plan_path = journal / PLAN_NAME
    if plan_path.exists():
        previous, damage = _read_json(plan_path)
        if damage or not isinstance(previous, dict):
            chunks = len(list(journal.glob("chunk-*.json")))
            for path in journal.glob("chunk-*"):
                path.unlink(missing_ok=True)
            if notes is not None:
                notes.append(
                    f"the journal's {plan_path} is damaged ({damage or 'not a JSON object'}): its {chunks} "
                    "finished chunk(s) cannot be matched to this build and are recomputed"
                )
        else:
            changed = differences(previous, plan)
            if changed:
                raise JournalError(
                    f"{journal} holds an unfinished build with other arguments:\n  "
                    + "\n  ".join(changed)
                    + f"\nRerun with the original arguments to finish it, or delete {journal} to start over."
                )
            return journal
    journal.mkdir(parents=True, exist_ok=True)
    with writing(journal, len(json.dumps(plan))):
        atomic_write_json(plan_path, plan)
    return journal


def _chunk_paths(journal: Path, chunk_number: int) -> tuple[Path, Path]:
    stem = journal / f"chunk-{chunk_number:06d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _record_checksum(record: dict) -> str:
    """sha256 of the record's canonical JSON (sorted keys, no spaces), its own checksum left out."""
    body = {key: value for key, value in record.items() if key != "record_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_json(path: Path) -> tuple[object, str]:
    """(value, '') or (None, why it cannot be read)."""
    try:
        return json.loads(path.read_bytes()), ""
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"not valid JSON: {str(error)[:80]}"


def _load_checked(journal: Path, chunk_number: int) -> tuple[ChunkRecord | None, np.ndarray | None, str]:
    """(record, vectors, '') of a finished chunk; (None, None, why) for any other one ('' if unwritten)."""
    vectors_path, record_path = _chunk_paths(journal, chunk_number)
    if not record_path.exists():
        torn = vectors_path.exists()  # a build stopped between the two writes
        return None, None, "its record is missing (the build was stopped while writing it)" if torn else ""
    record, damage = _read_json(record_path)
    if damage:
        return None, None, f"its record is {damage}"
    if not isinstance(record, dict) or "record_sha256" not in record:
        return None, None, "its record has no checksum (written by an older rapidin-index)"
    if record["record_sha256"] != _record_checksum(record):
        return None, None, "its record does not match its checksum (ids or rows changed on disk)"
    if not vectors_path.exists():
        return None, None, "its vectors file is missing"
    data = vectors_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.get("vectors_sha256"):
        return None, None, "its vectors do not match their checksum"
    try:
        typed = ChunkRecord.from_json(record)
    except KeyError as error:
        return None, None, f"its record has no {error.args[0]!r} (written by an older rapidin-index)"
    vectors = np.load(io.BytesIO(data), allow_pickle=False)
    if vectors.shape[0] != len(typed.ids):
        return None, None, f"it holds {vectors.shape[0]} vectors for {len(typed.ids)} ids"
    return typed, vectors, ""


def chunk_problem(journal: Path, chunk_number: int) -> str | None:
    """None if the chunk is finished and whole; else why it must be (re)computed ('' if never written)."""
    record, _, problem = _load_checked(journal, chunk_number)
    return None if record is not None else problem


def chunk_complete(journal: Path, chunk_number: int) -> bool:
    return chunk_problem(journal, chunk_number) is None


def write_chunk(journal: Path, chunk_number: int, record: ChunkRecord, vectors: np.ndarray) -> None:
    """Vectors first, then the record naming their checksum: the record's presence marks completion."""
    vectors_path, record_path = _chunk_paths(journal, chunk_number)
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    data = buffer.getvalue()
    with writing(journal, 2 * len(data)):
        atomic_write_bytes(vectors_path, data)
        if os.environ.get(CRASH_AFTER_VECTORS_ENV) == str(chunk_number):
            os.kill(os.getpid(), signal.SIGKILL)
        value = record.to_json()
        value["vectors_sha256"] = hashlib.sha256(data).hexdigest()
        value["record_sha256"] = _record_checksum(value)
        atomic_write_json(record_path, value)


def read_chunk(journal: Path, chunk_number: int) -> tuple[ChunkRecord, np.ndarray]:
    """A finished chunk, checked again as it is read; a chunk damaged since is removed and refused."""
    record, vectors, problem = _load_checked(journal, chunk_number)
    if record is None:
        for path in _chunk_paths(journal, chunk_number):
            path.unlink(missing_ok=True)
        raise JournalError(
            f"journal chunk {chunk_number} in {journal} changed after it was checked "
            f"({problem or 'it is gone'}); it was removed: rerun the same command to recompute it"
        )
    return record, vectors
