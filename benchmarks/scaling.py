"""Build scaling: rows/s of `build_index` in one process and on 1 and 2 local Ray workers, and Ray's overhead.

On a tiny Llama built in-process and alpaca rows from the bundled standard-library docstrings, this builds
the same index with every configuration below, each into a fresh folder, the configurations interleaved
(repeat r of every configuration runs before repeat r + 1 of any), medians reported:

local-1t    the default in-process runner, torch pinned to 1 thread
local-2t    the default in-process runner, torch on 2 threads
ray-1w      `RayChunkRunner`, 1 CPU actor (1 thread); starts and stops its own local Ray
ray-2w      `RayChunkRunner`, 2 CPU actors (1 thread each)

Per build it reports the wall time of the whole `build_index` call (model load in the driver, tokenizing,
chunks, finalising the FAISS + LanceDB files) and of the chunk phase alone (``runner.run``); for Ray, the
chunk phase splits into startup (Ray started, every actor's model loaded) and compute. Every build's
vectors must equal local-1t's within 1e-5. CPU only; run from the repository root.

``--growth 1000,4000,...`` (issue 27 item 4) measures instead how one build and one query grow with the
index: per size, in FRESH processes (torch, BLAS and FAISS on one thread), a build of that many synthetic
rows of about 30 tokens (words drawn from the docstring rows) with the tiny Llama at ``--sketch-dim``
(K = 4096 there): wall time, time per row, peak RSS (VmHWM of the build process), the index on disk (the
vectors file, LanceDB, its ``_versions``); then two query processes on that index (the first open after
the build hashes every file once; the second finds them verified), each timing `Index.open` (with the
model load on its own), one whole-generation query split into sketch (its gradient), search and join
(LanceDB text of the hits), then the same query again warm, and the query process's peak RSS. Each size's
results are appended as one JSON line to ``--out`` as soon as it finishes (run sizes as separate commands
to run them in the background); ``--table FILE`` prints the Markdown tables of such a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import memory, parse_arguments

from rapidin_index.build import build_index
from rapidin_index.chunks import LocalChunkRunner
from rapidin_index.demo.datasets import load_docstring_rows, write_jsonl
from rapidin_index.demo.tiny_models import save_tiny_model
from rapidin_index.parallel import RayChunkRunner
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings
from rapidin_index.store import index_folder
from rapidin_index.store.manifest import read_manifest

CONFIGURATIONS = {
    "local-1t": {"threads": 1, "workers": None},
    "local-2t": {"threads": 2, "workers": None},
    "ray-1w": {"threads": 1, "workers": 1},
    "ray-2w": {"threads": 1, "workers": 2},
}
TOLERANCE = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=600, help="training rows")
    parser.add_argument("--hidden-size", type=int, default=128, help="tiny Llama hidden size")
    parser.add_argument("--layers", type=int, default=4, help="tiny Llama layers")
    parser.add_argument("--sketch-dim", type=int, default=65536, help="K")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=32, help="rows per chunk (the unit a worker gets)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported")
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=CONFIGURATIONS)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--growth", default=None, help="comma-separated row counts: the growth benchmark")
    parser.add_argument("--folder", type=Path, default=None, help="growth: where models and indexes go")
    parser.add_argument("--keep", action="store_true", help="growth: keep each index (default: deleted)")
    parser.add_argument("--table", type=Path, default=None, help="print the tables of a --growth --out file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=Path, default=None, help=argparse.SUPPRESS)
    # the smoke run leaves Ray out (its start alone takes longer than the rest); --growth is scaling_13gb's
    return parse_arguments(
        parser,
        argv,
        rows=8,
        hidden_size=16,
        layers=1,
        sketch_dim=256,
        batch_size=4,
        chunk_size=4,
        repeats=1,
        configurations=["local-1t", "local-2t"],
        out="{smoke}/result.json",
    )


class TimedRunner:
    """Wraps the real runner to time the chunk phase (``run``) and keep the runner for its own timings."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.seconds = 0.0

    def run(self, jobs, write, advance) -> None:
        started = time.perf_counter()
        self.runner.run(jobs, write, advance)
        self.seconds = time.perf_counter() - started


