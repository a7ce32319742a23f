"""The index manifest (store/manifest.py): format version, round trips, shape checks, file checks."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import small_manifest

from rapidin_index.errors import IntegrityError, ManifestError
from rapidin_index.store.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    read_manifest,
    verify_files,
    write_manifest,
)

# --------------------------------------------------------------------------- from and to dicts


def test_to_dict_and_from_dict_round_trip_ignoring_unknown_keys():
    manifest = small_manifest(row_count=3, sources=[{"path": "a", "sha256": "x", "id_offset": 0, "rows": 5}])
    value = json.loads(json.dumps(manifest.to_dict()))
    assert value["format_version"] == FORMAT_VERSION and value["software"]["name"] == "rapidin-index"
    assert Manifest.from_dict(value) == manifest
    assert Manifest.from_dict({**value, "written_by_a_later_minor_version": 1}) == manifest


def test_a_manifest_from_before_a_field_takes_its_default():
    value = small_manifest().to_dict()
    del value["tokenization"]
    assert Manifest.from_dict(value).tokenization == "separate"


@pytest.mark.parametrize("version", [None, "1", 1.0])
def test_from_dict_refuses_a_missing_or_non_integer_format_version(version):
    value = small_manifest().to_dict()
    value["format_version"] = version
    with pytest.raises(ManifestError, match="no integer format_version"):
        Manifest.from_dict(value)


def test_from_dict_refuses_a_newer_format_version():
    value = {**small_manifest().to_dict(), "format_version": FORMAT_VERSION + 1}
    with pytest.raises(ManifestError, match=f"version {FORMAT_VERSION + 1} is newer .*upgrade"):
        Manifest.from_dict(value)


def test_total_rows_seen_counts_every_source():
    sources = [{"path": p, "sha256": "x", "id_offset": 0, "rows": n} for p, n in (("a", 5), ("b", 7))]
    assert small_manifest(sources=sources).total_rows_seen == 12
    assert small_manifest().total_rows_seen == 0


# --------------------------------------------------------------------------- on disk


def test_write_then_read_manifest(tmp_path):
    manifest = small_manifest(created_at="2020-01-01T00:00:00+00:00", updated_at="2020-01-01T00:00:00+00:00")
    write_manifest(tmp_path, manifest)
    read = read_manifest(tmp_path)
    assert read == manifest
    assert read.updated_at != "2020-01-01T00:00:00+00:00"  # stamped at the write
    assert read.created_at == "2020-01-01T00:00:00+00:00"


def test_read_manifest_refuses_a_missing_or_damaged_one(tmp_path):
    with pytest.raises(ManifestError, match="holds no finished index .*rapidin-index build"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        read_manifest(tmp_path)


# --------------------------------------------------------------------------- verify files


def _with_files(index_dir) -> Manifest:
    (index_dir / "vectors-g0001.faiss").write_bytes(b"vectors")
    table = index_dir / "metadata" / "rows_g0001.lance"
    table.mkdir(parents=True)
    (table / "data.lance").write_bytes(b"rows")
    entry = f"data.lance\n{hashlib.sha256(b'rows').hexdigest()}\n"
    files = {
        "vectors-g0001.faiss": {"sha256": hashlib.sha256(b"vectors").hexdigest(), "bytes": 7},
        "metadata/rows_g0001.lance": {"sha256": hashlib.sha256(entry.encode()).hexdigest(), "bytes": 4},
    }
    return small_manifest(files=files)


def test_verify_files_accepts_the_files_it_lists(tmp_path):
    assert verify_files(tmp_path, _with_files(tmp_path)) is None


def test_verify_files_names_a_changed_file(tmp_path):
    manifest = _with_files(tmp_path)
    (tmp_path / "metadata" / "rows_g0001.lance" / "data.lance").write_bytes(b"ROWS")
    with pytest.raises(IntegrityError, match="metadata/rows_g0001.lance does not match its checksum"):
        verify_files(tmp_path, manifest)


def test_verify_files_names_a_missing_file(tmp_path):
    manifest = _with_files(tmp_path)
    (tmp_path / "vectors-g0001.faiss").unlink()
    with pytest.raises(IntegrityError, match="vectors-g0001.faiss is missing"):
        verify_files(tmp_path, manifest)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda v: v.update(sketch=None), "manifest field 'sketch' must be dict, found NoneType null"),
        (lambda v: v.pop("files"), "manifest field 'files' must be dict, found missing"),
        (lambda v: v.update(row_count="24"), "manifest field 'row_count' must be int"),
        (lambda v: v.update(row_count=True), "manifest field 'row_count' must be int"),
        (lambda v: v["sketch"].pop("output_dim"), "manifest field sketch.output_dim is missing"),
        (lambda v: v.update(row_count=-1), "manifest row_count is -1"),
        (lambda v: v.update(generation=-2), "manifest generation is -2"),
        (lambda v: v["sketch"].update(seed="42"), "manifest field sketch.seed is missing or not int"),
        (lambda v: v["sketch"].pop("shuffle_lambda"), "manifest field sketch.shuffle_lambda is missing"),
        (lambda v: v["model"].update(dtype=None), "manifest field model.dtype is missing or not str"),
        (lambda v: v.update(adapter="lora"), "manifest field 'adapter' must be dict or null, found str"),
        (lambda v: v.update(max_length=1.5), "manifest field 'max_length' must be int or null, found float"),
        (lambda v: v.update(sources={}), "manifest field 'sources' must be list, found dict"),
        (
            lambda v: v.update(sources=[{"rows": "5"}]),
            "manifest sources must be objects with an integer 'rows'",
        ),
        (
            lambda v: v.update(rejected_count=None),
            "manifest field 'rejected_count' must be int, found NoneType",
        ),
        (lambda v: v.update(files={"a.faiss": {"bytes": 1}}), "manifest files entry 'a.faiss' is malformed"),
        (lambda v: v.update(files={"../a": {"sha256": "x", "bytes": 1}}), "manifest files entry '../a'"),
        (lambda v: v.update(files={"/etc/a": {"sha256": "x", "bytes": 1}}), "files entry '/etc/a'"),
        (lambda v: v.update(files={"a": {"sha256": "x", "bytes": -1}}), "files entry 'a' is malformed"),
        (lambda v: v.update(files={"a": "x"}), "files entry 'a' is malformed"),
    ],
)
def test_a_damaged_manifest_is_refused_naming_the_field(tmp_path, edit, message):
    value = small_manifest().to_dict()
    edit(value)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(value))
    with pytest.raises(ManifestError, match="re-import its bundle or rebuild") as refused:
        read_manifest(tmp_path)
    assert message in str(refused.value)


def test_a_manifest_that_is_not_utf8_or_lists_no_files_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_bytes(json.dumps(small_manifest().to_dict()).encode()[:-2] + b"\xff}")
    with pytest.raises(ManifestError, match="is not UTF-8 text"):
        read_manifest(tmp_path)
    with pytest.raises(IntegrityError, match="lists no files to verify"):
        verify_files(tmp_path, small_manifest())


def test_a_manifest_checks_its_own_checksum(tmp_path):
    """A flipped byte that keeps the JSON valid (seed 42 -> 43) would change every answer: refused.
    A manifest from before the checksum has none and is read as it is."""
    manifest = small_manifest(files={"vectors-g0001.faiss": {"sha256": "x", "bytes": 1}})
    write_manifest(tmp_path, manifest)
    text = (tmp_path / MANIFEST_NAME).read_text()
    assert '"self_sha256"' in text and read_manifest(tmp_path).sketch["seed"] == 42
    (tmp_path / MANIFEST_NAME).write_text(text.replace('"seed": 42', '"seed": 43'))
    with pytest.raises(ManifestError, match="does not match its own checksum.*re-import its bundle"):
        read_manifest(tmp_path)
    old = json.loads(text.replace('"seed": 42', '"seed": 43'))
    del old["self_sha256"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(old))
    assert read_manifest(tmp_path).sketch["seed"] == 43
