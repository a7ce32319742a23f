"""Issue 23's variants of `backdoor.py` (tiny model): Adam's second moments, the query-side Fisher, both.

At K = 2^16 (rapidgrad-v2), the default sketch of the benchmark's full tiny Llama: the plain rows are the
exact index's vectors sketched with the build's projector (as `backdoor.py` does for every K); the rows
with the optimizer state come from a real build with `--optimizer-state` (the fine-tune's optimizer.pt)
and its queries from that index's own sketcher. The Fisher is fitted once per set of rows
(`precondition.fit_fisher`, one block: v2 mixes every tensor into every bin) and applied to the query
vectors at each damping. The exact (K = 0) variants are left out here: 2,151 exact rows with the state
would hold a second 2.8 GB matrix beside the first.

With `backdoor.py --exact off` (`built_variant_results`) there is no exact index: every variant is a real
build at K (the build's default algorithm: rapidgrad-kron on this model), fitted by `fit_index`, scored
from its stored vectors and its own query vectors; the builds, the fit and a preconditioned query are timed.
Each build is also scored as a user queries it (`fitted_query_results`): `Index.use_precondition(None)`, i.e.
the fit's defaults (the per-tensor Fisher at damping 0.5 with query norms: the query keeps its per-tensor
gradient norms), through `retrieval.sketch_queries`, checked against `Index.query_prepared`'s top 10; then
each build is refitted with `fit_index(kind="kfac")`, `"ekfac"` (their default damping) and the Fisher with
``query_norms=False`` (`fit --no-query-norms`) and scored the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from backdoor import query_vectors, sketch_rows

from rapidin_index.build import build_index
from rapidin_index.precondition import DEFAULT_DAMPING, Preconditioner, fit_fisher
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings
from rapidin_index.store import vector_index

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


# ----------------------------------------------------------------- real builds (backdoor.py --exact off)

BUILT_DAMPINGS = (0.1, 0.5, 2.0)


def built_index(paths, optimizer_state: str | None, sketch: SketchSettings) -> tuple[Index, dict]:
    """A real build of the training rows (fresh folder), fitted; (opened index, build and fit seconds)."""
    import shutil
    import time

    from rapidin_index.precondition import fit_index

    folder = paths.folder / f"built-k{sketch.sketch_dim}{'-adam' if optimizer_state else ''}"
    shutil.rmtree(folder, ignore_errors=True)
    settings = BuildSettings(
        ModelSettings(str(paths.model)), sketch, batch_size=16, optimizer_state=optimizer_state
    )
    started = time.perf_counter()
    build_index(paths.train, folder, settings, progress=False)
    built = time.perf_counter()
    fit_index(folder)
    fitted = time.perf_counter()
    seconds = {"build": built - started, "fit": fitted - built}
    return Index.open(folder, device="cpu"), seconds


def built_variant_results(
    paths, plain: Index, plain_seconds: dict, queries, labels, evaluate, sketch: SketchSettings
) -> tuple[dict, dict]:
    """RapidIn, +optimizer state, +Fisher, +both from real builds at ``sketch`` (the build's default
    algorithm), every score from the stored vectors and the index's own query vectors; the Fisher is the
    index's fitted one (`rapidin-index fit`: per tensor under rapidgrad-kron), at the default damping
    and, from the same eigenpairs, at the others in ``BUILT_DAMPINGS``. ``plain``: the build without the
    state and its seconds (`built_index`). Returns (results, costs: seconds and ratios)."""
    import gc
    import time

    from rapidin_index.precondition import DEFAULT_DAMPING, fit_index, load_preconditioner

    results, costs = {}, {}
    state = Path(paths.model) / "optimizer.pt"
    adam, adam_seconds = built_index(paths, str(state), sketch)
    costs["build_seconds"] = {"plain": plain_seconds["build"], "optimizer state": adam_seconds["build"]}
    costs["build_ratio_optimizer_state"] = adam_seconds["build"] / plain_seconds["build"]
    costs["fit_seconds"] = plain_seconds["fit"]
    costs["fit_over_build"] = plain_seconds["fit"] / plain_seconds["build"]
    label = f"K=2^{sketch.sketch_dim.bit_length() - 1} ({plain.manifest.sketch['algorithm']})"
    for name, index in (("RapidIn", plain), ("+optimizer state", adam)):
        rows = stored_rows(index)
        index.use_precondition("none")  # layer-normalised queries (the fit's query norms would drop them)
        vectors = query_vectors(index, queries)
        results[f"{name}, {label}"] = evaluate(labels, vectors @ rows.T)
        fitted = load_preconditioner(index.path, index.manifest)
        prefix = "+Fisher" if index is plain else "+both"
        for damping in BUILT_DAMPINGS:
            blocks = [
                dataclasses.replace(b, damping=b.damping / DEFAULT_DAMPING * damping) for b in fitted.blocks
            ]
            preconditioned = Preconditioner(blocks, {}).apply(vectors)
            shown = f"{prefix} ({index.manifest.precondition['structure']}, damping {damping}), {label}"
            results[shown] = evaluate(labels, preconditioned @ rows.T)
        results.update(fitted_query_results(index, name, label, queries, rows, labels, evaluate))
        del rows, fitted, blocks, preconditioned
        print(f"peak RSS so far: {peak_rss_gb():.2f} GB", flush=True)
    print(f"peak RSS so far: {peak_rss_gb():.2f} GB", flush=True)
    costs["query_seconds"] = query_costs(plain, queries)
    costs["query_ratio_fisher"] = costs["query_seconds"]["fisher"] / costs["query_seconds"]["none"]
    for kind, query_norms in REFITS:  # refit each build, scored as a user queries it
        key = f"fit_seconds_{kind}" + ("" if query_norms else "_no_query_norms")
        for name, index in (("RapidIn", plain), ("+optimizer state", adam)):
            folder, started = index.path, time.perf_counter()
            index.lease.close()
            fit_index(folder, kind=kind, query_norms=query_norms)
            costs.setdefault(key, {})[name] = time.perf_counter() - started
            index = Index.open(folder, device="cpu")
            rows = stored_rows(index)
            results.update(
                fitted_query_results(index, name, label, queries, rows, labels, evaluate, sweep=False)
            )
            index.lease.close()
            del rows, index
            gc.collect()
            print(f"peak RSS so far: {peak_rss_gb():.2f} GB", flush=True)
        costs[key.replace("seconds", "over_build")] = costs[key]["RapidIn"] / plain_seconds["build"]
    costs["query_path_check"] = QUERY_PATH_CHECKS
    costs["peak_rss_gb"] = peak_rss_gb()
    return results, costs


def stored_rows(index: Index) -> np.ndarray:
    """The index's stored vectors [N, K] in id order, float32 (one copy where they are already in order)."""
    ids, rows = vector_index.stored_vectors(index.faiss_index)
    if not np.array_equal(ids, np.arange(len(ids))):
        rows = rows[np.argsort(ids)]
    return rows.astype(np.float32, copy=False)


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


