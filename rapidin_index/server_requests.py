"""What one server request may ask for, and how its queries become prepared queries, within the caps.

Without starlette: the server (`rapidin_index.server`) hands this module a decoded JSON body. Every field
is checked before any work, and every count against `Limits`; a query's length in tokens is checked once
it is tokenized and, for a generation, before the model generates. A refusal is a `RequestError` with its
HTTP status: 400 for a malformed request, 422 for one over a cap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from rapidin_index.errors import RapidinIndexError, RequestError
from rapidin_index.query import PreparedQuery, generation_prompt, prepare_generated, prepare_row
from rapidin_index.settings import AGGREGATIONS, QuerySettings

if TYPE_CHECKING:
    from rapidin_index.retrieval import Index


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for; docs/serve-api.md lists them with the status of each refusal."""

    max_body_bytes: int = 1_000_000
    """Request body size in bytes (413 past it)."""
    max_queries: int = 16
    """Queries in one ``{"queries": [...]}`` request."""
    max_top_k: int = 100
    """Whole-generation hits per list (helpful, harmful)."""
    max_token_top_k: int = 20
    """Hits per list for each generated token."""
    max_explain: int = 10
    """Top hits per list whose training tokens are scored (one forward-mode pass each)."""
    max_new_tokens: int = 256
    """Tokens one ``generate`` may produce."""
    max_response_tokens: int = 256
    """Labelled (scored) tokens of one query: per token, a query costs a backward pass each."""
    max_rerank: int = 50
    """Top and bottom rows a query may re-score exactly (one backward pass each)."""
    max_where_characters: int = 2000
    """Length of a ``where`` filter."""
    max_query_tokens: int = 2048
    """Tokens of one query's whole sequence, prompt and response (for a generation: prompt + max_new_tokens)."""


def limits_from(settings: list[str]) -> Limits:
    """`Limits` with ``NAME=VALUE`` settings (``serve --limit max_response_tokens=1024``) over the defaults."""
    names = {field.name for field in fields(Limits)}
    values = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        name = name.strip().replace("-", "_")
        if name not in names:
            raise RequestError(
                f"--limit {setting!r}: no cap named {name!r}; the caps are {', '.join(sorted(names))}"
            )
        try:
            number = int(value.replace("_", "").replace(",", ""))
        except ValueError:
            number = 0
        if number < 1:
            raise RequestError(f"--limit {setting!r}: give a whole number of at least 1, as in {name}=100")
        values[name] = number
    return Limits(**values)


@dataclass
class QueryRequest:
    """A checked ``POST /api/query`` body: text queries (one) or training-row-form queries (several)."""

    queries: list[dict]
    several: bool
    options: QuerySettings = field(default_factory=QuerySettings)


TEXT_FIELDS = ("prompt", "response", "system", "hot")
# option name -> (least value, the Limits field that caps it)
COUNTS = {
    "top_k": (1, "max_top_k"),
    "token_top_k": (1, "max_token_top_k"),
    "explain": (0, "max_explain"),
    "max_new_tokens": (1, "max_new_tokens"),
    "rerank": (0, "max_rerank"),
}
CHOICES = ("where", "aggregate")
SWITCHES = ("per_token", "generate")


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_query_request(body: dict, limits: Limits) -> QueryRequest:
    """Check a ``POST /api/query`` body (field names, types, counts against ``limits``)."""
    unknown = sorted(set(body) - set(TEXT_FIELDS) - set(COUNTS) - set(SWITCHES) - set(CHOICES) - {"queries"})
    if unknown:
        known = ", ".join([*TEXT_FIELDS, *COUNTS, *SWITCHES, *CHOICES, "queries"])
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; a query takes {known}")
    options = parse_options(body, limits)
    if options.aggregate is not None and "queries" not in body:
        raise RequestError("'aggregate' needs 'queries' (several generations)")
    if "queries" not in body:
        return QueryRequest([_text_query(body, options.generate)], several=False, options=options)
    given = [name for name in TEXT_FIELDS if name in body]
    if given:
        raise RequestError(
            f"give 'prompt' (one query) or 'queries' (several), not both: each row carries its own "
            f"{', '.join(given)}"
        )
    return QueryRequest(_query_rows(body["queries"], limits), several=True, options=options)


def parse_options(body: dict, limits: Limits) -> QuerySettings:
    """The CLI's defaults (`QuerySettings`, lowered to a cap where this server's is lower) and what the
    body gives."""
    defaults, values = QuerySettings(), {}
    for name, (least, cap_field) in COUNTS.items():
        cap = getattr(limits, cap_field)
        given = name in body
        values[name] = _count(name, body[name], least, cap) if given else min(getattr(defaults, name), cap)
    values.update(_parse_choices(body, limits))
    for name in SWITCHES:
        if name in body:
            if not isinstance(body[name], bool):
                raise RequestError(f"'{name}' must be true or false, got {_shown(body[name])}")
            values[name] = body[name]
    return QuerySettings(**values)


