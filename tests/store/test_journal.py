"""The build journal (store/journal.py): the plan that a resume must match, and chunks that count only when whole."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from rapidin_index.errors import JournalError
from rapidin_index.store.index_folder import JOURNAL_DIR
from rapidin_index.store.journal import (
    CRASH_AFTER_VECTORS_ENV,
    ChunkRecord,
    chunk_complete,
    chunk_problem,
    open_journal,
    read_chunk,
    write_chunk,
)

PLAN = {"data_sha256": "abc", "sketch": {"sketch_dim": 4096, "seed": 42}, "chunk_size": 8}


def _record(ids=(0, 1, 2)) -> ChunkRecord:
    return ChunkRecord(ids=list(ids), rows=[{"id": i} for i in ids], tokens=5 * len(ids))


def _vectors(rows: int = 3) -> np.ndarray:
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / 7


def test_open_journal_records_the_plan_and_reopens_with_the_same_one(tmp_path):
    journal = open_journal(tmp_path, PLAN)
    assert journal == tmp_path / JOURNAL_DIR
    assert json.loads((journal / "plan.json").read_text()) == PLAN
    write_chunk(journal, 0, _record(), _vectors())
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
    written = replace(_record([4, 5, 6]), self_checked={"device": "cpu"}, backward_path={"wte": "tied"})
    write_chunk(journal, 12, written, vectors)
    record, loaded = read_chunk(journal, 12)
    assert record == written and record.ids == [4, 5, 6] and record.rejected == []
    assert len(json.loads((journal / "chunk-000012.json").read_text())["vectors_sha256"]) == 64
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
    write_chunk(journal, 0, _record(), _vectors())
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
        "import sys, numpy as np\nfrom pathlib import Path\nfrom rapidin_index.store.journal import write_chunk\n"
        "from rapidin_index.store.journal import ChunkRecord\n"
        "write_chunk(Path(sys.argv[1]), 3, ChunkRecord([0], [{}]), np.ones((1, 4), np.float32))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(journal)],
        env={**os.environ, CRASH_AFTER_VECTORS_ENV: "3"},
        capture_output=True,
    )
    assert done.returncode == -9  # SIGKILL, as a killed build
    assert (journal / "chunk-000003.npy").exists() and not (journal / "chunk-000003.json").exists()
    assert not chunk_complete(journal, 3)
    write_chunk(journal, 3, _record([0]), np.ones((1, 4), np.float32))  # the resume writes it again
    assert chunk_complete(journal, 3)


# --------------------------------------------------------------------------- damaged records (issue 25)


def _written(tmp_path):
    journal = open_journal(tmp_path, PLAN)
    write_chunk(journal, 0, _record(), _vectors())
    assert chunk_problem(journal, 0) is None
    return journal, journal / "chunk-000000.json", journal / "chunk-000000.npy"


def test_a_record_with_one_digit_changed_in_its_ids_is_not_trusted(tmp_path):
    journal, record_path, _ = _written(tmp_path)
    record_path.write_text(
        record_path.read_text().replace('"ids": [\n    0,\n    1,', '"ids": [\n    0,\n    7,')
    )
    assert json.loads(record_path.read_text())["ids"] == [0, 7, 2]  # still valid JSON, same vectors checksum
    assert "does not match its checksum" in chunk_problem(journal, 0)
    with pytest.raises(JournalError, match="chunk 0 .* rerun the same command"):
        read_chunk(journal, 0)
    assert not record_path.exists()  # removed, so that the rerun recomputes it


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda record, vectors: record.write_bytes(record.read_bytes()[:40]), "not valid JSON"),
        (lambda record, vectors: record.write_bytes(b"\xff\xfe" + record.read_bytes()), "not valid JSON"),
        (lambda record, vectors: vectors.unlink(), "vectors file is missing"),
        (lambda record, vectors: record.unlink(), "record is missing"),
        (
            lambda record, vectors: vectors.write_bytes(
                vectors.read_bytes()[:-5] + bytes([vectors.read_bytes()[-5] ^ 1]) + vectors.read_bytes()[-4:]
            ),
            "vectors do not match",
        ),
    ],
    ids=["truncated-record", "not-utf8", "vectors-gone", "record-gone", "flipped-vector-byte"],
)
def test_every_damaged_chunk_names_why(tmp_path, damage, reason):
    journal, record_path, vectors_path = _written(tmp_path)
    damage(record_path, vectors_path)
    assert reason in chunk_problem(journal, 0)
    assert not chunk_complete(journal, 0)


def test_a_record_without_a_checksum_is_recomputed(tmp_path):
    """A journal written before records had their own checksum: safe to recompute, not to trust."""
    journal, record_path, _ = _written(tmp_path)
    record = json.loads(record_path.read_text())
    del record["record_sha256"]
    record_path.write_text(json.dumps(record))
    assert "no checksum" in chunk_problem(journal, 0)


def test_an_unwritten_chunk_has_no_problem_to_report(tmp_path):
    journal = open_journal(tmp_path, PLAN)
    assert chunk_problem(journal, 5) == ""


@pytest.mark.parametrize("text", [b'{"data_sha256": "ab', b"\xff\x00", b"[1, 2]"])
def test_a_damaged_plan_starts_the_journal_over_and_says_so(tmp_path, text):
    journal, _, _ = _written(tmp_path)
    (journal / "plan.json").write_bytes(text)
    notes: list[str] = []
    assert open_journal(tmp_path, PLAN, notes) == journal
    assert json.loads((journal / "plan.json").read_text()) == PLAN
    assert len(notes) == 1 and "plan.json is damaged" in notes[0] and "1 finished chunk(s)" in notes[0]
    assert not list(journal.glob("chunk-*"))  # chunks that cannot be matched to a plan are recomputed


# --------------------------------------------------------------------------- the typed record


def _write_as_the_untyped_code_did(journal, chunk_number: int, record: dict, vectors: np.ndarray) -> None:
    """A chunk as rapidin-index wrote it before `ChunkRecord`: the plain dict, then its two checksums
    (sha256 of the .npy bytes; sha256 of the canonical JSON without its own checksum)."""
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    (journal / f"chunk-{chunk_number:06d}.npy").write_bytes(buffer.getvalue())
    record = {**record, "vectors_sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    record["record_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (journal / f"chunk-{chunk_number:06d}.json").write_text(json.dumps(record, indent=2))


OLD_RECORD = {
    "ids": [8, 9],
    "rows": [{"id": 8, "prompt": "a"}, {"id": 9, "prompt": "b"}],
    "rejected": [{"id": 10, "reason": "row 10: no response"}],
    "tokens": 17,
    "truncated": 1,
    "templates": {"alpaca": 3},
    "exact_path": {"model.embed_tokens.weight": "tied to the output head"},
    "self_checked": {"device": "cpu", "dtype": "float32"},
}


def test_a_chunk_written_by_the_untyped_code_is_resumed_from(tmp_path):
    journal = open_journal(tmp_path, PLAN)
    _write_as_the_untyped_code_did(journal, 1, OLD_RECORD, _vectors(2))
    assert chunk_problem(journal, 1) is None  # trusted: not recomputed
    record, vectors = read_chunk(journal, 1)
    fields = {key: value for key, value in OLD_RECORD.items() if key != "exact_path"}
    assert record == ChunkRecord(**fields, backward_path=OLD_RECORD["exact_path"])
    np.testing.assert_array_equal(vectors, _vectors(2))
    older = {key: value for key, value in OLD_RECORD.items() if key not in ("exact_path", "self_checked")}
    _write_as_the_untyped_code_did(journal, 2, older, _vectors(2))  # from before those two fields
    record, _ = read_chunk(journal, 2)
    assert record.backward_path == {} and record.self_checked is None and record.ids == [8, 9]


def test_the_typed_record_writes_the_same_json_as_the_untyped_one(tmp_path):
    journal = open_journal(tmp_path, PLAN)
    fields = {key: value for key, value in OLD_RECORD.items() if key != "exact_path"}
    write_chunk(journal, 1, ChunkRecord(**fields, backward_path=OLD_RECORD["exact_path"]), _vectors(2))
    typed = (journal / "chunk-000001.json").read_bytes()
    _write_as_the_untyped_code_did(journal, 1, OLD_RECORD, _vectors(2))
    assert json.loads(typed) == json.loads((journal / "chunk-000001.json").read_bytes())


def test_a_record_missing_a_field_is_recomputed_naming_it(tmp_path):
    journal = open_journal(tmp_path, PLAN)
    damaged = {key: value for key, value in OLD_RECORD.items() if key != "tokens"}
    _write_as_the_untyped_code_did(journal, 0, damaged, _vectors(2))
    assert chunk_problem(journal, 0) == "its record has no 'tokens' (written by an older rapidin-index)"
