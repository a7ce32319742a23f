"""Build throughput: rapidin-index's batched gradient sketcher against the paper's loop and the model's floor.

On a tiny Llama built in-process (and a rank-8 LoRA adapter on it), over the same tokenized rows, in one
run with the repeats interleaved, this times:

(a)  reference  the paper's code path: per example one backward, the full flattened gradient
                (``reference_gradient``), layer-normalised (``normalize_flat``), compressed with the literal
                RapidGrad ``reference_sketch`` (which re-derives its shuffle plan and sign vector each call);
(a*) same loop, with the shuffle plan and sign vector built once, as the paper's code keeps them in memory;
(b)  batched    ``GradientSketcher.sketch`` over batches, with the fast ``RapidGradV1Projector``;
(c)  floor      the model's own batched forward + backward of the summed loss, nothing else.

Before timing, (b)'s and (a*)'s vectors on the first batch must equal (a)'s within 1e-4; that batch is also
every method's warm-up, and fills the projector's bin-map cache. A last untimed pass splits (b) into stages.
CPU only; run from the repository root with the package installed (``make bench``) or ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import parse_arguments

from rapidin_index import gradients as gradients_module
from rapidin_index.capture import gradient_blocks, gradient_dim
from rapidin_index.data import Template, render_row, tokenize_example
from rapidin_index.demo.datasets import member_rows
from rapidin_index.demo.tiny_models import save_lora_adapter, save_tiny_model
from rapidin_index.gradients import GradientSketcher, normalize_flat, reference_gradient
from rapidin_index.losses import Batch, collate, example_losses
from rapidin_index.models import ModelSettings, load_model, select_parameters
from rapidin_index.settings import SketchSettings
from rapidin_index.sketch import make_projector, reference_sketch
from rapidin_index.sketch.hashed import padded_dim
from rapidin_index.sketch.hashing import rademacher_signs
from rapidin_index.sketch.v1 import shuffle_plan

LLAMA_2_7B_PARAMETERS = 6_738_415_616
TOLERANCE = 1e-4
METHODS = {
    "reference": "(a) reference loop",
    "reference_cached": "(a*) reference loop, plan + signs kept",
    "batched": "(b) rapidin-index batched",
    "floor": "(c) floor: batched fwd+bwd",
}
STAGES = ("forward_backward_with_hooks", "per_example_gradients", "normalise", "project")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128, help="training rows to time (at most 592)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch for (b) and (c)")
    parser.add_argument("--sketch-dim", type=int, default=65536, help="K, the RapidGrad length")
    parser.add_argument("--hidden-size", type=int, default=128, help="tiny Llama hidden size")
    parser.add_argument("--layers", type=int, default=4, help="tiny Llama layers")
    parser.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary size (at most)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    parser.add_argument(
        "--adapter", action=argparse.BooleanOptionalAction, default=True, help="also time a LoRA adapter"
    )
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 by default: 2 threads on a busy 2-core machine spin and vary 5-30x",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parse_arguments(
        parser,
        argv,
        rows=8,
        batch_size=4,
        sketch_dim=256,
        hidden_size=16,
        layers=1,
        vocab_size=300,
        repeats=1,
        out="{smoke}/result.json",
    )


# --------------------------------------------------------------------------- data and model


def docstring_rows(count: int) -> list[dict]:
    """Alpaca rows from the standard library's docstrings: real human-written text, shipped offline."""
    import collections
    import itertools
    import json as json_module
    import math
    import os
    import re
    import string

    owners = (
        str,
        list,
        dict,
        set,
        bytes,
        collections.OrderedDict,
        json_module,
        os,
        itertools,
        math,
        re,
        string,
    )
    rows = member_rows(owners, count, 240)
    if len(rows) < count:
        raise SystemExit(f"only {len(rows)} docstring rows are available; pass --rows {len(rows)} or fewer")
    return rows


