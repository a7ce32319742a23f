"""Bundles: export -> import -> the same query results; every corruption refused, naming the bad member."""

import hashlib
import io
import json
import shutil
import tarfile
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from rapidin_index.cli.main import app
from typer.testing import CliRunner

from rapidin_index import store
from rapidin_index.build import build_index
from rapidin_index.settings import BuildSettings
from rapidin_index.bundle import BUNDLE_NAME, manifest_facts
from rapidin_index.bundle_import import import_bundle, verify_bundle
from rapidin_index.errors import BundleError, IndexMismatchError
from rapidin_index.export import export_index, read_parquet_export
from rapidin_index.files import sha256_tree
from rapidin_index.manifest import Manifest, read_manifest
from rapidin_index.settings import ModelSettings
from rapidin_index.retrieval import Index
from rapidin_index.sketch import SketchSettings

runner = CliRunner()
FAISS_MEMBER = "vectors-g0001.faiss"


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dirs, training_file):
    """A tiny index built from a model that then moved: the receiving team has it somewhere else."""
    root = tmp_path_factory.mktemp("export")
    model_at_build = root / "model-at-build"
    shutil.copytree(tiny_model_dirs["llama"], model_at_build)
    index_dir = root / "index"
    settings = BuildSettings(ModelSettings(str(model_at_build)), SketchSettings(1024, 20, 42), device="cpu")
    build_index(training_file, index_dir, settings, progress=False)
    moved = root / "model-moved"
    model_at_build.rename(moved)
    bundle = export_index(index_dir, root / "bundle.tar.gz")
    return SimpleNamespace(index=index_dir, model=str(moved), bundle=bundle)


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
def original(source, training_rows):
    return query_summary(source.index, source.model, training_rows[5])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["bundle.tar.gz", "bundle.zip", "bundle.tar"])
def test_imported_bundle_answers_like_the_original(source, original, training_rows, tmp_path, name):
    bundle = export_index(source.index, tmp_path / name)
    target = tmp_path / "imported"
    manifest = import_bundle(bundle, target)
    assert manifest.to_dict() == read_manifest(source.index).to_dict()
    assert not (target / BUNDLE_NAME).exists()
    summary = query_summary(target, source.model, training_rows[5])
    assert summary == original
    assert len(summary[0]) == 5 and len(summary[2]) > 3


def test_bundle_describes_itself_in_a_fixed_member_order(source):
    with tarfile.open(source.bundle) as archive:
        names = archive.getnames()
        description = json.load(archive.extractfile(BUNDLE_NAME))
    assert names[:2] == [BUNDLE_NAME, "manifest.json"] and names[2:] == sorted(names[2:])
    assert FAISS_MEMBER in names and any(n.startswith("metadata/rows_g0001.lance/data/") for n in names)
    assert [entry["path"] for entry in description["members"]] == names[1:]
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] >= 0 for entry in description["members"])
    manifest = read_manifest(source.index)
    assert description["bundle_format_version"] == 1 and description["archive_format"] == "tar.gz"
    assert description["software"]["name"] == "rapidin-index" and description["exported_at"]
    facts = description["index"]
    assert facts == json.loads(json.dumps(manifest_facts(manifest)))
    assert facts["model"]["fingerprint"] == manifest.model["fingerprint"] and facts["row_count"] == 24
    assert facts["sketch"]["sketch_dim"] == 1024 and facts["created_at"] == manifest.created_at
    assert verify_bundle(source.bundle) == description


def test_parquet_export_round_trips_vectors_ids_and_text(source, tmp_path):
    path = export_index(source.index, tmp_path / "index.parquet")
    ids, vectors, rows, manifest = read_parquet_export(path)
    stored_ids, stored = store.load_vectors(source.index, 1)
    order = np.argsort(stored_ids)
    np.testing.assert_array_equal(ids, stored_ids[order])
    np.testing.assert_array_equal(vectors, stored[order])
    assert vectors.dtype == np.float32 and vectors.shape == (24, 1024)
    by_id = {row["id"]: row for row in store.read_rows(source.index, 1)}
    assert rows == [by_id[i] for i in ids.tolist()]
    assert manifest == read_manifest(source.index).to_dict()
    schema = pq.read_schema(path)
    assert str(schema.field("vector").type) == "fixed_size_list<element: float>[1024]"
    frame = pq.read_table(path).to_pandas()  # what a pandas / DuckDB user sees
    assert list(frame["id"]) == list(range(24)) and len(frame["vector"][0]) == 1024
    with pytest.raises(BundleError, match="Parquet export"):
        import_bundle(path, tmp_path / "imported")


