"""The build journal (journal.py): the plan that a resume must match, and chunks that count only when whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rapidin_index.errors import JournalError
from rapidin_index.journal import (
    CRASH_AFTER_VECTORS_ENV,
    chunk_complete,
    open_journal,
    read_chunk,
    write_chunk,
)
from rapidin_index.store import JOURNAL_DIR

PLAN = {"data_sha256": "abc", "sketch": {"sketch_dim": 4096, "seed": 42}, "chunk_size": 8}


def _vectors(rows: int = 3) -> np.ndarray:
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / 7


def test_open_journal_records_the_plan_and_reopens_with_the_same_one(tmp_path):
    journal = open_journal(tmp_path, PLAN)
    assert journal == tmp_path / JOURNAL_DIR
    assert json.loads((journal / "plan.json").read_text()) == PLAN
    write_chunk(journal, 0, {"rows": 3}, _vectors())
    assert open_journal(tmp_path, json.loads(json.dumps(PLAN))) == journal
    assert chunk_complete(journal, 0)  # reopening keeps the finished chunks


def test_open_journal_refuses_a_different_plan_naming_what_changed(tmp_path):
    open_journal(tmp_path, PLAN)
    other = {**PLAN, "sketch": {"sketch_dim": 8192, "seed": 42}}
    with pytest.raises(JournalError) as raised:
        open_journal(tmp_path, other)
    message = str(raised.value)
    assert "sketch.sketch_dim: index has 4096, asked for 8192" in message
    assert "seed" not in message  # unchanged keys are not listed
    assert "Rerun with the original arguments" in message and str(tmp_path / JOURNAL_DIR) in message
    assert json.loads((tmp_path / JOURNAL_DIR / "plan.json").read_text()) == PLAN  # left as it was


def test_write_chunk_then_read_chunk(tmp_path):
    journal = open_journal(tmp_path, PLAN)
    vectors = _vectors()
    write_chunk(journal, 12, {"ids": [4, 5, 6], "rejected": []}, vectors)
    record, loaded = read_chunk(journal, 12)
    assert record["ids"] == [4, 5, 6] and record["rejected"] == []
    assert len(record["vectors_sha256"]) == 64
    np.testing.assert_array_equal(loaded, vectors)
    assert loaded.dtype == np.float32
    assert sorted(path.name for path in journal.iterdir()) == [
        "chunk-000012.json",
        "chunk-000012.npy",
        "plan.json",
    ]


def test_a_chunk_is_complete_only_with_both_files_matching(tmp_path):
    journal = open_journal(tmp_path, PLAN)
    assert not chunk_complete(journal, 0)  # never written
    write_chunk(journal, 0, {"rows": 3}, _vectors())
    assert chunk_complete(journal, 0)
    assert not chunk_complete(journal, 1)
    vectors_path, record_path = journal / "chunk-000000.npy", journal / "chunk-000000.json"

    record_path.rename(journal / "aside.json")  # vectors written, record not: a torn chunk
    assert not chunk_complete(journal, 0)
    (journal / "aside.json").rename(record_path)
    assert chunk_complete(journal, 0)

    original = vectors_path.read_bytes()
    vectors_path.write_bytes(original[:-4] + b"\x00\x00\x00\x00")  # vectors that are not the recorded ones
    assert not chunk_complete(journal, 0)
    vectors_path.unlink()  # a record whose vectors are gone
    assert not chunk_complete(journal, 0)


def test_a_kill_after_the_vectors_leaves_a_torn_chunk(tmp_path):
    journal = open_journal(tmp_path, PLAN)
    code = (
        "import sys, numpy as np\nfrom pathlib import Path\nfrom rapidin_index.journal import write_chunk\n"
        "write_chunk(Path(sys.argv[1]), 3, {'rows': 1}, np.ones((1, 4), np.float32))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(journal)],
        env={**os.environ, CRASH_AFTER_VECTORS_ENV: "3"},
        capture_output=True,
    )
    assert done.returncode == -9  # SIGKILL, as a killed build
    assert (journal / "chunk-000003.npy").exists() and not (journal / "chunk-000003.json").exists()
    assert not chunk_complete(journal, 3)
    write_chunk(journal, 3, {"rows": 1}, np.ones((1, 4), np.float32))  # the resume writes it again
    assert chunk_complete(journal, 3)
