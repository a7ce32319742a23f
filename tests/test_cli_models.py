"""The CLI and the model: paths stored resolved with a portable identity, K and --max-length fitted to the
model, and one clear line (before the model loads, where it can) for a wrong model or adapter."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rapidin_index.cli.main import app
from test_cli import assert_one_clear_error
from typer.testing import CliRunner

from rapidin_index import models
from rapidin_index.build import build_index
from rapidin_index.settings import BuildSettings, ModelSettings

runner = CliRunner()
CLI = [sys.executable, "-m", "rapidin_index.cli.main"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dirs, training_file, training_rows) -> dict:
    """A model, an adapter and data in a folder ``work`` (to be named relatively), and the wrong inputs."""
    from rapidin_index.demo.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("cli_models")
    work = root / "work"
    work.mkdir()
    shutil.copytree(tiny_model_dirs["llama"], work / "model")
    shutil.copytree(tiny_model_dirs["llama_lora"], work / "lora")
    shutil.copy(training_file, work / "train.jsonl")
    (root / "elsewhere").mkdir()
    texts = [row["instruction"] + " " + row["output"] for row in training_rows]
    save_tiny_model(root / "wider_llama", "llama", texts, vocab_size=400, hidden_size=64)
    save_tiny_model(root / "short_gpt2", "gpt2", texts, vocab_size=400, positions=64)
    long_rows = [
        {"prompt": "What does str.upper do?", "completion": " Return a copy." * (2 if i % 2 else 40)}
        for i in range(6)
    ]
    (root / "long.jsonl").write_text("".join(json.dumps(row) + "\n" for row in long_rows))
    (root / "not_an_adapter").mkdir()
    (root / "not_an_adapter" / "README.md").write_text("no adapter_config.json here")
    return {"root": root, "work": work, "gpt2": tiny_model_dirs["gpt2"], "lora": str(work / "lora")}


def run_cli(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *arguments], cwd=cwd, capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------- resolved paths, identity


@pytest.fixture(scope="module")
def relative_build(workspace) -> tuple[Path, str]:
    """(index, stderr) of a build in a new process, in ``work``, naming model and adapter relatively; no --k."""
    built = run_cli(
        ["build", "--model", "./model", "--adapter", "lora", "--data", "train.jsonl", "--index", "../index"]
        + ["--quiet", "--device", "cpu"],
        cwd=workspace["work"],
    )
    assert built.returncode == 0, built.stderr
    return workspace["root"] / "index", built.stderr


def test_a_relative_model_path_is_stored_resolved_and_queried_from_another_directory(
    workspace, relative_build
):
    work, (index, stderr) = workspace["work"], relative_build
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["model"]["name_or_path"] == str((work / "model").resolve())
    assert manifest["adapter"]["path"] == str((work / "lora").resolve())
    assert manifest["model"]["identity"]["architectures"] == ["LlamaForCausalLM"]
    assert manifest["adapter"]["identity"]["peft_type"] == "LORA"
    # K not given and a LoRA gradient shorter than 65536: exact vectors, and the build says so
    assert manifest["sketch"]["sketch_dim"] == 0 and manifest["sketch"]["output_dim"] < 65536
    assert "the index stores exact vectors (K = 0" in " ".join(stderr.split())
    queried = run_cli(
        ["query", "--index", "../index", "--prompt", "What does str.upper do?", "--response", "A copy."]
        + ["--explain", "0", "--per-token", "off", "--device", "cpu"],
        cwd=workspace["root"] / "elsewhere",
    )
    assert queried.returncode == 0, queried.stderr
    result = json.loads(queried.stdout)
    assert len(result["helpful"]) == 10 and result["index"]["sketch_dim"] == 0


def test_an_old_manifest_with_a_relative_path_works_where_it_did_and_hints_elsewhere(
    workspace, relative_build, monkeypatch
):
    old = shutil.copytree(relative_build[0], workspace["root"] / "old_index")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["model"] = {k: v for k, v in manifest["model"].items() if k != "identity"} | {
        "name_or_path": "model"
    }
    manifest["adapter"] = {k: v for k, v in manifest["adapter"].items() if k != "identity"} | {"path": "lora"}
    del manifest["self_sha256"]  # written before manifests checked themselves
    (old / "manifest.json").write_text(json.dumps(manifest))
    info = runner.invoke(app, ["info", "--index", str(old)])
    assert info.exit_code == 0 and "no portable identity recorded" in " ".join(info.output.split())
    query = ["query", "--index", str(old), "--prompt", "What does str.upper do?", "--response", "A copy."]
    query += ["--explain", "0", "--per-token", "off", "--device", "cpu"]
    monkeypatch.chdir(workspace["work"])  # where it was built: the relative paths still resolve
    assert runner.invoke(app, query).exit_code == 0
    monkeypatch.chdir(workspace["root"] / "elsewhere")
    moved = runner.invoke(app, query)
    assert_one_clear_error(moved, "if the model moved, pass --model", lines=None)


def test_info_export_and_import_say_which_model_the_index_needs(workspace, relative_build, tmp_path):
    index = str(relative_build[0])
    info = " ".join(runner.invoke(app, ["info", "--index", index]).output.split())
    assert "model identity │ llama (LlamaForCausalLM), config sha256" in info
    assert "adapter identity │ LORA, config sha256" in info and "for base model" in info
    exported = runner.invoke(app, ["export", "--index", index, "--out", str(tmp_path / "b.tar")])
    assert exported.exit_code == 0, exported.output
    model_line = "built with model " + str((workspace["work"] / "model").resolve())
    text = " ".join(exported.output.split())
    assert model_line in text and "llama (LlamaForCausalLM), config sha256" in text
    assert "and adapter " + str((workspace["work"] / "lora").resolve()) in text
    checked = " ".join(runner.invoke(app, ["import", str(tmp_path / "b.tar"), "--check"]).output.split())
    assert model_line in checked and "LORA, config sha256" in checked
    bundle = json.loads(
        subprocess.run(["tar", "-xOf", tmp_path / "b.tar", "bundle.json"], capture_output=True).stdout
    )
    assert bundle["index"]["model"]["identity"]["config_sha256"]
    assert bundle["index"]["adapter"]["identity"]["base_model_name_or_path"]


# --------------------------------------------------------------------------- K and --max-length fitted


def test_k_not_given_takes_the_index_k_on_append_and_rebuild_and_a_given_k_is_forced(workspace, tmp_path):
    work = workspace["work"]
    arguments = ["build", "--model", str(work / "model"), "--adapter", workspace["lora"]]
    arguments += ["--index", str(tmp_path / "index"), "--quiet", "--device", "cpu"]
    forced = runner.invoke(app, [*arguments, "--data", str(work / "train.jsonl"), "--k", "2048"])
    assert forced.exit_code == 0, forced.output
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    gradient_dim = manifest["sketch"]["gradient_dim"]
    assert manifest["sketch"]["sketch_dim"] == 2048 > gradient_dim  # given: kept, though larger than D
    again = runner.invoke(app, [*arguments, "--data", str(work / "train.jsonl")])  # no --k: the index's
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output
    (tmp_path / "more.jsonl").write_text((work / "train.jsonl").read_text().replace("What", "Which"))
    appended = runner.invoke(app, [*arguments, "--append", str(tmp_path / "more.jsonl")])
    assert appended.exit_code == 0, appended.output
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["sketch"]["sketch_dim"] == 2048 and manifest["row_count"] == 48
    assert "stores exact vectors" not in appended.output
    other = runner.invoke(app, [*arguments, "--append", str(tmp_path / "more.jsonl"), "--k", "0"])
    assert_one_clear_error(other, "sketch.sketch_dim: index has 2048, asked for 0", lines=None)


def test_the_python_default_is_exact_for_a_short_gradient(workspace, tmp_path):
    work = workspace["work"]
    settings = BuildSettings(ModelSettings(str(work / "model"), workspace["lora"]), device="cpu")
    assert settings.sketch.sketch_dim is None  # not given: resolved once D is known
    report = build_index(work / "train.jsonl", tmp_path / "index", settings, progress=False)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["sketch"]["sketch_dim"] == 0 and report.sketch_dim == report.gradient_dim
    assert any("stores exact vectors" in note for note in report.notes)


def test_a_row_longer_than_the_model_context_is_truncated_not_a_crash(workspace, tmp_path):
    root = workspace["root"]
    arguments = ["build", "--model", str(root / "short_gpt2"), "--data", str(root / "long.jsonl")]
    arguments += ["--index", str(tmp_path / "index"), "--k", "1024", "--quiet", "--device", "cpu"]
    built = runner.invoke(app, arguments)  # --max-length 1024 by default; GPT-2 learned 64 positions
    assert built.exit_code == 0, built.output
    text = " ".join(built.output.split())
    assert text.count("--max-length 1024 capped at 64, the model's maximum positions") == 1
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["max_length"] == 64 and manifest["row_count"] == 6 and manifest["rejected_count"] == 0
    assert manifest["truncated_count"] == 3  # the three long rows, cut at 64 tokens
    assert "truncated rows │ 3" in text
    again = runner.invoke(app, arguments)  # the recorded 64 is what the default asks for now
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output


# --------------------------------------------------------------------------- one clear line


MODEL_ERROR_CASES = {  # name: (arguments from the workspace, what the one line must say, before loading?)
    "adapter for another architecture": (
        lambda w: ["--model", w["gpt2"], "--adapter", w["lora"]],
        ["--adapter", "does not fit --model", "the adapter was made for base model", "not found"],
        False,
    ),
    "adapter for another size": (
        lambda w: ["--model", str(w["root"] / "wider_llama"), "--adapter", w["lora"]],
        ["does not fit --model", "wider_llama", "the adapter was made for base model", "size mismatch"],
        False,
    ),
    "no such adapter folder": (
        lambda w: ["--model", str(w["work"] / "model"), "--adapter", str(w["root"] / "gone")],
        ["gone: no such folder"],
        True,
    ),
    "adapter folder without adapter_config.json": (
        lambda w: ["--model", str(w["work"] / "model"), "--adapter", str(w["root"] / "not_an_adapter")],
        ["is not a PEFT adapter folder (no adapter_config.json)"],
        True,
    ),
    "model path that does not exist": (
        lambda w: ["--model", str(w["root"] / "work" / "no_model")],
        ["no such folder", "no_model"],
        True,
    ),
    "relative model path under a real folder": (
        lambda w: ["--model", "work/no_model"],
        ["cannot load model work/no_model: no such folder (though work is one"],
        True,
    ),
}


@pytest.mark.parametrize("case", list(MODEL_ERROR_CASES))
def test_a_wrong_model_or_adapter_is_one_clear_line(case, workspace, tmp_path, monkeypatch):
    arguments, fragments, before_loading = MODEL_ERROR_CASES[case]
    if before_loading:

        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded before a cheap check")

        monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.chdir(workspace["root"])
    data = ["--data", str(workspace["work"] / "train.jsonl"), "--index", str(tmp_path / "index")]
    result = runner.invoke(app, ["build", *arguments(workspace), *data, "--quiet", "--device", "cpu"])
    assert_one_clear_error(result, *fragments)
    assert not (tmp_path / "index" / "manifest.json").exists()


def test_an_unknown_export_extension_is_refused_before_any_work(relative_build, tmp_path, monkeypatch):
    from rapidin_index.store import bundle_export

    def no_export(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(bundle_export, "export_index", no_export)
    arguments = ["export", "--index", str(relative_build[0]), "--out", str(tmp_path / "b.rar")]
    assert_one_clear_error(runner.invoke(app, arguments), "--out", "unknown extension '.rar'", "--format")
    assert not (tmp_path / "b.rar").exists()
    allowed = runner.invoke(app, [*arguments, "--format", "zip"])  # an explicit format wins
    assert allowed.exit_code == 1 and "the export started" in str(allowed.exception)
    assert os.listdir(tmp_path) == []


def test_an_index_from_before_the_cap_keeps_its_max_length(workspace, tmp_path):
    work = workspace["work"]
    settings = BuildSettings(ModelSettings(str(work / "model")), device="cpu", chunk_size=8)
    first = build_index(work / "train.jsonl", tmp_path / "index", settings, progress=False)
    assert any("--max-length 1024 capped at 512" in note for note in first.notes)  # tiny Llama: 512
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["max_length"] == 512
    manifest["max_length"] = 1024  # as an index built before the cap recorded it
    del manifest["self_sha256"]  # ... and before manifests checked themselves
    manifest_path.write_text(json.dumps(manifest))
    again = build_index(work / "train.jsonl", tmp_path / "index", settings, progress=False)
    assert again.nothing_to_do and any("kept, as the index in this folder" in note for note in again.notes)
    (tmp_path / "more.jsonl").write_text((work / "train.jsonl").read_text().replace("What", "Which"))
    appended = build_index(tmp_path / "more.jsonl", tmp_path / "index", settings, append=True, progress=False)
    assert appended.rows_indexed == 48 and json.loads(manifest_path.read_text())["max_length"] == 1024
