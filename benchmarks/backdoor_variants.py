"""Issue 23's variants of `backdoor.py` (tiny model): Adam's second moments, the query-side Fisher, both.

At K = 2^16 (rapidgrad-v2), the default sketch of the benchmark's full tiny Llama: the plain rows are the
exact index's vectors sketched with the build's projector (as `backdoor.py` does for every K); the rows
with the optimizer state come from a real build with `--optimizer-state` (the fine-tune's optimizer.pt)
and its queries from that index's own sketcher. The Fisher is fitted once per set of rows
(`precondition.fit_fisher`, one block: v2 mixes every tensor into every bin) and applied to the query
vectors at each damping. The exact (K = 0) variants are left out here: 2,151 exact rows with the state
would hold a second 2.8 GB matrix beside the first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from backdoor import query_vectors, sketch_rows

from rapidin_index import index as vector_index
from rapidin_index.build import build_index
from rapidin_index.precondition import DEFAULT_DAMPING, Preconditioner, fit_fisher
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

SKETCH = SketchSettings(65536, 20, 42, "rapidgrad-v2")
DAMPINGS = (0.1, 0.5, 1.0)


def variant_results(paths, layer, queries, query_exact, train_vectors, labels, evaluate) -> dict:
    results = {}
    plain_rows, plain_queries = sketch_rows(train_vectors, SKETCH), sketch_rows(query_exact, SKETCH)
    results["RapidIn K=2^16 (v2), for the variants"] = evaluate(labels, plain_queries @ plain_rows.T)
    for damping, scores in fisher_scores(plain_rows, plain_queries):
        results[f"+Fisher (whole, damping {damping}), K=2^16"] = evaluate(labels, scores)
    state = Path(paths.model) / "optimizer.pt"
    if not state.exists():
        print(f"{state} is missing (a model fine-tuned before issue 23): optimizer-state rows skipped")
        return results
    folder = paths.folder / "rapidin-65536-adam"
    settings = BuildSettings(
        ModelSettings(str(paths.model)), SKETCH, batch_size=16, optimizer_state=str(state)
    )
    build_index(paths.train, folder, settings, progress=False)
    index = Index.open(folder, device="cpu")
    ids, adam_rows = vector_index.stored_vectors(index.faiss_index)
    assert np.array_equal(ids, np.arange(len(ids)))
    adam_queries = query_vectors(index, queries)
    results["+optimizer state, K=2^16"] = evaluate(labels, adam_queries @ adam_rows.T)
    for damping, scores in fisher_scores(adam_rows, adam_queries):
        results[f"+both (whole, damping {damping}), K=2^16"] = evaluate(labels, scores)
    return results


def fisher_scores(rows: np.ndarray, queries: np.ndarray):
    """(damping, [queries, rows] scores) with the Fisher of ``rows`` fitted once, damped each way."""
    (block,) = fit_fisher(rows, [(0, rows.shape[1])], DEFAULT_DAMPING)
    width = rows.shape[1]
    trace = float(block.eigenvalues.sum()) + block.rest * (width - len(block.eigenvalues))
    mean_eigenvalue = trace / min(len(rows), width)  # the damping rule: precondition.py's docstring
    for damping in DAMPINGS:
        damped = dataclasses.replace(block, damping=damping * mean_eigenvalue)
        yield damping, Preconditioner([damped], {}).apply(queries) @ rows.T
