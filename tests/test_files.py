"""Durable files (files.py): atomic writes, checksums, and the "newer format version" refusal."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest

from rapidin_index.errors import ManifestError, StoreError
from rapidin_index.files import (
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    refuse_newer,
    sha256_file,
    sha256_path,
    sha256_tree,
    tree_bytes,
)

# --------------------------------------------------------------------------- atomic writes


def test_atomic_file_replaces_the_target_on_success(tmp_path):
    target = tmp_path / "sub" / "data.bin"  # the folder is made on demand
    with atomic_file(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.startswith(".data.bin.")
        temporary.write_bytes(b"first")
        assert not target.exists()  # nothing is visible until the block ends
    assert target.read_bytes() == b"first"
    with atomic_file(target) as temporary:
        temporary.write_bytes(b"second")
    assert target.read_bytes() == b"second"
    assert sorted(path.name for path in target.parent.iterdir()) == ["data.bin"]


def test_atomic_file_is_readable_by_everyone(tmp_path):
    target = tmp_path / "shared.bin"
    atomic_write_bytes(target, b"x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_failure_inside_the_block_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(target) as temporary:
            temporary.write_bytes(b"half of the new")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["data.bin"]


def test_two_open_writers_get_different_temporaries(tmp_path):
    target = tmp_path / "data.bin"
    with atomic_file(target) as first, atomic_file(target) as second:
        assert first != second
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the outer block ends last, so its bytes win
    assert [path.name for path in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_write_bytes_and_json(tmp_path):
    atomic_write_bytes(tmp_path / "raw.bin", b"\x00\x01\xff")
    assert (tmp_path / "raw.bin").read_bytes() == b"\x00\x01\xff"
    value = {"b": [1, 2], "a": "caf\u00e9"}
    atomic_write_json(tmp_path / "value.json", value)
    text = (tmp_path / "value.json").read_text(encoding="utf-8")
    assert json.loads(text) == value
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')  # sorted keys
    assert "caf\u00e9" in text  # written as UTF-8, not \u escapes


# --------------------------------------------------------------------------- checksums and sizes


def test_sha256_file_equals_hashlib(tmp_path):
    data = bytes(range(256)) * 9000  # > one read block (1 MiB), so blocks are joined
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def _tree(folder):
    (folder / "inner").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"alpha")
    (folder / "inner" / "b.txt").write_bytes(b"beta")
    return folder


def test_sha256_tree_changes_with_a_name_or_a_byte(tmp_path):
    tree = _tree(tmp_path / "tree")
    original = sha256_tree(tree)
    assert sha256_tree(_tree(tmp_path / "copy")) == original  # the folder's own name does not count
    (tree / "inner" / "b.txt").write_bytes(b"betA")
    assert sha256_tree(tree) != original
    (tree / "inner" / "b.txt").write_bytes(b"beta")
    assert sha256_tree(tree) == original
    (tree / "inner" / "b.txt").rename(tree / "inner" / "c.txt")
    assert sha256_tree(tree) != original


def test_sha256_tree_is_relative_path_and_content(tmp_path):
    tree = _tree(tmp_path / "tree")
    lines = [
        f"a.txt\n{hashlib.sha256(b'alpha').hexdigest()}\n",
        f"inner/b.txt\n{hashlib.sha256(b'beta').hexdigest()}\n",
    ]
    assert sha256_tree(tree) == hashlib.sha256("".join(lines).encode()).hexdigest()


def test_sha256_path_picks_file_or_tree(tmp_path):
    tree = _tree(tmp_path / "tree")
    assert sha256_path(tree) == sha256_tree(tree)
    assert sha256_path(tree / "a.txt") == sha256_file(tree / "a.txt")


def test_tree_bytes_of_a_folder_and_a_file(tmp_path):
    tree = _tree(tmp_path / "tree")
    assert tree_bytes(tree) == len(b"alpha") + len(b"beta")
    assert tree_bytes(tree / "a.txt") == len(b"alpha")


# --------------------------------------------------------------------------- newer versions


@pytest.mark.parametrize("error", [ManifestError, StoreError])
def test_refuse_newer_raises_the_given_error_naming_both_versions(error):
    with pytest.raises(error) as raised:
        refuse_newer(3, 1, "bundle", error)
    message = str(raised.value)
    assert "bundle format version 3" in message and "(1)" in message and "upgrade" in message


def test_refuse_newer_lets_equal_and_older_versions_pass():
    assert refuse_newer(1, 1, "index", ManifestError) is None
    assert refuse_newer(0, 1, "index", ManifestError) is None
