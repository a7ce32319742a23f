"""What an import checks beyond checksums: every member opens the way a query opens it, and who signed it.

Checksums prove a bundle arrived as it was written, not that it can be read, nor who wrote it. Before an
import writes anything to its target (and on ``import --check``), `check_members` opens the unpacked index
as a query would: every file's xxh3 checksum (the one each open checks) against the manifest; each FAISS
file's header read by hand (count, dimension and metric must equal the manifest's, and the file must be
large enough to hold what it claims, so a header claiming 2^40 vectors is refused without allocating);
then the file loaded and its ids compared with the LanceDB table's (same count, same ids, each once) and
the rejected rows'.

Signatures (optional): ``export --sign KEY`` adds an ed25519 signature to bundle.json, over its canonical
JSON without ``signature`` and ``bundle_sha256``. bundle.json already holds the manifest's and every
member's sha256, so the signature covers every byte of the bundle; ``import --require-signature PUBKEY``
refuses a bundle that is unsigned, signed by another key, or edited after signing (checksums recomputed
or not). Keys are PEM (PKCS#8 / SubjectPublicKeyInfo, as ``openssl genpkey -algorithm ed25519`` writes
them) or the raw 32 bytes; `generate_key_pair` (``rapidin-index keygen``) writes a pair.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from rapidin_index.errors import BundleError, RapidinIndexError
from rapidin_index.store.checksums import FAST, checksum
from rapidin_index.store.manifest import Manifest

SIGNATURE_KEY = "signature"
FAISS_HEADER_BYTES = 37  # fourcc, d int32, ntotal int64, two int64, is_trained u8, metric int32
METRIC_INNER_PRODUCT = 0
BYTES_PER_DIMENSION = {b"IxFI": 4, b"IxSQ": 2}  # flat float32, flat fp16 scalar quantizer


# --------------------------------------------------------------------------- opening the members


def check_members(folder: Path, manifest: Manifest) -> None:
    """Open every FAISS file and the LanceDB table of ``folder`` as a query will; BundleError on any doubt."""
    for relative, entry in sorted(manifest.files.items()):  # what every open checks (sha256 is checked)
        if isinstance(entry.get(FAST), str) and checksum(folder / relative, FAST) != entry[FAST]:
            raise BundleError(
                f"bundle refused: {relative} does not match its {FAST} in the manifest (edited)"
            )
    faiss_ids = None
    for relative in sorted(manifest.files):
        if relative.endswith(".faiss"):
            check_faiss_header(folder / relative, manifest)
            faiss_ids = _faiss_ids(folder / relative, manifest)
    table_ids = _table_ids(folder, manifest)
    if faiss_ids is not None and sorted(faiss_ids) != table_ids:
        missing = sorted(set(faiss_ids) ^ set(table_ids))[:3]
        raise BundleError(
            f"bundle refused: the FAISS ids and the LanceDB rows differ (ids {missing} are in one only)"
        )
    _check_rejected(folder, manifest, set(table_ids))


def read_faiss_header(path: Path) -> tuple[dict, dict] | None:
    """The headers of an id-mapped FAISS file and of its inner index ({fourcc, dimension, count, metric}),
    read without FAISS; None for a file too short to hold them."""
    with open(path, "rb") as file:
        head = file.read(2 * FAISS_HEADER_BYTES)
    if len(head) < 2 * FAISS_HEADER_BYTES:
        return None
    return _header(head[:FAISS_HEADER_BYTES]), _header(head[FAISS_HEADER_BYTES:])


def check_faiss_header(path: Path, manifest: Manifest) -> None:
    """The FAISS file's own header (and its inner index's) against the manifest, before FAISS reads it."""
    name, size = path.name, path.stat().st_size
    headers = read_faiss_header(path)
    if headers is None:
        raise BundleError(f"bundle refused: {name} is {size} bytes, too short for a FAISS index")
    outer, inner = headers
    if outer["fourcc"] != b"IxM2":
        raise BundleError(
            f"bundle refused: {name} is not a FAISS id-mapped index (starts {outer['fourcc']!r})"
        )
    expected = {"dimension": manifest.sketch["output_dim"], "count": manifest.row_count}
    for header in (outer, inner):
        for key, value in expected.items():
            if header[key] != value:
                raise BundleError(
                    f"bundle refused: {name}'s header claims {key} {header[key]:,}, the manifest says {value:,}"
                )
        if header["metric"] != METRIC_INNER_PRODUCT:
            raise BundleError(
                f"bundle refused: {name} uses FAISS metric {header['metric']}, not inner product"
            )
    # ids are 8 bytes a vector, codes at least BYTES_PER_DIMENSION a dimension: bounds what FAISS allocates
    needed = inner["count"] * (8 + inner["dimension"] * BYTES_PER_DIMENSION.get(inner["fourcc"], 0))
    if needed > size:
        raise BundleError(
            f"bundle refused: {name} claims {inner['count']:,} vectors of {inner['dimension']:,} dims "
            f"({needed:,} bytes) but holds {size:,} bytes"
        )


def _header(data: bytes) -> dict:
    fourcc, dimension, count, _, _, _, metric = struct.unpack("<4siqqqBi", data)
    return {"fourcc": fourcc, "dimension": dimension, "count": count, "metric": metric}


def _faiss_ids(path: Path, manifest: Manifest) -> list[int]:
    from rapidin_index.store import vector_index

    try:
        loaded = vector_index.load_index(path, mapped=True)  # as a query opens it: vectors not read into RAM
    except RapidinIndexError as error:
        raise BundleError(f"bundle refused: {error}") from None
    if loaded.ntotal != manifest.row_count or loaded.d != manifest.sketch["output_dim"]:
        raise BundleError(
            f"bundle refused: {path.name} holds {loaded.ntotal:,} vectors of {loaded.d} dims, the manifest "
            f"says {manifest.row_count:,} of {manifest.sketch['output_dim']}"
        )
    import faiss

    return faiss.vector_to_array(loaded.id_map).tolist()


def _table_ids(folder: Path, manifest: Manifest) -> list[int]:
    """The LanceDB table's ids, sorted; refused unless they are the manifest's row_count distinct ids."""
    from rapidin_index.store import index_folder

    name = index_folder.table_name(manifest.generation)
    try:
        table = index_folder.open_rows(folder, manifest.generation)
        ids = table.search().select(["id"]).limit(max(table.count_rows(), 1)).to_arrow()["id"].to_pylist()
    except Exception as error:  # lance reports a damaged or missing table in its own (Rust) types
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise BundleError(f"bundle refused: the LanceDB table {name} cannot be read ({reason})") from None
    if len(ids) != manifest.row_count or len(set(ids)) != len(ids):
        raise BundleError(
            f"bundle refused: the LanceDB table {name} holds {len(ids):,} rows ({len(set(ids)):,} distinct "
            f"ids), the manifest says {manifest.row_count:,}"
        )
    return sorted(ids)


def _check_rejected(folder: Path, manifest: Manifest, indexed: set[int]) -> None:
    from rapidin_index.store import index_folder

    name = index_folder.rejected_file(manifest.generation)
    path = folder / name
    if not path.exists():
        return
    try:
        rows = [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines() if line]
        ids = [int(row["id"]) for row in rows if isinstance(row.get("reason"), str)]
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise BundleError(f"bundle refused: {name} is not readable JSON lines ({error})") from None
    if len(ids) != len(rows) or len(ids) != manifest.rejected_count or indexed & set(ids):
        raise BundleError(
            f"bundle refused: {name} lists {len(rows)} rejected rows, the manifest says "
            f"{manifest.rejected_count}, or names an indexed row"
        )


# --------------------------------------------------------------------------- signatures


def signed_bytes(description: dict) -> bytes:
    """What a signature covers: bundle.json's canonical JSON less its signature and self checksum."""
    body = {key: value for key, value in description.items() if key not in (SIGNATURE_KEY, "bundle_sha256")}
    return json.dumps(body, sort_keys=True, ensure_ascii=False).encode()


