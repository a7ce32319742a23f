"""Faults on the write side (issue 25): damaged journals, full disks, killed writers' debris, and the
exactly-once check every commit makes. Commands run as users run them, in separate processes, where a
kill or an exit code is what is tested; the rest in-process with an injected writer error."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import processes
import pytest
from conftest import build_settings, stored_vectors
from processes import cli, start_paused

from rapidin_index.build import build_index
from rapidin_index.errors import BuildError, IntegrityError, WriteError
from rapidin_index.store import index_folder
from rapidin_index.store.bundle_export import export_index
from rapidin_index.store.bundle_import import MOVING_NAME, import_bundle
from rapidin_index.store.index_folder import JOURNAL_DIR
from rapidin_index.store.journal import CRASH_AFTER_VECTORS_ENV, read_chunk, write_chunk
from rapidin_index.store.lock import writer_lock
from rapidin_index.store.manifest import read_manifest, verify_files, write_manifest

K = 1024
CHUNK = 4
LANCE_FULL = (
    "lance error: LanceError(IO): No space left on device (os error 28), /root/.cargo/registry/src/"
    "lance-file-13.0.0/src/writer/structural.rs:258:9"
)


def build_arguments(model_dir: str, data, index_dir, *extra: str) -> list[str]:
    return processes.build_arguments(model_dir, data, index_dir, K, CHUNK, *extra)


def settings(tiny_model_dirs):
    return build_settings(tiny_model_dirs["llama"], sketch_dim=K, chunk_size=CHUNK)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)


def assert_same_index(index_dir, reference, row_count: int) -> None:
    """Every row id once in FAISS and in LanceDB, and the vectors of a clean build."""
    expected, found = stored_vectors(reference), stored_vectors(index_dir)
    assert sorted(found) == sorted(expected) == list(range(row_count))
    for example_id, vector in expected.items():
        np.testing.assert_allclose(found[example_id], vector, atol=1e-6)
    generation = read_manifest(index_dir).generation
    ids = [row["id"] for row in index_folder.read_all_rows(index_dir, generation)]
    assert sorted(ids) == list(range(row_count))


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def debris(folder: Path) -> list[str]:
    """Temporaries and staging folders anywhere under (and beside) ``folder``."""
    found = [p.name for p in folder.rglob("*.tmp")]
    return found + [p.name for p in folder.parent.glob(f".{folder.name}.import-*")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dirs, training_file):
    """A clean build of the training rows (K = 1024, chunks of 4) and its tar.gz bundle."""
    root = tmp_path_factory.mktemp("reference")
    build_index(training_file, root / "index", settings(tiny_model_dirs), progress=False)
    export_index(root / "index", root / "bundle.tar.gz")
    return root


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, tiny_model_dirs, training_file):
    """An index folder whose build was killed (SIGKILL) after chunk 5's vectors: chunks 0-4 whole, 5 torn."""
    index_dir = tmp_path_factory.mktemp("crashed") / "index"
    killed = cli(
        *build_arguments(tiny_model_dirs["llama"], training_file, index_dir),
        env={CRASH_AFTER_VECTORS_ENV: "5"},
    )
    assert killed.returncode == -signal.SIGKILL
    return index_dir


# --------------------------------------------------------------------------- item 2: journal checksums


