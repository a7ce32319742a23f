"""The bundle format, shared by `export` (writes bundles) and `bundle_import` (verifies and imports them).

Bundle layout (members at the archive root, in this order; regular files only)::

    bundle.json                 bundle format version, software, export date, the manifest's key facts,
                                manifest_sha256, {path, sha256, bytes} of every other member, an
                                optional ed25519 signature (export --sign; `bundle_check`), and its
                                own checksum (bundle_sha256, over its JSON without that key)
    manifest.json               the index's manifest, unchanged
    metadata/rows_gNNNN.lance/  every file of the LanceDB table, sorted
    rejected-gNNNN.jsonl
    vectors-gNNNN.faiss

The Parquet export (for analysis, not for import) keeps the manifest and bundle header in its schema
metadata under the ``PARQUET_*_KEY`` keys.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import zipfile
import zlib
from pathlib import Path

import zstandard

from rapidin_index.errors import BundleError
from rapidin_index.files import refuse_newer
from rapidin_index.store.manifest import SOFTWARE_NAME, Manifest, software_version, utc_now

BUNDLE_FORMAT_VERSION = 1
BUNDLE_NAME = "bundle.json"
FORMATS = ("tar", "tar.gz", "tar.zst", "zip", "parquet")
PARQUET_MANIFEST_KEY = b"rapidin_index.store.manifest"
PARQUET_BUNDLE_KEY = b"rapidin_index.store.bundle"
PARQUET_REJECTED_KEY = b"rapidin_index.rejected"
MAX_BUNDLE_JSON_BYTES = 64 << 20
BLOCK = 1 << 20
GZIP_LEVEL = 9
"""tarfile's default. The vectors hardly compress, and levels 1-9 took the same time within noise here;
.tar.zst is the fast choice (BENCHMARKS.md, issue 27 item 2)."""
ZSTD_LEVEL = 3
"""zstd's own default; a .tar.zst is written and read in one stream, on every core."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# What a damaged or truncated archive raises while it is read (our own write errors are not among them).
READ_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    gzip.BadGzipFile,
    zlib.error,
    zstandard.ZstdError,
    EOFError,
)


def format_for(out: str | Path, format: str | None = None) -> str:
    """The bundle format: ``format`` if given, else from the extension (.tar, .tar.gz/.tgz, .tar.zst/.tzst,
    .zip, .parquet; none: tar.gz). Another extension is refused: a tar.gz named .rar or .7z would mislead."""
    if format is not None:
        if format not in FORMATS:
            raise BundleError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
        return format
    name = Path(out).name.lower()
    suffixes = {".tar.gz": "tar.gz", ".tgz": "tar.gz", ".tar.zst": "tar.zst", ".tzst": "tar.zst"}
    for suffix, found in (*suffixes.items(), (".tar", "tar"), (".zip", "zip")):
        if name.endswith(suffix):
            return found
    if name.endswith(".parquet"):
        return "parquet"
    if Path(name).suffix:
        raise BundleError(
            f"--out {out}: unknown extension {Path(name).suffix!r}; use .tar, .tar.gz (.tgz), .tar.zst "
            "(.tzst), .zip or .parquet, or give --format"
        )
    return "tar.gz"


def manifest_facts(manifest: Manifest) -> dict:
    """What a recipient needs to know before opening: model, tokenizer, template, sketch, counts, dates."""
    return {
        "format_version": manifest.format_version,
        "model": manifest.model,
        "adapter": manifest.adapter,
        "tokenizer": manifest.tokenizer,
        "template": manifest.template,
        "max_length": manifest.max_length,
        "normalize": manifest.normalize,
        "sketch": manifest.sketch,
        "vector_dtype": manifest.vector_dtype,
        "row_count": manifest.row_count,
        "rejected_count": manifest.rejected_count,
        "generation": manifest.generation,
        "built_by": manifest.software,
        "created_at": manifest.created_at,
        "updated_at": manifest.updated_at,
    }


def header(manifest: Manifest, format: str) -> dict:
    return {
        "bundle_format_version": BUNDLE_FORMAT_VERSION,
        "software": {"name": SOFTWARE_NAME, "version": software_version()},
        "exported_at": utc_now(),
        "archive_format": format,
        "index": manifest_facts(manifest),
    }


def describe(
    manifest: Manifest, entries: list[dict], format: str, sign_with: str | Path | None = None
) -> dict:
    """bundle.json: the header, the manifest's and every member's checksum, the optional ed25519
    signature of all that (`bundle_check.sign`), then its own checksum."""
    description = {**header(manifest, format), "manifest_sha256": entries[0]["sha256"], "members": entries}
    if sign_with is not None:
        from rapidin_index.store.bundle_check import SIGNATURE_KEY, sign

        description[SIGNATURE_KEY] = sign(description, sign_with)
    description["bundle_sha256"] = self_checksum(description)
    return description


def self_checksum(description: dict) -> str:
    body = {key: value for key, value in description.items() if key != "bundle_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_version(version: int) -> None:
    """Refuse a bundle written by a newer rapidin-index."""
    refuse_newer(version, BUNDLE_FORMAT_VERSION, "bundle", BundleError)
