"""Queries as the index sees them: rendered with its template, tokenized like its rows, with a hot mask.

A query is prepared from the manifest alone (template, tokenization, max length) and the tokenizer, so
that its tokens and labels are exactly those a training row with the same text would have had. Which of
its response tokens are attributed (the "hot" mask) comes from the user's words or token spans, resolved
through the joint tokenization's own character offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rapidin_index.data import (
    IGNORE_INDEX,
    Rendered,
    Template,
    Tokenized,
    prompt_token_ids,
    query_row,
    render_row,
    tokenize,
)
from rapidin_index.errors import QueryError, RowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rapidin_index.store.manifest import Manifest


@dataclass
class PreparedQuery:
    """One query, rendered and tokenized like a training row."""

    prompt: str
    response: str  # the generation as given or generated (an assistant turn's content, a completion)
    rendered_prompt: str
    input_ids: list[int]
    labels: list[int]  # every response token labelled
    response_positions: list[int]  # positions in input_ids whose label is scored
    hot: list[bool]  # per response token: in the attributed set
    hot_spec: object = None
    generated: bool = False
    rendered_response: str = ""  # the rendered text after the prompt (a chat template's end of turn too)

    def labels_for(self, positions: list[int]) -> list[int]:
        kept = [IGNORE_INDEX] * len(self.labels)
        for position in positions:
            kept[position] = self.labels[position]
        return kept

    @property
    def hot_positions(self) -> list[int]:
        return [p for p, is_hot in zip(self.response_positions, self.hot, strict=True) if is_hot]


def query_template(manifest: Manifest) -> Template:
    """The index's template; for 'auto' indexes, the one most training rows resolved to (prompts given
    as plain text render the same way)."""
    template = Template.from_dict(manifest.template)
    if template.name != "auto" or not manifest.template_usage:
        return template
    dominant = max(manifest.template_usage.items(), key=lambda item: item[1])[0]
    return Template(name=dominant, response_field=template.response_field)


def _row_template(template: Template) -> Template:
    """How a row built by `data.query_row` renders: by its own fields (custom templates by theirs)."""
    return template if template.name == "custom" else Template("auto", None, template.response_field)


def prepare(
    prompt: str,
    response: str,
    tokenizer: PreTrainedTokenizerBase,
    manifest: Manifest,
    hot=None,
    system: str | None = None,
) -> PreparedQuery:
    """A (prompt, response) query rendered as a training row of the index's form with that content."""
    rendered = _render_query(prompt, response, tokenizer, manifest, system)
    return tokenize_query(prompt, rendered, tokenizer, manifest, hot)


def _render_query(prompt: str, response: str, tokenizer, manifest: Manifest, system: str | None) -> Rendered:
    template = query_template(manifest)
    row = query_row(prompt, response, template, system)
    try:
        return render_row(row, tokenizer, _row_template(template))
    except RowError as error:
        raise QueryError(str(error)) from None


def prepare_row(row: dict, tokenizer: PreTrainedTokenizerBase, manifest: Manifest) -> PreparedQuery:
    """A query in training-row form (any form the index's rows could take), with an optional "hot".

    A text prompt + response row (``prompt`` with ``response``/``completion``/``output``, optional
    ``system``) against an index of another form is recast in that form first, as `prepare` does.
    """
    pair = _text_pair(row)
    if pair is not None and _recast(row, manifest):  # as `prepare`: the form most of the rows have
        return prepare(*pair, tokenizer, manifest, row.get("hot"), row.get("system"))
    try:
        rendered = render_row(row, tokenizer, Template.from_dict(manifest.template))
    except RowError as error:
        if pair is None:
            raise QueryError(
                f"{error}; give the query in the form of the index's rows, or as text 'prompt' + 'response'"
            ) from None
        return prepare(*pair, tokenizer, manifest, row.get("hot"), row.get("system"))
    if "system" in row:
        raise QueryError(
            "a query row's 'system' goes with a text 'prompt' + 'response' against a chat index; in a "
            "'messages' row give it as a system turn"
        )
    return tokenize_query(_user_prompt(row, rendered.prompt), rendered, tokenizer, manifest, row.get("hot"))


def _recast(row: dict, manifest: Manifest) -> bool:
    """Whether a text prompt + response row renders in another form than its own on this index: an
    'auto' index whose rows are mostly chat, Alpaca or plain text (a row with those forms' own fields,
    or a custom template's, renders as it is)."""
    template = Template.from_dict(manifest.template)
    own_fields = {"messages", "instruction", "input", "text", "conversations"}
    return template.name == "auto" and query_template(manifest).name != "auto" and not own_fields & set(row)


def _text_pair(row: dict) -> tuple[str, str] | None:
    prompt = row.get("prompt")
    response = next(
        (row[f] for f in ("response", "completion", "output") if isinstance(row.get(f), str)), None
    )
    if isinstance(prompt, str) and response is not None:
        return prompt, response
    return None


def generation_prompt(
    prompt: str, tokenizer: PreTrainedTokenizerBase, manifest: Manifest, system: str | None = None
) -> tuple[str, list[int]]:
    """(rendered prompt, its ids) that a generation continues: exactly the prefix a training row with
    this prompt has (TRL's prompt ids: a chat template's generation prompt, without a second BOS)."""
    rendered = _render_query(prompt, "-", tokenizer, manifest, system)  # only the prompt is kept
    text = rendered.generation_prompt if rendered.generation_prompt is not None else rendered.prompt
    return text, prompt_token_ids(text, tokenizer, rendered.chat, manifest.tokenization)