def test_a_damaged_journal_is_recomputed_on_resume_and_the_resume_says_so(
    tmp_path, tiny_model_dirs, training_file, training_rows, reference, crashed
):
    index_dir = tmp_path / "index"
    shutil.copytree(crashed, index_dir)
    arguments = build_arguments(tiny_model_dirs["llama"], training_file, index_dir)
    journal = index_dir / JOURNAL_DIR
    # chunk 0: one digit of its ids changed, still valid JSON; chunk 1: one byte of a vector flipped;
    # chunk 2: its record cut in half; chunk 3: its vectors gone; chunk 4 whole; chunk 5 torn by the kill.
    record_path = journal / "chunk-000000.json"
    record = json.loads(record_path.read_text())
    record["ids"][1] = 5
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True))
    vectors_path = journal / "chunk-000001.npy"
    data = bytearray(vectors_path.read_bytes())
    data[-7] ^= 0x10
    vectors_path.write_bytes(bytes(data))
    half = journal / "chunk-000002.json"
    half.write_bytes(half.read_bytes()[: len(half.read_bytes()) // 2])
    (journal / "chunk-000003.npy").unlink()

    resumed = cli(*arguments)
    assert resumed.returncode == 0, resumed.stderr
    notes = [line for line in resumed.stderr.splitlines() if "journal chunk" in line]
    assert len(notes) == 5, resumed.stderr
    reasons = {
        0: "record does not match its checksum",
        1: "vectors do not match their checksum",
        2: "record is not valid JSON",
        3: "vectors file is missing",
        5: "record is missing",
    }
    for note, (number, why) in zip(notes, reasons.items(), strict=True):
        assert f"journal chunk {number} is recomputed: its {why}" in note
    assert "chunks resumed from journal" in resumed.stderr  # chunk 4 was whole and kept
    assert_same_index(index_dir, reference / "index", len(training_rows))


def test_a_damaged_plan_restarts_the_journal(
    tmp_path, tiny_model_dirs, training_file, training_rows, reference, crashed
):
    index_dir = tmp_path / "index"
    shutil.copytree(crashed, index_dir)
    (index_dir / JOURNAL_DIR / "plan.json").write_bytes(b'{"kind": "build", "data_pa')
    report = build_index(training_file, index_dir, settings(tiny_model_dirs), progress=False)
    assert report.resumed_chunks == 0
    assert any("plan.json is damaged" in note and "recomputed" in note for note in report.notes)
    assert_same_index(index_dir, reference / "index", len(training_rows))


# --------------------------------------------------------------------------- item 6: exactly once


def test_row_id_problem_names_the_first_row_wrong():
    assert index_folder.row_id_problem([0, 2], [2, 0], [1], range(3)) == ""
    assert "row 2 is present more than once" in index_folder.row_id_problem([0, 2], [0, 2], [2, 1], range(3))
    assert "row 1 is missing (1 rows missing)" in index_folder.row_id_problem([0, 2], [0, 2], [], range(3))
    assert "row 7 is not a row of this index" in index_folder.row_id_problem([0, 1, 2, 7], None, [], range(3))
    lost = index_folder.row_id_problem([0, 1, 2], [0, 2], [], range(3))
    assert "LanceDB holds 2 rows and FAISS 3 vectors; row 1" in lost


def test_a_commit_refuses_a_journal_that_holds_a_row_twice(
    tmp_path, tiny_model_dirs, training_file, training_rows, reference, crashed
):
    """A chunk whose record and checksums agree but whose ids overlap another chunk's (as a buggy
    worker could write): the build refuses to commit, clears the journal, and a rerun is whole."""
    index_dir = tmp_path / "index"
    shutil.copytree(crashed, index_dir)
    journal = index_dir / JOURNAL_DIR
    record, vectors = read_chunk(journal, 1)
    ids = [0, *record.ids[1:]]  # row 0 is chunk 0's: now twice, and row 4 nowhere
    write_chunk(journal, 1, replace(record, ids=ids), vectors)
    with pytest.raises(BuildError, match="row 0 is present more than once.*rerun the same command"):
        build_index(training_file, index_dir, settings(tiny_model_dirs), progress=False)
    assert not (index_dir / "manifest.json").exists() and not journal.exists()
    assert not index_folder.generation_paths(index_dir)  # the uncommitted generation is gone
    build_index(training_file, index_dir, settings(tiny_model_dirs), progress=False)
    assert_same_index(index_dir, reference / "index", len(training_rows))


def test_append_refuses_a_generation_whose_lancedb_lost_rows(
    tmp_path, tiny_model_dirs, training_rows, reference
):
    """LanceDB lost rows the FAISS file still has (and the manifest's checksums were made to match):
    nothing is appended, and the line names the generation and the fix."""
    index_dir = tmp_path / "index"
    shutil.copytree(reference / "index", index_dir)
    manifest = read_manifest(index_dir)
    rows = index_folder.read_all_rows(index_dir, 1)
    from rapidin_index.store import row_table

    row_table.write_table(index_dir / index_folder.DATABASE_DIR, index_folder.table_name(1), [rows[:-3]])
    manifest.files = index_folder.file_checksums(index_dir, 1)
    write_manifest(index_dir, manifest)
    before = (index_dir / "manifest.json").read_bytes()
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps(row) + "\n" for row in training_rows[:3]))
    with pytest.raises(IntegrityError, match=r"generation 1 is damaged .*LanceDB holds 21 rows.*re-import"):
        build_index(more, index_dir, settings(tiny_model_dirs), append=True, progress=False)
    assert (index_dir / "manifest.json").read_bytes() == before
    assert not list(index_dir.glob("*-g0002.*")) and not index_folder.table_path(index_dir, 2).exists()


