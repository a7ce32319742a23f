"""Training data -> ``(example_id, row, error)`` in file order, for every form a Hugging Face user keeps it in.

What `read_rows` reads, by name:

* ``.jsonl`` / ``.ndjson``: one JSON object per line; blank lines take no id.
* ``.json``: a list of objects, ``{"data": [...]}``, or JSON Lines (what ``Dataset.to_json`` writes):
  a document that holds more than one JSON value is read as JSON Lines.
* ``.parquet``: via pyarrow; nested lists of structs (chat messages) stay lists of dicts.
* ``.csv``: a header row, every value a string.
* ``.txt``: one ``{"text": line}`` row per non-empty line (the line without its line ending).
* any of these but Parquet (which compresses inside) gzip'ed (``.gz``) or zstd'ed (``.zst``).
* a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, via ``datasets``;
  a DatasetDict of several splits needs ``split``.

Ids are 0-based row positions. A row that cannot be read keeps its id and comes back with an error
(the build rejects it); a file that cannot be read at all raises one `DataError` naming it. A null
top-level cell (Parquet, ``datasets``) or an empty one (CSV, which cannot tell the two apart) counts as
a missing field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rapidin_index.errors import DataError
from rapidin_index.files import sha256_file

Rows = Iterator[tuple[int, dict | None, str | None]]
FORMATS = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".txt")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
DATASET_DICT_FILE = "dataset_dict.json"
DATASET_FILES = ("state.json", "dataset_info.json")
"""What ``Dataset.save_to_disk`` writes beside its .arrow files (``DatasetDict`` adds dataset_dict.json)."""
BATCH_ROWS = 1024
BLOCK_BYTES = 1 << 16


@dataclass(frozen=True)
class DataSource:
    """Where rows come from: a data file, or a ``datasets`` folder and (for a DatasetDict) its split."""

    path: Path
    split: str | None = None
    """The DatasetDict split to read; None for files and single-Dataset folders."""

    def __str__(self) -> str:
        return str(self.path) if self.split is None else f"{self.path} (split {self.split!r})"


def check_source(data: str | Path | DataSource, split: str | None = None) -> DataSource:
    """The source of ``data``, its split resolved, or a DataError saying what to give instead; cheap (no
    row is read, ``datasets`` is not imported), so a build runs it before loading the model."""
    if isinstance(data, DataSource):
        data, split = data.path, data.split if split is None else split
    path = Path(data)
    if path.is_dir():
        return DataSource(path, _resolve_split(path, split))
    file_format, _ = _file_format(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if file_format == ".parquet":
        _open_parquet(path)  # reads the footer only: a file that is no Parquet is refused up front
    if split is not None:
        raise DataError(
            f"--split {split!r} applies to a folder written by datasets' save_to_disk; {path} is a file "
            "(drop --split)"
        )
    return DataSource(path)


def read_rows(data: str | Path | DataSource, split: str | None = None) -> Rows:
    """Yield (example_id, row, error) for every row in order; exactly one of row / error is None.

    Whole-input problems (unknown format, missing file, unknown split) raise at call time; rows stream
    lazily, and an input that turns out unreadable part-way raises a DataError naming it.
    """
    source = check_source(data, split)
    if source.path.is_dir():
        return _read_dataset_folder(source)
    file_format, compression = _file_format(source.path)
    if file_format == ".parquet":  # its own errors are Arrow's, and it is never compressed outside
        return _read_parquet(source.path)
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".txt": _read_text}
    readers[".csv"] = _read_csv
    return _guarded(source.path, compression, readers[file_format](source.path, compression))


def data_checksum(data: str | Path | DataSource, split: str | None = None) -> str:
    """sha256 hex that changes when the rows do: of a file's bytes; of a ``datasets`` folder's files (or
    its split's), in sorted relative-path order, hidden files (.DS_Store, ...) left out."""
    source = check_source(data, split)
    if not source.path.is_dir():
        return sha256_file(source.path)
    folder = source.path if source.split is None else source.path / source.split
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(f"{relative.as_posix()}\n{sha256_file(path)}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- files


def _file_format(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression or None) from the name: ``train.jsonl.gz`` -> (.jsonl, gzip)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression is not None:
        suffixes.pop()
    file_format = suffixes[-1] if suffixes else ""
    if file_format not in FORMATS:
        known = ", ".join(FORMATS)
        raise DataError(
            f"cannot read {path}: unknown extension; use one of {known} (optionally .gz or .zst), "
            "or a folder written by datasets' save_to_disk"
        )
    if file_format == ".parquet" and compression is not None:
        raise DataError(f"cannot read {path}: Parquet compresses inside; decompress it to a .parquet file")
    return file_format, compression


def _open_binary(path: Path, compression: str | None) -> IO[bytes]:
    if compression == "gzip":
        import gzip

        return gzip.open(path, "rb")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"reading {path} needs the zstandard package: pip install zstandard") from None
        return io.BufferedReader(_ZstdReader(path.open("rb"), zstandard), buffer_size=BLOCK_BYTES)
    return path.open("rb")


class _ZstdReader(io.RawIOBase):
    """The bytes of a .zst file, frame after frame. zstandard's own stream reader ends quietly where a
    truncated file ends; this one raises ZstdError, so that no row is lost without a word."""

    def __init__(self, file: IO[bytes], zstandard) -> None:
        self._file, self._zstandard = file, zstandard
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False
        self._pending = memoryview(b"")  # decompressed, not yet read; a view, so slicing copies nothing

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            compressed = self._file.read(BLOCK_BYTES)
            if not compressed:
                if self._in_frame:
                    raise self._zstandard.ZstdError("the file ends inside a frame (truncated)")
                return 0
            self._pending = memoryview(self._decompress(compressed))
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _decompress(self, compressed: bytes) -> bytes:
        output = []
        while compressed:
            output.append(self._decompressor.decompress(compressed))
            self._in_frame = not self._decompressor.eof
            if self._in_frame:
                break
            compressed = self._decompressor.unused_data  # the next frame's first bytes
            self._decompressor = self._zstandard.ZstdDecompressor().decompressobj()
        return b"".join(output)

    def close(self) -> None:
        self._file.close()
        super().close()


def _guarded(path: Path, compression: str | None, rows: Rows) -> Rows:
    """``rows``, with a file that breaks part-way (corrupt gzip/zstd, bad encoding) ending in a DataError."""
    try:
        yield from rows
    except DataError:
        raise
    except Exception as error:
        if not isinstance(error, _reading_errors(compression)):
            raise
        kind = f"{compression} " if compression else ""
        raise DataError(f"cannot read {path}: not a valid {kind}file ({_one_line(error)})") from error


def _reading_errors(compression: str | None) -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, UnicodeDecodeError)
    if compression == "gzip":
        import zlib

        errors += (zlib.error,)
    zstandard = sys.modules.get("zstandard")  # imported by _open_binary before any row was read
    if compression == "zstd" and zstandard is not None:
        errors += (zstandard.ZstdError,)
    return errors


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read_jsonl(path: Path, compression: str | None) -> Rows:
    with _open_binary(path, compression) as file:
        yield from _json_lines(file)


