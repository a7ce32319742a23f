"""The `rapidin-index` command line: build, info, and clear errors."""

import json

from rapidin_index.cli.main import app
from typer.testing import CliRunner

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
    table = runner.invoke(app, ["info", "--index", str(index_dir)])
    assert table.exit_code == 0 and "K = 1,024" in table.output


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