def tokenize_query(
    prompt: str,
    rendered: Rendered,
    tokenizer: PreTrainedTokenizerBase,
    manifest: Manifest,
    hot=None,
) -> PreparedQuery:
    """Tokenize a rendered query as the index's rows were (``manifest.tokenization``), check its length."""
    try:
        tokenized = tokenize(rendered, None, tokenizer, None, manifest.tokenization)
    except RowError as error:
        raise QueryError(str(error)) from None
    return _prepared(prompt, rendered.content, rendered.prompt, rendered.response, tokenized, manifest, hot)


def prepare_generated(
    prompt: str,
    rendered_prompt: str,
    prompt_ids: list[int],
    generated_ids: list[int],
    tokenizer: PreTrainedTokenizerBase,
    manifest: Manifest,
    hot=None,
) -> PreparedQuery:
    """A generated query: labelled on exactly the ids the model produced (an EOS only if it made one)."""
    if not generated_ids:
        raise QueryError("the model generated no token for this prompt; give --response instead")
    input_ids = prompt_ids + generated_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + generated_ids
    labels[0] = IGNORE_INDEX
    text, offsets = _decoded_offsets(generated_ids, tokenizer)
    tokenized = Tokenized(input_ids, labels, False, [(0, 0)] * len(prompt_ids) + offsets, 0)
    content = tokenizer.decode(generated_ids, skip_special_tokens=True)
    query = _prepared(prompt, content, rendered_prompt, text, tokenized, manifest, hot)
    query.generated = True
    return query


def _decoded_offsets(ids: list[int], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The ids' text and each id's [start, end) in it, by decoding growing prefixes."""
    offsets, previous = [], 0
    for count in range(1, len(ids) + 1):
        length = len(tokenizer.decode(ids[:count]))
        offsets.append((min(previous, length), length))
        previous = length
    return tokenizer.decode(ids), offsets


def _prepared(prompt, content, rendered_prompt, rendered_response, tokenized, manifest, hot) -> PreparedQuery:
    max_length = manifest.max_length
    if max_length is not None and len(tokenized.input_ids) > max_length:
        raise QueryError(
            f"the query is {len(tokenized.input_ids)} tokens, past the index's --max-length {max_length}; "
            "shorten it"
        )
    positions = [p for p, label in enumerate(tokenized.labels) if label != IGNORE_INDEX]
    return PreparedQuery(
        prompt,
        content,
        rendered_prompt,
        tokenized.input_ids,
        tokenized.labels,
        positions,
        resolve_hot(hot, rendered_response, tokenized, positions),
        hot,
        rendered_response=rendered_response,
    )


def _user_prompt(row: dict, rendered_prompt: str) -> str:
    """The prompt as the user wrote it in a query row (before the template), for the result."""
    for field in ("prompt", "instruction"):
        if isinstance(row.get(field), str):
            return row[field]
    turns = row.get("messages") or row.get("prompt")
    users = [t.get("content") for t in turns or [] if isinstance(t, dict) and t.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else rendered_prompt


# --------------------------------------------------------------------------- the hot mask


def resolve_hot(hot, response: str, tokenized: Tokenized, positions: list[int]) -> list[bool]:
    """Which scored tokens are attributed: all (hot=None), words (strings) or [start, end) token spans.

    ``positions`` are the scored token positions (labels != -100), in order; a span counts over them. A
    word marks every scored token whose characters overlap an occurrence of it in the response, found
    through the joint tokenization's own offsets, so it lands on the right token whatever the
    tokenizer adds (BOS or not) and wherever the prompt/response boundary falls.
    """
    if not hot:
        return [True] * len(positions)
    mask = [False] * len(positions)
    for item in hot:
        if isinstance(item, str):
            for number in _word_tokens(item, response, tokenized, positions):
                mask[number] = True
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(v, int) for v in item):
            if not 0 <= item[0] < item[1] <= len(positions):
                raise QueryError(f"hot span {list(item)} is outside the response's {len(positions)} tokens")
            for number in range(item[0], item[1]):
                mask[number] = True
        else:
            raise QueryError(f"hot entry {item!r}: give a word (string) or a [start, end) token span")
    return mask


def _word_tokens(word: str, response: str, tokenized: Tokenized, positions: list[int]) -> list[int]:
    """Numbers (over ``positions``) of the scored tokens that overlap any occurrence of ``word``."""
    if not word:
        raise QueryError("hot word is empty")
    start = response.find(word)
    if start < 0:
        raise QueryError(f"hot word {word!r} does not occur in the response")
    if tokenized.offsets is None:
        raise QueryError(
            "hot words need a fast (Rust) tokenizer with character offsets; give [start, end) token spans"
        )
    found = []
    while start >= 0:
        left, right = tokenized.prompt_length + start, tokenized.prompt_length + start + len(word)
        for number, position in enumerate(positions):
            token_start, token_end = tokenized.offsets[position]
            if token_start < right and token_end > left:
                found.append(number)
        start = response.find(word, start + len(word))
    if not found:
        raise QueryError(f"hot word {word!r} falls on no scored token (cut by --max-length?)")
    return found