# --------------------------------------------------------------------------- item 3: full disk


def test_a_full_disk_while_writing_the_vectors_ends_in_one_line_and_the_rerun_resumes(
    tmp_path, tiny_model_dirs, training_file, training_rows, reference, crashed
):
    index_dir = tmp_path / "index"
    shutil.copytree(crashed, index_dir)
    prelude = (  # the vectors file is written as a stream (vector_file.VectorWriter), not by FAISS
        "import errno\n"
        "from rapidin_index.store import vector_file\n"
        "def add_codes(self, codes, ids):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "vector_file.VectorWriter.add_codes = add_codes\n"
    )
    full = cli(*build_arguments(tiny_model_dirs["llama"], training_file, index_dir), prelude=prelude)
    assert full.returncode == 2
    line = one_error_line(full.stderr)
    assert f"cannot write to {index_dir}: no space left on device" in line and "needs about" in line
    assert "KB" in line and "Nothing was committed" in line
    assert not (index_dir / "manifest.json").exists()
    assert not index_folder.generation_paths(index_dir) and not debris(index_dir)
    report = build_index(training_file, index_dir, settings(tiny_model_dirs), progress=False)
    assert report.resumed_chunks == -(-len(training_rows) // CHUNK)  # the journal survived
    assert_same_index(index_dir, reference / "index", len(training_rows))


def test_a_full_disk_during_append_leaves_the_previous_generation_untouched(
    tmp_path, tiny_model_dirs, training_rows, reference, monkeypatch
):
    index_dir = tmp_path / "index"
    shutil.copytree(reference / "index", index_dir)
    before = (index_dir / "manifest.json").read_bytes()
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps(row) + "\n" for row in training_rows[:3]))
    from rapidin_index.store import row_table

    write_table = row_table.write_table

    def full_after_some_rows(database, name, row_batches, *spill):
        write_table(
            database, name, row_batches, *spill
        )  # a partial table on disk, as a real full disk leaves
        raise RuntimeError(LANCE_FULL)

    monkeypatch.setattr(row_table, "write_table", full_after_some_rows)
    with pytest.raises(WriteError, match=f"cannot write to {index_dir}: no space left on device; this step"):
        build_index(more, index_dir, settings(tiny_model_dirs), append=True, progress=False)
    assert (index_dir / "manifest.json").read_bytes() == before
    verify_files(index_dir, read_manifest(index_dir))  # generation 1 still whole
    assert not index_folder.table_path(index_dir, 2).exists() and not list(index_dir.glob("*-g0002.*"))


def test_a_full_disk_during_export_leaves_no_bundle(tmp_path, reference, monkeypatch):
    from rapidin_index.store import bundle_export

    def full(path, *args):
        Path(path).write_bytes(b"\x1f\x8b partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(bundle_export, "_write_archive", full)
    out = tmp_path / "out" / "bundle.tar.gz"
    out.parent.mkdir()
    with pytest.raises(WriteError, match=f"cannot write to {out.parent}: no space left on device.*about"):
        export_index(reference / "index", out)
    assert not list(out.parent.iterdir())  # neither the bundle nor its temporary


def test_a_full_disk_during_import_leaves_no_folder(tmp_path, reference, monkeypatch):
    from rapidin_index.store import bundle_import

    extract = bundle_import._extract_member
    calls = []

    def full_on_the_second_member(file, size, entry, target):
        calls.append(entry["path"])
        if len(calls) == 2:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return extract(file, size, entry, target)

    monkeypatch.setattr(bundle_import, "_extract_member", full_on_the_second_member)
    target = tmp_path / "imported"
    with pytest.raises(WriteError, match=f"cannot write to {tmp_path}: no space left on device"):
        import_bundle(reference / "bundle.tar.gz", target)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no target, no staging folder


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d; rc=$?; rmdir $d; exit $rc"
    done = subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, timeout=30)
    return done.returncode == 0


