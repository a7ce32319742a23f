"""rapidgrad-kron's piece size: fidelity and sketch time of one big piece a matrix against many small ones.

On a saved full-parameter model (default: benchmarks/peers.py's fine-tuned 5.5M-parameter Llama), over
the same tokenized docstring rows as benchmarks/factored.py, for each piece side s (``PIECE_SIDE``: pieces
of s x s bins; 0 = one piece per matrix, as square as the matrix's share of K allows) this measures:

* Spearman against exact TracIn + layer norm (the same hooks at K = 0), per query, averaged, over the
  default seed and ``--seeds``;
* ``GradientSketcher.sketch`` time over all training batches, the sides interleaved, ``--repeats``
  repeats, medians.

More pieces average away the variance of coordinates that share a row or a column (they collide
together in a Kronecker sketch) and cost more in the two count-sketch matmuls per token (their width is
pieces x s). Run from the repository root:
``.venv/bin/python benchmarks/kron_pieces.py --out .bench/kron_pieces.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from build_throughput import docstring_rows, tokenized_rows
from common import parse_arguments
from factored import exact_scores, mean_spearman, new_model, sketch_all, timed

import rapidin_index.sketch.kron as kronecker
from rapidin_index.capture import gradient_blocks, gradient_dim
from rapidin_index.gradients import GradientSketcher
from rapidin_index.losses import collate
from rapidin_index.models import ModelSettings, load_model, select_parameters
from rapidin_index.settings import SketchSettings
from rapidin_index.sketch import make_projector


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=".bench/peers/full/model", help="a saved model folder")
    parser.add_argument("--rows", type=int, default=128, help="training rows")
    parser.add_argument("--queries", type=int, default=8, help="held-out rows used as queries")
    parser.add_argument("--sketch-dim", type=int, default=65536)
    parser.add_argument("--sides", default="0,26,16,12", help="piece sides; 0 = one piece a matrix")
    parser.add_argument("--seeds", default="1,2", help="more sketch seeds (fidelity only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    # the smoke run's model: a new random tiny Llama (factored.new_model) instead of peers.py's
    return parse_arguments(
        parser,
        argv,
        model=None,
        rows=8,
        queries=4,
        sketch_dim=256,
        sides="0,4",
        seeds="1",
        repeats=1,
        hidden_size=16,
        layers=1,
        vocab_size=300,
        out="{smoke}/result.json",
    )


def sketcher_for(model, blocks, side: int, sketch_dim: int, seed: int = 42) -> GradientSketcher:
    kronecker.PIECE_SIDE = side or sketch_dim  # a side past every share: one piece a matrix
    settings = SketchSettings(sketch_dim, seed=seed, algorithm="rapidgrad-kron")
    projector = make_projector(settings, gradient_dim(blocks), blocks=blocks)  # the layout is fixed here
    return GradientSketcher(model, blocks, projector, "layer")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    default_side = kronecker.PIECE_SIDE
    if args.model is None:
        workspace = tempfile.TemporaryDirectory()  # removed at exit
        settings, loaded = new_model(args, workspace.name)
    else:
        settings = ModelSettings(args.model)
        loaded = load_model(settings)
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    blocks = gradient_blocks(select_parameters(model, settings))
    sequences = tokenized_rows(docstring_rows(args.rows + args.queries), loaded.tokenizer)
    train, queries = sequences[: args.rows], sequences[args.rows :]
    train_batches = [collate(train[i : i + 8], pad, "cpu") for i in range(0, len(train), 8)]
    query_batches = [collate(queries[i : i + 8], pad, "cpu") for i in range(0, len(queries), 8)]
    exact = exact_scores(model, blocks, train_batches, query_batches)
    sides = [int(side) for side in args.sides.split(",")]
    sketchers = {side: sketcher_for(model, blocks, side, args.sketch_dim) for side in sides}
    shapes = {
        side: sorted({(s.row_bins, s.col_bins, s.pieces) for s in sketcher.projector.segments if s.rows > 1})
        for side, sketcher in sketchers.items()
    }
    for sketcher in sketchers.values():
        sketcher.sketch(train_batches[0])  # warm-up: self-check, hashes
    seconds: dict[int, list[float]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side, sketcher in sketchers.items():
            elapsed, _ = timed(lambda sketcher=sketcher: sketch_all(sketcher, train_batches))
            seconds[side].append(elapsed)
            print(f"  repeat {repeat}: side {side}: {elapsed:.2f} s", file=sys.stderr)
    fidelity = {}
    for side in sides:
        values = []
        for seed in [42] + [int(seed) for seed in args.seeds.split(",") if seed]:
            sketcher = sketcher_for(model, blocks, side, args.sketch_dim, seed)
            scores = sketch_all(sketcher, query_batches) @ sketch_all(sketcher, train_batches).T
            values.append(mean_spearman(scores.numpy(), exact))
        fidelity[side] = values
    kronecker.PIECE_SIDE = default_side
    results = {
        "command": " ".join(["benchmarks/kron_pieces.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": platform.platform(),
        "model": args.model,
        "sketch_dim": args.sketch_dim,
        "rows": {"train": len(train), "queries": len(queries)},
        "sides": [
            {
                "side": side,
                "matrix_pieces": shapes[side],
                "sketch_seconds": seconds[side],
                "median_seconds": statistics.median(seconds[side]),
                "spearman": fidelity[side],
                "mean_spearman": float(np.mean(fidelity[side])),
            }
            for side in sides
        ],
    }
    print("| piece side | matrix pieces (a, b, p) | sketch s (median) | Spearman vs exact (mean; seeds) |")
    print("|---:|---|---:|---|")
    for row in results["sides"]:
        spread = ", ".join(f"{value:.3f}" for value in row["spearman"])
        print(
            f"| {row['side'] or 'one piece'} | {row['matrix_pieces']} | {row['median_seconds']:.2f} | "
            f"{row['mean_spearman']:.3f} ({spread}) |"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
