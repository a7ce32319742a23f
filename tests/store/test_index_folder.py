"""The index folder (store/index_folder.py): generation names, writing, reading and removing a generation."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import xxhash

from rapidin_index.data import RejectedRow
from rapidin_index.store import index_folder, row_table
from rapidin_index.store.vector_index import add_vectors, new_index

DIMENSION = 8

# --------------------------------------------------------------------------- names


def test_file_and_table_names():
    assert index_folder.vector_file(3) == "vectors-g0003.faiss"
    assert index_folder.rejected_file(3) == "rejected-g0003.jsonl"
    assert index_folder.table_name(3) == "rows_g0003"
    assert index_folder.table_path("/some/index", 12) == Path("/some/index/metadata/rows_g0012.lance")


@pytest.mark.parametrize(
    ("name", "generation"),
    [
        ("vectors-g0003.faiss", 3),
        ("rejected-g0042.jsonl", 42),
        ("rows_g0007.lance", 7),
        ("metadata/rows_g0007.lance", 7),
        ("g0003", 3),  # a reader lease under .readers/
        (".vectors-g0002.faiss.xyz.tmp", 2),  # a torn temporary of generation 2
        ("manifest.json", None),
        ("vectors.faiss", None),
        ("vectors-g003.faiss", None),  # three digits
        ("vectors-g00031.faiss", None),  # five digits
        ("blog0003.txt", None),  # g not at the start of a name part
        ("g0003x", None),
    ],
)
def test_generation_of(name, generation):
    assert index_folder.generation_of(name) == generation


# --------------------------------------------------------------------------- write and read


def _row(example_id: int) -> dict:
    return {
        "id": example_id,
        "source": json.dumps({"instruction": f"question {example_id}", "output": "answer"}),
        "prompt": f"question {example_id}",
        "response": "answer",
        "num_tokens": 5 + example_id,
        "num_response_tokens": 2,
        "truncated": example_id == 2,
        "loss": 0.5,
        "gradient_norm": 1.5,
        "content_hash": f"hash{example_id}",
    }


IDS = np.array([0, 2, 3])  # id 1 was rejected
REJECTED = [{"id": 1, "reason": "empty response"}]


def _write(index_dir: Path, generation: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    vectors = np.random.default_rng(seed).standard_normal((len(IDS), DIMENSION)).astype(np.float32)
    faiss_index = new_index(DIMENSION)
    add_vectors(faiss_index, vectors, IDS)
    batches = [[_row(0), _row(2)], [], [_row(3)]]
    files = index_folder.write_generation(index_dir, generation, faiss_index, batches, REJECTED)
    return vectors, files


def test_a_written_generation_reads_back(tmp_path):
    index_dir = tmp_path / "index"
    vectors, _ = _write(index_dir, 1)
    ids, loaded = index_folder.load_vectors(index_dir, 1)
    np.testing.assert_array_equal(ids, IDS)
    np.testing.assert_array_equal(loaded, vectors)
    assert index_folder.load_faiss(index_dir, 1).ntotal == len(IDS)
    rows = sorted(index_folder.read_all_rows(index_dir, 1), key=lambda row: row["id"])
    assert [row["id"] for row in rows] == [0, 2, 3]
    assert rows[1]["source"] == _row(2)["source"] and rows[1]["truncated"] is True  # JSON text
    assert index_folder.count_rows(index_dir, 1) == 3
    joined = row_table.read_rows(index_folder.open_rows(index_dir, 1), [3, 0, 3])
    assert sorted(joined) == [0, 3]
    assert joined[3]["source"] == {"instruction": "question 3", "output": "answer"}  # decoded
    assert index_folder.read_rejected(index_dir, SimpleNamespace(generation=1)) == [
        RejectedRow(example_id=1, reason="empty response")
    ]


def test_rows_are_read_before_vectors_and_rejected_rows_are_written(tmp_path):
    faiss_index = new_index(DIMENSION)
    rejected = []

    def batches():  # as a build reading its journal: each batch adds its vectors and rejections
        for example_id in (0, 1):
            add_vectors(faiss_index, np.full((1, DIMENSION), example_id, np.float32), np.array([example_id]))
            rejected.append({"id": 10 + example_id, "reason": "too long"})
            yield [_row(example_id)]

    index_folder.write_generation(tmp_path, 2, faiss_index, batches(), rejected)
    ids, _ = index_folder.load_vectors(tmp_path, 2)
    assert ids.tolist() == [0, 1]
    manifest = SimpleNamespace(generation=2)
    assert [row.example_id for row in index_folder.read_rejected(tmp_path, manifest)] == [10, 11]


def test_renamed_to_generation_renames_every_name_a_manifest_lists(tmp_path):
    _, files = _write(tmp_path, 1)
    renamed = sorted(index_folder.renamed_to_generation(name, 12) for name in files)
    assert renamed == ["metadata/rows_g0012.lance", "rejected-g0012.jsonl", "vectors-g0012.faiss"]
    assert index_folder.renamed_to_generation("manifest.json", 12) == "manifest.json"


def test_no_rejected_file_means_no_rejected_rows(tmp_path):
    assert index_folder.read_rejected(tmp_path, SimpleNamespace(generation=5)) == []


def _tree_sha256(folder: Path, new=hashlib.sha256) -> str:
    """The manifest's folder checksum, computed here from its definition: relative path + file sha256."""
    paths = sorted(Path(root, name) for root, _, names in os.walk(folder) for name in names)
    text = "".join(
        f"{path.relative_to(folder).as_posix()}\n{new(path.read_bytes()).hexdigest()}\n" for path in paths
    )
    return new(text.encode()).hexdigest()


