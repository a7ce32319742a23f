"""Tests for rapidin_index/token_attribution.py: every fast path against one backward per token."""

from __future__ import annotations

import pytest
import torch

from rapidin_index import token_attribution
from rapidin_index.capture import gradient_blocks
from rapidin_index.data import IGNORE_INDEX, tokenize_example
from rapidin_index.errors import TokenAttributionError
from rapidin_index.gradients import normalize_flat, reference_gradient
from rapidin_index.losses import collate
from rapidin_index.models import load_model, select_parameters
from rapidin_index.settings import ModelSettings
from rapidin_index.token_attribution import reference_training_token_scores, training_token_scores

VARIANTS = ["llama", "gpt2", "llama_lora", "gpt2_lora"]


@pytest.fixture(scope="module", params=VARIANTS)
def attributed(request, tiny_model_dirs):
    """(model, blocks, tokenizer) for one tiny architecture, with or without its LoRA adapter."""
    architecture = request.param.removesuffix("_lora")
    adapter = tiny_model_dirs[request.param] if request.param.endswith("_lora") else None
    settings = ModelSettings(model=tiny_model_dirs[architecture], adapter=adapter)
    loaded = load_model(settings)
    blocks = gradient_blocks(select_parameters(loaded.model, settings))
    return loaded.model, blocks, loaded.tokenizer


def make_example(tokenizer, row: dict):
    input_ids, labels, _ = tokenize_example(row["instruction"], row["output"], tokenizer, max_length=None)
    return collate([(input_ids, labels)], tokenizer.pad_token_id, "cpu")


def query_direction(model, blocks, query, normalize: str) -> list[torch.Tensor]:
    """What a caller passes: the query's whole-generation gradient, normalised per block."""
    flat = normalize_flat(reference_gradient(model, blocks, query)[None], blocks, normalize)[0]
    return [flat[block.offset : block.offset + block.numel] for block in blocks]


def whole_score(model, blocks, example, direction, normalize: str) -> float:
    flat = normalize_flat(reference_gradient(model, blocks, example)[None], blocks, normalize)[0]
    return float(flat @ torch.cat(direction))


def assert_scores_close(fast, slow) -> None:
    assert fast.token_ids == slow.token_ids
    fast_scores, slow_scores = torch.tensor(fast.scores), torch.tensor(slow.scores)
    scale = float(slow_scores.abs().max())
    torch.testing.assert_close(fast_scores, slow_scores, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(slow.losses), rtol=1e-5, atol=1e-6)


@pytest.fixture
def example_and_query(attributed, training_rows):
    model, blocks, tokenizer = attributed
    return make_example(tokenizer, training_rows[3]), make_example(tokenizer, training_rows[7])


@pytest.mark.parametrize("normalize", ["layer", "none"])
@pytest.mark.parametrize("method", ["auto", "double-backward"])
def test_example_normalisation_matches_brute_force(attributed, example_and_query, normalize, method):
    model, blocks, _ = attributed
    example, query = example_and_query
    direction = query_direction(model, blocks, query, normalize)
    fast = training_token_scores(model, blocks, example, direction, normalize=normalize, method=method)
    slow = reference_training_token_scores(model, blocks, example, direction, normalize=normalize)
    # Forward mode works on both architectures: SDPA is pinned to its math kernel for the pass.
    assert fast.method == ("jvp" if method == "auto" else "double-backward")
    assert fast.normalization == "example" and slow.method == "per-token-backward"
    assert_scores_close(fast, slow)
    targets = example.labels[0, 1:]
    assert fast.token_ids == targets[targets != IGNORE_INDEX].tolist()


