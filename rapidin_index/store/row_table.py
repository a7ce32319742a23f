"""The LanceDB side of the index: one row per training example with its text and build statistics.

A codec over a database folder and a table name; `index_folder` knows which folder and name a generation uses.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

os.environ.setdefault("LANCEDB_LOG", "error")  # lance logs a WARN for every new table otherwise

import lancedb
import pyarrow as pa

from rapidin_index.errors import IntegrityError, QueryError

SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("source", pa.string()),  # the original row as JSON
        pa.field("prompt", pa.string()),  # rendered prompt (template applied)
        pa.field("response", pa.string()),  # rendered response
        pa.field("num_tokens", pa.int32()),
        pa.field("num_response_tokens", pa.int32()),
        pa.field("truncated", pa.bool_()),
        pa.field("loss", pa.float32()),
        pa.field("gradient_norm", pa.float32()),  # L2 norm of the raw gradient, before normalisation
        pa.field("content_hash", pa.string()),
    ]
)


def _connect(database: Path):
    return lancedb.connect(str(database))


JSON_COLUMN = "_source"
"""Where a table with metadata columns keeps each row's JSON: a row's own field may be named 'source'."""
TEXT_FIELDS = frozenset(
    {"messages", "instruction", "input", "output", "prompt", "completion", "response", "answer", "text"}
)
"""Row fields that are prompt or response text: kept in the row's JSON, not as metadata columns."""
RESERVED = frozenset({field.name for field in SCHEMA if field.name != "source"} | {JSON_COLUMN})
"""Column names of the package's own (a row field of one of these names stays in the row's JSON)."""


def metadata_fields(sources: list[dict]) -> list[pa.Field]:
    """A typed column for every scalar row field that is not prompt/response text (arrow infers the
    type over all rows; a field of mixed types becomes a string), in first-seen order."""
    names = [name for row in sources for name in row if name not in TEXT_FIELDS | RESERVED]
    return _typed_fields({name: [row.get(name) for row in sources] for name in dict.fromkeys(names)})


def _typed_fields(columns: dict[str, list]) -> list[pa.Field]:
    fields = []
    for name, values in columns.items():
        if not all(value is None or isinstance(value, (str, int, float, bool)) for value in values):
            continue  # lists and objects stay in the row's JSON
        try:
            column = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            column = pa.array([None if value is None else str(value) for value in values])
        fields.append(pa.field(name, column.type if column.type != pa.null() else pa.string()))
    return fields


ROW_BATCH = 4096
"""Rows per arrow batch when a table is copied or read in pages (memory: one page of text)."""


def write_table(database: Path, name: str, row_batches, spill: Path | None = None) -> int:
    """Write table ``name`` from an iterable of lists of row dicts (overwrites a partial one); each row's
    scalar metadata fields become typed columns (`metadata_fields`), filterable with SQL (`matching_ids`).

    One LanceDB write (one version, whatever the number of batches), in a stream: memory holds one batch,
    whatever the table's size. A column's type is known only once every row is seen, so the rows are
    first spilled to ``spill`` (an arrow IPC stream, removed afterwards; default: beside the table) while
    the types are inferred (`_FieldTypes`), then read back batch by batch into LanceDB with the typed
    columns added."""
    database.mkdir(parents=True, exist_ok=True)
    spill = spill or database / f".{name}.spill.arrow"
    internal = pa.schema([pa.field(JSON_COLUMN, pa.string()) if f.name == "source" else f for f in SCHEMA])
    types, position = _FieldTypes(), 0
    try:
        with pa.OSFile(str(spill), "wb") as sink, pa.ipc.new_stream(sink, internal) as spilled:
            for rows in row_batches:
                if not rows:
                    continue
                types.update(json.loads(row["source"]) for row in rows)
                physical = [
                    {**{k: v for k, v in row.items() if k != "source"}, JSON_COLUMN: row["source"]}
                    for row in rows
                ]
                spilled.write_batch(pa.RecordBatch.from_pylist(physical, schema=internal))
                position += len(rows)
        fields = types.fields()
        schema = pa.schema([*internal, *fields])
        with pa.OSFile(str(spill), "rb") as source:  # read, not mapped: its pages do not stay resident
            batches = (_with_fields(batch, fields) for batch in pa.ipc.open_stream(source))
            reader = pa.RecordBatchReader.from_batches(schema, batches)
            _connect(database).create_table(name, data=reader, schema=schema, mode="overwrite")
    finally:
        spill.unlink(missing_ok=True)
    return position


def _with_fields(batch: pa.RecordBatch, fields: list[pa.Field]) -> pa.RecordBatch:
    """``batch`` with a typed column per metadata field, read back from each row's JSON."""
    if not fields:
        return batch
    sources = [json.loads(text) for text in batch.column(JSON_COLUMN).to_pylist()]
    columns = [pa.array([_cell(s.get(f.name), f) for s in sources], f.type) for f in fields]
    return pa.RecordBatch.from_arrays([*batch.columns, *columns], schema=pa.schema([*batch.schema, *fields]))


_KINDS = {str: "str", int: "int", float: "float", bool: "bool"}


