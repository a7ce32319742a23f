"""Per-token query cost against the response length: 50, 200, 800 generated tokens, time and peak memory.

A per-token query (SPEC 2.4, Eq. 7) needs the gradient of every generated token's own loss. They come
from one forward pass and batched backward passes of ``token_gradients.ROWS_PER_PASS`` weight rows each
(``rapidin_index.token_gradients``): ceil((1 + T) / 32) passes, each a backward over the whole
T-token sequence, so the work grows as T^2 while the memory of a pass stays that of 32 rows. Each
length runs in a fresh process (peak RSS is per process) on a tiny Llama + LoRA index of ``--rows``
docstring rows at K = 4096, torch on one thread; the whole-generation query (``--per-token off``) is
timed beside it in the same process.

    .venv/bin/python benchmarks/per_token_scaling.py --out .bench/per_token_scaling.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the string is converted to upper case and returned as a new copy of the value".split()


def build(folder: Path, rows: int) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from build_throughput import docstring_rows

    from rapidin_index import build_index
    from rapidin_index.demo.tiny_models import save_lora_adapter, save_tiny_model
    from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

    texts = [row["instruction"] + " " + row["output"] for row in docstring_rows(rows)]
    model = save_tiny_model(folder / "model", "llama", texts, vocab_size=400, positions=2048)
    adapter = save_lora_adapter(model, folder / "lora")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in docstring_rows(rows)))
    settings = BuildSettings(ModelSettings(str(model), str(adapter)), SketchSettings(4096), max_length=2048)
    build_index(data, folder / "index", settings, progress=False)
    return folder / "index"


def measure(index_dir: str, tokens: int) -> dict:
    """In this process: one whole-generation and one per-token query of a ``tokens``-token response."""
    import torch

    from rapidin_index.retrieval import Index

    torch.set_num_threads(1)
    index = Index.open(index_dir, device="cpu")
    probe = [WORDS[i % len(WORDS)] for i in range(100)]  # tokens per word of this tokenizer
    labelled = len(index.prepare("What does str.upper do?", " ".join(probe)).response_positions)
    words = [WORDS[i % len(WORDS)] for i in range(round(100 * tokens / labelled))]  # ~ tokens
    prepared = index.prepare("What does str.upper do?", " ".join(words))
    seconds = {}
    for per_token in (False, True):
        started = time.perf_counter()
        index.query_prepared([prepared], 10, 0, per_token=per_token)
        seconds["per-token" if per_token else "whole"] = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"tokens": len(prepared.response_positions), "seconds": seconds, "peak_rss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="50,200,800")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--out", default=".bench/per_token_scaling.json")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # index folder, tokens (child)
    arguments = parser.parse_args()
    if arguments.measure:
        print(json.dumps(measure(arguments.measure[0], int(arguments.measure[1]))))
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        index_dir = build(Path(folder), arguments.rows)
        for length in [int(value) for value in arguments.lengths.split(",")]:
            command = [sys.executable, __file__, "--measure", str(index_dir), str(length)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{length} tokens failed:\n{done.stderr[-2000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    print("| tokens | whole s | per-token s | per-token s / token | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["seconds"]
        print(
            f"| {r['tokens']} | {s['whole']:.2f} | {s['per-token']:.2f} | {s['per-token'] / r['tokens']:.3f} | {r['peak_rss_mib']:.0f} |"
        )
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
