"""Training rows -> tokenized examples whose loss covers the response tokens only.

Pipeline: `readers.read_rows` (every input format, one id per row in file order) -> `render_row`
(prompt template -> prompt and response strings) -> `tokenize` (prompt + response tokenized jointly,
as TRL's trainers do, into token ids plus labels with -100 on the prompt) -> `Example`. A row that cannot be used becomes a `RejectedRow` with its id and a
reason; no row is ever dropped silently.

Chat rows (`messages`) put the loss on the final assistant turn only: every earlier turn, including
earlier assistant turns, is part of the prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rapidin_index.errors import DataError, QueryError, RowError
from rapidin_index.readers import read_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the `model(labels=...)` convention for "no loss here"
TOKENIZATIONS = ("trl", "trl-assistant", "separate", "joint")
"""How rows become labelled tokens (`tokenize`): TRL's SFT rule, a plain Trainer's, or the rule of
indexes built before TRL's was followed."""
TEMPLATE_NAMES = ("auto", "alpaca", "completion", "chat", "plain", "custom")
RESPONSE_FIELDS = ("output", "completion", "response", "answer")
COMPLETION_RESPONSE_FIELDS = ("completion", "response", "output")
# What `auto` looks for, in order: the first field present decides the template.
AUTO_TEMPLATE_BY_FIELD = {
    "messages": "chat",
    "instruction": "alpaca",
    "prompt": "completion",
    "text": "plain",
}

# The two Stanford Alpaca prompts, verbatim, so that models fine-tuned with them are scored on the
# exact text they were trained on.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Template:
    """How rows become (prompt, response) text; recorded in the index manifest."""

    name: str
    """One of auto, alpaca, completion, chat, plain, custom."""
    format_string: str | None = None
    """For `custom`: a str.format string over the row's fields that renders the prompt."""
    response_field: str | None = None
    """The field holding the response; None picks the usual one for the template."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Template:
        name = d.get("name")
        if name not in TEMPLATE_NAMES:
            raise DataError(f"unknown template name {name!r}; expected one of {', '.join(TEMPLATE_NAMES)}")
        template = cls(name, d.get("format_string"), d.get("response_field"))
        if name == "custom":
            _check_format_string(template.format_string)
        return template


def parse_template(spec: str, response_field: str | None = None) -> Template:
    """'auto'|'alpaca'|'completion'|'chat'|'plain', or any string containing '{' (a custom prompt format)."""
    if "{" in spec:
        _check_format_string(spec)
        return Template("custom", spec, response_field)
    name = spec.strip().lower()
    if name in TEMPLATE_NAMES and name != "custom":
        return Template(name, None, response_field)
    raise DataError(
        f"unknown --template {spec!r}; choose one of auto, alpaca, completion, chat, plain, "
        "or give a prompt format string with {field} placeholders, e.g. '{question}\\nAnswer: '"
    )


def _check_format_string(format_string: str | None) -> None:
    """Reject format strings that cannot be filled from a row, once, instead of on every row."""
    if not format_string:
        raise DataError("the custom template needs a format string such as '{question}\\nAnswer: '")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(format_string) if field is not None]
    except ValueError as error:
        raise DataError(f"bad --template format string {format_string!r}: {error}") from error
    if any(field == "" or field[0].isdigit() for field in fields):
        raise DataError(
            f"--template {format_string!r} uses positional fields; name them, e.g. '{{question}}'"
        )


def content_hash(row: dict) -> str:
    """sha256 hex of the row's canonical JSON, so an index can tell when a row's content changed."""
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class Example:
    """One tokenized training row."""

    example_id: int
    """0-based position of the row in the input file (malformed rows count too)."""
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; -100 where there is no loss (prompt tokens), unshifted."""
    prompt: str
    response: str
    source: dict
    """The original row."""
    truncated: bool
    """True if the sequence was cut at max_length."""
    content_hash: str
    template_name: str = ""
    """The concrete template the row was rendered with (what `auto` resolved to)."""

    @property
    def num_response_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class RejectedRow:
    example_id: int
    reason: str


