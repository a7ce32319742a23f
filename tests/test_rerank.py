"""Exact re-rank: a sketched index's shortlist, scored again without the sketch, is the K = 0 index's list."""

from __future__ import annotations

import pytest
from conftest import build_settings

from rapidin_index import build_index
from rapidin_index.retrieval import Index

PROMPT, RESPONSE = "What does str.upper do?", "Return a copy of the string converted to uppercase."


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, tiny_model_dirs, training_file) -> dict[int, Index]:
    root = tmp_path_factory.mktemp("rerank")
    opened = {}
    for sketch_dim in (0, 256):  # a small K: sketch noise reorders the list
        settings = build_settings(
            tiny_model_dirs["llama"], tiny_model_dirs["llama_lora"], sketch_dim=sketch_dim
        )
        build_index(training_file, root / str(sketch_dim), settings, progress=False)
        opened[sketch_dim] = Index.open(root / str(sketch_dim), device="cpu")
    return opened


def test_a_reranked_list_is_the_exact_indexs_list_on_the_same_rows(indexes):
    rows = indexes[0].manifest.row_count
    exact = indexes[0].query(PROMPT, RESPONSE, top_k=rows, explain=0, per_token=False)
    sketched = indexes[256].query(PROMPT, RESPONSE, top_k=rows, explain=0, per_token=False)
    assert [h.id for h in sketched.helpful] != [h.id for h in exact.helpful]  # the noise is real here
    reranked = indexes[256].query(PROMPT, RESPONSE, top_k=rows, explain=0, per_token=False, rerank=rows)
    assert [h.id for h in reranked.helpful] == [h.id for h in exact.helpful]
    assert [h.id for h in reranked.harmful] == [h.id for h in exact.harmful]
    for ours, theirs in zip(reranked.helpful, exact.helpful, strict=True):
        assert ours.reranked and ours.score == pytest.approx(theirs.score, abs=1e-4)
        assert ours.prompt == theirs.prompt


def test_a_short_rerank_reorders_its_shortlist_and_keeps_the_sketched_rest(indexes):
    exact = indexes[0].query(PROMPT, RESPONSE, top_k=24, explain=0, per_token=False)
    exact_scores = {hit.id: hit.score for hit in exact.helpful}
    sketched = indexes[256].query(PROMPT, RESPONSE, top_k=10, explain=0, per_token=False)
    reranked = indexes[256].query(PROMPT, RESPONSE, top_k=10, explain=0, per_token=False, rerank=4)
    head, tail = reranked.helpful[:4], reranked.helpful[4:]
    assert all(hit.reranked for hit in head) and not any(hit.reranked for hit in tail)
    assert [hit.score for hit in head] == sorted((hit.score for hit in head), reverse=True)
    assert {hit.id for hit in head} <= {hit.id for hit in sketched.helpful[:4]} | {
        h.id for h in sketched.harmful[:4]
    }
    for hit in head:
        assert hit.score == pytest.approx(exact_scores[hit.id], abs=1e-4)
    assert [hit.rank for hit in reranked.helpful] == list(range(1, 11))
