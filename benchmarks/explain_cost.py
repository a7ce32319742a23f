"""What ``--explain N`` costs a query (issue 27 item 5): the 2N hits scored one by one, as before, against
all at once (`token_attribution.score_examples`: one hooked backward and one forward-mode pass), in one run.

For a tiny Llama and for SmolLM2-135M (full parameters, tests/realmodel.py's cached folder): a query
direction from a real row's exact gradient, ``2 * --explain`` training rows (docstrings of the standard
library), both ways timed interleaved over ``--repeats`` (best of each, torch on one thread), and the two
checked equal. The model's own batched forward + backward of the same rows is timed as the floor.

    .venv/bin/python benchmarks/explain_cost.py --out .bench/explain_cost.json
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
from rapidin_index.data import tokenize_example
from rapidin_index.demo.datasets import load_docstring_rows
from rapidin_index.demo.tiny_models import save_tiny_model
from rapidin_index.gradients import normalize_flat, reference_gradient
from rapidin_index.losses import collate, example_losses
from rapidin_index.models import load_model, select_parameters
from rapidin_index.settings import ModelSettings
from rapidin_index.token_attribution import score_examples, training_token_scores


def measure(folder: str, explain: int, repeats: int) -> dict:
    loaded = load_model(ModelSettings(folder))
    model, tokenizer = loaded.model, loaded.tokenizer
    blocks = gradient_blocks(select_parameters(model, ModelSettings(folder)))
    rows = load_docstring_rows()[: 2 * explain + 1]
    pairs = [tokenize_example(r["instruction"], r["output"], tokenizer, max_length=128)[:2] for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    query = collate([pairs[0]], pad, "cpu")
    flat = normalize_flat(reference_gradient(model, blocks, query)[None], blocks, "layer")[0]
    direction = [flat[block.offset : block.offset + block.numel] for block in blocks]
    hits = pairs[1:]

    def one_by_one():
        return [training_token_scores(model, blocks, collate([hit], pad, "cpu"), direction) for hit in hits]

    def batched():
        return score_examples(model, blocks, hits, direction, "layer", pad)

    def floor():
        losses = example_losses(model, collate(hits, pad, "cpu"))
        torch.autograd.grad(losses.sum(), [block.parameter for block in blocks])

    for slow, fast in zip(one_by_one(), batched(), strict=True):
        difference = (torch.tensor(fast.scores) - torch.tensor(slow.scores)).abs().max()
        assert float(difference) <= 1e-3 * float(torch.tensor(slow.scores).abs().max()) + 1e-6, difference
    best = {"one by one": float("inf"), "batched": float("inf"), "floor": float("inf")}
    for _ in range(repeats):
        for name, run in (("one by one", one_by_one), ("batched", batched), ("floor", floor)):
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    tokens = sum(len(ids) for ids, _ in hits)
    return {
        "parameters": sum(block.numel for block in blocks),
        "hits": len(hits),
        "tokens": tokens,
        "seconds": best,
        "speedup": best["one by one"] / best["batched"],
        "batched_over_floor": best["batched"] / best["floor"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explain", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--out", type=Path)
    # the smoke run: the tiny Llama alone (SmolLM2 is the cached real model)
    arguments = parse_arguments(parser, explain=1, repeats=1, models="tiny", out="{smoke}/result.json")
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in arguments.models.split(","):
            if name == "tiny":
                texts = [r["instruction"] + " " + r["output"] for r in load_docstring_rows()[:200]]
                folder = str(save_tiny_model(Path(scratch) / "tiny", "llama", texts, hidden_size=64))
            else:
                sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
                from realmodel import smollm2_folder

                folder = str(smollm2_folder())
            results[name] = measure(folder, arguments.explain, arguments.repeats)
            print(name, json.dumps(results[name]), flush=True)
    if arguments.out:
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        arguments.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
