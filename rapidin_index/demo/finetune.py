"""Fine-tune a tiny causal LM on CPU, the way the demo and benchmarks make a model to attribute.

`finetune` trains a BPE tokenizer on the rows, builds a tiny Llama (or GPT-2) from its config class,
tokenizes the rows exactly as the index will (`data.render_row` + `data.tokenize_example`: loss on
the response tokens only) and trains with AdamW: all weights, or (``lora=True``) a LoRA adapter on a
base model first pre-trained on the clean rows only. `attack_success_rate` measures whether the
backdoor of `demo_data.make_backdoor_dataset` fires, by greedy generation from the rendered prompt.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rapidin_index.data import (
    IGNORE_INDEX,
    Template,
    parse_template,
    prompt_token_ids,
    render_row,
    tokenize_example,
)
from rapidin_index.demo.datasets import is_backdoor_response
from rapidin_index.demo.tiny_models import make_tiny_model, train_tokenizer
from rapidin_index.errors import FinetuneError, RowError
from rapidin_index.losses import collate, example_losses
from rapidin_index.progress import RowProgress

REPORT_FILE = "finetune_report.json"
OPTIMIZER_FILE = "optimizer.pt"
"""The AdamW state of the last run, saved as a Hugging Face Trainer checkpoint saves it."""


@dataclass
class FinetuneSettings:
    """A tiny model and its training run; the defaults are the demo's backdoor setup."""

    architecture: str = "llama"
    """'llama' or 'gpt2' (built in-process from its transformers config class)."""
    hidden_size: int = 64
    """Model width; the MLP is twice as wide and attention has 4 heads."""
    layers: int = 2
    """Number of transformer blocks."""
    vocab_size: int = 2000
    """Size of the BPE vocabulary trained on the rows."""
    epochs: int = 3
    """Passes over the rows (in LoRA mode: of the adapter training)."""
    learning_rate: float = 3e-3
    """AdamW peak learning rate, decayed linearly to a tenth over the run."""
    batch_size: int = 8
    """Rows per optimizer step (small batches: more updates for the same compute)."""
    max_length: int = 128
    """Rows are cut to this many tokens, as the index cuts them with --max-length."""
    seed: int = 0
    """Fixes the weights' initialisation and the order of the rows in every epoch."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lora: bool = False
    """Train a LoRA adapter on a base model pre-trained on the clean rows, instead of all weights."""
    lora_rank: int = 8
    """LoRA rank r (on every linear layer but the output head)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_learning_rate: float = 1e-2
    """AdamW peak learning rate of the adapter."""
    base_epochs: int = 2
    """LoRA mode: epochs of full pre-training of the base on the clean rows (poisoned/perturbed left out)."""
    threads: int | None = 1
    """CPU threads torch uses while training (restored afterwards); None keeps torch's setting. One
    thread is the fastest for models this small, and many times faster on a busy machine."""


@dataclass
class FinetuneReport:
    """Where the model went and how training went."""

    model_dir: str
    """Model and tokenizer (save_pretrained); in LoRA mode the base model, output_dir/base."""
    adapter_dir: str | None
    """LoRA mode: the PEFT adapter, output_dir/adapter (with a copy of the tokenizer); else None."""
    rows: int
    response_tokens: int
    """Tokens with a loss, in one pass over the rows."""
    steps: int
    seconds: float
    parameter_count: int
    """All parameters of the model (base + adapter in LoRA mode)."""
    trainable_parameter_count: int
    epoch_losses: list[float]
    """Mean training loss of each epoch (of the adapter in LoRA mode)."""
    base_epoch_losses: list[float] = field(default_factory=list)
    """LoRA mode: mean loss of each epoch of the base's pre-training on the clean rows."""
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(
    rows: list[dict],
    output_dir: str | Path,
    settings: FinetuneSettings | None = None,
    template: str | Template = "alpaca",
    progress: bool = True,
    tokenizer=None,
) -> FinetuneReport:
    """Train a tokenizer and a tiny model on `rows`, save both to `output_dir`, return the report.

    Deterministic given ``settings.seed`` (same rows and settings -> the same weights, on one machine).
    ``tokenizer``: use this one instead of training one on the rows, e.g. so that models trained on
    subsets of a data set (benchmarks/lds.py) share one vocabulary and their losses compare.
    """
    if not rows:
        raise FinetuneError("no rows to fine-tune on")
    settings = settings or FinetuneSettings()
    template = parse_template(template) if isinstance(template, str) else template
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own bar covers training; saving is instant
    with torch_threads(settings.threads):
        return _finetune(rows, Path(output_dir), settings, template, progress, tokenizer)