def _json_lines(file: IO[bytes]) -> Rows:
    example_id = 0
    for line_number, line in enumerate(file, start=1):  # bytes: one bad UTF-8 line rejects that row only
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # decodes the bytes itself, BOM included
        except ValueError as error:  # bad JSON or bad UTF-8
            yield example_id, None, f"line {line_number}: not valid JSON: {error}"
        else:
            yield example_id, *_expect_object(row, f"line {line_number}")
        example_id += 1


def _read_json(path: Path, compression: str | None) -> Rows:
    with _open_binary(path, compression) as file:
        raw = file.read()
    try:
        document = json.loads(raw.decode("utf-8-sig"))
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # a first value, then more: JSON Lines (Dataset.to_json writes it)
            yield from _json_lines(io.BytesIO(raw))
            return
        raise DataError(f"{path} is not valid JSON: {error}") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from error
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(
            f'{path} must hold a list of row objects, {{"data": [...]}}, or one object per line (JSON Lines)'
        )
    for example_id, item in enumerate(document):
        yield example_id, *_expect_object(item, f"item {example_id}")


def _expect_object(value: Any, where: str) -> tuple[dict | None, str | None]:
    if isinstance(value, dict):
        return value, None
    return None, f"{where}: expected a JSON object, got {type(value).__name__}"


