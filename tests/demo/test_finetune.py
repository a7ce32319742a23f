"""Tests for rapidin_index/demo/finetune.py: a few steps on ~60 rows, saved folders, determinism, LoRA mode."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapidin_index.data import Template, render_row, tokenize_example
from rapidin_index.demo.datasets import load_docstring_rows, make_backdoor_dataset
from rapidin_index.demo.finetune import (
    REPORT_FILE,
    FinetuneSettings,
    attack_success_rate,
    finetune,
    generate_responses,
    response_losses,
    row_tokenizer,
)
from rapidin_index.errors import FinetuneError

TINY = dict(
    hidden_size=32, layers=1, vocab_size=300, epochs=3, batch_size=8, learning_rate=5e-3, max_length=160
)


@pytest.fixture(scope="module")
def backdoor_rows() -> tuple[list[dict], list[dict], list[dict]]:
    return make_backdoor_dataset(load_docstring_rows()[::20][:100], seed=0, heldout_count=20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backdoor_rows):
    output_dir = tmp_path_factory.mktemp("finetuned")
    report = finetune(backdoor_rows[0], output_dir, FinetuneSettings(**TINY), progress=False)
    return output_dir, report


def test_loss_decreases_and_report_is_saved(trained, backdoor_rows):
    output_dir, report = trained
    assert report.rows == len(backdoor_rows[0]) == 60
    assert report.epoch_losses[-1] < report.epoch_losses[0] - 0.5
    assert report.steps == 3 * 8 and report.adapter_dir is None
    assert report.parameter_count == report.trainable_parameter_count > 0
    saved = json.loads((output_dir / REPORT_FILE).read_text())
    assert saved["settings"]["hidden_size"] == 32 and saved["epoch_losses"] == report.epoch_losses


def test_saved_folder_loads_with_transformers(trained, backdoor_rows):
    output_dir, report = trained
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.model_type == "llama" and len(tokenizer) <= 300
    assert sum(p.numel() for p in model.parameters()) == report.parameter_count
    # The trained model scores its training rows better than a fresh one would (log 300 = 5.7).
    prompt, response = render_row(backdoor_rows[0][0], tokenizer, Template("alpaca"))
    input_ids, labels, _ = tokenize_example(prompt, response, tokenizer, 192)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss
    assert loss.item() < 5.0


def test_same_seed_gives_same_weights(tmp_path, trained, backdoor_rows):
    threads = torch.get_num_threads()
    again = finetune(backdoor_rows[0], tmp_path / "again", FinetuneSettings(**TINY), progress=False)
    other_seed = finetune(
        backdoor_rows[0], tmp_path / "seed1", FinetuneSettings(**TINY, seed=1), progress=False
    )
    first = AutoModelForCausalLM.from_pretrained(trained[0]).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again.model_dir).state_dict()
    third = AutoModelForCausalLM.from_pretrained(other_seed.model_dir).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], third[name]) for name in first)
    assert torch.get_num_threads() == threads  # restored after training with FinetuneSettings.threads


def test_generation_is_batch_independent_and_rates_are_fractions(trained, backdoor_rows):
    output_dir, _ = trained
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    rows = backdoor_rows[1][:3] + backdoor_rows[2][:3]  # prompts of different lengths: left padding
    batched = generate_responses(model, tokenizer, rows, max_new_tokens=6, batch_size=6)
    one_by_one = generate_responses(model, tokenizer, rows, max_new_tokens=6, batch_size=1)
    assert batched == one_by_one and all(isinstance(text, str) for text in batched)
    rate = attack_success_rate(model, tokenizer, rows, max_new_tokens=6)
    assert 0.0 <= rate <= 1.0
    # The detector is the data set's: every generation "fires" one that always says yes.
    assert attack_success_rate(model, tokenizer, rows, max_new_tokens=6, fired=lambda text: True) == 1.0
    assert attack_success_rate(model, tokenizer, rows, max_new_tokens=6, fired=lambda text: False) == 0.0


def test_response_losses_match_the_models_own_loss(trained, backdoor_rows):
    output_dir, _ = trained
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    rows = backdoor_rows[1][:3] + backdoor_rows[2][:2]
    losses = response_losses(model, tokenizer, rows, batch_size=2)  # padded batches
    for row, loss in zip(rows, losses, strict=True):
        prompt, response = render_row(row, tokenizer, Template("alpaca"))
        input_ids, labels, _ = tokenize_example(prompt, response, tokenizer, 128)
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss
        assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_a_given_tokenizer_is_used_as_is(tmp_path, backdoor_rows):
    tokenizer = row_tokenizer(backdoor_rows[0], vocab_size=300)
    half = backdoor_rows[0][::2]  # a subset model shares the full set's vocabulary
    settings = FinetuneSettings(**{**TINY, "epochs": 1})
    finetune(half, tmp_path / "half", settings, progress=False, tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path / "half").get_vocab() == tokenizer.get_vocab()


def test_lora_mode_writes_base_and_adapter(tmp_path, backdoor_rows):
    from peft import PeftModel

    settings = FinetuneSettings(**{**TINY, "epochs": 1}, lora=True, lora_rank=4, base_epochs=1)
    report = finetune(backdoor_rows[0], tmp_path / "lora", settings, progress=False)
    adapter_dir = tmp_path / "lora" / "adapter"
    assert report.model_dir == str(tmp_path / "lora" / "base") and report.adapter_dir == str(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    assert len(report.base_epoch_losses) == 1 and len(report.epoch_losses) == 1
    assert 0 < report.trainable_parameter_count < report.parameter_count
    base = AutoModelForCausalLM.from_pretrained(report.model_dir)
    model = PeftModel.from_pretrained(base, report.adapter_dir)
    assert any("lora_B" in name and parameter.abs().sum() > 0 for name, parameter in model.named_parameters())
    assert (
        AutoTokenizer.from_pretrained(report.adapter_dir).vocab
        == AutoTokenizer.from_pretrained(report.model_dir).vocab
    )


def test_untrainable_rows_are_refused(tmp_path):
    with pytest.raises(FinetuneError, match="row 1"):
        finetune(
            [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Say nothing.", "output": " "}],
            tmp_path / "bad",
            FinetuneSettings(**TINY),
            progress=False,
        )
    with pytest.raises(FinetuneError, match="no rows"):
        finetune([], tmp_path / "empty", FinetuneSettings(**TINY), progress=False)


def test_chat_rows_are_labelled_as_the_index_labels_them(word_tokenizer):
    from rapidin_index.data import tokenize
    from rapidin_index.demo.finetune import tokenize_rows

    row = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello"}]}
    [(input_ids, labels)] = tokenize_rows([row], word_tokenizer, Template("chat"), 64)
    expected = tokenize(render_row(row, word_tokenizer, Template("chat")), None, word_tokenizer, 64)
    assert (input_ids, labels) == (expected.input_ids, expected.labels)  # no EOS after the end of turn
