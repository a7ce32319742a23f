"""Bundle import: every corruption, truncation or unsafe member refused before anything reaches the index
folder, naming the bad member; an existing index kept unless forced and the bundle verifies."""

import hashlib
import io
import json
import tarfile
from types import SimpleNamespace

import pytest
from rapidin_index.cli.main import app
from typer.testing import CliRunner

from rapidin_index.errors import BundleError, IndexMismatchError, WriteError
from rapidin_index.files import sha256_tree
from rapidin_index.retrieval import Index
from rapidin_index.store.bundle import BUNDLE_NAME, manifest_facts
from rapidin_index.store.bundle_export import export_index
from rapidin_index.store.bundle_import import import_bundle, verify_bundle
from rapidin_index.store.manifest import Manifest, sealed

runner = CliRunner()
FAISS_MEMBER = "vectors-g0001.faiss"


def test_forged_but_consistent_bundle_imports_then_the_model_check_refuses(exported_index, tmp_path):
    """Recomputing every checksum is not detectable without a signature (see the signature tests below);
    the model fingerprint still is."""

    def forge(members):
        return edit_manifest(members, lambda m: m["model"].update(fingerprint="0" * 64), facts=True)

    bundle = rewrite(exported_index.bundle, tmp_path / "forged.tar.gz", forge)
    import_bundle(bundle, tmp_path / "imported")
    with pytest.raises(IndexMismatchError, match="model weights differ"):
        Index.open(tmp_path / "imported", model=exported_index.model, device="cpu")


# --------------------------------------------------------------------------- tampering helpers


def read_members(path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as archive:
        return [(m, archive.extractfile(m).read() if m.isfile() else b"") for m in archive.getmembers()]


def rewrite(exported_index, out, edit, mode="w:gz"):
    members = edit(read_members(exported_index))
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
    manifest = sealed(manifest) if seal else manifest  # a forger recomputes the manifest's own checksum too
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


def untouched_after_refusal(tmp_path, bundle, message_parts, error=BundleError):
    target = tmp_path / "imported"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error) as refused:
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
def test_tampered_bundles_are_refused_naming_the_member(exported_index, tmp_path, case):
    edit, message_parts = CASES[case]
    bundle = rewrite(exported_index.bundle, tmp_path / "tampered.tar.gz", edit)
    untouched_after_refusal(tmp_path, bundle, message_parts)


def test_newer_bundle_format_is_refused(exported_index, tmp_path):
    bundle = rewrite(
        exported_index.bundle, tmp_path / "future.tar.gz", lambda m: reseal(m, bundle_format_version=2)
    )
    message = untouched_after_refusal(tmp_path, bundle, [])
    assert message == (
        "bundle format version 2 is newer than this rapidin-index understands (1); upgrade rapidin-index to open it"
    )


def test_truncated_archives_are_refused(exported_index, tmp_path):
    data = exported_index.bundle.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    untouched_after_refusal(tmp_path, cut, ["truncated or corrupted", f"member '{FAISS_MEMBER}'"])
    cut.unlink()
    zipped = export_index(exported_index.index, tmp_path / "whole.zip")
    (tmp_path / "cut.zip").write_bytes(zipped.read_bytes()[:-100])
    zipped.unlink()
    untouched_after_refusal(tmp_path, tmp_path / "cut.zip", ["truncated or corrupted"])


@pytest.fixture(scope="module")
def zstd_bundle(exported_index, tmp_path_factory):
    return export_index(exported_index.index, tmp_path_factory.mktemp("zst") / "bundle.tar.zst")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_truncated_tar_zst_is_refused_on_one_line(zstd_bundle, tmp_path, keep):
    """Cut inside a member, or inside the zstd frame's last block (every member may be whole, the frame's
    end and checksum are not): refused, the target untouched."""
    data = zstd_bundle.read_bytes()
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(data[: int(len(data) * keep)])
    message = untouched_after_refusal(tmp_path, cut, ["cut.tar.zst is truncated or corrupted"])
    assert "\n" not in message and "Traceback" not in message
    refused = runner.invoke(app, ["import", str(cut), "--check"])
    assert refused.exit_code == 2 and "truncated or corrupted" in refused.output
    assert len(refused.output.strip().splitlines()) == 1, refused.output