def _finetune(rows, output_dir, settings, template, progress, tokenizer):
    started = time.perf_counter()
    if tokenizer is None:
        tokenizer = row_tokenizer(rows, settings.vocab_size, template)
    sequences = tokenize_rows(rows, tokenizer, template, settings.max_length)
    model = make_tiny_model(
        settings.architecture, len(tokenizer), settings.hidden_size, settings.layers, settings.seed
    )
    if settings.lora:
        return _finetune_lora(rows, sequences, model, tokenizer, output_dir, settings, progress, started)
    epoch_losses, steps, optimizer = _train(
        model, sequences, tokenizer.pad_token_id, settings, settings.epochs, settings.learning_rate, progress
    )
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    torch.save(optimizer.state_dict(), output_dir / OPTIMIZER_FILE)  # as a Trainer checkpoint keeps it
    report = _report(model, str(output_dir), None, sequences, steps, started, epoch_losses, settings)
    (output_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _finetune_lora(rows, sequences, model, tokenizer, output_dir, settings, progress, started):
    from peft import LoraConfig, get_peft_model

    clean = [
        seq
        for seq, row in zip(sequences, rows, strict=True)
        if not (row.get("poisoned") or row.get("perturbed"))
    ]
    base_losses, base_steps, _ = _train(
        model, clean, tokenizer.pad_token_id, settings, settings.base_epochs, settings.learning_rate, progress
    )
    base_dir, adapter_dir = output_dir / "base", output_dir / "adapter"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(settings.seed)  # the adapter's initialisation
    config = LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, target_modules="all-linear", lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    pad = tokenizer.pad_token_id
    epoch_losses, steps, optimizer = _train(
        peft_model, sequences, pad, settings, settings.epochs, settings.lora_learning_rate, progress
    )
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    torch.save(optimizer.state_dict(), adapter_dir / OPTIMIZER_FILE)  # the adapter's own Adam moments
    steps += base_steps
    report = _report(
        peft_model, str(base_dir), str(adapter_dir), sequences, steps, started, epoch_losses, settings
    )
    report.base_epoch_losses = base_losses
    (output_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


@contextmanager
def torch_threads(threads: int | None):
    """Run the block with torch using `threads` CPU threads (None: unchanged), then restore the setting."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _report(model, model_dir, adapter_dir, sequences, steps, started, epoch_losses, settings):
    return FinetuneReport(
        model_dir=model_dir,
        adapter_dir=adapter_dir,
        rows=len(sequences),
        response_tokens=sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in sequences),
        steps=steps,
        seconds=round(time.perf_counter() - started, 2),
        parameter_count=sum(p.numel() for p in model.parameters()),
        trainable_parameter_count=sum(p.numel() for p in model.parameters() if p.requires_grad),
        epoch_losses=epoch_losses,
        settings=asdict(settings),
    )


def row_tokenizer(rows: list[dict], vocab_size: int = 2000, template: str | Template = "alpaca"):
    """The BPE tokenizer `finetune` trains on these rows (on their rendered text)."""
    template = parse_template(template) if isinstance(template, str) else template
    return train_tokenizer(_tokenizer_texts(rows, template), vocab_size)


def _tokenizer_texts(rows: list[dict], template: Template) -> list[str]:
    """The rendered rows (so the prompt template's words get their own tokens), else their text fields."""
    texts = []
    for row in rows:
        try:
            prompt, response = render_row(row, None, template)
            texts.append(prompt + response)
        except RowError:  # e.g. chat rows, which need the tokenizer being trained
            texts.append(" ".join(str(value) for value in row.values() if isinstance(value, str)))
    return texts


def tokenize_rows(rows: list[dict], tokenizer, template: Template, max_length: int):
    """(input_ids, labels) per row, exactly as the index tokenizes them (labels -100 off the response)."""
    sequences = []
    for example_id, row in enumerate(rows):
        try:
            input_ids, labels, _ = tokenize_example(
                render_row(row, tokenizer, template), None, tokenizer, max_length
            )
        except RowError as error:
            raise FinetuneError(f"row {example_id} cannot be trained on: {error}") from error
        sequences.append((input_ids, labels))
    return sequences


def _train(model, sequences, pad_token_id, settings, epochs, learning_rate, progress):
    """AdamW over shuffled batches (order from a generator seeded with settings.seed), linear decay.

    Returns (mean loss of each epoch, optimizer steps, the optimizer: its state is saved as a Trainer
    checkpoint's optimizer.pt, for `build --optimizer-state`)."""
    generator = torch.Generator().manual_seed(settings.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=settings.weight_decay)
    total_steps = max(1, epochs * math.ceil(len(sequences) / settings.batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - 0.9 * step / total_steps)
    model.train()
    epoch_losses, steps = [], 0
    with RowProgress(epochs * len(sequences), "fine-tuning", enabled=progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(sequences), generator=generator).tolist()
            losses = []
            for start in range(0, len(order), settings.batch_size):
                chunk = [sequences[i] for i in order[start : start + settings.batch_size]]
                loss = example_losses(model, collate(chunk, pad_token_id, "cpu")).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                steps += 1
                bar.advance(len(chunk), sum(len(ids) for ids, _ in chunk))
            epoch_losses.append(sum(losses) / len(losses))
    model.eval()
    return epoch_losses, steps, optimizer


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int = 12,
    template: str | Template = "alpaca",
    batch_size: int = 32,
    threads: int | None = 1,
) -> list[str]:
    """Greedy continuations of each row's rendered prompt (its response field is ignored)."""
    template = parse_template(template) if isinstance(template, str) else template
    model.eval()
    with torch_threads(threads):
        return _generate(model, tokenizer, rows, max_new_tokens, template, batch_size)


def _generate(model, tokenizer, rows, max_new_tokens, template, batch_size):
    responses = []
    for start in range(0, len(rows), batch_size):
        rendered = [render_row(row, tokenizer, template) for row in rows[start : start + batch_size]]
        encoded = [  # the prompt ids a training row has (TRL's rule, as the index tokenizes)
            prompt_token_ids(r.generation_prompt or r.prompt, tokenizer, r.chat) for r in rendered
        ]
        length = max(len(ids) for ids in encoded)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in encoded])  # left padding
        attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in encoded])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        responses += tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
    return responses


