"""The index's identity: everything that must be equal for two sets of vectors to be comparable.

Built here and only here, three ways: from a loaded model and the build's settings (`index_identity`),
from the settings alone, before the model loads (`settings_identity`), and from a manifest
(`manifest_identity`, `manifest_settings_identity`). Compared here too: `differences` names each key that
differs, and the checks below refuse a request that does not match an index, each with its own message:
another K (`check_sketch_dim`), another tokenizer before the model loads (`check_tokenizer`), other
weights once it has (`check_loaded_model`), other build settings (`settings_conflicts`, then `build_conflicts`).

Nothing here imports torch at module level: the CLI runs the cheap checks before it loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rapidin_index.errors import IndexMismatchError, ModelError
from rapidin_index.store.manifest import short

if TYPE_CHECKING:
    from rapidin_index.data import Template
    from rapidin_index.models import LoadedModel
    from rapidin_index.settings import BuildSettings
    from rapidin_index.store.manifest import Manifest

# --------------------------------------------------------------------------- built


def index_identity(
    loaded: LoadedModel, settings: BuildSettings, selected, template: Template, scaling=None
) -> dict:
    """The identity of the vectors a build with ``settings`` writes (resume, append, query compare it)."""
    from rapidin_index.capture import gradient_blocks, gradient_dim
    from rapidin_index.sketch.hashed import padded_dim

    blocks = gradient_blocks(selected)
    dim = gradient_dim(blocks)
    sketch = settings.sketch.to_dict()
    output_dim = dim if settings.sketch.exact else settings.sketch.sketch_dim
    padded = dim if settings.sketch.exact else padded_dim(dim, settings.sketch.sketch_dim)
    sketch.update(gradient_dim=dim, padded_dim=padded, output_dim=output_dim)
    return {
        "model": {"fingerprint": loaded.model_fingerprint, "dtype": settings.model.dtype},
        "adapter": None if settings.model.adapter is None else {"fingerprint": loaded.adapter_fingerprint},
        "tokenizer": {"fingerprint": loaded.tokenizer_fingerprint},
        "template": template.to_dict(),
        "max_length": settings.max_length,
        "tokenization": settings.tokenization,
        "parameters": {
            "regex": settings.model.params,
            "names": [name for name, _ in selected],
            "shapes": [list(p.shape) for _, p in selected],
            "gradient_dim": dim,
        },
        "normalize": settings.normalize,
        "sketch": sketch,
        "vector_dtype": settings.vector_dtype,
        "shard": settings.shard,
        "optimizer_state": None if scaling is None else {"fingerprint": scaling.fingerprint},
    }


def settings_identity(settings: BuildSettings, template: Template) -> dict:
    """The part of the identity that needs no model: checked before the model loads."""
    return {
        "model": {"dtype": settings.model.dtype},
        "with_adapter": settings.model.adapter is not None,
        "template": template.to_dict(),
        "max_length": settings.max_length,
        "tokenization": settings.tokenization,
        "parameters": {"regex": settings.model.params},
        "normalize": settings.normalize,
        "sketch": settings.sketch.to_dict(),
        "vector_dtype": settings.vector_dtype,
        "shard": settings.shard,
        "with_optimizer_state": settings.optimizer_state is not None,
    }


def manifest_identity(manifest: Manifest) -> dict:
    """What makes two indexes interchangeable: the model, data rules and sketch, not counts or dates."""
    return {
        "model": {"fingerprint": manifest.model["fingerprint"], "dtype": manifest.model["dtype"]},
        "adapter": None if manifest.adapter is None else {"fingerprint": manifest.adapter["fingerprint"]},
        "tokenizer": {"fingerprint": manifest.tokenizer["fingerprint"]},
        "template": manifest.template,
        "max_length": manifest.max_length,
        "tokenization": manifest.tokenization,
        "parameters": manifest.parameters,
        "normalize": manifest.normalize,
        "sketch": manifest.sketch,
        "vector_dtype": manifest.vector_dtype,
        "shard": manifest.shard,
        "optimizer_state": None
        if manifest.optimizer_state is None
        else {"fingerprint": manifest.optimizer_state["fingerprint"]},
    }


def manifest_settings_identity(manifest: Manifest) -> dict:
    """`settings_identity`'s keys, read from a manifest."""
    identity = manifest_identity(manifest)
    return {
        **{key: identity[key] for key in ("template", "max_length", "tokenization", "normalize")},
        "model": {"dtype": identity["model"]["dtype"]},
        "with_adapter": identity["adapter"] is not None,
        "parameters": {"regex": identity["parameters"]["regex"]},
        "sketch": {
            key: identity["sketch"].get(key) for key in ("algorithm", "sketch_dim", "shuffle_lambda", "seed")
        },
        "vector_dtype": identity["vector_dtype"],
        "shard": identity["shard"],
        "with_optimizer_state": identity["optimizer_state"] is not None,
    }