def test_bit_rot_in_a_tar_zst_is_refused(zstd_bundle, tmp_path):
    """A flipped bit in the compressed stream: zstd's frame checksum, the tar headers or the member's
    sha256 refuse it, whichever sees it first; never a traceback, never a partial import."""
    data = bytearray(zstd_bundle.read_bytes())
    for position in (0.3, 0.6, 0.9):
        rotten = bytearray(data)
        rotten[int(len(rotten) * position)] ^= 0x10
        bundle = tmp_path / "rot.tar.zst"
        bundle.write_bytes(bytes(rotten))
        message = untouched_after_refusal(tmp_path, bundle, [])
        assert any(part in message for part in ("truncated or corrupted", "does not match")), message
        bundle.unlink()


def test_bit_rot_in_a_plain_tar_or_zip_names_the_member(exported_index, tmp_path):
    for name in ("rot.tar", "rot.zip"):
        bundle = export_index(exported_index.index, tmp_path / name)
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


def test_a_bundle_larger_than_the_free_space_is_refused(exported_index, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "rapidin_index.store.bundle_import.shutil.disk_usage", lambda path: SimpleNamespace(free=1000)
    )
    parts = [f"cannot write to {tmp_path}: no space left on device", "1,000 bytes free"]
    untouched_after_refusal(tmp_path, exported_index.bundle, parts, WriteError)


def test_an_existing_index_is_kept_unless_forced_and_the_bundle_verifies(exported_index, tmp_path):
    target = tmp_path / "target"
    import_bundle(exported_index.bundle, target)
    before = sha256_tree(target)
    with pytest.raises(BundleError, match="already holds an index.*--force"):
        import_bundle(exported_index.bundle, target)
    bad = rewrite(exported_index.bundle, tmp_path / "bad.tar.gz", lambda m: flipped(m, FAISS_MEMBER))
    with pytest.raises(BundleError, match=FAISS_MEMBER):
        import_bundle(bad, target, force=True)
    assert sha256_tree(target) == before
    assert import_bundle(exported_index.bundle, target, force=True).row_count == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "target"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="holds no index"):
        import_bundle(exported_index.bundle, tmp_path / "other", force=True)
    (tmp_path / "empty").mkdir()
    assert import_bundle(exported_index.bundle, tmp_path / "empty").row_count == 24


