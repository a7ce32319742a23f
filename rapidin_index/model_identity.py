"""Where a model or adapter is, and what it is in words another machine can check, with no torch.

The folders are checked by stat before anything is hashed or loaded (:func:`check_model_sources`): a
missing model or adapter folder, or one that is not what save_pretrained() writes, is refused by name.
A build records, for the model and for the adapter, the path resolved (a local folder's absolute path, so
a query from any directory finds it; a hub id as given) and a portable identity: the sha256 of its config
(canonical JSON), the architecture, the hub id and revision where they can be known offline (a Hugging
Face cache snapshot ``models--owner--name/snapshots/<revision>``, or a git clone of a huggingface.co
repository), and for an adapter the base model its config names. `info`, `export` and `import` show it
(:func:`describe`). The weights' own fingerprints (`models.fingerprint_module`) stay what a query is
checked against; this identity is for people: it tells a receiving team which model to fetch.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from rapidin_index.errors import ModelError
from rapidin_index.settings import ModelSettings

CONFIG_NAME = "config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# Config keys that say which library wrote the file, not what the model is: a re-save with a newer
# transformers is still the same model.
_WRITER_KEYS = ("transformers_version", "peft_version")
# The hub cache's layout: models--{owner}--{name}/snapshots/{commit}; a repo id never holds "--".
_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+)/snapshots/([0-9a-f]{40})(?:/|$)")
_HUB_REMOTE = re.compile(
    r"^\s*url\s*=\s*https?://(?:[^/@\s]+@)?(?:www\.)?huggingface\.co/([^/\s]+/[^/\s]+?)(?:\.git)?/?\s*$",
    re.MULTILINE,
)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")
"""Config keys that bound a model's context, in the order they are trusted (GPT-2 has n_positions)."""


# Files of which a saved tokenizer has at least one (fast, SentencePiece, BPE and WordPiece ones).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# What the hub accepts as a repo id: "name" or "owner/name" of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_model_sources(settings: ModelSettings) -> None:
    """The model and adapter paths, by stat alone: run before anything is hashed or loaded."""
    check_model_source(settings.model)
    if settings.adapter is not None:
        check_adapter_source(settings.adapter)


def check_model_source(model: str) -> None:
    """Refuse, by name, a --model that is neither a saved model folder nor something a hub id could be."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"cannot load model {model}: the folder holds no config.json, so it is not a saved Hugging "
                "Face model; give the folder that save_pretrained() wrote (config.json, weights, tokenizer)"
            )
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelError(
                f"cannot load model {model}: the folder holds no tokenizer ({', '.join(_TOKENIZER_FILES)}); "
                "save it beside the model with tokenizer.save_pretrained(FOLDER)"
            )
        return
    if path.exists():
        raise ModelError(
            f"cannot load model {model}: it is a file; give the model's folder (with config.json) or a hub id"
        )
    if not _HUB_ID.match(model) or len(model) > 96 or "--" in model or ".." in model:
        raise ModelError(
            f"cannot load model {model}: no such folder, and it is not a hub id either (those look like "
            "'owner/name'); check the path"
        )
    if path.parent != Path(".") and path.parent.is_dir():  # 'models/full' where ./models exists
        raise ModelError(
            f"cannot load model {model}: no such folder (though {path.parent} is one, so this is a path, not "
            "a hub id); check the path"
        )


def check_adapter_source(adapter: str) -> None:
    """Refuse an --adapter that is not a folder holding adapter_config.json, before any model loads."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"--adapter {adapter}: no such folder; give the folder PEFT's save_pretrained() wrote"
        )
    if not (path / "adapter_config.json").is_file():
        raise ModelError(
            f"--adapter {adapter} is not a PEFT adapter folder (no adapter_config.json); give the folder "
            "PEFT's save_pretrained() wrote"
        )


