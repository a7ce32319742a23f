"""The LanceDB side of the index (store/row_table.py): one table of rows per name in a database folder."""

from __future__ import annotations

import json

from rapidin_index.store import row_table


def _row(example_id: int, **overrides) -> dict:
    row = {
        "id": example_id,
        "source": json.dumps({"instruction": f"q{example_id}", "output": "a"}),
        "prompt": f"q{example_id}",
        "response": "a",
        "num_tokens": 4,
        "num_response_tokens": 1,
        "truncated": False,
        "loss": 0.25,
        "gradient_norm": 2.0,
        "content_hash": f"h{example_id}",
    }
    return {**row, **overrides}


def test_the_schema_has_one_field_per_row_key():
    assert row_table.SCHEMA.names == list(_row(0))


def test_write_table_then_read_all_and_count(tmp_path):
    database = tmp_path / "metadata"
    written = row_table.write_table(database, "rows_g0001", iter([[_row(0), _row(1)], [], [_row(5)]]))
    assert written == 3
    rows = sorted(row_table.read_all(database, "rows_g0001"), key=lambda row: row["id"])
    assert rows == [_row(0), _row(1), _row(5)]  # every field back as written, source as JSON text
    assert row_table.count_rows(database, "rows_g0001") == 3
    assert (database / "rows_g0001.lance").is_dir()


def test_write_table_writes_one_version_whatever_the_number_of_batches(tmp_path):
    """A build's chunks once made one LanceDB version each (a _versions folder growing with N)."""
    batches = [[_row(i, source=json.dumps({"text": "t", "lang": ["en", 3][i % 2]}))] for i in range(20)]
    assert row_table.write_table(tmp_path, "rows", iter(batches)) == 20
    table = row_table.open_table(tmp_path, "rows")
    assert table.version == 1 and len(table.list_versions()) == 1
    assert table.to_arrow()["lang"].to_pylist() == ["en", "3"] * 10  # mixed types: a string column


def test_write_table_overwrites_a_partial_table(tmp_path):
    row_table.write_table(tmp_path, "rows", [[_row(0), _row(1)]])
    assert row_table.write_table(tmp_path, "rows", [[_row(7)]]) == 1
    assert [row["id"] for row in row_table.read_all(tmp_path, "rows")] == [7]


def test_an_empty_table_has_the_schema_and_no_rows(tmp_path):
    assert row_table.write_table(tmp_path, "rows", []) == 0
    assert row_table.count_rows(tmp_path, "rows") == 0
    stored = row_table.open_table(tmp_path, "rows").schema.names
    assert stored == [row_table.JSON_COLUMN if name == "source" else name for name in row_table.SCHEMA.names]


def test_tables_of_one_database_are_separate(tmp_path):
    row_table.write_table(tmp_path, "rows_g0001", [[_row(0)]])
    row_table.write_table(tmp_path, "rows_g0002", [[_row(1), _row(2)]])
    assert row_table.count_rows(tmp_path, "rows_g0001") == 1
    assert row_table.count_rows(tmp_path, "rows_g0002") == 2


def test_read_rows_joins_ids_and_decodes_the_source(tmp_path):
    row_table.write_table(tmp_path, "rows", [[_row(i) for i in range(10)]])
    table = row_table.open_table(tmp_path, "rows")
    found = row_table.read_rows(table, [7, 2, 7, 99])
    assert sorted(found) == [2, 7]  # duplicates once, an unknown id left out
    assert found[7] == {**_row(7), "source": {"instruction": "q7", "output": "a"}}
    assert row_table.read_rows(table, []) == {}


def test_row_fields_become_typed_columns_an_sql_filter_selects_by(tmp_path):
    fields = [{"source": "forum", "year": 2021, "score": 0.5}, {"source": "wiki", "year": 2019}]
    fields += [{"source": "forum", "year": 2024, "tags": ["a"]}, {"source": "blog", "year": "unknown"}]
    rows = []
    for example_id, extra in enumerate(fields):
        row_json = {"instruction": f"q{example_id}", "output": "a", **extra}
        rows.append(_row(example_id, source=json.dumps(row_json)))
    row_table.write_table(tmp_path, "rows", [rows])
    table = row_table.open_table(tmp_path, "rows")
    types = {field.name: str(field.type) for field in table.schema}
    assert types["source"] == "string" and types["score"] == "double" and "tags" not in types
    assert types["year"] == "string"  # an int and a string in one field: kept as text, never dropped
    assert "instruction" not in types and "output" not in types  # the text stays in the row's JSON
    assert sorted(row_table.matching_ids(table, "source = 'forum'", 10)) == [0, 2]
    assert row_table.matching_ids(table, "source = 'forum' AND id > 0", 10) == [2]
    assert row_table.matching_ids(table, "score > 0.1", 10) == [0]
    assert sorted(row_table.read_all(tmp_path, "rows"), key=lambda row: row["id"]) == rows  # as written


