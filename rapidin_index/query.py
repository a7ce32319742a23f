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
    Template,
    Tokenized,
    prompt_token_ids,
    render_query,
    render_row,
    tokenize,
)
from rapidin_index.errors import QueryError, RowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rapidin_index.manifest import Manifest


@dataclass
class PreparedQuery:
    """One query, rendered and tokenized like a training row."""

    prompt: str
    response: str
    rendered_prompt: str
    input_ids: list[int]
    labels: list[int]  # every response token labelled
    response_positions: list[int]  # positions in input_ids whose label is scored
    hot: list[bool]  # per response token: in the attributed set
    hot_spec: object = None
    generated: bool = False

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
    return Template(name=dominant)


def prepare(
    prompt: str,
    response: str,
    tokenizer: PreTrainedTokenizerBase,
    manifest: Manifest,
    hot=None,
    generated: bool = False,
) -> PreparedQuery:
    """A (prompt, response) query, rendered with `query_template`."""
    rendered_prompt, response = render_query(prompt, response, tokenizer, query_template(manifest))
    return tokenize_query(prompt, rendered_prompt, response, tokenizer, manifest, hot, generated)


def prepare_row(row: dict, tokenizer: PreTrainedTokenizerBase, manifest: Manifest) -> PreparedQuery:
    """A query in training-row form (any format the index's template reads), with an optional "hot"."""
    rendered_prompt, response = render_row(row, tokenizer, Template.from_dict(manifest.template))
    return tokenize_query(
        _user_prompt(row, rendered_prompt), rendered_prompt, response, tokenizer, manifest, row.get("hot")
    )


def generation_prompt_ids(prompt: str, tokenizer: PreTrainedTokenizerBase, manifest: Manifest) -> list[int]:
    """The prompt ids a generation continues: the same ids scoring uses (no second BOS after a chat
    template's own)."""
    rendered_prompt, _ = render_query(prompt, "", tokenizer, query_template(manifest))
    return prompt_token_ids(rendered_prompt, tokenizer)


def tokenize_query(
    prompt: str,
    rendered_prompt: str,
    response: str,
    tokenizer: PreTrainedTokenizerBase,
    manifest: Manifest,
    hot=None,
    generated: bool = False,
) -> PreparedQuery:
    """Tokenize a rendered query as the index's rows were (``manifest.tokenization``), check its length."""
    try:
        tokenized = tokenize(rendered_prompt, response, tokenizer, None, manifest.tokenization)
    except RowError as error:
        raise QueryError(str(error)) from None
    max_length = manifest.max_length
    if max_length is not None and len(tokenized.input_ids) > max_length:
        raise QueryError(
            f"the query is {len(tokenized.input_ids)} tokens, past the index's --max-length {max_length}; "
            "shorten it"
        )
    positions = [p for p, label in enumerate(tokenized.labels) if label != IGNORE_INDEX]
    return PreparedQuery(
        prompt,
        response,
        rendered_prompt,
        tokenized.input_ids,
        tokenized.labels,
        positions,
        resolve_hot(hot, response, tokenized, positions),
        hot,
        generated,
    )


def _user_prompt(row: dict, rendered_prompt: str) -> str:
    """The prompt as the user wrote it in a query row (before the template), for the result."""
    for field in ("prompt", "instruction"):
        if isinstance(row.get(field), str):
            return row[field]
    return rendered_prompt


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
