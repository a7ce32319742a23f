"""Open-time cost of verifying an index's files (issue 25, item 1), as ratios measured in one run.

For each row count (default 131,072 and 8,192) at K = 4096 float32, random unit vectors are written with the
project's own writer (`index_folder.write_generation`: the FAISS file, a LanceDB table of short rows, the rejected
file; 131,072 x 4096 x 4 bytes = 2 GiB of vectors), then each check ``Index.open`` (or ``--verify``) can
run is timed over the manifest's files:

* ``sha256``       ``manifest.verify_files``: every file's sha256 (``query --verify``, import);
* ``xxh3 cold``    ``verify.check_files`` with no stamps, after the files' pages were dropped from the page
                   cache (``posix_fadvise(DONTNEED)``): hashing read from disk (the first open);
* ``xxh3 cached``  the same with the pages in the cache (the first open right after a build or import);
* ``stamps``       ``verify.check_files`` with fresh stamps (every later open: a stat per file);
* ``faiss load``   ``faiss.read_index`` of the vectors file, which every open pays anyway (the reference).

Each is the median of ``--repeats`` runs, interleaved. RAM stays under about 3.3 GB (the FAISS index grows
by doubling while the vectors are added in blocks). CPU only, one thread:
``.venv/bin/python benchmarks/open_verify.py --folder .bench/open-verify --out .bench/open-verify.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
from common import parse_arguments

from rapidin_index.store import index_folder, vector_index, verify
from rapidin_index.store.manifest import verify_files

BLOCK_ROWS = 8192


def write_index(folder: Path, rows: int, dimension: int) -> SimpleNamespace:
    """A generation-1 index folder of ``rows`` random unit vectors; returns a manifest-like namespace."""
    generator = np.random.default_rng(0)
    faiss_index = vector_index.new_index(dimension)
    for start in range(0, rows, BLOCK_ROWS):
        block = generator.standard_normal((min(BLOCK_ROWS, rows - start), dimension), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)  # [rows, K]
        vector_index.add_vectors(faiss_index, block, np.arange(start, start + len(block)))
    text = [
        {
            "id": i, "source": json.dumps({"text": f"row {i}"}), "prompt": f"prompt {i}",
            "response": f"response {i}", "num_tokens": 8, "num_response_tokens": 4, "truncated": False,
            "loss": 1.0, "gradient_norm": 1.0, "content_hash": f"{i:064x}",
        }
        for i in range(rows)
    ]  # fmt: skip
    started = time.perf_counter()
    files = index_folder.write_generation(folder, 1, faiss_index, [text], [])
    return SimpleNamespace(files=files, generation=1, write_seconds=time.perf_counter() - started)


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the files' cached pages (clean pages after fsync; no root needed)."""
    for path in [folder, *folder.rglob("*")]:
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def measure(folder: Path, manifest, repeats: int) -> dict:
    stamps = folder / verify.STAMP_NAME

    def cold():
        stamps.unlink(missing_ok=True)
        drop_page_cache(folder)
        started = time.perf_counter()
        verify.check_files(folder, manifest)
        return time.perf_counter() - started

    def cached():
        stamps.unlink(missing_ok=True)
        verify.check_files(folder, manifest)

    def faiss_load():
        faiss.read_index(str(folder / index_folder.vector_file(1)))  # freed on return

    checks = {
        "sha256": lambda: verify_files(folder, manifest),
        "xxh3 cached": cached,
        "stamps": lambda: verify.check_files(folder, manifest),  # after "xxh3 cached" wrote them
        "faiss load": faiss_load,
    }
    samples = {name: [] for name in ["xxh3 cold", *checks]}
    for _ in range(repeats):
        samples["xxh3 cold"].append(cold())
        for name, check in checks.items():
            started = time.perf_counter()
            check()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="131072,8192", help="comma-separated row counts")
    parser.add_argument("--dimension", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path(".bench/open-verify"))
    parser.add_argument("--out", type=Path, default=None)
    args = parse_arguments(
        parser, rows="256", dimension=64, repeats=1, folder="{smoke}/open-verify", out="{smoke}/result.json"
    )
    faiss.omp_set_num_threads(1)
    results = []
    for rows in [int(value) for value in args.rows.split(",")]:
        folder = args.folder / f"rows-{rows}"
        shutil.rmtree(folder, ignore_errors=True)
        manifest = write_index(folder, rows, args.dimension)
        seconds = measure(folder, manifest, args.repeats)
        size = sum(entry["bytes"] for entry in manifest.files.values())
        results.append({"rows": rows, "dimension": args.dimension, "bytes": size, "seconds": seconds})
        print(
            f"\n{rows:,} rows x K={args.dimension} ({size / 2**30:.2f} GiB); write {manifest.write_seconds:.2f} s"
        )
        reference = seconds["faiss load"]
        for name, value in seconds.items():
            print(f"  {name:12s} {value * 1000:10.1f} ms   {value / reference:8.4f} x faiss load")
        shutil.rmtree(folder)
    report = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
