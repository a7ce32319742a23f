"""Model loading, parameter selection and the fingerprints the manifest relies on."""

import shutil

import pytest
import torch
from conftest import copy_with_other_chat_template
from transformers import AutoModelForCausalLM

from rapidin_index.errors import ModelError
from rapidin_index.models import load_model, select_parameters
from rapidin_index.settings import ModelSettings


def test_selection_without_adapter_is_every_parameter_and_with_adapter_only_lora(tiny_model_dirs):
    settings = ModelSettings(tiny_model_dirs["llama"])
    loaded = load_model(settings)
    selected = select_parameters(loaded.model, settings)
    assert len(selected) == len(list(loaded.model.parameters()))
    assert not loaded.model.training
    lora = ModelSettings(tiny_model_dirs["llama"], tiny_model_dirs["llama_lora"])
    loaded = load_model(lora)
    names = [name for name, _ in select_parameters(loaded.model, lora)]
    assert names and all("lora_A" in name or "lora_B" in name for name in names)
    frozen = [p for name, p in loaded.model.named_parameters() if "lora_" not in name]
    assert not any(p.requires_grad for p in frozen)


def test_fingerprints_change_with_weights_adapter_and_tokenizer(tmp_path, tiny_model_dirs):
    base = load_model(ModelSettings(tiny_model_dirs["llama"], tiny_model_dirs["llama_lora"]))
    again = load_model(ModelSettings(tiny_model_dirs["llama"], tiny_model_dirs["llama_lora"]))
    assert (base.model_fingerprint, base.adapter_fingerprint, base.tokenizer_fingerprint) == (
        again.model_fingerprint,
        again.adapter_fingerprint,
        again.tokenizer_fingerprint,
    )
    # weights: one number changed
    changed_model = tmp_path / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    model.save_pretrained(changed_model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_model_dirs['llama']}/{name}", changed_model / name)
    assert load_model(ModelSettings(str(changed_model))).model_fingerprint != base.model_fingerprint
    # adapter: one LoRA tensor changed
    changed_adapter = tmp_path / "adapter"
    shutil.copytree(tiny_model_dirs["llama_lora"], changed_adapter)
    from safetensors.torch import load_file, save_file

    tensors = load_file(changed_adapter / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, changed_adapter / "adapter_model.safetensors")
    changed = load_model(ModelSettings(tiny_model_dirs["llama"], str(changed_adapter)))
    assert changed.adapter_fingerprint != base.adapter_fingerprint
    assert changed.model_fingerprint == base.model_fingerprint
    # tokenizer: the chat template changed
    changed_tokenizer = copy_with_other_chat_template(tiny_model_dirs["llama"], tmp_path / "tokenizer_model")
    changed = load_model(ModelSettings(changed_tokenizer))
    assert changed.tokenizer_fingerprint != base.tokenizer_fingerprint
    assert changed.model_fingerprint == base.model_fingerprint


def test_bad_model_settings_are_refused(tmp_path, tiny_model_dirs):
    with pytest.raises(ModelError, match="--dtype"):
        ModelSettings("x", dtype="float8")
    with pytest.raises(ModelError, match="regular expression"):
        ModelSettings("x", params="(")
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(ModelSettings(str(tmp_path / "nowhere")))
    with pytest.raises(ModelError, match="not a PEFT adapter"):
        load_model(ModelSettings(tiny_model_dirs["llama"], str(tmp_path)))
    settings = ModelSettings(tiny_model_dirs["llama"], params="no_such_parameter")
    with pytest.raises(ModelError, match="selects no parameter"):
        select_parameters(load_model(settings).model, settings)
