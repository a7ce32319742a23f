"""LanceDB writer growth (issue 27 item 2's remainder): peak RSS of `row_table.write_table` against N, per writer.

Every measurement is a fresh process (one thread) that writes N synthetic rows (append_scaling.py's
`stored_row`: about 300 characters of text and two metadata fields, in batches of 4,096 as a build's
finalize gives them) and reports its wall time, its peak RSS (VmHWM) minus its RSS before the write (the
imports done), the table on disk, and the rows read back with lancedb's `open_table(...).count_rows()`.
Variants (``--variants``):

current                   `row_table.write_table` as it is: lancedb's `create_table` from a RecordBatchReader
consume                   the same, but the reader is only drained (no LanceDB write): the Python side alone
version=V                 `create_table(..., data_storage_version=V)` (legacy, 2.0, 2.1, stable)
segments=S                `create_table` of the first S rows, then `table.add` of each next S (one version each)
lance[:key=value...]      `lance.write_dataset` (the ``pylance`` package, not a dependency of this project:
                          install it to measure these) with its writer options, e.g.
                          ``lance:data_cache_bytes=1048576`` or ``lance:max_rows_per_file=16384``; its baseline
                          is taken after pylance is loaded and has written one table (the load is reported
                          apart: ``base_MB``)

``MALLOC_ARENA_MAX=2`` in the environment is passed on to the children. Run from the repository root;
see BENCHMARKS.md for the command and the results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_arguments, write_json  # noqa: E402

ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "LANCEDB_LOG": "error",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="16384,65536,262144", help="comma-separated table sizes")
    parser.add_argument("--variants", default="current,consume", help="comma-separated variants (see above)")
    parser.add_argument("--folder", default=None, help="where the tables go (default: a temp dir)")
    parser.add_argument("--out", default=None, help="append one JSON line a measurement here")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    return parse_arguments(parser, argv, rows="512", variants="current,consume,segments=4096")


def child(rows: int, variant: str, folder: Path) -> dict:
    import lancedb
    import pyarrow as pa
    from append_scaling import memory, stored_row

    from rapidin_index.store import row_table

    if variant.startswith("lance"):
        import lance

        lance.write_dataset(pa.table({"a": [1]}), str(folder / "warm.lance"), mode="overwrite")
    real = lancedb.db.LanceDBConnection.create_table
    database = folder / "db"

    def batches():
        for start in range(0, rows, 4096):
            yield [stored_row(i) for i in range(start, min(rows, start + 4096))]

    def drained(self, name, data=None, **_):
        for _ in data:
            pass

    def versioned(self, *args, **kwargs):
        return real(self, *args, **{**kwargs, "data_storage_version": variant.split("=", 1)[1]})

    def segmented(self, name, data=None, schema=None, mode="create", **_):
        size, table = int(variant.split("=", 1)[1]) // 4096, None
        while part := list(itertools.islice(data, max(size, 1))):
            reader = pa.RecordBatchReader.from_batches(schema, iter(part))
            if table is None:
                table = real(self, name, data=reader, schema=schema, mode=mode)
            else:
                table.add(reader)
        return table

    def via_lance(self, name, data=None, schema=None, **_):
        import lance

        options = dict(option.split("=", 1) for option in variant.split(":")[1:])
        options = {k: v if k == "data_storage_version" else int(v) for k, v in options.items()}
        database.mkdir(parents=True, exist_ok=True)
        lance.write_dataset(data, str(database / f"{name}.lance"), schema=schema, mode="overwrite", **options)

    writers = {"consume": drained, "version": versioned, "segments": segmented, "lance": via_lance}
    name = variant.split("=", 1)[0].split(":", 1)[0]
    if name != "current":
        lancedb.db.LanceDBConnection.create_table = writers[name]
    base = memory()
    started = time.perf_counter()
    row_table.write_table(database, "rows", batches())
    seconds = time.perf_counter() - started
    end = memory()
    written = name != "consume"
    return {
        "rows": rows,
        "variant": variant,
        "seconds": round(seconds, 2),
        "growth_MB": round((end["VmHWM"] - base["VmRSS"]) / 1e6, 1),
        "base_MB": round(base["VmRSS"] / 1e6, 1),
        "disk_MB": round(sum(p.stat().st_size for p in database.rglob("*") if p.is_file()) / 1e6, 1)
        if written
        else 0.0,
        "data_files": len([p for p in database.rglob("*.lance") if p.is_file()]) if written else 0,
        "read_back": lancedb.connect(str(database)).open_table("rows").count_rows() if written else 0,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], Path(args.folder))))
        return
    results = []
    for rows in (int(r) for r in args.rows.split(",") if r):
        for variant in args.variants.split(","):
            folder = Path(tempfile.mkdtemp(dir=args.folder, prefix="lancedb-writer-"))
            command = [sys.executable, __file__, "--child", str(rows), variant, "--folder", str(folder)]
            finished = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, check=False
            )
            shutil.rmtree(folder, ignore_errors=True)
            if finished.returncode != 0:
                raise SystemExit(f"{rows} rows, {variant}: failed\n{finished.stderr[-2000:]}")
            result = json.loads(finished.stdout.strip().splitlines()[-1])
            assert result["read_back"] in (0, rows), result  # every row written is read back by lancedb
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps(result) + "\n")
            results.append(result)
    if args.smoke:
        write_json(args.smoke_folder / "result.json", results)
    print(
        "\n| rows | writer | s | write_table peak growth MB | on disk MB (data files) |\n|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['rows']:,} | {r['variant']} | {r['seconds']:.1f} | {r['growth_MB']:,.1f} | "
            f"{r['disk_MB']:,.1f} ({r['data_files']}) |"
        )


if __name__ == "__main__":
    main()