@pytest.mark.parametrize("normalize", ["layer", "none"])
def test_example_scores_average_to_the_whole_score(attributed, example_and_query, normalize):
    model, blocks, _ = attributed
    example, query = example_and_query
    direction = query_direction(model, blocks, query, normalize)
    scores = training_token_scores(model, blocks, example, direction, normalize=normalize).scores
    expected = whole_score(model, blocks, example, direction, normalize)
    assert sum(scores) / len(scores) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_token_normalisation_matches_brute_force(attributed, example_and_query):
    model, blocks, _ = attributed
    example, query = example_and_query
    direction = query_direction(model, blocks, query, "layer")
    fast = training_token_scores(model, blocks, example, direction, normalization="token", token_batch_size=5)
    slow = reference_training_token_scores(model, blocks, example, direction, normalization="token")
    assert fast.method == "batched-backward" and fast.normalization == "token"
    assert_scores_close(fast, slow)
    # Per-token cosines are bounded by the number of blocks and do not average to the whole score.
    assert max(abs(score) for score in fast.scores) <= len(blocks) + 1e-4
    whole = whole_score(model, blocks, example, direction, "layer")
    assert sum(fast.scores) / len(fast.scores) != pytest.approx(whole, rel=1e-3)


def test_token_normalisation_without_layer_normalisation_is_the_jvp(attributed, example_and_query):
    model, blocks, _ = attributed
    example, query = example_and_query
    direction = query_direction(model, blocks, query, "none")
    fast = training_token_scores(model, blocks, example, direction, normalize="none", normalization="token")
    slow = reference_training_token_scores(
        model, blocks, example, direction, normalize="none", normalization="token"
    )
    assert fast.method == "jvp"
    assert_scores_close(fast, slow)


@pytest.mark.parametrize("normalization", ["example", "token"])
def test_one_response_token(attributed, example_and_query, normalization):
    model, blocks, _ = attributed
    example, query = example_and_query
    labels = torch.full_like(example.labels, IGNORE_INDEX)
    labels[0, -1] = example.input_ids[0, -1]
    single = type(example)(example.input_ids, example.attention_mask, labels)
    direction = query_direction(model, blocks, query, "layer")
    fast = training_token_scores(model, blocks, single, direction, normalization=normalization)
    slow = reference_training_token_scores(model, blocks, single, direction, normalization=normalization)
    assert len(fast.scores) == 1 and fast.token_ids == [int(example.input_ids[0, -1])]
    assert_scores_close(fast, slow)
    if normalization == "example":  # one token: its score is the whole score
        expected = whole_score(model, blocks, single, direction, "layer")
        assert fast.scores[0] == pytest.approx(expected, rel=1e-4)