def test_file_checksums_are_the_files_own(tmp_path):
    _, files = _write(tmp_path, 1)
    assert files == index_folder.file_checksums(tmp_path, 1)
    assert sorted(files) == ["metadata/rows_g0001.lance", "rejected-g0001.jsonl", "vectors-g0001.faiss"]
    for name in ("rejected-g0001.jsonl", "vectors-g0001.faiss"):
        data = (tmp_path / name).read_bytes()
        digests = {"sha256": hashlib.sha256(data).hexdigest(), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
        assert files[name] == {**digests, "bytes": len(data)}
    table = tmp_path / "metadata" / "rows_g0001.lance"
    table_bytes = sum(path.stat().st_size for path in table.rglob("*") if path.is_file())
    assert files["metadata/rows_g0001.lance"] == {
        "sha256": _tree_sha256(table),
        "xxh3_128": _tree_sha256(table, xxhash.xxh3_128),
        "bytes": table_bytes,
    }
    assert (tmp_path / "rejected-g0001.jsonl").read_text() == '{"id": 1, "reason": "empty response"}\n'


# --------------------------------------------------------------------------- remove


def test_remove_generation_removes_its_files_and_torn_temporaries_only(tmp_path):
    _write(tmp_path, 1, seed=1)
    _write(tmp_path, 2, seed=2)
    torn = [tmp_path / ".vectors-g0002.faiss.xyz.tmp", tmp_path / ".rejected-g0002.jsonl.abc.tmp"]
    other_torn = tmp_path / ".vectors-g0001.faiss.xyz.tmp"
    for path in [*torn, other_torn]:
        path.write_bytes(b"half")
    (tmp_path / "manifest.json").write_text("{}")
    assert set(index_folder.generation_paths(tmp_path)) == {
        *torn,
        other_torn,
        *(tmp_path / index_folder.vector_file(g) for g in (1, 2)),
        *(tmp_path / index_folder.rejected_file(g) for g in (1, 2)),
        *(index_folder.table_path(tmp_path, g) for g in (1, 2)),
    }
    index_folder.remove_generation(tmp_path, 2)
    assert not any(path.exists() for path in torn)
    assert not (tmp_path / index_folder.vector_file(2)).exists()
    assert not (tmp_path / index_folder.rejected_file(2)).exists()
    assert not index_folder.table_path(tmp_path, 2).exists()
    assert set(index_folder.generation_paths(tmp_path)) == {
        other_torn,
        tmp_path / index_folder.vector_file(1),
        tmp_path / index_folder.rejected_file(1),
        index_folder.table_path(tmp_path, 1),
    }
    assert (tmp_path / "manifest.json").exists()
    assert index_folder.count_rows(tmp_path, 1) == 3 and index_folder.load_vectors(tmp_path, 1)[
        0
    ].tolist() == [0, 2, 3]


def test_remove_generation_of_a_missing_generation_is_a_no_op(tmp_path):
    _write(tmp_path, 1)
    index_folder.remove_generation(tmp_path, 7)
    assert len(index_folder.generation_paths(tmp_path)) == 3


def test_remove_journal(tmp_path):
    journal = tmp_path / index_folder.JOURNAL_DIR
    journal.mkdir()
    (journal / "plan.json").write_text("{}")
    (tmp_path / "manifest.json").write_text("{}")
    index_folder.remove_journal(tmp_path)
    assert not journal.exists() and (tmp_path / "manifest.json").exists()
    index_folder.remove_journal(tmp_path)  # already gone: no error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.json"]


def test_a_generation_is_copied_page_by_page_in_any_id_order(tmp_path):
    """What append and merge read from an old generation: its ids alone, then its rows a page at a time."""
    _write(tmp_path, 1)
    assert index_folder.read_row_ids(tmp_path, 1).tolist() == [0, 2, 3]
    assert [
        row for page in index_folder.iter_rows(tmp_path, 1) for row in page
    ] == index_folder.read_all_rows(tmp_path, 1)
    reverse = [row["id"] for page in index_folder.iter_rows(tmp_path, 1, np.array([2, 1, 0])) for row in page]
    assert reverse == [3, 2, 0]


def test_the_rows_spill_beside_the_generation_and_a_killed_write_leaves_them_as_debris(tmp_path):
    """The rows wait in .rows-gNNNN.arrow.tmp while their column types are found: present while the
    batches are read, gone once the table is written; one a killed writer left is removed as debris."""
    spill = tmp_path / ".rows-g0001.arrow.tmp"
    seen = []

    def batches():
        for example_id in (0, 2, 3):
            yield [_row(example_id)]
            seen.append(spill.exists())

    faiss_index = new_index(DIMENSION)
    add_vectors(faiss_index, np.zeros((3, DIMENSION), np.float32), IDS)
    index_folder.write_generation(tmp_path, 1, faiss_index, batches(), REJECTED)
    assert seen == [True, True, True] and not spill.exists()
    assert len(row_table.open_table(tmp_path / index_folder.DATABASE_DIR, "rows_g0001").list_versions()) == 1
    torn = tmp_path / ".rows-g0002.arrow.tmp"
    torn.write_bytes(b"partial")
    assert ".rows-g0002.arrow.tmp" in index_folder.remove_debris(tmp_path, committed=1) and not torn.exists()


def _row_id_problem_reference(vector_ids, row_ids, rejected_ids, expected_ids) -> str:
    """The exactly-once check in plain Python sets and counters (what `index_folder.row_id_problem` computes
    in numpy)."""
    from collections import Counter

    seen = Counter([*vector_ids, *rejected_ids])
    twice = sorted(i for i, n in seen.items() if n > 1)
    if twice:
        return f"row {twice[0]} is present more than once ({len(twice)} such rows)"
    missing = sorted(set(expected_ids) - set(seen))
    if missing:
        return f"row {missing[0]} is missing ({len(missing)} rows missing)"
    unknown = sorted(set(seen) - set(expected_ids))
    if unknown:
        return f"row {unknown[0]} is not a row of this index's data ({len(unknown)} such rows)"
    if row_ids is not None and Counter(row_ids) != Counter(vector_ids):
        odd = sorted(set(Counter(row_ids).items()) ^ set(Counter(vector_ids).items()))[0][0]
        return f"LanceDB holds {len(row_ids)} rows and FAISS {len(vector_ids)} vectors; row {odd} is not once in each"
    return ""


def test_the_exactly_once_check_equals_a_plain_python_reference():
    generator = np.random.default_rng(0)
    for _ in range(300):
        total = int(generator.integers(1, 12))
        ids = generator.permutation(total + 2)[: total + int(generator.integers(-2, 3))].tolist()
        cut = int(generator.integers(0, len(ids) + 1))
        vector_ids, rejected = ids[:cut], ids[cut:]
        if generator.random() < 0.3 and vector_ids:
            vector_ids.append(int(generator.choice(vector_ids)))  # a duplicate
        row_ids = list(vector_ids)
        if generator.random() < 0.4 and row_ids:
            row_ids[int(generator.integers(len(row_ids)))] = int(generator.integers(total + 2))
        for rows in (row_ids, None):
            arguments = (vector_ids, rows, rejected, range(total))
            assert index_folder.row_id_problem(*arguments) == _row_id_problem_reference(*arguments), arguments
    assert index_folder.row_id_problem(np.array([1, 0]), np.array([0, 1]), [], range(2)) == ""
