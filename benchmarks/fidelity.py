"""Sketch fidelity: how well RapidGrad scores at K = 2^12 .. 2^16 track the exact layer-normalised scores.

On the backdoor demo setup (data, model and exact index cached in --folder, built there if missing), for
generations of held-out triggered and clean prompts: Spearman correlation over all training rows, and the
overlap of the top-k sets, between sketched and exact scores, per sketch algorithm, K and lambda
(rapidgrad-v2 does not use lambda: it runs once per K), mean over ``--seeds``. ``--hidden-size`` and
``--layers`` fine-tune a wider or deeper tiny Llama than the demo's (give it its own folder), so that D can
be many times K; FAISS refuses to read an index of more than 2^20 dimensions, which caps the exact index,
hence D, at 1,048,576. The exact vectors are read from the index in chunks of rows, so memory holds them
once (rows x D x 4 bytes).

    .venv/bin/python benchmarks/fidelity.py --out .bench/fidelity.json
    .venv/bin/python benchmarks/fidelity.py --hidden-size 128 --layers 3 --rows 1200 --seeds 42,1,2 \\
        --folder .bench/fidelity-h128-l3 --out .bench/fidelity-h128-l3.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from backdoor import exact_index, query_vectors
from common import parse_arguments as parse_with_smoke
from rich.console import Console

from rapidin_index.demo.finetune import FinetuneSettings
from rapidin_index.demo.metrics import spearman, top_k_overlap
from rapidin_index.demo.run import DemoPaths, DemoSettings, prepare_data, prepare_model
from rapidin_index.settings import SKETCH_ALGORITHMS, SketchSettings
from rapidin_index.sketch import make_projector

ROW_CHUNK = 64


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/backdoor")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--queries", type=int, default=10, help="half from triggered, half from clean prompts"
    )
    parser.add_argument("--sketch-dims", default="4096,8192,16384,32768,65536")
    parser.add_argument("--lambdas", default="20,100", help="rapidgrad-v1's lambdas")
    parser.add_argument("--algorithms", default="rapidgrad-v1,rapidgrad-v2")
    parser.add_argument("--seeds", default="42", help="sketch seeds; the table shows the mean over them")
    parser.add_argument("--hidden-size", type=int, default=FinetuneSettings.hidden_size)
    parser.add_argument("--layers", type=int, default=FinetuneSettings.layers)
    parser.add_argument("--out", default=".bench/fidelity.json")
    # the smoke run: its own tiny backdoor model (16 wide, one layer) on 140 rows, K = 2^8
    arguments = parse_with_smoke(
        parser,
        folder="{smoke}/backdoor",
        rows=140,
        queries=2,
        sketch_dims="256",
        lambdas="20",
        hidden_size=16,
        layers=1,
        out="{smoke}/result.json",
    )
    for algorithm in arguments.algorithms.split(","):
        if algorithm not in SKETCH_ALGORITHMS:
            parser.error(f"unknown algorithm {algorithm!r}; known: {', '.join(SKETCH_ALGORITHMS)}")
    return arguments


def sketch_settings(arguments: argparse.Namespace) -> list[SketchSettings]:
    settings = []
    for sketch_dim in [int(k) for k in arguments.sketch_dims.split(",")]:
        for algorithm in arguments.algorithms.split(","):
            lambdas = [int(v) for v in arguments.lambdas.split(",")] if algorithm == "rapidgrad-v1" else [20]
            settings += [
                SketchSettings(sketch_dim, shuffle_lambda, int(seed), algorithm)
                for shuffle_lambda in lambdas
                for seed in arguments.seeds.split(",")
            ]
    return settings


def sketch(projector, vectors: np.ndarray) -> torch.Tensor:
    out = projector.new_output(len(vectors))
    projector.project_block(out, torch.from_numpy(vectors), 0)
    return out  # [n, K]


def all_scores(faiss_index, query_exact: np.ndarray, settings: list[SketchSettings]):
    """Exact scores [queries, rows] and, per settings, sketched ones; train vectors read ROW_CHUNK at a time."""
    flat = faiss.downcast_index(faiss_index.index)
    dim = query_exact.shape[1]
    projectors = [make_projector(setting, dim) for setting in settings]
    query_sketches = [sketch(projector, query_exact) for projector in projectors]
    exact, sketched = [], [[] for _ in settings]
    for start in range(0, flat.ntotal, ROW_CHUNK):
        rows = flat.reconstruct_n(start, min(ROW_CHUNK, flat.ntotal - start))  # [chunk, D]
        exact.append(query_exact @ rows.T)
        for scores, projector, queries in zip(sketched, projectors, query_sketches, strict=True):
            scores.append((queries @ sketch(projector, rows).T).numpy())
    return np.concatenate(exact, axis=1), [np.concatenate(scores, axis=1) for scores in sketched]


def fidelity(exact_scores: np.ndarray, sketched: np.ndarray) -> dict:
    pairs = list(zip(exact_scores, sketched, strict=True))
    return {
        "spearman": float(np.mean([spearman(e, s) for e, s in pairs])),
        **{f"top{k}_overlap": float(np.mean([top_k_overlap(e, s, k) for e, s in pairs])) for k in (10, 50)},
    }


def summarise(combinations: list[SketchSettings], measured: list[dict], gradient_dim: int) -> list[dict]:
    """One row per (algorithm, K, lambda): the mean over seeds, and each seed's numbers."""
    groups: dict[tuple, list] = {}
    for setting, values in zip(combinations, measured, strict=True):
        shuffle_lambda = setting.shuffle_lambda if setting.algorithm == "rapidgrad-v1" else None
        groups.setdefault((setting.algorithm, setting.sketch_dim, shuffle_lambda), []).append(
            {"seed": setting.seed, **values}
        )
    rows = []
    for (algorithm, sketch_dim, shuffle_lambda), per_seed in groups.items():
        row = {"algorithm": algorithm, "sketch_dim": sketch_dim, "shuffle_lambda": shuffle_lambda}
        row["compression"] = gradient_dim / sketch_dim
        for metric in ("spearman", "top10_overlap", "top50_overlap"):
            row[metric] = float(np.mean([values[metric] for values in per_seed]))
            row[f"{metric}_min"] = float(np.min([values[metric] for values in per_seed]))
        rows.append({**row, "per_seed": per_seed})
    return rows


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(1)
    started = time.perf_counter()
    finetune = FinetuneSettings(hidden_size=arguments.hidden_size, layers=arguments.layers)
    settings = DemoSettings(folder=arguments.folder, rows=arguments.rows, finetune=finetune)
    paths = DemoPaths(Path(settings.folder))
    train, heldout = prepare_data(settings, paths)
    prepare_model(settings, paths, train, Console(stderr=True))
    index = exact_index(paths, "layer")
    prompts = [row["instruction"] for row in heldout["triggered"][: arguments.queries // 2]]
    prompts += [row["instruction"] for row in heldout["clean"][: arguments.queries - len(prompts)]]
    queries = [(prompt, index.generate(prompt, 24)) for prompt in prompts]
    query_exact = query_vectors(index, queries)
    combinations = sketch_settings(arguments)
    exact_scores, sketched = all_scores(index.faiss_index, query_exact, combinations)
    gradient_dim = int(query_exact.shape[1])
    rows = summarise(combinations, [fidelity(exact_scores, scores) for scores in sketched], gradient_dim)
    report = {
        "dataset": getattr(settings, "dataset", "lexical"),
        "rows": len(train),
        "queries": len(queries),
        "hidden_size": arguments.hidden_size,
        "layers": arguments.layers,
        "gradient_dim": gradient_dim,
        "seeds": [int(seed) for seed in arguments.seeds.split(",")],
        "seconds": time.perf_counter() - started,
        "results": rows,
    }
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(report: dict) -> None:
    print(
        f"\n{report['rows']} rows, {report['queries']} queries, hidden {report['hidden_size']}, "
        f"{report['layers']} layers, D = {report['gradient_dim']:,}; mean (min) over seeds {report['seeds']}\n"
    )
    print("| algorithm | K | lambda | D/K | Spearman | top-10 overlap | top-50 overlap |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in report["results"]:
        shuffle_lambda = row["shuffle_lambda"] if row["shuffle_lambda"] is not None else "-"
        print(
            f"| {row['algorithm']} | 2^{row['sketch_dim'].bit_length() - 1} | {shuffle_lambda} | "
            f"{row['compression']:.1f} | {row['spearman']:.4f} ({row['spearman_min']:.4f}) | "
            f"{row['top10_overlap']:.3f} ({row['top10_overlap_min']:.2f}) | "
            f"{row['top50_overlap']:.3f} ({row['top50_overlap_min']:.2f}) |"
        )


if __name__ == "__main__":
    main()
