"""Factored sketches (issue 14): rapidgrad-ts and -kron beside rapidgrad-v2 on a full-parameter tiny Llama.

On a tiny Llama built in-process (default hidden 384, 3 layers, a 2,000-token BPE: over 5M parameters,
every one attributed), over the same tokenized docstring rows, in one run with the repeats interleaved,
this times ``GradientSketcher.sketch`` over all batches for:

* ``v2``               rapidgrad-v2, per-example gradients materialised (the default build);
* ``ts``               rapidgrad-ts, every linear and embedding weight sketched from its factors (FFT
                       or signed matmul, picked per call by ``factored.fft_is_cheaper``);
* ``ts-materialised``  rapidgrad-ts with ``factored="never"``: the same hash, materialised (a check
                       that the factored vectors are the same, and the cost of the hash alone);
* ``kron``             rapidgrad-kron, every linear and embedding weight sketched from its factors as
                       Kronecker count sketches in bins of its own (``kronecker``);
* ``floor``            the model's own batched forward + backward of the summed loss.

at each K. Fidelity: held-out rows play the queries; each method's scores of every (query, training row)
pair are compared with exact TracIn + layer norm (the same hooks with K = 0, i.e. uncompressed
layer-normalised gradients) by Spearman per query, averaged. The model is a randomly initialised tiny
Llama, or ``--model DIR`` (e.g. the fine-tuned ``.bench/peers/full/model`` that benchmarks/peers.py
trains). Last, the micro-timings behind ``factored.fft_is_cheaper``: one module call (8 rows of 40
tokens) sketched by FFT, by the signed matmul + scatter, and materialised as rapidgrad-v2 does (matmul,
norm, signs, scatter). CPU only; run from the repository root:
``.venv/bin/python benchmarks/factored.py --out .bench/factored.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from build_throughput import docstring_rows, run_floor, tokenized_rows
from common import parse_arguments

from rapidin_index.capture import gradient_blocks, gradient_dim
from rapidin_index.demo.tiny_models import save_tiny_model
from rapidin_index.gradients import GradientSketcher
from rapidin_index.losses import collate
from rapidin_index.models import ModelSettings, load_model, select_parameters
from rapidin_index.settings import SketchSettings
from rapidin_index.sketch import make_projector

METHODS = {  # name: (algorithm, factored mode)
    "v2": ("rapidgrad-v2", "auto"),
    "ts": ("rapidgrad-ts", "auto"),
    "ts-materialised": ("rapidgrad-ts", "never"),
    "kron": ("rapidgrad-kron", "auto"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128, help="training rows")
    parser.add_argument("--queries", type=int, default=8, help="held-out rows used as queries")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (the build's default)")
    parser.add_argument("--sketch-dims", default="4096,65536", help="comma-separated K values")
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--build-rows",
        type=int,
        default=0,
        help="also time build_index end to end on this many rows (0: skip)",
    )
    parser.add_argument(
        "--fidelity-seeds", default="1,2,3,4", help="more sketch seeds for v2 and ts, fidelity only (untimed)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a saved model folder instead of a new random tiny Llama (e.g. peers.py's"
        " fine-tuned .bench/peers/full/model)",
    )
    parser.add_argument("--out", type=Path, default=None)
    return parse_arguments(
        parser,
        argv,
        rows=8,
        queries=4,
        batch_size=4,
        sketch_dims="256",
        hidden_size=16,
        layers=1,
        vocab_size=300,
        repeats=1,
        build_rows=8,
        fidelity_seeds="1",
        out="{smoke}/result.json",
    )


def sketch_all(sketcher: GradientSketcher, batches) -> torch.Tensor:
    return torch.cat([sketcher.sketch(batch).vectors for batch in batches])


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def exact_scores(model, blocks, train_batches, query_batches) -> np.ndarray:
    """[queries, rows] exact TracIn + layer norm: uncompressed normalised gradients (K = 0), streamed."""
    sketcher = GradientSketcher(model, blocks, make_projector(SketchSettings(0), gradient_dim(blocks)))
    queries = sketch_all(sketcher, query_batches)  # [queries, D]
    return torch.cat([queries @ sketcher.sketch(batch).vectors.T for batch in train_batches], dim=1).numpy()


def mean_spearman(scores: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([spearman(scores[q], exact[q]) for q in range(exact.shape[0])]))


def milliseconds(function, repeats: int = 3) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1000


MICRO_SHAPES = ((384, 384), (768, 384), (2000, 384))


def micro_timings(
    sketch_dims: list[int], batch: int = 8, tokens: int = 40, shapes=MICRO_SHAPES
) -> list[dict]:
    """Milliseconds to sketch one call of a (rows x cols) linear layer, three ways, per K."""
    results = []
    for rows, cols in shapes:
        grads, inputs = torch.randn(batch, tokens, rows), torch.randn(batch, tokens, cols)
        for k in sketch_dims:
            results.append(time_one_call(grads, inputs, k))
    return results


def time_one_call(grads: torch.Tensor, inputs: torch.Tensor, sketch_dim: int) -> dict:
    from rapidin_index.sketch.ts import RapidGradTSProjector, fft_is_cheaper

    batch, tokens, rows = grads.shape
    cols = inputs.shape[2]
    blocks = gradient_blocks([("weight", torch.nn.Parameter(torch.zeros(rows, cols)))])
    projector = RapidGradTSProjector(
        SketchSettings(sketch_dim, algorithm="rapidgrad-ts"), rows * cols, blocks=blocks
    )
    v2 = make_projector(SketchSettings(sketch_dim), rows * cols)
    out = projector.new_output(batch)

    def materialised():
        gradients = torch.bmm(grads.transpose(1, 2), inputs).reshape(batch, -1)  # [batch, rows * cols]
        norms = torch.linalg.vector_norm(gradients, dim=1)
        v2.project_block(out, gradients / norms[:, None], 0)

    return {
        "shape": [rows, cols],
        "sketch_dim": sketch_dim,
        "fft_ms": milliseconds(lambda: projector.project_outer(out, grads, inputs, 0)),
        "matmul_scatter_ms": milliseconds(lambda: projector.project_dense(out, grads, inputs, 0)),
        "v2_materialised_ms": milliseconds(materialised),
        "cost_model_picks_fft": fft_is_cheaper(tokens, (rows, cols), sketch_dim),
    }


def seed_spread(model, blocks, args, sketch_dims, train_batches, query_batches, exact) -> list[dict]:
    """Spearman vs exact of v2, ts and kron over the default seed (42) and ``--fidelity-seeds``: mean, std, all."""
    seeds = [42] + [int(seed) for seed in args.fidelity_seeds.split(",") if seed]
    spread = []
    for k in sketch_dims:
        for algorithm in ("rapidgrad-v2", "rapidgrad-ts", "rapidgrad-kron"):
            values = []
            for seed in seeds:
                settings = SketchSettings(k, seed=seed, algorithm=algorithm)
                projector = make_projector(settings, gradient_dim(blocks), blocks=blocks)
                sketcher = GradientSketcher(model, blocks, projector, "layer")
                scores = sketch_all(sketcher, query_batches) @ sketch_all(sketcher, train_batches).T
                values.append(mean_spearman(scores.numpy(), exact))
            spread.append(
                {
                    "algorithm": algorithm,
                    "sketch_dim": k,
                    "seeds": seeds,
                    "spearman": values,
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values)),
                }
            )
    return spread


def end_to_end(model_dir: str, args: argparse.Namespace, sketch_dims: list[int]) -> list[dict]:
    """``build_index`` wall time (model loading and index writes included): v2 against 'auto', interleaved."""
    from rapidin_index.build import BuildSettings, build_index
    from rapidin_index.store.manifest import read_manifest

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in docstring_rows(args.build_rows)))
        warm_up = BuildSettings(ModelSettings(model_dir), SketchSettings(sketch_dims[0]), device="cpu")
        build_index(data, Path(tmp) / "warm-up", warm_up, progress=False)  # lazy imports, first loads
        for k in sketch_dims:
            times: dict[str, list[float]] = {"rapidgrad-v2": [], "auto": []}
            resolved = ""
            for repeat in range(args.repeats):
                for algorithm in times:
                    index_dir = Path(tmp) / f"index-{k}-{algorithm}-{repeat}"
                    build = BuildSettings(
                        ModelSettings(model_dir), SketchSettings(k, algorithm=algorithm), device="cpu"
                    )
                    seconds, _ = timed(lambda b=build, i=index_dir: build_index(data, i, b, progress=False))
                    times[algorithm].append(seconds)
                    if algorithm == "auto":
                        resolved = read_manifest(index_dir).sketch["algorithm"]
            medians = {name: statistics.median(values) for name, values in times.items()}
            results.append(
                {"sketch_dim": k, "seconds": times, "median_seconds": medians, "auto_resolved": resolved}
            )
    return results


def new_model(args: argparse.Namespace, tmp: str):
    """A randomly initialised tiny Llama, saved in ``tmp`` and loaded as the build loads models."""
    # the tokenizer learns from more rows than are sketched, so that its vocabulary (the embedding and
    # output layers) reaches --vocab-size
    texts = [row["instruction"] + " " + row["output"] for row in docstring_rows(512)]
    folder = save_tiny_model(
        Path(tmp) / "llama", "llama", texts, args.vocab_size, hidden_size=args.hidden_size, layers=args.layers
    )
    settings = ModelSettings(str(folder))
    return settings, load_model(settings)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sketch_dims = [int(k) for k in args.sketch_dims.split(",")]
    rows = docstring_rows(args.rows + args.queries)
    if args.model is not None:
        settings = ModelSettings(args.model)
        loaded = load_model(settings)
    else:
        workspace = tempfile.TemporaryDirectory()  # removed at exit; the end-to-end builds load from it
        settings, loaded = new_model(args, workspace.name)
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    blocks = gradient_blocks(select_parameters(model, settings))
    dim = gradient_dim(blocks)
    sequences = tokenized_rows(rows, loaded.tokenizer)
    train, queries = sequences[: args.rows], sequences[args.rows :]
    step = args.batch_size
    train_batches = [collate(train[i : i + step], pad, "cpu") for i in range(0, len(train), step)]
    query_batches = [collate(queries[i : i + step], pad, "cpu") for i in range(0, len(queries), step)]
    tokens = sum(len(ids) for ids, _ in train)

    sketchers = {}
    for k in sketch_dims:
        for name, (algorithm, mode) in METHODS.items():
            projector = make_projector(SketchSettings(k, algorithm=algorithm), dim, blocks=blocks)
            sketchers[(name, k)] = GradientSketcher(model, blocks, projector, "layer", factored=mode)
    for sketcher in sketchers.values():  # warm-up: self-check, bin caches
        sketcher.sketch(train_batches[0])
    run_floor(model, train_batches[:1])

    times = {"floor": []} | {f"{name} K={k}": [] for name, k in sketchers}
    vectors = {}
    for repeat in range(args.repeats):
        seconds, _ = timed(lambda: run_floor(model, train_batches))
        times["floor"].append(seconds)
        for (name, k), sketcher in sketchers.items():  # interleaved: machine noise hits all alike
            seconds, result = timed(lambda sketcher=sketcher: sketch_all(sketcher, train_batches))
            times[f"{name} K={k}"].append(seconds)
            vectors[(name, k)] = result
            print(f"  repeat {repeat}: {name} K={k}: {seconds:.2f} s", file=sys.stderr)

    exact = exact_scores(model, blocks, train_batches, query_batches)
    methods = []
    for (name, k), sketcher in sketchers.items():
        query_vectors = sketch_all(sketcher, query_batches)
        scores = (query_vectors @ vectors[(name, k)].T).numpy()
        label = f"{name} K={k}"
        median = statistics.median(times[label])
        methods.append(
            {
                "method": name,
                "sketch_dim": k,
                "median_seconds": median,
                "seconds": times[label],
                "share_of_floor_speed": statistics.median(times["floor"]) / median,
                "spearman_vs_exact": mean_spearman(scores, exact),
                "factored_blocks": len(sketcher.factored_blocks),
            }
        )
    seeds = seed_spread(model, blocks, args, sketch_dims, train_batches, query_batches, exact)
    for k in sketch_dims:
        ts, materialised = vectors[("ts", k)], vectors[("ts-materialised", k)]
        difference = float((ts - materialised).abs().max() / materialised.abs().max())
        for method in methods:
            if method["sketch_dim"] == k:
                method["ts_factored_vs_materialised_max_relative_difference"] = difference
    results = {
        "command": " ".join(["benchmarks/factored.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "settings": {key: str(value) for key, value in vars(args).items()},
        "model": {"parameters": dim, "blocks": len(blocks), "rows": len(train), "tokens": tokens},
        "floor_median_seconds": statistics.median(times["floor"]),
        "methods": methods,
        "fidelity_over_seeds": seeds,
        "micro_timings": micro_timings(sketch_dims, shapes=((16, 16),) if args.smoke else MICRO_SHAPES),
        "end_to_end": end_to_end(settings.model, args, sketch_dims) if args.build_rows else [],
    }
    print("\n".join(table(results)))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict) -> list[str]:
    by_key = {(m["method"], m["sketch_dim"]): m for m in results["methods"]}
    lines = [
        "| K | method | build s (median) | v2 s / this s | share of floor speed | Spearman vs exact TracIn+LN |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for method in results["methods"]:
        v2 = by_key[("v2", method["sketch_dim"])]["median_seconds"]
        lines.append(
            f"| {method['sketch_dim']:,} | {method['method']} | {method['median_seconds']:.2f} "
            f"| {v2 / method['median_seconds']:.2f}x | {method['share_of_floor_speed']:.2f} "
            f"| {method['spearman_vs_exact']:.3f} |"
        )
    lines.append(f"\nfloor (batched forward + backward): {results['floor_median_seconds']:.2f} s\n")
    lines += ["| K | algorithm | Spearman vs exact, mean +- std over seeds | seeds |", "|---:|---|---:|---|"]
    for spread in results["fidelity_over_seeds"]:
        values = ", ".join(f"{value:.3f}" for value in spread["spearman"])
        lines.append(
            f"| {spread['sketch_dim']:,} | {spread['algorithm']} | {spread['mean']:.3f} +- {spread['std']:.3f} "
            f"| {values} |"
        )
    lines.append("")
    if results["end_to_end"]:
        lines += [
            "| K | build_index v2 s | build_index auto s | auto resolved to | v2 / auto |",
            "|---:|---:|---:|---|---:|",
        ]
        for entry in results["end_to_end"]:
            v2, auto = entry["median_seconds"]["rapidgrad-v2"], entry["median_seconds"]["auto"]
            lines.append(
                f"| {entry['sketch_dim']:,} | {v2:.2f} | {auto:.2f} | {entry['auto_resolved']} | {v2 / auto:.2f}x |"
            )
        lines.append("")
    lines += [
        "| call (rows x cols), K | FFT ms | signed matmul + scatter ms | v2 materialised ms | model picks |",
        "|---|---:|---:|---:|---|",
    ]
    for timing in results["micro_timings"]:
        rows, cols = timing["shape"]
        lines.append(
            f"| {rows} x {cols}, {timing['sketch_dim']:,} | {timing['fft_ms']:.1f} | {timing['matmul_scatter_ms']:.1f} "
            f"| {timing['v2_materialised_ms']:.1f} | {'FFT' if timing['cost_model_picks_fft'] else 'matmul'} |"
        )
    return lines


if __name__ == "__main__":
    main()
