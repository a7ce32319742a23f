"""Issue 23: seconds of a whole-generation query with and without the Fisher, on an index `lds.py` timed.

.venv/bin/python benchmarks/precondition_query_cost.py .bench/lds/timing/plain-0 .bench/lds/queries.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import parse_arguments, tiny_index, write_json

from rapidin_index import Index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index_dir", nargs="?", help="an index folder (e.g. .bench/lds/timing/plain-0)")
    parser.add_argument("queries_file", nargs="?", help="a JSON-lines file of instruction/output rows")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    arguments = parse_arguments(parser, out="{smoke}/result.json")
    torch.set_num_threads(1)
    if arguments.smoke:  # a tiny index, fitted, queried with its own first rows
        from rapidin_index.precondition import fit_index

        index_dir, queries_file = tiny_index(arguments.smoke_folder)
        fit_index(index_dir, kind="fisher")
    elif arguments.queries_file is None:
        parser.error("give INDEX_DIR QUERIES_FILE (or --smoke)")
    else:
        index_dir, queries_file = arguments.index_dir, arguments.queries_file
    rows = [json.loads(line) for line in open(queries_file)]
    index = Index.open(index_dir, device="cpu")
    prepared = [index.prepare(row["instruction"], row["output"]) for row in rows]
    index.query_prepared(prepared[:2], 10, explain=0, per_token=False)  # warm-up
    seconds: dict[str, list[float]] = {"none": [], "fisher": []}
    for _ in range(3):
        for option in ("none", "fisher"):
            index.use_precondition(option)
            started = time.perf_counter()
            index.query_prepared(prepared, 10, explain=0, per_token=False)
            seconds[option].append(time.perf_counter() - started)
    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    result = {"queries": len(prepared), "seconds": medians, "ratio": medians["fisher"] / medians["none"]}
    print(json.dumps(result))
    write_json(arguments.out, result)


if __name__ == "__main__":
    main()
