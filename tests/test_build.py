"""The caching stage end to end: stored vectors, text, rejects, resume after a kill, append, refusals."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import brute_force_sketch, build_settings, stored_vectors

from rapidin_index.build import build_index
from rapidin_index.capture import gradient_blocks
from rapidin_index.data import load_examples, parse_template
from rapidin_index.errors import BuildError, JournalError, QueryError, RejectedRowsError
from rapidin_index.gradients import normalize_flat, reference_gradient
from rapidin_index.losses import collate
from rapidin_index.models import load_model, select_parameters
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings
from rapidin_index.store import index_folder, row_table, vector_index
from rapidin_index.store.index_folder import JOURNAL_DIR
from rapidin_index.store.journal import CRASH_AFTER_VECTORS_ENV
from rapidin_index.store.manifest import read_manifest


def settings_for(
    tiny_model_dirs, architecture="llama", lora=False, sketch_dim=4096, **overrides
) -> BuildSettings:
    adapter = tiny_model_dirs[f"{architecture}_lora"] if lora else None
    return build_settings(tiny_model_dirs[architecture], adapter, sketch_dim, **overrides)


def brute_force_vectors(settings: BuildSettings, data_file) -> dict[int, torch.Tensor]:
    loaded = load_model(settings.model)
    blocks = gradient_blocks(select_parameters(loaded.model, settings.model))
    examples, _ = load_examples(data_file, loaded.tokenizer, parse_template("auto"), settings.max_length)
    pairs = [(example.input_ids, example.labels) for example in examples]
    sketched = brute_force_sketch(loaded.model, blocks, pairs, loaded.tokenizer.pad_token_id, settings.sketch)
    return {example.example_id: vector for example, vector in zip(examples, sketched, strict=True)}


@pytest.mark.parametrize(
    "architecture,lora", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)]
)
def test_stored_vectors_equal_brute_force(
    tmp_path, tiny_model_dirs, training_file, training_rows, architecture, lora
):
    settings = settings_for(tiny_model_dirs, architecture, lora)
    report = build_index(training_file, tmp_path / "index", settings, progress=False)
    assert report.rows_indexed == len(training_rows) and report.rows_rejected == 0
    vectors = stored_vectors(tmp_path / "index")
    expected = brute_force_vectors(settings, training_file)
    assert sorted(vectors) == list(range(len(training_rows)))
    for example_id, vector in expected.items():
        np.testing.assert_allclose(vectors[example_id], vector.numpy(), atol=3e-5, rtol=1e-4)
    rows = row_table.read_rows(index_folder.open_rows(tmp_path / "index", 1), [0, 5])
    assert rows[5]["source"] == training_rows[5]
    assert rows[5]["response"] == training_rows[5]["output"]
    assert rows[0]["num_tokens"] > rows[0]["num_response_tokens"] > 0
    assert rows[0]["gradient_norm"] > 0 and rows[0]["loss"] > 0 and len(rows[0]["content_hash"]) == 64
    assert not (tmp_path / "index" / JOURNAL_DIR).exists()


def test_malformed_rows_are_reported_and_the_rest_indexed(tmp_path, tiny_model_dirs, training_rows):
    lines = [json.dumps(row) for row in training_rows[:6]]
    lines[1] = "{not json"
    lines[3] = json.dumps({"instruction": "no output field"})
    lines[4] = json.dumps({"instruction": "empty", "output": "   "})
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    report = build_index(data, tmp_path / "index", settings_for(tiny_model_dirs), progress=False)
    assert report.rows_indexed == 3
    assert {row.example_id for row in report.rejected} == {1, 3, 4}
    reasons = {row.example_id: row.reason for row in report.rejected}
    assert "not valid JSON" in reasons[1] and "output" in reasons[3] and "empty response" in reasons[4]
    assert sorted(stored_vectors(tmp_path / "index")) == [0, 2, 5]
    manifest = read_manifest(tmp_path / "index")
    assert manifest.rejected_count == 3 and manifest.row_count == 3
    with pytest.raises(BuildError, match="row 1: .*--strict"):
        build_index(data, tmp_path / "strict", settings_for(tiny_model_dirs, strict=True), progress=False)


def test_rerun_on_a_finished_index_does_nothing(tmp_path, tiny_model_dirs, training_file):
    settings = settings_for(tiny_model_dirs)
    build_index(training_file, tmp_path / "index", settings, progress=False)
    before = (tmp_path / "index" / "manifest.json").read_bytes()
    again = build_index(training_file, tmp_path / "index", settings, progress=False)
    assert again.nothing_to_do and "nothing to do" in again.message
    assert (tmp_path / "index" / "manifest.json").read_bytes() == before


def run_build_process(index_dir, data, model_dir, env_extra=None) -> subprocess.Popen:
    code = (
        "import sys; from rapidin_index.build import *; from rapidin_index.settings import ModelSettings;"
        "from rapidin_index.settings import SketchSettings;"
        f"build_index({str(data)!r}, {str(index_dir)!r}, BuildSettings(ModelSettings({model_dir!r}),"
        " SketchSettings(4096, 20, 42), batch_size=4, chunk_size=4, device='cpu', vector_dtype='float32'),"
        " progress=False)"
    )
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env_extra or {})})


def test_kill_mid_write_then_resume_gives_the_same_index(
    tmp_path, tiny_model_dirs, training_file, training_rows
):
    model_dir = tiny_model_dirs["llama"]
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    assert run_build_process(reference_dir, training_file, model_dir).wait() == 0
    # SIGKILL between writing chunk 2's vectors and its record: a torn chunk on disk.
    process = run_build_process(crashed_dir, training_file, model_dir, {CRASH_AFTER_VECTORS_ENV: "2"})
    assert process.wait() == -signal.SIGKILL
    journal = crashed_dir / JOURNAL_DIR
    assert (journal / "chunk-000002.npy").exists() and not (journal / "chunk-000002.json").exists()
    assert not (crashed_dir / "manifest.json").exists()
    report = build_index(
        training_file, crashed_dir, settings_for(tiny_model_dirs, chunk_size=4), progress=False
    )
    assert report.resumed_chunks == 2
    expected, resumed = stored_vectors(reference_dir), stored_vectors(crashed_dir)
    assert sorted(resumed) == sorted(expected) == list(range(len(training_rows)))
    for example_id in expected:
        np.testing.assert_allclose(resumed[example_id], expected[example_id], atol=1e-6)
    assert index_folder.count_rows(crashed_dir, 1) == len(training_rows)


def test_external_kill_at_a_random_moment_then_resume(
    tmp_path, tiny_model_dirs, training_file, training_rows
):
    index_dir = tmp_path / "index"
    process = run_build_process(index_dir, training_file, tiny_model_dirs["llama"])
    deadline = time.time() + 120
    while not list((index_dir / JOURNAL_DIR).glob("chunk-*.json")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    build_index(training_file, index_dir, settings_for(tiny_model_dirs, chunk_size=4), progress=False)
    assert sorted(stored_vectors(index_dir)) == list(range(len(training_rows)))
    ids = [row["id"] for row in index_folder.read_all_rows(index_dir, read_manifest(index_dir).generation)]
    assert sorted(ids) == list(range(len(training_rows)))


def test_resume_with_other_arguments_is_refused(tmp_path, tiny_model_dirs, training_file):
    process = run_build_process(
        tmp_path / "index", training_file, tiny_model_dirs["llama"], {CRASH_AFTER_VECTORS_ENV: "0"}
    )
    process.wait()
    with pytest.raises(JournalError, match="unfinished build with other arguments"):
        build_index(
            training_file,
            tmp_path / "index",
            settings_for(tiny_model_dirs, sketch_dim=1024, chunk_size=4),
            progress=False,
        )


def test_append_adds_rows_with_continuing_ids(tmp_path, tiny_model_dirs, training_rows):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.csv"
    first.write_text("".join(json.dumps(row) + "\n" for row in training_rows[:10]))
    second.write_text(
        "instruction,output\n"
        + "".join(f'"{r["instruction"]}","{r["output"]}"\n' for r in training_rows[10:14])
    )
    settings = settings_for(tiny_model_dirs)
    build_index(first, tmp_path / "index", settings, progress=False)
    report = build_index(second, tmp_path / "index", settings, append=True, progress=False)
    assert report.rows_indexed == 14
    vectors = stored_vectors(tmp_path / "index")
    assert sorted(vectors) == list(range(14))
    manifest = read_manifest(tmp_path / "index")
    assert manifest.generation == 2 and [s["id_offset"] for s in manifest.sources] == [0, 10]
    assert not (tmp_path / "index" / "vectors-g0001.faiss").exists()
    assert (
        row_table.read_rows(index_folder.open_rows(tmp_path / "index", 2), [12])[12]["source"]["instruction"]
        == training_rows[12]["instruction"]
    )
    expected = brute_force_vectors(settings, first)
    np.testing.assert_allclose(vectors[3], expected[3].numpy(), atol=3e-5, rtol=1e-4)
    with pytest.raises(BuildError, match="sketch.sketch_dim: index has 4096, asked for 1024"):
        build_index(
            second,
            tmp_path / "index",
            settings_for(tiny_model_dirs, sketch_dim=1024),
            append=True,
            progress=False,
        )
    fourth = tmp_path / "fourth.jsonl"  # new rows: the same ones again are refused for that (test_cli)
    fourth.write_text(json.dumps(training_rows[15]) + "\n")
    with pytest.raises(BuildError, match="model.fingerprint"):
        build_index(
            fourth, tmp_path / "index", settings_for(tiny_model_dirs, "gpt2"), append=True, progress=False
        )
    with pytest.raises(BuildError, match="--append needs a finished index"):
        build_index(second, tmp_path / "missing", settings, append=True, progress=False)
    third = tmp_path / "third.jsonl"
    third.write_text(json.dumps(training_rows[20]) + "\n")
    with pytest.raises(BuildError, match="other data"):
        build_index(third, tmp_path / "index", settings, progress=False)


def test_non_finite_gradients_are_reported_never_inserted(tmp_path, tiny_model_dirs, training_file):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_model_dirs["llama"], broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    settings = BuildSettings(
        ModelSettings(str(broken)), SketchSettings(256), batch_size=4, chunk_size=8, device="cpu"
    )
    with pytest.raises(RejectedRowsError, match="no row of .* could be indexed") as raised:
        build_index(training_file, tmp_path / "index", settings, progress=False)
    report = raised.value.report  # the index is committed all the same, and its report comes with the error
    assert report.rows_indexed == 0 and report.rows_rejected == 24
    assert all("non-finite gradient" in row.reason for row in report.rejected)
    assert stored_vectors(tmp_path / "index") == {}
    from rapidin_index.retrieval import Index

    with pytest.raises(QueryError, match="holds no rows \\(all 24 were rejected"):
        Index.open(tmp_path / "index", device="cpu").query("Q?", "A.")


def test_float16_storage_halves_the_index_and_keeps_the_ranking(
    tmp_path, tiny_model_dirs, training_file, training_rows
):
    from rapidin_index.retrieval import Index

    full = build_index(training_file, tmp_path / "fp32", settings_for(tiny_model_dirs), progress=False)
    half = build_index(
        training_file,
        tmp_path / "fp16",
        settings_for(tiny_model_dirs, vector_dtype="float16"),
        progress=False,
    )
    assert read_manifest(tmp_path / "fp16").vector_dtype == "float16"
    size = {name: (tmp_path / name / "vectors-g0001.faiss").stat().st_size for name in ("fp32", "fp16")}
    assert size["fp16"] < 0.55 * size["fp32"]
    assert half.rows_indexed == full.rows_indexed
    exact, rounded = stored_vectors(tmp_path / "fp32"), stored_vectors(tmp_path / "fp16")
    for example_id, vector in exact.items():
        np.testing.assert_allclose(rounded[example_id], vector, rtol=2e-3, atol=1e-4)
    row = training_rows[3]
    expected = Index.open(tmp_path / "fp32", device="cpu").query(
        row["instruction"], row["output"], top_k=5, explain=0
    )
    found = Index.open(tmp_path / "fp16", device="cpu").query(
        row["instruction"], row["output"], top_k=5, explain=0
    )
    assert found.helpful[0].id == expected.helpful[0].id == 3
    np.testing.assert_allclose(
        [h.score for h in found.helpful], [h.score for h in expected.helpful], rtol=5e-3
    )
    with pytest.raises(BuildError, match='vector_dtype: index has "float32", asked for "float16"'):
        other = tmp_path / "more.jsonl"
        other.write_text(json.dumps(training_rows[0]) + "\n")
        build_index(
            other,
            tmp_path / "fp32",
            settings_for(tiny_model_dirs, vector_dtype="float16"),
            append=True,
            progress=False,
        )


def test_a_self_check_mismatch_is_in_the_manifest_and_the_summary(
    tmp_path, tiny_model_dirs, training_file, monkeypatch
):
    """A norm layer that is not affine in its weight: the build's self-check moves it, and says so."""
    from rapidin_index.cli.main import app
    from transformers.models.llama import modeling_llama
    from typer.testing import CliRunner

    def squared_weight_forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight**2 * hidden_states * torch.rsqrt(variance + self.variance_epsilon)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", squared_weight_forward)
    args = ["build", "--model", tiny_model_dirs["llama"], "--data", training_file]
    args += ["--index", str(tmp_path / "index"), "--k", "0", "--quiet", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "took the exact path" in result.output and "self-check" in result.output
    manifest = read_manifest(tmp_path / "index")
    norms = {name for name in manifest.parameters["names"] if "norm" in name}
    assert set(manifest.backward_path) == norms
    # ... and the stored vectors are the plain autograd ones of the patched model
    loaded = load_model(ModelSettings(tiny_model_dirs["llama"]))
    blocks = gradient_blocks(select_parameters(loaded.model, ModelSettings(tiny_model_dirs["llama"])))
    examples, _ = load_examples(training_file, loaded.tokenizer, parse_template("auto"), 1024)
    vectors = stored_vectors(tmp_path / "index")
    for example in examples[:3]:
        batch = collate([(example.input_ids, example.labels)], loaded.tokenizer.pad_token_id, "cpu")
        expected = normalize_flat(reference_gradient(loaded.model, blocks, batch)[None], blocks, "layer")[0]
        np.testing.assert_allclose(vectors[example.example_id], expected.numpy(), atol=3e-5)


def test_an_index_faiss_could_not_open_is_refused_before_any_row(
    tmp_path, tiny_model_dirs, training_file, monkeypatch
):
    with pytest.raises(BuildError, match="--k 2,097,152 is more than FAISS opens"):
        settings_for(tiny_model_dirs, sketch_dim=1 << 21)
    monkeypatch.setattr(vector_index, "MAX_DIMENSION", 1000)  # the tiny model's D is larger than this
    with pytest.raises(
        BuildError, match=r"--k 0 stores the exact gradient, [\d,]+ dimensions a row.*--params"
    ):
        build_index(
            training_file, tmp_path / "index", settings_for(tiny_model_dirs, sketch_dim=0), progress=False
        )
    assert not (tmp_path / "index" / "manifest.json").exists()
