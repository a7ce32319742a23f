"""The GPU check of issue 27 item 6, the Python part of benchmarks/gpu_check.sh (which runs the CUDA tests
first). On one H100 / H200, in under 8 minutes:

1. builds the index of a randomly initialised ~1.2B-parameter Llama (Llama-3.2-1B's shape, bfloat16) on
   ``--rows`` rows, full parameters and with a LoRA adapter, and reports tokens/s against the model's own
   batched forward + backward of the same rows on the same GPU (the floor);
2. sketches a few rows on the GPU and on the CPU (float32, same weights) and compares the vectors;
3. searches a random flat index sharded over every GPU with faiss-gpu against the CPU search (skipped,
   with a line saying so, when faiss has no GPU support);
4. writes a JSON summary (``--out``; the shell script passes ``$OUT/gpu_check.json``).

Without CUDA it says so on one line, writes ``{"skipped": ...}`` and exits 0. ``--cpu-dry-run`` runs every
step on the CPU with a tiny model instead (the test suite's check of this script's own code).

    bash benchmarks/gpu_check.sh [SUMMARY.json]
    .venv/bin/python benchmarks/gpu_check.py --out summary.json [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import parse_arguments

LLAMA_1B = {  # Llama-3.2-1B's shape: 1.24B parameters with its 128,256-token tied embedding
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128_256,
}
TINY = {**LLAMA_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2_000}  # fmt: skip


def save_model(folder: Path, shape: dict, texts: list[str]) -> Path:
    """A random-init Llama of ``shape`` in bfloat16 with a word tokenizer trained on ``texts``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rapidin_index.demo.tiny_models import train_tokenizer

    tokenizer = train_tokenizer(texts, 2000)
    config = LlamaConfig(**shape, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0, dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def write_rows(path: Path, count: int) -> list[dict]:
    from rapidin_index.demo.datasets import load_docstring_rows

    bundled = load_docstring_rows()
    rows = [{"instruction": r["instruction"], "output": r["output"]} for r in bundled]
    rows = (rows * (count // len(rows) + 1))[:count]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def build(folder: Path, data: Path, index: Path, device: str, adapter: Path | None = None) -> dict:
    from rapidin_index.build import build_index
    from rapidin_index.settings import BuildSettings, ModelSettings

    model = ModelSettings(str(folder), adapter=str(adapter) if adapter else None, dtype="bfloat16")
    settings = BuildSettings(model=model, device=device, batch_size=16, max_length=256)
    report = build_index(data, index, settings, progress=False)
    return {
        "rows": report.rows_indexed,
        "tokens": report.tokens,
        "seconds": report.elapsed_seconds,
        "tokens_per_second": report.tokens / max(report.elapsed_seconds, 1e-9),
        "sketch_dim": report.sketch_dim,
        "gradient_dim": report.gradient_dim,
        "exact_path": sorted(report.backward_path),
    }


def batches(loaded, rows: list[dict], batch_size: int, device: str, max_length: int = 256):
    from rapidin_index.data import tokenize_example
    from rapidin_index.losses import collate

    pairs = [
        tokenize_example(r["instruction"], r["output"], loaded.tokenizer, max_length=max_length)[:2]
        for r in rows
    ]
    for start in range(0, len(pairs), batch_size):
        yield collate(pairs[start : start + batch_size], loaded.tokenizer.pad_token_id, device)


def floor(folder: Path, rows: list[dict], device: str, adapter: Path | None = None) -> dict:
    """The model's own batched forward + backward into the attributed tensors: tokens/s."""
    from rapidin_index.losses import example_losses
    from rapidin_index.models import load_model, select_parameters
    from rapidin_index.settings import ModelSettings

    settings = ModelSettings(str(folder), adapter=str(adapter) if adapter else None, dtype="bfloat16")
    loaded = load_model(settings, device)
    parameters = [parameter for _, parameter in select_parameters(loaded.model, settings)]
    every = list(batches(loaded, rows, 16, device))
    torch.autograd.grad(example_losses(loaded.model, every[0]).sum(), parameters)  # warms the kernels up
    _synchronize(device)
    tokens, started = 0, time.perf_counter()
    for batch in every:
        tokens += int(batch.attention_mask.sum())
        torch.autograd.grad(example_losses(loaded.model, batch).sum(), parameters)
    _synchronize(device)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)}


def sketches_agree(folder: Path, rows: list[dict], device: str) -> dict:
    """The same rows sketched on ``device`` and on the CPU, float32 weights: max relative difference."""
    from rapidin_index.capture import gradient_blocks, gradient_dim
    from rapidin_index.gradients import GradientSketcher
    from rapidin_index.models import load_model, select_parameters
    from rapidin_index.settings import ModelSettings, SketchSettings
    from rapidin_index.sketch import make_projector

    vectors = {}
    for where in (device, "cpu"):
        settings = ModelSettings(str(folder), dtype="float32")
        loaded = load_model(settings, where)
        blocks = gradient_blocks(select_parameters(loaded.model, settings))
        projector = make_projector(SketchSettings(), gradient_dim(blocks), where, blocks)
        sketcher = GradientSketcher(loaded.model, blocks, projector)
        batch = next(batches(loaded, rows, len(rows), where, max_length=64))
        vectors[where] = sketcher.sketch(batch).vectors.cpu()
        del loaded, sketcher
    on_device, on_cpu = vectors[device], vectors["cpu"]
    relative = float((on_device - on_cpu).norm(dim=1).max() / on_cpu.norm(dim=1).min())
    scores = on_device @ on_device.T, on_cpu @ on_cpu.T
    return {
        "rows": len(rows),
        "max_relative_vector_difference": relative,
        "max_score_difference": float((scores[0] - scores[1]).abs().max()),
        "agree": relative < 1e-3,
    }


def sharded_search(rows: int = 100_000, dimension: int = 4096) -> dict:
    """A random flat index sharded over every GPU by faiss-gpu against the CPU's exact search."""
    import faiss

    from rapidin_index.parallel import faiss_gpu_count, search_index
    from rapidin_index.store import vector_index

    gpus = faiss_gpu_count()
    if gpus == 0:
        message = "faiss-gpu: skipped, this faiss has no GPU support (pip install faiss-gpu-cu12 to check it)"
        print(message, flush=True)
        return {"skipped": message}
    generator = np.random.default_rng(0)
    vectors = generator.standard_normal((rows, dimension), dtype=np.float32)
    cpu_index = vector_index.new_index(dimension)
    vector_index.add_vectors(cpu_index, vectors, np.arange(rows, dtype=np.int64))
    queries = generator.standard_normal((32, dimension), dtype=np.float32)
    started = time.perf_counter()
    expected = vector_index.search(cpu_index, queries, 10)
    cpu_seconds = time.perf_counter() - started
    gpu_index = search_index(cpu_index)
    vector_index.search(gpu_index, queries, 10)  # warm-up
    started = time.perf_counter()
    found = vector_index.search(gpu_index, queries, 10)
    gpu_seconds = time.perf_counter() - started
    return {
        "gpus": gpus,
        "faiss": faiss.__version__,
        "same_ids": bool(np.array_equal(found[1], expected[1])),
        "max_score_difference": float(np.abs(found[0] - expected[0]).max()),
        "cpu_seconds": cpu_seconds,
        "gpu_seconds": gpu_seconds,
    }


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(rows: int, dry_run: bool, scratch: Path) -> dict:
    from rapidin_index.demo.tiny_models import save_lora_adapter

    device = "cpu" if dry_run else "cuda"
    data = scratch / "rows.jsonl"
    written = write_rows(data, rows)
    texts = [r["instruction"] + " " + r["output"] for r in written[:500]]
    started = time.perf_counter()
    folder = save_model(scratch / "model", TINY if dry_run else LLAMA_1B, texts)
    adapter = save_lora_adapter(folder, scratch / "adapter", rank=16)
    summary = {"device": torch.cuda.get_device_name(0) if not dry_run else "cpu (dry run)", "rows": rows}
    summary["parameters"] = sum(
        p.numel()
        for p in __import__("safetensors.torch").torch.load_file(folder / "model.safetensors").values()
    )
    summary["setup_seconds"] = time.perf_counter() - started
    for name, lora in (("full", None), ("lora", adapter)):
        step = time.perf_counter()
        result = build(folder, data, scratch / f"index-{name}", device, lora)
        result["floor"] = floor(folder, written, device, lora)
        # how many times the floor's time the build takes (1.0: as fast as forward + backward alone)
        result["build_over_floor"] = result["floor"]["tokens_per_second"] / result["tokens_per_second"]
        result["wall_seconds"] = time.perf_counter() - step
        summary[name] = result
        print(f"{name}: {json.dumps(result)}", flush=True)
    summary["gpu_against_cpu"] = sketches_agree(folder, written[:2], device)
    print(f"gpu against cpu: {json.dumps(summary['gpu_against_cpu'])}", flush=True)
    summary["faiss_gpu"] = sharded_search(2_000, 256) if dry_run else sharded_search()
    summary["total_seconds"] = time.perf_counter() - started
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step on the CPU, a tiny model")
    arguments = parse_arguments(parser, cpu_dry_run=True, rows=12, out="{smoke}/result.json")
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    if not arguments.cpu_dry_run and not torch.cuda.is_available():
        message = (
            "gpu_check: skipped, no CUDA device is visible to torch (torch.cuda.is_available() is False)"
        )
        print(message, flush=True)
        arguments.out.write_text(json.dumps({"skipped": message}, indent=2))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        summary = run(arguments.rows, arguments.cpu_dry_run, Path(scratch))
    arguments.out.write_text(json.dumps(summary, indent=2))
    print(f"gpu_check: summary written to {arguments.out}", flush=True)
    return 0 if summary["gpu_against_cpu"]["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
