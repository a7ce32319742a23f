"""Tests for rapidin_index/rejections.py: grouped reasons, and builds that index too little fail loudly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rapidin_index.cli.main import app
from typer.testing import CliRunner

from rapidin_index.data import RejectedRow
from rapidin_index.errors import BuildError, RejectedRowsError
from rapidin_index.rejections import check_rejected_share, group_reasons, reason_kind, summary
from rapidin_index.settings import BuildSettings, ModelSettings

runner = CliRunner()


def test_reasons_group_without_their_row_specific_numbers():
    assert reason_kind("line 12: not valid JSON: Expecting value: line 1 column 3 (char 2)") == (
        "line N: not valid JSON: Expecting value: line N column N (char N)"
    )
    assert (
        reason_kind("missing field 'col2' for the custom template")
        == "missing field 'col2' for the custom template"
    )
    rejected = [
        RejectedRow(i, "missing field 'output' for the alpaca template") for i in (9, 1, 3, 4, 5, 7, 8)
    ]
    rejected += [RejectedRow(2, "line 3: not valid JSON: x"), RejectedRow(6, "line 7: not valid JSON: x")]
    groups = group_reasons(rejected)
    assert [(group.reason, group.count, group.first_ids) for group in groups] == [
        ("missing field 'output' for the alpaca template", 7, [1, 3, 4, 5, 7]),
        ("line N: not valid JSON: x", 2, [2, 6]),
    ]
    assert summary(rejected, limit=1) == (
        "7 x missing field 'output' for the alpaca template (rows 1, 3, 4, 5, 7, ...); and 1 other reason(s)"
    )


def test_the_share_check_passes_at_the_limit_and_fails_above_it():
    half = [RejectedRow(i, "empty response") for i in range(5)]
    check_rejected_share(5, half, 0.5, "data.jsonl", "index")  # 50% is not more than 0.5
    with pytest.raises(RejectedRowsError, match=r"5 of 9 rows of data.jsonl were rejected \(56%, more than"):
        check_rejected_share(4, half, 0.5, "data.jsonl", "index")
    check_rejected_share(1, half, 1.0, "data.jsonl", "index")
    with pytest.raises(RejectedRowsError, match="no row of data.jsonl could be indexed"):
        check_rejected_share(0, half, 1.0, "data.jsonl", "index")  # no share accepts an empty index
    with pytest.raises(RejectedRowsError, match="data.jsonl holds no rows"):
        check_rejected_share(0, [], 1.0, "data.jsonl", "index")
    assert issubclass(RejectedRowsError, BuildError)


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_share_outside_0_to_1_is_refused(share):
    with pytest.raises(BuildError, match="--max-rejected-share must be between 0 and 1"):
        BuildSettings(ModelSettings("m"), max_rejected_share=share)


# ------------------------------------------------------------------------------ through the CLI


def build_command(model_dir: str, data, index, *extra: str) -> list[str]:
    arguments = ["build", "--model", model_dir, "--data", str(data), "--index", str(index)]
    return [*arguments, "--k", "256", "--quiet", "--device", "cpu", *extra]


def run_cli(arguments: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rapidin_index.cli.main", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_a_build_that_indexes_nothing_exits_2_with_one_summary_line(tmp_path, tiny_model_dirs):
    data = tmp_path / "no_output.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"question {i}"}) + "\n" for i in range(20)))
    index = tmp_path / "index"
    done = run_cli(build_command(tiny_model_dirs["llama"], data, index))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line == (
        f"error: no row of {data} could be indexed (20 rejected: 20 x missing field 'output' for the alpaca "
        f"template (rows 0, 1, 2, 3, 4, ...)); every row and reason: rapidin-index info --index {index} --json"
    )
    info = runner.invoke(app, ["info", "--index", str(index), "--json"])
    manifest = json.loads(info.stdout)  # committed, so that the reasons can be read
    assert manifest["row_count"] == 0 and [row["id"] for row in manifest["rejected_rows"]] == list(range(20))
    table = runner.invoke(app, ["info", "--index", str(index)])
    assert table.output.count("missing field 'output'") == 1 and "20 x missing field" in table.output
    again = runner.invoke(
        app, build_command(tiny_model_dirs["llama"], data, index, "--max-rejected-share", "1")
    )
    assert again.exit_code == 2 and "no row of" in again.output  # a rerun does not turn it into a success


def test_an_empty_data_file_exits_2(tmp_path, tiny_model_dirs):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    result = runner.invoke(app, build_command(tiny_model_dirs["llama"], data, tmp_path / "index"))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert (
        result.output.strip()
        == f"error: {data} holds no rows: nothing was indexed (is it the file, or split, you meant?)"
    )


def test_more_rejected_rows_than_the_share_exits_2_unless_accepted(tmp_path, tiny_model_dirs, training_rows):
    rows = [
        *training_rows[:3],
        *({"instruction": "no answer"} for _ in range(4)),
        {"prompt": "p", "completion": " "},
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    index = tmp_path / "index"
    refused = runner.invoke(app, build_command(tiny_model_dirs["llama"], data, index))
    assert refused.exit_code == 2, refused.output
    assert len(refused.output.strip().splitlines()) == 1 and refused.output.startswith("error: 5 of 8 rows")
    assert (
        "4 x missing field 'output' for the alpaca template (rows 3, 4, 5, 6); 1 x empty response (row 7)"
        in (refused.output)
    )
    assert "pass --max-rejected-share 1" in refused.output
    accepted = runner.invoke(
        app, build_command(tiny_model_dirs["llama"], data, index, "--max-rejected-share", "0.7")
    )
    assert accepted.exit_code == 0 and "nothing to do" in accepted.output
    assert "5 row(s) rejected" in accepted.output and accepted.output.count("missing field 'output'") == 1
