"""The index manifest: what was built, from what, how.

The manifest is the commit point of every build: files are written first, the manifest last (atomically,
by rename). An index folder without ``manifest.json`` holds no finished index.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rapidin_index.errors import IntegrityError, ManifestError
from rapidin_index.files import atomic_write_json, refuse_newer, sha256_path

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SOFTWARE_NAME = "rapidin-index"
KEYS_OF_FIELDS = {"backward_path": "exact_path"}
"""{field: its JSON key} where the two differ: a field renamed after manifests (and journal records,
`journal.ChunkRecord`) were written under its old name keeps that key, so the format is unchanged."""


def software_version() -> str:
    from rapidin_index import __version__

    return __version__


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """Everything needed to query, verify or extend an index. Field groups are plain dicts (JSON)."""

    # {name_or_path (a folder's absolute path since issue 26; earlier indexes: as typed), fingerprint, dtype,
    # files (stat fingerprint), identity (model_identity.model_identity: config sha256, hub id, revision)}
    model: dict
    adapter: dict | None  # {path, fingerprint, files, identity (model_identity.adapter_identity)} or None
    tokenizer: dict  # {fingerprint, chat_template_sha256}
    template: dict  # data.Template.to_dict()
    max_length: int | None
    parameters: dict  # {regex, names, shapes, gradient_dim}
    normalize: str
    sketch: dict  # SketchSettings.to_dict() + gradient_dim, padded_dim, output_dim
    vector_dtype: str
    row_count: int = 0
    rejected_count: int = 0
    token_count: int = 0
    truncated_count: int = 0
    generation: int = 0
    shard: dict | None = None  # {index, count} for one static shard of a larger build, else None
    template_usage: dict = field(default_factory=dict)  # {resolved template name: rows}, e.g. {"alpaca": 24}
    sources: list = field(default_factory=list)  # [{path, sha256, id_offset, rows}]
    # {parameter name: why} for the tensors whose per-example gradients took one plain backward each
    # (`gradients.GradientSketcher.backward_path`); JSON key "exact_path" (`KEYS_OF_FIELDS`)
    backward_path: dict = field(default_factory=dict)
    # Where the build's self-check of the hooks ran (gradients.check_environment), one entry a place: a
    # query run in one of them takes backward_path as the verdict instead of checking again.
    self_checks: list = field(default_factory=list)
    # How prompt and response became tokens (data.TOKENIZATIONS). Indexes from before the field
    # tokenized the two parts separately.
    tokenization: str = "separate"
    files: dict = field(default_factory=dict)  # {relative path: {sha256, bytes}}
    # optimizer_state.OptimizerScaling.record ({path, fingerprint, matched_by, ...}) or None
    optimizer_state: dict | None = None
    # precondition.fit's record ({file, version, kind, damping, ...}) of the fitted Fisher, or None
    precondition: dict | None = None
    format_version: int = FORMAT_VERSION
    software: dict = field(default_factory=lambda: {"name": SOFTWARE_NAME, "version": software_version()})
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)

    def to_dict(self) -> dict:
        return {KEYS_OF_FIELDS.get(name, name): item for name, item in asdict(self).items()}

    @classmethod
    def from_dict(cls, value: dict) -> Manifest:
        if not isinstance(value, dict):
            raise ManifestError("the manifest is not a JSON object; this is not a rapidin-index manifest")
        version = value.get("format_version")
        if not isinstance(version, int):
            raise ManifestError(
                "manifest has no integer format_version; this is not a rapidin-index manifest"
            )
        refuse_newer(version, FORMAT_VERSION, "index", ManifestError)
        check_shape(value)
        fields_of_keys = {key: name for name, key in KEYS_OF_FIELDS.items()}
        values = {fields_of_keys.get(key, key): item for key, item in value.items()}
        return cls(**{name: item for name, item in values.items() if name in cls.__dataclass_fields__})

    @property
    def total_rows_seen(self) -> int:
        """Rows read from all sources, indexed or rejected: the next appended row's id."""
        return sum(source["rows"] for source in self.sources)


# The manifest's schema. REQUIRED: what every manifest must hold, by type; OPTIONAL: keys older manifests
# may lack (they take the dataclass default) but no manifest may hold with another type; REQUIRED_INSIDE:
# {group: {key: type}} inside the groups a query, an append or an export reads. A damaged or hand-edited
# manifest fails here, on one line naming the field, instead of deep in whatever reads it first.
NONE = type(None)
REQUIRED = {
    "model": dict, "tokenizer": dict, "template": dict, "parameters": dict, "normalize": str,
    "sketch": dict, "vector_dtype": str, "row_count": int, "generation": int, "files": dict,
}  # fmt: skip
OPTIONAL = {
    "adapter": (dict, NONE), "max_length": (int, NONE), "shard": (dict, NONE), "rejected_count": int,
    "token_count": int, "truncated_count": int, "template_usage": dict, "sources": list, KEYS_OF_FIELDS["backward_path"]: dict,
    "self_checks": list, "tokenization": str, "software": dict, "created_at": str, "updated_at": str,
}  # fmt: skip
REQUIRED_INSIDE = {
    "model": {"name_or_path": str, "fingerprint": str, "dtype": str},
    "tokenizer": {"fingerprint": str},
    "template": {"name": str},
    "parameters": {"names": list, "gradient_dim": int},
    "sketch": {"sketch_dim": int, "shuffle_lambda": int, "seed": int, "output_dim": int, "gradient_dim": int},
}
DAMAGED = "the index's manifest is damaged (edited by hand?): re-import its bundle or rebuild it"


