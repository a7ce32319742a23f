"""Issue 23: LDS of the query-side Fisher over a damping sweep, on `lds.py`'s cached models and K = 2^16 indexes.

Run `benchmarks/lds.py` first (it trains the models and builds the indexes in .bench/lds); this script
only loads their stored vectors, fits each Fisher once (per tensor and whole, with and without the
optimizer state) and scores the held-out queries at each damping (`precondition`'s rule).

    .venv/bin/python benchmarks/lds_damping_sweep.py   # writes .bench/lds-sweep-nonzero.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from common import parse_arguments as parse_with_smoke
from lds import index_folder, linear_datamodeling_score, smoke_cache, stored_pair, summarize
from lds_kfac import losses_and_masks

from rapidin_index import SketchSettings
from rapidin_index.precondition import DEFAULT_DAMPING, Preconditioner, fit_fisher, spans_for
from rapidin_index.store.manifest import read_manifest

DAMPINGS = (0.1, 0.25, 0.5, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path(".bench/lds"), help="lds.py's cache")
    parser.add_argument("--out", type=Path, default=Path(".bench/lds-sweep-nonzero.json"))
    # the smoke run: lds.py's smoke cache (made here, lds.smoke_cache)
    arguments = parse_with_smoke(parser, folder="{smoke}/lds", out="{smoke}/result.json")
    torch.set_num_threads(1)
    folder = arguments.folder
    if arguments.smoke and not (folder / "settings.json").exists():
        smoke_cache(folder)
    masks, losses, queries = losses_and_masks(folder)
    out = {}
    for adam in (False, True):
        pair = stored_pair(folder, SketchSettings(65536), "layer", adam)  # made if missing
        train, query_vectors = pair["train"], pair["queries"]
        manifest = read_manifest(index_folder(folder, SketchSettings(65536), "layer", adam, "train"))
        for structure in ("auto", "whole"):
            kind, spans = spans_for(manifest, structure)
            fitted = fit_fisher(train, spans, DEFAULT_DAMPING)  # once; re-damped below
            for damping in DAMPINGS:
                blocks = [
                    dataclasses.replace(b, damping=b.damping / DEFAULT_DAMPING * damping) for b in fitted
                ]
                preconditioned = Preconditioner(blocks, {}).apply(query_vectors).astype(np.float64)
                result = summarize(
                    linear_datamodeling_score(preconditioned @ train.T.astype(np.float64), masks, losses),
                    queries,
                )
                name = f"{'+both' if adam else '+Fisher'} ({kind}, damping {damping}), K=2^16"
                out[name] = {key: result[key] for key in ("lds", "lds_triggered", "lds_clean")}
                print(name, {key: round(value, 3) for key, value in out[name].items()}, flush=True)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
