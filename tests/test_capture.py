"""The capture stage (capture.py): which modules get a per-example rule, and that the rebuilt gradients
equal one plain backward per example, with padding and a batch of several."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rapidin_index.capture import GradientCapture, _module_kind, gradient_blocks, gradient_dim
from rapidin_index.errors import GradientError
from rapidin_index.factors import factors_gradient


class OwnForwardLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class OwnForwardEmbedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 3


def test_only_textbook_forwards_get_a_rule():
    assert _module_kind(nn.Linear(3, 2), "weight", nn.Linear(3, 2).weight) == "linear"
    assert _module_kind(Conv1D(2, 3), "weight", Conv1D(2, 3).weight) == "conv1d"
    embedding = nn.Embedding(5, 3)
    assert _module_kind(embedding, "weight", embedding.weight) == "embedding"
    norm = nn.LayerNorm(3)
    assert _module_kind(norm, "weight", norm.weight) == "norm"
    assert _module_kind(OwnForwardLinear(3, 2), "weight", OwnForwardLinear(3, 2).weight) is None
    assert _module_kind(OwnForwardEmbedding(5, 3), "weight", OwnForwardEmbedding(5, 3).weight) is None
    conv = nn.Conv1d(2, 2, 1)
    assert _module_kind(conv, "weight", conv.weight) is None


class Tiny(nn.Module):
    """Embedding -> LayerNorm -> Linear -> Linear, a loss per example over its unpadded tokens."""

    def __init__(self, scaled: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = OwnForwardEmbedding(11, 6) if scaled else nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 11)

    def losses(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [batch]
        logits = self.down(torch.tanh(self.up(self.norm(self.embed(ids)))))  # [batch, tokens, 11]
        token = nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # [batch, tokens]
        return (token * mask).sum(dim=1) / mask.sum(dim=1)


def test_rebuilt_gradients_equal_one_backward_per_example():
    model = Tiny()
    blocks = gradient_blocks(list(model.named_parameters()))
    assert gradient_dim(blocks) == sum(p.numel() for p in model.parameters())
    assert [b.offset for b in blocks] == [0, *torch.tensor([b.numel for b in blocks]).cumsum(0)[:-1].tolist()]
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 9, 0]])
    mask = (torch.arange(4)[None] < torch.tensor([[4], [2], [3]])).float()
    capture = GradientCapture(model, blocks)
    assert capture.unsupported == {}
    capture.batch_size = 3
    with capture:
        model.losses(ids, mask).sum().backward()
    for block in blocks:
        rebuilt = capture.example_gradients(block, 3)  # [3, numel]
        for row in range(3):
            keep = int(mask[row].sum())
            expected = torch.autograd.grad(
                model.losses(ids[row : row + 1, :keep], mask[row : row + 1, :keep])[0], block.parameter
            )[0]
            torch.testing.assert_close(rebuilt[row], expected.reshape(-1), rtol=1e-5, atol=1e-6)
        factors = capture.example_factors(block, 3)
        if factors is not None:  # a linear or embedding weight: the same gradient as its factors
            torch.testing.assert_close(
                factors_gradient(factors, tuple(block.parameter.shape)).reshape(3, -1),
                rebuilt,
                rtol=1e-5,
                atol=1e-6,
            )


def test_a_module_without_a_rule_is_named_with_the_reason():
    model = Tiny(scaled=True)
    blocks = gradient_blocks(list(model.named_parameters()))
    capture = GradientCapture(model, blocks)
    assert capture.unsupported == {"embed.weight": "no per-example rule for OwnForwardEmbedding"}
    assert id(model.embed.weight) not in capture.active and id(model.up.weight) in capture.active


def test_a_module_that_folds_the_batch_is_refused_by_name():
    model = Tiny()
    blocks = gradient_blocks(list(model.named_parameters()))
    capture = GradientCapture(model, blocks)
    capture.batch_size = 2
    with capture:
        flat = model.up(model.norm(model.embed(torch.tensor([[1, 2], [3, 4]]))).reshape(4, 6))  # [4, 8]
        flat.sum().backward()
    with pytest.raises(GradientError, match="up.weight: its module folds the batch axis"):
        capture.example_gradients(blocks[[b.name for b in blocks].index("up.weight")], 2)
