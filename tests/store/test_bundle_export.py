"""Bundles: export -> import -> the same query results; every corruption refused, naming the bad member."""

import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from rapidin_index.cli.main import app
from typer.testing import CliRunner

from rapidin_index.errors import BundleError
from rapidin_index.retrieval import Index
from rapidin_index.store import index_folder
from rapidin_index.store.bundle import BUNDLE_NAME, manifest_facts
from rapidin_index.store.bundle_export import export_index, read_parquet_export
from rapidin_index.store.bundle_import import import_bundle, verify_bundle
from rapidin_index.store.manifest import read_manifest, sealed

runner = CliRunner()
FAISS_MEMBER = "vectors-g0001.faiss"


def query_summary(index_dir, model: str, row: dict) -> tuple:
    """Ids and scores of the helpful and harmful hits, whole generation and per generated token."""
    result = Index.open(index_dir, model=model, device="cpu", verify=True).query(
        row["instruction"], row["output"], top_k=5, explain=0
    )

    def hits(items):
        return [(hit.id, hit.score) for hit in items]

    tokens = [(t.token_id, hits(t.helpful), hits(t.harmful)) for t in result.tokens]
    return hits(result.helpful), hits(result.harmful), tokens


@pytest.fixture(scope="module")
def original(exported_index, training_rows):
    return query_summary(exported_index.index, exported_index.model, training_rows[5])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["bundle.tar.gz", "bundle.zip", "bundle.tar", "bundle.tar.zst"])
def test_imported_bundle_answers_like_the_original(exported_index, original, training_rows, tmp_path, name):
    bundle = export_index(exported_index.index, tmp_path / name)
    target = tmp_path / "imported"
    manifest = import_bundle(bundle, target)
    assert manifest.to_dict() == read_manifest(exported_index.index).to_dict()
    assert not (target / BUNDLE_NAME).exists()
    summary = query_summary(target, exported_index.model, training_rows[5])
    assert summary == original
    assert len(summary[0]) == 5 and len(summary[2]) > 3


def test_bundle_describes_itself_in_a_fixed_member_order(exported_index):
    with tarfile.open(exported_index.bundle) as archive:
        names = archive.getnames()
        description = json.load(archive.extractfile(BUNDLE_NAME))
    assert names[:2] == [BUNDLE_NAME, "manifest.json"] and names[2:] == sorted(names[2:])
    assert FAISS_MEMBER in names and any(n.startswith("metadata/rows_g0001.lance/data/") for n in names)
    assert [entry["path"] for entry in description["members"]] == names[1:]
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] >= 0 for entry in description["members"])
    manifest = read_manifest(exported_index.index)
    assert description["bundle_format_version"] == 1 and description["archive_format"] == "tar.gz"
    assert description["software"]["name"] == "rapidin-index" and description["exported_at"]
    facts = description["index"]
    assert facts == json.loads(json.dumps(manifest_facts(manifest)))
    assert facts["model"]["fingerprint"] == manifest.model["fingerprint"] and facts["row_count"] == 24
    assert facts["sketch"]["sketch_dim"] == 1024 and facts["created_at"] == manifest.created_at
    assert verify_bundle(exported_index.bundle) == description


def test_a_tar_zst_bundle_is_one_zstd_stream_of_the_same_tar(exported_index, tmp_path):
    """Read with zstandard and tarfile alone (not our reader): the members, in the tar.gz's order, each
    with the size and sha256 its bundle.json lists; the frame carries a content checksum."""
    import hashlib

    import zstandard

    bundle = export_index(exported_index.index, tmp_path / "team.tar.zst")
    with open(bundle, "rb") as file:
        assert zstandard.get_frame_parameters(file.read(18)).has_checksum
    with open(bundle, "rb") as file, zstandard.ZstdDecompressor().stream_reader(file) as stream:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            members = {member.name: archive.extractfile(member).read() for member in archive}
    description = json.loads(members[BUNDLE_NAME])
    assert description["archive_format"] == "tar.zst"
    with tarfile.open(exported_index.bundle) as archive:
        assert list(members) == archive.getnames()
    for entry in description["members"]:
        data = members[entry["path"]]
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])


def test_parquet_export_round_trips_vectors_ids_and_text(exported_index, tmp_path):
    path = export_index(exported_index.index, tmp_path / "index.parquet")
    ids, vectors, rows, manifest = read_parquet_export(path)
    stored_ids, stored = index_folder.load_vectors(exported_index.index, 1)
    order = np.argsort(stored_ids)
    np.testing.assert_array_equal(ids, stored_ids[order])
    np.testing.assert_array_equal(vectors, stored[order])
    assert vectors.dtype == np.float32 and vectors.shape == (24, 1024)
    by_id = {row["id"]: row for row in index_folder.read_all_rows(exported_index.index, 1)}
    assert rows == [by_id[i] for i in ids.tolist()]
    assert manifest == read_manifest(exported_index.index).to_dict()
    schema = pq.read_schema(path)
    assert str(schema.field("vector").type) == "fixed_size_list<element: float>[1024]"
    frame = pq.read_table(path).to_pandas()  # what a pandas / DuckDB user sees
    assert list(frame["id"]) == list(range(24)) and len(frame["vector"][0]) == 1024
    with pytest.raises(BundleError, match="Parquet export"):
        import_bundle(path, tmp_path / "imported")


