"""Sketch fidelity: how well RapidGrad scores at K = 2^12 .. 2^16 track the exact layer-normalised scores.

On the backdoor demo setup (data, model and exact index cached by benchmarks/backdoor.py, built here if
missing), for attacked and clean generations: Spearman correlation over all training rows, and the
overlap of the top-k sets, between sketched and exact scores, per K and lambda.

    .venv/bin/python benchmarks/fidelity.py --out .bench/fidelity.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from backdoor import attacked_queries, exact_index, query_vectors, sketch_rows
from rich.console import Console

from rapidin_index import index as vector_index
from rapidin_index.demo import DemoPaths, DemoSettings, prepare_data, prepare_model
from rapidin_index.metrics import spearman, top_k_overlap
from rapidin_index.sketch import SketchSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/backdoor")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--sketch-dims", default="4096,8192,16384,32768,65536")
    parser.add_argument("--lambdas", default="20,100")
    parser.add_argument("--out", default=".bench/fidelity.json")
    arguments = parser.parse_args()
    settings = DemoSettings(folder=arguments.folder, rows=arguments.rows)
    paths = DemoPaths(Path(settings.folder))
    train, heldout = prepare_data(settings, paths)
    prepare_model(settings, paths, train, Console(stderr=True))
    index = exact_index(paths, "layer")
    attacked, _ = attacked_queries(index, heldout, arguments.queries // 2)
    clean = [
        (row["instruction"], index.generate(row["instruction"], 24))
        for row in heldout["clean"][: arguments.queries // 2]
    ]
    queries = attacked + clean
    _, train_vectors = vector_index.stored_vectors(index.faiss_index)
    query_exact = query_vectors(index, queries)
    exact_scores = query_exact @ train_vectors.T  # [queries, rows]
    rows = []
    for sketch_dim in [int(k) for k in arguments.sketch_dims.split(",")]:
        for shuffle_lambda in [int(v) for v in arguments.lambdas.split(",")]:
            sketch = SketchSettings(sketch_dim, shuffle_lambda, 42)
            sketched = sketch_rows(query_exact, sketch) @ sketch_rows(train_vectors, sketch).T
            rows.append(
                {
                    "sketch_dim": sketch_dim,
                    "shuffle_lambda": shuffle_lambda,
                    "compression": train_vectors.shape[1] / sketch_dim,
                    "spearman": float(
                        np.mean([spearman(e, s) for e, s in zip(exact_scores, sketched, strict=True)])
                    ),
                    **{
                        f"top{k}_overlap": float(
                            np.mean(
                                [top_k_overlap(e, s, k) for e, s in zip(exact_scores, sketched, strict=True)]
                            )
                        )
                        for k in (10, 50)
                    },
                }
            )
    report = {
        "rows": len(train),
        "queries": len(queries),
        "gradient_dim": int(train_vectors.shape[1]),
        "results": rows,
    }
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    print(
        f"\n{len(train)} rows, {len(queries)} queries ({len(attacked)} attacked, {len(clean)} clean), D = {report['gradient_dim']:,}\n"
    )
    print("| K | lambda | D/K | Spearman | top-10 overlap | top-50 overlap |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| 2^{row['sketch_dim'].bit_length() - 1} | {row['shuffle_lambda']} | {row['compression']:.1f} | "
            f"{row['spearman']:.4f} | {row['top10_overlap']:.3f} | {row['top50_overlap']:.3f} |"
        )


if __name__ == "__main__":
    main()