def one_build(name: str, data: Path, index_dir: Path, settings: BuildSettings) -> tuple[dict, np.ndarray]:
    configuration = CONFIGURATIONS[name]
    torch.set_num_threads(configuration["threads"])
    made = {}

    def factory(*args):
        if configuration["workers"] is None:
            runner = LocalChunkRunner(*args)
        else:
            runner = RayChunkRunner(*args, workers=configuration["workers"])
        made["timed"] = TimedRunner(runner)
        return made["timed"]

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    report = build_index(data, index_dir, settings, progress=False, runner_factory=factory)
    wall = time.perf_counter() - started
    timed = made["timed"]
    sample = {
        "wall_seconds": wall,
        "chunk_phase_seconds": timed.seconds,
        "rows": report.rows_indexed,
        "tokens": report.tokens,
        "gradient_dim": report.gradient_dim,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    if isinstance(timed.runner, RayChunkRunner):
        sample["ray_startup_seconds"] = timed.runner.timings["startup_seconds"]
        sample["ray_compute_seconds"] = timed.runner.timings["compute_seconds"]
    manifest = read_manifest(index_dir)
    ids, vectors = index_folder.load_vectors(index_dir, manifest.generation)
    return sample, vectors[np.argsort(ids)]


def summarise(samples: list[dict]) -> dict:
    rows = samples[0]["rows"]
    median = {
        key: statistics.median(s[key] for s in samples) for key in samples[0] if key.endswith("seconds")
    }
    summary = {f"median_{key}": value for key, value in median.items()}
    summary["rows_per_second_wall"] = rows / median["wall_seconds"]
    compute = median.get("ray_compute_seconds", median["chunk_phase_seconds"])
    summary["rows_per_second_compute"] = rows / compute
    summary["tokens_per_second_compute"] = samples[0]["tokens"] / compute
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.table is not None:
        print(growth_tables([json.loads(line) for line in args.table.read_text().splitlines() if line]))
        return {}
    if args.child is not None:
        result = build_child(args) if args.child == "build" else query_child(args)
        print(json.dumps(result))
        return result
    if args.growth is not None:
        return growth(args)
    root = Path(tempfile.mkdtemp(prefix="rapidin-scaling-"))
    rows = load_docstring_rows()[: args.rows]
    data = write_jsonl(rows, root / "train.jsonl")
    texts = [row["instruction"] + " " + row["output"] for row in rows]
    model_dir = save_tiny_model(
        root / "model", "llama", texts, vocab_size=2000, hidden_size=args.hidden_size, layers=args.layers
    )
    settings = BuildSettings(
        ModelSettings(str(model_dir)),
        SketchSettings(args.sketch_dim, 20, 42),
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        device="cpu",
    )
    samples: dict[str, list[dict]] = {name: [] for name in args.configurations}
    reference, largest_error = None, 0.0
    for repeat in range(args.repeats):
        for name in args.configurations:
            sample, vectors = one_build(name, data, root / f"{name}-{repeat}", settings)
            if reference is None:
                reference = vectors
            largest_error = max(largest_error, float(np.abs(vectors - reference).max()))
            assert largest_error <= TOLERANCE, f"{name}: vectors differ by {largest_error}"
            samples[name].append(sample)
            print(f"{name} repeat {repeat}: {json.dumps(sample)}", file=sys.stderr, flush=True)
    results = {
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "ray": __import__("ray").__version__,
        },
        "rows": len(rows),
        "tokens": next(iter(samples.values()))[0]["tokens"],
        "gradient_dim": next(iter(samples.values()))[0]["gradient_dim"],
        "largest_abs_error_vs_first": largest_error,
        "configurations": {name: {**summarise(s), "samples": s} for name, s in samples.items()},
    }
    print(
        json.dumps(
            {n: {k: v for k, v in c.items() if k != "samples"} for n, c in results["configurations"].items()},
            indent=2,
        )
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return results


# --------------------------------------------------------------------------- growth (issue 27 item 4)

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
QUERY = {
    "prompt": "Return the number of items in the list",
    "response": " the length of the list as an integer",
}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def synthetic_rows(count: int, seed: int) -> list[dict]:
    """``count`` prompt/completion rows of about 30 tokens: 5-9 + 10-17 words drawn from the 600 commonest
    alphabetic words of the docstring rows (the tiny tokenizer's own text, so mostly one token a word)."""
    counts: dict[str, int] = {}
    for row in load_docstring_rows():
        for word in (row["instruction"] + " " + row["output"]).split():
            if word.isalpha():
                counts[word] = counts.get(word, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))[:600]
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choice(words, int(rng.integers(5, 10))))
        completion = " " + " ".join(rng.choice(words, int(rng.integers(10, 18))))
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def build_child(args: argparse.Namespace) -> dict:
    """One build in this (fresh) process: wall time, the report's counts, this process's memory."""
    torch.set_num_threads(1)
    settings = BuildSettings(
        ModelSettings(str(args.model)),
        SketchSettings(args.sketch_dim, 20, 42),
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        device="cpu",
    )
    before = memory()
    started = time.perf_counter()
    report = build_index(args.data, args.index, settings, progress=False)
    wall = time.perf_counter() - started
    manifest = read_manifest(args.index)
    return {
        "build_s": wall,
        "rows": report.rows_indexed,
        "tokens": report.tokens,
        "gradient_dim": report.gradient_dim,
        "algorithm": manifest.sketch["algorithm"],
        "vector_dtype": manifest.vector_dtype,
        "before": before,
        "end": memory(),
    }