def test_export_refuses_a_damaged_index_and_leaves_nothing(exported_index, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(exported_index.index, damaged)
    with open(damaged / FAISS_MEMBER, "r+b") as file:
        file.seek(200)
        byte = file.read(1)
        file.seek(200)
        file.write(bytes([byte[0] ^ 1]))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BundleError, match=f"refusing to export .*{FAISS_MEMBER}"):
        export_index(damaged, out / "bundle.zip")
    assert list(out.iterdir()) == []


def edited_copy(exported_index, tmp_path, change):
    """A copy of the index whose manifest.json ``change`` edited by hand (its files untouched)."""
    copy = tmp_path / "edited"
    shutil.copytree(exported_index.index, copy)
    value = json.loads((copy / "manifest.json").read_text())
    change(value)
    (copy / "manifest.json").write_text(json.dumps(sealed(value)))
    return copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v.update(row_count=25), "row_count 25 but vectors-g0001.faiss holds 24 rows"),
        (lambda v: v.update(row_count=0), "row_count 0 but vectors-g0001.faiss holds 24 rows"),
        (lambda v: v.update(rejected_count=3), "rejected_count 3 but rejected-g0001.jsonl holds 0 rows"),
        (lambda v: v.update(generation=2), "generation 2 but does not list its vectors-g0002.faiss"),
        (lambda v: v["files"].pop("rejected-g0001.jsonl"), "does not list its rejected-g0001.jsonl"),
    ],
)
def test_export_derives_counts_from_the_files_not_the_manifest(exported_index, tmp_path, change, message):
    """A manifest edited after the build (counts, generation, files list) is refused, not exported."""
    edited = edited_copy(exported_index, tmp_path, change)
    for name in ("bundle.tar.gz", "rows.parquet"):
        with pytest.raises(BundleError, match="refusing to export") as refused:
            export_index(edited, tmp_path / name)
        assert message in str(refused.value)
        assert not (tmp_path / name).exists()


# --------------------------------------------------------------------------- CLI


def test_cli_exports_and_imports_a_tar_zst_in_separate_processes(exported_index, tmp_path):
    """As a user runs it: `export --out x.tar.zst`, `import --check`, `import`, each its own process."""
    import subprocess
    import sys

    def cli(*arguments):
        command = [sys.executable, "-m", "rapidin_index.cli.main", *arguments]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout + done.stderr  # the console writes to stderr

    bundle = tmp_path / "team.tar.zst"
    exported = cli("export", "--index", str(exported_index.index), "--out", str(bundle))
    assert exported[0] == 0 and "(tar.zst," in exported[1], exported[1]
    checked = cli("import", str(bundle), "--check")
    assert checked[0] == 0 and "verifies: 24 rows" in checked[1], checked[1]
    imported = cli("import", str(bundle), "--index", str(tmp_path / "imported"))
    assert imported[0] == 0, imported[1]
    assert read_manifest(tmp_path / "imported").to_dict() == read_manifest(exported_index.index).to_dict()


def test_cli_export_check_import(exported_index, tmp_path):
    bundle = tmp_path / "team.zip"
    exported = runner.invoke(app, ["export", "--index", str(exported_index.index), "--out", str(bundle)])
    assert exported.exit_code == 0, exported.output
    assert "(zip," in exported.output and "sha256" in exported.output and bundle.exists()
    checked = runner.invoke(app, ["import", str(bundle), "--check"])
    assert checked.exit_code == 0 and "verifies: 24 rows" in checked.output, checked.output
    target = tmp_path / "imported"
    imported = runner.invoke(app, ["import", str(bundle), "--index", str(target)])
    assert imported.exit_code == 0 and "24 rows" in imported.output and "--model" in imported.output
    again = runner.invoke(app, ["import", str(bundle), "--index", str(target)])
    assert again.exit_code == 2 and "already holds an index" in again.output
    forced = runner.invoke(app, ["import", str(bundle), "--index", str(target), "--force"])
    assert forced.exit_code == 0, forced.output
    parquet = runner.invoke(
        app,
        ["export", "--index", str(exported_index.index), "--out", str(tmp_path / "x"), "--format", "parquet"],
    )
    assert parquet.exit_code == 0 and read_parquet_export(tmp_path / "x")[1].shape == (24, 1024)
