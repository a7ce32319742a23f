"""Many generations, one answer: which training rows drive a whole set of queries.

``mean`` and ``sum`` are linear: the set's score of a row is the inner product of the row's vector with
the mean (or sum) of the queries' whole-generation vectors, so one search with that vector ranks every
row exactly. ``max`` and ``count`` are not: they are read from each query's own top (and bottom) list
of ``depth`` rows, the same scan; a row outside every list has no score there. Every hit says in how
many queries' own lists it appears and carries its score against each query (from its stored vector).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rapidin_index.errors import QueryError
from rapidin_index.settings import AGGREGATIONS
from rapidin_index.store import index_folder, vector_index


@dataclass
class AggregateHit:
    id: int
    rank: int
    score: float
    """The set's score: mean or sum of the per-query scores, their max (min for harmful), or the count."""
    appears_in: int
    """How many queries have this row in their own top (harmful: bottom) ``depth`` rows."""
    query_scores: list[float]
    """The row's score against each query, in query order."""
    prompt: str | None = None
    response: str | None = None
    source: dict | None = None

    def to_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass
class AggregateResult:
    aggregate: str
    depth: int
    queries: list[dict]  # [{prompt, response}] in query order
    index: dict
    helpful: list[AggregateHit] = field(default_factory=list)
    harmful: list[AggregateHit] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "aggregate": self.aggregate,
            "depth": self.depth,
            "queries": self.queries,
            "index": self.index,
            "helpful": [hit.to_dict() for hit in self.helpful],
            "harmful": [hit.to_dict() for hit in self.harmful],
        }


def combined_vector(vectors: np.ndarray, how: str) -> np.ndarray:
    """The set's query vector [K]: the sum of the queries' whole-generation vectors, or their mean
    (also what max and count search beside each query's own)."""
    if how not in AGGREGATIONS:
        raise QueryError(f"--aggregate {how!r} is not one of {', '.join(AGGREGATIONS)}")
    if len(vectors) == 0:
        raise QueryError("--aggregate needs at least one query")
    return vectors.sum(0) if how == "sum" else vectors.mean(0)


def aggregate_found(
    index, prepared: list, vectors: np.ndarray, found: list, how: str, top_k: int, depth: int, rows: int
) -> AggregateResult:
    """One ranked helpful and harmful list for a set of prepared queries (`query.PreparedQuery`) from
    one search (`retrieval.search`) of [combined vector, each query's vector] over ``rows`` rows."""
    top_k = min(top_k, rows)
    per_query = [part[1:] for part in found]  # each query's own lists
    if how in ("mean", "sum"):
        helpful = list(zip(found[1][0][:top_k].tolist(), found[0][0][:top_k].tolist(), strict=True))
        harmful = list(zip(found[3][0][:top_k].tolist(), found[2][0][:top_k].tolist(), strict=True))
    else:
        helpful = _from_lists(per_query[1], per_query[0], how, top_k, largest=True)
        harmful = _from_lists(per_query[3], per_query[2], how, top_k, largest=False)
    result = AggregateResult(
        how,
        depth,
        [{"prompt": query.prompt, "response": query.response} for query in prepared],
        {"path": str(index.path), "row_count": rows, "sketch_dim": index.manifest.sketch["sketch_dim"]},
    )
    result.helpful = _hits(index, helpful, vectors, per_query[1])
    result.harmful = _hits(index, harmful, vectors, per_query[3])
    _join_text(index, result.helpful + result.harmful)
    return result


def _from_lists(ids: np.ndarray, scores: np.ndarray, how: str, top_k: int, largest: bool) -> list:
    """(id, set score) best first, from each query's own list: max (min) of its scores, or the count of
    lists it is in (ties broken by the summed score)."""
    gathered: dict[int, list[float]] = {}
    for row_ids, row_scores in zip(ids.tolist(), scores.tolist(), strict=True):
        for row_id, score in zip(row_ids, row_scores, strict=True):
            if row_id >= 0:
                gathered.setdefault(row_id, []).append(score)
    sign = 1.0 if largest else -1.0
    if how == "max":
        keyed = {row_id: sign * max(sign * s for s in found) for row_id, found in gathered.items()}
        order = sorted(keyed, key=lambda row_id: (-sign * keyed[row_id], row_id))
        return [(row_id, keyed[row_id]) for row_id in order[:top_k]]
    order = sorted(
        gathered, key=lambda row_id: (-len(gathered[row_id]), -sign * sum(gathered[row_id]), row_id)
    )
    return [(row_id, float(len(gathered[row_id]))) for row_id in order[:top_k]]


def _hits(index, ranked: list, vectors: np.ndarray, own_lists: np.ndarray) -> list[AggregateHit]:
    ids = [row_id for row_id, _ in ranked if row_id >= 0]
    stored = vector_index.vectors_of(index.stored_index, ids)  # [hits, K]
    scores = (stored @ vectors.T).tolist() if ids else []  # [hits, queries]
    members = [set(row.tolist()) for row in own_lists]
    return [
        AggregateHit(row_id, rank + 1, float(score), sum(row_id in m for m in members), per_query)
        for rank, ((row_id, score), per_query) in enumerate(zip(ranked, scores, strict=True))
    ]


def _join_text(index, hits: list[AggregateHit]) -> None:
    rows = index_folder.rows_of_hits(index.path, index.table, sorted({hit.id for hit in hits}))
    for hit in hits:
        row = rows[hit.id]
        hit.prompt, hit.response, hit.source = row["prompt"], row["response"], row["source"]
