"""The `rapidin-index` command line: build, info, and clear errors."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_with_other_chat_template
from rapidin_index.cli.main import app, is_user_error
from typer.testing import CliRunner

from rapidin_index import models
from rapidin_index.store.lock import writer_lock

runner = CliRunner()


def test_build_then_info(tmp_path, tiny_model_dirs, training_file):
    index_dir = tmp_path / "index"
    args = ["build", "--model", tiny_model_dirs["gpt2"], "--adapter", tiny_model_dirs["gpt2_lora"]]
    args += ["--data", training_file, "--index", str(index_dir), "--k", "1024", "--quiet", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "rows indexed" in result.output and "compression D/K" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    info = runner.invoke(app, ["info", "--index", str(index_dir), "--json"])
    manifest = json.loads(info.stdout)
    assert manifest["row_count"] == 24 and manifest["sketch"]["sketch_dim"] == 1024
    assert manifest["adapter"]["fingerprint"] and manifest["rejected_rows"] == []
    (checked,) = manifest["self_checks"]  # where the build checked its hooks; the LoRA build needs peft
    assert checked["device"] == "cpu" and checked["dtype"] == "float32" and checked["peft"]
    table = runner.invoke(app, ["info", "--index", str(index_dir)])
    assert table.exit_code == 0 and "K = 1,024" in table.output
    assert "self-checked" in table.output and f"torch {checked['torch']}" in " ".join(table.output.split())


def test_errors_name_the_problem(tmp_path, tiny_model_dirs, training_file):
    missing = runner.invoke(app, ["info", "--index", str(tmp_path)])
    assert missing.exit_code == 2 and "no finished index" in missing.output
    both = runner.invoke(
        app, ["build", "--model", "m", "--index", str(tmp_path), "--data", "a", "--append", "b"]
    )
    assert both.exit_code == 2 and "exactly one of --data" in both.output
    bad = runner.invoke(
        app,
        [
            "build",
            "--model",
            tiny_model_dirs["llama"],
            "--data",
            training_file,
            "--index",
            str(tmp_path / "i"),
        ]
        + ["--normalize", "batch", "--quiet"],
    )
    assert bad.exit_code == 2 and "--normalize 'batch'" in bad.output


# --------------------------------------------------------------------------- every error is one clear line


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, tiny_model_dirs, training_file, training_rows) -> dict:
    """A K = 1024 index built through the CLI from a model copy, plus the broken inputs the errors need."""
    root = tmp_path_factory.mktemp("cli_errors")
    model = shutil.copytree(tiny_model_dirs["llama"], root / "model")
    time.sleep(2.1)  # a stat fingerprint is only recorded for files that settled (preflight.py)
    paths = {"root": root, "model": str(model), "data": training_file, "index": str(root / "index")}
    paths["build"] = ["build", "--model", paths["model"], "--data", training_file, "--index", paths["index"]]
    paths["build"] += ["--k", "1024", "--quiet", "--device", "cpu"]
    built = runner.invoke(app, paths["build"])
    assert built.exit_code == 0, built.output
    paths["other_tokenizer"] = copy_with_other_chat_template(paths["model"], root / "other_tokenizer")
    (root / "no_config").mkdir()
    (root / "no_config" / "tokenizer.json").write_text("{}")
    no_tokenizer = root / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(model / "config.json", no_tokenizer / "config.json")
    (root / "empty").mkdir()
    (root / "damaged_manifest").mkdir()
    (root / "damaged_manifest" / "manifest.json").write_text("{")
    damaged = shutil.copytree(paths["index"], root / "damaged_index")
    next(damaged.glob("vectors-g*.faiss")).unlink()
    (root / "bad.jsonl").write_text(json.dumps(training_rows[0]) + "\n{not json\n")
    (root / "train.xml").write_text("<rows/>")
    (root / "train.parquet").write_text('{"text": "JSON under a Parquet name"}')
    (root / "a_file").write_text("")
    return paths


def _query(paths, *extra: str) -> list[str]:
    return ["query", "--index", paths["index"], "--prompt", "What does str.upper do?", *extra]


def _with(arguments: list[str], **changes: str) -> list[str]:
    """``arguments`` with the values of some options replaced (``model="..."`` replaces --model's)."""
    arguments = list(arguments)
    for name, value in changes.items():
        arguments[arguments.index("--" + name.replace("_", "-")) + 1] = value
    return arguments


R = "--response"
ERROR_CASES = {  # name: (arguments from the fixture's paths, what the one line must say)
    "info: no index": (lambda p: ["info", "--index", str(p["root"] / "empty")], "no finished index"),
    "info: damaged manifest": (
        lambda p: ["info", "--index", str(p["root"] / "damaged_manifest")],
        "is not valid JSON",
    ),
    "build: --data and --append": (lambda p: [*p["build"], "--append", p["data"]], "exactly one of --data"),
    "build: no such model": (
        lambda p: _with(p["build"], model="/nonexistent/model"),
        "no such folder, and it is not a hub id either",
    ),
    "build: model folder without config.json": (
        lambda p: _with(p["build"], model=str(p["root"] / "no_config")),
        "holds no config.json",
    ),
    "build: model folder without tokenizer": (
        lambda p: _with(p["build"], model=str(p["root"] / "no_tokenizer"), index=str(p["root"] / "i1")),
        "holds no tokenizer",
    ),
    "build: no such adapter": (
        lambda p: [*_with(p["build"], index=str(p["root"] / "i2")), "--adapter", "/nonexistent/lora"],
        "--adapter /nonexistent/lora: no such folder",
    ),
    "build: no such data file": (lambda p: _with(p["build"], data="/nonexistent.jsonl"), "does not exist"),
    "build: unknown data format": (
        lambda p: _with(p["build"], data=str(p["root"] / "train.xml"), index=str(p["root"] / "i3")),
        "unknown extension",
    ),
    "build: not a Parquet file": (
        lambda p: _with(p["build"], data=str(p["root"] / "train.parquet"), index=str(p["root"] / "i7")),
        "train.parquet: not a valid Parquet file",
    ),
    "build: --split on a file": (lambda p: [*p["build"], "--split", "train"], "is a file (drop --split)"),
    "build: --max-rejected-share": (
        lambda p: [*p["build"], "--max-rejected-share", "2"],
        "--max-rejected-share must be between 0 and 1, got 2.0",
    ),
    "build: --normalize": (lambda p: [*p["build"], "--normalize", "batch"], "--normalize 'batch'"),
    "build: --k": (lambda p: _with(p["build"], k="-1"), "K must be >= 0"),
    "build: --sketch": (lambda p: [*p["build"], "--sketch", "fft"], "unknown sketch algorithm 'fft'"),
    "build: --dtype": (lambda p: [*p["build"], "--dtype", "float8"], "--dtype 'float8'"),
    "build: --params": (lambda p: [*p["build"], "--params", "("], "not a valid regular expression"),
    "build: --vector-dtype": (lambda p: [*p["build"], "--vector-dtype", "int8"], "--vector-dtype must be"),
    "build: --shard-index": (lambda p: [*p["build"], "--num-shards", "2", "--shard-index", "2"], "[0, 2)"),
    "build: --strict": (
        lambda p: [
            *_with(p["build"], data=str(p["root"] / "bad.jsonl"), index=str(p["root"] / "i4")),
            "--strict",
        ],
        "row 1: ",
    ),
    "rebuild: other settings": (lambda p: _with(p["build"], k="2048"), "built with other settings"),
    "rebuild: other tokenizer": (
        lambda p: _with(p["build"], model=p["other_tokenizer"]),
        "tokenizer.fingerprint: index has",
    ),
    "rebuild: other data": (
        lambda p: _with(p["build"], data=str(p["root"] / "bad.jsonl")),
        "built from other data; use --append",
    ),
    "append: data already indexed": (
        lambda p: [
            "build",
            "--model",
            p["model"],
            "--append",
            p["data"],
            "--index",
            p["index"],
            "--k",
            "1024",
        ],
        "appending it again would index every row twice. To do that on purpose, pass --allow-duplicate-data",
    ),
    "append: no index": (
        lambda p: [
            "build",
            "--model",
            p["model"],
            "--append",
            p["data"],
            "--index",
            str(p["root"] / "empty"),
        ],
        "--append needs a finished index",
    ),
    "query: --k": (
        lambda p: _query(p, R, "x", "--k", "2048"),
        "index built with K=1024, query asked for K=2048",
    ),
    "query: other tokenizer": (
        lambda p: _query(p, R, "x", "--model", p["other_tokenizer"]),
        "tokenizer differs",
    ),
    "query: no such model": (
        lambda p: _query(p, R, "x", "--model", "./gone"),
        "if the model moved, pass --model",
    ),
    "query: empty response": (lambda p: _query(p, R, " "), "the query's response is empty"),
    "query: no prompt": (lambda p: ["query", "--index", p["index"]], "give --prompt"),
    "query: --format": (lambda p: _query(p, R, "x", "--format", "xml"), "--format 'xml'"),
    "query: html to stdout": (lambda p: _query(p, R, "x", "--format", "html"), "--format html needs --out"),
    "query: --per-token": (lambda p: _query(p, R, "x", "--per-token", "maybe"), "--per-token 'maybe'"),
    "query: --top-k": (lambda p: _query(p, R, "x", "--top-k", "0"), "--top-k must be at least 1, got 0"),
    "query: --explain": (
        lambda p: _query(p, R, "x", "--explain", "-2"),
        "--explain must be at least 0, got -2",
    ),
    "query: --max-new-tokens": (
        lambda p: ["query", "--index", p["index"], "--prompt", "p", "--generate", "--max-new-tokens", "0"],
        "--max-new-tokens must be at least 1, got 0",
    ),
    "query: --system on alpaca rows": (
        lambda p: _query(p, R, "x", "--system", "Be brief."),
        "--system needs an index of chat rows; this index's rows use the alpaca template",
    ),
    "query: --system with --queries": (
        lambda p: ["query", "--index", p["index"], "--queries", p["data"], "--system", "s"],
        "a --queries row has its own",
    ),
    "query: bad --queries row": (
        lambda p: ["query", "--index", p["index"], "--queries", str(p["root"] / "bad.jsonl")],
        "bad.jsonl: query row 1: ",
    ),
    "query: no --queries file": (
        lambda p: ["query", "--index", p["index"], "--queries", "/nonexistent.jsonl"],
        "data file not found",
    ),
    "query: --hot word": (lambda p: _query(p, R, "It upper-cases.", "--hot", "zebra"), "hot word 'zebra'"),
    "query: damaged index": (
        lambda p: _with(_query(p, R, "x"), index=str(p["root"] / "damaged_index")),
        "vectors-g0001.faiss is missing",
    ),
    "query: unwritable --out": (
        lambda p: _query(
            p, R, "It upper-cases.", "--explain", "0", "--out", str(p["root"] / "a_file" / "r.json")
        ),
        "a_file",  # a file where a folder would have to be made
    ),
    "merge: not a shard": (
        lambda p: ["merge", p["index"], "--index", str(p["root"] / "m")],
        "is not a shard",
    ),
    "merge: no such shard": (
        lambda p: ["merge", "/nonexistent/shard0", "--index", str(p["root"] / "m")],
        "holds no finished index",
    ),
    "export: --format": (
        lambda p: ["export", "--index", p["index"], "--out", str(p["root"] / "x.tar"), "--format", "rar"],
        "--format 'rar'",
    ),
    "import: no such bundle": (
        lambda p: ["import", str(p["root"] / "none.tar"), "--index", str(p["root"] / "i5")],
        "does not exist",
    ),
    "import: not a bundle": (lambda p: ["import", p["data"], "--check"], "is truncated or corrupted"),
    "import: --index and --check": (
        lambda p: ["import", p["data"], "--index", str(p["root"] / "i6"), "--check"],
        "give --index DIR to import, or --check",
    ),
    "demo: too few rows": (
        lambda p: ["demo", "--folder", str(p["root"] / "demo"), "--rows", "3"],
        "3 rows leave none to train on",
    ),
}
MULTI_LINE = {"rebuild: other settings", "rebuild: other tokenizer", "query: no such model"}


def assert_one_clear_error(result, *fragments: str, lines: int | None = 1) -> None:
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert isinstance(result.exception, SystemExit) and "Traceback" not in text
    assert text.startswith("error: "), text
    if lines is not None:
        assert len(text.splitlines()) == lines, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_every_documented_error_ends_in_one_clear_line(case, cli_index):
    arguments, expected = ERROR_CASES[case]
    result = runner.invoke(app, arguments(cli_index))
    assert_one_clear_error(result, expected, lines=None if case in MULTI_LINE else 1)


def test_a_locked_index_is_refused_through_the_cli(cli_index):
    with writer_lock(cli_index["index"], "append"):
        result = runner.invoke(app, cli_index["build"])
    assert_one_clear_error(result, f"is being written by pid {os.getpid()}", "Wait for it to finish")


def test_an_error_in_a_new_process_is_one_line_on_stderr(tmp_path):
    command = [sys.executable, "-m", "rapidin_index.cli.main", "build", "--model", "/nonexistent"]
    command += ["--data", __file__.replace(".py", ".jsonl"), "--index", str(tmp_path / "index")]
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    command[command.index("--data") + 1] = str(tmp_path / "train.jsonl")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: cannot load model /nonexistent: no such folder, and it is not a hub id either (those look "
        "like 'owner/name'); check the path"
    ]
    assert not (tmp_path / "index").exists()  # a refused build leaves nothing behind


def test_a_bug_is_not_dressed_as_a_user_error():
    try:
        int("not a number")  # a ValueError from outside rapidin_index
    except ValueError as error:
        assert not is_user_error(error)


# --------------------------------------------------------------------------- cheap checks first


def test_a_no_op_rebuild_proves_the_model_unchanged_without_loading_it(cli_index, monkeypatch):
    loads = []
    load_model = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: loads.append(args) or load_model(*args))
    again = runner.invoke(app, cli_index["build"])
    assert again.exit_code == 0 and "nothing to do" in again.output and "rows indexed" in again.output
    assert loads == []  # the model files' stat fingerprint matches the one recorded at the build
    os.utime(next(Path(cli_index["model"]).glob("*.safetensors")))  # same bytes, but no proof of it
    again = runner.invoke(app, cli_index["build"])
    assert again.exit_code == 0 and "nothing to do" in again.output and len(loads) == 1


