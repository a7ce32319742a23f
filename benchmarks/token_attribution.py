"""Training-token scores (SPEC 2.4, Eq. 6): each fast method against the brute force, in one run.

For a tiny Llama (full parameters) and the same Llama with a LoRA adapter, one training example of 40
response tokens and a query direction; the methods of `token_attribution.training_token_scores` (jvp,
double-backward, per-token normalisation) and `reference_training_token_scores` (one backward per token)
are first checked equal, then timed interleaved over ``--repeats`` (best of each, torch on one thread).
Ratios to the brute force are what to read (the machine is shared).

    .venv/bin/python benchmarks/token_attribution.py --out .bench/token_attribution.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import parse_arguments

from rapidin_index.capture import gradient_blocks
from rapidin_index.data import IGNORE_INDEX
from rapidin_index.demo.datasets import load_docstring_rows
from rapidin_index.demo.tiny_models import save_lora_adapter, save_tiny_model
from rapidin_index.gradients import normalize_flat, reference_gradient
from rapidin_index.losses import collate
from rapidin_index.models import load_model, select_parameters
from rapidin_index.settings import ModelSettings
from rapidin_index.token_attribution import reference_training_token_scores, training_token_scores


def methods(model, blocks, example, direction) -> dict:
    return {
        "jvp": lambda: training_token_scores(model, blocks, example, direction, method="jvp"),
        "double-backward": lambda: training_token_scores(
            model, blocks, example, direction, method="double-backward"
        ),
        "token (batched)": lambda: training_token_scores(
            model, blocks, example, direction, normalization="token"
        ),
        "brute force": lambda: reference_training_token_scores(model, blocks, example, direction),
    }


def measure(settings: ModelSettings, repeats: int) -> dict:
    model = load_model(settings).model
    blocks = gradient_blocks(select_parameters(model, settings))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, model.config.vocab_size, (50,), generator=generator).tolist()
    example = collate([(input_ids, [IGNORE_INDEX] * 10 + input_ids[10:])], 0, "cpu")  # 40 response tokens
    flat = normalize_flat(reference_gradient(model, blocks, example)[None], blocks, "layer")[0]
    direction = [flat[block.offset : block.offset + block.numel] for block in blocks]
    runs = methods(model, blocks, example, direction)
    reference = torch.tensor(runs["brute force"]().scores)
    for name in ("jvp", "double-backward"):
        found = torch.tensor(runs[name]().scores)
        scale = float(reference.abs().max())
        assert torch.allclose(found, reference, rtol=1e-4, atol=1e-4 * scale), (
            f"{name} differs from brute force"
        )
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    return {
        "seconds": best,
        "over_brute_force": {name: value / best["brute force"] for name, value in best.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parse_arguments(parser, repeats=1, out="{smoke}/result.json")
    torch.set_num_threads(1)
    rows = load_docstring_rows()[:200]
    texts = [row["instruction"] + " " + row["output"] for row in rows]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        model_dir = save_tiny_model(Path(folder) / "llama", "llama", texts, vocab_size=400)
        adapter = save_lora_adapter(model_dir, Path(folder) / "lora")
        for name, settings in (
            ("llama", ModelSettings(str(model_dir))),
            ("llama + LoRA", ModelSettings(str(model_dir), str(adapter))),
        ):
            results[name] = measure(settings, args.repeats)
            cells = ", ".join(
                f"{method} {seconds * 1000:.1f} ms ({results[name]['over_brute_force'][method]:.2f}x)"
                for method, seconds in results[name]["seconds"].items()
            )
            print(f"{name}, 40 response tokens: {cells}", file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
