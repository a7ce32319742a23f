"""The query stage against brute force: whole-generation and per-token scores, hot tokens, refusals,
and the build's self-check taken by the query."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import brute_force_sketch, copy_with_other_chat_template
from rapidin_index.cli.main import app
from typer.testing import CliRunner

from rapidin_index import gradients, retrieval
from rapidin_index.build import build_index
from rapidin_index.capture import gradient_blocks
from rapidin_index.errors import IndexMismatchError, QueryError
from rapidin_index.models import load_model, select_parameters
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings
from rapidin_index.store.manifest import read_manifest, sealed, write_manifest


@pytest.fixture(scope="module", params=[0, 4096], ids=["exact", "rapidgrad"])
def built(request, tmp_path_factory, tiny_model_dirs, training_file):
    index_dir = tmp_path_factory.mktemp(f"index_k{request.param}")
    settings = BuildSettings(
        ModelSettings(tiny_model_dirs["llama"]),
        SketchSettings(request.param, 20, 42),
        batch_size=8,
        device="cpu",
        vector_dtype="float32",
    )
    build_index(training_file, index_dir, settings, progress=False)
    return index_dir, settings


@pytest.fixture(scope="module")
def opened(built):
    return Index.open(built[0], device="cpu")


def brute_force_vector(settings: BuildSettings, opened: Index, query, label_positions) -> torch.Tensor:
    """Sketch of the gradient of the mean loss over ``label_positions``, one plain backward."""
    loaded = load_model(settings.model)
    blocks = gradient_blocks(select_parameters(loaded.model, settings.model))
    pair = (query.input_ids, query.labels_for(label_positions))
    return brute_force_sketch(loaded.model, blocks, [pair], loaded.tokenizer.pad_token_id, settings.sketch)[0]


def all_stored(opened: Index) -> dict[int, np.ndarray]:
    from rapidin_index.store import vector_index

    ids, vectors = vector_index.stored_vectors(opened.faiss_index)
    return dict(zip(ids.tolist(), vectors, strict=True))


def test_whole_and_per_token_scores_equal_brute_force(built, opened, training_rows):
    _, settings = built
    row = training_rows[4]
    result = opened.query(row["instruction"], row["output"], top_k=24, explain=0)
    query = opened.prepare(row["instruction"], row["output"])
    stored = all_stored(opened)
    whole = brute_force_vector(settings, opened, query, query.response_positions).numpy()
    for hit in result.helpful:
        assert hit.score == pytest.approx(float(stored[hit.id] @ whole), abs=2e-3, rel=1e-3)
    assert [h.score for h in result.helpful] == sorted((h.score for h in result.helpful), reverse=True)
    assert {h.id for h in result.helpful} == set(range(24))
    for token in result.tokens[:: max(1, len(result.tokens) // 4)]:
        position = query.response_positions[token.position]
        expected = brute_force_vector(settings, opened, query, [position]).numpy()
        for hit in token.helpful[:3] + token.harmful[:3]:
            assert hit.score == pytest.approx(float(stored[hit.id] @ expected), abs=2e-3, rel=1e-3)
    assert len(result.tokens) == len(query.response_positions)
    assert result.tokens[-1].token_id == opened.loaded.tokenizer.eos_token_id


def test_a_training_row_retrieves_itself(opened, training_rows):
    rows = training_rows[:6]
    results = opened.query_rows(rows, top_k=3, explain=0)
    for number, result in enumerate(results):
        assert result.helpful[0].id == number, [h.id for h in result.helpful]
        assert result.helpful[0].source == rows[number]
        assert result.harmful[0].score <= result.helpful[-1].score


def test_the_public_stages_compose_into_a_query(opened, training_rows):
    row = training_rows[7]
    expected = opened.query(row["instruction"], row["output"], top_k=4, token_top_k=2, explain=0)
    query = opened.prepare(row["instruction"], row["output"])
    vectors, losses = retrieval.sketch_queries(opened, [query], per_token=True)
    assert vectors.shape == (1 + len(query.response_positions), opened.manifest.sketch["output_dim"])
    found = retrieval.search(opened, vectors, 4)
    results = retrieval.collect_results(opened, [query], found, losses, 4, 2, per_token=True)
    retrieval.join_text(opened, results)
    assert results[0].to_dict() == expected.to_dict()


def test_batched_queries_equal_single_queries(opened, training_rows):
    rows = training_rows[6:9]
    together = opened.query_rows(rows, top_k=5, explain=0)
    for row, batched in zip(rows, together, strict=True):
        alone = opened.query(row["instruction"], row["output"], top_k=5, explain=0)
        assert [h.id for h in alone.helpful] == [h.id for h in batched.helpful]
        np.testing.assert_allclose(
            [h.score for h in alone.helpful], [h.score for h in batched.helpful], rtol=1e-4, atol=1e-5
        )


def test_hot_words_restrict_the_loss(built, opened, training_rows):
    _, settings = built
    row = training_rows[2]
    word = row["output"].split()[1]
    result = opened.query(row["instruction"], row["output"], hot=[word], top_k=24, explain=0)
    query = opened.prepare(row["instruction"], row["output"], hot=[word])
    hot_tokens = [t for t in result.tokens if t.hot]
    assert 0 < len(hot_tokens) < len(result.tokens)
    assert word.strip() in "".join(t.token for t in hot_tokens)
    expected = brute_force_vector(settings, opened, query, query.hot_positions).numpy()
    stored = all_stored(opened)
    for hit in result.helpful[:5]:
        assert hit.score == pytest.approx(float(stored[hit.id] @ expected), abs=2e-3, rel=1e-3)
    spans = opened.query(row["instruction"], row["output"], hot=[[0, 2]], top_k=3, explain=0)
    assert [t.hot for t in spans.tokens][:3] == [True, True, False]


def test_explanations_score_every_response_token(opened, training_rows):
    row = training_rows[1]
    result = opened.query(row["instruction"], row["output"], top_k=4, explain=2)
    explained = [hit for hit in result.helpful + result.harmful if hit.explanation]
    assert len(explained) == 4
    top = result.helpful[0]
    tokens = opened.loaded.tokenizer(top.response, add_special_tokens=False).input_ids
    assert [t["token_id"] for t in top.explanation["tokens"]][: len(tokens)] == tokens
    assert all(np.isfinite(t["score"]) for t in top.explanation["tokens"])
    for hit in explained:  # token scores average to the exact score, which `score` equals at K = 0
        mean = np.mean([t["score"] for t in hit.explanation["tokens"]])
        assert hit.explanation["exact_score"] == pytest.approx(mean, rel=1e-6)
        if opened.manifest.sketch["sketch_dim"] == 0:
            assert hit.explanation["exact_score"] == pytest.approx(hit.score, rel=1e-3, abs=1e-4)


def test_generate_attributes_the_models_own_output(opened, training_rows):
    result = opened.query(
        training_rows[0]["instruction"], generate=True, max_new_tokens=8, top_k=2, explain=0
    )
    assert result.generated and result.response and len(result.tokens) >= 1


def test_bad_queries_get_clear_errors(opened, training_rows):
    with pytest.raises(QueryError, match="response is empty"):
        opened.query("What?", "  ")
    with pytest.raises(QueryError, match="past the index's --max-length"):
        opened.query("What?", "word " * 2000)
    with pytest.raises(QueryError, match="query row 1: .*fields"):
        opened.query_rows([training_rows[0], {"question": "no known fields"}])
    with pytest.raises(QueryError, match="hot word 'zebra'"):
        opened.query("What?", "An answer.", hot=["zebra"])
    with pytest.raises(QueryError, match="top-k"):
        opened.query("What?", "An answer.", top_k=0)


def test_mismatched_model_tokenizer_or_k_is_refused(built, tmp_path, tiny_model_dirs):
    index_dir, settings = built
    with pytest.raises(IndexMismatchError, match="model weights differ"):
        Index.open(index_dir, model=tiny_model_dirs["gpt2"], device="cpu")
    with pytest.raises(
        IndexMismatchError, match=f"index built with K={settings.sketch.sketch_dim}, query asked for K=65536"
    ):
        Index.open(index_dir, sketch_dim=65536, device="cpu")
    changed = copy_with_other_chat_template(tiny_model_dirs["llama"], tmp_path / "model")
    with pytest.raises(IndexMismatchError, match="tokenizer differs"):
        Index.open(index_dir, model=changed, device="cpu")


def test_cli_query_json_jsonl_and_html(built, tmp_path, training_rows):
    index_dir, _ = built
    runner = CliRunner()
    row = training_rows[3]
    args = ["query", "--index", str(index_dir), "--prompt", row["instruction"], "--response", row["output"]]
    result = runner.invoke(app, args + ["--top-k", "2", "--explain", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)
    assert value["helpful"][0]["id"] == 3 and value["tokens"][0]["helpful"]
    queries = tmp_path / "queries.jsonl"
    hot_row = training_rows[1] | {"hot": [training_rows[1]["output"].split()[0]]}
    queries.write_text(json.dumps(training_rows[0]) + "\n" + json.dumps(hot_row) + "\n")
    out = tmp_path / "out.jsonl"
    many = runner.invoke(
        app,
        ["query", "--index", str(index_dir), "--queries", str(queries), "--out", str(out), "--explain", "0"],
    )
    assert many.exit_code == 0, many.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["helpful"][0]["id"] == 0
    assert all(t["hot"] for t in lines[0]["tokens"]) and not all(t["hot"] for t in lines[1]["tokens"])
    assert lines[1]["query"]["hot"] == hot_row["hot"]
    html = tmp_path / "report.html"
    page = runner.invoke(app, args + ["--out", str(html), "--explain", "1"])
    assert page.exit_code == 0 and "gen-token" in html.read_text()
    bad = runner.invoke(app, ["query", "--index", str(index_dir), "--prompt", "x"])
    assert bad.exit_code == 2 and "--response TEXT or --generate" in bad.output


def test_an_index_opens_with_the_sketch_it_was_built_with(
    tmp_path, tiny_model_dirs, training_file, training_rows
):
    """A rapidgrad-v1 index keeps querying with v1 now that v2 is the default: a row finds itself."""
    settings = BuildSettings(
        ModelSettings(tiny_model_dirs["llama"]),
        SketchSettings(1024, 20, 42, "rapidgrad-v1"),
        device="cpu",
        vector_dtype="float32",
    )
    build_index(training_file, tmp_path / "v1", settings, progress=False)
    opened = Index.open(tmp_path / "v1", device="cpu")
    row = training_rows[3]
    result = opened.query(row["instruction"], row["output"], top_k=3, explain=0)
    stored = all_stored(opened)[3]
    assert result.helpful[0].id == 3
    assert result.helpful[0].score == pytest.approx(float(stored @ stored), rel=1e-4)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("algorithm", "rapidgrad-v9", "sketch algorithm 'rapidgrad-v9'.*not implement"),
        ("format_version", 99, "format version 99 is newer"),
    ],
)
def test_an_unknown_sketch_or_format_is_refused_by_name(built, tmp_path, field, value, message):
    import shutil

    index_dir = tmp_path / "edited"
    shutil.copytree(built[0], index_dir)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    if field == "algorithm":
        manifest["sketch"]["algorithm"] = value
    else:
        manifest[field] = value
    (index_dir / "manifest.json").write_text(json.dumps(sealed(manifest)))  # as if written so
    with pytest.raises(ValueError, match=message):
        Index.open(index_dir, device="cpu")
    refused = CliRunner().invoke(
        app, ["query", "--index", str(index_dir), "--prompt", "a", "--response", "b"]
    )
    assert refused.exit_code == 2 and "Traceback" not in refused.output


def test_whole_generation_only_and_token_counts(opened, training_rows):
    row = training_rows[5]
    full = opened.query(row["instruction"], row["output"], top_k=7, token_top_k=2, explain=0)
    assert len(full.helpful) == 7 and all(len(t.helpful) == 2 == len(t.harmful) for t in full.tokens)
    fast = opened.query(row["instruction"], row["output"], top_k=7, per_token=False, explain=0)
    assert [h.id for h in fast.helpful] == [h.id for h in full.helpful]
    np.testing.assert_allclose(
        [h.score for h in fast.helpful], [h.score for h in full.helpful], rtol=1e-4, atol=1e-5
    )
    assert [h.id for h in fast.harmful] == [h.id for h in full.harmful]
    assert len(fast.tokens) == len(full.tokens) and all(not t.helpful and t.loss is None for t in fast.tokens)
    cli = CliRunner().invoke(
        app,
        ["query", "--index", str(opened.path), "--prompt", row["instruction"], "--response", row["output"]]
        + ["--per-token", "off", "--top-k", "4", "--explain", "0", "--device", "cpu"],
    )
    assert cli.exit_code == 0, cli.output
    assert [h["id"] for h in json.loads(cli.stdout)["helpful"]] == [h.id for h in full.helpful[:4]]


def test_one_scan_gives_the_same_lists_as_two_searches(opened, training_rows):
    from rapidin_index.store import vector_index

    queries = np.random.default_rng(0).standard_normal((6, opened.faiss_index.d)).astype(np.float32)
    helpful_scores, helpful_ids, harmful_scores, harmful_ids = vector_index.search_both(
        opened.faiss_index, queries, 5
    )
    scores, ids = vector_index.search(opened.faiss_index, queries, 5)
    negated_scores, negated_ids = vector_index.search(opened.faiss_index, -queries, 5)
    np.testing.assert_array_equal(helpful_ids, ids)
    np.testing.assert_array_equal(harmful_ids, negated_ids)
    np.testing.assert_allclose(helpful_scores, scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(harmful_scores, -negated_scores, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- the build's self-check, taken by the query
# A query that finds its environment among the manifest's ``self_checks`` runs no plain backward of its
# own and puts the manifest's exact-path tensors on the exact path; anywhere else, or with ``verify``, it
# checks again. Either way its vectors are the same.


def squared_weight_forward(self, hidden_states):
    """An RMSNorm that is not affine in its weight: the hooks' rule for it is wrong, the self-check says."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight**2 * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


