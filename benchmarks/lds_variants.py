"""Issue 23's variants of `lds.py`: Adam's second moments, the query-side Fisher, both; and their costs.

Imported by `lds.py` (`--variants on`), on the models and indexes it cached. Scores come from the stored
vectors of real builds (`lds.stored_pair`); the Fisher is the library's own (`precondition.fit_fisher`
over the train index's vectors, applied to the query vectors), which `tests/test_precondition.py` holds to
brute force and to `Index.query_prepared`. Costs are measured in this run, on this machine: the train
build with and without the optimizer state (fresh folders, alternated), `precondition.fit_index`, and a
whole-generation query of every held-out query with and without the Fisher.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from lds import index_folder, linear_datamodeling_score, stored_pair, summarize

from rapidin_index import SketchSettings
from rapidin_index.build import build_index
from rapidin_index.precondition import (
    DEFAULT_DAMPING,
    DEFAULT_RANK,
    Preconditioner,
    fit_fisher,
    fit_index,
    spans_for,
)
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings, ModelSettings
from rapidin_index.store.manifest import read_manifest

DEFAULT_DAMPING_SHOWN = 0.1


def run_variants(folder: Path, queries, masks, losses, arguments, results: dict, all_scores: dict) -> dict:
    """Add the variants' LDS to ``results`` (and their scores to ``all_scores``); returns the costs."""
    dampings = [float(d) for d in arguments.dampings.split(",")]
    structures = arguments.structures.split(",")
    count = arguments.queries

    def record(name: str, scores: np.ndarray) -> None:
        all_scores[name] = scores
        results[name] = summarize(linear_datamodeling_score(scores, masks, losses), count)
        print(f"{name}: LDS {results[name]['lds']:.3f}", flush=True)

    for sketch_dim, label in ((65536, "K=2^16"), (0, "exact")):
        sketch = SketchSettings(sketch_dim)
        manifest = read_manifest(index_folder(folder, sketch, "layer", False, "train"))
        for adam in (False, True):
            pair = stored_pair(folder, sketch, "layer", adam)
            base = "+optimizer state" if adam else "RapidIn" if sketch_dim else "TracIn + layer norm"
            if adam:
                record(
                    f"{base}, {label}",
                    pair["queries"].astype(np.float64) @ pair["train"].T.astype(np.float64),
                )
            fits = {
                _hashable(spans_for(manifest, structure)) for structure in structures
            }  # auto may equal whole
            for kind, spans in sorted(fits):
                if kind == "whole" and sketch_dim == 0:
                    continue  # D x rank eigenvectors of a 330k-wide block: past this benchmark's memory
                fitted = fit_fisher(pair["train"], spans, DEFAULT_DAMPING, DEFAULT_RANK)  # once; damped below
                for damping in dampings:
                    blocks = [replace(b, damping=b.damping / DEFAULT_DAMPING * damping) for b in fitted]
                    preconditioned = Preconditioner(blocks, {}).apply(pair["queries"]).astype(np.float64)
                    name = f"{'+both' if adam else '+Fisher'} ({kind}, damping {damping}), {label}"
                    record(name, preconditioned @ pair["train"].T.astype(np.float64))
                    if damping == DEFAULT_DAMPING_SHOWN:
                        record(f"{name}, whitened cosine", whitened_cosine(blocks, pair))
    pair = stored_pair(folder, SketchSettings(65536), "none", True)
    record("+optimizer state, no layer norm, K=2^16", pair["queries"].astype(np.float64) @ pair["train"].T)
    return costs(folder, queries) if arguments.costs == "on" else {}


def _hashable(fit: tuple[str, list]) -> tuple[str, tuple]:
    return fit[0], tuple(fit[1])


def whitened_cosine(blocks, pair: dict) -> np.ndarray:
    """<W q, W g> / ||W g|| with W = (F + lambda I)^-1/2 per block: the Fisher on both sides, the rows
    normalised again after whitening (it would need other stored vectors; analysis only)."""
    whiten = [(b, _power(b, -0.5)) for b in blocks]

    def apply(vectors: np.ndarray) -> np.ndarray:
        out = vectors.astype(np.float64).copy()
        for block, transform in whiten:
            out[:, block.start : block.stop] = transform(out[:, block.start : block.stop])
        return out

    rows = apply(pair["train"])
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
    return apply(pair["queries"]) @ rows.T


def _power(block, exponent: float):
    vectors = block.eigenvectors.astype(np.float64)
    rest = (block.rest + block.damping) ** exponent
    inside = (block.eigenvalues + block.damping) ** exponent - rest

    def transform(x: np.ndarray) -> np.ndarray:
        return x * rest + ((x @ vectors) * inside) @ vectors.T

    return transform


def costs(folder: Path, queries: list[dict], repeats: int = 2) -> dict:
    """Build (without / with the optimizer state), fit and query (without / with the Fisher) seconds, with
    their ratios; builds into fresh folders, alternated, medians of ``repeats``."""
    timing = folder / "timing"
    shutil.rmtree(timing, ignore_errors=True)
    builds: dict[str, list[float]] = {"plain": [], "optimizer state": []}
    for repeat in range(repeats):
        for name, state in (("plain", None), ("optimizer state", str(folder / "full"))):
            settings = BuildSettings(
                ModelSettings(str(folder / "full")),
                SketchSettings(65536),
                batch_size=16,
                optimizer_state=state,
            )
            started = time.perf_counter()
            build_index(folder / "train.jsonl", timing / f"{name}-{repeat}", settings, progress=False)
            builds[name].append(time.perf_counter() - started)
    index_dir = timing / "plain-0"
    started = time.perf_counter()
    fit_index(index_dir)
    fit_seconds = time.perf_counter() - started
    index = Index.open(index_dir, device="cpu")
    prepared = [index.prepare(row["instruction"], row["output"]) for row in queries]
    index.query_prepared(prepared[:2], 10, explain=0, per_token=False)  # warm-up
    seconds: dict[str, list[float]] = {"none": [], "fisher": []}
    for _ in range(repeats):
        for option in ("none", "fisher"):
            index.use_precondition(option)
            started = time.perf_counter()
            index.query_prepared(prepared, 10, explain=0, per_token=False)
            seconds[option].append(time.perf_counter() - started)
    build = {name: float(np.median(values)) for name, values in builds.items()}
    query = {name: float(np.median(values)) for name, values in seconds.items()}
    return {
        "build_seconds": build,
        "build_ratio_optimizer_state": build["optimizer state"] / build["plain"],
        "fit_seconds": fit_seconds,
        "fit_over_build": fit_seconds / build["plain"],
        "query_seconds_50_whole": query,
        "query_ratio_fisher": query["fisher"] / query["none"],
    }
