"""Exact re-rank of a shortlist: the rows a sketched search puts on top, scored again without the sketch.

At K > 0 every score carries sketch noise; the top of a list is what users act on. For the top and
bottom ``count`` rows of a query's whole-generation lists, the exact layer-normalised gradient of each
row (one plain backward of the index's model, the K = 0 vector) is dotted with the query's own exact
gradient, and both lists are re-ordered by that score. Hits scored so are marked ``reranked`` (JSON:
``"exact": true``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rapidin_index.data import Rendered, render_row, tokenize_example
from rapidin_index.errors import RowError
from rapidin_index.gradients import normalize_flat, reference_gradient
from rapidin_index.losses import collate


def exact_query_direction(index, query) -> torch.Tensor:
    """The query's whole-generation gradient [D], normalised as the index normalises (the K = 0 vector)."""
    tokenizer = index.loaded.tokenizer
    batch = collate(
        [(query.input_ids, query.labels_for(query.hot_positions))], tokenizer.pad_token_id, index.device
    )
    raw = scale_flat(reference_gradient(index.loaded.model, index.blocks, batch)[None], index)
    return normalize_flat(raw, index.blocks, index.manifest.normalize)[0]


def scale_flat(raw: torch.Tensor, index) -> torch.Tensor:
    """Raw gradients [n, D] scaled by the index's optimizer state, as its rows were (`optimizer_state`)."""
    from rapidin_index.optimizer_state import scale_flat as scaled

    return scaled(raw, index.blocks, getattr(index, "optimizer_scaling", None))


def training_row(index, hit) -> Rendered:
    """A hit's training row rendered again from its source, as the build rendered it."""
    try:
        return render_row(hit.source, index.loaded.tokenizer, index.template)
    except RowError:  # only a row the build rendered is stored; its text is the fallback
        return Rendered(hit.prompt, hit.response, hit.response)


def exact_row_vector(index, hit) -> torch.Tensor:
    """A training row's exact normalised gradient [D]: what a K = 0 index stores for it."""
    tokenizer, manifest = index.loaded.tokenizer, index.manifest
    input_ids, labels, _ = tokenize_example(
        training_row(index, hit), None, tokenizer, manifest.max_length, manifest.tokenization
    )
    batch = collate([(input_ids, labels)], tokenizer.pad_token_id, index.device)
    raw = scale_flat(reference_gradient(index.loaded.model, index.blocks, batch)[None], index)
    return normalize_flat(raw, index.blocks, manifest.normalize)[0]


def rerank_hits(index, query, result, count: int, top_k: int) -> None:
    """Re-score the top and bottom ``count`` whole-generation hits exactly and re-order them; each list
    holds its ``count`` best exact rows first, then (``top_k`` > ``count``) the next sketched ones."""
    direction = exact_query_direction(index, query)
    candidates = {hit.id: hit for hit in result.helpful[:count] + result.harmful[:count]}
    scores = {row_id: float(exact_row_vector(index, hit) @ direction) for row_id, hit in candidates.items()}
    ordered = sorted(candidates, key=lambda row_id: (-scores[row_id], row_id))
    reranked = {
        row_id: replace(candidates[row_id], score=scores[row_id], reranked=True) for row_id in ordered
    }
    result.helpful = _ranked([reranked[i] for i in ordered[:count]], result.helpful[count:], top_k)
    result.harmful = _ranked([reranked[i] for i in ordered[::-1][:count]], result.harmful[count:], top_k)


def _ranked(reranked_hits: list, sketched_hits: list, top_k: int) -> list:
    kept = {hit.id for hit in reranked_hits}
    hits = reranked_hits + [hit for hit in sketched_hits if hit.id not in kept]
    return [replace(hit, rank=rank) for rank, hit in enumerate(hits[:top_k], start=1)]
