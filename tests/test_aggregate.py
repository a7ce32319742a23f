"""Aggregation over many generations, against brute force over each query's own exact scores (K = 0)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_settings
from rapidin_index.cli.main import app
from typer.testing import CliRunner

from rapidin_index import build_index
from rapidin_index.retrieval import Index

QUERIES = [
    {
        "instruction": "What does str.upper do?",
        "output": "Return a copy of the string converted to uppercase.",
    },
    {"instruction": "What does list.append do?", "output": "Append object to the end of the list."},
    {
        "instruction": "What does dict.get do?",
        "output": "Return the value for key if key is in the dictionary.",
    },
]


@pytest.fixture(scope="module")
def exact_index(tmp_path_factory, tiny_model_dirs, training_file) -> Index:
    folder = tmp_path_factory.mktemp("aggregate") / "index"
    build_index(training_file, folder, build_settings(tiny_model_dirs["llama"], sketch_dim=0), progress=False)
    return Index.open(folder, device="cpu")


def per_query_scores(index: Index) -> np.ndarray:
    """[queries, rows]: each query's own exact whole-generation score of every row."""
    rows = index.manifest.row_count
    results = index.query_rows(QUERIES, top_k=rows, explain=0, per_token=False)
    scores = np.zeros((len(QUERIES), rows))
    for number, result in enumerate(results):
        for hit in result.helpful:
            scores[number, hit.id] = hit.score
    return scores


@pytest.mark.parametrize("how", ["mean", "sum"])
def test_mean_and_sum_rank_every_row_by_the_combined_per_query_scores(exact_index, how):
    scores = per_query_scores(exact_index)
    combined = scores.mean(0) if how == "mean" else scores.sum(0)
    rows = exact_index.manifest.row_count
    result = exact_index.aggregate(QUERIES, how, top_k=rows)
    assert [hit.id for hit in result.helpful] == np.argsort(-combined, kind="stable").tolist()
    for hit in result.helpful:
        assert hit.score == pytest.approx(combined[hit.id], abs=1e-4)
        assert hit.query_scores == pytest.approx(scores[:, hit.id].tolist(), abs=1e-4)
    assert [hit.id for hit in result.harmful][:5] == np.argsort(combined, kind="stable")[:5].tolist()
    assert result.helpful[0].prompt and result.helpful[0].source


def test_max_and_count_read_each_querys_own_top_list(exact_index):
    scores = per_query_scores(exact_index)
    depth = 5
    own = [set(np.argsort(-row, kind="stable")[:depth].tolist()) for row in scores]
    counted = exact_index.aggregate(QUERIES, "count", top_k=3, depth=depth)
    for hit in counted.helpful:
        assert hit.score == hit.appears_in == sum(hit.id in members for members in own)
    best_count = max(sum(i in members for members in own) for i in range(scores.shape[1]))
    assert counted.helpful[0].appears_in == best_count
    maxed = exact_index.aggregate(QUERIES, "max", top_k=3, depth=depth)
    expected = {i: max(scores[q, i] for q in range(len(QUERIES)) if i in own[q]) for i in set().union(*own)}
    assert [hit.id for hit in maxed.helpful] == sorted(expected, key=lambda i: -expected[i])[:3]
    assert maxed.helpful[0].score == pytest.approx(max(expected.values()), abs=1e-4)


def test_aggregate_through_the_cli(exact_index, tmp_path):
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(row) + "\n" for row in QUERIES))
    result = CliRunner().invoke(
        app, ["query", "--index", str(exact_index.path), "--queries", str(queries), "--aggregate", "mean"]
    )
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)
    assert value["aggregate"] == "mean" and len(value["queries"]) == 3 and len(value["helpful"]) == 10
    assert all(len(hit["query_scores"]) == 3 for hit in value["helpful"])
    refused = CliRunner().invoke(app, ["query", "--index", str(exact_index.path), "--prompt", "p",
                                       "--response", "r", "--aggregate", "mean"])  # fmt: skip
    assert refused.exit_code == 2 and "--aggregate needs --queries" in refused.output