def time_open_stages() -> dict:
    """Time the parts of `Index.open` (patched in for this process): {stage: seconds}, filled as they run:
    check_files (the xxh3 check of every file, or its stat), check_tokenizer, load_model, open_vectors
    (the vectors file mapped, its ids read), open_rows (the LanceDB table)."""
    from rapidin_index import retrieval
    from rapidin_index.store import index_folder

    stages = {}

    def timed(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            value = real(*args, **kwargs)
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - started
            return value

        setattr(module, name, wrapper)

    for module, name in [
        (retrieval, "check_files"),
        (retrieval, "check_tokenizer"),
        (retrieval, "load_model"),
    ]:
        timed(module, name)
    for name in ("open_vectors", "open_rows"):
        timed(index_folder, name)
    return stages


def query_child(args: argparse.Namespace) -> dict:
    """Open the index and run one whole-generation query twice in this (fresh) process, stage by stage."""
    from rapidin_index import retrieval

    torch.set_num_threads(1)
    stages = time_open_stages()
    result = {"before": memory()}
    started = time.perf_counter()
    index = retrieval.Index.open(args.index, device="cpu")
    result["open_s"] = time.perf_counter() - started
    result["model_load_s"] = stages["load_model"]
    result["open_stages"] = stages
    result["after_open"] = memory()
    for run in ("first", "second"):
        stages = {}
        started = time.perf_counter()
        prepared = [index.prepare(QUERY["prompt"], QUERY["response"])]
        vectors, losses = retrieval.sketch_queries(index, prepared, per_token=False)
        stages["sketch_s"] = time.perf_counter() - started
        started = time.perf_counter()
        found = retrieval.search(index, vectors, 10)
        stages["search_s"] = time.perf_counter() - started
        started = time.perf_counter()
        results = retrieval.collect_results(index, prepared, found, losses, 10, 5, False)
        retrieval.join_text(index, results)
        stages["join_s"] = time.perf_counter() - started
        assert len(results[0].helpful) == 10 and results[0].helpful[0].response, "a query found no text"
        result[run] = stages
    result["end"] = memory()
    return result


def run_growth_child(args: argparse.Namespace, mode: str, **paths) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--sketch-dim", str(args.sketch_dim)]
    command += ["--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size)]
    for name, path in paths.items():
        command += [f"--{name}", str(path)]
    if getattr(
        args, "smoke", False
    ):  # a smoke run: the same child, from the same command line, in this process
        child = parse_args(command[2:])
        result = build_child(child) if mode == "build" else query_child(child)
        return json.loads(json.dumps(result)) | {"process_s": 0.0, "load_average": [os.getloadavg()[0]] * 2}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    finished = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, check=False
    )
    if finished.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started  # imports included
    result["load_average"] = [load_before, os.getloadavg()[0]]
    return result


def growth(args: argparse.Namespace) -> dict:
    """Each size: a fresh build process, then two fresh query processes; one JSON line per size."""
    root = Path(tempfile.mkdtemp(prefix="rapidin-growth-", dir=args.folder))
    model_dir = root / "model"
    texts = [r["instruction"] + " " + r["output"] for r in load_docstring_rows()]
    save_tiny_model(
        model_dir, "llama", texts, vocab_size=2000, hidden_size=args.hidden_size, layers=args.layers
    )
    results = []
    for rows in (int(size) for size in args.growth.split(",")):
        data = write_jsonl(synthetic_rows(rows, seed=rows), root / f"train-{rows}.jsonl")
        index_dir = root / f"index-{rows}"
        entry = {
            "rows": rows,
            "sketch_dim": args.sketch_dim,
            "hidden_size": args.hidden_size,
            "layers": args.layers,
        }
        entry["build"] = run_growth_child(args, "build", data=data, model=model_dir, index=index_dir)
        vectors = next(index_dir.glob("vectors-*"))
        entry["disk"] = {
            "index_bytes": folder_bytes(index_dir),
            "vectors_bytes": vectors.stat().st_size,
            "lancedb_bytes": folder_bytes(index_dir / "metadata"),
            "versions_bytes": sum(folder_bytes(p) for p in index_dir.rglob("_versions") if p.is_dir()),
        }
        entry["query_first_open"] = run_growth_child(args, "query", index=index_dir)
        entry["query_second_open"] = run_growth_child(args, "query", index=index_dir)
        entry["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        print(json.dumps(entry), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as out:
                out.write(json.dumps(entry) + "\n")
        if not args.keep:
            shutil.rmtree(index_dir, ignore_errors=True)
        results.append(entry)
    shutil.rmtree(root, ignore_errors=True) if not args.keep else None
    return {"growth": results}


def growth_tables(results: list[dict]) -> str:
    """The --growth results as Markdown tables (MB = 10^6 bytes)."""
    mb = 1e6
    lines = [
        "| rows | K | tokens/row | build s | ms/row | build peak RSS MB | index MB (vectors / LanceDB / _versions) "
        "| load avg |",
        "|---" * 8 + "|",
    ]
    for e in sorted(results, key=lambda e: (e["rows"], e["sketch_dim"])):
        b, d = e["build"], e["disk"]
        lines.append(
            f"| {e['rows']:,} | {e['sketch_dim']:,} | {b['tokens'] / b['rows']:.1f} | {b['build_s']:,.1f} | {1000 * b['build_s'] / b['rows']:.2f} "
            f"| {b['end']['VmHWM'] / mb:,.0f} | {d['index_bytes'] / mb:,.1f} ({d['vectors_bytes'] / mb:,.1f} / "
            f"{d['lancedb_bytes'] / mb:,.1f} / {d['versions_bytes'] / 1e3:,.1f} kB) "
            f"| {b['load_average'][0]:.1f}-{b['load_average'][1]:.1f} |"
        )
    lines += [
        "",
        "| rows | K | open | open s (tokenizer check; model load; files checked; vectors mapped s) | sketch s | search s | join s | warm: sketch / search / join s "
        "| query peak RSS MB (anon) | process s |",
        "|---" * 10 + "|",
    ]
    for e in sorted(results, key=lambda e: (e["rows"], e["sketch_dim"])):
        for name in ("query_first_open", "query_second_open"):
            q = e[name]
            first, second = q["first"], q["second"]
            stages, nan = q.get("open_stages", {}), float("nan")
            lines.append(
                f"| {e['rows']:,} | {e['sketch_dim']:,} | {'first' if name == 'query_first_open' else 'second'} "
                f"| {q['open_s']:.2f} ({stages.get('check_tokenizer', nan):.2f}; {q['model_load_s']:.2f}; "
                f"{stages.get('check_files', nan):.2f}; "
                f"{stages.get('open_vectors', nan):.4f}) | {first['sketch_s']:.3f} | {first['search_s']:.3f} "
                f"| {first['join_s']:.3f} | {second['sketch_s']:.3f} / {second['search_s']:.3f} / "
                f"{second['join_s']:.3f} | {q['end']['VmHWM'] / mb:,.0f} ({q['end']['RssAnon'] / mb:,.0f}) "
                f"| {q['process_s']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