def test_refusals_come_before_the_model_loads(cli_index, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr("rapidin_index.retrieval.load_model", no_model)
    for case in (
        "query: --k",
        "query: --system on alpaca rows",
        "query: --explain",
        "query: other tokenizer",
        "rebuild: other tokenizer",
        "rebuild: other settings",
        "build: not a Parquet file",
        "append: data already indexed",
    ):
        arguments, expected = ERROR_CASES[case]
        assert_one_clear_error(runner.invoke(app, arguments(cli_index)), expected, lines=None)


def test_info_and_a_wrong_k_need_no_torch(cli_index):
    code = (
        "import sys\nfrom rapidin_index.cli.main import app\n"
        "for arguments in sys.argv[1:]:\n"
        "    try:\n        app(arguments.split('|'))\n    except SystemExit as exit:\n        print(exit.code)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'lancedb') if m in sys.modules))\n"
    )
    info = f"info|--index|{cli_index['index']}"
    refused = f"query|--index|{cli_index['index']}|--prompt|p|--response|r|--k|2048"
    done = subprocess.run([sys.executable, "-c", code, info, refused], capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-3:] == ["0", "2", "[]"], done.stdout + done.stderr


# --------------------------------------------------------------------------- --ray


@pytest.mark.parametrize(
    ("options", "runner_arguments"),
    [
        ([], None),
        (["--ray"], {"address": None, "workers": None}),
        (["--ray", "--workers", "3"], {"address": None, "workers": 3}),
        (["--ray", "local"], {"address": None, "workers": None}),
        (["--ray", "auto"], {"address": "auto", "workers": None}),
        (["--ray", "ray://head:10001", "--workers", "2"], {"address": "ray://head:10001", "workers": 2}),
        (["--ray=ray://head:10001"], {"address": "ray://head:10001", "workers": None}),
        (["--workers", "4"], {"address": None, "workers": 4}),
    ],
)
def test_bare_ray_means_a_local_ray(options, runner_arguments, monkeypatch, tmp_path):
    from rapidin_index import build
    from rapidin_index.parallel import RayChunkRunner

    made, used = [], []
    monkeypatch.setattr(RayChunkRunner, "factory", lambda **arguments: made.append(arguments) or "factory")
    monkeypatch.setattr(
        build,
        "build_index",
        lambda *args, runner_factory, **kwargs: used.append(runner_factory) or build.BuildReport("x"),
    )
    arguments = ["build", "--model", "m", "--data", "d.jsonl", "--index", str(tmp_path), "--quiet"]
    result = runner.invoke(app, arguments + options)  # a bare --ray last, or before another option
    assert result.exit_code == 0, result.output
    assert made == ([] if runner_arguments is None else [runner_arguments])
    assert used == [None if runner_arguments is None else "factory"]


def test_build_option_defaults_are_the_settings_defaults():
    import typer.main

    from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings, default_of

    params = {p.name: p.default for p in typer.main.get_command(app).commands["build"].params}
    sketch = default_of(BuildSettings, "sketch")
    assert sketch.algorithm == "auto" and params["sketch"] == "auto"  # resolved once the model loads
    assert params["k"] == sketch.sketch_dim == default_of(SketchSettings, "sketch_dim")
    assert (params["shuffle_lambda"], params["seed"]) == (sketch.shuffle_lambda, sketch.seed)
    for name in ("normalize", "batch_size", "max_length", "tokenization", "device", "template", "strict"):
        assert params[name] == default_of(BuildSettings, name), name
    for name in ("chunk_size", "vector_dtype", "num_shards", "shard_index", "response_field", "split"):
        assert params[name] == default_of(BuildSettings, name), name
    for name in ("max_rejected_share", "allow_duplicate_data"):
        assert params[name] == default_of(BuildSettings, name), name
    for name in ("dtype", "params", "adapter"):
        assert params[name] == default_of(ModelSettings, name), name


def test_query_and_demo_option_defaults_are_the_librarys():
    """The query options' defaults are `QuerySettings`'s, read by the CLI, `Index` and the server alike."""
    import inspect

    import typer.main

    from rapidin_index.demo.run import DemoSettings
    from rapidin_index.retrieval import Index
    from rapidin_index.server_requests import Limits, parse_options
    from rapidin_index.settings import QuerySettings, default_of

    commands = typer.main.get_command(app).commands
    query = {p.name: p.default for p in commands["query"].params}
    names = ("top_k", "token_top_k", "explain", "max_new_tokens", "rerank", "depth", "generate", "where")
    for name in (*names, "aggregate"):
        assert query[name] == default_of(QuerySettings, name), name
    assert query["per_token"] == "on" and default_of(QuerySettings, "per_token") is True
    for method in (Index.query, Index.query_rows, Index.aggregate):
        for name, parameter in inspect.signature(method).parameters.items():
            if name in names and name != "where":
                assert parameter.default == default_of(QuerySettings, name), (method.__name__, name)
    generous = Limits(max_top_k=10**6, max_token_top_k=10**6, max_explain=10**6, max_new_tokens=10**6)
    assert parse_options({}, generous) == QuerySettings()
    demo = {p.name: p.default for p in commands["demo"].params}
    assert str(demo["folder"]) == default_of(DemoSettings, "folder")
    assert demo["rows"] == default_of(DemoSettings, "rows") and demo["dataset"] == default_of(
        DemoSettings, "dataset"
    )
    assert demo["k"] == default_of(DemoSettings, "sketch_dim")
    assert demo["queries"] == default_of(DemoSettings, "attacked_queries")


# --------------------------------------------------------------------------- appending the same data


def test_appending_indexed_data_again_needs_allow_duplicate_data(tmp_path, tiny_model_dirs, training_file):
    build = ["build", "--model", tiny_model_dirs["llama"], "--index", str(tmp_path / "index"), "--k", "256"]
    build += ["--quiet", "--device", "cpu"]
    assert runner.invoke(app, [*build, "--data", training_file]).exit_code == 0
    copy = shutil.copy(training_file, tmp_path / "same_rows.jsonl")  # another name, the same checksum
    refused = runner.invoke(app, [*build, "--append", str(copy)])
    assert_one_clear_error(refused, f"same sha256 as {training_file}, ids 0-23", "--allow-duplicate-data")
    appended = runner.invoke(app, [*build, "--append", str(copy), "--allow-duplicate-data"])
    assert appended.exit_code == 0, appended.output
    manifest = json.loads(runner.invoke(app, ["info", "--index", str(tmp_path / "index"), "--json"]).stdout)
    assert manifest["row_count"] == 48 and [s["id_offset"] for s in manifest["sources"]] == [0, 24]


def test_query_output_is_json_when_piped_and_short_text_when_asked(cli_index, tmp_path):
    piped = runner.invoke(app, _query(cli_index, "--response", "It upper-cases.", "--explain", "0"))
    assert piped.exit_code == 0 and json.loads(piped.stdout)["helpful"]
    text = runner.invoke(
        app, _query(cli_index, "--response", "It upper-cases.", "--explain", "0", "--format", "text")
    )
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].startswith("prompt") and "helpful" in lines and "harmful" in lines and len(lines) < 60
    written = tmp_path / "result.txt"
    to_file = runner.invoke(app, _query(cli_index, "--response", "It upper-cases.", "--out", str(written)))
    assert to_file.exit_code == 0 and written.read_text().startswith("prompt")


