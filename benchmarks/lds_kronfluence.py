"""kronfluence's EK-FAC influence scores for benchmarks/lds.py (imported only when kronfluence is installed).

The task's loss is the project's: each example's mean next-token cross-entropy over its response
tokens, summed over the batch (kronfluence's convention); the true-Fisher variant samples the labels
from the model. Every nn.Linear of the model is tracked (kronfluence supports Linear and Conv2d, so
the embedding and norm weights that TracIn and RapidIn also attribute are left out). A positive score
means training on the row lowers the query's loss, the same sign as TracIn's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs

from rapidin_index.data import Template
from rapidin_index.demo.finetune import tokenize_rows

IGNORE_INDEX = -100


class ResponseLossTask(Task):
    def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()  # [batch, tokens - 1, vocab]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        if sample:
            with torch.no_grad():
                sampled = torch.distributions.Categorical(logits=logits).sample()
            labels = torch.where(mask, sampled, labels)
        losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return (losses.sum(dim=1) / mask.sum(dim=1)).sum()

    def compute_measurement(self, batch, model) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def _dataset(rows: list[dict], tokenizer) -> list[dict]:
    return [
        {"input_ids": ids, "labels": labels}
        for ids, labels in tokenize_rows(rows, tokenizer, Template("alpaca"), 128)
    ]


def _collate(pad_token_id: int):
    def collate(items: list[dict]) -> dict:
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            count = len(item["input_ids"])
            input_ids[row, :count] = torch.tensor(item["input_ids"])
            labels[row, :count] = torch.tensor(item["labels"])
            attention_mask[row, :count] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    return collate


def ekfac_scores(model_dir: Path, train: list[dict], queries: list[dict], output_dir: Path) -> np.ndarray:
    """[queries, rows] EK-FAC influence of every training row on every query's loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    task = ResponseLossTask()
    model = prepare_model(model, task)
    analyzer = Analyzer("lds", model, task, cpu=True, disable_tqdm=True, output_dir=str(output_dir))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=_collate(tokenizer.pad_token_id)))
    train_dataset, query_dataset = _dataset(train, tokenizer), _dataset(queries, tokenizer)
    analyzer.fit_all_factors(
        "ekfac",
        train_dataset,
        per_device_batch_size=16,
        factor_args=FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        "ekfac",
        "ekfac",
        query_dataset,
        train_dataset,
        per_device_query_batch_size=16,
        per_device_train_batch_size=32,
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores("ekfac")["all_modules"].double().numpy()
