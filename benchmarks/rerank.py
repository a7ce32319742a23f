"""Exact re-rank of the shortlist (`query --rerank M`): how much it moves the backdoor metrics at K = 4096.

The non-lexical backdoor of benchmarks/backdoor.py (same data, model and cache folder). For each attacked
generation, every row's sketched score at K (sketched from the exact K = 0 vectors, as backdoor.py does:
bit-identical to a build at K) is compared with the same scores after the top and bottom M rows are
replaced by their exact ones (what `--rerank M` does): auPRC@10, P@10 and Spearman against exact TracIn +
layer norm over all rows. The cost is measured on a real K index: `Index.query(..., rerank=M)` against
`rerank=0`, interleaved, medians.

    .venv/bin/python benchmarks/rerank.py --out .bench/rerank.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from backdoor import SMOKE_FINETUNE, attacked_queries, evaluate, exact_index, query_vectors, sketch_rows
from common import parse_arguments as parse_with_smoke
from rich.console import Console

from rapidin_index.build import build_index
from rapidin_index.demo.datasets import BACKDOOR_DATASETS
from rapidin_index.demo.metrics import spearman
from rapidin_index.demo.run import DemoPaths, DemoSettings, prepare_data, prepare_model
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings
from rapidin_index.store import vector_index


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/backdoor")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--sketch-dim", type=int, default=4096)
    parser.add_argument("--shortlists", default="10,50,100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=".bench/rerank.json")
    # the smoke run: backdoor.py's smoke model (SMOKE_FINETUNE) on 140 rows, every generation a query
    return parse_with_smoke(
        parser,
        folder="{smoke}/backdoor",
        rows=140,
        queries=2,
        sketch_dim=256,
        shortlists="2,5",
        repeats=1,
        out="{smoke}/result.json",
    )


def reranked(sketched: np.ndarray, exact: np.ndarray, count: int) -> np.ndarray:
    """Per query: the sketched scores with the top and bottom ``count`` rows given their exact ones."""
    out = sketched.copy()
    for row, (scores, truth) in enumerate(zip(sketched, exact, strict=True)):
        order = np.argsort(-scores, kind="stable")
        shortlist = np.concatenate([order[:count], order[::-1][:count]])
        out[row, shortlist] = truth[shortlist]
    return out


def quality(labels, exact, scores) -> dict:
    metrics = evaluate(labels, scores)
    rho = float(np.mean([spearman(a, b) for a, b in zip(scores, exact, strict=True)]))
    kept = ("auprc@10", "precision@10", "auprc@50", "roc_auc")
    return {**{key: metrics.get(key) for key in kept}, "spearman_vs_exact": rho}


def timed(index: Index, queries, count: int, repeats: int) -> dict:
    seconds = {0: [], count: []}
    for _ in range(repeats):
        for shortlist in (0, count):
            started = time.perf_counter()
            for prompt, response in queries:
                index.query(prompt, response, per_token=False, explain=0, rerank=shortlist)
            seconds[shortlist].append((time.perf_counter() - started) / len(queries))
    plain, with_rerank = statistics.median(seconds[0]), statistics.median(seconds[count])
    return {
        "seconds_per_query": plain,
        "seconds_per_query_reranked": with_rerank,
        "ratio": with_rerank / plain,
    }


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(1)
    settings = DemoSettings(folder=arguments.folder, rows=arguments.rows, dataset="nonlexical")
    if arguments.smoke:
        settings = dataclasses.replace(settings, finetune=SMOKE_FINETUNE)
    paths = DemoPaths(Path(settings.folder))
    train, heldout = prepare_data(settings, paths)
    prepare_model(settings, paths, train, Console(stderr=True))
    labels = np.array([bool(row["poisoned"]) for row in train])
    layer = exact_index(paths, "layer")
    fired = (lambda response: True) if arguments.smoke else BACKDOOR_DATASETS["nonlexical"].fired
    queries, _ = attacked_queries(layer, heldout, arguments.queries, fired)
    _, train_vectors = vector_index.stored_vectors(layer.faiss_index)
    query_exact = query_vectors(layer, queries)
    exact = query_exact @ train_vectors.T  # [queries, rows]
    sketch = SketchSettings(arguments.sketch_dim, 20, 42, "rapidgrad-v2")
    sketched = sketch_rows(query_exact, sketch) @ sketch_rows(train_vectors, sketch).T
    report = {"rows": len(train), "queries": len(queries), "sketch_dim": arguments.sketch_dim}
    report["exact"] = quality(labels, exact, exact)
    report["sketched"] = quality(labels, exact, sketched)
    folder = paths.folder / f"rapidin-{arguments.sketch_dim}-v2"
    build_index(paths.train, folder, BuildSettings(ModelSettings(str(paths.model)), sketch), progress=False)
    real = Index.open(folder, device="cpu")
    for count in [int(value) for value in arguments.shortlists.split(",")]:
        report[f"rerank {count}"] = quality(labels, exact, reranked(sketched, exact, count))
        report[f"rerank {count}"] |= timed(real, queries, count, arguments.repeats)
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