def test_a_real_full_disk_build_export_and_import(tmp_path, tiny_model_dirs, training_file, reference):
    """On a small tmpfs (mounted in a private mount namespace; skipped where that is not allowed)."""
    if not _can_mount_tmpfs():
        pytest.skip("mounting a tmpfs needs root and unshare here")
    mount = tmp_path / "small"
    mount.mkdir()
    run = f"{sys.executable} -c 'from rapidin_index.cli.main import app; app()'"
    build = " ".join(build_arguments(tiny_model_dirs["llama"], training_file, mount / "index"))
    build_step = "{run} {build} 2>{tmp}/{step}.err; echo {step}=$? >>{tmp}/codes; ls -A {mount}/index > {tmp}/{step}.left"
    script = "\n".join(
        [
            "set -u",
            f"mount -t tmpfs -o size=24k tmpfs {mount}",  # room for the plan, not for a chunk
            build_step.format(run=run, build=build, tmp=tmp_path, step="journal", mount=mount),
            f"umount {mount} && mount -t tmpfs -o size=160k tmpfs {mount}",  # the journal fits, the index not
            build_step.format(run=run, build=build, tmp=tmp_path, step="build", mount=mount),
            f"umount {mount} && mount -t tmpfs -o size=64k tmpfs {mount}",
            f"{run} export --index {reference}/index --out {mount}/b.tar.gz 2>{tmp_path}/export.err;"
            f" echo export=$? >>{tmp_path}/codes",
            f"ls -A {mount} > {tmp_path}/export.left",
            f"{run} import {reference}/bundle.tar.gz --index {mount}/imported 2>{tmp_path}/import.err;"
            f" echo import=$? >>{tmp_path}/codes",
            f"ls -A {mount} > {tmp_path}/import.left",
        ]
    )
    subprocess.run(["unshare", "-m", "sh", "-c", script], check=True, timeout=600)
    codes = dict(line.split("=") for line in (tmp_path / "codes").read_text().split())
    assert codes == {"journal": "2", "build": "2", "export": "2", "import": "2"}, codes
    for step, folder in [("journal", mount / "index" / JOURNAL_DIR), ("build", mount / "index")]:
        line = one_error_line((tmp_path / f"{step}.err").read_text())
        assert f"cannot write to {folder}: no space left on device" in line and "needs about" in line, line
        left = (tmp_path / f"{step}.left").read_text().split()
        assert "manifest.json" not in left and not [name for name in left if name.endswith(".tmp")]
    for step in ("export", "import"):
        line = one_error_line((tmp_path / f"{step}.err").read_text())
        assert f"cannot write to {mount}: no space left on device" in line and "needs about" in line, line
    assert (tmp_path / "export.left").read_text().split() == []
    assert (tmp_path / "import.left").read_text().split() == []


# --------------------------------------------------------------------------- item 6: debris


def _plant_temporaries(index_dir: Path) -> list[Path]:
    """Temporaries named as `files.atomic_file` names them, as a writer killed mid-write leaves them."""
    planted = []
    for target in ("vectors-g0001.faiss", "manifest.json", f"{JOURNAL_DIR}/chunk-000009.npy"):
        path = index_dir / target
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.write(handle, b"partial")
        os.close(handle)
        planted.append(Path(name))
    return planted


def test_remove_debris_keeps_the_committed_generation_and_files_not_ours(tmp_path):
    names = [
        "vectors-g0001.faiss", "rejected-g0001.jsonl", "vectors-g0002.faiss", ".vectors-g0002.faiss.ab12.tmp",
        ".manifest.json.cd34.tmp", ".bundle.tar.gz.ef56.tmp", "notes.txt", f"{JOURNAL_DIR}/.chunk-000001.npy.x.tmp",
        f"{index_folder.DATABASE_DIR}/rows_g0001.lance/data.bin", f"{index_folder.DATABASE_DIR}/rows_g0002.lance/data.bin",
    ]  # fmt: skip
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = index_folder.remove_debris(tmp_path, committed=1)
    assert sorted(removed) == sorted(
        [
            ".vectors-g0002.faiss.ab12.tmp", ".manifest.json.cd34.tmp", f"{JOURNAL_DIR}/.chunk-000001.npy.x.tmp",
            "vectors-g0002.faiss", f"{index_folder.DATABASE_DIR}/rows_g0002.lance",
        ]
    )  # fmt: skip
    kept = ["vectors-g0001.faiss", "rejected-g0001.jsonl", ".bundle.tar.gz.ef56.tmp", "notes.txt"]
    assert all((tmp_path / name).exists() for name in kept)
    assert (tmp_path / index_folder.DATABASE_DIR / "rows_g0001.lance" / "data.bin").exists()
    assert sorted(index_folder.remove_debris(tmp_path, committed=None)) == sorted(
        ["vectors-g0001.faiss", "rejected-g0001.jsonl", f"{index_folder.DATABASE_DIR}/rows_g0001.lance"]
    )  # no manifest: nothing is committed
    assert not (tmp_path / index_folder.DATABASE_DIR).exists()