QUERY_PATH_CHECKS: dict[str, str] = {}
"""`fitted_query_results`' check of its scores against `Index.query_prepared`'s top 10 (in the report's costs)."""
REFITS = (("kfac", True), ("ekfac", True), ("fisher", False))
"""(kind, query_norms) refitted after the default fit (one fit per index folder), each at its kind's
default damping: K-FAC and EK-FAC with query norms, then the Fisher without them (`fit --no-query-norms`)."""


def fitted_query_results(
    index: Index, name: str, label: str, queries, rows: np.ndarray, labels, evaluate, sweep: bool = True
) -> dict:
    """Scores through the index's own query path, as `rapidin-index query` gets them on a fitted index:
    `Index.use_precondition(None)` (the fitted kind, its damping and its query norms), whole-generation
    vectors from `retrieval.sketch_queries` (what `query_prepared` searches the inner-product index with)
    against the stored rows; the top 10 of `query_prepared` itself are checked against these scores.
    ``sweep``: also the same query-norm vectors without a preconditioner and with the Fisher's eigenpairs
    at ``BUILT_DAMPINGS``."""
    from rapidin_index.precondition import DEFAULT_DAMPING
    from rapidin_index.retrieval import sketch_queries

    index.use_precondition(None)
    record = index.preconditioner.record
    prepared = [index.prepare(prompt, response) for prompt, response in queries]
    vectors, _ = sketch_queries(index, prepared, per_token=False)
    scores = vectors @ rows.T
    norms = ", query norms" if record.get("query_norms") else ""
    shown = (
        f"{name} +{record['kind']} ({record['structure']}, damping {record['damping']}{norms}; query path)"
    )
    results = {f"{shown}, {label}": evaluate(labels, scores)}
    found = index.query_prepared(prepared, 10, explain=0, per_token=False)
    same = [
        np.allclose(sorted(hit.score for hit in result.helpful), np.sort(row)[-10:], rtol=1e-3, atol=1e-6)
        for result, row in zip(found, scores, strict=True)
    ]
    QUERY_PATH_CHECKS[shown] = (
        f"query_prepared's top-10 scores equal these in {sum(same)}/{len(same)} queries"
    )
    print(f"{shown}: {QUERY_PATH_CHECKS[shown]}", flush=True)
    if sweep and record["kind"] == "fisher":
        raw = query_vectors(index, queries)  # the sketcher as the fit left it: per-tensor norms kept
        results[f"{name}, query norms, no preconditioner, {label}"] = evaluate(labels, raw @ rows.T)
        fitted = index.preconditioner
        for damping in BUILT_DAMPINGS:
            blocks = [
                dataclasses.replace(b, damping=b.damping / DEFAULT_DAMPING * damping) for b in fitted.blocks
            ]
            preconditioned = Preconditioner(blocks, {}).apply(raw)
            results[f"{name} +fisher ({record['structure']}, damping {damping}{norms}), {label}"] = evaluate(
                labels, preconditioned @ rows.T
            )
    for key in results:
        print(f"{key}: {dict(results[key])}", flush=True)
    index.use_precondition("none")
    return results


