"""Query speed: seconds per query of rapidin-index against a NumPy scan and against exact TracIn, in one run.

Two parts, each with its repeats interleaved (every method's k-th sample is taken back to back, so machine
noise hits all alike); medians are reported.

(1) Search only, on synthetic unit vectors of K dims (K = 4096 by default: 10^5 rows x 65536 dims would be
    26 GB; K is halved further if the vectors would not fit the memory budget). For N rows in 10^3..10^5 and
    Q query vectors in 1, 10, 100, the top-10 helpful and top-10 harmful rows are found by

    * ``faiss``     what ``Index.query`` does: ``index.search(q)`` then ``index.search(-q)`` on the project's
                    ``IndexIDMap2(IndexFlatIP)`` (two full scans);
    * ``faiss 1x``  the same index, one call on the stacked ``[q; -q]`` (same work, one pass of the API);
    * ``numpy``     brute force: ``scores = V @ q.T`` once, then ``argpartition`` at both ends and a sort.

    Before timing, every cell checks that FAISS and NumPy return the same ids (up to float near-ties).

(2) End to end on a real index: a tiny Llama (from the standard library's docstrings) is indexed with
    ``build_index``; ``Index.query_rows`` is timed for 1 and 10 queries (training rows used as queries),
    with ``explain=0`` and ``explain=3``, split into sketching (whole generation + one vector per generated
    token), search, text join and explanations. Against it, exact TracIn for each query: the query's exact
    normalised gradient, then for every training row ``reference_gradient`` + ``normalize_flat`` and a dot
    product (K = 0, nothing stored). TracIn is timed on ``--tracin-rows`` rows spread over the data and
    extrapolated linearly to N (it is linear in N by construction); one full pass over all N rows, run
    once, checks the extrapolation and how many of the exact top-10 the index's top-10 recovers.

    A last table projects both to larger N: TracIn = query gradient + N x (seconds per training row); the
    index = its measured fixed cost (sketching, join) + FAISS search, scaled linearly in rows and vectors
    from part (1)'s cell at the largest N whose Q is nearest the query's vector count.

CPU only; run from the repository root: ``.venv/bin/python benchmarks/query_speed.py --out FILE``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from build_throughput import docstring_rows
from common import parse_arguments

from rapidin_index import retrieval
from rapidin_index.build import build_index
from rapidin_index.data import load_examples
from rapidin_index.demo.tiny_models import save_tiny_model
from rapidin_index.gradients import normalize_flat, reference_gradient
from rapidin_index.losses import collate
from rapidin_index.query import PreparedQuery, prepare_row
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings
from rapidin_index.store import vector_index

SEARCH_METHODS = {
    "faiss": "FAISS, search(q) + search(-q) (as retrieval.py)",
    "faiss_stacked": "FAISS, one search([q; -q])",
    "numpy": "NumPy V @ q.T + argpartition",
}
STAGES = ("sketch_whole", "sketch_per_token", "search", "join", "explain", "prepare_and_assemble")
MIN_SAMPLE_SECONDS = 0.05  # tiny cells repeat the call until one sample lasts at least this long
TIE_TOLERANCE = 1e-4


def ints(text: str) -> list[int]:
    """A comma-separated list of counts; "1e3,1e4" reads too."""
    return [int(float(value)) for value in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search-rows", type=ints, default=[1000, 10000, 100000], help="N for part (1)")
    parser.add_argument("--search-queries", type=ints, default=[1, 10, 100], help="Q for part (1)")
    parser.add_argument("--search-dim", type=int, default=4096, help="K of the synthetic vectors")
    parser.add_argument("--memory-gib", type=float, default=6.0, help="budget for part (1)'s vectors")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--index-rows", type=int, default=512, help="training rows in part (2) (<= 592)")
    parser.add_argument("--query-counts", type=ints, default=[1, 10], help="queries per call in part (2)")
    parser.add_argument("--explain", type=int, default=3, help="explained hits per side, besides 0")
    parser.add_argument("--sketch-dim", type=int, default=4096, help="K of the real index")
    parser.add_argument("--hidden-size", type=int, default=64, help="tiny Llama hidden size")
    parser.add_argument("--layers", type=int, default=2, help="tiny Llama layers")
    parser.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary size (at most)")
    parser.add_argument(
        "--long-tokens", type=int, default=64, help="one more query with a response this long (0: none)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per sketch batch")
    parser.add_argument("--tracin-rows", type=int, default=50, help="training rows TracIn is timed on")
    parser.add_argument(
        "--tracin-full",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one untimed-in-the-repeats exact TracIn pass over all rows, to check the extrapolation",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for torch, FAISS (OpenMP) and NumPy's OpenBLAS alike; 1 by default: on a busy "
        "2-core machine 2 threads spin and vary wildly",
    )
    parser.add_argument("--skip-search", action="store_true", help="run part (2) only")
    parser.add_argument("--skip-index", action="store_true", help="run part (1) only")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parse_arguments(
        parser,
        argv,
        search_rows="200",
        search_queries="1,4",
        search_dim=64,
        index_rows=8,
        query_counts="1,2",
        explain=1,
        sketch_dim=256,
        hidden_size=16,
        layers=1,
        vocab_size=300,
        long_tokens=8,
        batch_size=4,
        tracin_rows=4,
        repeats=1,
        out="{smoke}/result.json",
    )


# --------------------------------------------------------------------------- machine


def set_threads(threads: int) -> dict:
    """Pin torch, FAISS's OpenMP (and its OpenMP OpenBLAS) and every loaded OpenBLAS to ``threads``."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    pinned = []
    with open("/proc/self/maps") as maps:
        libraries = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    for path in sorted(libraries):
        library = ctypes.CDLL(path)
        for symbol in (
            "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            if hasattr(library, symbol):
                getattr(library, symbol)(threads)
                pinned.append(f"{Path(path).name}:{symbol}")
                break
    return {"torch": torch.get_num_threads(), "faiss_omp": threads, "openblas": pinned}


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_info(threads: dict) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "memory_available_gib_at_start": round(available_memory_bytes() / 2**30, 1),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "threads": threads,
        "cuda": torch.cuda.is_available(),
    }


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def sample(function: Callable[[], object], calls: int) -> float:
    """Seconds of one call, averaged over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


# --------------------------------------------------------------------------- part 1: search only


def search_dimension(args: argparse.Namespace) -> tuple[int, str]:
    """K for the synthetic vectors: the asked one, halved until NumPy's copy + FAISS's copies fit."""
    budget = min(args.memory_gib * 2**30, 0.5 * available_memory_bytes())
    rows = max(args.search_rows) + sum(args.search_rows)  # NumPy's array + one FAISS index per N
    dimension = args.search_dim
    while dimension > 64 and 4 * dimension * rows * 1.1 > budget:
        dimension //= 2
    note = (
        ""
        if dimension == args.search_dim
        else f"K scaled down from {args.search_dim} to fit {budget / 2**30:.1f} GiB"
    )
    return dimension, note


def unit_rows(rows: int, dimension: int, generator: torch.Generator) -> np.ndarray:
    """[rows, dimension] float32 Gaussian rows scaled to unit length (chunked, to bound temporaries)."""
    out = np.empty((rows, dimension), dtype=np.float32)
    for start in range(0, rows, 8192):
        chunk = torch.randn(min(8192, rows - start), dimension, generator=generator)
        out[start : start + len(chunk)] = torch.nn.functional.normalize(chunk, dim=1).numpy()
    return out


def numpy_top_k(vectors: np.ndarray, queries: np.ndarray, k: int):
    """Brute force: one matrix product, then the k largest and k smallest scores per query, best first."""
    scores = vectors @ queries.T  # [N, Q]
    helpful = np.argpartition(-scores, k - 1, axis=0)[:k]  # [k, Q], unordered
    harmful = np.argpartition(scores, k - 1, axis=0)[:k]
    columns = np.arange(scores.shape[1])
    helpful = np.take_along_axis(helpful, np.argsort(-scores[helpful, columns], axis=0), axis=0)
    harmful = np.take_along_axis(harmful, np.argsort(scores[harmful, columns], axis=0), axis=0)
    return scores[helpful, columns].T, helpful.T, scores[harmful, columns].T, harmful.T


def faiss_two_calls(index, queries: np.ndarray, k: int):
    helpful_scores, helpful_ids = vector_index.search(index, queries, k)
    harmful_scores, harmful_ids = vector_index.search(index, -queries, k)
    return helpful_scores, helpful_ids, -harmful_scores, harmful_ids


def faiss_stacked(index, queries: np.ndarray, k: int):
    scores, ids = vector_index.search(index, np.concatenate([queries, -queries]), k)
    count = len(queries)
    return scores[:count], ids[:count], -scores[count:], ids[count:]


def same_ids(expected, found, vectors: np.ndarray, queries: np.ndarray, label: str) -> None:
    """Assert equal top-k id sets per query, allowing swaps between rows whose scores tie within 1e-4."""
    for side in (1, 3):
        for number in range(len(queries)):
            want, got = set(expected[side][number].tolist()), set(found[side][number].tolist())
            if want == got:
                continue
            scores = vectors[list(want ^ got)] @ queries[number]
            boundary = expected[side - 1][number][-1]
            assert np.all(np.abs(scores - boundary) <= TIE_TOLERANCE), f"{label}: FAISS and NumPy disagree"


def measure_search(args: argparse.Namespace) -> dict:
    dimension, note = search_dimension(args)
    generator = torch.Generator().manual_seed(0)
    largest = max(args.search_rows)
    started = time.perf_counter()
    vectors = unit_rows(largest, dimension, generator)
    # Each query is a noisy copy of a row (cosine ~0.5 to it): one clear hit, then a tail, as with gradients.
    sources = torch.randint(0, min(args.search_rows), (max(args.search_queries),), generator=generator)
    queries = vectors[sources.numpy()] + unit_rows(len(sources), dimension, generator)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    indexes = {}
    for rows in args.search_rows:
        indexes[rows] = vector_index.new_index(dimension)
        vector_index.add_vectors(indexes[rows], vectors[:rows], np.arange(rows))
    setup_seconds = time.perf_counter() - started
    print(f"part 1: {largest:,} x {dimension} vectors ready in {setup_seconds:.0f} s", file=sys.stderr)

    k = args.top_k
    cells = [(rows, count) for rows in args.search_rows for count in args.search_queries]
    runners, calls = {}, {}
    for rows, count in cells:
        view, batch = vectors[:rows], queries[:count]
        runners[rows, count] = {
            "faiss": lambda i=indexes[rows], b=batch: faiss_two_calls(i, b, k),
            "faiss_stacked": lambda i=indexes[rows], b=batch: faiss_stacked(i, b, k),
            "numpy": lambda v=view, b=batch: numpy_top_k(v, b, k),
        }
        # One warm-up call per method, which also checks the ids and sets the calls per sample.
        calls[rows, count] = {}
        outputs = {}
        for name, run in runners[rows, count].items():
            start = time.perf_counter()
            outputs[name] = run()
            once = time.perf_counter() - start
            calls[rows, count][name] = max(1, math.ceil(MIN_SAMPLE_SECONDS / max(once, 1e-7)))
        for name in ("faiss", "faiss_stacked"):
            same_ids(outputs["numpy"], outputs[name], view, batch, f"{name} N={rows} Q={count}")

    times = {cell: {name: [] for name in SEARCH_METHODS} for cell in cells}
    for repeat in range(args.repeats):
        for cell in cells:
            for name in SEARCH_METHODS:  # interleaved
                times[cell][name].append(sample(runners[cell][name], calls[cell][name]))
        print(f"  part 1 repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    results = []
    for rows, count in cells:
        medians = {name: statistics.median(values) for name, values in times[rows, count].items()}
        results.append(
            {
                "rows": rows,
                "queries": count,
                "calls_per_sample": calls[rows, count],
                "seconds": times[rows, count],
                "median_seconds": medians,
                "seconds_per_query": {name: value / count for name, value in medians.items()},
                "numpy_over_faiss": medians["numpy"] / medians["faiss"],
                "numpy_over_faiss_stacked": medians["numpy"] / medians["faiss_stacked"],
            }
        )
    return {
        "dimension": dimension,
        "note": note,
        "top_k": k,
        "setup_seconds": setup_seconds,
        "cells": results,
    }


# --------------------------------------------------------------------------- part 2: a real index


class StageClock:
    """Wraps the retrieval stages (public functions of `rapidin_index.retrieval`) to add up their seconds."""

    STAGES = {"sketch": "sketch_queries", "search": "search", "join": "join_text", "explain": "explain_hits"}

    def __init__(self, index: retrieval.Index) -> None:
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.search_calls = 0
        self.vectors_searched = 0
        self._originals = {name: getattr(retrieval, name) for name in self.STAGES.values()}
        for stage, name in self.STAGES.items():
            setattr(retrieval, name, self._wrap(self._originals[name], stage))

    def _wrap(self, function, stage):
        def wrapper(*args, **kwargs):
            if stage == "search":
                self.search_calls += 1
                self.vectors_searched += len(args[1])
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        return wrapper

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.search_calls = self.vectors_searched = 0

    def restore(self) -> None:
        for name, function in self._originals.items():
            setattr(retrieval, name, function)


def prepare_rows(index: retrieval.Index, rows: list[dict]) -> list[PreparedQuery]:
    """``query_rows``'s own preparation (render with the index's template, tokenize)."""
    return [prepare_row(row, index.loaded.tokenizer, index.manifest) for row in rows]


def sketch_whole_only(index: retrieval.Index, prepared: list[PreparedQuery]) -> None:
    """What ``sketch_queries(..., per_token=False)`` does: the whole-generation sequences alone."""
    sequences = [(query.input_ids, query.labels_for(query.hot_positions)) for query in prepared]
    pad = index.loaded.tokenizer.pad_token_id
    for start in range(0, len(sequences), index.batch_size):
        index.sketcher.sketch(collate(sequences[start : start + index.batch_size], pad, index.device))


def exact_direction(index: retrieval.Index, query: PreparedQuery) -> torch.Tensor:
    """The query's exact whole-generation gradient, layer-normalised: [D]."""
    pad = index.loaded.tokenizer.pad_token_id
    batch = collate([(query.input_ids, query.labels_for(query.hot_positions))], pad, "cpu")
    raw = reference_gradient(index.loaded.model, index.blocks, batch)[None]
    return normalize_flat(raw, index.blocks, index.manifest.normalize)[0]