def test_auto_falls_back_to_double_backward_when_forward_mode_fails(
    attributed, example_and_query, monkeypatch
):
    model, blocks, _ = attributed
    example, query = example_and_query
    direction = query_direction(model, blocks, query, "layer")
    expected = training_token_scores(model, blocks, example, direction)

    def unsupported(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with an op that does not support it")

    monkeypatch.setattr(token_attribution, "jvp", unsupported)
    scores = training_token_scores(model, blocks, example, direction)
    assert scores.method == "double-backward"
    assert_scores_close(scores, expected)
    with pytest.raises(NotImplementedError):
        training_token_scores(model, blocks, example, direction, method="jvp")


def test_token_mode_falls_back_when_the_backward_cannot_be_vmapped(
    attributed, example_and_query, monkeypatch
):
    model, blocks, _ = attributed
    example, query = example_and_query
    direction = query_direction(model, blocks, query, "layer")
    expected = training_token_scores(model, blocks, example, direction, normalization="token")

    def no_batching_rule(*args, **kwargs):
        raise RuntimeError("Batching rule not implemented for an op's backward")

    monkeypatch.setattr(token_attribution, "_per_token_cosines", no_batching_rule)
    scores = training_token_scores(model, blocks, example, direction, normalization="token")
    assert scores.method == "per-token-backward"
    assert_scores_close(scores, expected)


# --------------------------------------------------------------------------- input errors


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    settings = ModelSettings(model=tiny_model_dirs["llama"], adapter=tiny_model_dirs["llama_lora"])
    loaded = load_model(settings)
    return loaded.model, gradient_blocks(select_parameters(loaded.model, settings)), loaded.tokenizer


def test_a_batch_of_several_examples_is_refused(llama, training_rows):
    model, blocks, tokenizer = llama
    pairs = [
        tokenize_example(row["instruction"], row["output"], tokenizer, None)[:2] for row in training_rows[:2]
    ]
    batch = collate(pairs, tokenizer.pad_token_id, "cpu")
    direction = [torch.zeros(block.numel) for block in blocks]
    for scorer in (training_token_scores, reference_training_token_scores):
        with pytest.raises(TokenAttributionError, match="batch of one"):
            scorer(model, blocks, batch, direction)


def test_bad_settings_and_directions_are_refused(llama, training_rows):
    model, blocks, tokenizer = llama
    example = make_example(tokenizer, training_rows[0])
    direction = [torch.zeros(block.numel) for block in blocks]
    with pytest.raises(TokenAttributionError, match="blocks"):
        training_token_scores(model, blocks, example, direction[:-1])
    with pytest.raises(TokenAttributionError, match="values"):
        training_token_scores(model, blocks, example, [direction[0][:-1], *direction[1:]])
    with pytest.raises(TokenAttributionError, match="normalization"):
        training_token_scores(model, blocks, example, direction, normalization="word")
    with pytest.raises(TokenAttributionError, match="normalize"):
        training_token_scores(model, blocks, example, direction, normalize="unit")
    with pytest.raises(TokenAttributionError, match="method"):
        training_token_scores(model, blocks, example, direction, method="forward")
    no_response = type(example)(
        example.input_ids, example.attention_mask, torch.full_like(example.labels, -100)
    )
    with pytest.raises(TokenAttributionError, match="no response token"):
        training_token_scores(model, blocks, no_response, direction)


@pytest.mark.parametrize("normalize", ["layer", "none"])
@pytest.mark.parametrize("method", ["jvp", "double-backward"])
def test_hits_scored_in_one_batch_equal_one_by_one(attributed, training_rows, normalize, method, monkeypatch):
    """--explain scores all hits at once (one hooked backward, one forward-mode pass): the same scores
    as today's one call per hit, for rows of different lengths (right-padded together)."""
    model, blocks, tokenizer = attributed
    query = make_example(tokenizer, training_rows[7])
    direction = query_direction(model, blocks, query, normalize)
    rows = [training_rows[i] for i in (3, 0, 12, 5)]
    examples = [tokenize_example(r["instruction"], r["output"], tokenizer, max_length=None)[:2] for r in rows]
    assert len({len(ids) for ids, _ in examples}) > 1  # padding is exercised
    if method == "double-backward":  # as if an op had no forward-AD formula
        monkeypatch.setattr(token_attribution, "jvp", _no_forward_mode)
    batched = token_attribution.score_examples(
        model, blocks, examples, direction, normalize, tokenizer.pad_token_id
    )
    for (input_ids, labels), fast in zip(examples, batched, strict=True):
        example = collate([(input_ids, labels)], tokenizer.pad_token_id, "cpu")
        slow = reference_training_token_scores(model, blocks, example, direction, normalize=normalize)
        assert fast.method == method
        assert_scores_close(fast, slow)


def _no_forward_mode(*args, **kwargs):
    raise NotImplementedError("no forward-AD formula (simulated)")


def test_hits_of_a_module_without_a_rule_are_scored_one_by_one(llama, training_rows, monkeypatch):
    model, blocks, tokenizer = llama
    query = make_example(tokenizer, training_rows[7])
    direction = query_direction(model, blocks, query, "layer")
    examples = [
        tokenize_example(r["instruction"], r["output"], tokenizer, max_length=None)[:2]
        for r in training_rows[:2]
    ]
    monkeypatch.setattr("rapidin_index.capture._module_kind", lambda *args: None)  # no rule anywhere
    calls = []
    original = token_attribution.training_token_scores
    monkeypatch.setattr(
        token_attribution, "training_token_scores", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    scores = token_attribution.score_examples(
        model, blocks, examples, direction, "layer", tokenizer.pad_token_id
    )
    assert len(calls) == 2 and [s.method for s in scores] == ["jvp", "jvp"]
    example = collate([examples[1]], tokenizer.pad_token_id, "cpu")
    assert_scores_close(scores[1], reference_training_token_scores(model, blocks, example, direction))
