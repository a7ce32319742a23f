"""Error tracing (the paper's Table 5): find the rows that taught the model a wrong fact.

Capital-city facts mixed with docstring rows; in some rows about one country the capital is swapped for
a wrong one (France -> Tokyo). A tiny Llama is fine-tuned on them; its wrong generation is queried at
sentence level (loss over the whole answer) and token-wise (loss on the wrong entity's tokens only,
``hot=["Tokyo"]``); reported: the share of perturbed rows in the top-k, for RapidIn (K = 2^16), issue 23's
variants (``--variants on``: the build with the fine-tune's optimizer state; the query-side Fisher of
``rapidin-index fit``, on each; the retraining recipe, exact vectors of the nn.Linear weights without layer
norm and ``fit --kind ekfac-weights``), exact TracIn with layer norm (K = 0), BM25 and the share expected by
chance.

    .venv/bin/python benchmarks/error_tracing.py --out .bench/error_tracing.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import LINEAR_PARAMS, SMOKE_MODEL
from common import parse_arguments as parse_with_smoke

from rapidin_index.build import build_index
from rapidin_index.demo.baselines import BM25
from rapidin_index.demo.datasets import make_entity_swap_dataset, write_jsonl
from rapidin_index.demo.finetune import FinetuneSettings, finetune
from rapidin_index.precondition import fit_index
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

TOP_KS = (5, 10, 20)


def share_in_top(ids: list[int], perturbed: set[int], k: int) -> float:
    return sum(1 for i in ids[:k] if i in perturbed) / k


def trace(index: Index, swap, perturbed: set[int], name: str) -> dict:
    """{"name, level": share of perturbed rows in the top k} for the sentence and token-wise queries."""
    sentence = index.query(swap.query_instruction, swap.wrong_response, top_k=max(TOP_KS), explain=0)
    tokenwise = index.query(
        swap.query_instruction, swap.wrong_response, hot=[swap.wrong_entity], top_k=max(TOP_KS), explain=0
    )
    shares = {}
    for level, result in (("sentence", sentence), ("token-wise", tokenwise)):
        ids = [hit.id for hit in result.helpful]
        shares[f"{name}, {level}"] = {f"top{k}": share_in_top(ids, perturbed, k) for k in TOP_KS}
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/error_tracing")
    parser.add_argument(
        "--epochs", type=int, default=10, help="fewer and the model answers Tokyo for every country"
    )
    parser.add_argument("--out", default=".bench/error_tracing.json")
    parser.add_argument(
        "--variants", default="on", choices=("on", "off"), help="issue 23: +optimizer state, +Fisher, +both"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    # the smoke run: 20 docstring rows and fewer facts, a 16-wide one-layer model fine-tuned one epoch, its
    # K = 2^16 indexes built at K = 2^12 (rapidgrad-kron, as K = 2^16 resolves on the real model)
    arguments = parse_with_smoke(parser, folder="{smoke}/error_tracing", out="{smoke}/result.json")
    torch.set_num_threads(arguments.threads)
    folder = Path(arguments.folder)
    smaller = (
        {"rows_per_country": 2, "chosen_country_rows": 8, "docstring_count": 20} if arguments.smoke else {}
    )
    rows, swap = make_entity_swap_dataset(**smaller)
    train_file = write_jsonl(rows, folder / "train.jsonl")
    model_dir = folder / "model"
    if not (model_dir / "config.json").exists():
        settings = (
            FinetuneSettings(**SMOKE_MODEL) if arguments.smoke else FinetuneSettings(epochs=arguments.epochs)
        )
        finetune(rows, model_dir, settings)
    perturbed = set(swap.perturbed_ids)
    results = {}
    generation = None
    variants = [("RapidIn K=2^16", 65536, False), ("TracIn + layer norm (exact)", 0, False)]
    if arguments.variants == "on":
        variants.insert(1, ("+optimizer state, K=2^16", 65536, True))
    for name, sketch_dim, adam in variants:
        index_dir = folder / f"index-{sketch_dim}{'-adam' if adam else ''}"
        state = str(model_dir) if adam else None  # the fine-tune's optimizer.pt
        sketch = SketchSettings(sketch_dim)
        if arguments.smoke and sketch_dim:  # what K = 2^16 resolves to on a real model, at K = 2^12
            sketch = SketchSettings(4096, algorithm="rapidgrad-kron")
        settings = BuildSettings(ModelSettings(str(model_dir)), sketch, batch_size=16, optimizer_state=state)
        build_index(train_file, index_dir, settings, progress=False)
        fisher = arguments.variants == "on" and sketch_dim > 0
        if fisher:
            fit_index(index_dir)  # the query-side Fisher (per tensor under rapidgrad-kron)
        index = Index.open(index_dir, device="cpu")
        generation = generation or index.generate(swap.query_instruction, 16)
        for precondition in ("none", "fisher") if fisher else ("none",):
            index.use_precondition(precondition)
            label = name if precondition == "none" else "+both, K=2^16" if adam else "+Fisher, K=2^16"
            results.update(trace(index, swap, perturbed, label))
    if arguments.variants == "on":
        # the retraining recipe: exact vectors of the nn.Linear weights, no layer norm, ekfac-weights
        from rapidin_index.ekfac_fit import fit_index_weights

        index_dir = folder / "index-0-none-linear"
        settings = BuildSettings(
            ModelSettings(str(model_dir), params=LINEAR_PARAMS),
            SketchSettings(0),
            normalize="none",
            batch_size=16,
        )
        build_index(train_file, index_dir, settings, progress=False)
        fit_index_weights(index_dir, "ekfac-weights")
        index = Index.open(index_dir, device="cpu")
        for precondition in ("none", "ekfac-weights"):
            index.use_precondition(precondition)
            label = "TracIn, no layer norm, nn.Linear (exact)"
            results.update(
                trace(index, swap, perturbed, label + (", +ekfac-weights" if precondition != "none" else ""))
            )
    bm25 = BM25([row["instruction"] + " " + row["output"] for row in rows]).scores(
        swap.query_instruction + " " + swap.wrong_response
    )
    bm25_ids = np.argsort(-bm25, kind="mergesort").tolist()
    results["BM25"] = {f"top{k}": share_in_top(bm25_ids, perturbed, k) for k in TOP_KS}
    results["chance"] = {f"top{k}": len(perturbed) / len(rows) for k in TOP_KS}
    report = {
        "rows": len(rows),
        "perturbed_rows": len(perturbed),
        "swap": swap.to_dict() | {"perturbed_ids": len(swap.perturbed_ids)},
        "model_generation": generation,
        "model_says_wrong_entity": swap.wrong_entity in (generation or ""),
        "results": results,
    }
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    print(
        f"\n{len(rows)} rows, {len(perturbed)} perturbed ({swap.country}: {swap.right_entity} -> {swap.wrong_entity})"
    )
    print(
        f"query: {swap.query_instruction!r} -> {swap.wrong_response!r}; the model itself says {generation!r}\n"
    )
    print("| method | " + " | ".join(f"share of perturbed in top-{k}" for k in TOP_KS) + " |")
    print("|---|" + "---:|" * len(TOP_KS))
    for method, shares in results.items():
        print(f"| {method} | " + " | ".join(f"{shares[f'top{k}']:.2f}" for k in TOP_KS) + " |")


if __name__ == "__main__":
    main()