def _parse_choices(body: dict, limits: Limits) -> dict:
    """``where`` (an SQL filter over the rows' columns) and ``aggregate`` (mean, sum, max or count)."""
    where = body.get("where")
    if where is not None:
        if not isinstance(where, str) or not where.strip():
            raise RequestError(f"'where' must be an SQL filter (text), got {_shown(where)}")
        if len(where) > limits.max_where_characters:
            raise RequestError(
                f"'where' is {len(where):,} characters, over this server's cap of {limits.max_where_characters:,}",
                422,
            )
    aggregate = body.get("aggregate")
    if aggregate is not None and aggregate not in AGGREGATIONS:
        raise RequestError(f"'aggregate' must be one of {', '.join(AGGREGATIONS)}, got {_shown(aggregate)}")
    return {"where": where, "aggregate": aggregate}


def _count(name: str, value, least: int, cap: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be a whole number, got {_shown(value)}")
    if value < least:
        raise RequestError(f"'{name}' must be at least {least}, got {value}", 422)
    if value > cap:
        raise RequestError(f"'{name}' {value} is over this server's cap of {cap}", 422)
    return value


def _text_query(body: dict, generate: bool) -> dict:
    for name in ("prompt", "response", "system"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(f"'{name}' must be a string, got {_shown(body[name])}")
    if body.get("prompt") is None:
        raise RequestError(
            "give 'prompt' with 'response' (or \"generate\": true), or 'queries' (a list of rows)"
        )
    if (body.get("response") is None) == (not generate):
        raise RequestError("give exactly one of 'response' or \"generate\": true")
    if body.get("response") is not None and not body["response"].strip():
        raise RequestError("the query's 'response' is empty; give its text or \"generate\": true", 422)
    _check_hot(body.get("hot"), "'hot'")
    return {name: body.get(name) for name in TEXT_FIELDS}


def _check_hot(hot, where: str) -> None:
    if hot is not None and not isinstance(hot, list):
        raise RequestError(f"{where} must be a list of words or [start, end] token spans, got {_shown(hot)}")


def _query_rows(rows, limits: Limits) -> list[dict]:
    if not isinstance(rows, list) or not rows:
        raise RequestError(f"'queries' must be a non-empty list of query rows, got {_shown(rows)}")
    if len(rows) > limits.max_queries:
        raise RequestError(
            f"{len(rows)} queries in one request, over this server's cap of {limits.max_queries}", 422
        )
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RequestError(f"query row {number} must be a JSON object, got {_shown(row)}")
        _check_hot(row.get("hot"), f"query row {number}: 'hot'")
    return rows


# --------------------------------------------------------------------------- preparation


def prepare_queries(index: Index, request: QueryRequest, limits: Limits) -> list[PreparedQuery]:
    """Render and tokenize (or generate) each query as `Index.query` / `Index.query_rows` would, each
    refused past the token caps; a refusal of a row names it."""
    prepared = []
    for number, query in enumerate(request.queries):
        try:
            prepared.append(_prepare(index, query, request.several, request.options, limits))
        except RapidinIndexError as error:
            if not request.several:
                raise
            raise RequestError(f"query row {number}: {error}", getattr(error, "status", 422)) from None
    return prepared


def _prepare(
    index: Index, query: dict, several: bool, options: QuerySettings, limits: Limits
) -> PreparedQuery:
    if options.generate:
        if not isinstance(query.get("prompt"), str):
            raise RequestError("with \"generate\": true every query row needs a text 'prompt'")
        prepared = _prepare_generation(index, query, options.max_new_tokens, limits)
    elif several:
        prepared = prepare_row(query, index.loaded.tokenizer, index.manifest)
    else:
        prepared = index.prepare(query["prompt"], query["response"], query["hot"], query["system"])
    check_lengths(prepared, limits)
    return prepared


def _prepare_generation(index: Index, query: dict, max_new_tokens: int, limits: Limits) -> PreparedQuery:
    """`Index.prepare_generation`, with the prompt's length checked before the model generates."""
    tokenizer, manifest = index.loaded.tokenizer, index.manifest
    rendered_prompt, prompt_ids = generation_prompt(query["prompt"], tokenizer, manifest, query.get("system"))
    if len(prompt_ids) + max_new_tokens > limits.max_query_tokens:
        raise RequestError(
            f"the prompt is {len(prompt_ids)} tokens; with max_new_tokens {max_new_tokens} that is over "
            f"this server's cap of {limits.max_query_tokens} tokens a query",
            422,
        )
    generated = index.generate_ids(prompt_ids, max_new_tokens)
    return prepare_generated(
        query["prompt"], rendered_prompt, prompt_ids, generated, tokenizer, manifest, query.get("hot")
    )


def check_lengths(prepared: PreparedQuery, limits: Limits) -> None:
    scored = len(prepared.response_positions)
    if scored > limits.max_response_tokens:
        raise RequestError(
            f"the response is {scored} tokens, over this server's cap of {limits.max_response_tokens} "
            "(shorten it, or attribute it with `rapidin-index query`)",
            422,
        )
    if len(prepared.input_ids) > limits.max_query_tokens:
        raise RequestError(
            f"the query is {len(prepared.input_ids)} tokens, over this server's cap of "
            f"{limits.max_query_tokens} (shorten the prompt)",
            422,
        )