def test_the_next_writer_removes_a_killed_builds_debris(
    tmp_path, tiny_model_dirs, training_file, training_rows, reference, crashed
):
    index_dir = tmp_path / "index"
    shutil.copytree(crashed, index_dir)  # the resume computes one chunk, then stops before its commit
    arguments = build_arguments(tiny_model_dirs["llama"], training_file, index_dir)
    builder = start_paused(arguments, "before-commit", tmp_path / "hold")
    kill(builder)  # generation 1 written, its manifest not
    assert (index_dir / "vectors-g0001.faiss").exists() and not (index_dir / "manifest.json").exists()
    planted = _plant_temporaries(index_dir)
    with writer_lock(index_dir, "test"):
        assert not any(path.exists() for path in planted)
        assert not index_folder.generation_paths(
            index_dir
        )  # nothing committed: every generation file is debris
        assert list((index_dir / JOURNAL_DIR).glob("chunk-*.json"))  # the journal is work, not debris
    report = build_index(training_file, index_dir, settings(tiny_model_dirs), progress=False)
    assert report.resumed_chunks == -(-len(training_rows) // CHUNK)
    assert_same_index(index_dir, reference / "index", len(training_rows))


def test_a_killed_append_leaves_nothing_the_next_writer_keeps(
    tmp_path, tiny_model_dirs, training_rows, reference
):
    index_dir = tmp_path / "index"
    shutil.copytree(reference / "index", index_dir)
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps(row) + "\n" for row in training_rows[:3]))
    arguments = build_arguments(tiny_model_dirs["llama"], more, index_dir)
    arguments[arguments.index("--data")] = "--append"
    appender = start_paused(arguments, "before-commit", tmp_path / "hold")
    kill(appender)
    assert (index_dir / "vectors-g0002.faiss").exists()
    with writer_lock(index_dir, "test"):
        assert not list(index_dir.glob("*-g0002.*")) and not index_folder.table_path(index_dir, 2).exists()
        assert (index_dir / "vectors-g0001.faiss").exists()  # the committed generation stays
    verify_files(index_dir, read_manifest(index_dir))


@pytest.mark.parametrize("moved", [1, 2, 3], ids=lambda n: f"killed-after-{n}-moves")
@pytest.mark.parametrize("over_an_index", [False, True], ids=["new-folder", "force"])
def test_an_import_killed_while_moving_its_files_is_recovered(tmp_path, reference, over_an_index, moved):
    """Killed after each of its three moves (the manifest not yet in place): the next import, plain or
    --force, rolls the moved files back and imports; an index it was replacing answers meanwhile."""
    target = tmp_path / "imported"
    arguments = ["import", str(reference / "bundle.tar.gz"), "--index", str(target)]
    if over_an_index:
        shutil.copytree(reference / "index", target)
        arguments.append("--force")
    importer = start_paused(arguments, f"import-moved-{moved}", tmp_path / "hold")
    kill(importer)
    if moved == 2 and not over_an_index:
        arguments.append("--force")  # recovers a half-moved import into a new folder too
    assert (target / MOVING_NAME).exists() and debris(target)
    if over_an_index:
        verify_files(target, read_manifest(target))  # the old index still answers meanwhile
    again = cli(*arguments)
    assert again.returncode == 0, again.stderr
    assert not debris(target) and not (target / MOVING_NAME).exists()
    manifest = read_manifest(target)
    verify_files(target, manifest)
    assert sorted(p.name for p in target.glob("*-g*")) == sorted(
        Path(name).name for name in manifest.files if "/" not in name
    )
    assert stored_vectors(target).keys() == stored_vectors(reference / "index").keys()


