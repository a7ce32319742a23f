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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rapidin_index import store
from rapidin_index.build import build_index
from rapidin_index.chunks import LocalChunkRunner
from rapidin_index.demo.datasets import load_docstring_rows, write_jsonl
from rapidin_index.demo.tiny_models import save_tiny_model
from rapidin_index.manifest import read_manifest
from rapidin_index.parallel import RayChunkRunner
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

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
    return parser.parse_args(argv)


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
    ids, vectors = store.load_vectors(index_dir, manifest.generation)
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


if __name__ == "__main__":
    main()