def test_cli_errors_exit_2_with_the_reason(exported_index, tmp_path):
    bad = rewrite(exported_index.bundle, tmp_path / "bad.tar.gz", lambda m: flipped(m, FAISS_MEMBER))
    refused = runner.invoke(app, ["import", str(bad), "--index", str(tmp_path / "i")])
    assert refused.exit_code == 2 and FAISS_MEMBER in refused.output and not (tmp_path / "i").exists()
    neither = runner.invoke(app, ["import", str(bad)])
    assert neither.exit_code == 2 and "--check" in neither.output
    wrong_format = runner.invoke(
        app, ["export", "--index", str(exported_index.index), "--out", str(tmp_path / "b"), "--format", "rar"]
    )
    assert wrong_format.exit_code == 2 and "'rar' is not one of" in wrong_format.output
    not_an_index = runner.invoke(app, ["export", "--index", str(tmp_path), "--out", str(tmp_path / "b.tar")])
    assert not_an_index.exit_code == 2 and "no finished index" in not_an_index.output
    missing = runner.invoke(app, ["import", str(tmp_path / "nope.tar.gz"), "--check"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


# --------------------------------------------------------------------------- members opened as a query opens them


def faiss_edited(members, change):
    """The FAISS member rebuilt by FAISS itself after ``change(ids [n], vectors [n, d])`` edits its contents."""
    import faiss
    import numpy as np

    index = faiss.deserialize_index(np.frombuffer(payloads(members)[FAISS_MEMBER], np.uint8))
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    vectors = faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal)
    ids, vectors = change(ids.copy(), vectors.copy())
    rebuilt = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    rebuilt.add_with_ids(vectors, ids)
    return replace(members, FAISS_MEMBER, faiss.serialize_index(rebuilt).tobytes())


def resealed_index(members):
    """Every checksum recomputed after a member changed: the manifest's files entries, then bundle.json."""
    import xxhash

    from rapidin_index.store.verify import FAST

    data = payloads(members)

    def update(manifest):
        entry = manifest["files"][FAISS_MEMBER]
        entry["sha256"] = hashlib.sha256(data[FAISS_MEMBER]).hexdigest()
        entry[FAST] = xxhash.xxh3_128(data[FAISS_MEMBER]).hexdigest()
        entry["bytes"] = len(data[FAISS_MEMBER])

    return edit_manifest(members, update, facts=True)


def huge_header(members, manifest_too: bool):
    """The FAISS header (outer and inner index) claims 2^40 vectors; with ``manifest_too`` so does the
    manifest, every checksum recomputed."""
    data = bytearray(payloads(members)[FAISS_MEMBER])
    for offset in (8, 37 + 8):  # ntotal of IndexIDMap2, then of its IndexFlatIP
        data[offset : offset + 8] = (1 << 40).to_bytes(8, "little")
    edited = replace(members, FAISS_MEMBER, bytes(data))
    if not manifest_too:
        return resealed_index(edited)
    return edit_manifest(resealed_index(edited), lambda m: m.update(row_count=1 << 40), facts=True)


OPEN_CASES = {
    "FAISS header claims 2^40 vectors": (
        lambda m: huge_header(m, False),
        [FAISS_MEMBER, "header claims count 1,099,511,627,776, the manifest says 24"],
    ),
    "FAISS header and manifest claim 2^40 vectors": (
        lambda m: huge_header(m, True),
        [FAISS_MEMBER, "claims 1,099,511,627,776 vectors of 1,024 dims", "but holds 98,586 bytes"],
    ),
    "FAISS ids other than the LanceDB rows'": (
        lambda m: resealed_index(faiss_edited(m, lambda ids, v: (ids + 1000, v))),
        ["the FAISS ids and the LanceDB rows differ"],
    ),
    "FAISS file one vector short": (
        lambda m: resealed_index(faiss_edited(m, lambda ids, v: (ids[:-1], v[:-1]))),
        [FAISS_MEMBER, "header claims count 23, the manifest says 24"],
    ),
    "sha256 recomputed but not xxh3": (
        lambda m: edit_manifest(
            resealed_index(faiss_edited(m, lambda ids, v: (ids, -v))),
            lambda v: v["files"][FAISS_MEMBER].update(xxh3_128="0" * 32),
            facts=True,
        ),
        [FAISS_MEMBER, "does not match its xxh3_128"],
    ),
    "rejected rows not JSON": (
        lambda m: edit_manifest(
            replace(m, "rejected-g0001.jsonl", b"{not json\n"),
            lambda v: v["files"]["rejected-g0001.jsonl"].update(
                sha256=hashlib.sha256(b"{not json\n").hexdigest(), bytes=10, xxh3_128=None
            ),
            facts=True,
        ),
        ["rejected-g0001.jsonl is not readable JSON lines"],
    ),
}


@pytest.mark.parametrize("case", list(OPEN_CASES), ids=list(OPEN_CASES))
def test_import_and_check_open_every_member_before_writing(exported_index, tmp_path, case):
    """Bundles whose every checksum is consistent but whose members a query could not open (or would read
    wrong) are refused by import and by import --check, naming the member, with nothing written."""
    edit, message_parts = OPEN_CASES[case]
    bundle = rewrite(exported_index.bundle, tmp_path / "tampered.tar.gz", edit)
    untouched_after_refusal(tmp_path, bundle, message_parts)
    with pytest.raises(BundleError) as checked:
        verify_bundle(bundle)
    assert all(part in str(checked.value) for part in message_parts), str(checked.value)


# --------------------------------------------------------------------------- signatures


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from rapidin_index.store.bundle_check import generate_key_pair

    root = tmp_path_factory.mktemp("keys")
    (private, public), (_, other) = generate_key_pair(root / "team"), generate_key_pair(root / "other")
    return SimpleNamespace(private=private, public=public, other_public=other)


@pytest.fixture(scope="module")
def signed_bundle(exported_index, keys, tmp_path_factory):
    return export_index(
        exported_index.index, tmp_path_factory.mktemp("signed") / "signed.tar.gz", sign_with=keys.private
    )


def test_a_signed_bundle_imports_under_its_public_key(signed_bundle, keys, tmp_path):
    assert import_bundle(signed_bundle, tmp_path / "i", require_signature=keys.public).row_count == 24
    assert verify_bundle(signed_bundle, keys.public)["signature"]["algorithm"] == "ed25519"
    assert import_bundle(signed_bundle, tmp_path / "j").row_count == 24  # a signature asked of no one


def test_unsigned_wrong_key_and_forged_bundles_are_refused_under_a_required_signature(
    exported_index, signed_bundle, keys, tmp_path
):
    target = tmp_path / "i"
    with pytest.raises(BundleError, match="not signed.*--require-signature"):
        import_bundle(exported_index.bundle, target, require_signature=keys.public)
    with pytest.raises(BundleError, match="signed by another key"):
        import_bundle(signed_bundle, target, require_signature=keys.other_public)
    # forged vectors, every checksum recomputed (manifest, bundle.json): the signature no longer verifies
    forged = rewrite(
        signed_bundle,
        tmp_path / "forged.tar.gz",
        lambda m: resealed_index(faiss_edited(m, lambda i, v: (i, -v))),
    )
    with pytest.raises(BundleError, match="signature does not verify"):
        import_bundle(forged, target, require_signature=keys.public)
    with pytest.raises(BundleError, match="signature does not verify"):
        import_bundle(forged, target)  # a signature that is there is always checked
    assert not target.exists()
    assert (
        import_bundle(
            rewrite(
                exported_index.bundle,
                tmp_path / "unsigned-forged.tar.gz",
                lambda m: resealed_index(faiss_edited(m, lambda i, v: (i, -v))),
            ),
            target,
        ).row_count
        == 24
    )  # without a signature such a forgery is undetectable: why signatures exist


def test_cli_keygen_sign_and_require(exported_index, tmp_path):
    made = runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")])
    assert again.exit_code == 2 and "exists" in again.output
    bundle = tmp_path / "b.tar.gz"
    signed = runner.invoke(
        app,
        ["export", "--index", str(exported_index.index), "--out", str(bundle), "--sign", str(tmp_path / "k")],
    )
    assert signed.exit_code == 0, signed.output
    checked = runner.invoke(
        app, ["import", str(bundle), "--check", "--require-signature", str(tmp_path / "k.pub")]
    )
    assert checked.exit_code == 0 and "verifies" in checked.output, checked.output
    (tmp_path / "not-a-key").write_text("hello")
    bad_key = runner.invoke(
        app,
        [
            "export",
            "--index",
            str(exported_index.index),
            "--out",
            str(tmp_path / "c.tar.gz"),
            "--sign",
            str(tmp_path / "not-a-key"),
        ],
    )
    assert bad_key.exit_code == 2 and "not an unencrypted ed25519 private key" in bad_key.output
    assert not (tmp_path / "c.tar.gz").exists()
    unsigned = runner.invoke(
        app, ["import", str(exported_index.bundle), "--check", "--require-signature", str(tmp_path / "k.pub")]
    )
    assert unsigned.exit_code == 2 and "not signed" in unsigned.output
