"""The LanceDB side of the index: one row per training example with its text and build statistics."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("LANCEDB_LOG", "error")  # lance logs a WARN for every new table otherwise

import lancedb
import pyarrow as pa

DATABASE_DIR = "metadata"
TABLE_NAME = "rows_g{generation:04d}"

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


def table_name(generation: int) -> str:
    return TABLE_NAME.format(generation=generation)


def table_path(index_dir: str | Path, generation: int) -> Path:
    return Path(index_dir) / DATABASE_DIR / f"{table_name(generation)}.lance"


def _connect(index_dir: str | Path):
    return lancedb.connect(str(Path(index_dir) / DATABASE_DIR))


def write_table(index_dir: str | Path, generation: int, row_batches) -> int:
    """Write the generation's table from an iterable of lists of row dicts (overwrites a partial one)."""
    database = _connect(index_dir)
    table = database.create_table(table_name(generation), schema=SCHEMA, mode="overwrite")
    written = 0
    for rows in row_batches:
        if rows:
            table.add(pa.Table.from_pylist(rows, schema=SCHEMA))
            written += len(rows)
    return written


def read_all(index_dir: str | Path, generation: int) -> list[dict]:
    return _connect(index_dir).open_table(table_name(generation)).to_arrow().to_pylist()


def open_table(index_dir: str | Path, generation: int):
    return _connect(index_dir).open_table(table_name(generation))


def read_rows(table, ids: list[int]) -> dict[int, dict]:
    """{id: row} for the given ids of an open table, with ``source`` decoded back to a dict."""
    if not ids:
        return {}
    id_list = ", ".join(str(int(i)) for i in sorted(set(ids)))
    found = table.search().where(f"id IN ({id_list})").limit(len(set(ids))).to_arrow().to_pylist()
    return {row["id"]: {**row, "source": json.loads(row["source"])} for row in found}


def count_rows(index_dir: str | Path, generation: int) -> int:
    return _connect(index_dir).open_table(table_name(generation)).count_rows()


def drop_other_tables(index_dir: str | Path, keep_generation: int) -> None:
    database = _connect(index_dir)
    keep = table_name(keep_generation)
    for name in list(database.list_tables().tables):
        if name != keep and name.startswith("rows_g"):
            database.drop_table(name)