def exact_tracin(index: retrieval.Index, direction: torch.Tensor, training: list) -> np.ndarray:
    """Exact TracIn: recompute each training row's full gradient, normalise it, dot with the query's."""
    pad = index.loaded.tokenizer.pad_token_id
    scores = np.empty(len(training), dtype=np.float64)
    for number, (input_ids, labels) in enumerate(training):
        raw = reference_gradient(index.loaded.model, index.blocks, collate([(input_ids, labels)], pad, "cpu"))
        normalised = normalize_flat(raw[None], index.blocks, index.manifest.normalize)[0]
        scores[number] = float(normalised @ direction)
    return scores


def time_tracin(index: retrieval.Index, query: retrieval.PreparedQuery, subset: list) -> tuple[float, float]:
    """(seconds for the query's exact gradient, seconds per training row over ``subset``)."""
    start = time.perf_counter()
    direction = exact_direction(index, query)
    middle = time.perf_counter()
    exact_tracin(index, direction, subset)
    return middle - start, (time.perf_counter() - middle) / len(subset)


def long_query_row(rows: list[dict], tokenizer, tokens: int) -> dict:
    """One query whose response (several training outputs joined) is at least ``tokens`` tokens long."""
    parts = []
    for row in rows:
        parts.append(row["output"])
        if len(tokenizer(" ".join(parts), add_special_tokens=False).input_ids) >= tokens:
            break
    ids = tokenizer(" ".join(parts), add_special_tokens=False).input_ids[:tokens]
    return {"instruction": rows[0]["instruction"], "output": tokenizer.decode(ids)}


