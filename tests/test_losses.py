"""Batches and losses against Hugging Face's own ``model(input_ids, labels=...).loss``."""

from __future__ import annotations

import pytest
import torch

from rapidin_index.data import IGNORE_INDEX
from rapidin_index.errors import GradientError
from rapidin_index.losses import collate, example_losses, scored_token_losses, token_losses
from rapidin_index.models import load_model
from rapidin_index.settings import ModelSettings

PAIRS = [
    ([2, 11, 12, 13, 14, 15], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 13, 14, 15]),
    ([2, 21, 22, 23], [IGNORE_INDEX, IGNORE_INDEX, 22, 23]),
    ([2, 31, 32, 33, 34], [IGNORE_INDEX, 31, 32, IGNORE_INDEX, 34]),
]


def test_collate_right_pads_ids_labels_and_mask():
    batch = collate(PAIRS, pad_token_id=0, device="cpu")
    assert batch.size == 3 and batch.input_ids.shape == (3, 6)
    assert batch.input_ids[1].tolist() == [2, 21, 22, 23, 0, 0]
    assert batch.labels[1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 22, 23, IGNORE_INDEX, IGNORE_INDEX]
    assert batch.attention_mask.sum(dim=1).tolist() == [6, 4, 5]
    with pytest.raises(GradientError, match="empty batch"):
        collate([], 0, "cpu")


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_each_example_loss_is_hugging_faces_loss(tiny_model_dirs, architecture):
    model = load_model(ModelSettings(tiny_model_dirs[architecture])).model
    batch = collate(PAIRS, pad_token_id=0, device="cpu")
    with torch.no_grad():
        found = example_losses(model, batch)
        for row, (ids, labels) in enumerate(PAIRS):
            expected = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            torch.testing.assert_close(found[row], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_scored_token_losses_are_the_token_losses_at_the_scored_positions(tiny_model_dirs, architecture):
    model = load_model(ModelSettings(tiny_model_dirs[architecture])).model
    batch = collate(PAIRS, pad_token_id=0, device="cpu")
    with torch.no_grad():
        every, mask = token_losses(model, batch)  # [3, 5]
        scored, scored_mask = scored_token_losses(model, batch)
    keep = mask.any(dim=0)  # positions whose next token is labelled in some row
    torch.testing.assert_close(scored, every[:, keep], rtol=1e-5, atol=1e-6)
    assert torch.equal(scored_mask, mask[:, keep])
    assert bool((every[~mask] == 0).all())  # masked positions carry no loss
