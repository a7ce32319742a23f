"""Typed query results (results.py): ``to_dict()`` is the JSON of docs/query-result-schema.md."""

from __future__ import annotations

import json
from pathlib import Path

from rapidin_index.results import SCHEMA_VERSION, Hit, QueryResult, TokenHits

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "query-result-schema.md"


def _result() -> QueryResult:
    explained = Hit(
        id=7,
        rank=1,
        score=0.91,
        prompt="What does str.upper do?",
        response="Return a copy.",
        source={"instruction": "What does str.upper do?", "output": "Return a copy."},
        explanation={"tokens": [{"token": " Return", "token_id": 512, "score": 0.12}], "method": "jvp"},
    )
    token = TokenHits(
        position=0,
        token=" Return",
        token_id=512,
        loss=2.31,
        hot=True,
        helpful=[Hit(id=7, rank=1, score=0.83)],
        harmful=[Hit(id=3, rank=1, score=-0.41)],
    )
    return QueryResult(
        prompt="What does str.upper do?",
        response="Return a copy.",
        rendered_prompt="### Instruction: What does str.upper do?",
        generated=False,
        hot=None,
        index={"path": "index", "row_count": 24},
        tokens=[token],
        helpful=[explained],
        harmful=[Hit(id=3, rank=1, score=-0.5, prompt="p", response="r")],
    )


def test_a_hit_leaves_out_what_it_does_not_have():
    assert Hit(id=3, rank=2, score=-0.5).to_dict() == {"id": 3, "rank": 2, "score": -0.5}
    full = _result().helpful[0].to_dict()
    assert set(full) == {"id", "rank", "score", "prompt", "response", "source", "explanation"}


def test_token_hits_keep_a_missing_loss_as_null():
    token = TokenHits(position=4, token="!", token_id=9, loss=None, hot=False)
    assert token.to_dict() == {
        "position": 4,
        "token": "!",
        "token_id": 9,
        "loss": None,
        "hot": False,
        "helpful": [],
        "harmful": [],
    }


def test_a_query_result_is_the_documented_json():
    value = json.loads(json.dumps(_result().to_dict()))  # plain JSON all the way down
    assert list(value) == ["schema_version", "query", "index", "tokens", "helpful", "harmful"]
    assert value["schema_version"] == SCHEMA_VERSION
    assert value["query"] == {
        "prompt": "What does str.upper do?",
        "response": "Return a copy.",
        "rendered_prompt": "### Instruction: What does str.upper do?",
        "rendered_response": "",
        "labelled_tokens": [" Return"],
        "tokenization": "trl",
        "generated": False,
        "hot": None,
    }
    assert value["index"] == {"path": "index", "row_count": 24}
    assert value["tokens"][0]["helpful"] == [{"id": 7, "rank": 1, "score": 0.83}]
    assert value["tokens"][0]["harmful"] == [{"id": 3, "rank": 1, "score": -0.41}]
    assert value["helpful"][0]["explanation"]["method"] == "jvp"
    assert value["harmful"] == [{"id": 3, "rank": 1, "score": -0.5, "prompt": "p", "response": "r"}]


def test_every_key_the_result_writes_is_in_the_schema_document():
    documented = SCHEMA_DOC.read_text()
    value = _result().to_dict()
    keys = {*value, *value["query"], *value["tokens"][0], *value["helpful"][0]}
    assert f'"schema_version": {SCHEMA_VERSION}' in documented
    assert sorted(key for key in keys if f'"{key}"' not in documented) == []


def test_the_names_before_issue_24_still_read_the_same_fields():
    from rapidin_index.build import BuildReport

    hit = Hit(id=3, rank=1, score=0.5, reranked=True)
    assert hit.exact is True and hit.to_dict()["exact"] is True and "reranked" not in hit.to_dict()
    assert Hit(id=3, rank=1, score=0.5).exact is None
    report = BuildReport("index", backward_path={"model.norm.weight": "not a linear layer"})
    assert report.exact_path == {"model.norm.weight": "not a linear layer"}
