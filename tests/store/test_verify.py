"""store/verify.py: the fast checksums of an index's files, and the stamps that spare an unchanged file its
re-hash; every check compared with hashlib / xxhash computed here, never with the module's own digests."""

import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import xxhash

from rapidin_index.errors import IntegrityError
from rapidin_index.files import sha256_path
from rapidin_index.store import verify


@pytest.fixture
def folder(tmp_path):
    """An index-like folder: one file and one folder (as a LanceDB table is), and its manifest's files."""
    index = tmp_path / "index"
    (index / "metadata" / "rows_g0001.lance" / "data").mkdir(parents=True)
    (index / "vectors-g0001.faiss").write_bytes(os.urandom(300_000))
    (index / "metadata" / "rows_g0001.lance" / "data" / "a.lance").write_bytes(os.urandom(5000))
    (index / "metadata" / "rows_g0001.lance" / "_latest.manifest").write_bytes(b"version 1")
    (index / "rejected-g0001.jsonl").write_bytes(b"")
    names = ("vectors-g0001.faiss", "metadata/rows_g0001.lance", "rejected-g0001.jsonl")
    files = {name: verify.file_entry(index / name) for name in names}
    return SimpleNamespace(path=index, manifest=SimpleNamespace(files=files, generation=1))


def test_entries_hold_the_sha256_the_xxh3_and_the_size(folder):
    data = (folder.path / "vectors-g0001.faiss").read_bytes()
    entry = folder.manifest.files["vectors-g0001.faiss"]
    assert entry == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "xxh3_128": xxhash.xxh3_128(data).hexdigest(),
        "bytes": len(data),
    }
    tree = folder.manifest.files["metadata/rows_g0001.lance"]
    assert tree["sha256"] == sha256_path(
        folder.path / "metadata/rows_g0001.lance"
    )  # the format of old manifests
    assert tree["bytes"] == 5000 + len(b"version 1")


def test_an_unchanged_file_is_hashed_once_then_only_stated(folder, monkeypatch):
    verify.check_files(folder.path, folder.manifest)
    stamps = json.loads((folder.path / verify.STAMP_NAME).read_text())
    assert set(stamps["files"]) == set(folder.manifest.files)

    def no_hashing(*args):
        raise AssertionError("hashed a file whose stamp fits")

    monkeypatch.setattr(verify, "checksum", no_hashing)
    verify.check_files(folder.path, folder.manifest)
    with pytest.raises(AssertionError, match="hashed"):
        verify.check_files(folder.path, folder.manifest, full=True)  # append and merge: always


def flip(path, offset=1000):
    """Flip one byte in place, then put the size and mtime back as they were (only ctime moves)."""
    before = path.stat()
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x40]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("name", ["vectors-g0001.faiss", "metadata/rows_g0001.lance/data/a.lance"])
def test_a_flipped_byte_is_refused_even_with_size_and_mtime_put_back(folder, name):
    verify.check_files(folder.path, folder.manifest)  # stamps written
    flip(folder.path / name)
    with pytest.raises(
        IntegrityError,
        match=r"does not match its checksum.*re-import its bundle \(import --force\) or rebuild",
    ):
        verify.check_files(folder.path, folder.manifest)


def test_a_file_added_to_a_listed_folder_or_a_missing_file_is_refused(folder):
    verify.check_files(folder.path, folder.manifest)
    (folder.path / "metadata/rows_g0001.lance/data/b.lance").write_bytes(b"more")
    with pytest.raises(IntegrityError, match="rows_g0001.lance does not match"):
        verify.check_files(folder.path, folder.manifest)
    (folder.path / "metadata/rows_g0001.lance/data/b.lance").unlink()
    (folder.path / "vectors-g0001.faiss").unlink()
    with pytest.raises(IntegrityError, match="vectors-g0001.faiss is missing"):
        verify.check_files(folder.path, folder.manifest)


