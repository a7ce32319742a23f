"""The build's self-check of the hooks, taken by a query on the same weights, libraries, device and dtype.

A query that finds its environment among the manifest's ``self_checks`` runs no plain backward of its
own and puts the manifest's exact-path tensors on the exact path; anywhere else, or with ``verify``, it
checks again. Either way its vectors are the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rapidin_index import gradients
from rapidin_index.build import build_index
from rapidin_index.manifest import read_manifest, write_manifest
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings


def squared_weight_forward(self, hidden_states):
    """An RMSNorm that is not affine in its weight: the hooks' rule for it is wrong, the self-check says."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight**2 * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


@pytest.fixture
def patched_norm(monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", squared_weight_forward)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dirs, training_file) -> str:
    index_dir = tmp_path_factory.mktemp("self-checked")
    settings = BuildSettings(
        ModelSettings(tiny_model_dirs["llama"]), SketchSettings(1024, 20, 42), batch_size=8, device="cpu"
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


def test_the_build_records_where_its_check_ran(built, tiny_model_dirs):
    manifest = read_manifest(built)
    opened = Index.open(built, device="cpu")
    assert manifest.self_checks == [gradients.check_environment(opened.loaded.model)]
    entry = manifest.self_checks[0]
    assert entry["device"] == "cpu" and entry["dtype"] == "float32" and entry["torch"] == torch.__version__
    assert opened.sketcher.self_checked  # taken from the build: no check is pending


def test_a_query_takes_the_builds_check_and_verify_checks_again(built, training_rows, monkeypatch):
    calls = count_plain_backwards(monkeypatch)
    trusted = query_vectors(Index.open(built, device="cpu"), training_rows[3])
    assert not calls  # not one plain backward: the build checked these weights here
    checked = query_vectors(Index.open(built, device="cpu", verify=True), training_rows[3])
    assert calls  # one plain backward a checked row (a query is one row)
    assert trusted[0] == checked[0]
    np.testing.assert_allclose(trusted[1], checked[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "field,value", [("torch", "0.0.1"), ("transformers", "0.0.1"), ("device", "cuda"), ("dtype", "bfloat16")]
)
def test_another_environment_checks_again(built, tmp_path, training_rows, monkeypatch, field, value):
    import shutil

    copy = shutil.copytree(built, tmp_path / "index")
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
        ModelSettings(tiny_model_dirs["llama"]), SketchSettings(1024, 20, 42), batch_size=8, device="cpu"
    )
    build_index(training_file, tmp_path / "index", settings, progress=False)
    manifest = read_manifest(tmp_path / "index")
    norms = {name for name in manifest.parameters["names"] if "norm" in name}
    assert set(manifest.exact_path) == norms and manifest.self_checks
    trusted = Index.open(tmp_path / "index", device="cpu")
    assert norms <= set(trusted.sketcher.exact_path)
    checked = Index.open(tmp_path / "index", device="cpu", verify=True)
    rows = [json.loads(line) for line in open(training_file)][:2]
    for row in rows:
        ours, theirs = query_vectors(trusted, row), query_vectors(checked, row)
        assert ours[0] == theirs[0]
        np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
    assert norms <= set(checked.sketcher.exact_path)


def test_a_new_shell_takes_the_builds_check(built):
    """check_environment is the same in another process, whatever its hash seed."""
    code = (
        "import sys; from rapidin_index.retrieval import Index; "
        "print(Index.open(sys.argv[1], device='cpu').sketcher.self_checked)"
    )
    for seed in (0, 7):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run(
            [sys.executable, "-c", code, built], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "True"