@pytest.fixture
def patched_norm(monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", squared_weight_forward)


@pytest.fixture(scope="module")
def checked_index(tmp_path_factory, tiny_model_dirs, training_file) -> str:
    index_dir = tmp_path_factory.mktemp("self-checked")
    settings = BuildSettings(
        ModelSettings(tiny_model_dirs["llama"]),
        SketchSettings(1024, 20, 42),
        batch_size=8,
        device="cpu",
        vector_dtype="float32",
    )
    build_index(training_file, index_dir, settings, progress=False)
    return str(index_dir)


def count_plain_backwards(monkeypatch) -> list:
    calls = []
    original = gradients.plain_gradients

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gradients, "plain_gradients", counted)
    return calls


def query_vectors(opened: Index, row: dict) -> tuple[list[int], np.ndarray]:
    result = opened.query(row["instruction"], row["output"], top_k=5, token_top_k=2, explain=0)
    token_scores = [hit.score for token in result.tokens for hit in token.helpful]
    return [hit.id for hit in result.helpful], np.array([hit.score for hit in result.helpful] + token_scores)


def test_the_build_records_where_its_check_ran(checked_index, tiny_model_dirs):
    manifest = read_manifest(checked_index)
    opened = Index.open(checked_index, device="cpu")
    assert manifest.self_checks == [gradients.check_environment(opened.loaded.model)]
    entry = manifest.self_checks[0]
    assert entry["device"] == "cpu" and entry["dtype"] == "float32" and entry["torch"] == torch.__version__
    assert opened.sketcher.self_checked  # taken from the build: no check is pending


