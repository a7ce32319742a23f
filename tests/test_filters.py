"""Metadata filters at retrieval: the filtered top-k is brute force over the matching rows (K = 0)."""

from __future__ import annotations

import json

import pytest
from conftest import build_settings, docstring_rows
from rapidin_index.cli.main import app
from typer.testing import CliRunner

from rapidin_index import build_index
from rapidin_index.errors import QueryError
from rapidin_index.retrieval import Index

PROMPT, RESPONSE = "What does str.upper do?", "Return a copy of the string converted to uppercase."


@pytest.fixture(scope="module")
def tagged_index(tmp_path_factory, tiny_model_dirs) -> Index:
    root = tmp_path_factory.mktemp("filters")
    rows = docstring_rows(24)
    for number, row in enumerate(rows):
        row |= {"source": ("forum", "wiki", "blog")[number % 3], "year": 2000 + number}
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_index(data, root / "index", build_settings(tiny_model_dirs["llama"], sketch_dim=0), progress=False)
    return Index.open(root / "index", device="cpu")


def exact_scores(index: Index) -> dict[int, float]:
    rows = index.manifest.row_count
    result = index.query(PROMPT, RESPONSE, top_k=rows, explain=0, per_token=False)
    return {hit.id: hit.score for hit in result.helpful}


@pytest.mark.parametrize(
    ("where", "keep"),
    [
        ("source = 'forum'", lambda i: i % 3 == 0),
        ("source = 'forum' AND id < 12", lambda i: i % 3 == 0 and i < 12),
        ("year >= 2020 OR source = 'blog'", lambda i: 2000 + i >= 2020 or i % 3 == 2),
    ],
)
def test_the_filtered_top_k_is_brute_force_over_the_matching_rows(tagged_index, where, keep):
    scores = exact_scores(tagged_index)
    matching = sorted((i for i in scores if keep(i)), key=lambda i: -scores[i])
    result = tagged_index.query(PROMPT, RESPONSE, top_k=5, explain=0, where=where)
    assert [hit.id for hit in result.helpful] == matching[:5]  # never fewer than k when k rows match
    assert [hit.id for hit in result.harmful] == matching[::-1][:5]
    assert all(keep(hit.id) for token in result.tokens for hit in token.helpful + token.harmful)
    assert result.index["where"] == where and result.helpful[0].source["source"] in ("forum", "wiki", "blog")
    for hit in result.helpful:
        assert hit.score == pytest.approx(scores[hit.id], abs=1e-4)


def test_filters_refuse_what_cannot_work(tagged_index):
    with pytest.raises(QueryError, match="matches no row"):
        tagged_index.query(PROMPT, RESPONSE, explain=0, where="source = 'nowhere'")
    with pytest.raises(QueryError, match="columns: id, .*source.*year"):
        tagged_index.query(PROMPT, RESPONSE, explain=0, where="colour = 'red'")


def test_where_through_the_cli_and_with_aggregate(tagged_index, tmp_path):
    base = ["query", "--index", str(tagged_index.path), "--explain", "0", "--format", "json"]
    done = CliRunner().invoke(
        app, [*base, "--prompt", PROMPT, "--response", RESPONSE, "--where", "year < 2006"]
    )
    assert done.exit_code == 0, done.output
    assert {hit["id"] for hit in json.loads(done.stdout)["helpful"]} == set(range(6))
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"instruction": PROMPT, "output": RESPONSE}) + "\n")
    aggregated = CliRunner().invoke(
        app, [*base, "--queries", str(queries), "--aggregate", "sum", "--where", "source = 'wiki'"]
    )
    assert aggregated.exit_code == 0, aggregated.output
    assert all(hit["id"] % 3 == 1 for hit in json.loads(aggregated.stdout)["helpful"])