def test_a_template_field_no_row_has_is_refused_before_the_model_loads(cli_index, monkeypatch, tmp_path):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    arguments = ["build", "--model", cli_index["model"], "--data", cli_index["data"]]
    arguments += ["--index", str(tmp_path / "index"), "--template", "Q: {question}\nA: ", "--quiet"]
    result = runner.invoke(app, arguments)
    assert_one_clear_error(result, "fills question, which none of the first 24 rows has", "instruction")
    assert not (tmp_path / "index" / "manifest.json").exists()


@pytest.mark.parametrize("damage", ["not utf-8", "sketch null"])
def test_a_damaged_manifest_is_one_line_in_every_command(cli_index, tmp_path, damage):
    damaged = shutil.copytree(cli_index["index"], tmp_path / "index")
    path = damaged / "manifest.json"
    if damage == "not utf-8":
        path.write_bytes(path.read_bytes().replace(b'"layer"', b'"l\xffyer"'))
    else:
        path.write_text(path.read_text().replace('"sketch": {', '"sketch": null, "was": {', 1))
    expected = "is not UTF-8 text" if damage == "not utf-8" else "manifest field 'sketch' must be dict"
    for arguments in (
        ["info", "--index", str(damaged)],
        ["query", "--index", str(damaged), "--prompt", "p", "--response", "r"],
        ["export", "--index", str(damaged), "--out", str(tmp_path / "x.tar.gz")],
        ["build", "--model", cli_index["model"], "--append", cli_index["data"], "--index", str(damaged)],
    ):
        assert_one_clear_error(runner.invoke(app, arguments), expected, "re-import its bundle or rebuild")


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_faiss_file_is_one_line(cli_index, tmp_path, damage):
    damaged = shutil.copytree(cli_index["index"], tmp_path / "index")
    vectors = next(damaged.glob("vectors-g*.faiss"))
    vectors.write_bytes(vectors.read_bytes()[: 100 if damage == "truncated" else 0])
    for arguments, expected in (
        (["query", "--index", str(damaged), "--prompt", "p", "--response", "r"], "the index is damaged"),
        (["export", "--index", str(damaged), "--out", str(tmp_path / "x.parquet")], "checksum"),
    ):
        result = runner.invoke(app, arguments)
        assert_one_clear_error(result, "vectors-g", expected, lines=None)
        assert len(result.output.strip().splitlines()) <= 2  # one message (a long path may wrap it)