def test_a_query_takes_the_builds_check_and_verify_checks_again(checked_index, training_rows, monkeypatch):
    calls = count_plain_backwards(monkeypatch)
    trusted = query_vectors(Index.open(checked_index, device="cpu"), training_rows[3])
    assert not calls  # not one plain backward: the build checked these weights here
    checked = query_vectors(Index.open(checked_index, device="cpu", verify=True), training_rows[3])
    assert calls  # one plain backward a checked row (a query is one row)
    assert trusted[0] == checked[0]
    np.testing.assert_allclose(trusted[1], checked[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "field,value", [("torch", "0.0.1"), ("transformers", "0.0.1"), ("device", "cuda"), ("dtype", "bfloat16")]
)
def test_another_environment_checks_again(checked_index, tmp_path, training_rows, monkeypatch, field, value):
    import shutil

    copy = shutil.copytree(checked_index, tmp_path / "index")
    manifest = read_manifest(copy)
    manifest.self_checks = [{**manifest.self_checks[0], field: value}]
    write_manifest(copy, manifest)
    calls = count_plain_backwards(monkeypatch)
    opened = Index.open(copy, device="cpu")
    assert not opened.sketcher.self_checked
    query_vectors(opened, training_rows[3])
    assert calls  # one plain backward a checked row (a query is one row)


def test_the_builds_exact_path_is_the_querys(tmp_path, tiny_model_dirs, training_file, patched_norm):
    """The build moved the norms to the exact path; a query that takes its check moves them too, and
    scores as one that checks again (where its own check moves them)."""
    settings = BuildSettings(
        ModelSettings(tiny_model_dirs["llama"]),
        SketchSettings(1024, 20, 42),
        batch_size=8,
        device="cpu",
        vector_dtype="float32",
    )
    build_index(training_file, tmp_path / "index", settings, progress=False)
    manifest = read_manifest(tmp_path / "index")
    norms = {name for name in manifest.parameters["names"] if "norm" in name}
    assert set(manifest.backward_path) == norms and manifest.self_checks
    trusted = Index.open(tmp_path / "index", device="cpu")
    assert norms <= set(trusted.sketcher.backward_path)
    checked = Index.open(tmp_path / "index", device="cpu", verify=True)
    rows = [json.loads(line) for line in open(training_file)][:2]
    for row in rows:
        ours, theirs = query_vectors(trusted, row), query_vectors(checked, row)
        assert ours[0] == theirs[0]
        np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
    assert norms <= set(checked.sketcher.backward_path)


def test_a_new_shell_takes_the_builds_check(checked_index):
    """check_environment is the same in another process, whatever its hash seed."""
    code = (
        "import sys; from rapidin_index.retrieval import Index; "
        "print(Index.open(sys.argv[1], device='cpu').sketcher.self_checked)"
    )
    for seed in (0, 7):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run(
            [sys.executable, "-c", code, checked_index], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "True"


def test_open_maps_the_vectors_file_and_searches_it_as_faiss_would(built, opened, training_rows):
    """Index.open reads the ids, not the vectors (no FAISS index until one is asked for); the blocked scan
    of the mapped file gives FAISS's own lists."""
    from rapidin_index.store import vector_index
    from rapidin_index.store.vector_file import StoredVectors

    fresh = Index.open(built[0], device="cpu")
    assert isinstance(fresh.stored_index, StoredVectors) and fresh._faiss_index is None
    assert not fresh.stored_index.drop_pages and fresh.stored_index.count == fresh.manifest.row_count
    queries = np.random.default_rng(3).standard_normal((4, fresh.stored_index.dimension)).astype(np.float32)
    scores, ids = vector_index.search(fresh.faiss_index, queries, 6)  # FAISS, its vectors mapped
    negated_scores, negated_ids = vector_index.search(fresh.faiss_index, -queries, 6)
    found = retrieval.search(fresh, queries, 6)
    np.testing.assert_array_equal(found[1], ids)
    np.testing.assert_array_equal(found[3], negated_ids)
    # float32 sums in another order (scores near 10 lose 1e-5 absolute where they nearly cancel)
    np.testing.assert_allclose(found[0], scores, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(found[2], -negated_scores, rtol=1e-5, atol=1e-4)


def test_cli_max_memory_caps_the_scan_or_refuses_on_one_line(built, training_rows):
    index_dir, _ = built
    row = training_rows[3]
    args = ["query", "--index", str(index_dir), "--prompt", row["instruction"], "--response", row["output"]]
    args += ["--top-k", "3", "--explain", "0", "--device", "cpu", "--per-token", "off"]
    stored = Index.open(index_dir, device="cpu").stored_index
    blocks_of_three_rows = 16 * stored.count + 2 * 3 * (4 * stored.dimension + 8 * 64)  # bytes
    runner = CliRunner()
    free = runner.invoke(app, args)
    capped = runner.invoke(app, [*args, "--max-memory", str(blocks_of_three_rows)])
    assert free.exit_code == capped.exit_code == 0, capped.output
    capped_hits, free_hits = json.loads(capped.stdout)["helpful"], json.loads(free.stdout)["helpful"]
    assert [hit["id"] for hit in capped_hits] == [hit["id"] for hit in free_hits]
    np.testing.assert_allclose(  # other block shapes: float32 sums in another order
        [hit["score"] for hit in capped_hits], [hit["score"] for hit in free_hits], rtol=1e-5
    )
    refused = runner.invoke(app, [*args, "--max-memory", "200B"])
    assert refused.exit_code == 2 and "--max-memory 200B is too small for" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    unreadable = runner.invoke(app, [*args, "--max-memory", "lots"])
    assert unreadable.exit_code == 2 and "--max-memory 'lots' is not a size" in unreadable.output
