"""The LanceDB side of the index: one row per training example with its text and build statistics.

A codec over a database folder and a table name; `store` knows which folder and name a generation uses.
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


def write_table(database: Path, name: str, row_batches) -> int:
    """Write table ``name`` from an iterable of lists of row dicts (overwrites a partial one); each row's
    scalar metadata fields become typed columns (`metadata_fields`), filterable with SQL (`matching_ids`).

    One LanceDB write (one version, whatever the number of batches). Each batch is turned into an arrow
    batch as it comes (compact text, not Python dicts); only the metadata fields' values are kept as
    Python values until their types are known."""
    internal = pa.schema([pa.field(JSON_COLUMN, pa.string()) if f.name == "source" else f for f in SCHEMA])
    parts, columns, position = [], {}, 0
    for rows in row_batches:
        if not rows:
            continue
        sources = [json.loads(row["source"]) for row in rows]
        for field_name in (n for source in sources for n in source if n not in TEXT_FIELDS | RESERVED):
            columns.setdefault(field_name, [None] * position)
        for field_name, values in columns.items():
            values.extend(source.get(field_name) for source in sources)
        physical = [
            {**{key: value for key, value in row.items() if key != "source"}, JSON_COLUMN: row["source"]}
            for row in rows
        ]
        parts.append(pa.RecordBatch.from_pylist(physical, schema=internal))
        position += len(rows)
    table = pa.Table.from_batches(parts, schema=internal)
    for field in _typed_fields(columns):
        table = table.append_column(
            field, pa.array([_cell(v, field) for v in columns[field.name]], field.type)
        )
    _connect(database).create_table(name, data=table, schema=table.schema, mode="overwrite")
    return position


def _cell(value, field: pa.Field):
    return (
        str(value)
        if value is not None and field.type == pa.string() and not isinstance(value, str)
        else value
    )


def _logical(row: dict) -> dict:
    """A stored row as the rest of the package sees it: the `SCHEMA` columns, ``source`` the JSON."""
    if JSON_COLUMN in row:
        row["source"] = row.pop(JSON_COLUMN)
    return {field.name: row[field.name] for field in SCHEMA}


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