def test_export_refuses_a_damaged_index_and_leaves_nothing(source, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(source.index, damaged)
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


def test_forged_but_consistent_bundle_imports_then_the_model_check_refuses(source, tmp_path):
    """Recomputing every checksum is not detectable without a trusted signature; the fingerprint still is."""

    def forge(members):
        return edit_manifest(members, lambda m: m["model"].update(fingerprint="0" * 64), facts=True)

    bundle = rewrite(source.bundle, tmp_path / "forged.tar.gz", forge)
    import_bundle(bundle, tmp_path / "imported")
    with pytest.raises(IndexMismatchError, match="model weights differ"):
        Index.open(tmp_path / "imported", model=source.model, device="cpu")


# --------------------------------------------------------------------------- tampering helpers


def read_members(path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as archive:
        return [(m, archive.extractfile(m).read() if m.isfile() else b"") for m in archive.getmembers()]


def rewrite(source, out, edit, mode="w:gz"):
    members = edit(read_members(source))
    with tarfile.open(out, mode) as archive:
        for info, data in members:
            if info.isfile():
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out


def payloads(members) -> dict[str, bytes]:
    return {info.name: data for info, data in members}


def replace(members, name, data):
    return [(info, data if info.name == name else old) for info, old in members]


def reseal(members, /, facts=False, **changes):
    """Recompute bundle.json's member list and checksums (and, with ``facts``, the manifest's key facts)."""
    by_name = payloads(members)
    description = json.loads(by_name[BUNDLE_NAME])
    description["members"] = [
        {"path": info.name, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        for info, payload in members
        if info.isfile() and info.name != BUNDLE_NAME
    ]
    description["manifest_sha256"] = hashlib.sha256(by_name["manifest.json"]).hexdigest()
    if facts:
        manifest = Manifest.from_dict(json.loads(by_name["manifest.json"]))
        description["index"] = json.loads(json.dumps(manifest_facts(manifest)))
    description.update(changes)
    body = {key: value for key, value in description.items() if key != "bundle_sha256"}
    description["bundle_sha256"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()
    return replace(members, BUNDLE_NAME, json.dumps(description).encode())


def edit_manifest(members, change, seal=True, facts=False):
    manifest = json.loads(payloads(members)["manifest.json"])
    change(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"  # as the build writes it
    edited = replace(members, "manifest.json", text.encode())
    return reseal(edited, facts=facts) if seal else edited


def flipped(members, name, offset=100):
    data = bytearray(payloads(members)[name])
    data[offset] ^= 0x01
    return replace(members, name, bytes(data))


def extra(name, kind=tarfile.REGTYPE, data=b"hello", linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, data if kind == tarfile.REGTYPE else b""


def without(members, name):
    return [(info, data) for info, data in members if info.name != name]


def wrong_size(members):
    entries = json.loads(payloads(reseal(members))[BUNDLE_NAME])["members"]
    for entry in entries:
        if entry["path"] == FAISS_MEMBER:
            entry["bytes"] += 1
    return reseal(members, members=entries)


def edited_bundle_json(members):
    text = payloads(members)[BUNDLE_NAME].replace(b'"bytes": 0', b'"bytes": 1')
    return replace(members, BUNDLE_NAME, text)


def unsafe_case(name, kind=tarfile.REGTYPE, linkname=""):
    return lambda m: reseal([*m, extra(name, kind, linkname=linkname)])


def untouched_after_refusal(tmp_path, bundle, message_parts):
    target = tmp_path / "imported"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(BundleError) as refused:
        import_bundle(bundle, target)
    for part in message_parts:
        assert part in str(refused.value), str(refused.value)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folder left behind
    return str(refused.value)


# --------------------------------------------------------------------------- refusals


CASES = {
    "flipped byte in the FAISS member": (
        lambda m: flipped(m, FAISS_MEMBER),
        [FAISS_MEMBER, "does not match its checksum in bundle.json"],
    ),
    "missing member": (lambda m: without(m, "rejected-g0001.jsonl"), ["rejected-g0001.jsonl", "missing"]),
    "missing lance file": (
        lambda m: without(m, "metadata/rows_g0001.lance/_versions/latest_version_hint.json"),
        ["latest_version_hint.json", "missing"],
    ),
    "edited manifest": (
        lambda m: edit_manifest(m, lambda v: v.update(row_count=25), seal=False),
        ["'manifest.json'", "does not match its checksum in bundle.json"],
    ),
    "edited manifest, member checksums resealed": (
        lambda m: edit_manifest(m, lambda v: v["model"].update(fingerprint="0" * 64)),
        ["manifest.json disagrees with bundle.json on model.fingerprint"],
    ),
    "edited manifest, member entry resealed but not manifest_sha256": (
        lambda m: reseal(edit_manifest(m, lambda v: v.update(row_count=25), seal=False), manifest_sha256="0"),
        ["manifest.json does not match manifest_sha256"],
    ),
    "replaced FAISS file, bundle.json resealed": (
        lambda m: reseal(flipped(m, FAISS_MEMBER)),
        [FAISS_MEMBER, "does not match its checksum in the manifest"],
    ),
    "manifest names a file outside the folder": (
        lambda m: edit_manifest(m, lambda v: v["files"].update({"../outside": {"sha256": "0", "bytes": 1}})),
        ["'../outside'"],
    ),
    "unexpected member listed in bundle.json": (
        lambda m: reseal([*m, extra("notes.txt")]),
        ["'notes.txt'", "not a file of the index"],
    ),
    "unexpected member not listed": (lambda m: [*m, extra("notes.txt")], ["'notes.txt'", "not listed"]),
    "wrong size in bundle.json": (wrong_size, [f"'{FAISS_MEMBER}' is 98,586 bytes, bundle.json says 98,587"]),
    "malformed member list": (lambda m: reseal(m, members=None), [BUNDLE_NAME, "malformed"]),
    "duplicate member": (lambda m: [*m, m[1]], ["'manifest.json' appears twice"]),
    "bundle.json not first": (lambda m: [*m[1:], m[0]], ["first member is 'manifest.json'"]),
    "bundle.json edited": (edited_bundle_json, ["bundle.json does not match its own checksum"]),
    "parent path": (unsafe_case("../evil.txt"), ["'../evil.txt'", "unsafe path"]),
    "absolute path": (unsafe_case("/tmp/evil.txt"), ["'/tmp/evil.txt'", "unsafe path"]),
    "nested parent path": (unsafe_case("metadata/../../evil.txt"), ["unsafe path"]),
    "backslash path": (unsafe_case("..\\evil.txt"), ["unsafe path"]),
    "symlink": (unsafe_case("link", tarfile.SYMTYPE, "/etc/passwd"), ["'link' is a symlink"]),
    "hard link": (unsafe_case("hard", tarfile.LNKTYPE, "manifest.json"), ["'hard' is a hard link"]),
    "device": (unsafe_case("dev", tarfile.CHRTYPE), ["'dev' is a device"]),
    "fifo": (unsafe_case("pipe", tarfile.FIFOTYPE), ["'pipe' is a fifo"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tampered_bundles_are_refused_naming_the_member(source, tmp_path, case):
    edit, message_parts = CASES[case]
    bundle = rewrite(source.bundle, tmp_path / "tampered.tar.gz", edit)
    untouched_after_refusal(tmp_path, bundle, message_parts)


def test_newer_bundle_format_is_refused(source, tmp_path):
    bundle = rewrite(source.bundle, tmp_path / "future.tar.gz", lambda m: reseal(m, bundle_format_version=2))
    message = untouched_after_refusal(tmp_path, bundle, [])
    assert message == (
        "bundle format version 2 is newer than this rapidin-index understands (1); upgrade rapidin-index to open it"
    )


def test_truncated_archives_are_refused(source, tmp_path):
    data = source.bundle.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    untouched_after_refusal(tmp_path, cut, ["truncated or corrupted", f"member '{FAISS_MEMBER}'"])
    cut.unlink()
    zipped = export_index(source.index, tmp_path / "whole.zip")
    (tmp_path / "cut.zip").write_bytes(zipped.read_bytes()[:-100])
    zipped.unlink()
    untouched_after_refusal(tmp_path, tmp_path / "cut.zip", ["truncated or corrupted"])


def test_bit_rot_in_a_plain_tar_or_zip_names_the_member(source, tmp_path):
    for name in ("rot.tar", "rot.zip"):
        bundle = export_index(source.index, tmp_path / name)
        data = bytearray(bundle.read_bytes())
        if name.endswith(".tar"):
            with tarfile.open(bundle) as archive:
                offset = archive.getmember(FAISS_MEMBER).offset_data + 5000
        else:
            offset = data.index(b"vectors-g0001.faiss") + 5000  # inside its compressed data
        data[offset] ^= 0x10
        bundle.write_bytes(bytes(data))
        untouched_after_refusal(tmp_path, bundle, [FAISS_MEMBER])
        bundle.unlink()


def test_a_bundle_larger_than_the_free_space_is_refused(source, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "rapidin_index.bundle_import.shutil.disk_usage", lambda path: SimpleNamespace(free=1000)
    )
    untouched_after_refusal(tmp_path, source.bundle, ["unpacks to", "only 1,000 are free"])


def test_an_existing_index_is_kept_unless_forced_and_the_bundle_verifies(source, tmp_path):
    target = tmp_path / "target"
    import_bundle(source.bundle, target)
    before = sha256_tree(target)
    with pytest.raises(BundleError, match="already holds an index.*--force"):
        import_bundle(source.bundle, target)
    bad = rewrite(source.bundle, tmp_path / "bad.tar.gz", lambda m: flipped(m, FAISS_MEMBER))
    with pytest.raises(BundleError, match=FAISS_MEMBER):
        import_bundle(bad, target, force=True)
    assert sha256_tree(target) == before
    assert import_bundle(source.bundle, target, force=True).row_count == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "target"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="holds no index"):
        import_bundle(source.bundle, tmp_path / "other", force=True)
    (tmp_path / "empty").mkdir()
    assert import_bundle(source.bundle, tmp_path / "empty").row_count == 24


# --------------------------------------------------------------------------- CLI


def test_cli_export_check_import(source, tmp_path):
    bundle = tmp_path / "team.zip"
    exported = runner.invoke(app, ["export", "--index", str(source.index), "--out", str(bundle)])
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
        app, ["export", "--index", str(source.index), "--out", str(tmp_path / "x"), "--format", "parquet"]
    )
    assert parquet.exit_code == 0 and read_parquet_export(tmp_path / "x")[1].shape == (24, 1024)


def test_cli_errors_exit_2_with_the_reason(source, tmp_path):
    bad = rewrite(source.bundle, tmp_path / "bad.tar.gz", lambda m: flipped(m, FAISS_MEMBER))
    refused = runner.invoke(app, ["import", str(bad), "--index", str(tmp_path / "i")])
    assert refused.exit_code == 2 and FAISS_MEMBER in refused.output and not (tmp_path / "i").exists()
    neither = runner.invoke(app, ["import", str(bad)])
    assert neither.exit_code == 2 and "--check" in neither.output
    wrong_format = runner.invoke(
        app, ["export", "--index", str(source.index), "--out", str(tmp_path / "b"), "--format", "rar"]
    )
    assert wrong_format.exit_code == 2 and "'rar' is not one of" in wrong_format.output
    not_an_index = runner.invoke(app, ["export", "--index", str(tmp_path), "--out", str(tmp_path / "b.tar")])
    assert not_an_index.exit_code == 2 and "no finished index" in not_an_index.output
    missing = runner.invoke(app, ["import", str(tmp_path / "nope.tar.gz"), "--check"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