def tokenized_rows(rows: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row: alpaca prompt masked with -100, response + EOS in the loss."""
    template = Template("alpaca")
    sequences = []
    for row in rows:
        prompt, response = render_row(row, tokenizer, template)
        input_ids, labels, _ = tokenize_example(prompt, response, tokenizer, max_length=None)
        sequences.append((input_ids, labels))
    return sequences


def build_model(folder: Path, rows: list[dict], args: argparse.Namespace) -> Path:
    texts = [" ".join(render_row(row, None, Template("alpaca"))) for row in rows]  # alpaca needs no tokenizer
    return save_tiny_model(
        folder / "llama", "llama", texts, args.vocab_size, hidden_size=args.hidden_size, layers=args.layers
    )


# --------------------------------------------------------------------------- the methods


class CachedReferenceSketch:
    """``reference_sketch`` with its permutations and O(D) sign vector built once, as the paper's code does."""

    def __init__(self, settings: SketchSettings, dim: int) -> None:
        self.sketch_dim = settings.sketch_dim
        self.total = padded_dim(dim, settings.sketch_dim)
        plan = shuffle_plan(self.total, settings.shuffle_lambda, settings.seed)
        self.steps = [(step.axis, step.divisor, torch.as_tensor(step.permutation)) for step in plan]
        self.signs = rademacher_signs(torch.arange(self.total, dtype=torch.int64), settings.seed)  # [total]

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        batch, dim = vectors.shape
        shuffled = torch.nn.functional.pad(vectors, (0, self.total - dim))  # [batch, total]
        for axis, divisor, permutation in self.steps:
            if axis == "row":
                shuffled = shuffled.reshape(batch, divisor, -1)[:, permutation, :]
            else:
                shuffled = shuffled.reshape(batch, -1, divisor)[:, :, permutation]
            shuffled = shuffled.reshape(batch, self.total)
        return (shuffled * self.signs).reshape(batch, self.sketch_dim, -1).sum(dim=2)  # [batch, K]


def run_reference(model, blocks, singles: list[Batch], sketch: Callable[[torch.Tensor], torch.Tensor]):
    """(a) / (a*): one backward per example, full gradient materialised, layer-normalised, literal RapidGrad."""
    vectors = []
    for single in singles:
        flat = reference_gradient(model, blocks, single)  # [D]
        normalised = normalize_flat(flat[None], blocks, "layer")  # [1, D]
        vectors.append(sketch(normalised))  # [1, K]
    return torch.cat(vectors)


def run_batched(sketcher: GradientSketcher, batches: list[Batch]) -> torch.Tensor:
    """(b) rapidin-index: one hooked forward + backward per batch, per-example grads sketched block by block."""
    return torch.cat([sketcher.sketch(batch).vectors for batch in batches])


def run_floor(model, batches: list[Batch]) -> None:
    """(c) the model's own batched forward + backward of the summed loss."""
    for batch in batches:
        model.zero_grad(set_to_none=True)
        example_losses(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def stage_breakdown(sketcher: GradientSketcher, batches: list[Batch]) -> dict[str, float]:
    """Seconds per stage of (b) over all batches, by wrapping the stages' entry points (an untimed pass).

    Wraps ``capture.example_gradients`` (per-example gradients from the hooks), ``projector.project_block``
    (bin/sign lookup + scatter into K bins) and the private ``_SketchState.add`` (finiteness, norms,
    normalise, then project); what is left of the total is the hooked forward + backward.
    """
    seconds = {"per_example_gradients": 0.0, "normalise": 0.0, "project": 0.0}

    def wrap(function, stage):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            seconds[stage] += time.perf_counter() - start
            return result

        return wrapper

    original_add = gradients_module._SketchState.add
    sketcher.capture.example_gradients = wrap(sketcher.capture.example_gradients, "per_example_gradients")
    sketcher.projector.project_block = wrap(sketcher.projector.project_block, "project")
    gradients_module._SketchState.add = wrap(original_add, "normalise")
    try:
        total = timed(lambda: run_batched(sketcher, batches))
    finally:
        gradients_module._SketchState.add = original_add
        del sketcher.capture.example_gradients, sketcher.projector.project_block  # back to the methods
    seconds["normalise"] -= seconds["project"]  # add() = normalise + project
    seconds["forward_backward_with_hooks"] = total - sum(seconds.values())
    return {"total": total, **seconds}


# --------------------------------------------------------------------------- one model


def measure(settings: ModelSettings, rows: list[dict], args: argparse.Namespace, label: str) -> dict:
    loaded = load_model(settings)
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    blocks = gradient_blocks(select_parameters(model, settings))
    dim = gradient_dim(blocks)
    sketch_settings = SketchSettings(
        sketch_dim=args.sketch_dim, algorithm="rapidgrad-v1"
    )  # (a*) is v1-literal
    sketcher = GradientSketcher(model, blocks, make_projector(sketch_settings, dim), normalize="layer")
    cached_sketch = CachedReferenceSketch(sketch_settings, dim)

    sequences = tokenized_rows(rows, loaded.tokenizer)
    tokens = sum(len(ids) for ids, _ in sequences)  # non-pad input tokens, prompt + response
    step = args.batch_size
    batches = [collate(sequences[i : i + step], pad_id, "cpu") for i in range(0, len(sequences), step)]
    singles = [collate([sequence], pad_id, "cpu") for sequence in sequences]

    # Correctness on the first batch, which is also every method's warm-up (and fills the bin-map cache).
    expected = run_reference(
        model, blocks, singles[: batches[0].size], lambda v: reference_sketch(v, sketch_settings)
    )
    cached = run_reference(model, blocks, singles[: batches[0].size], cached_sketch)
    error = float((run_batched(sketcher, batches[:1]) - expected).abs().max())
    assert error <= TOLERANCE, f"{label}: batched sketch differs from the reference by {error:.2e}"
    assert float((cached - expected).abs().max()) <= TOLERANCE, f"{label}: cached reference sketch differs"
    run_floor(model, batches[:1])

    runners = {
        "reference": lambda: run_reference(
            model, blocks, singles, lambda v: reference_sketch(v, sketch_settings)
        ),
        "reference_cached": lambda: run_reference(model, blocks, singles, cached_sketch),
        "batched": lambda: run_batched(sketcher, batches),
        "floor": lambda: run_floor(model, batches),
    }
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.repeats):
        for name in METHODS:  # interleaved, so that machine noise hits every method alike
            times[name].append(timed(runners[name]))
            print(f"  {label} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    summary = summarise(times, len(sequences), tokens)
    return {
        "label": label,
        "uses_hooks": sketcher.uses_hooks,
        "gradient_dim": dim,
        "sketch_dim": args.sketch_dim,
        "padded_dim": padded_dim(dim, args.sketch_dim),
        "compression_ratio": dim / args.sketch_dim,
        "rows": len(sequences),
        "tokens": tokens,
        "max_abs_error_first_batch": error,
        **summary,
        "batched_stages_seconds": stage_breakdown(sketcher, batches),
    }


def summarise(times: dict[str, list[float]], rows: int, tokens: int) -> dict:
    medians = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}  # noise on a shared machine only adds time
    return {
        "seconds": times,
        "median_seconds": medians,
        "tokens_per_second": {name: tokens / seconds for name, seconds in medians.items()},
        "rows_per_second": {name: rows / seconds for name, seconds in medians.items()},
        "speedup_over_reference": medians["reference"] / medians["batched"],
        "speedup_over_reference_cached": medians["reference_cached"] / medians["batched"],
        "fraction_of_floor": medians["floor"] / medians["batched"],
        "speedup_over_reference_cached_best": best["reference_cached"] / best["batched"],
        "fraction_of_floor_best": best["floor"] / best["batched"],
    }


# --------------------------------------------------------------------------- report


def compression_7b(sketch_dim: int) -> dict:
    total = padded_dim(LLAMA_2_7B_PARAMETERS, sketch_dim)
    return {
        "gradient_dim": LLAMA_2_7B_PARAMETERS,
        "sketch_dim": sketch_dim,
        "padded_dim": total,
        "compression_ratio": LLAMA_2_7B_PARAMETERS / sketch_dim,
        "bin_width": total // sketch_dim,
        "bytes_per_row_fp32": 4 * sketch_dim,
        "bytes_per_row_fp16": 2 * sketch_dim,
        "full_gradient_bytes_fp32": 4 * LLAMA_2_7B_PARAMETERS,
    }


def speed_table(results: dict) -> list[str]:
    lines = [
        "| model | method | seconds (median) | tokens/s | rows/s | (b) speed-up over it | share of floor speed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model in results["models"]:
        medians = model["median_seconds"]
        for name, title in METHODS.items():
            seconds = medians[name]
            lines.append(
                f"| {model['label']} | {title} | {seconds:.2f} | {model['tokens_per_second'][name]:,.0f} "
                f"| {model['rows_per_second'][name]:.1f} | {seconds / medians['batched']:.1f}x "
                f"| {medians['floor'] / seconds:.2f} |"
            )
    lines.append("")
    for model in results["models"]:
        lines.append(
            f"- {model['label']}, best of the repeats instead of the median: (b) is "
            f"{model['speedup_over_reference_cached_best']:.1f}x (a*) and {model['fraction_of_floor_best']:.2f} "
            "of the floor's speed."
        )
    return lines


def compression_table(results: dict) -> list[str]:
    lines = [
        "| model | D | K | padded D | D/K | bytes/row fp32 | bytes/row fp16 | max abs error (b) vs (a) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in results["models"]:
        k = model["sketch_dim"]
        lines.append(
            f"| {model['label']} | {model['gradient_dim']:,} | {k:,} | {model['padded_dim']:,} "
            f"| {model['compression_ratio']:.2f} | {4 * k:,} | {2 * k:,} | {model['max_abs_error_first_batch']:.1e} |"
        )
    big = results["compression_7b"]
    lines.append(
        f"| Llama-2-7B full (computed) | {big['gradient_dim']:,} | {big['sketch_dim']:,} | {big['padded_dim']:,} "
        f"| {big['compression_ratio']:,.0f} | {big['bytes_per_row_fp32']:,} | {big['bytes_per_row_fp16']:,} | - |"
    )
    return lines


def stage_table(results: dict) -> list[str]:
    lines = [
        "| model | (b) total s | hooked forward+backward | per-example grads | normalise | project |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model in results["models"]:
        stages = model["batched_stages_seconds"]
        parts = [f"{stages[key]:.2f} ({stages[key] / stages['total']:.0%})" for key in STAGES]
        lines.append(f"| {model['label']} | {stages['total']:.2f} | " + " | ".join(parts) + " |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = docstring_rows(args.rows)
    results = {
        "command": " ".join(["benchmarks/build_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "settings": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "models": [],
        "compression_7b": compression_7b(args.sketch_dim),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_folder = build_model(Path(tmp), rows, args)
        results["models"].append(measure(ModelSettings(str(model_folder)), rows, args, "full model"))
        if args.adapter:
            adapter = save_lora_adapter(model_folder, Path(tmp) / "lora", rank=args.lora_rank)
            settings = ModelSettings(str(model_folder), adapter=str(adapter))
            results["models"].append(measure(settings, rows, args, f"LoRA r={args.lora_rank}"))
    print("\n".join([*speed_table(results), "", *compression_table(results), "", *stage_table(results)]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
