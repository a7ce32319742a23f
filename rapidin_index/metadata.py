"""The LanceDB side of the index: one row per training example with its text and build statistics.

A codec over a database folder and a table name; `store` knows which folder and name a generation uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("LANCEDB_LOG", "error")  # lance logs a WARN for every new table otherwise

import lancedb
import pyarrow as pa

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


def write_table(database: Path, name: str, row_batches) -> int:
    """Write table ``name`` from an iterable of lists of row dicts (overwrites a partial one)."""
    table = _connect(database).create_table(name, schema=SCHEMA, mode="overwrite")
    written = 0
    for rows in row_batches:
        if rows:
            table.add(pa.Table.from_pylist(rows, schema=SCHEMA))
            written += len(rows)
    return written


def read_all(database: Path, name: str) -> list[dict]:
    return _connect(database).open_table(name).to_arrow().to_pylist()


def open_table(database: Path, name: str):
    return _connect(database).open_table(name)


def read_rows(table, ids: list[int]) -> dict[int, dict]:
    """{id: row} for the given ids of an open table, with ``source`` decoded back to a dict."""
    if not ids:
        return {}
    id_list = ", ".join(str(int(i)) for i in sorted(set(ids)))
    found = table.search().where(f"id IN ({id_list})").limit(len(set(ids))).to_arrow().to_pylist()
    return {row["id"]: {**row, "source": json.loads(row["source"])} for row in found}


def count_rows(database: Path, name: str) -> int:
    return _connect(database).open_table(name).count_rows()
