"""Tests for rapidin_index/demo/tiny_models.py: tokenizer, tiny Llama/GPT-2 and LoRA adapter built in-process."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapidin_index.demo.tiny_models import (
    make_tiny_model,
    save_lora_adapter,
    save_tiny_model,
    train_tokenizer,
)
from rapidin_index.errors import DemoError

TEXTS = [
    "Return a copy of the string converted to uppercase.",
    "Remove any common leading whitespace from every line in text.",
    "Serialize obj to a JSON formatted str.",
] * 4
SMALL = {"hidden_size": 16, "layers": 1}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """{'llama': folder, 'gpt2': folder} of tiny saved models."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        architecture: save_tiny_model(root / architecture, architecture, TEXTS, vocab_size=300, **SMALL)
        for architecture in ("llama", "gpt2")
    }


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids).logits  # [1, tokens, vocab]


# --------------------------------------------------------------------------- tokenizer


def test_the_tokenizer_round_trips_text_and_opens_with_bos():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    text = "Return a copy of the string, unseen words too: zebra!"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.convert_ids_to_tokens(ids[0]) == "<s>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: nothing is unknown
    assert tokenizer.unk_token_id not in ids
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<pad>", "</s>")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|user|>\nhi</s>\n"


def test_the_saved_tokenizer_reloads_the_same(saved):
    reloaded = AutoTokenizer.from_pretrained(saved["llama"])
    trained = train_tokenizer(TEXTS, vocab_size=300)
    text = "Serialize obj to a JSON formatted str."
    assert reloaded(text)["input_ids"] == trained(text)["input_ids"]
    assert reloaded.chat_template == trained.chat_template


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_a_saved_model_reloads_with_the_same_logits(saved, architecture):
    folder = saved[architecture]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    original = make_tiny_model(architecture, len(tokenizer), **SMALL)  # seed 0, as save_tiny_model made it
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.model_type == architecture and reloaded.config.vocab_size == len(tokenizer)
    input_ids = tokenizer("Return a copy of the string.", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(_logits(reloaded, input_ids), _logits(original, input_ids))


def test_the_seed_fixes_the_weights():
    first, again, other = (make_tiny_model("gpt2", 50, seed=seed, **SMALL) for seed in (0, 0, 1))
    weight = "transformer.wte.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_an_unknown_architecture_is_refused_by_name():
    with pytest.raises(DemoError, match="unknown tiny architecture 'mamba': use 'llama' or 'gpt2'"):
        make_tiny_model("mamba", 50)


# --------------------------------------------------------------------------- LoRA adapter


@pytest.mark.parametrize(
    ("architecture", "targets"), [("llama", {"q_proj", "v_proj", "up_proj"}), ("gpt2", {"c_attn", "c_fc"})]
)
def test_the_lora_adapter_loads_in_peft_and_changes_the_model(saved, tmp_path, architecture, targets):
    from peft import PeftModel

    adapter = save_lora_adapter(saved[architecture], tmp_path / "lora", rank=2)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == targets and config["r"] == 2
    base = AutoModelForCausalLM.from_pretrained(saved[architecture])
    input_ids = torch.tensor([[2, 10, 11, 12]])
    before = _logits(base, input_ids)
    adapted = PeftModel.from_pretrained(base, adapter)
    assert not torch.allclose(_logits(adapted, input_ids), before)  # A and B are both non-zero