# --------------------------------------------------------------------------- compared


def differences(expected: dict, actual: dict, prefix: str = "") -> list[str]:
    """Human-readable list of the keys whose values differ between two nested dicts."""
    found = []
    for key in sorted(set(expected) | set(actual)):
        left, right = expected.get(key), actual.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            found.extend(differences(left, right, f"{prefix}{key}."))
        elif left != right:
            found.append(f"{prefix}{key}: index has {short(left)}, asked for {short(right)}")
    return found


def build_conflicts(existing: Manifest, identity: dict) -> list[str]:
    """How a build's `index_identity` differs from the index in the folder; [] when it may resume, append
    or find nothing to do."""
    return differences(manifest_identity(existing), identity)


def settings_conflicts(existing: Manifest, requested: dict) -> list[str]:
    """`build_conflicts` before the model loads: a `settings_identity` against the index's settings."""
    return differences(manifest_settings_identity(existing), requested)


def tokenizer_conflicts(existing: Manifest, fingerprint: str) -> list[str]:
    """`build_conflicts` for the tokenizer alone (loaded before the model)."""
    return differences({"tokenizer": existing.tokenizer}, {"tokenizer": {"fingerprint": fingerprint}})


def check_sketch_dim(manifest: Manifest, sketch_dim: int | None) -> None:
    """A query's requested K (None: the index's own)."""
    if sketch_dim is not None and sketch_dim != manifest.sketch["sketch_dim"]:
        raise IndexMismatchError(
            f"index built with K={manifest.sketch['sketch_dim']}, query asked for K={sketch_dim}; "
            f"drop --k, or query an index built with --k {sketch_dim}"
        )


def check_tokenizer(manifest: Manifest, model: str) -> None:
    """Load only the tokenizer of ``model`` and refuse it if it is not the one the index was built with."""
    from rapidin_index.models import fingerprint_tokenizer, load_tokenizer

    try:
        tokenizer = load_tokenizer(model)
    except ModelError as error:
        raise ModelError(f"{error}\n{moved_model_hint(manifest)}") from None
    if fingerprint_tokenizer(tokenizer) != manifest.tokenizer["fingerprint"]:
        raise IndexMismatchError(
            f"refusing to query: tokenizer differs (vocabulary, special tokens or chat template) from the "
            f"one the index was built with (from {manifest.model['name_or_path']}); pass that model's "
            "folder with --model"
        )


def check_loaded_model(manifest: Manifest, loaded: LoadedModel) -> None:
    """Refuse a loaded model, adapter or tokenizer other than the one the index was built with."""
    problems = []
    if loaded.model_fingerprint != manifest.model["fingerprint"]:
        problems.append(
            f"model weights differ (index {manifest.model['fingerprint'][:12]}, "
            f"this model {loaded.model_fingerprint[:12]}; built from {manifest.model['name_or_path']})"
        )
    expected_adapter = (manifest.adapter or {}).get("fingerprint")
    if expected_adapter != loaded.adapter_fingerprint:
        problems.append(
            f"adapter differs (index {str(expected_adapter)[:12]}, this one {str(loaded.adapter_fingerprint)[:12]})"
        )
    if loaded.tokenizer_fingerprint != manifest.tokenizer["fingerprint"]:
        problems.append("tokenizer differs (vocabulary, special tokens or chat template)")
    if problems:
        raise IndexMismatchError("refusing to query: " + "; ".join(problems))


def moved_model_hint(manifest: Manifest) -> str:
    return (
        f"The index was built from {manifest.model['name_or_path']!r}; if the model moved, pass --model PATH "
        "(and --adapter PATH) with the same weights"
    )
