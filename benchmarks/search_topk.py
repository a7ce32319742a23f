"""Top-k bookkeeping (issue 27): `index.search_both` against the bare matrix product of the same vectors.

In one process (numpy/BLAS and FAISS on one thread), for each K and number of query vectors: an in-RAM
float32 matrix of unit-norm rows (about 256 MB), the bare product ``queries @ rows.T`` over the same
blocks the scan uses (nothing kept), the new `search_both` over a flat FAISS index holding the same rows
(helpful and harmful top-k), and the old one (commit 9cb7103's `index.py`, ``--old-index``: blocked numpy
products, concatenate + argpartition of every block). Each timing is the median of ``--repeats`` runs after
one warm-up; ratios are against the bare product measured in the same process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from rapidin_index import index as vector_index  # noqa: E402


def median_time(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sketch-dims", default="4096,65536")
    parser.add_argument("--matrix-mb", type=int, default=256, help="size of the float32 matrix")
    parser.add_argument("--queries", default="1,100")
    parser.add_argument("--top-k", default="10,100")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--old-index", default=None)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)
    old = None
    if args.old_index:
        spec = importlib.util.spec_from_file_location("old_index", args.old_index)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    rng = np.random.default_rng(0)
    rows_out = []
    for dimension in (int(d) for d in args.sketch_dims.split(",")):
        rows = args.matrix_mb * 10**6 // (4 * dimension)
        matrix = rng.standard_normal((rows, dimension), dtype=np.float32)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        flat = vector_index.new_index(dimension)
        vector_index.add_vectors(flat, matrix, np.arange(rows))
        view = vector_index._flat_codes(flat)[0].view(np.float32)  # the index's own rows, [rows, d]
        del matrix
        for count in (int(q) for q in args.queries.split(",")):
            queries = rng.standard_normal((count, dimension), dtype=np.float32)
            step = vector_index._block_rows(dimension, count, vector_index.SCAN_BLOCK_BYTES)

            def bare(queries=queries, step=step, view=view, rows=rows):
                for start in range(0, rows, step):
                    queries @ view[start : start + step].T  # noqa: B018  [q, rows]

            bare_s = median_time(bare, args.repeats)
            for top_k in (int(k) for k in args.top_k.split(",")):
                entry = {"K": dimension, "rows": rows, "queries": count, "top_k": top_k, "bare_s": bare_s}
                entry["new_s"] = median_time(
                    lambda q=queries, k=top_k, f=flat: vector_index.search_both(f, q, k), args.repeats
                )
                if old is not None:
                    entry["old_s"] = median_time(
                        lambda q=queries, k=top_k, f=flat: old.search_both(f, q, k), args.repeats
                    )
                print(json.dumps(entry), flush=True)
                rows_out.append(entry)
    print("\n| K | rows | query vectors | top k | bare product s | new s (ratio) | old s (ratio) |")
    print("|---|---|---|---|---|---|---|")
    for e in rows_out:
        old_text = f"{e['old_s']:.3f} ({e['old_s'] / e['bare_s']:.2f})" if "old_s" in e else "-"
        print(
            f"| {e['K']:,} | {e['rows']:,} | {e['queries']} | {e['top_k']} | {e['bare_s']:.3f} "
            f"| {e['new_s']:.3f} ({e['new_s'] / e['bare_s']:.2f}) | {old_text} |"
        )


if __name__ == "__main__":
    main()