def test_a_damaged_or_foreign_stamp_file_is_never_trusted(folder):
    verify.check_files(folder.path, folder.manifest)
    stamp_file = folder.path / verify.STAMP_NAME
    good = json.loads(stamp_file.read_text())
    flip(folder.path / "vectors-g0001.faiss")
    # a stamp whose stat is refreshed to the damaged file's, but written for another folder: ignored
    forged = json.loads(json.dumps(good))
    forged["files"]["vectors-g0001.faiss"]["stat"] = verify.stat_key(folder.path / "vectors-g0001.faiss")
    forged["index"] = "/somewhere/else"
    stamp_file.write_text(json.dumps(forged))
    with pytest.raises(IntegrityError, match="vectors-g0001.faiss does not match"):
        verify.check_files(folder.path, folder.manifest)
    for damaged in (b"\xff\xfe not json", b"[]", b'{"version": 1, "files": 3}'):
        stamp_file.write_bytes(damaged)
        with pytest.raises(IntegrityError, match="vectors-g0001.faiss does not match"):
            verify.check_files(folder.path, folder.manifest)


def test_a_stamp_counts_only_for_the_digest_it_was_written_for(folder):
    verify.check_files(folder.path, folder.manifest)
    folder.manifest.files["vectors-g0001.faiss"]["xxh3_128"] = "0" * 32  # a new manifest, same file
    with pytest.raises(IntegrityError, match="vectors-g0001.faiss does not match"):
        verify.check_files(folder.path, folder.manifest)


def test_an_old_manifest_without_xxh3_is_checked_by_sha256(folder):
    for entry in folder.manifest.files.values():
        del entry["xxh3_128"]
    verify.check_files(folder.path, folder.manifest)
    flip(folder.path / "vectors-g0001.faiss")
    with pytest.raises(IntegrityError, match="vectors-g0001.faiss does not match"):
        verify.check_files(folder.path, folder.manifest)


def test_a_read_only_index_keeps_its_stamps_in_the_cache(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(verify.os, "access", lambda path, mode: False)
    verify.check_files(folder.path, folder.manifest)
    assert not (folder.path / verify.STAMP_NAME).exists()
    (cached,) = (tmp_path / "cache" / "rapidin-index" / "verified").iterdir()
    assert set(json.loads(cached.read_text())["files"]) == set(folder.manifest.files)


def test_no_files_listed_is_refused(folder):
    with pytest.raises(IntegrityError, match="lists no files"):
        verify.check_files(folder.path, SimpleNamespace(files={}, generation=1))


def test_a_generation_whose_files_are_not_listed_is_refused(folder):
    folder.manifest.generation = 2
    with pytest.raises(IntegrityError, match="generation 2 but does not list its vectors-g0002.faiss"):
        verify.check_files(folder.path, folder.manifest)


def test_a_build_stamps_what_it_wrote_so_the_first_open_hashes_nothing(
    tmp_path, tiny_model_dirs, training_file, monkeypatch
):
    from conftest import build_settings

    from rapidin_index.build import build_index
    from rapidin_index.store.manifest import read_manifest

    index_dir = tmp_path / "index"
    build_index(
        training_file, index_dir, build_settings(tiny_model_dirs["llama"], sketch_dim=256), progress=False
    )
    manifest = read_manifest(index_dir)
    stamps = verify.read_stamps(index_dir)
    assert set(stamps) == set(manifest.files)  # every listed file, each with the digest the manifest holds
    assert all(stamps[name]["digest"] == manifest.files[name][verify.FAST] for name in stamps)

    def hashed(*_):
        raise AssertionError("the first open hashed a file the build had stamped")

    monkeypatch.setattr(verify, "checksum", hashed)
    verify.check_files(index_dir, manifest)  # only stat'ed
    monkeypatch.undo()
    vectors = next(index_dir / name for name in manifest.files if name.startswith("vectors-"))
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF  # a changed file no longer fits its stamp: hashed, and refused
    vectors.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        verify.check_files(index_dir, manifest)
