"""The writer lock and reader leases of an index folder (store/lock.py), with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import processes
import pytest
from conftest import build_settings
from processes import cli, release, start_paused

from rapidin_index.build import build_index
from rapidin_index.errors import IndexLockedError
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings
from rapidin_index.store.bundle_export import export_index
from rapidin_index.store.bundle_import import import_bundle
from rapidin_index.store.lock import (
    LOCK_NAME,
    generations_on_disk,
    read_generation,
    remove_unread_generations,
    writer_lock,
)
from rapidin_index.store.manifest import read_manifest

K = 4096


def build_arguments(model_dir: str, data, index_dir) -> list[str]:
    return processes.build_arguments(model_dir, data, index_dir, K, 4)


def settings(model_dir: str, **overrides) -> BuildSettings:
    return build_settings(model_dir, sketch_dim=K, **{"chunk_size": 4, **overrides})


def assert_refused(result: subprocess.CompletedProcess, holder: subprocess.Popen) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert f"pid {holder.pid}" in result.stderr and "rapidin_index.cli.main build" in result.stderr
    assert "Wait for it to finish" in result.stderr


# --------------------------------------------------------------------------- in one process


def test_a_held_lock_refuses_a_second_writer_and_is_gone_after(tmp_path):
    index_dir = tmp_path / "new"
    with writer_lock(index_dir, "build"):
        holder = json.loads((index_dir / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["action"] == "build"
        with pytest.raises(IndexLockedError, match=f"pid {os.getpid()} .*build since .*kill {os.getpid()}"):
            with writer_lock(index_dir, "append"):
                pass
    assert not index_dir.exists()  # created for nothing: removed again
    (tmp_path / "kept").mkdir()
    with writer_lock(tmp_path / "kept", "merge"):
        (tmp_path / "kept" / "file").write_text("x")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["file"]  # no lock file left


def test_a_generation_with_a_reader_outlives_its_successor(tmp_path, tiny_model_dirs, training_rows):
    index_dir = tmp_path / "index"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps(row) + "\n" for row in training_rows[:12]))
    second.write_text("".join(json.dumps(row) + "\n" for row in training_rows[12:]))
    build_index(first, index_dir, settings(tiny_model_dirs["llama"]), progress=False)
    manifest, lease = read_generation(index_dir)
    build_index(second, index_dir, settings(tiny_model_dirs["llama"]), append=True, progress=False)
    assert read_manifest(index_dir).generation == 2 and manifest.generation == 1
    assert generations_on_disk(index_dir) == {1, 2}  # gen 1 is still read
    assert all((index_dir / relative).exists() for relative in manifest.files)
    lease.close()
    with writer_lock(index_dir, "build"):
        remove_unread_generations(index_dir, 2)
    assert generations_on_disk(index_dir) == {2}


def test_import_onto_a_locked_folder_is_refused(tmp_path, tiny_model_dirs, training_file):
    build_index(training_file, tmp_path / "index", settings(tiny_model_dirs["llama"]), progress=False)
    bundle = export_index(tmp_path / "index", tmp_path / "bundle.tar")
    with writer_lock(tmp_path / "target", "build"):
        with pytest.raises(IndexLockedError, match="is being written by"):
            import_bundle(bundle, tmp_path / "target")
    import_bundle(bundle, tmp_path / "target")
    import_bundle(bundle, tmp_path / "target", force=True)  # over an index: its next generation
    assert read_manifest(tmp_path / "target").generation == 2
    assert generations_on_disk(tmp_path / "target") == {2}


# --------------------------------------------------------------------------- real processes


def test_while_a_build_holds_the_lock_every_other_writer_is_refused(
    tmp_path, tiny_model_dirs, training_file, training_rows
):
    model_dir = tiny_model_dirs["llama"]
    for shard in (0, 1):  # for the merge below
        shard_settings = settings(model_dir, num_shards=2, shard_index=shard)
        build_index(training_file, tmp_path / f"shard{shard}", shard_settings, progress=False)
    index_dir, hold = tmp_path / "index", tmp_path / "hold"
    holder = start_paused(build_arguments(model_dir, training_file, index_dir), "locked", hold)
    try:
        started = time.monotonic()
        assert_refused(cli(*build_arguments(model_dir, training_file, index_dir)), holder)
        appended = build_arguments(model_dir, training_file, index_dir)
        appended[appended.index("--data")] = "--append"
        assert_refused(cli(*appended), holder)
        merged = cli("merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--index", str(index_dir))
        assert_refused(merged, holder)
        assert time.monotonic() - started < 240  # refused, not queued behind the holder
    finally:
        code, stderr = release(holder, hold)
    assert code == 0, stderr
    manifest = read_manifest(index_dir)
    assert manifest.row_count == len(training_rows) and manifest.generation == 1


def test_a_killed_holder_leaves_the_folder_writable(tmp_path, tiny_model_dirs, training_file, training_rows):
    index_dir, hold = tmp_path / "index", tmp_path / "hold"
    arguments = build_arguments(tiny_model_dirs["llama"], training_file, index_dir)
    holder = start_paused(arguments, "locked", hold)
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    assert json.loads((index_dir / LOCK_NAME).read_text())["pid"] == holder.pid  # stale, but unlocked
    result = cli(*arguments)
    assert result.returncode == 0, result.stderr
    assert read_manifest(index_dir).row_count == len(training_rows)
    assert not (index_dir / LOCK_NAME).exists()


def test_a_query_during_an_append_answers_from_the_old_generation(
    tmp_path, tiny_model_dirs, training_rows, training_file
):
    model_dir, index_dir, hold = tiny_model_dirs["llama"], tmp_path / "index", tmp_path / "hold"
    build_index(training_file, index_dir, settings(model_dir), progress=False)
    before = Index.open(index_dir, device="cpu")  # opened before the append, queried after it commits
    prompt, response = training_rows[0]["instruction"], training_rows[0]["output"]
    expected = before.query(prompt, response, top_k=5, explain=0).to_dict()
    more = tmp_path / "more.jsonl"
    more.write_text(
        "".join(json.dumps({**row, "output": row["output"] + " Indeed."}) + "\n" for row in training_rows)
    )
    appended = build_arguments(model_dir, more, index_dir)
    appended[appended.index("--data")] = "--append"
    appender = start_paused(appended, "before-commit", hold)  # generation 2 written, manifest not yet
    try:
        assert generations_on_disk(index_dir) == {1, 2}
        query = ["query", "--index", str(index_dir), "--prompt", prompt, "--response", response]
        result = cli(*query, "--top-k", "5", "--explain", "0", "--device", "cpu")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert [hit["id"] for hit in answer["helpful"]] == [hit["id"] for hit in expected["helpful"]]
        assert all(hit["id"] < len(training_rows) for hit in answer["helpful"] + answer["harmful"])
    finally:
        code, stderr = release(appender, hold)
    assert code == 0, stderr
    assert read_manifest(index_dir).row_count == 2 * len(training_rows)
    again = before.query(prompt, response, top_k=5, explain=0).to_dict()  # its files were kept for it
    assert [hit["id"] for hit in again["helpful"]] == [hit["id"] for hit in expected["helpful"]]
    after = Index.open(index_dir, device="cpu")
    assert after.manifest.generation == 2 and after.faiss_index.ntotal == 2 * len(training_rows)