def sign(description: dict, private_key_file: str | Path) -> dict:
    """The ``signature`` entry for ``description``: {algorithm, public_key (hex), value (hex)}."""
    key = load_private_key(private_key_file)
    public = _raw_public(key.public_key())
    return {
        "algorithm": "ed25519",
        "public_key": public.hex(),
        "value": key.sign(signed_bytes(description)).hex(),
    }


def check_signature(description: dict, public_key_file: str | Path | None) -> None:
    """Refuse a bundle whose signature does not verify; with a key file, one not signed by that key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signature = description.get(SIGNATURE_KEY)
    if signature is None:
        if public_key_file is not None:
            raise BundleError(
                f"the bundle is not signed, and --require-signature {public_key_file} asks for a signature; "
                "ask its maker for a bundle exported with --sign"
            )
        return
    try:
        public = bytes.fromhex(signature["public_key"])
        value = bytes.fromhex(signature["value"])
        assert signature["algorithm"] == "ed25519"
        key = Ed25519PublicKey.from_public_bytes(public)
    except (AssertionError, KeyError, TypeError, ValueError):
        raise BundleError(
            "bundle.json's signature is malformed (not an ed25519 signature); refusing"
        ) from None
    if public_key_file is not None and public != _raw_public(load_public_key(public_key_file)):
        raise BundleError(f"the bundle is signed by another key than {public_key_file}; refusing")
    try:
        key.verify(value, signed_bytes(description))
    except InvalidSignature:
        raise BundleError(
            "the bundle's signature does not verify: bundle.json was edited after signing"
        ) from None


def _raw_public(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key(path, "--sign")
    try:
        key = (
            Ed25519PrivateKey.from_private_bytes(data)
            if len(data) == 32
            else serialization.load_pem_private_key(data, password=None)
        )
    except (ValueError, TypeError) as error:
        raise BundleError(
            f"--sign {path}: not an unencrypted ed25519 private key, PEM or raw 32 bytes ({error}); make one "
            "with `rapidin-index keygen`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"--sign {path}: a {type(key).__name__}, not an ed25519 private key")
    return key


def load_public_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key(path, "--require-signature")
    try:
        key = (
            Ed25519PublicKey.from_public_bytes(data)
            if len(data) == 32
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as error:
        raise BundleError(
            f"--require-signature {path}: not an ed25519 public key, PEM or raw 32 bytes ({error})"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"--require-signature {path}: a {type(key).__name__}, not an ed25519 public key")
    return key


def _read_key(path: str | Path, option: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise BundleError(f"{option} {path}: cannot read the key ({error.strerror})") from None
    return data if len(data) == 32 else data.strip() + b"\n"


def generate_key_pair(private_path: str | Path) -> tuple[Path, Path]:
    """Write a new ed25519 private key (PEM, mode 0600) to ``private_path`` and its public key to
    ``private_path`` + ".pub"; refuses to overwrite either."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise BundleError(f"{path} exists; choose another --out (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(private)
    public_path.write_bytes(public)
    return private_path, public_path