def resolve_location(name_or_path: str) -> str:
    """A local file or folder's absolute path (links resolved); anything else (a hub id) as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def local_folder(name_or_path: str) -> Path | None:
    """The folder holding the files of ``name_or_path``: itself if local, else the hub cache's snapshot of
    that hub id (offline: only what is already downloaded); None when there is none."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, CONFIG_NAME)
    except (ImportError, ValueError, OSError):  # no hub library, not a valid repo id, unreadable cache
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def read_config(name_or_path: str, file_name: str = CONFIG_NAME) -> dict | None:
    """The parsed ``config.json`` (or ``file_name``) of a local folder or cached hub model; None if unreadable."""
    folder = local_folder(name_or_path)
    if folder is None:
        return None
    try:
        value = json.loads((folder / file_name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def max_positions(config: dict | None) -> int | None:
    """The longest sequence the model's config allows (learned position tables end there), if it says."""
    for key in POSITION_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def config_sha256(config: dict) -> str:
    """sha256 of a config as canonical JSON (sorted keys, no whitespace), the writer's version left out."""
    kept = {key: value for key, value in config.items() if key not in _WRITER_KEYS}
    text = json.dumps(kept, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def model_identity(name_or_path: str) -> dict:
    """{config_sha256, model_type, architectures, config_name_or_path, hub_id, revision} of a model."""
    config = read_config(name_or_path)
    identity = {
        "config_sha256": None if config is None else config_sha256(config),
        "model_type": (config or {}).get("model_type"),
        "architectures": (config or {}).get("architectures"),
        "config_name_or_path": (config or {}).get("_name_or_path") or None,
    }
    return {**identity, **hub_origin(name_or_path)}


def adapter_identity(adapter_path: str) -> dict:
    """{adapter_config_sha256, peft_type, base_model_name_or_path, base_model_revision, hub_id, revision}."""
    config = read_config(adapter_path, ADAPTER_CONFIG_NAME)
    identity = {
        "adapter_config_sha256": None if config is None else config_sha256(config),
        "peft_type": (config or {}).get("peft_type"),
        "base_model_name_or_path": (config or {}).get("base_model_name_or_path"),
        "base_model_revision": (config or {}).get("revision"),
    }
    return {**identity, **hub_origin(adapter_path)}


def hub_origin(name_or_path: str) -> dict:
    """{hub_id, revision}: known from a hub id's cached snapshot, a cache snapshot path, or a git clone of a
    huggingface.co repository; None where they cannot be known offline (a plain local folder)."""
    folder = local_folder(name_or_path)
    local = Path(name_or_path).expanduser().exists()
    snapshot = _CACHE_SNAPSHOT.search(folder.as_posix()) if folder is not None else None
    if snapshot:
        repository, revision = snapshot.groups()
        return {"hub_id": repository.replace("--", "/"), "revision": revision}
    if not local:  # a hub id not in the cache: its name is known, not which revision will load
        return {"hub_id": name_or_path, "revision": None}
    return _git_origin(folder) if folder is not None else {"hub_id": None, "revision": None}


def _git_origin(folder: Path) -> dict:
    """{hub_id, revision} of a folder that is a git clone of a huggingface.co model repository."""
    git = folder / ".git"
    try:
        remotes = _HUB_REMOTE.findall((git / "config").read_text())
        head = (git / "HEAD").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return {"hub_id": None, "revision": None}
    if not remotes:
        return {"hub_id": None, "revision": None}
    return {"hub_id": remotes[0], "revision": _git_commit(git, head)}


def _git_commit(git: Path, head: str) -> str | None:
    """The commit HEAD names (a detached HEAD, a loose ref or a packed one), or None."""
    if _COMMIT.match(head):
        return head
    if not head.startswith("ref: "):
        return None
    reference = head.removeprefix("ref: ").strip()
    try:
        loose = (git / reference).read_text().strip()
        return loose if _COMMIT.match(loose) else None
    except OSError:
        pass
    try:
        packed = (git / "packed-refs").read_text().splitlines()
    except OSError:
        return None
    for line in packed:
        commit, _, name = line.partition(" ")
        if name.strip() == reference and _COMMIT.match(commit):
            return commit
    return None


def describe(identity: dict | None) -> str:
    """One line for people: architecture, config hash, hub id and revision, base model (adapters)."""
    if not identity:
        return "no portable identity recorded (built before rapidin-index recorded one)"
    parts = []
    kind = identity.get("model_type") or identity.get("peft_type")
    architectures = identity.get("architectures")
    if kind or architectures:
        parts.append(
            " ".join(filter(None, [kind, f"({', '.join(architectures)})" if architectures else None]))
        )
    config_hash = identity.get("config_sha256") or identity.get("adapter_config_sha256")
    parts.append(f"config sha256 {config_hash[:12]}" if config_hash else "config not readable")
    if identity.get("hub_id"):
        revision = identity.get("revision")
        parts.append(f"hub {identity['hub_id']}" + (f" @ {revision[:12]}" if revision else ""))
    if identity.get("base_model_name_or_path"):
        parts.append(f"for base model {identity['base_model_name_or_path']}")
    return ", ".join(parts)
