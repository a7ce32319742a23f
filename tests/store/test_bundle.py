"""The bundle format: the archive kind from a name, the version check, bundle.json's own checksum."""

from __future__ import annotations

import hashlib
import json

import pytest

from rapidin_index.errors import BundleError
from rapidin_index.store.bundle import (
    BUNDLE_FORMAT_VERSION,
    check_version,
    describe,
    format_for,
    manifest_facts,
    self_checksum,
)
from rapidin_index.store.manifest import read_manifest


@pytest.mark.parametrize(
    "name,expected",
    [
        ("team.tar.gz", "tar.gz"),
        ("TEAM.TGZ", "tar.gz"),
        ("a.tar", "tar"),
        ("team.tar.zst", "tar.zst"),
        ("TEAM.TZST", "tar.zst"),
        ("a.zip", "zip"),
        ("rows.parquet", "parquet"),
        ("no-extension", "tar.gz"),
    ],
)
def test_the_format_follows_the_extension(name, expected):
    assert format_for(name) == expected


def test_an_asked_format_wins_and_an_unknown_one_is_refused_by_name():
    assert format_for("bundle.zip", "tar") == "tar"
    with pytest.raises(BundleError, match="--format 'rar' is not one of tar, tar.gz, tar.zst, zip, parquet"):
        format_for("bundle.rar", "rar")


def test_a_newer_bundle_is_refused_and_this_version_passes():
    check_version(BUNDLE_FORMAT_VERSION)
    check_version(0)
    with pytest.raises(BundleError, match=f"version {BUNDLE_FORMAT_VERSION + 1} is newer"):
        check_version(BUNDLE_FORMAT_VERSION + 1)


def test_bundle_json_checks_itself_and_any_edit_breaks_it(exported_index):
    manifest = read_manifest(exported_index.index)
    entries = [{"path": "manifest.json", "sha256": "ab" * 32, "bytes": 10}]
    description = describe(manifest, entries, "tar.gz")
    body = {key: value for key, value in description.items() if key != "bundle_sha256"}
    expected = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert description["bundle_sha256"] == expected == self_checksum(description)
    assert description["manifest_sha256"] == "ab" * 32 and description["members"] == entries
    assert description["index"] == manifest_facts(manifest)
    edited = {**description, "index": {**description["index"], "row_count": 1}}
    assert self_checksum(edited) != description["bundle_sha256"]


@pytest.mark.parametrize("name", ["bundle.rar", "team.7z", "index.tar.bz2", "rows.csv"])
def test_an_unknown_extension_is_refused_unless_a_format_is_given(name):
    with pytest.raises(
        BundleError,
        match=r"unknown extension .*use \.tar, \.tar\.gz \(\.tgz\), \.tar\.zst \(\.tzst\), \.zip or \.parquet",
    ):
        format_for(name)
    assert format_for(name, "zip") == "zip"
