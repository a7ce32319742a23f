"""Joint tokenization as TRL trains, hot words on the right tokens, one tokenization for generate and scoring."""

from __future__ import annotations

import pytest
from conftest import build_byte_level_tokenizer, build_metaspace_tokenizer

from rapidin_index.data import (
    ALPACA_PROMPT_NO_INPUT,
    Template,
    prompt_token_ids,
    render_query,
    tokenize,
)
from rapidin_index.errors import QueryError
from rapidin_index.query import resolve_hot


def scored_ids(tokenized) -> list[int]:
    return [label for label in tokenized.labels if label != -100]


@pytest.mark.parametrize(
    "prompt,response", [("Question: what? Answer:", "Paris"), ("Question: what? Answer: ", "Paris")]
)
def test_joint_tokenization_gives_the_tokens_the_model_was_trained_on(prompt, response):
    tokenizer = build_metaspace_tokenizer()
    joint = tokenizer(prompt + response).input_ids  # what TRL's trainers feed the model
    tokenized = tokenize(prompt, response, tokenizer, None)
    assert tokenized.input_ids == [*joint, tokenizer.eos_token_id]
    prompt_only = tokenizer(prompt).input_ids
    common = 0  # the joint ids' first token that is not the prompt's own
    while common < len(prompt_only) and prompt_only[common] == joint[common]:
        common += 1
    first_response = next(p for p, label in enumerate(tokenized.labels) if label != -100)
    assert first_response == common and tokenized.input_ids[first_response] == joint[common]
    assert tokenizer.decode(scored_ids(tokenized)).replace("▁", " ").strip().startswith("Paris")


def test_separate_tokenization_is_still_there_and_differs_for_sentencepiece():
    tokenizer = build_metaspace_tokenizer()
    prompt, response = "Question: what? Answer:", "Paris"
    joint = tokenize(prompt, response, tokenizer, None, "joint")
    separate = tokenize(prompt, response, tokenizer, None, "separate")
    # SentencePiece prepends "▁" to a text on its own: the separate response starts with "▁Paris",
    # a token the model never saw after "Answer:" in training.
    assert tokenizer.convert_ids_to_tokens(scored_ids(joint))[0] == "Paris"
    assert tokenizer.convert_ids_to_tokens(scored_ids(separate))[0] == "▁Paris"


RENDERED_PROMPTS = {
    "plain": "",
    "completion": "Question: What is the capital of France?\nAnswer:",
    "alpaca": ALPACA_PROMPT_NO_INPUT.format(instruction="What is the capital of France?"),
}


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("template", ["plain", "completion", "alpaca", "chat"])
@pytest.mark.parametrize("tokenization", ["joint", "separate"])
def test_hot_words_mark_exactly_their_tokens(template, bos, tokenization):
    tokenizer = build_byte_level_tokenizer(bos=bos)
    response = (
        " The capital of France is Paris." if template != "plain" else "The capital of France is Paris."
    )
    if template == "chat":
        prompt, response = render_query(
            "What is the capital of France?", response, tokenizer, Template("chat")
        )
    else:
        prompt = RENDERED_PROMPTS[template]
    tokenized = tokenize(prompt, response, tokenizer, None, tokenization)
    positions = [p for p, label in enumerate(tokenized.labels) if label != -100]
    mask = resolve_hot(["Paris"], response, tokenized, positions)
    hot_text = "".join(
        tokenizer.decode([tokenized.input_ids[p]]) for p, hot in zip(positions, mask, strict=True) if hot
    )
    assert hot_text.strip() == "Paris", (template, bos, hot_text)
    # a token span counts over the scored tokens, whatever precedes them
    spans = resolve_hot([[0, 2]], response, tokenized, positions)
    assert spans[:2] == [True, True] and not any(spans[2:])


def test_gpt2_style_plain_hot_word_is_not_one_token_late():
    """The reported bug: no BOS, empty prompt: label 0 is masked, so response token 0 is never scored."""
    tokenizer = build_byte_level_tokenizer(bos=False)
    response = "The capital of France is Paris."
    tokenized = tokenize("", response, tokenizer, None)
    positions = [p for p, label in enumerate(tokenized.labels) if label != -100]
    assert positions[0] == 1
    mask = resolve_hot(["Paris"], response, tokenized, positions)
    marked = [
        tokenizer.decode([tokenized.input_ids[p]]) for p, hot in zip(positions, mask, strict=True) if hot
    ]
    assert "".join(marked) == " Paris" and "." not in marked


def test_hot_word_errors_are_clear():
    tokenizer = build_byte_level_tokenizer(bos=True)
    tokenized = tokenize("Q:", " Paris.", tokenizer, None)
    positions = [p for p, label in enumerate(tokenized.labels) if label != -100]
    with pytest.raises(QueryError, match="does not occur"):
        resolve_hot(["London"], " Paris.", tokenized, positions)
    with pytest.raises(QueryError, match="outside the response"):
        resolve_hot([[0, 99]], " Paris.", tokenized, positions)


@pytest.mark.parametrize("bos_in_template", [False, True])
def test_generation_and_scoring_share_the_prompt_ids(bos_in_template):
    tokenizer = build_byte_level_tokenizer(bos=True)
    if bos_in_template:
        tokenizer.chat_template = "<s>" + tokenizer.chat_template
    prompt, _ = render_query("Say hello.", "", tokenizer, Template("chat"))
    generation_ids = prompt_token_ids(prompt, tokenizer)
    scored = tokenize(prompt, " Hello world!", tokenizer, None)
    assert scored.input_ids[: len(generation_ids)] == generation_ids
    assert tokenizer.convert_ids_to_tokens(generation_ids).count("<s>") == 1
