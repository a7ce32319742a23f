"""Labels proven by TRL: every row form is labelled exactly as TRL's own SFTTrainer labels it.

The oracle builds a real `trl.SFTTrainer` on a tiny model and reads the input ids and labels its own
dataset preparation and collator produce for the same rows; no project code is involved in the oracle.
Our side is `data.load_examples`, the path every build takes. Position 0 is never predicted (the model
shifts the labels), so both sides are compared with it masked.
"""

from __future__ import annotations

import json

import pytest
from conftest import CHAT_TEMPLATE, build_byte_level_tokenizer, build_metaspace_tokenizer, trl_labels

from rapidin_index.data import Template, load_examples

pytest.importorskip("trl", reason="the TRL oracle needs trl (pip install 'rapidin-index[dev]')")

TEXT_ROWS = [
    {"prompt": "Question: how are you today?\n\n", "completion": "I am fine thanks"},  # "\n\n" splits
    {"prompt": "Answer: ", "completion": "Paris"},  # the space joins the next word
    {"prompt": "What is the capital of France?", "completion": " The capital of France is Paris."},
    {"prompt": "Say hello.", "completion": "Hello world!</s>"},  # ends with EOS text: none added
]
SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "The capital of France is Paris."}
CONVERSATIONAL_ROWS = [
    {"prompt": [USER], "completion": [ASSISTANT]},
    {"prompt": [SYSTEM, USER], "completion": [ASSISTANT]},
    {
        "prompt": [
            USER,
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "Say hello."},
        ],
        "completion": [{"role": "assistant", "content": "Hello world!"}],
    },
]


def our_labels(
    rows: list[dict], tokenizer, tmp_path, tokenization="trl"
) -> list[tuple[list[int], list[int]]]:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples, rejected = load_examples(path, tokenizer, Template("auto"), tokenization=tokenization)
    assert not rejected, rejected
    return [(example.input_ids, example.labels) for example in examples]


def tokenizers():
    byte_level_bos = build_byte_level_tokenizer(bos=True)  # Llama-style: BOS added
    byte_level = build_byte_level_tokenizer(bos=False)  # GPT-2-style: no special token added
    metaspace = build_metaspace_tokenizer()  # SentencePiece-style leading "▁"
    metaspace.chat_template = CHAT_TEMPLATE
    for tokenizer in (byte_level_bos, byte_level):
        tokenizer.chat_template = CHAT_TEMPLATE
    return {"byte-level-bos": byte_level_bos, "byte-level": byte_level, "metaspace": metaspace}


@pytest.mark.parametrize("name", ["byte-level-bos", "byte-level", "metaspace"])
def test_prompt_completion_rows_are_labelled_as_trl_labels_them(tmp_path, name):
    tokenizer = tokenizers()[name]
    assert our_labels(TEXT_ROWS, tokenizer, tmp_path) == trl_labels(TEXT_ROWS, tokenizer, tmp_path)


def test_a_token_spanning_the_prompt_end_is_scored_as_trl_scores_it(tmp_path):
    """The prompt's last token alone ("Ġ") is merged with the response's first ("ĠPa") when joined."""
    tokenizer = tokenizers()["byte-level-bos"]
    row = TEXT_ROWS[1]
    alone = tokenizer(row["prompt"]).input_ids
    joined = tokenizer(row["prompt"] + row["completion"]).input_ids
    assert joined[: len(alone)] != alone  # the case under test really happens with this tokenizer
    ours, theirs = our_labels([row], tokenizer, tmp_path), trl_labels([row], tokenizer, tmp_path)
    assert ours == theirs


@pytest.mark.parametrize("name", ["byte-level-bos", "byte-level", "metaspace"])
def test_conversational_rows_are_labelled_as_trl_labels_them(tmp_path, name):
    tokenizer = tokenizers()[name]
    assert our_labels(CONVERSATIONAL_ROWS, tokenizer, tmp_path) == trl_labels(
        CONVERSATIONAL_ROWS, tokenizer, tmp_path
    )
    (ids, labels), *_ = our_labels(CONVERSATIONAL_ROWS, tokenizer, tmp_path)
    scored = [token for token, label in zip(ids, labels, strict=True) if label != -100]
    # the template's own end of turn ("</s> ") is scored; no EOS is appended after it
    assert scored.count(tokenizer.eos_token_id) == 1 and ids[-1] != tokenizer.eos_token_id


@pytest.mark.parametrize("name", ["byte-level-bos", "metaspace"])
def test_messages_rows_put_trl_labels_on_the_final_assistant_turn(tmp_path, name):
    """A `messages` row is labelled as TRL labels the same conversation given as prompt + completion."""
    tokenizer = tokenizers()[name]
    as_messages = [{"messages": row["prompt"] + row["completion"]} for row in CONVERSATIONAL_ROWS]
    assert our_labels(as_messages, tokenizer, tmp_path) == trl_labels(
        CONVERSATIONAL_ROWS, tokenizer, tmp_path
    )


def test_plain_text_rows_are_labelled_as_trl_labels_language_modelling_rows(tmp_path):
    tokenizer = tokenizers()["byte-level-bos"]
    rows = [{"text": "The capital of France is Paris."}, {"text": "Hello world!"}]
    assert our_labels(rows, tokenizer, tmp_path) == trl_labels(rows, tokenizer, tmp_path)


# Each assistant turn inside a {% generation %} block, as TRL's assistant_only_loss needs.
GENERATION_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }} </s>{% endgeneration %}{% else %}{{ message['content'] }}"
    "{% endif %} {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.mark.parametrize("form", ["messages", "prompt-completion"])
def test_trl_assistant_labels_what_trls_assistant_only_loss_labels(tmp_path, form):
    tokenizer = tokenizers()["byte-level-bos"]
    tokenizer.chat_template = GENERATION_TEMPLATE
    rows = CONVERSATIONAL_ROWS
    if form == "messages":
        rows = [{"messages": row["prompt"] + row["completion"]} for row in CONVERSATIONAL_ROWS]
    ours = our_labels(rows, tokenizer, tmp_path, "trl-assistant")
    assert ours == trl_labels(rows, tokenizer, tmp_path, assistant_only_loss=True)
    ids, labels = ours[2]  # the multi-turn row: an earlier assistant turn is scored only as `messages`
    scored_text = tokenizer.decode([token for token, label in zip(ids, labels, strict=True) if label != -100])
    assert ("Paris." in scored_text) == (form == "messages") and "Hello world!" in scored_text


def test_trl_assistant_refuses_a_template_without_generation_blocks(tmp_path):
    tokenizer = tokenizers()["byte-level-bos"]  # CHAT_TEMPLATE marks nothing
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(CONVERSATIONAL_ROWS[0]) + "\n")
    _, rejected = load_examples(path, tokenizer, Template("auto"), tokenization="trl-assistant")
    assert "no {% generation %} block" in rejected[0].reason