def test_a_bad_filter_names_the_columns(tmp_path):
    import pytest

    from rapidin_index.errors import QueryError

    row_table.write_table(tmp_path, "rows", [[_row(0, source=json.dumps({"text": "a", "lang": "en"}))]])
    with pytest.raises(QueryError, match="--where 'colour = 1'.*columns: id, .*lang"):
        row_table.matching_ids(row_table.open_table(tmp_path, "rows"), "colour = 1", 10)


def test_a_damaged_table_file_is_refused_on_one_line(tmp_path):
    import pytest

    from rapidin_index.errors import IntegrityError

    row_table.write_table(tmp_path, "rows", [[_row(i) for i in range(50)]])
    (data_file,) = (tmp_path / "rows.lance" / "data").glob("*.lance")
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    with pytest.raises(IntegrityError, match="the LanceDB table rows cannot be read .*re-import") as refused:
        row_table.read_all(tmp_path, "rows")
    assert "rustc" not in str(refused.value)
    with pytest.raises(IntegrityError, match="the index is damaged"):
        row_table.read_rows(row_table.open_table(tmp_path, "rows"), [1, 2])


def test_column_types_found_in_a_stream_equal_those_found_over_every_row_at_once():
    """`write_table` infers types batch by batch from a few samples a field; the reference is arrow's
    own inference over every value of the field at once (`metadata_fields`)."""
    import random

    generator = random.Random(0)
    pools = [[1, -3, 2**40], [0.5, float("nan")], [True, False], ["x", "2021"], [None], [2**63, -(2**63) - 1]]
    pools += [[["a"]], [{"k": 1}]]
    for _ in range(400):
        kinds = generator.sample(pools, generator.randint(1, 3))
        sources = []
        for _ in range(generator.randint(1, 12)):
            row = {"text": "t"}
            if generator.random() < 0.8:
                row["field"] = generator.choice(generator.choice(kinds))
            if generator.random() < 0.3:
                row["other"] = generator.choice(generator.choice(kinds))
            sources.append(row)
        streamed = row_table._FieldTypes()
        for start in range(0, len(sources), 3):
            streamed.update(sources[start : start + 3])
        assert streamed.fields() == row_table.metadata_fields(sources), sources


def test_a_type_that_changes_in_a_late_batch_types_the_whole_column(tmp_path):
    """The first batches are in LanceDB's stream before the last is seen: an int field that turns to text
    in the last batch still makes one string column, its early values as text."""
    batches = ([_row(i, source=json.dumps({"text": "t", "year": 2000 + i}))] for i in range(5))
    last = [_row(5, source=json.dumps({"text": "t", "year": "unknown", "late": 1.5}))]
    assert row_table.write_table(tmp_path, "rows", iter([*batches, last])) == 6
    table = row_table.open_table(tmp_path, "rows").to_arrow()
    assert (
        str(table.schema.field("year").type) == "string" and str(table.schema.field("late").type) == "double"
    )
    assert table["year"].to_pylist() == ["2000", "2001", "2002", "2003", "2004", "unknown"]
    assert table["late"].to_pylist() == [None] * 5 + [1.5]
    assert list(tmp_path.iterdir()) == [tmp_path / "rows.lance"]  # the spilled rows are gone


def test_write_table_pulls_batches_as_it_goes_and_leaves_nothing_when_a_batch_fails(tmp_path):
    pulled = []

    def batches():
        for i in range(3):
            pulled.append(i)
            yield [_row(i)]
        raise RuntimeError("the journal broke")

    import pytest

    with pytest.raises(RuntimeError, match="journal broke"):
        row_table.write_table(tmp_path, "rows", batches(), spill=tmp_path / ".spill.tmp")
    assert pulled == [0, 1, 2] and not (tmp_path / ".spill.tmp").exists()


def test_iter_rows_pages_the_table_in_its_order_or_a_given_one(tmp_path):
    rows = [_row(i) for i in (5, 3, 9, 1, 7, 0, 8)]
    row_table.write_table(tmp_path, "rows", [rows[:4], rows[4:]])
    assert row_table.read_ids(tmp_path, "rows").tolist() == [5, 3, 9, 1, 7, 0, 8]
    pages = list(row_table.iter_rows(tmp_path, "rows", batch_rows=3))
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [row for page in pages for row in page] == rows == row_table.read_all(tmp_path, "rows")
    by_id = row_table.read_ids(tmp_path, "rows").argsort()
    pages = list(row_table.iter_rows(tmp_path, "rows", order=by_id, batch_rows=2))
    assert [row for page in pages for row in page] == sorted(rows, key=lambda row: row["id"])


def test_iter_rows_reads_pages_of_thousands(tmp_path):
    rows = [_row(i) for i in range(5000)]
    row_table.write_table(tmp_path, "rows", [rows[:2500], rows[2500:]])
    pages = list(row_table.iter_rows(tmp_path, "rows"))
    assert [len(page) for page in pages] == [row_table.ROW_BATCH, 5000 - row_table.ROW_BATCH]
    assert [row["id"] for page in pages for row in page] == list(range(5000))