# -------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    """A row as text: the prompt the model reads, then the text its loss covers.

    Unpacks as ``prompt, response = render_row(...)``. ``chat`` text was written by the tokenizer's chat
    template: TRL tokenizes it without special tokens and appends no EOS (the template ends the turn).
    """

    prompt: str
    response: str
    """The rendered text after the prompt (a chat turn's content plus the template's end of turn)."""
    content: str
    """The response as the row gives it (a completion, an assistant turn's content)."""
    chat: bool = False
    generation_prompt: str | None = None
    """Chat only: the prompt as the template renders it alone (``add_generation_prompt=True``), which
    TRL tokenizes to find where the completion starts; None where it equals ``prompt``."""
    turns: tuple | None = None
    """Chat only: (prompt turns, completion turns), for the template's assistant mask."""
    whole_conversation: bool = False
    """A `messages` row (TRL's language-modelling form), not a prompt/completion pair."""

    def __iter__(self):
        return iter((self.prompt, self.response))


def detect_template(row: dict) -> str:
    """The concrete template `auto` picks for a row."""
    if _is_conversation(row.get("prompt")):
        return "chat"  # TRL's conversational prompt/completion
    for field, name in AUTO_TEMPLATE_BY_FIELD.items():
        if field in row:
            return name
    found = ", ".join(sorted(map(str, row))) or "none"
    raise RowError(
        f"cannot tell the template from the fields ({found}); expected 'messages', 'instruction' (+ 'output'), "
        "'prompt' (+ 'completion'), or 'text'; or pass --template"
    )


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def render_row(row: dict, tokenizer: PreTrainedTokenizerBase, template: Template) -> Rendered:
    """The row as text; RowError with the reason when the row does not fit the template."""
    name = detect_template(row) if template.name == "auto" else template.name
    if name == "chat":
        return _render_chat(_conversation(row), tokenizer)
    if name == "alpaca":
        prompt = _alpaca_prompt(_text_field(row, "instruction", name), _optional_text(row, "input"))
        response = _text_field(row, template.response_field or "output", name)
    elif name == "completion":
        prompt = _text_field(row, "prompt", name)
        response = _response_text(row, template.response_field, COMPLETION_RESPONSE_FIELDS, name)
    elif name == "plain":
        prompt, response = "", _text_field(row, template.response_field or "text", name)
    elif name == "custom":
        prompt = _format_custom(row, template.format_string or "")
        response = _response_text(row, template.response_field, RESPONSE_FIELDS, name)
    else:
        raise DataError(f"unknown template name {name!r}; expected one of {', '.join(TEMPLATE_NAMES)}")
    _check_response(response)
    return Rendered(prompt, response, response)


def _conversation(row: dict) -> tuple[list, list, bool]:
    """(prompt turns, completion turns, whether a `messages` row) of a chat row: `messages` (the loss
    on its final assistant turn, as TRL labels the same conversation given as prompt + completion) or
    TRL's conversational `prompt` + `completion` lists."""
    if "messages" in row:
        messages = row["messages"]
        if not _is_conversation(messages):
            raise RowError("field 'messages' must be a list of {role, content} objects")
        return messages[:-1], messages[-1:], True
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if not (_is_conversation(prompt) and _is_conversation(completion)):
            raise RowError(
                "conversational rows need 'prompt' and 'completion' as lists of {role, content} objects"
            )
        return prompt, completion, False
    raise RowError(
        "missing field 'messages' (or conversational 'prompt' + 'completion') for the chat template"
    )


def _alpaca_prompt(instruction: str, input_text: str) -> str:
    # Stanford's rule: the with-input prompt whenever `input` is a non-empty string.
    if input_text != "":
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _text_field(row: dict, field: str, template_name: str) -> str:
    value = row.get(field)
    if value is None:
        raise RowError(f"missing field '{field}' for the {template_name} template")
    if not isinstance(value, (str, int, float)):
        raise RowError(f"field '{field}' must be text, got {type(value).__name__}")
    return str(value)


def _optional_text(row: dict, field: str) -> str:
    return "" if row.get(field) is None else _text_field(row, field, "alpaca")


def _response_text(
    row: dict, response_field: str | None, candidates: tuple[str, ...], template_name: str
) -> str:
    if response_field is None:
        response_field = next((field for field in candidates if row.get(field) is not None), None)
    if response_field is None:
        raise RowError(
            f"missing response field for the {template_name} template; expected one of {', '.join(candidates)}"
        )
    return _text_field(row, response_field, template_name)


def _check_response(response: str) -> None:
    if not response.strip():
        raise RowError("empty response")


def _format_custom(row: dict, format_string: str) -> str:
    try:
        return format_string.format(**row)
    except KeyError as error:
        raise RowError(f"missing field {error} for the custom template {format_string!r}") from error
    except (IndexError, ValueError, AttributeError, TypeError) as error:
        raise RowError(f"cannot fill the custom template {format_string!r} from this row: {error}") from error


def template_fields(template: Template) -> list[str]:
    """The row fields a custom template's format string fills, in order, once each."""
    parsed = string.Formatter().parse(template.format_string or "")
    return list(dict.fromkeys(field for _, field, _, _ in parsed if field))


def _render_chat(conversation: tuple[list, list, bool], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """TRL's conversational prompt/completion: the prompt turns rendered with the generation prompt, the
    completion the rest of the whole conversation's rendering (its end-of-turn text included)."""
    prompt_turns, completion_turns, whole = conversation
    if completion_turns[-1]["role"] != "assistant":
        raise RowError("the last message must have role 'assistant' (its content is the response scored)")
    contents = [turn.get("content") for turn in completion_turns]
    if not all(isinstance(content, str) for content in contents):
        raise RowError("the last assistant message must have text 'content'")
    content = "".join(contents)
    _check_response(content)
    _require_chat_template(tokenizer)
    try:
        prompt = tokenizer.apply_chat_template(prompt_turns, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt_turns + completion_turns, tokenize=False)
    except Exception as error:  # jinja templates raise anything, e.g. on roles out of order
        raise RowError(f"the chat template failed on this conversation: {error}") from error
    turns = (prompt_turns, completion_turns)
    if full.startswith(prompt):
        return Rendered(prompt, full[len(prompt) :], content, True, None, turns, whole)
    # The template renders the prompt alone otherwise (e.g. an empty thought block): the text splits
    # where the two renderings part, and tokenization starts the labels where TRL does.
    shared = len(os.path.commonprefix([prompt, full]))
    return Rendered(full[:shared], full[shared:], content, True, prompt, turns, whole)


def _require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise RowError(
            "the tokenizer has no chat template, so chat rows ('messages', or conversational 'prompt' + "
            "'completion') cannot be rendered; give the model a tokenizer with a chat template, or turn the "
            "rows into 'prompt' + 'completion' text rows"
        )


def query_row(prompt: str, response: str, template: Template, system: str | None = None) -> dict:
    """A user's (prompt, response) as a training row of the index's own form, so that it renders exactly
    as a row with the same content did: a chat conversation (with the ``system`` turn), an Alpaca
    instruction, a prompt/completion pair, or the single field a custom template fills."""
    if template.name == "chat":
        turns = [{"role": "system", "content": system}] if system is not None else []
        turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return {"messages": turns}
    if system is not None:
        raise QueryError(
            f"--system needs an index of chat rows; this index's rows use the {template.name} template "
            "(put the system text into the prompt instead)"
        )
    if template.name == "alpaca":
        return {"instruction": prompt, template.response_field or "output": response}
    if template.name == "custom":
        fields = template_fields(template)
        if len(fields) != 1:
            raise QueryError(
                f"the index's template {template.format_string!r} fills {len(fields)} fields "
                f"({', '.join(fields) or 'none'}); give the query as a --queries row with those fields and "
                f"'{template.response_field or 'output'}'"
            )
        return {fields[0]: prompt, template.response_field or "output": response}
    if template.name == "plain":
        return {"prompt": prompt, "completion": response}  # the prompt as context, scored like a text row
    return {"prompt": prompt, template.response_field or "completion": response}


# ------------------------------------------------------------------------------------------- tokenizing


@dataclass
class Tokenized:
    """A rendered (prompt, response) as token ids, with each token's place in the text."""

    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; -100 where there is no loss (prompt tokens, position 0), unshifted."""
    truncated: bool
    offsets: list[tuple[int, int]] | None
    """Per token: [start, end) characters of ``prompt + response`` (empty for added EOS and special
    tokens); None for tokenizers without offsets (slow, Python ones)."""
    prompt_length: int
    """len(prompt) in characters: response character c is text character prompt_length + c."""


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """How many leading ids two sequences share."""
    count = 0
    while count < min(len(ids), len(other_ids)) and ids[count] == other_ids[count]:
        count += 1
    return count


def prompt_token_ids(
    prompt: str, tokenizer: PreTrainedTokenizerBase, chat: bool = False, tokenization: str = "trl"
) -> list[int]:
    """The prompt's ids as generation and scoring both see them. ``trl``: chat-template text without
    special tokens (the template wrote them), other text with the tokenizer's own (BOS); the older rules
    add them unless the text starts with the BOS text."""
    special = not chat if tokenization.startswith("trl") else _legacy_special_tokens(prompt, tokenizer)
    return list(tokenizer(prompt, add_special_tokens=special).input_ids)


def tokenize(
    prompt: str | Rendered,
    response: str | None,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    tokenization: str = "trl",
) -> Tokenized:
    """Token ids and response-only labels for a rendered row (or a plain ``prompt``, ``response`` pair).

    ``trl`` (default): labelled as TRL's SFT trainer labels the row. Text rows get the EOS text appended
    unless the response ends with it, and ``prompt + response`` is tokenized with the tokenizer's
    special tokens; chat-template text gets neither. The labels start where the prompt's own ids and the
    whole sequence's ids part (TRL's common-prefix rule: a token that spans the boundary is scored, and
    so is any prompt-end token the joined text tokenizes differently).
    ``trl-assistant``: TRL with ``assistant_only_loss=True``: chat rows labelled where the template's
    ``{% generation %}`` blocks mark assistant text (every assistant turn of a `messages` row; the
    completion's of a prompt/completion pair); text rows as ``trl``.
    ``separate``: a plain Trainer with the prompt masked: each part tokenized on its own, EOS appended.
    ``joint``: the rule of indexes built before ``trl`` (the first token reaching past the prompt's
    characters starts the labels; an EOS id is appended after any text that does not end with one).
    """
    rendered = prompt if isinstance(prompt, Rendered) else Rendered(prompt, response or "", response or "")
    _check_settings(tokenizer, max_length)
    if tokenization not in TOKENIZATIONS:
        raise DataError(f"--tokenization {tokenization!r} is not one of {', '.join(TOKENIZATIONS)}")
    split = {"trl": _trl_ids, "trl-assistant": _trl_assistant_ids, "joint": _joint_ids}
    split["separate"] = _separate_ids
    input_ids, offsets, scored = split[tokenization](rendered, tokenizer)
    if isinstance(scored, int):  # one boundary: everything from it on is scored
        scored = [position >= scored for position in range(len(input_ids))]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, scored, strict=True)]
    prompt_count = scored.index(True) if True in scored else len(scored)
    # Position 0 is never predicted (nothing precedes it); masking it keeps num_response_tokens honest.
    labels[0] = IGNORE_INDEX
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:  # TRL's default truncation keeps the start
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        offsets = None if offsets is None else offsets[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        if truncated and prompt_count >= max_length:
            relation = "longer than" if prompt_count > max_length else "as long as"
            raise RowError(f"prompt alone is {prompt_count} tokens, {relation} --max-length {max_length}")
        raise RowError(
            f"no response token to score: the sequence has {len(input_ids)} token(s), the loss needs 2"
        )
    return Tokenized(input_ids, labels, truncated, offsets, len(rendered.prompt))


def _encode(text: str, tokenizer, add_special_tokens: bool) -> tuple[list[int], list | None]:
    """(ids, character offsets, or None where a slow tokenizer has none)."""
    try:
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:
        return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids), None
    return list(encoded["input_ids"]), [tuple(pair) for pair in encoded["offset_mapping"]]


def _trl_ids(rendered: Rendered, tokenizer) -> tuple[list[int], list | None, int]:
    """TRL's SFT tokenization of one row: (ids, offsets, where the completion starts)."""
    text = rendered.prompt + rendered.response
    eos = tokenizer.eos_token
    if not rendered.chat and not rendered.response.endswith(eos):  # TRL's add_eos, on the text
        text += eos
    input_ids, offsets = _encode(text, tokenizer, add_special_tokens=not rendered.chat)
    prompt_text = rendered.generation_prompt if rendered.generation_prompt is not None else rendered.prompt
    prompt_ids = prompt_token_ids(prompt_text, tokenizer, rendered.chat)
    return input_ids, offsets, common_prefix_length(prompt_ids, input_ids)


def _trl_assistant_ids(rendered: Rendered, tokenizer) -> tuple[list[int], list | None, int | list[bool]]:
    """TRL's tokenization with ``assistant_only_loss``: (ids, offsets, which tokens are scored)."""
    input_ids, offsets, start = _trl_ids(rendered, tokenizer)
    if not rendered.chat:
        return input_ids, offsets, start
    prompt_turns, completion_turns = rendered.turns
    marked = tokenizer.apply_chat_template(
        prompt_turns + completion_turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = [bool(bit) for bit in marked["assistant_masks"]]
    if list(marked["input_ids"]) != input_ids or not any(mask):
        raise RowError(
            "the chat template marks no assistant tokens (it has no {% generation %} block), so "
            "--tokenization trl-assistant cannot label this row; use --tokenization trl"
        )
    if rendered.whole_conversation:  # TRL's language-modelling rows: every assistant turn
        return input_ids, offsets, mask
    return input_ids, offsets, [bit and position >= start for position, bit in enumerate(mask)]


def _appended_eos(input_ids: list[int], offsets: list | None, text_length: int, tokenizer) -> None:
    if not input_ids or input_ids[-1] != tokenizer.eos_token_id:
        input_ids.append(tokenizer.eos_token_id)
        if offsets is not None:
            offsets.append((text_length, text_length))


def _legacy_special_tokens(text: str, tokenizer) -> bool:
    bos_token = getattr(tokenizer, "bos_token", None)
    return not (bos_token and text.startswith(bos_token))


def _joint_ids(rendered: Rendered, tokenizer) -> tuple[list[int], list | None, int]:
    """The ``joint`` rule of older indexes: (ids, offsets, first token reaching past the prompt)."""
    prompt, text = rendered.prompt, rendered.prompt + rendered.response
    special = _legacy_special_tokens(prompt, tokenizer)
    input_ids, offsets = _encode(text, tokenizer, special)
    if offsets is None:
        first = common_prefix_length(list(tokenizer(prompt, add_special_tokens=special).input_ids), input_ids)
    else:
        ends = [end if end > start else -1 for start, end in offsets]
        first = next((i for i, end in enumerate(ends) if end > len(prompt)), len(input_ids))
    _appended_eos(input_ids, offsets, len(text), tokenizer)
    return input_ids, offsets, first


def _separate_ids(rendered: Rendered, tokenizer) -> tuple[list[int], list | None, int]:
    """A plain Trainer's rule: the prompt and the response tokenized on their own, EOS appended."""
    prompt, response = rendered.prompt, rendered.response
    special = _legacy_special_tokens(prompt, tokenizer)
    prompt_ids, prompt_offsets = _encode(prompt, tokenizer, special)
    response_ids, response_offsets = _encode(response, tokenizer, False)
    offsets = None
    if prompt_offsets is not None and response_offsets is not None:
        shift = len(prompt)
        offsets = prompt_offsets + [(start + shift, end + shift) for start, end in response_offsets]
    input_ids = prompt_ids + response_ids
    _appended_eos(input_ids, offsets, len(prompt) + len(response), tokenizer)
    return input_ids, offsets, len(prompt_ids)


def tokenize_example(
    prompt: str | Rendered,
    response: str | None,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    tokenization: str = "trl",
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): :func:`tokenize` without the offsets."""
    tokenized = tokenize(prompt, response, tokenizer, max_length, tokenization)
    return tokenized.input_ids, tokenized.labels, tokenized.truncated


def _check_settings(tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> None:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before building")
    if max_length is not None and max_length < 2:
        raise DataError(
            f"--max-length must be at least 2 (one token to predict from, one to predict), got {max_length}"
        )


def iter_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    max_length: int | None = None,
    tokenization: str = "trl",
) -> Iterator[Example | RejectedRow]:
    """Stream every row of `path` as an Example or a RejectedRow, in file order."""
    _check_settings(tokenizer, max_length)  # whole-input problems surface at call time, before any row
    if tokenization not in TOKENIZATIONS:
        raise DataError(f"--tokenization {tokenization!r} is not one of {', '.join(TOKENIZATIONS)}")
    return _generate_examples(read_rows(path), tokenizer, template, max_length, tokenization)


def _generate_examples(
    rows: Iterator[tuple[int, dict | None, str | None]],
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    max_length: int | None,
    tokenization: str,
) -> Iterator[Example | RejectedRow]:
    for example_id, row, error in rows:
        if row is None:
            yield RejectedRow(example_id, error or "unreadable row")
            continue
        try:
            template_name = detect_template(row) if template.name == "auto" else template.name
            rendered = render_row(row, tokenizer, template)
            input_ids, labels, truncated = tokenize_example(
                rendered, None, tokenizer, max_length, tokenization
            )
        except RowError as row_error:
            yield RejectedRow(example_id, str(row_error))
            continue
        yield Example(
            example_id,
            input_ids,
            labels,
            rendered.prompt,
            rendered.response,
            row,
            truncated,
            content_hash(row),
            template_name,
        )


def load_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    max_length: int | None = None,
    tokenization: str = "trl",
) -> tuple[list[Example], list[RejectedRow]]:
    """Read, render and tokenize every row; malformed rows come back as RejectedRow(id, reason)."""
    examples: list[Example] = []
    rejected: list[RejectedRow] = []
    for item in iter_examples(path, tokenizer, template, max_length, tokenization):
        (examples if isinstance(item, Example) else rejected).append(item)
    return examples, rejected
