"""Search scaling (issue 27): open time, search time, query RSS and append cost of an index read in place.

Synthetic unit-norm vectors (no model: the search side only) are written through the project's own writer
(`vector_file.VectorWriter`) at each row count x K, in float32 and float16. Every measurement runs in a fresh
process (numpy/BLAS on one thread) that reports its own wall time and memory (VmHWM = peak resident; RssAnon
= private memory; RssFile = mapped file pages, shared with the page cache):

open        new: `StoredVectors` (maps the file, reads the ids); old: `faiss.read_index` (reads it whole)
search      1 and 100 query vectors, helpful and harmful top 10: new `vector_index.search_both` over the mapped
            file; old: the `index.py` of commit 9cb7103 (the pre-issue-27 code, `--old-index`) over the
            index read whole (float32: blocked numpy scan; float16: FAISS scalar-quantizer search of the
            queries and their negations). Each search is run twice in its process; the second is reported
            (pages warm), the first too (``first``).
base        with ``--baseline COMMIT``: that commit's `StoredVectors` + `search_both` (loaded beside this
            checkout's, `search_topk.load_baseline`), the same searches as new, in the same process tree
bare        the bare matrix product of the same queries with every row, blocks of an in-RAM float32 matrix
            (the memory-bandwidth floor; the top-k bookkeeping is what search adds to it)
capped      new search with ``max_memory`` = 256 MB (pages released block by block)
append      1,000 rows added to the index: new = old file copied as a stream + the new rows
            (`StoredVectors.copy_rows_to` + `VectorWriter`); old = read whole, re-added, rewritten (9cb7103)

Run from the repository root; see BENCHMARKS.md for the command and the results. Disk: about 3x the
largest index; RAM: one process at a time, at most the largest float32 index (bare and old open).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import drive, memory, parse_arguments

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="16384,65536,131072", help="comma-separated row counts")
    parser.add_argument("--sketch-dim", type=int, default=4096, help="K")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--old-index", default=None, help="index.py of the old code (git show 9cb7103:...)")
    parser.add_argument("--baseline", default=None, help="a commit whose search code runs beside this one")
    parser.add_argument("--no-append", action="store_true", help="skip the append measurements")
    parser.add_argument("--folder", default=None, help="where the vectors files go (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--table", default=None, help="print the Markdown tables of a results JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, default=1, help=argparse.SUPPRESS)
    # the smoke run: HEAD as the baseline (git show, no checkout) and this checkout's index module as the old one
    from rapidin_index.store import vector_index

    return parse_arguments(
        parser,
        argv,
        rows="512",
        sketch_dim=64,
        baseline="HEAD",
        old_index=vector_index.__file__,
        out="{smoke}/result.json",
    )


def old_module(path: str):
    spec = importlib.util.spec_from_file_location("old_index", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def queries_for(count: int, dimension: int):
    import numpy as np

    queries = np.random.default_rng(1).standard_normal((count, dimension)).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def timed(function):
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


# --------------------------------------------------------------------------- child processes


def child(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    import numpy as np

    from rapidin_index.store import vector_index
    from rapidin_index.store.vector_file import StoredVectors, VectorWriter

    result = {"before": memory()}
    if args.child in ("open-new", "search-new", "search-capped"):
        capped = args.child == "search-capped"
        result["open_s"], stored = timed(lambda: StoredVectors(args.path, 256 * 10**6 if capped else None))
        result["after_open"] = memory()
        if args.child != "open-new":
            queries = queries_for(args.queries, stored.dimension)
            result["first_s"], _ = timed(lambda: vector_index.search_both(stored, queries, args.top_k))
            result["search_s"], _ = timed(lambda: vector_index.search_both(stored, queries, args.top_k))
    elif args.child == "search-base":
        from search_topk import load_baseline

        base_file, base_index = load_baseline(args.baseline)
        result["open_s"], stored = timed(lambda: base_file.StoredVectors(args.path))
        queries = queries_for(args.queries, stored.dimension)
        result["first_s"], _ = timed(lambda: base_index.search_both(stored, queries, args.top_k))
        result["search_s"], _ = timed(lambda: base_index.search_both(stored, queries, args.top_k))
    elif args.child in ("open-old", "search-old"):
        old = old_module(args.old_index)
        result["open_s"], index = timed(lambda: old.load_index(args.path))
        result["after_open"] = memory()
        if args.child == "search-old":
            queries = queries_for(args.queries, index.d)
            result["first_s"], _ = timed(lambda: old.search_both(index, queries, args.top_k))
            result["search_s"], _ = timed(lambda: old.search_both(index, queries, args.top_k))
    elif args.child == "bare":
        stored = StoredVectors(args.path)
        matrix = stored.read(0, stored.count)  # [n, d] float32 in RAM
        queries = queries_for(args.queries, stored.dimension)
        step = max(1, (32 << 20) // (4 * stored.dimension))

        def products():
            for start in range(0, len(matrix), step):
                queries @ matrix[start : start + step].T  # [q, rows]

        products()
        result["search_s"], _ = timed(products)
        # the new scan over the same in-RAM matrix: what the top-k adds to the bare products
        flat = vector_index.new_index(stored.dimension)
        flat.add_with_ids(matrix, stored.ids)
        del matrix
        result["scan_in_ram_s"], _ = timed(lambda: vector_index.search_both(flat, queries, args.top_k))
        if args.old_index:
            old = old_module(args.old_index)
            result["old_scan_in_ram_s"], _ = timed(lambda: old.search_both(flat, queries, args.top_k))
    elif args.child == "append-new":
        stored = StoredVectors(args.path)
        stored.drop_pages = True
        new_rows = queries_for(1000, stored.dimension)

        def append():
            with VectorWriter(args.path + ".appended", stored.dimension, stored.vector_dtype) as writer:
                stored.copy_rows_to(writer)
                writer.add(new_rows, np.arange(stored.count, stored.count + 1000))

        result["append_s"], _ = timed(append)
        os.unlink(args.path + ".appended")
    elif args.child == "append-old":
        old = old_module(args.old_index)

        def append():  # the old _finalize: the previous generation read whole, re-added, then rewritten
            index = old.load_index(args.path)
            ids, vectors = old.stored_vectors(index)
            fresh = old.new_index(index.d, old.vector_dtype_of(index))
            del index
            old.add_vectors(fresh, vectors, ids)
            new_rows = queries_for(1000, fresh.d)
            old.add_vectors(fresh, new_rows, np.arange(len(ids), len(ids) + 1000))
            old.save_index(fresh, args.path + ".appended")

        result["append_s"], _ = timed(append)
        os.unlink(args.path + ".appended")
    result["end"] = memory()
    return result


def run_child(args: argparse.Namespace, mode: str, path: Path, queries: int = 1) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--path", str(path), "--queries", str(queries)]
    command += ["--top-k", str(args.top_k)] + (["--old-index", args.old_index] if args.old_index else [])
    command += ["--baseline", args.baseline] if args.baseline else []
    if (
        args.smoke
    ):  # the same child, parsed from the same command line, in this process (seconds, not minutes)
        return json.loads(json.dumps(child(parse_args(command[2:]))))
    finished = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, check=False
    )
    if finished.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{finished.stderr[-2000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver


def write_vectors(path: Path, rows: int, dimension: int, vector_dtype: str) -> float:
    import numpy as np

    from rapidin_index.store.vector_file import VectorWriter

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with VectorWriter(path, dimension, vector_dtype) as writer:
        for start in range(0, rows, 4096):
            block = rng.standard_normal((min(4096, rows - start), dimension)).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            writer.add(block, np.arange(start, start + len(block)))
    return time.perf_counter() - started


def measure(args: argparse.Namespace, folder: Path) -> list[dict]:
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for vector_dtype in args.dtypes.split(","):
            path = folder / f"vectors-{rows}-{vector_dtype}.faiss"
            entry = {"rows": rows, "sketch_dim": args.sketch_dim, "vector_dtype": vector_dtype}
            entry["write_s"] = write_vectors(path, rows, args.sketch_dim, vector_dtype)
            entry["file_bytes"] = path.stat().st_size
            entry["open_new"] = run_child(args, "open-new", path)
            for queries in (1, 100):
                entry[f"search_new_{queries}"] = run_child(args, "search-new", path, queries)
                entry[f"search_capped_{queries}"] = run_child(args, "search-capped", path, queries)
                if vector_dtype == "float32":
                    entry[f"bare_{queries}"] = run_child(args, "bare", path, queries)
                if args.baseline:
                    entry[f"search_base_{queries}"] = run_child(args, "search-base", path, queries)
                if args.old_index:
                    entry[f"search_old_{queries}"] = run_child(args, "search-old", path, queries)
            if not args.no_append:
                entry["append_new"] = run_child(args, "append-new", path)
            if args.old_index:
                entry["open_old"] = run_child(args, "open-old", path)
                if not args.no_append:
                    entry["append_old"] = run_child(args, "append-old", path)
            path.unlink()
            print(json.dumps(entry), flush=True)
            results.append(entry)
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    drive(args, lambda: child(args), measure, table)


def table(results: list[dict]) -> str:
    """The results as Markdown tables (MB = 10^6 bytes; s = seconds, second run of each search)."""
    mb = 1e6
    lines = [
        "| rows | dtype | file MB | open new s | open old s | RSS after open new / old MB "
        "| search 1 new / old s | search 100 new / old s | bare 1 / 100 s (float32, in RAM) "
        "| peak RSS query new (anon) / old MB | capped 100: s, peak MB |",
        "|---" * 11 + "|",
    ]
    for e in results:
        old = "open_old" in e
        bare = f"{e['bare_1']['search_s']:.3f} / {e['bare_100']['search_s']:.3f}" if "bare_1" in e else "-"
        new100, old100 = e["search_new_100"], e.get("search_old_100")
        lines.append(
            f"| {e['rows']:,} | {e['vector_dtype']} | {e['file_bytes'] / mb:,.0f} "
            f"| {e['open_new']['open_s']:.4f} | {e['open_old']['open_s'] if old else float('nan'):.2f} "
            f"| {e['open_new']['after_open']['VmRSS'] / mb:.0f} / "
            f"{e['open_old']['after_open']['VmRSS'] / mb if old else float('nan'):.0f} "
            f"| {e['search_new_1']['search_s']:.3f} / {e['search_old_1']['search_s'] if old else float('nan'):.3f} "
            f"| {new100['search_s']:.3f} / {old100['search_s'] if old else float('nan'):.3f} | {bare} "
            f"| {new100['end']['VmHWM'] / mb:.0f} ({new100['end']['RssAnon'] / mb:.0f}) / "
            f"{old100['end']['VmHWM'] / mb if old else float('nan'):.0f} "
            f"| {e['search_capped_100']['search_s']:.3f}, {e['search_capped_100']['end']['VmHWM'] / mb:.0f} |"
        )
    lines += ["", *per_byte_table(results)]
    lines += ["", "| rows | dtype | append 1,000 rows new: s, peak RSS MB | old: s, peak RSS MB |"]
    lines.append("|---" * 4 + "|")
    for e in results:
        if "append_new" not in e:
            continue
        new, old = e["append_new"], e.get("append_old")
        old_text = f"{old['append_s']:.2f}, {old['end']['VmHWM'] / mb:.0f}" if old else "-"
        lines.append(
            f"| {e['rows']:,} | {e['vector_dtype']} | {new['append_s']:.2f}, {new['end']['VmHWM'] / mb:.0f} "
            f"| {old_text} |"
        )
    return "\n".join(lines)


def per_byte_table(results: list[dict]) -> list[str]:
    """float16 against float32 of the same rows and K, per byte scanned (seconds / file bytes), new and
    baseline (``--baseline``), and each search against the bare float32 product in RAM."""
    lines = [
        "| rows | K | query vectors | float32 new / base s | float16 new / base s | float16/float32 per byte "
        "new / base | new float32 / bare | new float16 / bare |",
        "|---" * 8 + "|",
    ]
    pairs = {(e["rows"], e["sketch_dim"], e["vector_dtype"]): e for e in results}
    for (rows, dimension, vector_dtype), single in pairs.items():
        half = pairs.get((rows, dimension, "float16"))
        if vector_dtype != "float32" or half is None:
            continue
        for queries in (1, 100):
            times = {}
            for name, e in (("32", single), ("16", half)):
                for who in ("new", "base"):
                    found = e.get(f"search_{who}_{queries}")
                    times[who + name] = found["search_s"] / e["file_bytes"] if found else float("nan")
            bare = single[f"bare_{queries}"]["search_s"]
            seconds = {
                key: value * (single if key.endswith("32") else half)["file_bytes"]
                for key, value in times.items()
            }
            lines.append(
                f"| {rows:,} | {dimension:,} | {queries} | {seconds['new32']:.3f} / {seconds['base32']:.3f} "
                f"| {seconds['new16']:.3f} / {seconds['base16']:.3f} "
                f"| {times['new16'] / times['new32']:.2f} / {times['base16'] / times['base32']:.2f} "
                f"| {seconds['new32'] / bare:.2f} | {seconds['new16'] / bare:.2f} |"
            )
    return lines


if __name__ == "__main__":
    main()
