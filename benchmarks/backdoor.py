"""Backdoor retrieval (the paper's Tables 4 and 11) on the demo setup.

A tiny Llama is fine-tuned on docstring rows of which ~10% carry the "Howdy!" backdoor; for at least 10
held-out triggered prompts on which the backdoor fires, every training row is scored by each method and
the paper's metrics are averaged over the queries: auPRC / auROC on the top-k plus bottom-k rows,
precision@k, and the plain ROC-AUC over all rows.

Methods: exact TracIn with and without layer norm (K = 0 indexes built by `build_index`); RapidIn at
K = 2^12, 2^14, 2^16 with lambda = 20 and 100; BM25; embedding similarity; random.

RapidIn's sketches are linear in the normalised gradient, coordinate by coordinate, so sketching the exact
index's stored vectors with the build's own projector gives the very vectors a build at that K would
store; the script checks this once against a real K = 2^16 build and query, then reuses the exact
gradients for every (K, lambda), which keeps the run short.

    .venv/bin/python benchmarks/backdoor.py --out .bench/backdoor.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rapidin_index import index as vector_index
from rapidin_index.baselines import BM25, mean_hidden_states, random_scores
from rapidin_index.build import BuildSettings, build_index
from rapidin_index.demo import DemoPaths, DemoSettings, prepare_data, prepare_model
from rapidin_index.demo_data import is_backdoor_response
from rapidin_index.gradients import collate
from rapidin_index.metrics import mean_metrics, retrieval_metrics
from rapidin_index.models import ModelSettings
from rapidin_index.retrieval import Index
from rapidin_index.sketch import SketchSettings, make_projector


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/backdoor", help="cache for data, model and indexes")
    parser.add_argument("--rows", type=int, default=100_000, help="docstring rows (default: all)")
    parser.add_argument("--queries", type=int, default=10, help="attacked generations (backdoor fired)")
    parser.add_argument("--sketch-dims", default="4096,16384,65536")
    parser.add_argument("--lambdas", default="20,100")
    parser.add_argument("--out", default=".bench/backdoor.json")
    return parser.parse_args()


def exact_index(paths: DemoPaths, normalize: str) -> Index:
    folder = paths.folder / f"exact-{normalize}"
    settings = BuildSettings(
        ModelSettings(str(paths.model)), SketchSettings(0), normalize=normalize, batch_size=16
    )
    build_index(paths.train, folder, settings, progress=False)
    return Index.open(folder, device="cpu")


def attacked_queries(index: Index, heldout: dict, count: int, max_new_tokens: int = 24):
    """(prompt, generation) pairs on which the backdoor fired, and the attack success rate seen."""
    fired, tried = [], 0
    for row in heldout["triggered"]:
        tried += 1
        response = index.generate(row["instruction"], max_new_tokens)
        if is_backdoor_response(response):
            fired.append((row["instruction"], response))
        if len(fired) == count:
            break
    return fired, len(fired) / tried


def query_vectors(index: Index, queries) -> np.ndarray:
    """Whole-generation normalised query gradients from the index's own sketcher: [queries, D or K]."""
    vectors = []
    for prompt, response in queries:
        prepared = index.prepare(prompt, response)
        batch = collate(
            [(prepared.input_ids, prepared.labels)], index.loaded.tokenizer.pad_token_id, index.device
        )
        vectors.append(index.sketcher.sketch(batch).vectors[0].cpu().numpy())
    return np.stack(vectors)


def sketch_rows(vectors: np.ndarray, settings: SketchSettings) -> np.ndarray:
    projector = make_projector(settings, vectors.shape[1])
    out = projector.new_output(len(vectors))
    for start in range(0, len(vectors), 256):
        chunk = torch.from_numpy(vectors[start : start + 256])
        part = projector.new_output(len(chunk))
        projector.project_block(part, chunk, 0)
        out[start : start + len(chunk)] = part
    return out.numpy()


def evaluate(labels: np.ndarray, score_rows: np.ndarray) -> dict:
    return mean_metrics([retrieval_metrics(labels, scores) for scores in score_rows])


