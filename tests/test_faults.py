"""The fault campaign of issue 25, as tests: damaged files, killed writers and hostile bundles.

Every trial ends in one clean line (exit 2, no traceback) or in the clean index's own answer, never in a
different answer; every killed build or append, rerun, holds each row exactly once with the vectors of a
clean build. Trials are seeded (``SEED``), on a tiny Llama at K = 256 with a few dozen rows.

Killed writers run in forked children of this (warmed-up) process, so that a trial costs about a second;
the kill is a real SIGKILL at a seeded random moment of the child's run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import build_settings, docstring_rows, stored_vectors
from rapidin_index.cli.main import app
from store.test_bundle_import import CASES, OPEN_CASES, rewrite
from typer.testing import CliRunner

from rapidin_index.build import build_index
from rapidin_index.errors import IntegrityError, RapidinIndexError
from rapidin_index.store import index_folder, journal
from rapidin_index.store.manifest import read_manifest
from rapidin_index.store.verify import check_files

SEED = 25
SKETCH_DIM = 256
KILL_TRIALS = 10
runner = CliRunner()


# --------------------------------------------------------------------------- the clean indexes


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, tiny_model_dirs):
    """A clean index of 26 rows (2 rejected: empty responses), the same plus 12 appended rows, and the
    clean answer of a query on the first."""
    root = tmp_path_factory.mktemp("faults")
    rows = docstring_rows(36)
    base = [*rows[:12], {"instruction": "Say nothing.", "output": ""}, *rows[12:24]]
    base.append({"instruction": "Again nothing.", "output": " "})
    files = {}
    for name, part in (("base", base), ("more", rows[24:36])):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(row) + "\n" for row in part))
    settings = build_settings(tiny_model_dirs["llama"], sketch_dim=SKETCH_DIM)
    clean = root / "clean"
    build_index(files["base"], clean, settings, progress=False)
    appended = root / "appended"
    shutil.copytree(clean, appended)
    build_index(files["more"], appended, settings, append=True, progress=False)
    query = {"prompt": rows[3]["instruction"], "response": rows[3]["output"]}
    found = SimpleNamespace(root=root, files=files, settings=settings, clean=clean, appended=appended)
    found.query = query
    found.answer = answer(clean, query, root / "clean-answer.json")
    assert found.answer.exit_code == 0 and read_manifest(clean).rejected_count == 2
    return found


def answer(index_dir: Path, query: dict, out: Path) -> SimpleNamespace:
    """`rapidin-index query` (in this process): exit code, error lines, and the hits (id, score, text)."""
    arguments = ["query", "--index", str(index_dir), "--prompt", query["prompt"], "--response"]
    arguments += [query["response"], "--top-k", "5", "--per-token", "off", "--explain", "0"]
    result = runner.invoke(app, [*arguments, "--device", "cpu", "--out", str(out)])
    hits = None
    if result.exit_code == 0:
        found = json.loads(out.read_text())
        hits = [
            (hit["id"], round(hit["score"], 6), hit.get("response"))
            for side in ("helpful", "harmful")
            for hit in found[side]
        ]
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    return SimpleNamespace(exit_code=result.exit_code, errors=errors, output=result.output, hits=hits)


def assert_refused_or_right(found: SimpleNamespace, clean: SimpleNamespace, what: str) -> str:
    """One clean line and exit 2, or exit 0 with the clean answer; returns which."""
    assert "Traceback" not in found.output, f"{what}: traceback\n{found.output}"
    if found.exit_code == 0:
        assert found.hits == clean.hits, f"{what}: a different answer in silence"
        return "answered"
    assert found.exit_code == 2 and len(found.errors) == 1, f"{what}: not one clean line\n{found.output}"
    return "refused"


# --------------------------------------------------------------------------- byte flips


def flip_byte(path: Path, generator: random.Random) -> int:
    data = bytearray(path.read_bytes())
    offset = generator.randrange(len(data))
    data[offset] ^= generator.randrange(1, 256)
    path.write_bytes(bytes(data))
    return offset


FILE_KINDS = {
    "FAISS": lambda index: index / "vectors-g0001.faiss",
    "LanceDB data file": lambda index: next((index / "metadata" / "rows_g0001.lance" / "data").iterdir()),
    "manifest": lambda index: index / "manifest.json",
    "rejected rows": lambda index: index / "rejected-g0001.jsonl",
}


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_a_flipped_byte_is_refused_on_one_line_or_answers_right(campaign, tmp_path, kind):
    """Four seeded flips per file kind, each queried through the CLI: FAISS, LanceDB and rejected-row
    flips are refused by the checksums on open; a manifest flip is refused by its own checksum, its JSON
    or its schema, unless it hit nothing a query reads, in which case the answer must be the clean one."""
    generator = random.Random(f"{SEED}-{kind}")
    outcomes = []
    for trial in range(4):
        damaged = shutil.copytree(campaign.clean, tmp_path / f"trial{trial}")
        offset = flip_byte(FILE_KINDS[kind](damaged), generator)
        found = answer(damaged, campaign.query, tmp_path / f"answer{trial}.json")
        outcomes.append(assert_refused_or_right(found, campaign.answer, f"{kind} byte {offset}"))
    if kind != "manifest":
        assert outcomes == ["refused"] * 4  # every byte of these files changes what a query reads


def test_a_damaged_file_is_refused_in_a_separate_process(campaign, tmp_path):
    """As users run it: `rapidin-index query` in its own process, a flipped byte in the LanceDB data file
    (the case that answered with another row's text before issue 25)."""
    damaged = shutil.copytree(campaign.clean, tmp_path / "damaged")
    flip_byte(FILE_KINDS["LanceDB data file"](damaged), random.Random(SEED))
    command = [sys.executable, "-m", "rapidin_index.cli.main", "query", "--index", str(damaged)]
    command += ["--prompt", campaign.query["prompt"], "--response", campaign.query["response"]]
    done = subprocess.run([*command, "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert "rows_g0001.lance does not match its checksum" in line and "re-import its bundle" in line


def test_info_on_damaged_rejected_rows_is_one_line(campaign, tmp_path):
    """`info` lists rejected rows without verifying checksums: a cut-off line is one line, not a
    JSONDecodeError."""
    damaged = shutil.copytree(campaign.clean, tmp_path / "damaged")
    rejected = damaged / "rejected-g0001.jsonl"
    rejected.write_bytes(rejected.read_bytes()[:-9])
    result = runner.invoke(app, ["info", "--index", str(damaged)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "rejected-g0001.jsonl" in errors[0] and "is damaged" in errors[0] and "rebuild" in errors[0]


@pytest.mark.parametrize("kind", ["FAISS", "LanceDB data file"])
def test_append_onto_a_damaged_index_is_refused_before_any_work(campaign, tmp_path, kind):
    damaged = shutil.copytree(campaign.clean, tmp_path / "damaged")
    (damaged / ".verified.json").unlink(missing_ok=True)
    check_files(damaged, read_manifest(damaged))  # stamps written: append must not trust them
    target = FILE_KINDS[kind](damaged)
    stat = target.stat()
    flip_byte(target, random.Random(SEED))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as before
    before = sorted(p.name for p in damaged.iterdir())
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        build_index(campaign.files["more"], damaged, campaign.settings, append=True, progress=False)
    assert read_manifest(damaged).generation == 1
    assert sorted(p.name for p in damaged.iterdir()) == before


# --------------------------------------------------------------------------- killed writers


def _build_in_child(data: str, index_dir: str, settings, append: bool, environment: dict) -> None:
    import torch

    for name in [name for name in os.environ if name.startswith("RAPIDIN_INDEX_")]:
        del os.environ[name]  # the fork server's environment is the one it started with, not the test's
    os.environ.update(environment)
    torch.set_num_threads(1)
    build_index(data, index_dir, settings, append=append, progress=False)


def _children():
    """Children forked from a fork server that imported the build and nothing else: a fork of the test
    worker itself (torch's and LanceDB's threads running) can crash in the child (seen in CI: SIGSEGV)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "rapidin_index.build", "rapidin_index.models"])
    return context


def run_child(data: Path, index_dir: Path, settings, append: bool, kill_after: float | None) -> float:
    """Run a build in a child (`_children`); SIGKILL it after ``kill_after`` seconds (if still running)."""
    context = _children()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lancedb's note that its fork support is experimental
        environment = {name: value for name, value in os.environ.items() if name.startswith("RAPIDIN_INDEX_")}
        arguments = (str(data), str(index_dir), settings, append, environment)
        child = context.Process(target=_build_in_child, args=arguments)
        started = time.perf_counter()
        child.start()
    child.join(kill_after if kill_after is not None else 120)
    if child.is_alive():
        child.kill()
        child.join(30)
        assert not child.is_alive(), "a killed build did not die"
        assert kill_after is not None, "a build hung in its child"
    elif kill_after is None:
        assert child.exitcode == 0, f"a build exited with {child.exitcode}"
    return time.perf_counter() - started


def assert_same_index(index_dir: Path, reference: Path) -> None:
    """Every row exactly once, in FAISS and LanceDB, with the reference's vectors; files verify."""
    manifest, expected = read_manifest(index_dir), read_manifest(reference)
    check_files(index_dir, manifest, full=True)
    assert (manifest.row_count, manifest.rejected_count) == (expected.row_count, expected.rejected_count)
    vectors, wanted = stored_vectors(index_dir), stored_vectors(reference)
    assert sorted(vectors) == sorted(wanted) and len(vectors) == manifest.row_count
    assert max(float(np.abs(vectors[i] - wanted[i]).max()) for i in wanted) <= 1e-6
    table_ids = [row["id"] for row in index_folder.read_all_rows(index_dir, manifest.generation)]
    assert sorted(table_ids) == sorted(wanted)  # each once
    rejected = [row.example_id for row in index_folder.read_rejected(index_dir, manifest)]
    assert sorted(rejected) == sorted(
        row.example_id for row in index_folder.read_rejected(reference, expected)
    )


@pytest.mark.parametrize("append", [False, True], ids=["build", "append"])
def test_kill_9_at_random_moments_then_rerun_gives_the_clean_index(campaign, tmp_path, append):
    """KILL_TRIALS seeded SIGKILLs spread over a build's (or an append's) whole run; each rerun finishes
    it (or finds it finished) and the index equals a clean one, every row once."""
    data = campaign.files["more" if append else "base"]
    reference = campaign.appended if append else campaign.clean
    start = lambda trial: (  # noqa: E731
        shutil.copytree(campaign.clean, tmp_path / f"trial{trial}") if append else tmp_path / f"trial{trial}"
    )
    whole = run_child(data, start("timing"), campaign.settings, append, None)
    generator = random.Random(f"{SEED}-{append}")
    for trial in range(KILL_TRIALS):
        index_dir = start(trial)
        moment = generator.uniform(0.05, 1.1) * whole
        run_child(data, index_dir, campaign.settings, append, moment)
        finished = (index_dir / "manifest.json").exists() and (
            not append or len(read_manifest(index_dir).sources) == 2
        )
        if not finished:
            build_index(data, index_dir, campaign.settings, append=append, progress=False)
        assert_same_index(index_dir, reference)
        shutil.rmtree(index_dir)


def _journal_records_are_checked(tmp_path: Path) -> bool:
    """Whether a journal record whose ids were edited stops counting as finished (issue 25 item 2)."""
    try:
        folder = tmp_path / "probe"
        folder.mkdir()
        journal.write_chunk(folder, 0, {"ids": [1, 2], "rows": []}, np.zeros((2, 4), np.float32))
        record = next(folder.glob("*.json"))
        value = json.loads(record.read_text())
        value["ids"] = [1, 1]
        record.write_text(json.dumps(value))
        if not journal.chunk_complete(folder, 0):
            return True
        journal.read_chunk(folder, 0)
        return False
    except Exception:  # refused on read, or another journal API: the campaign test decides
        return True


def test_a_damaged_journal_record_is_recomputed_not_trusted(campaign, tmp_path, monkeypatch):
    """A build killed after two chunks; one digit of a finished chunk's ids changed; the rerun must give
    the clean index (the record recomputed) or refuse on one typed line, never a duplicated row."""
    if not _journal_records_are_checked(tmp_path):
        pytest.skip(
            "journal records carry no checksum of their ids on this branch (issue 25 item 2, helper F1's "
            "branch); this trial gives a duplicated and a missing row without it"
        )
    index_dir = tmp_path / "index"
    monkeypatch.setenv(journal.CRASH_AFTER_VECTORS_ENV, "2")
    run_child(campaign.files["base"], index_dir, campaign.settings, False, 120)
    monkeypatch.delenv(journal.CRASH_AFTER_VECTORS_ENV)
    record = index_dir / index_folder.JOURNAL_DIR / "chunk-000001.json"
    value = json.loads(record.read_text())
    value["ids"][0] = value["ids"][1]  # a duplicated id, as one changed digit gives
    record.write_text(json.dumps(value))
    try:
        build_index(campaign.files["base"], index_dir, campaign.settings, progress=False)
    except RapidinIndexError:
        return  # refused on one line
    assert_same_index(index_dir, campaign.clean)


# --------------------------------------------------------------------------- hostile bundles


@pytest.mark.parametrize("case", [*CASES, *OPEN_CASES])
def test_hostile_bundles_are_refused_on_one_line_and_write_nothing(exported_index, tmp_path, case):
    """Every tampered, unsafe or unopenable bundle of test_bundle_import, through `import` and
    `import --check`: exit 2, one line naming what is wrong, no target and no staging folder left."""
    edit, message_parts = {**CASES, **OPEN_CASES}[case]
    bundle = rewrite(exported_index.bundle, tmp_path / "hostile.tar.gz", edit)
    before = sorted(p.name for p in tmp_path.iterdir())
    for arguments in (["--index", str(tmp_path / "target")], ["--check"]):
        result = runner.invoke(app, ["import", str(bundle), *arguments])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1, result.output
        assert all(part in errors[0] for part in message_parts), errors[0]
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