def measure_index(args: argparse.Namespace, tmp: Path) -> dict:
    rows = docstring_rows(args.index_rows)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts = [row["instruction"] + " " + row["output"] for row in rows]
    model_dir = save_tiny_model(
        tmp / "llama", "llama", texts, args.vocab_size, hidden_size=args.hidden_size, layers=args.layers
    )
    settings = BuildSettings(
        model=ModelSettings(str(model_dir)),
        sketch=SketchSettings(sketch_dim=args.sketch_dim),
        batch_size=args.batch_size,
        device="cpu",
    )
    build_seconds = timed(lambda: build_index(data, tmp / "index", settings, progress=False))
    index = retrieval.Index.open(tmp / "index", device="cpu", batch_size=args.batch_size)
    print(f"part 2: indexed {index.manifest.row_count} rows in {build_seconds:.0f} s", file=sys.stderr)
    tokenizer = index.loaded.tokenizer
    examples, _ = load_examples(data, tokenizer, index.template, index.manifest.max_length)
    training = [(e.input_ids, e.labels) for e in sorted(examples, key=lambda e: e.example_id)]
    subset = training[:: max(1, len(training) // args.tracin_rows)][: args.tracin_rows]  # spread over N

    # Queries: training rows (each should retrieve itself first), plus one long generation.
    query_sets = {f"{count} row{'s' if count > 1 else ''}": rows[:count] for count in args.query_counts}
    cases = [
        (name, explain) for name in query_sets for explain in ([0, args.explain] if args.explain else [0])
    ]
    if args.long_tokens:
        query_sets["1 long"] = [long_query_row(rows, tokenizer, args.long_tokens)]
        cases.append(("1 long", 0))
    prepared = {name: prepare_rows(index, query_rows) for name, query_rows in query_sets.items()}

    clock = StageClock(index)
    try:
        # Warm-up (the projector's bin cache, LanceDB's first open), and the self-retrieval check.
        first = max(args.query_counts)
        warm = index.query_rows(rows[:first], args.top_k, explain=0)
        self_hits = sum(result.helpful[0].id == number for number, result in enumerate(warm))
        for name, explain in cases:
            index.query_rows(query_sets[name][:1], args.top_k, explain=explain)
        time_tracin(index, prepared[cases[0][0]][0], subset[:2])

        samples = {case: [] for case in cases}
        whole = {name: [] for name in query_sets}
        tracin = {name: [] for name in query_sets}
        for repeat in range(args.repeats):
            for name, explain in cases:  # interleaved with each other and with TracIn
                clock.reset()
                total = timed(lambda n=name, e=explain: index.query_rows(query_sets[n], args.top_k, e))
                samples[name, explain].append(
                    {
                        "total": total,
                        **clock.seconds,
                        "search_calls": clock.search_calls,
                        "vectors_searched": clock.vectors_searched,
                    }
                )
            for name in query_sets:
                whole[name].append(timed(lambda n=name: sketch_whole_only(index, prepared[n])))
                tracin[name].append(time_tracin(index, prepared[name][0], subset))
            print(f"  part 2 repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
        full = None
        if args.tracin_full:
            query = prepared[cases[0][0]][0]
            started = time.perf_counter()
            exact = exact_tracin(index, exact_direction(index, query), training)
            full_seconds = time.perf_counter() - started
            row_seconds = statistics.median(row for _, row in tracin[cases[0][0]])
            exact_top = set(np.argsort(-exact)[: args.top_k].tolist())
            full = {
                "seconds": full_seconds,
                "extrapolated_seconds": row_seconds * len(training),
                "top_k_overlap_with_index": len(exact_top & {hit.id for hit in warm[0].helpful}),
            }
    finally:
        clock.restore()

    row_seconds = statistics.median(row for runs in tracin.values() for _, row in runs)
    results = []
    for name, explain in cases:
        runs, count = samples[name, explain], len(query_sets[name])
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        whole_seconds = min(statistics.median(whole[name]), median["sketch"])
        stages = {
            "sketch_whole": whole_seconds,
            "sketch_per_token": median["sketch"] - whole_seconds,
            "search": median["search"],
            "join": median["join"],
            "explain": median["explain"],
        }
        stages["prepare_and_assemble"] = max(0.0, median["total"] - sum(stages.values()))
        query_gradient = statistics.median(seconds for seconds, _ in tracin[name])
        tracin_seconds = count * (query_gradient + len(training) * row_seconds)
        tokens = [len(query.response_positions) for query in prepared[name]]
        results.append(
            {
                "name": name,
                "queries": count,
                "explain": explain,
                "response_tokens": tokens,
                "vectors_searched": runs[0]["vectors_searched"],
                "search_calls": runs[0]["search_calls"],
                "samples": runs,
                "median_seconds": median["total"],
                "seconds_per_query": median["total"] / count,
                "stages_seconds": stages,
                "tracin_query_gradient_seconds": query_gradient,
                "tracin_seconds_extrapolated": tracin_seconds,
                "speedup_over_tracin": tracin_seconds / median["total"],
            }
        )
    return {
        "rows": len(training),
        "gradient_dim": index.manifest.sketch["gradient_dim"],
        "sketch_dim": index.manifest.sketch["output_dim"],
        "build_seconds": build_seconds,
        "self_retrieved_first": f"{self_hits}/{len(warm)}",
        "tracin_rows_timed": len(subset),
        "tracin_seconds_per_row": row_seconds,
        "tracin_samples": tracin,
        "tracin_full_pass": full,
        "cases": results,
    }


# --------------------------------------------------------------------------- projection and report


def search_seconds_per_vector_row(results: dict, vectors: float) -> tuple[float, str]:
    """FAISS seconds (both calls) per query vector per row, at the index's K.

    From part (1)'s largest N, in the cell whose Q is nearest (in log) to ``vectors``: FAISS scans once per
    query vector below 20 vectors and switches to a matrix product above, so the regime matters.
    """
    index, search = results["index"], results.get("search")
    if not search:
        case = next(c for c in index["cases"] if c["explain"] == 0)
        per = case["stages_seconds"]["search"] / (case["vectors_searched"] * index["rows"])
        return per, f"the real index's own search (N = {index['rows']})"
    largest = max(cell["rows"] for cell in search["cells"])
    cell = min(
        (cell for cell in search["cells"] if cell["rows"] == largest),
        key=lambda cell: abs(math.log(cell["queries"] / vectors)),
    )
    per = cell["median_seconds"]["faiss"] / (cell["rows"] * cell["queries"])
    return per * index["sketch_dim"] / search[
        "dimension"
    ], f"part (1), N = {largest:,}, Q = {cell['queries']}"


def projection(results: dict, sizes: list[int]) -> list[dict]:
    """Per query, explain=0: index = measured fixed cost + search linear in N; TracIn linear in N."""
    index = results["index"]
    lines = []
    for case in index["cases"]:
        if case["explain"] != 0 or case["queries"] != 1:
            continue
        fixed = case["median_seconds"] - case["stages_seconds"]["search"]
        vectors = case["vectors_searched"] / 2  # searched twice: q and -q
        per_vector_row, source = search_seconds_per_vector_row(results, vectors)
        for rows in sizes:
            search_seconds = per_vector_row * vectors * rows
            tracin = case["tracin_query_gradient_seconds"] + rows * index["tracin_seconds_per_row"]
            lines.append(
                {
                    "query": case["name"],
                    "response_tokens": case["response_tokens"][0],
                    "rows": rows,
                    "index_seconds": fixed + search_seconds,
                    "index_search_seconds": search_seconds,
                    "search_cost_from": source,
                    "tracin_seconds": tracin,
                    "speedup": tracin / (fixed + search_seconds),
                    "measured": rows == index["rows"],
                }
            )
    return lines


def search_table(search: dict) -> list[str]:
    lines = [
        f"K = {search['dimension']}, top-{search['top_k']} helpful + top-{search['top_k']} harmful; seconds per "
        "query vector (median); ratio > 1 means FAISS is faster than NumPy."
        + (f" {search['note']}." if search["note"] else ""),
        "",
        "| N rows | Q | FAISS 2 calls (as retrieval) | FAISS 1 stacked call | NumPy scan "
        "| NumPy / FAISS 2 calls | NumPy / FAISS stacked |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in search["cells"]:
        per = cell["seconds_per_query"]
        lines.append(
            f"| {cell['rows']:,} | {cell['queries']} | {per['faiss']:.2e} | {per['faiss_stacked']:.2e} "
            f"| {per['numpy']:.2e} | {cell['numpy_over_faiss']:.2f}x | {cell['numpy_over_faiss_stacked']:.2f}x |"
        )
    return lines


def index_tables(index: dict) -> list[str]:
    lines = [
        f"N = {index['rows']} training rows, D = {index['gradient_dim']:,}, K = {index['sketch_dim']}. "
        f"Seconds per query (median), split by stage (share). {index['self_retrieved_first']} training-row "
        "queries retrieve themselves first.",
        "",
        "| queries | explain | response tokens | vectors searched | s/query | sketch whole | sketch per-token "
        "| search | join | explain | prepare+assemble | exact TracIn s/query | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in index["cases"]:
        stages, total, count = case["stages_seconds"], case["median_seconds"], case["queries"]
        parts = " | ".join(f"{stages[key] / count:.3f} ({stages[key] / total:.0%})" for key in STAGES)
        tokens = case["response_tokens"]
        token_text = str(tokens[0]) if len(tokens) == 1 else f"{min(tokens)}-{max(tokens)}"
        lines.append(
            f"| {case['name']} | {case['explain']} | {token_text} | {case['vectors_searched']:,} "
            f"| {case['seconds_per_query']:.3f} | {parts} | {case['tracin_seconds_extrapolated'] / count:.2f} "
            f"| {case['speedup_over_tracin']:.1f}x |"
        )
    lines += [
        "",
        f"Exact TracIn: {index['tracin_seconds_per_row'] * 1e3:.1f} ms per training row (median, timed on "
        f"{index['tracin_rows_timed']} rows spread over the data, per repeat) x {index['rows']} rows, "
        "plus the query's own gradient, per query; extrapolated linearly.",
    ]
    full = index["tracin_full_pass"]
    if full:
        lines.append(
            f"Check: one full exact TracIn pass over all {index['rows']} rows took {full['seconds']:.1f} s "
            f"(extrapolated: {full['extrapolated_seconds']:.1f} s); the index's top-{10} holds "
            f"{full['top_k_overlap_with_index']} of the exact top-10."
        )
    return lines


def projection_table(lines_data: list[dict]) -> list[str]:
    lines = [
        "| query | N rows | index s/query | of which search | exact TracIn s/query | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for line in lines_data:
        mark = " (measured)" if line["measured"] else ""
        lines.append(
            f"| {line['query']} ({line['response_tokens']} tokens) | {line['rows']:,}{mark} "
            f"| {line['index_seconds']:.3f} | {line['index_search_seconds']:.4f} | {line['tracin_seconds']:,.1f} "
            f"| {line['speedup']:,.0f}x |"
        )
    sources = sorted({line["search_cost_from"] for line in lines_data})
    lines += ["", "Search cost per (query vector x row) scaled from: " + "; ".join(sources) + "."]
    return lines


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    torch.manual_seed(0)
    results = {
        "command": " ".join(["benchmarks/query_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(threads),
        "settings": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
    }
    started = time.perf_counter()
    if not args.skip_search:
        results["search"] = measure_search(args)
    if not args.skip_index:
        with tempfile.TemporaryDirectory() as tmp:
            results["index"] = measure_index(args, Path(tmp))
        sizes = sorted({results["index"]["rows"], 1000, 10_000, 100_000, 1_000_000})
        results["projection"] = projection(results, sizes)
    results["elapsed_seconds"] = time.perf_counter() - started
    report = []
    if "search" in results:
        report += ["(1) Search only, synthetic unit vectors", "", *search_table(results["search"]), ""]
    if "index" in results:
        report += [
            "(2) End to end: Index.query_rows vs exact TracIn",
            "",
            *index_tables(results["index"]),
            "",
        ]
        report += ["(3) Projected per query (explain=0)", "", *projection_table(results["projection"])]
    report += ["", f"elapsed {results['elapsed_seconds']:.0f} s"]
    print("\n".join(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
