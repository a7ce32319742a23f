"""Issue 23: LDS of the query-side Fisher over a damping sweep, on `lds.py`'s cached models and K = 2^16 indexes.

Run `benchmarks/lds.py` first (it trains the models and builds the indexes in .bench/lds); this script
only loads their stored vectors, fits each Fisher once (per tensor and whole, with and without the
optimizer state) and scores the held-out queries at each damping (`precondition`'s rule).

    .venv/bin/python benchmarks/lds_damping_sweep.py   # writes .bench/lds-sweep-nonzero.json
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from lds import index_folder, linear_datamodeling_score, subset_masks, summarize

from rapidin_index import Index, SketchSettings
from rapidin_index import index as vector_index
from rapidin_index.manifest import read_manifest
from rapidin_index.precondition import DEFAULT_DAMPING, Preconditioner, fit_fisher, spans_for

FOLDER = Path(".bench/lds")
DAMPINGS = (0.1, 0.25, 0.5, 1, 2)
MODELS, QUERIES = 32, 25


def stored(adam: bool, part: str) -> np.ndarray:
    folder = index_folder(FOLDER, SketchSettings(65536), "layer", adam, part)
    return vector_index.stored_vectors(Index.open(folder, device="cpu").faiss_index)[1]


def main() -> None:
    torch.set_num_threads(1)
    rows = sum(1 for _ in open(FOLDER / "train.jsonl"))
    masks = subset_masks(rows, MODELS, 0.5)
    losses = np.array(
        [
            json.loads((FOLDER / "subsets" / f"{n:03d}" / "query_losses.json").read_text())
            for n in range(MODELS)
        ]
    )
    out = {}
    for adam in (False, True):
        train, queries = stored(adam, "train"), stored(adam, "queries")
        manifest = read_manifest(index_folder(FOLDER, SketchSettings(65536), "layer", adam, "train"))
        for structure in ("auto", "whole"):
            kind, spans = spans_for(manifest, structure)
            fitted = fit_fisher(train, spans, DEFAULT_DAMPING)  # once; re-damped below
            for damping in DAMPINGS:
                blocks = [
                    dataclasses.replace(b, damping=b.damping / DEFAULT_DAMPING * damping) for b in fitted
                ]
                preconditioned = Preconditioner(blocks, {}).apply(queries).astype(np.float64)
                result = summarize(
                    linear_datamodeling_score(preconditioned @ train.T.astype(np.float64), masks, losses),
                    QUERIES,
                )
                name = f"{'+both' if adam else '+Fisher'} ({kind}, damping {damping}), K=2^16"
                out[name] = {key: result[key] for key in ("lds", "lds_triggered", "lds_clean")}
                print(name, {key: round(value, 3) for key, value in out[name].items()}, flush=True)
    Path(".bench/lds-sweep-nonzero.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