def short(value) -> str:
    """``value`` as JSON, cut to 80 characters: for one line of an error message."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def check_shape(value: dict) -> None:
    """Refuse a manifest missing a key a reader needs, or holding one of the wrong type."""
    for key, kind in [*REQUIRED.items(), *((k, t) for k, t in OPTIONAL.items() if k in value)]:
        if not _is(value.get(key), kind):
            found = "missing" if key not in value else f"{type(value[key]).__name__} {short(value[key])}"
            raise ManifestError(f"manifest field {key!r} must be {_name(kind)}, found {found}; {DAMAGED}")
    for group, fields in REQUIRED_INSIDE.items():
        for key, kind in fields.items():
            if not _is(value[group].get(key), kind):
                raise ManifestError(
                    f"manifest field {group}.{key} is missing or not {kind.__name__}; {DAMAGED}"
                )
    for key in ("row_count", "rejected_count", "token_count", "truncated_count", "generation"):
        if value.get(key, 0) < 0:
            raise ManifestError(f"manifest {key} is {value[key]}; {DAMAGED}")
    for relative, entry in value["files"].items():
        parts = relative.replace("\\", "/").split("/")
        well_formed = (
            isinstance(entry, dict) and _is(entry.get("sha256"), str) and _is(entry.get("bytes"), int)
        )
        if relative.startswith("/") or ".." in parts or not well_formed or entry["bytes"] < 0:
            raise ManifestError(
                f"manifest files entry {relative[:80]!r} is malformed or outside the index folder; {DAMAGED}"
            )
    if not all(
        isinstance(source, dict) and _is(source.get("rows"), int) for source in value.get("sources", [])
    ):
        raise ManifestError(f"manifest sources must be objects with an integer 'rows'; {DAMAGED}")


def _is(item, kind) -> bool:
    """isinstance, where a bool is not an int (JSON true is no row count)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(item, kinds) and not (isinstance(item, bool) and bool not in kinds)


def _name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is NONE else k.__name__ for k in kinds)


def add_self_checks(places: list[dict], more: list[dict]) -> None:
    """Append to ``places`` (a manifest's ``self_checks``) each place of ``more`` it does not hold yet."""
    for place in more:
        if place not in places:
            places.append(place)


CHECKSUM_KEY = "self_sha256"
"""The manifest's checksum of itself: sha256 of its canonical JSON without this key. A flipped byte in the
manifest (a sketch seed, a template) would change every answer in silence; manifests written before it
have none and are read as they are."""


def sealed(value: dict) -> dict:
    """``value`` (a manifest's dict) with its own checksum under `CHECKSUM_KEY`."""
    body = {key: item for key, item in value.items() if key != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return {**body, CHECKSUM_KEY: hashlib.sha256(text.encode()).hexdigest()}


def write_manifest(index_dir: str | Path, manifest: Manifest) -> None:
    manifest.updated_at = utc_now()
    atomic_write_json(Path(index_dir) / MANIFEST_NAME, sealed(manifest.to_dict()))


def read_manifest(index_dir: str | Path) -> Manifest:
    path = Path(index_dir) / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(
            f"{index_dir} holds no finished index (no {MANIFEST_NAME}); run `rapidin-index build`"
        )
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ManifestError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); {DAMAGED}"
        ) from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); {DAMAGED}") from None
    manifest = Manifest.from_dict(value)  # first: a newer format is named as such
    if CHECKSUM_KEY in value and sealed(value) != value:
        raise ManifestError(f"{path} does not match its own checksum ({CHECKSUM_KEY}); {DAMAGED}")
    return manifest


def verify_files(index_dir: str | Path, manifest: Manifest) -> None:
    """Check every file the manifest lists against its sha256; raise naming the first bad one."""
    index_dir = Path(index_dir)
    if not manifest.files:
        raise IntegrityError(f"{index_dir}: the manifest lists no files to verify; {DAMAGED}")
    for relative, expected in sorted(manifest.files.items()):
        path = index_dir / relative
        if not path.exists():
            raise IntegrityError(f"{relative} is missing from {index_dir}")
        if sha256_path(path) != expected["sha256"]:
            raise IntegrityError(
                f"{relative} does not match its checksum in the manifest (corrupted or edited)"
            )
