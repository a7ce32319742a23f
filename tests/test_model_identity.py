"""Where a model or adapter is and what it is: resolved paths, config hashes, hub id and revision offline."""

import json
import os
from pathlib import Path

import pytest

from rapidin_index.model_identity import (
    CONFIG_NAME,
    adapter_identity,
    config_sha256,
    describe,
    max_positions,
    model_identity,
    resolve_location,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def write_config(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, **values}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_local_folder_is_resolved_and_a_hub_id_is_kept(tmp_path, monkeypatch):
    write_config(tmp_path / "models" / "full")
    monkeypatch.chdir(tmp_path)
    assert resolve_location("./models/full") == str(tmp_path.resolve() / "models" / "full")
    assert resolve_location("models/../models/full") == str(tmp_path.resolve() / "models" / "full")
    os.symlink(tmp_path / "models" / "full", tmp_path / "link")
    assert resolve_location("link") == str(tmp_path.resolve() / "models" / "full")  # the folder, not the link
    assert resolve_location("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_the_config_hash_is_of_its_content_not_its_layout_or_writer(tmp_path):
    folder = write_config(tmp_path / "model", transformers_version="4.40.0")
    identity = model_identity(str(folder))
    assert identity["model_type"] == "llama" and identity["architectures"] == ["LlamaForCausalLM"]
    assert identity["config_name_or_path"] is None  # save_pretrained writes none; a config may name one
    assert identity["hub_id"] is None and identity["revision"] is None  # a plain folder: nothing claimed
    # the same content, indented, keys reordered and re-saved by another transformers: the same hash
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = "5.0.0"
    (folder / "config.json").write_text(json.dumps(dict(reversed(config.items())), indent=4))
    assert model_identity(str(folder))["config_sha256"] == identity["config_sha256"]
    write_config(folder, hidden_size=64)
    assert model_identity(str(folder))["config_sha256"] != identity["config_sha256"]
    assert config_sha256({"a": 1, "b": [2]}) == config_sha256({"b": [2], "a": 1, "peft_version": "0.1"})


def test_hub_id_and_revision_come_from_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repository = tmp_path / "hub" / "models--SomeOrg--tiny-model"
    snapshot = write_config(repository / "snapshots" / COMMIT, _name_or_path="SomeOrg/tiny-model")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(COMMIT)
    by_path = model_identity(str(snapshot))  # a snapshot folder given as a path
    assert (by_path["hub_id"], by_path["revision"]) == ("SomeOrg/tiny-model", COMMIT)
    assert by_path["config_name_or_path"] == "SomeOrg/tiny-model"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id = model_identity("SomeOrg/tiny-model")  # a hub id: its cached snapshot, read offline
    assert by_id == by_path
    not_cached = model_identity("SomeOrg/other-model")
    assert (not_cached["hub_id"], not_cached["revision"], not_cached["config_sha256"]) == (
        "SomeOrg/other-model",
        None,
        None,
    )


@pytest.mark.parametrize("packed", [False, True])
def test_hub_id_and_revision_come_from_a_git_clone_of_the_hub(tmp_path, packed):
    folder = write_config(tmp_path / "clone")
    git = folder / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "config").write_text(
        '[core]\n\tbare = false\n[remote "origin"]\n\turl = https://huggingface.co/SomeOrg/tiny-model\n'
        '\tfetch = +refs/heads/*:refs/remotes/origin/*\n[branch "main"]\n\tremote = origin\n'
    )
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    if packed:
        (git / "packed-refs").write_text(
            f"# pack-refs\n{OTHER_COMMIT} refs/heads/other\n{COMMIT} refs/heads/main\n"
        )
    else:
        (git / "refs" / "heads" / "main").write_text(COMMIT + "\n")
    identity = model_identity(str(folder))
    assert (identity["hub_id"], identity["revision"]) == ("SomeOrg/tiny-model", COMMIT)
    (git / "HEAD").write_text(OTHER_COMMIT)  # a detached HEAD
    assert model_identity(str(folder))["revision"] == OTHER_COMMIT
    (git / "config").write_text('[remote "origin"]\n\turl = https://github.com/SomeOrg/tiny-model.git\n')
    assert model_identity(str(folder))["hub_id"] is None  # not a hub repository: nothing claimed


def test_an_adapter_identity_names_its_base_model(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "SomeOrg/base", "revision": "v1", "r": 8}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    identity = adapter_identity(str(folder))
    assert identity["peft_type"] == "LORA" and identity["base_model_name_or_path"] == "SomeOrg/base"
    assert identity["base_model_revision"] == "v1" and identity["adapter_config_sha256"] == config_sha256(
        config
    )
    assert "for base model SomeOrg/base" in describe(identity)


def test_max_positions_reads_the_keys_configs_use():
    assert max_positions({"max_position_embeddings": 2048, "n_positions": 64}) == 2048
    assert max_positions({"n_positions": 64}) == 64  # GPT-2
    assert max_positions({"n_ctx": 128}) == 128
    assert max_positions({"hidden_size": 32}) is None and max_positions(None) is None
    assert max_positions({"n_positions": True}) is None and max_positions({"n_positions": 0}) is None


def test_describe_says_what_is_known_and_that_old_indexes_have_none(tmp_path):
    identity = {
        **model_identity(str(write_config(tmp_path / "m"))),
        "hub_id": "SomeOrg/tiny-model",
        "revision": COMMIT,
    }
    text = describe(identity)
    assert text.startswith("llama (LlamaForCausalLM), config sha256 ")
    assert text.endswith(f"hub SomeOrg/tiny-model @ {COMMIT[:12]}")
    assert "no portable identity recorded" in describe(None)
    unreadable = model_identity(str(tmp_path / "nothing-here"))
    assert "config not readable" in describe(unreadable)


def test_identity_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, rapidin_index.model_identity; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert CONFIG_NAME == "config.json"