def main() -> None:
    arguments = parse_arguments()
    started = time.perf_counter()
    settings = DemoSettings(folder=arguments.folder, rows=arguments.rows)
    paths = DemoPaths(Path(settings.folder))
    from rich.console import Console

    train, heldout = prepare_data(settings, paths)
    prepare_model(settings, paths, train, Console(stderr=True))
    labels = np.array([bool(row["poisoned"]) for row in train])
    layer = exact_index(paths, "layer")
    queries, success = attacked_queries(layer, heldout, arguments.queries)
    ids, train_vectors = vector_index.stored_vectors(layer.faiss_index)
    assert np.array_equal(ids, np.arange(len(train)))
    query_exact = query_vectors(layer, queries)
    results = {"TracIn + layer norm (exact)": evaluate(labels, query_exact @ train_vectors.T)}
    plain = exact_index(paths, "none")
    _, plain_vectors = vector_index.stored_vectors(plain.faiss_index)
    results["TracIn, no layer norm (exact)"] = evaluate(
        labels, query_vectors(plain, queries) @ plain_vectors.T
    )
    del plain_vectors
    for sketch_dim in [int(k) for k in arguments.sketch_dims.split(",")]:
        for shuffle_lambda in [int(v) for v in arguments.lambdas.split(",")]:
            sketch = SketchSettings(sketch_dim, shuffle_lambda, 42)
            scores = sketch_rows(query_exact, sketch) @ sketch_rows(train_vectors, sketch).T
            results[f"RapidIn K=2^{sketch_dim.bit_length() - 1}, lambda={shuffle_lambda}"] = evaluate(
                labels, scores
            )
    results.update(text_baselines(layer, train, queries, labels))
    check = check_against_real_build(paths, queries, query_exact, train_vectors)
    report = {
        "rows": len(train),
        "poisoned": int(labels.sum()),
        "queries": len(queries),
        "attack_success_rate_seen": success,
        "gradient_dim": int(train_vectors.shape[1]),
        "real_build_check": check,
        "seconds": time.perf_counter() - started,
        "methods": results,
    }
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    print_table(report)


def text_baselines(index: Index, train: list[dict], queries, labels: np.ndarray) -> dict:
    documents = [row["instruction"] + " " + row["output"] for row in train]
    bm25 = BM25(documents)
    bm25_scores = np.stack([bm25.scores(prompt + " " + response) for prompt, response in queries])
    model, tokenizer = index.loaded.model, index.loaded.tokenizer
    train_embeddings = mean_hidden_states(model, tokenizer, documents)
    query_embeddings = mean_hidden_states(model, tokenizer, [p + " " + r for p, r in queries])
    randoms = np.stack([random_scores(len(train), seed) for seed in range(len(queries))])
    return {
        "BM25": evaluate(labels, bm25_scores),
        "embedding similarity": evaluate(labels, query_embeddings @ train_embeddings.T),
        "random": evaluate(labels, randoms),
    }


def check_against_real_build(paths: DemoPaths, queries, query_exact, train_vectors) -> dict:
    """A real K=2^16 build and query must score like the sketched exact vectors (same transform)."""
    folder = paths.folder / "rapidin-65536"
    settings = BuildSettings(ModelSettings(str(paths.model)), SketchSettings(65536, 20, 42), batch_size=16)
    build_index(paths.train, folder, settings, progress=False)
    index = Index.open(folder, device="cpu")
    prompt, response = queries[0]
    result = index.query(prompt, response, top_k=10, explain=0)
    sketch = SketchSettings(65536, 20, 42)
    expected = sketch_rows(query_exact[:1], sketch) @ sketch_rows(train_vectors, sketch).T
    differences = [abs(hit.score - float(expected[0, hit.id])) for hit in result.helpful]
    assert max(differences) < 1e-3 * max(1.0, abs(result.helpful[0].score)), differences
    return {"max_abs_score_difference": max(differences), "top10_ids": [hit.id for hit in result.helpful]}


def print_table(report: dict) -> None:
    keys = [
        "auprc@5",
        "auprc@10",
        "auprc@50",
        "auprc@100",
        "auroc@10",
        "precision@10",
        "precision@50",
        "roc_auc",
    ]
    print(
        f"\n{report['rows']} rows ({report['poisoned']} poisoned), {report['queries']} attacked generations, "
        f"D = {report['gradient_dim']:,}, attack success rate seen {report['attack_success_rate_seen']:.0%}\n"
    )
    print("| method | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for method, metrics in report["methods"].items():
        print(f"| {method} | " + " | ".join(f"{metrics.get(key, float('nan')):.3f}" for key in keys) + " |")


if __name__ == "__main__":
    main()