class _FieldTypes:
    """The metadata fields of a stream of rows and their types, as `metadata_fields` would find them over
    every row at once, from a few values per field: the first of each Python type in the order the types
    first appear (arrow's inference depends on that order), the smallest and largest int (overflow), and
    a None where a row lacks the field."""

    def __init__(self):
        self.samples: dict[str, dict] = {}  # field -> {kind: sample values}, in first-seen order
        self.position = 0

    def update(self, sources) -> None:
        samples, skipped = self.samples, TEXT_FIELDS | RESERVED
        for source in sources:
            present = 0
            for name, value in source.items():
                if name in skipped:
                    continue
                if name not in samples:
                    samples[name] = {"missing": [None]} if self.position else {}
                present += 1
                kind = "missing" if value is None else _KINDS.get(type(value), "other")
                field = samples[name]
                if kind == "int" and "int" in field:
                    bounds = field["int"]  # [smallest, largest]
                    if value < bounds[0]:
                        bounds[0] = value
                    elif value > bounds[1]:
                        bounds[1] = value
                elif kind not in field:
                    field[kind] = [value, value] if kind == "int" else [value]
            if present < len(samples):  # a field this row lacks: a None in its column
                for name, field in samples.items():
                    if name not in source:
                        field.setdefault("missing", [None])
            self.position += 1

    def fields(self) -> list[pa.Field]:
        return _typed_fields(
            {
                name: [v for values in samples.values() for v in values]
                for name, samples in self.samples.items()
            }
        )


def _cell(value, field: pa.Field):
    return (
        str(value)
        if value is not None and field.type == pa.string() and not isinstance(value, str)
        else value
    )


_NAMES = tuple(SCHEMA.names)


def _logical(row: dict) -> dict:
    """A stored row as the rest of the package sees it: the `SCHEMA` columns, ``source`` the JSON."""
    if JSON_COLUMN in row:
        row["source"] = row.pop(JSON_COLUMN)
    return {name: row[name] for name in _NAMES}


@contextlib.contextmanager
def _readable(name: str):
    """A LanceDB file cut short or overwritten is refused on one line, not lance's Rust trace."""
    try:
        yield
    except RuntimeError as error:
        reason = str(error).splitlines()[0].split(", /rustc")[0][:200]
        raise IntegrityError(
            f"the LanceDB table {name} cannot be read ({reason}): the index is damaged; re-import its "
            "bundle or rebuild it"
        ) from None


def read_all(database: Path, name: str) -> list[dict]:
    with _readable(name):
        return [_logical(row) for row in _connect(database).open_table(name).to_arrow().to_pylist()]


def read_ids(database: Path, name: str):
    """The table's ids [n] int64, in table order (8 bytes a row: the text is not read)."""
    import numpy as np

    with _readable(name):
        table = _connect(database).open_table(name)
        ids = table.search().select(["id"]).limit(None).to_arrow()["id"]
    return np.asarray(ids.to_numpy(), dtype=np.int64)


def iter_rows(database: Path, name: str, order=None, batch_rows: int = ROW_BATCH):
    """Lists of at most ``batch_rows`` rows (as `read_all` gives them), in table order or in the order
    of the table positions ``order``: memory holds one page of text, whatever the table's size."""
    import numpy as np

    with _readable(name):
        table = _connect(database).open_table(name)
        order = np.arange(table.count_rows()) if order is None else np.asarray(order, dtype=np.int64)
    columns = [
        JSON_COLUMN if f.name == "source" and JSON_COLUMN in table.schema.names else f.name for f in SCHEMA
    ]
    for start in range(0, len(order), batch_rows):
        page = order[start : start + batch_rows]
        wanted = np.sort(page)  # LanceDB answers in table order
        with _readable(name):
            found = table.take_offsets(wanted.tolist()).select(columns).to_arrow().to_pylist()
        if len(found) != len(page):
            raise IntegrityError(
                f"the LanceDB table {name} answered {len(found)} of {len(page)} rows: the index is damaged; "
                "re-import its bundle or rebuild it"
            )
        at = {int(offset): row for offset, row in zip(wanted.tolist(), found, strict=True)}
        yield [_logical(at[int(offset)]) for offset in page]


def open_table(database: Path, name: str):
    return _connect(database).open_table(name)


def read_rows(table, ids: list[int]) -> dict[int, dict]:
    """{id: row} for the given ids of an open table, with ``source`` decoded back to a dict."""
    if not ids:
        return {}
    id_list = ", ".join(str(int(i)) for i in sorted(set(ids)))
    with _readable(table.name):
        found = table.search().where(f"id IN ({id_list})").limit(len(set(ids))).to_arrow().to_pylist()
    return {
        row["id"]: {**(logical := _logical(row)), "source": json.loads(logical["source"])} for row in found
    }


def matching_ids(table, where: str, limit: int) -> list[int]:
    """The ids of the rows an SQL filter over the table's columns keeps (LanceDB's own syntax)."""
    if JSON_COLUMN not in table.schema.names:
        raise QueryError(
            "this index was built before rows kept their fields as columns; rebuild it to filter with --where"
        )
    try:
        found = table.search().where(where).select(["id"]).limit(limit).to_arrow()
    except Exception as error:  # lance reports a bad expression or an unknown column in its own types
        columns = ", ".join(name for name in table.schema.names if name != JSON_COLUMN)
        raise QueryError(f"--where {where!r}: {str(error).splitlines()[0]} (columns: {columns})") from None
    return found["id"].to_pylist()


def count_rows(database: Path, name: str) -> int:
    return _connect(database).open_table(name).count_rows()
