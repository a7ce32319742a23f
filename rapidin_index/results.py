"""Typed query results; ``to_dict()`` gives the JSON documented in docs/query-result-schema.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1


@dataclass
class Hit:
    """One retrieved training example."""

    id: int
    rank: int
    score: float
    prompt: str | None = None
    response: str | None = None
    source: dict | None = None
    explanation: dict | None = None  # {"tokens": [{token, token_id, score}], "method", "normalization"}
    reranked: bool | None = None
    """True when --rerank scored it again without the sketch (its JSON key: ``exact``)."""

    @property
    def exact(self) -> bool | None:
        """`reranked` by its name before issue 24 (and in the JSON), kept for the callers that read it."""
        return self.reranked

    def to_dict(self) -> dict:
        keys = {"reranked": "exact"}  # the JSON schema's name (docs/query-result-schema.md)
        return {keys.get(key, key): value for key, value in asdict(self).items() if value is not None}


@dataclass
class TokenHits:
    """One generated token and its own top training examples (ids and scores only)."""

    position: int
    token: str
    token_id: int
    loss: float | None  # None when the query ran without per-token vectors (per_token off)
    hot: bool
    helpful: list[Hit] = field(default_factory=list)
    harmful: list[Hit] = field(default_factory=list)

    def to_dict(self) -> dict:
        value = {k: getattr(self, k) for k in ("position", "token", "token_id", "loss", "hot")}
        value["helpful"] = [hit.to_dict() for hit in self.helpful]
        value["harmful"] = [hit.to_dict() for hit in self.harmful]
        return value


@dataclass
class QueryResult:
    prompt: str
    response: str
    rendered_prompt: str
    generated: bool
    hot: object
    index: dict
    tokens: list[TokenHits]
    helpful: list[Hit]
    harmful: list[Hit]
    rendered_response: str = ""
    """The rendered text after the prompt: the labelled tokens' text (a chat template's end of turn too)."""
    tokenization: str = "trl"
    """The labelling rule the index's rows (and so this query) were tokenized with."""

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "query": {
                "prompt": self.prompt,
                "response": self.response,
                "rendered_prompt": self.rendered_prompt,
                "rendered_response": self.rendered_response,
                "labelled_tokens": [token.token for token in self.tokens],
                "tokenization": self.tokenization,
                "generated": self.generated,
                "hot": self.hot,
            },
            "index": self.index,
            "tokens": [token.to_dict() for token in self.tokens],
            "helpful": [hit.to_dict() for hit in self.helpful],
            "harmful": [hit.to_dict() for hit in self.harmful],
        }