def _read_text(path: Path, compression: str | None) -> Rows:
    example_id = 0
    with _open_binary(path, compression) as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                text = line.rstrip(b"\r\n").decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield example_id, None, f"line {line_number}: not valid UTF-8: {error}"
            else:
                yield example_id, {"text": text}, None
            example_id += 1


def _read_csv(path: Path, compression: str | None) -> Rows:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long responses exceed the 128 KiB default
    with io.TextIOWrapper(_open_binary(path, compression), encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        try:
            for example_id, record in enumerate(reader):
                if None in record:  # DictReader files surplus cells under the key None
                    yield example_id, None, f"line {reader.line_num}: more cells than the header has columns"
                else:
                    yield example_id, {key: value for key, value in record.items() if value}, None
        except csv.Error as error:
            raise DataError(f"{path}, line {reader.line_num}: {error}") from error


def _open_parquet(path: Path):
    import pyarrow
    import pyarrow.parquet as parquet  # only needed for this format

    try:
        return parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as error:  # a damaged footer or schema
        raise DataError(f"cannot read {path}: not a valid Parquet file ({_one_line(error)})") from error


def _read_parquet(path: Path) -> Rows:
    import pyarrow

    return _parquet_rows(path, _open_parquet(path), pyarrow.ArrowException)


def _parquet_rows(path: Path, parquet_file, arrow_error: type[Exception]) -> Rows:
    example_id = 0
    try:
        for batch in parquet_file.iter_batches():
            for record in batch.to_pylist():
                yield example_id, _plain_row(record), None
                example_id += 1
    except (arrow_error, OSError, UnicodeDecodeError) as error:  # a damaged page part-way through
        raise DataError(f"cannot read {path}: damaged Parquet data ({_one_line(error)})") from error


def _plain_row(record: dict) -> dict:
    """A columnar record as a row: null cells dropped, values JSON-serialisable (dates, decimals, bytes
    become text), since the row is stored as the example's ``source``."""
    row = {key: value for key, value in record.items() if value is not None}
    return json.loads(json.dumps(row, default=str))


# ------------------------------------------------------------------------------ datasets folders


def _resolve_split(folder: Path, split: str | None) -> str | None:
    """The split to read from a save_to_disk folder: None for a single Dataset, else a DatasetDict's."""
    dict_file = folder / DATASET_DICT_FILE
    if dict_file.is_file():
        try:
            splits = [str(name) for name in json.loads(dict_file.read_text())["splits"]]
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(
                f"{dict_file} is damaged ({_one_line(error)}); save the DatasetDict again"
            ) from None
        if split is None and len(splits) == 1:
            return splits[0]
        if split not in splits:
            asked = "needs --split" if split is None else f"has no split {split!r}"
            raise DataError(f"{folder} {asked}: it holds the splits {', '.join(splits)} (give --split NAME)")
        return split
    if not any((folder / name).is_file() for name in DATASET_FILES):
        raise DataError(
            f"{folder} is a folder but not one written by datasets' save_to_disk (no {DATASET_DICT_FILE} or "
            f"{' or '.join(DATASET_FILES)}); give a data file, or save the dataset with save_to_disk"
        )
    if split is not None and split != _saved_split(folder):
        raise DataError(
            f"--split {split!r}: {folder} holds a single Dataset, not a DatasetDict (drop --split)"
        )
    return None


def _saved_split(folder: Path) -> str | None:
    """The split a single saved Dataset was loaded as (``load_dataset(..., split="train")``), if recorded."""
    try:
        return json.loads((folder / "state.json").read_text()).get("_split")
    except (OSError, ValueError, AttributeError):
        return None


def _read_dataset_folder(source: DataSource) -> Rows:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"reading {source.path} (a datasets folder) needs datasets: pip install datasets"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(source.path))
        dataset = loaded if source.split is None else loaded[source.split]
    except Exception as error:  # datasets and pyarrow raise many kinds on a damaged folder
        raise DataError(f"cannot load {source} with datasets.load_from_disk: {_one_line(error)}") from error
    return _dataset_rows(dataset.with_format(None))  # Python objects, whatever format it was saved with


def _dataset_rows(dataset) -> Rows:
    example_id = 0
    for batch in dataset.iter(batch_size=BATCH_ROWS):  # {column: [values]}
        for values in zip(*batch.values(), strict=True):
            yield example_id, _plain_row(dict(zip(batch, values, strict=True))), None
            example_id += 1
