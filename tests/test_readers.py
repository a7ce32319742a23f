"""Tests for rapidin_index/readers.py: every data form a Hugging Face user has, read in-process (no download)."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from rapidin_index.cli.main import app
from typer.testing import CliRunner

from rapidin_index.errors import DataError
from rapidin_index.files import sha256_file
from rapidin_index.readers import DataSource, check_source, data_checksum, read_rows

ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Name a colour.", "input": "Say hello.", "output": "Blue is a colour."},
    {"instruction": "Say hello.", "input": "", "output": "Hello world!"},
]
# What every format should read back: an empty `input` cell counts as missing in CSV and Parquet,
# so the rows are written without it where it is empty.
EXPECTED_ROWS = [{key: value for key, value in row.items() if value} for row in ALPACA_ROWS]
# TRL's conversational prompt/completion: both fields are lists of {role, content} messages.
CONVERSATIONAL_ROWS = [
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "completion": [{"role": "assistant", "content": "Paris."}],
    },
    {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hello."}],
        "completion": [{"role": "assistant", "content": "Hello world!"}],
    },
]
COMPRESSORS = {"gz": gzip.compress, "zst": lambda data: zstandard.ZstdCompressor().compress(data)}


def write_rows(directory: Path, file_format: str, rows: list[dict]) -> Path:
    """Write `rows` in one of the supported layouts and return the file path."""
    if file_format in ("jsonl", "ndjson"):
        path = directory / f"rows.{file_format}"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif file_format == "json_list":
        path = directory / "rows.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif file_format == "json_data":
        path = directory / "rows.json"
        path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    elif file_format == "parquet":
        path = directory / "rows.parquet"
        columns = dict.fromkeys(key for row in rows for key in row)  # from_pylist keeps row 0's keys only
        pq.write_table(pa.table({column: [row.get(column) for row in rows] for column in columns}), path)
    elif file_format == "csv":
        path = directory / "rows.csv"
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(file_format)
    return path


def compressed(path: Path, compression: str) -> Path:
    """``path`` compressed to ``path.<compression>`` (the plain file removed, so only one can be read)."""
    target = path.with_name(f"{path.name}.{compression}")
    target.write_bytes(COMPRESSORS[compression](path.read_bytes()))
    path.unlink()
    return target


def rows_of(path, split=None) -> list[dict | None]:
    return [row for _, row, _ in read_rows(path, split)]


# ------------------------------------------------------------------------------------------ file formats


@pytest.mark.parametrize("file_format", ["jsonl", "ndjson", "json_list", "json_data", "parquet", "csv"])
def test_every_format_reads_the_same_rows(tmp_path, file_format):
    read_back = list(read_rows(write_rows(tmp_path, file_format, ALPACA_ROWS)))
    assert [example_id for example_id, _, _ in read_back] == [0, 1, 2]
    assert [error for _, _, error in read_back] == [None, None, None]
    # CSV cannot tell an empty cell from a missing one, so its empty `input` cells are missing.
    assert [row for _, row, _ in read_back] == (EXPECTED_ROWS if file_format == "csv" else ALPACA_ROWS)


@pytest.mark.parametrize("compression", ["gz", "zst"])
@pytest.mark.parametrize("file_format", ["jsonl", "json_list", "csv"])
def test_compressed_files_read_like_plain_ones(tmp_path, file_format, compression):
    plain = rows_of(write_rows(tmp_path, file_format, ALPACA_ROWS))
    path = compressed(write_rows(tmp_path, file_format, ALPACA_ROWS), compression)
    assert path.name.endswith(f".{compression}") and len(path.suffixes) == 2
    assert rows_of(path) == plain and len(plain) == 3


def test_a_compressed_parquet_file_is_refused_with_the_fix(tmp_path):
    path = compressed(write_rows(tmp_path, "parquet", ALPACA_ROWS), "gz")
    with pytest.raises(DataError, match="Parquet compresses inside; decompress it"):
        read_rows(path)


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_a_corrupt_compressed_file_is_one_data_error_naming_it(tmp_path, compression):
    path = tmp_path / f"rows.jsonl.{compression}"
    path.write_bytes(b"this is not compressed at all\n" * 4)
    with pytest.raises(DataError, match=f"cannot read {path}: not a valid") as raised:
        list(read_rows(path))
    assert "\n" not in str(raised.value)
    truncated = tmp_path / f"cut.jsonl.{compression}"
    truncated.write_bytes(COMPRESSORS[compression](b'{"text": "a"}\n' * 500)[:-20])
    with pytest.raises(DataError, match=f"cannot read {truncated}"):
        list(read_rows(truncated))


def test_parquet_null_cells_are_missing_fields(tmp_path):
    assert rows_of(write_rows(tmp_path, "parquet", EXPECTED_ROWS)) == EXPECTED_ROWS


@pytest.mark.parametrize(
    "content", [b"garbage" * 40, b'{"text": "a json line"}\n', b"PAR1" + b"\0" * 64 + b"PAR1"]
)
def test_a_file_that_is_not_parquet_is_one_data_error_naming_it(tmp_path, content):
    path = tmp_path / "rows.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError) as raised:
        list(read_rows(path))
    message = str(raised.value)
    assert message.startswith(f"cannot read {path}: ") and "Parquet" in message and "\n" not in message


def test_a_damaged_parquet_file_is_one_data_error_naming_it(tmp_path):
    path = write_rows(tmp_path, "parquet", ALPACA_ROWS * 50)
    data = bytearray(path.read_bytes())
    data[4:200] = b"\xff" * 196  # the pages, not the footer: it opens, then breaks while reading
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"cannot read {path}: "):
        list(read_rows(path))


def test_jsonl_blank_lines_do_not_consume_ids(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('\n{"text": "a"}\n\n   \n{"text": "b"}\n\n', encoding="utf-8")
    assert list(read_rows(path)) == [(0, {"text": "a"}, None), (1, {"text": "b"}, None)]


def test_jsonl_byte_order_mark_is_skipped_and_bad_utf8_rejects_one_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "\xff"}\n{"text": "b"}\n')
    read_back = list(read_rows(path))
    assert [(example_id, row) for example_id, row, _ in read_back] == [
        (0, {"text": "a"}),
        (1, None),
        (2, {"text": "b"}),
    ]
    assert read_back[1][2].startswith("line 2: not valid JSON")


def test_json_lines_under_a_json_name_as_dataset_to_json_writes_them(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "x.json"
    datasets.Dataset.from_list(CONVERSATIONAL_ROWS).to_json(str(path))
    assert len(path.read_text().splitlines()) == 2  # JSON Lines, as its docs say
    assert rows_of(path) == CONVERSATIONAL_ROWS
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(ALPACA_ROWS[0]) + "\n{not json\n" + json.dumps(ALPACA_ROWS[2]) + "\n")
    read_back = list(read_rows(broken))
    assert [(example_id, row) for example_id, row, _ in read_back] == [
        (0, ALPACA_ROWS[0]),
        (1, None),
        (2, ALPACA_ROWS[2]),
    ]
    assert read_back[1][2].startswith("line 2: not valid JSON")


def test_txt_is_one_text_row_per_non_empty_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(
        b"\xef\xbb\xbffirst line\r\n\n   \n  indented, kept as is\nbad \xff byte\nlast without newline"
    )
    read_back = list(read_rows(path))
    assert [(example_id, row) for example_id, row, _ in read_back] == [
        (0, {"text": "first line"}),
        (1, {"text": "  indented, kept as is"}),
        (2, None),
        (3, {"text": "last without newline"}),
    ]
    assert read_back[2][2].startswith("line 5: not valid UTF-8")
    assert rows_of(compressed(path, "gz"))[0] == {"text": "first line"}


def test_csv_row_with_surplus_cells_is_rejected(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text\nhello\nhello,extra\nworld\n", encoding="utf-8")
    read_back = list(read_rows(path))
    assert [(example_id, row) for example_id, row, _ in read_back] == [
        (0, {"text": "hello"}),
        (1, None),
        (2, {"text": "world"}),
    ]
    assert "more cells than the header" in read_back[1][2]


def test_whole_file_problems_raise_data_error(tmp_path):
    with pytest.raises(
        DataError, match=r"unknown extension; use one of .*\.txt \(optionally \.gz or \.zst\)"
    ):
        read_rows(tmp_path / "rows.xml")
    with pytest.raises(DataError, match="unknown extension"):
        read_rows(tmp_path / "rows.bz2")
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match="nowhere.jsonl"):
        read_rows(missing)
    not_json = tmp_path / "bad.json"
    not_json.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        list(read_rows(not_json))
    wrong_shape = tmp_path / "shape.json"
    wrong_shape.write_text(json.dumps({"rows": []}), encoding="utf-8")
    with pytest.raises(DataError, match="list of row objects"):
        list(read_rows(wrong_shape))
    not_utf8 = tmp_path / "latin1.csv"
    not_utf8.write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"cannot read {not_utf8}"):
        list(read_rows(not_utf8))


@pytest.mark.parametrize("file_format", ["jsonl", "json_list", "parquet"])
def test_trl_conversational_rows_pass_through_intact(tmp_path, file_format):
    assert rows_of(write_rows(tmp_path, file_format, CONVERSATIONAL_ROWS)) == CONVERSATIONAL_ROWS


# ------------------------------------------------------------------------------ datasets folders


@pytest.fixture
def saved_datasets(tmp_path) -> dict[str, Path]:
    """A saved Dataset of conversational rows, and a DatasetDict of two splits and of one."""
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list(CONVERSATIONAL_ROWS)
    test = datasets.Dataset.from_list(ALPACA_ROWS)
    folders = {"dataset": tmp_path / "dataset", "dict": tmp_path / "dict", "one_split": tmp_path / "one"}
    train.save_to_disk(str(folders["dataset"]))
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(folders["dict"]))
    datasets.DatasetDict(validation=test).save_to_disk(str(folders["one_split"]))
    return folders


def test_a_saved_dataset_folder_reads_its_rows_with_0_based_ids(saved_datasets):
    read_back = list(read_rows(saved_datasets["dataset"]))
    assert [example_id for example_id, _, _ in read_back] == [0, 1]
    assert [row for _, row, _ in read_back] == CONVERSATIONAL_ROWS  # lists of dicts, not dicts of lists


def test_a_dataset_dict_reads_the_split_asked_for(saved_datasets):
    folder = saved_datasets["dict"]
    assert rows_of(folder, "train") == CONVERSATIONAL_ROWS
    assert rows_of(DataSource(folder, "test")) == ALPACA_ROWS  # "" is a value in Arrow, unlike null
    with pytest.raises(DataError, match="needs --split: it holds the splits train, test"):
        read_rows(folder)
    with pytest.raises(DataError, match="has no split 'dev': it holds the splits train, test"):
        read_rows(folder, "dev")
    assert check_source(saved_datasets["one_split"]) == DataSource(saved_datasets["one_split"], "validation")
    assert rows_of(saved_datasets["one_split"]) == ALPACA_ROWS


def test_a_split_is_refused_where_there_is_none_to_choose(saved_datasets, tmp_path):
    with pytest.raises(DataError, match="holds a single Dataset, not a DatasetDict"):
        read_rows(saved_datasets["dataset"], "train")
    data_file = write_rows(tmp_path, "jsonl", ALPACA_ROWS)
    with pytest.raises(DataError, match=f"{data_file} is a file \\(drop --split\\)"):
        read_rows(data_file, "train")
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        read_rows(tmp_path)


def test_a_missing_reader_package_names_what_to_install(saved_datasets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        read_rows(saved_datasets["dataset"])
    monkeypatch.setitem(sys.modules, "zstandard", None)
    path = compressed(write_rows(tmp_path, "jsonl", ALPACA_ROWS), "zst")
    with pytest.raises(DataError, match="pip install zstandard"):
        list(read_rows(path))


def test_a_damaged_dataset_folder_is_one_data_error(saved_datasets):
    folder = saved_datasets["dataset"]
    next(folder.glob("*.arrow")).write_bytes(b"not arrow")
    with pytest.raises(DataError, match=f"cannot load {folder} with datasets.load_from_disk"):
        list(read_rows(folder))


def test_data_checksum_follows_the_rows(saved_datasets, tmp_path):
    data_file = write_rows(tmp_path, "jsonl", ALPACA_ROWS)
    assert data_checksum(data_file) == sha256_file(data_file)  # older indexes keep their source checksums
    folder = saved_datasets["dict"]
    train, test = data_checksum(folder, "train"), data_checksum(folder, "test")
    assert train != test and train == data_checksum(DataSource(folder, "train"))
    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "train" / ".DS_Store").write_bytes(b"finder")
    assert data_checksum(copy, "train") == train  # where the folder is, and hidden files, do not count
    (copy / "train" / "dataset_info.json").write_text("{}")
    assert data_checksum(copy, "train") != train and data_checksum(copy, "test") == test


# ------------------------------------------------------------------------------ through the CLI


def test_cli_builds_a_dataset_dict_split_and_appends_another(saved_datasets, tiny_model_dirs, tmp_path):
    index = tmp_path / "index"
    build = ["build", "--model", tiny_model_dirs["llama"], "--index", str(index), "--k", "256"]
    build += ["--quiet", "--device", "cpu", "--template", "alpaca"]
    folder = str(saved_datasets["dict"])
    refused = subprocess.run(
        [sys.executable, "-m", "rapidin_index.cli.main", *build, "--data", folder],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {folder} needs --split: it holds the splits train, test (give --split NAME)"
    ]
    assert not index.exists()  # refused before anything was written
    runner = CliRunner()
    built = runner.invoke(app, [*build, "--data", folder, "--split", "test"])
    assert built.exit_code == 0, built.output
    appended = runner.invoke(app, [*build, "--append", folder, "--split", "test", "--allow-duplicate-data"])
    assert appended.exit_code == 0, appended.output
    manifest = json.loads(runner.invoke(app, ["info", "--index", str(index), "--json"]).stdout)
    assert [(s["path"], s["split"], s["id_offset"], s["rows"]) for s in manifest["sources"]] == [
        (folder, "test", 0, 3),
        (folder, "test", 3, 3),
    ]
    assert manifest["row_count"] == 6 and manifest["sources"][0]["sha256"] == data_checksum(folder, "test")
    again = runner.invoke(app, [*build, "--data", folder, "--split", "test"])
    assert again.exit_code == 0 and "nothing to do" in again.output
