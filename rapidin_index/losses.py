"""Batches and their losses: right-padded (input_ids, labels) batches, and the next-token losses of each
example, shifted exactly as Hugging Face's ``model(input_ids, labels=...).loss`` shifts them.

An example's loss is the mean cross-entropy over its response tokens (labels != -100); these are the
losses whose gradients `gradients` sketches and `token_gradients` differentiates token by token.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from rapidin_index.data import IGNORE_INDEX
from rapidin_index.errors import GradientError


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, tokens]
    attention_mask: torch.Tensor  # [batch, tokens]
    labels: torch.Tensor  # [batch, tokens], IGNORE_INDEX where no loss

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(sequences: list[tuple[list[int], list[int]]], pad_token_id: int, device) -> Batch:
    """Right-pad (input_ids, labels) pairs into one batch."""
    if not sequences:
        raise GradientError("cannot collate an empty batch")
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        labels[row, : len(ids)] = torch.as_tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return Batch(input_ids.to(device), attention_mask.to(device), labels.to(device))


def token_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position, shifted as ``model(labels=...)`` shifts.

    Returns (losses [batch, tokens-1] float32, zero where masked; mask [batch, tokens-1] bool).
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    targets = batch.labels[:, 1:]  # [batch, tokens-1]
    logits = logits[:, :-1].float()  # [batch, tokens-1, vocab]
    losses = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(targets.shape)
    return losses, targets != IGNORE_INDEX


def scored_token_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`token_losses`, at the scored positions only: (losses [batch, n], mask [batch, n]).

    n covers every position whose next token is labelled in some row, in order. The model computes its
    logits there alone (``logits_to_keep``) when it takes that argument: the vocabulary projection of the
    prompt positions is skipped, forward and backward.
    """
    targets = batch.labels[:, 1:]  # [batch, tokens-1]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # [n]: logits p predict label p+1
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    if _takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits  # [batch, n, vocab]
    else:
        logits = model(**inputs).logits[:, keep]
    targets = targets[:, keep]  # [batch, n]
    losses = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).reshape(targets.shape)
    return losses, targets != IGNORE_INDEX


def _takes_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through PEFT's wrapper
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def example_losses(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean response-token loss of each example: [batch]."""
    losses, mask = scored_token_losses(model, batch)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise GradientError("an example has no loss token (empty response after truncation?)")
    return losses.sum(dim=1) / counts