@torch.no_grad()
def response_losses(
    model,
    tokenizer,
    rows: list[dict],
    template: str | Template = "alpaca",
    max_length: int = 128,
    batch_size: int = 32,
    threads: int | None = 1,
) -> list[float]:
    """Mean loss over each row's response tokens, tokenized as training and the index tokenize it."""
    template = parse_template(template) if isinstance(template, str) else template
    sequences = tokenize_rows(rows, tokenizer, template, max_length)
    model.eval()
    losses = []
    with torch_threads(threads):
        for start in range(0, len(sequences), batch_size):
            batch = collate(sequences[start : start + batch_size], tokenizer.pad_token_id, "cpu")
            losses += example_losses(model, batch).tolist()
    return losses


def attack_success_rate(
    model,
    tokenizer,
    rows: list[dict],
    max_new_tokens: int = 12,
    template: str | Template = "alpaca",
    fired: Callable[[str], bool] = is_backdoor_response,
) -> float:
    """Share of `rows` whose greedy generation is in the backdoor style: `fired(generation)`.

    On held-out triggered prompts this is the attack success rate; on clean prompts, the false-trigger
    rate. `fired` is the style's detector: `is_backdoor_response` (the lexical set, the default) or
    `is_fable_response` (the non-lexical one; `demo_data.BACKDOOR_DATASETS` pairs each set with its own).
    """
    if not rows:
        raise FinetuneError("no rows to generate from")
    responses = generate_responses(model, tokenizer, rows, max_new_tokens, template)
    return sum(map(fired, responses)) / len(responses)
