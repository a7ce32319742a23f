"""The index identity (store/identity.py): built from a manifest, compared, and the checks that refuse another
K, tokenizer, model or build settings."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from conftest import build_word_tokenizer, copy_with_other_chat_template, small_manifest
from transformers import GPT2Config

from rapidin_index.errors import IndexMismatchError, ModelError
from rapidin_index.models import fingerprint_tokenizer, load_tokenizer
from rapidin_index.store.identity import (
    build_conflicts,
    check_loaded_model,
    check_sketch_dim,
    check_tokenizer,
    differences,
    manifest_identity,
    moved_model_hint,
    settings_conflicts,
)

# --------------------------------------------------------------------------- differences


def test_differences_name_each_changed_key_by_its_path():
    expected = {"sketch": {"sketch_dim": 4096, "seed": 42}, "normalize": "layer", "gone": 1}
    actual = {"sketch": {"sketch_dim": 8192, "seed": 42}, "normalize": "layer", "new": [1]}
    assert differences(expected, actual) == [
        "gone: index has 1, asked for null",
        "new: index has null, asked for [1]",
        "sketch.sketch_dim: index has 4096, asked for 8192",
    ]
    assert differences(expected, expected) == []


def test_differences_shorten_long_values():
    (line,) = differences({"names": ["x" * 200]}, {"names": []})
    shown = line.split("index has ")[1].split(", asked for")[0]
    assert len(shown) == 80 and shown.endswith("...")


# --------------------------------------------------------------------------- identity


def test_identity_ignores_counts_dates_files_and_where_the_model_lives():
    manifest = small_manifest()
    other = replace(
        manifest,
        model={**manifest.model, "name_or_path": "/moved/tiny"},
        row_count=9,
        generation=4,
        files={"vectors-g0004.faiss": {"sha256": "x", "bytes": 1}},
        sources=[{"path": "b", "sha256": "y", "id_offset": 0, "rows": 9}],
        created_at="2000-01-01",
    )
    assert manifest_identity(other) == manifest_identity(manifest)


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"name_or_path": "/models/tiny", "fingerprint": "other", "dtype": "float32"}},
        {"adapter": {"path": "/adapter", "fingerprint": "lora-sha"}},
        {"tokenizer": {"fingerprint": "other", "chat_template_sha256": None}},
        {"sketch": {"sketch_dim": 8192, "seed": 42}},
        {"vector_dtype": "float16"},
        {"tokenization": "joint"},
        {"shard": {"index": 0, "count": 2}},
        {"max_length": 512},
        {"normalize": "none"},
    ],
)
def test_identity_changes_with_what_makes_vectors_different(change):
    assert manifest_identity(small_manifest(**change)) != manifest_identity(small_manifest())


def test_identity_keeps_only_the_adapters_fingerprint():
    one = small_manifest(adapter={"path": "/a", "fingerprint": "lora-sha"})
    moved = small_manifest(adapter={"path": "/b", "fingerprint": "lora-sha"})
    assert manifest_identity(one)["adapter"] == {"fingerprint": "lora-sha"}
    assert manifest_identity(one) == manifest_identity(moved)
    assert manifest_identity(small_manifest())["adapter"] is None


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture
def tokenizer_folder(tmp_path):
    """A folder load_tokenizer accepts (config.json + tokenizer), without model weights."""
    folder = tmp_path / "model"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(folder)
    build_word_tokenizer().save_pretrained(folder)
    return folder


def test_check_tokenizer_accepts_the_one_the_index_was_built_with(tokenizer_folder):
    fingerprint = fingerprint_tokenizer(load_tokenizer(str(tokenizer_folder)))
    manifest = small_manifest(tokenizer={"fingerprint": fingerprint})
    assert check_tokenizer(manifest, str(tokenizer_folder)) is None


def test_check_tokenizer_refuses_another_chat_template(tokenizer_folder, tmp_path):
    fingerprint = fingerprint_tokenizer(load_tokenizer(str(tokenizer_folder)))
    manifest = small_manifest(tokenizer={"fingerprint": fingerprint})
    other = copy_with_other_chat_template(str(tokenizer_folder), tmp_path / "other")
    with pytest.raises(IndexMismatchError, match="tokenizer differs .*from /models/tiny.*--model"):
        check_tokenizer(manifest, other)


def test_a_model_that_cannot_load_gets_the_moved_model_hint(tmp_path):
    missing = str(tmp_path / "gone")
    with pytest.raises(ModelError) as raised:
        check_tokenizer(small_manifest(tokenizer={"fingerprint": "tokenizer-sha"}), missing)
    assert missing in str(raised.value)
    assert moved_model_hint(small_manifest(tokenizer={"fingerprint": "tokenizer-sha"})) in str(raised.value)
    assert "'/models/tiny'" in moved_model_hint(small_manifest(tokenizer={"fingerprint": "tokenizer-sha"}))


# --------------------------------------------------------------------------- the checks


def test_check_sketch_dim_refuses_another_k_and_names_both():
    with pytest.raises(IndexMismatchError, match="built with K=4096, query asked for K=8192; drop --k"):
        check_sketch_dim(small_manifest(), 8192)
    assert check_sketch_dim(small_manifest(), 4096) is None
    assert check_sketch_dim(small_manifest(), None) is None


def _loaded(model="model-sha", adapter=None, tokenizer="tokenizer-sha"):
    return SimpleNamespace(
        model_fingerprint=model, adapter_fingerprint=adapter, tokenizer_fingerprint=tokenizer
    )


def test_check_loaded_model_names_every_part_that_differs():
    assert check_loaded_model(small_manifest(), _loaded()) is None
    with pytest.raises(IndexMismatchError) as refused:
        check_loaded_model(
            small_manifest(), _loaded(model="other-weights", adapter="lora", tokenizer="other")
        )
    message = str(refused.value)
    assert message.startswith(
        "refusing to query: model weights differ (index model-sha, this model other-weigh"
    )
    assert "adapter differs (index None, this one lora)" in message and "tokenizer differs" in message


def test_build_conflicts_compare_a_requested_identity_with_the_manifests():
    manifest = small_manifest()
    assert build_conflicts(manifest, manifest_identity(manifest)) == []
    other = manifest_identity(replace(manifest, normalize="none"))
    assert build_conflicts(manifest, other) == ['normalize: index has "layer", asked for "none"']


def test_settings_conflicts_read_only_what_needs_no_model():
    manifest = small_manifest(sketch={**small_manifest().sketch, "algorithm": "rapidgrad-v2"})
    requested = {
        "model": {"dtype": "float32"},
        "with_adapter": False,
        "template": {"name": "alpaca"},
        "max_length": 256,
        "tokenization": "separate",
        "parameters": {"regex": ".*"},
        "normalize": "layer",
        "sketch": {"algorithm": "rapidgrad-v2", "sketch_dim": 4096, "shuffle_lambda": 20, "seed": 42},
        "vector_dtype": "float32",
        "shard": None,
        "with_optimizer_state": False,
    }
    assert settings_conflicts(manifest, requested) == []
    requested["sketch"]["seed"] = 7
    assert settings_conflicts(manifest, requested) == ["sketch.seed: index has 42, asked for 7"]
