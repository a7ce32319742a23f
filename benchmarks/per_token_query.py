"""Per-token query cost: one forward + batched backward passes, against one truncated copy per token.

For a LoRA GPT-2 and a full-parameter tiny Llama (about 5M parameters), an index of ``--rows`` docstring
rows is built once; then, interleaved over ``--repeats`` (medians reported, torch on one thread), one
query with a ``--tokens``-token response is timed three ways:

* ``whole``      ``Index.query(..., per_token=False)``: the whole-generation vector only;
* ``per-token``  ``Index.query(...)``: whole + one vector per generated token from one forward pass and
                 batched backward passes (``rapidin_index.token_gradients``);
* ``copies``     the previous method, kept here as the reference: one sequence copy per generated token,
                 cut at the token and carrying its label alone, sketched in batches of 16, then searched.

Before timing, the per-token vectors of both methods are checked equal. Ratios are per model, one run.

    .venv/bin/python benchmarks/per_token_query.py --out .bench/per_token_query.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from build_throughput import docstring_rows
from common import parse_arguments

from rapidin_index import Index, SketchSettings, build_index, retrieval
from rapidin_index.demo.tiny_models import save_lora_adapter, save_tiny_model
from rapidin_index.losses import collate
from rapidin_index.settings import BuildSettings, ModelSettings
from rapidin_index.store import vector_index


def copies_method(index: Index, prepared, top_k: int, batch_size: int = 16) -> np.ndarray:
    """The old per-token path: one cut copy per token with its label alone, sketched in batches."""
    sequences = [(prepared.input_ids, prepared.labels_for(prepared.hot_positions))]
    sequences += [
        (prepared.input_ids[: p + 1], prepared.labels_for([p])[: p + 1]) for p in prepared.response_positions
    ]
    vectors = []
    for start in range(0, len(sequences), batch_size):
        batch = collate(
            sequences[start : start + batch_size], index.loaded.tokenizer.pad_token_id, index.device
        )
        vectors.append(index.sketcher.sketch(batch).vectors.cpu().numpy())
    vectors = np.concatenate(vectors)
    vector_index.search_both(index.faiss_index, vectors, top_k)
    return vectors


def setting(name: str, folder: Path, rows: list[dict], smoke: bool = False) -> tuple[ModelSettings, str]:
    texts = [row["instruction"] + " " + row["output"] for row in rows]
    if smoke:  # both code paths (GPT-2 + LoRA, a full Llama) on 16-wide one-layer models
        model_dir = save_tiny_model(
            folder / name, name[:5].rstrip("-"), texts, vocab_size=300, hidden_size=16, layers=1
        )
        adapter = save_lora_adapter(model_dir, folder / "lora", rank=2) if name == "gpt2-lora" else None
        return ModelSettings(str(model_dir), adapter and str(adapter)), f"smoke {name}"
    if name == "gpt2-lora":
        model_dir = save_tiny_model(folder / "gpt2", "gpt2", texts, vocab_size=2000, hidden_size=64, layers=2)
        adapter = save_lora_adapter(model_dir, folder / "gpt2-lora", rank=8)
        return ModelSettings(str(model_dir), str(adapter)), "GPT-2 64x2 + LoRA r=8 (c_attn, c_fc)"
    model_dir = save_tiny_model(folder / "llama", "llama", texts, vocab_size=2000, hidden_size=256, layers=6)
    return ModelSettings(str(model_dir)), "Llama 256x6, full parameters"


def measure(name: str, folder: Path, rows: list[dict], args) -> dict:
    model, label = setting(name, folder, rows, args.smoke)
    index_dir = folder / f"index-{name}"
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_index(
        data,
        index_dir,
        BuildSettings(model, SketchSettings(args.sketch_dim, algorithm=args.algorithm), device="cpu"),
        progress=False,
    )
    index = Index.open(index_dir, device="cpu")
    tokenizer = index.loaded.tokenizer
    long_text = " ".join(row["output"] for row in rows[:20])
    response_ids = tokenizer(long_text, add_special_tokens=False).input_ids[: args.tokens - 1]
    response = tokenizer.decode(response_ids)
    prompt = rows[0]["instruction"]
    prepared = index.prepare(prompt, response)
    # the per-token vectors of both methods must agree before anything is timed
    vectors, _ = retrieval.sketch_queries(index, [prepared], per_token=True)
    reference = copies_method(index, prepared, args.top_k)
    error = float(np.abs(vectors - reference).max() / np.abs(reference).max())
    assert error < 1e-4, f"{name}: per-token vectors differ from the copies method by {error:.2e}"
    runs = {
        "whole": lambda: index.query(prompt, response, top_k=args.top_k, explain=0, per_token=False),
        "per-token": lambda: index.query(prompt, response, top_k=args.top_k, explain=0),
        "copies": lambda: copies_method(index, prepared, args.top_k),
    }
    times = {method: [] for method in runs}
    for _ in range(args.repeats):
        for method, run in runs.items():
            start = time.perf_counter()
            run()
            times[method].append(time.perf_counter() - start)
            print(f"  {name} {method}: {times[method][-1]:.3f} s", file=sys.stderr)
    medians = {method: statistics.median(values) for method, values in times.items()}
    return {
        "setting": name,
        "model": label,
        "attributed_parameters": index.manifest.parameters["gradient_dim"],
        "rows": index.manifest.row_count,
        "sketch_dim": args.sketch_dim,
        "algorithm": index.manifest.sketch["algorithm"],
        "generated_tokens": len(prepared.response_positions),
        "max_relative_difference": error,
        "seconds": medians,
        "per_token_over_whole": medians["per-token"] / medians["whole"],
        "copies_over_per_token": medians["copies"] / medians["per-token"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--sketch-dim", type=int, default=4096)
    parser.add_argument(
        "--algorithm", default="auto", help="sketch algorithm of the index (auto, rapidgrad-v2, ...)"
    )
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default="gpt2-lora,llama-full")
    parser.add_argument("--out", default=".bench/per_token_query.json")
    args = parse_arguments(parser, rows=8, tokens=4, sketch_dim=256, repeats=1, out="{smoke}/result.json")
    torch.set_num_threads(1)
    rows = docstring_rows(args.rows)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.settings.split(","):
            results.append(measure(name, Path(folder), rows, args))
    print(
        "| setting | D | tokens | whole s | per-token s | copies s | per-token / whole | copies / per-token |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["seconds"]
        print(
            f"| {r['model']} | {r['attributed_parameters']:,} | {r['generated_tokens']} | {s['whole']:.3f} | "
            f"{s['per-token']:.3f} | {s['copies']:.3f} | {r['per_token_over_whole']:.2f} | "
            f"{r['copies_over_per_token']:.2f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))


if __name__ == "__main__":
    main()
