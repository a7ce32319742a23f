"""Issue 23: seconds of a whole-generation query with and without the Fisher, on an index `lds.py` timed.

.venv/bin/python benchmarks/precondition_query_cost.py .bench/lds/timing/plain-0 .bench/lds/queries.jsonl
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from rapidin_index import Index


def main() -> None:
    torch.set_num_threads(1)
    index_dir, queries_file = sys.argv[1], sys.argv[2]
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
    print(
        json.dumps(
            {"queries": len(prepared), "seconds": medians, "ratio": medians["fisher"] / medians["none"]}
        )
    )


if __name__ == "__main__":
    main()
