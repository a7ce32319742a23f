"""Tests for rapidin_index/data.py: reading, templates, label masking, rejections."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_metaspace_tokenizer

from rapidin_index.data import (
    ALPACA_PROMPT_NO_INPUT,
    Example,
    RejectedRow,
    Template,
    content_hash,
    iter_examples,
    load_examples,
    parse_template,
    query_row,
    render_row,
    tokenize,
    tokenize_example,
)
from rapidin_index.errors import DataError, QueryError, RowError

ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Name a colour.", "input": "Say hello.", "output": "Blue is a colour."},
    {"instruction": "Say hello.", "input": "", "output": "Hello world!"},
]
# What every format should read back: an empty `input` cell counts as missing in CSV and Parquet,
# so the rows are written without it where it is empty.
EXPECTED_ROWS = [{key: value for key, value in row.items() if value} for row in ALPACA_ROWS]


def write_rows(directory: Path, file_format: str, rows: list[dict]) -> Path:
    """Write `rows` in one of the supported layouts and return the file path."""
    if file_format in ("jsonl", "ndjson"):
        path = directory / f"rows.{file_format}"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif file_format == "json_list":
        path = directory / "rows.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif file_format == "json_data":
        path = directory / "rows.json"
        path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    elif file_format == "parquet":
        path = directory / "rows.parquet"
        columns = dict.fromkeys(
            key for row in rows for key in row
        )  # from_pylist would keep row 0's keys only
        pq.write_table(pa.table({column: [row.get(column) for row in rows] for column in columns}), path)
    elif file_format == "csv":
        path = directory / "rows.csv"
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(file_format)
    return path


def tokens(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def scored_tokens(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """The tokens that carry loss."""
    return tokens(tokenizer, [token for token, label in zip(input_ids, labels, strict=True) if label != -100])


# ------------------------------------------------------------------------------------------ file formats


@pytest.mark.parametrize("file_format", ["jsonl", "json_list", "parquet", "csv"])
def test_every_format_gives_the_same_examples(tmp_path, word_tokenizer, file_format):
    path = write_rows(tmp_path, file_format, EXPECTED_ROWS)
    examples, rejected = load_examples(path, word_tokenizer, parse_template("auto"))
    reference, _ = load_examples(
        write_rows(tmp_path, "jsonl", EXPECTED_ROWS), word_tokenizer, Template("alpaca")
    )
    assert rejected == []
    assert [example.input_ids for example in examples] == [example.input_ids for example in reference]
    assert [example.content_hash for example in examples] == [example.content_hash for example in reference]


def test_malformed_rows_are_reported_with_their_ids_and_the_rest_kept(tmp_path, word_tokenizer):
    lines = [
        json.dumps(ALPACA_ROWS[0]),  # 0: fine
        '{"instruction": "broken", ',  # 1: not JSON
        "[1, 2, 3]",  # 2: not an object
        json.dumps({"instruction": "Say hello."}),  # 3: no output
        json.dumps({"instruction": "Say hello.", "output": "   "}),  # 4: empty response
        json.dumps({"colour": "blue"}),  # 5: unknown layout
        json.dumps(ALPACA_ROWS[2]),  # 6: fine
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples, rejected = load_examples(path, word_tokenizer, Template("auto"))
    assert [example.example_id for example in examples] == [0, 6]
    reasons = {row.example_id: row.reason for row in rejected}
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    assert reasons[1].startswith("line 2: not valid JSON")
    assert reasons[2] == "line 3: expected a JSON object, got list"
    assert reasons[3] == "missing field 'output' for the alpaca template"
    assert reasons[4] == "empty response"
    assert "colour" in reasons[5] and "instruction" in reasons[5] and "messages" in reasons[5]


def test_json_non_object_item_is_rejected(tmp_path, word_tokenizer):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": [ALPACA_ROWS[0], "just a string", ALPACA_ROWS[1]]}), encoding="utf-8")
    examples, rejected = load_examples(path, word_tokenizer, Template("alpaca"))
    assert [example.example_id for example in examples] == [0, 2]
    assert rejected == [RejectedRow(1, "item 1: expected a JSON object, got str")]


# ---------------------------------------------------------------------------------------------- templates


def test_alpaca_with_input_uses_the_exact_stanford_prompt(word_tokenizer):
    row = {"instruction": "Name a colour.", "input": "Say hello.", "output": "Blue."}
    prompt, response = render_row(row, word_tokenizer, Template("alpaca"))
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Input:\nSay hello.\n\n### Response:\n"
    )
    assert response == "Blue."


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "Say hello.", "output": "Hi"},
        {"instruction": "Say hello.", "input": "", "output": "Hi"},
    ],
)
def test_alpaca_without_input_uses_the_exact_stanford_prompt(word_tokenizer, row):
    prompt, response = render_row(row, word_tokenizer, Template("alpaca"))
    assert prompt == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hello.\n\n### Response:\n"
    )
    assert response == "Hi"


def test_alpaca_response_field_override(word_tokenizer):
    row = {"instruction": "Say hello.", "output": "old", "chosen": "new"}
    assert render_row(row, word_tokenizer, Template("alpaca", response_field="chosen")).response == "new"
    with pytest.raises(RowError, match="missing field 'output' for the alpaca template"):
        render_row({"instruction": "Say hello."}, word_tokenizer, Template("alpaca"))


def test_completion_prompt_is_verbatim_and_response_follows_the_field_order(word_tokenizer):
    template = Template("completion")
    row = {"prompt": "Question: how are you?\n", "response": "fine", "output": "unused"}
    assert tuple(render_row(row, word_tokenizer, template)) == ("Question: how are you?\n", "fine")
    assert tuple(
        render_row({"prompt": "p", "completion": "c", "response": "r"}, word_tokenizer, template)
    ) == (
        "p",
        "c",
    )
    with pytest.raises(RowError, match="completion, response, output"):
        render_row({"prompt": "p"}, word_tokenizer, template)


def test_chat_puts_the_loss_on_the_final_assistant_turn_only(word_tokenizer):
    messages = [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello world!"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    rendered = render_row({"messages": messages}, word_tokenizer, Template("chat"))
    assert rendered.prompt.endswith("<|assistant|> ") and "Hello world!" in rendered.prompt
    assert rendered.response.strip() == "Paris. </s>" and rendered.content == "Paris."
    input_ids, labels, _ = tokenize_example(rendered, None, word_tokenizer, None)
    # The template's own </s> ends the turn; no second EOS is appended.
    assert scored_tokens(word_tokenizer, input_ids, labels) == ["Paris", ".", "</s>"]


def test_chat_rejections(word_tokenizer):
    user_last = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(RowError, match="last message must have role 'assistant'"):
        render_row(user_last, word_tokenizer, Template("chat"))
    with pytest.raises(RowError, match="list of"):
        render_row({"messages": "hello"}, word_tokenizer, Template("chat"))
    with pytest.raises(RowError, match="missing field 'messages'"):
        render_row({"text": "hello"}, word_tokenizer, Template("chat"))
    word_tokenizer.chat_template = None
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(RowError, match=r"no chat template.*'prompt' \+ 'completion' text rows"):
        render_row(row, word_tokenizer, Template("auto"))


def test_chat_template_that_writes_bos_does_not_get_a_second_one(word_tokenizer):
    word_tokenizer.chat_template = "<s> " + word_tokenizer.chat_template
    row = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello"}]}
    input_ids, _, _ = tokenize_example(
        render_row(row, word_tokenizer, Template("chat")), None, word_tokenizer, None
    )
    assert tokens(word_tokenizer, input_ids).count("<s>") == 1


def test_plain_scores_every_text_token(word_tokenizer):
    prompt, response = render_row({"text": "Hello world!"}, word_tokenizer, Template("plain"))
    assert (prompt, response) == ("", "Hello world!")
    input_ids, labels, truncated = tokenize_example(prompt, response, word_tokenizer, None)
    assert tokens(word_tokenizer, input_ids) == ["<s>", "Hello", "world", "!", "</s>"]
    assert labels[0] == -100 and labels[1:] == input_ids[1:]
    assert not truncated


def test_plain_without_bos_masks_the_unpredictable_first_token(word_tokenizer):
    word_tokenizer.backend_tokenizer.post_processor = None  # like GPT-2: no BOS is added
    input_ids, labels, _ = tokenize_example("", "Hello world!", word_tokenizer, None)
    assert tokens(word_tokenizer, input_ids) == ["Hello", "world", "!", "</s>"]
    assert labels == [-100, *input_ids[1:]]  # nothing precedes token 0, so it cannot be scored
    with pytest.raises(RowError, match="loss needs 2"):
        tokenize_example("", "</s>", word_tokenizer, None)


def test_custom_format_string(word_tokenizer):
    template = parse_template("Question: {question}\nAnswer: ")
    assert template == Template("custom", "Question: {question}\nAnswer: ")
    row = {"question": "how are you?", "answer": "fine"}
    assert tuple(render_row(row, word_tokenizer, template)) == ("Question: how are you?\nAnswer: ", "fine")
    with pytest.raises(RowError, match="missing field 'question'"):
        render_row({"query": "x", "answer": "fine"}, word_tokenizer, template)
    with_field = parse_template("{question} ", response_field="reply")
    assert tuple(render_row({"question": "q", "reply": "r", "answer": "a"}, word_tokenizer, with_field)) == (
        "q ",
        "r",
    )


@pytest.mark.parametrize(
    ("row", "expected_prompt_start"),
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]},
            "<|user|>",
        ),
        ({"instruction": "Say hello.", "output": "Hello"}, "Below is an instruction"),
        ({"prompt": "Say hello.", "completion": "Hello"}, "Say hello."),
        ({"text": "Hello"}, ""),
    ],
)
def test_auto_picks_the_template_from_the_fields(word_tokenizer, row, expected_prompt_start):
    prompt, _ = render_row(row, word_tokenizer, Template("auto"))
    assert prompt.startswith(expected_prompt_start)


def test_empty_response_is_rejected(word_tokenizer):
    for row, template in [
        ({"text": " \n "}, Template("plain")),
        ({"prompt": "p", "completion": ""}, Template("completion")),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            Template("chat"),
        ),
    ]:
        with pytest.raises(RowError, match="^empty response$"):
            render_row(row, word_tokenizer, template)


def test_a_query_becomes_a_row_of_the_index_form_and_renders_like_one(word_tokenizer):
    alpaca = render_row(
        query_row("Say hello.", "Hello", Template("alpaca")), word_tokenizer, Template("alpaca")
    )
    assert (
        alpaca.prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hello.")
        and alpaca.response == "Hello"
    )
    chat_row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    as_query = query_row("Say hello.", "Hello", Template("chat"), system="Be brief.")
    assert as_query == chat_row
    assert render_row(as_query, word_tokenizer, Template("chat")) == render_row(
        chat_row, word_tokenizer, Template("chat")
    )
    custom = parse_template("Q: {question}\nA: ")
    rendered = render_row(query_row("Who?", "Me.", custom), word_tokenizer, custom)
    assert (rendered.prompt, rendered.response) == ("Q: Who?\nA: ", "Me.")
    with pytest.raises(QueryError, match="fills 2 fields.*question, context"):
        query_row("Who?", "Me.", parse_template("{question} {context}"))
    with pytest.raises(QueryError, match="--system needs an index of chat rows"):
        query_row("Who?", "Me.", Template("alpaca"), system="Be brief.")


def test_conversational_prompt_completion_renders_as_the_same_conversation_in_messages(word_tokenizer):
    user = [{"role": "user", "content": "Say hello."}]
    assistant = [{"role": "assistant", "content": "Hello"}]
    as_pair = render_row({"prompt": user, "completion": assistant}, word_tokenizer, Template("auto"))
    as_messages = render_row({"messages": user + assistant}, word_tokenizer, Template("auto"))
    assert tuple(as_pair) == tuple(as_messages) and as_pair.turns == as_messages.turns
    assert as_pair.chat and as_pair.content == "Hello"
    assert as_messages.whole_conversation and not as_pair.whole_conversation  # for trl-assistant
    with pytest.raises(RowError, match="lists of"):
        render_row({"prompt": user, "completion": "Hello"}, word_tokenizer, Template("chat"))


# --------------------------------------------------------------------------------------------- tokenizing


def test_labels_mask_exactly_the_prompt_tokens_and_end_with_eos(word_tokenizer):
    prompt, response = render_row(ALPACA_ROWS[1], word_tokenizer, Template("alpaca"))
    input_ids, labels, truncated = tokenize_example(prompt, response, word_tokenizer, None)
    prompt_length = len(word_tokenizer(prompt).input_ids)
    assert input_ids[0] == word_tokenizer.bos_token_id
    assert len(labels) == len(input_ids)
    assert labels[:prompt_length] == [-100] * prompt_length
    assert labels[prompt_length:] == input_ids[prompt_length:]
    assert scored_tokens(word_tokenizer, input_ids, labels) == ["Blue", "is", "a", "colour", ".", "</s>"]
    assert labels[-1] == word_tokenizer.eos_token_id and not truncated


def test_max_length_truncates_from_the_right(word_tokenizer):
    prompt, response = "Say hello.", "Hello world! I am fine"
    full_ids, full_labels, truncated = tokenize_example(prompt, response, word_tokenizer, None)
    assert not truncated
    input_ids, labels, truncated = tokenize_example(prompt, response, word_tokenizer, len(full_ids) - 2)
    assert truncated and input_ids == full_ids[:-2] and labels == full_labels[:-2]
    assert tokenize_example(prompt, response, word_tokenizer, len(full_ids))[2] is False


def test_prompt_longer_than_max_length_is_rejected(tmp_path, word_tokenizer):
    prompt_length = len(word_tokenizer("Say hello.").input_ids)  # <s> Say hello .
    with pytest.raises(RowError, match=f"prompt alone is {prompt_length} tokens, longer than --max-length 3"):
        tokenize_example("Say hello.", "Hello", word_tokenizer, 3)
    with pytest.raises(RowError, match="prompt alone is"):
        tokenize_example("Say hello.", "Hello", word_tokenizer, prompt_length)
    path = write_rows(tmp_path, "jsonl", [{"prompt": "Say hello.", "completion": "Hello"}, {"text": "Hello"}])
    examples, rejected = load_examples(path, word_tokenizer, Template("auto"), max_length=3)
    assert [example.example_id for example in examples] == [1]
    assert rejected[0].example_id == 0 and "prompt alone is" in rejected[0].reason


def test_tokenizer_without_eos_is_a_data_error(tmp_path, word_tokenizer):
    word_tokenizer.eos_token = None
    with pytest.raises(DataError, match="EOS"):
        tokenize_example("Say hello.", "Hello", word_tokenizer, None)
    with pytest.raises(DataError, match="EOS"):
        load_examples(write_rows(tmp_path, "jsonl", ALPACA_ROWS), word_tokenizer, Template("auto"))


def test_bad_settings_fail_before_any_row_is_read(tmp_path, word_tokenizer):
    path = write_rows(tmp_path, "jsonl", ALPACA_ROWS)
    with pytest.raises(DataError, match="--max-length must be at least 2"):
        iter_examples(path, word_tokenizer, Template("auto"), max_length=1)  # no iteration needed
    with pytest.raises(DataError, match="not found"):
        iter_examples(tmp_path / "missing.jsonl", word_tokenizer, Template("auto"))


def test_load_examples_fills_every_field(tmp_path, word_tokenizer):
    path = write_rows(tmp_path, "jsonl", ALPACA_ROWS)
    examples, rejected = load_examples(path, word_tokenizer, Template("auto"))
    assert rejected == []
    example = examples[1]
    assert isinstance(example, Example)
    assert example.example_id == 1 and example.source == ALPACA_ROWS[1]
    assert example.template_name == "alpaca" and example.response == "Blue is a colour."
    assert example.num_response_tokens == 6  # Blue is a colour . </s>
    assert list(iter_examples(path, word_tokenizer, Template("auto"))) == examples


# ---------------------------------------------------------------------------------- hashes and templates


def test_content_hash_is_stable_and_tracks_changes(tmp_path, word_tokenizer):
    row = {"instruction": "Say hello.", "output": "Hello"}
    reordered = {"output": "Hello", "instruction": "Say hello."}
    assert content_hash(row) == content_hash(reordered)
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert content_hash(row) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert content_hash(row) != content_hash({**row, "output": "Hello!"})
    examples, _ = load_examples(
        write_rows(tmp_path, "jsonl", [row, reordered]), word_tokenizer, Template("auto")
    )
    assert examples[0].content_hash == examples[1].content_hash == content_hash(row)


@pytest.mark.parametrize(
    "template",
    [
        Template("auto"),
        Template("alpaca", response_field="chosen"),
        Template("chat"),
        Template("custom", "{q}\n", "a"),
    ],
)
def test_template_round_trips_through_json(template):
    assert Template.from_dict(json.loads(json.dumps(template.to_dict()))) == template


def test_template_from_dict_rejects_unknown_names():
    with pytest.raises(DataError, match="unknown template name"):
        Template.from_dict({"name": "vicuna"})
    with pytest.raises(DataError, match="format string"):
        Template.from_dict({"name": "custom"})


def test_parse_template_names_and_errors():
    assert parse_template("alpaca") == Template("alpaca")
    assert parse_template(" Chat ", response_field="reply") == Template("chat", response_field="reply")
    with pytest.raises(DataError, match="auto, alpaca, completion, chat, plain"):
        parse_template("vicuna")
    with pytest.raises(DataError, match="auto, alpaca"):
        parse_template("custom")
    with pytest.raises(DataError, match="positional"):
        parse_template("{} then {0}")
    with pytest.raises(DataError, match="bad --template"):
        parse_template("{question")


# --------------------------------------------------------------------------- joint tokenization (TRL's)


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