def query_costs(index: Index, queries, repeats: int = 3) -> dict:
    """Median seconds of whole-generation queries of every query, without and with the fitted Fisher."""
    import statistics
    import time

    prepared = [index.prepare(prompt, response) for prompt, response in queries]
    index.query_prepared(prepared[:2], 10, explain=0, per_token=False)  # warm-up
    seconds: dict[str, list[float]] = {"none": [], "fisher": []}
    for _ in range(repeats):
        for option in ("none", "fisher"):
            index.use_precondition(option)
            started = time.perf_counter()
            index.query_prepared(prepared, 10, explain=0, per_token=False)
            seconds[option].append(time.perf_counter() - started)
    index.use_precondition("none")
    return {option: statistics.median(values) for option, values in seconds.items()}


def fisher_fit_seconds(folder: str) -> dict:
    """Wall and CPU seconds of the Fisher fit of ``folder``'s stored vectors (`fit_index`'s defaults, not
    written), in this process's BLAS threading (``OPENBLAS_NUM_THREADS``)."""
    import os
    import time

    from rapidin_index.precondition import DEFAULT_DAMPING, DEFAULT_RANK, fit_fisher, spans_for
    from rapidin_index.store import index_folder
    from rapidin_index.store.manifest import read_manifest

    manifest = read_manifest(folder)
    _, vectors = index_folder.load_vectors(folder, manifest.generation)
    _, spans = spans_for(manifest, "auto")
    wall, cpu = time.perf_counter(), time.process_time()
    fit_fisher(vectors, spans, DEFAULT_DAMPING, DEFAULT_RANK)
    return {
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
        "rows": len(vectors),
        "blocks": len(spans),
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
    }


def main() -> None:
    """``python benchmarks/backdoor_variants.py FOLDER``: time the Fisher fit of FOLDER."""
    import argparse
    import json

    from common import parse_arguments, tiny_index, write_json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", nargs="?", help="an index folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    arguments = parse_arguments(parser, out="{smoke}/result.json")  # the smoke run: a tiny index's fit
    if arguments.smoke:
        arguments.folder = str(tiny_index(arguments.smoke_folder)[0])
    elif arguments.folder is None:
        parser.error("give the FOLDER of an index (or --smoke)")
    result = fisher_fit_seconds(arguments.folder)
    print(json.dumps(result))
    write_json(arguments.out, result)


if __name__ == "__main__":
    main()