def test_a_damaged_lancedb_file_is_one_line(cli_index, tmp_path):
    damaged = shutil.copytree(cli_index["index"], tmp_path / "index")
    for data_file in damaged.glob("metadata/rows_g*.lance/data/*.lance"):
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    result = runner.invoke(
        app, _query({**cli_index, "index": str(damaged)}, "--response", "x", "--explain", "0")
    )
    # refused by its checksum on open (issue 25), before lance would fail to read it
    assert_one_clear_error(result, "rows_g0001.lance does not match", "the index is damaged", lines=None)
    assert "rustc" not in result.output and len(result.output.strip().splitlines()) <= 2


def test_a_cli_query_runs_each_identity_check_once(cli_index, monkeypatch):
    """The CLI checks K, files and tokenizer before torch loads; Index.open (``checked``) does not repeat
    them, and checks the loaded model once."""
    from rapidin_index import preflight, retrieval
    from rapidin_index.store import identity

    calls = []

    def counted(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module, name in [(identity, "check_tokenizer"), (preflight, "check_query")]:
        counted(module, name)
    for name in ("check_tokenizer", "check_query", "check_loaded_model"):
        counted(retrieval, name)
    result = runner.invoke(app, _query(cli_index, "--response", "It upper-cases.", "--explain", "0"))
    assert result.exit_code == 0, result.output
    assert sorted(calls) == ["check_loaded_model", "check_query", "check_tokenizer"]
