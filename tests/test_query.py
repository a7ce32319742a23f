"""Queries prepared like training rows: hot words on exactly their tokens, one tokenization for generate
and scoring, the index's template and max length."""

from __future__ import annotations

import pytest
from conftest import build_byte_level_tokenizer

from rapidin_index.data import (
    ALPACA_PROMPT_NO_INPUT,
    Rendered,
    Template,
    query_row,
    render_row,
    tokenize,
)
from rapidin_index.errors import QueryError
from rapidin_index.query import (
    generation_prompt,
    prepare,
    prepare_row,
    query_template,
    resolve_hot,
    tokenize_query,
)
from rapidin_index.store.manifest import Manifest

RENDERED_PROMPTS = {
    "plain": "",
    "completion": "Question: What is the capital of France?\nAnswer:",
    "alpaca": ALPACA_PROMPT_NO_INPUT.format(instruction="What is the capital of France?"),
}


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("template", ["plain", "completion", "alpaca", "chat"])
@pytest.mark.parametrize("tokenization", ["trl", "joint", "separate"])
def test_hot_words_mark_exactly_their_tokens(template, bos, tokenization):
    tokenizer = build_byte_level_tokenizer(bos=bos)
    response = (
        " The capital of France is Paris." if template != "plain" else "The capital of France is Paris."
    )
    if template == "chat":
        row = query_row("What is the capital of France?", response, Template("chat"))
        rendered = render_row(row, tokenizer, Template("chat"))
    else:
        rendered = Rendered(RENDERED_PROMPTS[template], response, response)
    response = rendered.response
    tokenized = tokenize(rendered, None, tokenizer, None, tokenization)
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
    manifest = manifest_for({"name": "chat", "format": None, "response_field": None})
    _, generation_ids = generation_prompt("Say hello.", tokenizer, manifest)
    scored = prepare("Say hello.", " Hello world!", tokenizer, manifest)
    assert scored.input_ids[: len(generation_ids)] == generation_ids
    assert tokenizer.convert_ids_to_tokens(generation_ids).count("<s>") == 1


# --------------------------------------------------------------------------- from the manifest


def manifest_for(template: dict, **fields) -> Manifest:
    """A manifest with just what query preparation reads (template, tokenization, max length, usage)."""
    values = dict(
        model={},
        adapter=None,
        tokenizer={},
        template=template,
        max_length=None,
        parameters={},
        normalize="layer",
        sketch={},
        vector_dtype="float32",
        generation=1,
        sources=[],
        shard=None,
    )
    values.update(fields)
    return Manifest(**values)


def test_an_auto_index_renders_queries_with_its_most_used_template():
    auto = {"name": "auto", "format": None, "response_field": None}
    manifest = manifest_for(auto, template_usage={"completion": 3, "alpaca": 9})
    assert query_template(manifest) == Template(name="alpaca")
    assert query_template(manifest_for(auto)) == Template.from_dict(auto)  # no usage recorded: as built
    plain = {"name": "plain", "format": None, "response_field": None}
    assert query_template(manifest_for(plain, template_usage={"alpaca": 9})).name == "plain"


def test_a_query_past_the_index_max_length_is_refused_naming_both():
    tokenizer = build_byte_level_tokenizer(bos=True)
    manifest = manifest_for({"name": "plain", "format": None, "response_field": None}, max_length=8)
    long_answer = " a long answer that runs on and on"
    with pytest.raises(QueryError, match=r"the query is \d+ tokens, past the index's --max-length 8"):
        tokenize_query("Q:", Rendered("Q:", long_answer, long_answer), tokenizer, manifest)
    short = tokenize_query("Q:", Rendered("Q:", " Yes.", " Yes."), tokenizer, manifest)
    assert len(short.input_ids) <= 8 and short.hot == [True] * len(short.response_positions)


def test_prepared_queries_score_exactly_the_response_tokens():
    tokenizer = build_byte_level_tokenizer(bos=True)
    manifest = manifest_for({"name": "completion", "format": None, "response_field": None})
    query = prepare("What is the capital of France?", " Paris.", tokenizer, manifest, hot=["Paris"])
    scored = "".join(tokenizer.decode([query.input_ids[p]]) for p in query.response_positions)
    assert scored.startswith(" Paris.") and query.rendered_prompt == "What is the capital of France?"
    hot = [tokenizer.decode([query.input_ids[p]]) for p in query.hot_positions]
    assert "".join(hot).strip() == "Paris"
    kept = query.labels_for(query.hot_positions)
    assert [p for p, label in enumerate(kept) if label != -100] == query.hot_positions


def test_a_query_row_keeps_the_prompt_the_user_wrote_and_its_hot_words():
    tokenizer = build_byte_level_tokenizer(bos=True)
    manifest = manifest_for({"name": "auto", "format": None, "response_field": None})
    row = {"instruction": "Name the capital of France.", "output": "Paris.", "hot": ["Paris"]}
    query = prepare_row(row, tokenizer, manifest)
    assert query.prompt == "Name the capital of France." and query.rendered_prompt != query.prompt
    assert query.hot_spec == ["Paris"] and sum(query.hot) >= 1


@pytest.mark.parametrize("response_key", ["response", "completion", "output"])
def test_a_text_pair_query_row_is_recast_in_the_form_most_rows_have(response_key):
    """An auto index of Alpaca rows: a {"prompt", "response"} query row renders as `--prompt/--response`
    does (an Alpaca instruction), not as a plain prompt/completion pair."""
    tokenizer = build_byte_level_tokenizer(bos=True)
    auto = {"name": "auto", "format": None, "response_field": None}
    manifest = manifest_for(auto, template_usage={"alpaca": 9, "completion": 1})
    row = {"prompt": "Name the capital of France.", response_key: " Paris.", "hot": ["Paris"]}
    from_row = prepare_row(row, tokenizer, manifest)
    from_options = prepare("Name the capital of France.", " Paris.", tokenizer, manifest, hot=["Paris"])
    assert from_row.input_ids == from_options.input_ids and from_row.labels == from_options.labels
    assert "### Instruction" in from_row.rendered_prompt and from_row.hot == from_options.hot
    completions = manifest_for(auto, template_usage={"completion": 9})
    as_is = prepare_row(row, tokenizer, completions)
    assert as_is.rendered_prompt == "Name the capital of France."


def test_generation_continues_the_ids_that_scoring_uses():
    tokenizer = build_byte_level_tokenizer(bos=True)
    manifest = manifest_for({"name": "completion", "format": None, "response_field": None})
    _, ids = generation_prompt("Say hello.", tokenizer, manifest)
    scored = prepare("Say hello.", " Hello!", tokenizer, manifest)
    assert scored.input_ids[: len(ids)] == ids
