"""Top-k bookkeeping (issue 27): `vector_index.search_both` against the bare matrix product of the same vectors.

In one process (numpy/BLAS, torch and FAISS on one thread), for each K and number of query vectors: an
in-RAM float32 matrix of unit-norm rows (about ``--matrix-mb``), the bare product ``queries @ rows.T`` over
blocks of it (nothing kept: the floor the search cannot beat), then `search_both` over flat FAISS indexes
holding the same rows in float32 and in float16 (``--source file``: the vectors files of those indexes, read
in place by each code's `StoredVectors`; helpful and harmful top-k), by this code and, with
``--baseline COMMIT``, by that commit's `index.py` + `vector_file.py` (loaded beside this one) and, with
``--old-index FILE``, by an older `index.py` alone. The runs are interleaved (bare, new, baseline, ... then
again) and each timing is the median of ``--repeats`` CPU times (one thread: a busy machine's waits for a
core are left out) after one warm-up; ratios are against the bare product measured in the same process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from common import parse_arguments, write_json  # noqa: E402

from rapidin_index.store import vector_index  # noqa: E402
from rapidin_index.store.vector_file import StoredVectors  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# the smoke runs' matrix (this script's and search_profile.py's): 1 MB at K = 64, one and many query vectors
SMOKE_MATRIX = {
    "sketch_dims": "64",
    "matrix_mb": 1,
    "queries": f"1,{vector_index._PRODUCT_QUERIES}",
    "repeats": 1,
    "out": "{smoke}/result.json",
}


# The search code's files and module names at a commit: under rapidin_index/store/ since issue 24, and
# at the package's top level before it (an older index.py imports `rapidin_index.vector_file`).
LAYOUTS = [
    {
        "vector_file": "store/vector_file",
        "index": "store/vector_index",
        "module": "rapidin_index.store.vector_file",
    },
    {"vector_file": "vector_file", "index": "index", "module": "rapidin_index.vector_file"},
]


def load_baseline(commit: str):
    """(vector_file, index) modules of the search code at ``commit`` (git show), importable beside this
    checkout's: the old index module is executed with the old `vector_file` in its import's place."""
    folder = Path(tempfile.mkdtemp(prefix="search-baseline-"))
    layout = next(each for each in LAYOUTS if _exists(commit, each["index"]))
    modules = []
    for name in ("vector_file", "index"):
        source = subprocess.run(
            ["git", "show", f"{commit}:rapidin_index/{layout[name]}.py"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
        (folder / f"{name}.py").write_bytes(source)
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        saved = sys.modules.get(layout["module"])
        if modules:
            sys.modules[layout["module"]] = modules[0]
        try:
            spec.loader.exec_module(module)
        finally:
            if saved is None:
                sys.modules.pop(layout["module"], None)
            else:
                sys.modules[layout["module"]] = saved
        modules.append(module)
    return modules[0], modules[1]


def _exists(commit: str, module: str) -> bool:
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}:rapidin_index/{module}.py"], cwd=ROOT, capture_output=True
    )
    return found.returncode == 0


def interleaved(functions: dict, repeats: int) -> dict:
    """Median CPU seconds of each function (this process's, on one thread: time spent waiting for a core of
    the shared machine does not count; memory stalls do), run in turn ``repeats`` times after a warm-up."""
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.process_time()
            function()
            times[name].append(time.process_time() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sketch-dims", default="4096,65536")
    parser.add_argument("--matrix-mb", type=int, default=256, help="size of the float32 matrix")
    parser.add_argument("--queries", default="1,100")
    parser.add_argument("--top-k", default="10,100")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="a commit whose search code runs beside this one")
    parser.add_argument("--old-index", default=None, help="an older index.py (file) run beside this one")
    parser.add_argument(
        "--source", choices=("ram", "file"), default="ram", help="flat FAISS indexes in RAM, or vectors files"
    )
    parser.add_argument(
        "--folder", default=None, help="where --source file writes them (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    # the smoke run: the vectors files, read by this code and by HEAD's as the baseline (git show, no checkout)
    args = parse_arguments(parser, argv, **SMOKE_MATRIX, top_k="3", baseline="HEAD", source="file")
    faiss.omp_set_num_threads(1)
    import torch

    torch.set_num_threads(1)
    others, readers = {}, {"new": StoredVectors}
    if args.baseline:
        base_file, others["baseline"] = load_baseline(args.baseline)
        readers["baseline"] = base_file.StoredVectors
    if args.old_index:
        spec = importlib.util.spec_from_file_location("old_index", args.old_index)
        others["old"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(others["old"])
    rng = np.random.default_rng(0)
    folder = tempfile.TemporaryDirectory(dir=args.folder)
    results = []
    for dimension in (int(d) for d in args.sketch_dims.split(",")):
        rows = args.matrix_mb * 10**6 // (4 * dimension)
        matrix = rng.standard_normal((rows, dimension), dtype=np.float32)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        flats = {}
        for vector_dtype in ("float32", "float16"):
            flats[vector_dtype] = vector_index.new_index(dimension, vector_dtype)
            vector_index.add_vectors(flats[vector_dtype], matrix, np.arange(rows))
            if args.source == "file":
                path = Path(folder.name) / f"vectors-{dimension}-{vector_dtype}.faiss"
                vector_index.save_index(flats[vector_dtype], path)
                if vector_dtype == "float16":
                    flats[vector_dtype] = None
        view = vector_index._flat_codes(flats["float32"])[0].view(np.float32)  # the index's own rows
        del matrix
        sources = {name: flats for name in ["new", *others]}
        if args.source == "file":  # each code's own reader of the same files (mapped)
            sources = {
                name: {t: readers[name](Path(folder.name) / f"vectors-{dimension}-{t}.faiss") for t in flats}
                for name in ["new", *others]
            }
        for count in (int(q) for q in args.queries.split(",")):
            queries = rng.standard_normal((count, dimension), dtype=np.float32)
            step = vector_index._block_rows(dimension, count, vector_index.SCAN_BLOCK_BYTES)

            def bare(queries=queries, step=step, view=view, rows=rows):
                for start in range(0, rows, step):
                    queries @ view[start : start + step].T  # noqa: B018  [q, rows]

            for top_k in (int(k) for k in args.top_k.split(",")):
                functions = {"bare": bare}
                for name, module in {"new": vector_index, **others}.items():
                    for vector_dtype, flat in sources[name].items():
                        functions[f"{name}_{vector_dtype}"] = lambda m=module, f=flat, q=queries, k=top_k: (
                            m.search_both(f, q, k)
                        )
                entry = {"K": dimension, "rows": rows, "queries": count, "top_k": top_k}
                entry.update(
                    {f"{name}_s": value for name, value in interleaved(functions, args.repeats).items()}
                )
                print(json.dumps(entry), flush=True)
                results.append(entry)
    folder.cleanup()
    print(f"\nsource: {args.source}")
    print(table(results, ["new", *others]))
    write_json(args.out, {"source": args.source, "results": results})


def table(results: list[dict], names: list[str]) -> str:
    lines = [
        "| K | rows | query vectors | top k | bare product s | "
        + " | ".join(
            f"{name} float32 s (ratio) | {name} float16 s (ratio) | {name} f16/f32 per byte" for name in names
        )
        + " |",
        "|---" * (5 + 3 * len(names)) + "|",
    ]
    for e in results:
        cells = [f"{e['K']:,}", f"{e['rows']:,}", str(e["queries"]), str(e["top_k"]), f"{e['bare_s']:.3f}"]
        for name in names:
            single, half = e[f"{name}_float32_s"], e[f"{name}_float16_s"]
            cells += [
                f"{single:.3f} ({single / e['bare_s']:.2f})",
                f"{half:.3f} ({half / e['bare_s']:.2f})",
                f"{2 * half / single:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