# --------------------------------------------------------------------------- item 5: damaged rows, bad input


@pytest.mark.parametrize(
    "text, where",
    [
        (b'{"id": 3, "reason": "too long"}\n{"id": 4, "rea', "line 2"),
        (b"\xff\xfe\n", "not UTF-8"),
        (b'{"id": 3}\n', "line 1"),
    ],
    ids=["cut-short", "not-utf8", "no-reason"],
)
def test_a_damaged_rejected_file_is_one_line_naming_it(tmp_path, reference, text, where):
    index_dir = tmp_path / "index"
    shutil.copytree(reference / "index", index_dir)
    (index_dir / "rejected-g0001.jsonl").write_bytes(text)
    shown = cli("info", "--index", str(index_dir), "--json")
    assert shown.returncode == 2
    line = one_error_line(shown.stderr)
    assert str(index_dir / "rejected-g0001.jsonl") in line and where in line and "rebuild" in line


def test_a_hit_on_a_row_lancedb_lost_is_one_line_naming_the_index(
    tmp_path, tiny_model_dirs, training_rows, reference
):
    """The FAISS file finds row 0, whose LanceDB row is gone (the manifest's checksums made to match, so
    that only the join can notice): one line naming the index and the fix, not `KeyError: 0`."""
    from rapidin_index.store import row_table

    index_dir = tmp_path / "index"
    shutil.copytree(reference / "index", index_dir)
    rows = index_folder.read_all_rows(index_dir, 1)
    row_table.write_table(
        index_dir / index_folder.DATABASE_DIR, index_folder.table_name(1), [[r for r in rows if r["id"]]]
    )
    manifest = read_manifest(index_dir)
    manifest.files = index_folder.file_checksums(index_dir, 1)
    write_manifest(index_dir, manifest)
    row = training_rows[0]
    asked = cli(
        "query", "--index", str(index_dir), "--model", tiny_model_dirs["llama"], "--device", "cpu",
        "--prompt", row["instruction"], "--response", row["output"], "--top-k", str(len(training_rows)),
        "--explain", "0", "--format", "json",
    )  # fmt: skip
    assert asked.returncode == 2, asked.stderr
    line = one_error_line(asked.stderr)
    assert f"{index_dir}: row 0 is in the FAISS file but not in the LanceDB table rows_g0001" in line
    assert "re-import its bundle or rebuild it" in line


def test_damaged_parquet_data_is_one_data_error_naming_the_file(tmp_path):
    """Seeded byte flips anywhere in a Parquet file (footer, schema, pages): a DataError naming it, or
    rows, never Arrow's or Python's own exception (ArrowInvalid, UnicodeDecodeError)."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    from rapidin_index.errors import DataError
    from rapidin_index.readers import check_source, read_rows

    good = tmp_path / "good.parquet"
    rows = [{"instruction": f"question {i} " * 3, "output": f"answer {i} " * 4, "n": i} for i in range(200)]
    parquet.write_table(pa.Table.from_pylist(rows), good, compression="none")
    data = good.read_bytes()
    refused = 0
    for seed in range(150):
        generator = np.random.default_rng(seed)
        damaged = bytearray(data)
        for position in generator.integers(4, len(data) - 4, size=3):
            damaged[position] ^= int(generator.integers(1, 256))
        path = tmp_path / f"damaged-{seed}.parquet"
        path.write_bytes(bytes(damaged))
        try:
            list(read_rows(check_source(path, None)))
        except DataError as error:
            assert str(path) in str(error)
            refused += 1
    assert refused > 50  # most flips are noticed; the rest land in text and change it


def test_a_garbage_parquet_file_and_a_negative_explain_are_one_line(tmp_path, tiny_model_dirs, reference):
    garbage = tmp_path / "rows.parquet"
    garbage.write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    built = cli(*build_arguments(tiny_model_dirs["llama"], garbage, tmp_path / "index"))
    assert built.returncode == 2
    assert f"cannot read {garbage}: not a valid Parquet file" in one_error_line(built.stderr)
    asked = cli(
        "query", "--index", str(reference / "index"), "--prompt", "q", "--response", "a", "--explain", "-1"
    )
    assert asked.returncode == 2
    assert "--explain must be at least 0, got -1" in one_error_line(asked.stderr)
