"""Linear datamodeling score (LDS) of RapidIn, TracIn and (when installed) kronfluence's EK-FAC.

The counterfactual test that TRAK, kronfluence, dattri and bergson report: train M models on random
halves of the training set with one recipe, measure each on held-out queries, and ask how well the sum
of a method's attribution scores over a half predicts the loss of the model trained on it.

* Data: the non-lexical backdoor set (`demo_data.make_nonlexical_backdoor_dataset`) over the first
  `--rows` docstring rows; queries are held-out rows with their reference answers, half of them
  triggered (a greeting + a fable answer), half clean (the docstring answer).
* Models: `finetune.finetune` with the demo's recipe (`--epochs` passes), one tokenizer trained on the whole set shared by
  every model (so that losses compare), the same initialisation seed for all. The full model (all
  rows) is the one attributed; M subset models, each on a random 50% of the rows, are cached under
  `--folder`/subsets/.
* Scores: `build_index` over the training rows with the full model (`--k 0` with normalize layer and
  none: exact TracIn with and without layer norm; RapidIn at several K). A query's whole-answer
  vector is the same gradient sketch a build stores for a row, so the queries are indexed too, with
  the same settings, and scores are inner products of stored vectors; the script checks once that
  `Index.query_rows` gives the same scores.
* Issue 23 variants (on the same models): RapidIn with the full model's Adam state (`--optimizer-state`,
  the fine-tune's optimizer.pt), with the query-side Fisher preconditioner (`precondition`, fitted from
  the stored train vectors; `--dampings` sweeps its damping, `--structures` whole vs per tensor), and
  both; exact TracIn + layer norm with each. Also tried, as analysis only: the Fisher applied to both
  sides as (F + lambda I)^-1/2 with the train rows normalised again after whitening ("whitened
  cosine"). Costs: the train build with and without the state, the fit, and a whole-generation query
  (`Index.query_prepared`, per_token off, explain 0) with and without the Fisher, in one run.
* LDS of a query: Spearman correlation over the M subsets between the predicted score
  (sum of the query's attribution scores over the subset's rows) and the **negative** loss of the
  subset's model on the query (a positive influence means training on the row lowers the loss).
  Reported: the mean over queries, and over the triggered and the clean queries apart.

    .venv/bin/python benchmarks/lds.py --out .bench/lds.json
    .venv/bin/python benchmarks/lds.py --epochs 10 --folder .bench/lds-10 --out .bench/lds-10.json

The cache holds the settings it was made with: use another --folder for other --rows/--models/--epochs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import SMOKE_MODEL
from common import parse_arguments as parse_with_smoke

from rapidin_index import Index, SketchSettings, build_index
from rapidin_index.demo.datasets import load_docstring_rows, make_nonlexical_backdoor_dataset, write_jsonl
from rapidin_index.demo.finetune import (
    REPORT_FILE,
    FinetuneSettings,
    finetune,
    response_losses,
    row_tokenizer,
)
from rapidin_index.demo.metrics import spearman
from rapidin_index.settings import BuildSettings, ModelSettings
from rapidin_index.store import vector_index


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/lds", help="cache: data, models, indexes, losses")
    parser.add_argument("--rows", type=int, default=700, help="docstring rows before the held-out split")
    parser.add_argument("--queries", type=int, default=25, help="held-out queries of each kind")
    parser.add_argument("--models", type=int, default=32, help="M: subset models")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the rows in each subset")
    parser.add_argument("--sketch-dims", default="4096,16384,65536", help="RapidIn K values")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of every model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dampings", default="0.01,0.1,1", help="Fisher damping multiples to try")
    parser.add_argument("--structures", default="auto,whole", help="Fisher block structures to try")
    parser.add_argument("--variants", default="on", choices=("on", "off"), help="issue 23 variants")
    parser.add_argument("--costs", default="on", choices=("on", "off"), help="issue 23 variants' timings")
    parser.add_argument("--out", default=".bench/lds.json")
    # the smoke run: 3 subset models (16 wide, one layer, one epoch) on the rows left after 2 x 3 held out
    return parse_with_smoke(
        parser,
        argv,
        folder="{smoke}/lds",
        rows=60,
        queries=3,
        models=3,
        epochs=1,
        sketch_dims="256,65536",
        dampings="0.1",
        structures="auto",
        out="{smoke}/result.json",
    )


def check_cache(folder: Path, arguments: argparse.Namespace) -> None:
    """The cached models must come from these settings; a folder made with others is refused."""
    wanted = {key: getattr(arguments, key) for key in ("rows", "queries", "models", "fraction", "epochs")}
    stamp = folder / "settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) != wanted:
        raise SystemExit(f"{folder} holds models made with {stamp.read_text()}; pass another --folder")
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(wanted))


def prepare_data(folder: Path, rows: int, queries: int) -> tuple[list[dict], list[dict]]:
    train, triggered, clean = make_nonlexical_backdoor_dataset(
        load_docstring_rows()[:rows], seed=0, heldout_count=queries
    )
    write_jsonl(train, folder / "train.jsonl")
    write_jsonl(triggered + clean, folder / "queries.jsonl")
    return train, triggered + clean


def subset_masks(rows: int, models: int, fraction: float, seed: int = 0) -> np.ndarray:
    """[models, rows] bool: each row a random subset of round(fraction * rows) training rows."""
    generator = np.random.default_rng(seed)
    masks = np.zeros((models, rows), bool)
    for mask in masks:
        mask[generator.choice(rows, round(fraction * rows), replace=False)] = True
    return masks


def train_models(
    folder: Path, train, queries, masks: np.ndarray, epochs: int, smoke: bool = False
) -> np.ndarray:
    """Fine-tune the full model and every subset model (cached); [models, queries] losses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = FinetuneSettings(**SMOKE_MODEL) if smoke else FinetuneSettings(epochs=epochs)
    tokenizer_dir = folder / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        row_tokenizer(train, settings.vocab_size).save_pretrained(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not (folder / "full" / "config.json").exists():
        finetune(train, folder / "full", settings, progress=False, tokenizer=tokenizer)
    losses = []
    for number, mask in enumerate(masks):
        model_dir = folder / "subsets" / f"{number:03d}"
        loss_file = model_dir / "query_losses.json"
        if not loss_file.exists():
            started = time.perf_counter()
            rows = [row for row, kept in zip(train, mask, strict=True) if kept]
            finetune(rows, model_dir, settings, progress=False, tokenizer=tokenizer)
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            loss_file.write_text(json.dumps(response_losses(model, tokenizer, queries)))
            print(
                f"subset model {number + 1}/{len(masks)}: {time.perf_counter() - started:.0f} s", flush=True
            )
        losses.append(json.loads(loss_file.read_text()))
    return np.array(losses)


def method_settings(sketch_dims: list[int]) -> dict[str, tuple[SketchSettings, str]]:
    methods = {
        "TracIn + layer norm (exact; RapidIn K=0)": (SketchSettings(0), "layer"),
        "TracIn, no layer norm (exact)": (SketchSettings(0), "none"),
    }
    for sketch_dim in sketch_dims:
        methods[f"RapidIn K=2^{sketch_dim.bit_length() - 1}"] = (SketchSettings(sketch_dim), "layer")
    return methods


def attribution_scores(
    folder: Path, name: str, sketch: SketchSettings, normalize: str, optimizer_state: bool = False
) -> np.ndarray:
    """[queries, rows] scores of one method, from a build over the rows and one over the queries."""
    vectors = stored_pair(folder, sketch, normalize, optimizer_state)
    print(f"{name}: scored", flush=True)
    return vectors["queries"].astype(np.float64) @ vectors["train"].astype(np.float64).T


SMOKE_SKETCH: SketchSettings | None = None
"""Set by `smoke_cache`: the K = 2^16 indexes `stored_pair` makes are built with these settings instead
(rapidgrad-kron, what 2^16 resolves to on the benchmark's model, at K = 2^12: its K-FAC factors are small
enough for a smoke run's seconds); their folders keep their names."""

BUILD_SECONDS: dict[str, float] = {}
"""Seconds of each train build this run made (a cached index is not timed)."""


def index_folder(
    folder: Path, sketch: SketchSettings, normalize: str, optimizer_state: bool, part: str
) -> Path:
    slug = f"k{sketch.sketch_dim}-{normalize}" + ("-adam" if optimizer_state else "")
    return folder / "indexes" / f"{slug}-{part}"


def stored_pair(folder: Path, sketch: SketchSettings, normalize: str, optimizer_state: bool) -> dict:
    """{"train": [rows, K], "queries": [queries, K]} stored vectors of the two builds (made if missing)."""
    state = str(folder / "full") if optimizer_state else None
    named = sketch  # the folders' name
    if SMOKE_SKETCH is not None and sketch.sketch_dim == 65536:
        sketch = SMOKE_SKETCH
    settings = BuildSettings(
        ModelSettings(str(folder / "full")), sketch, normalize=normalize, batch_size=16, optimizer_state=state
    )
    vectors = {}
    for part in ("train", "queries"):
        index_dir = index_folder(folder, named, normalize, optimizer_state, part)
        started = time.perf_counter()
        report = build_index(folder / f"{part}.jsonl", index_dir, settings, progress=False)
        if part == "train" and not report.nothing_to_do:
            BUILD_SECONDS[index_dir.name] = time.perf_counter() - started
        ids, vectors[part] = vector_index.stored_vectors(Index.open(index_dir, device="cpu").faiss_index)
        assert np.array_equal(ids, np.arange(len(ids)))
    return vectors


def check_against_query(folder: Path, queries: list[dict], scores: np.ndarray) -> float:
    """`Index.query_rows` on the K=2^16 index must give the stored-vector scores (largest difference)."""
    index = Index.open(folder / "indexes" / "k65536-layer-train", device="cpu")
    results = index.query_rows(queries[:2], top_k=index.manifest.row_count, explain=0)
    differences = [
        abs(hit.score - scores[number, hit.id])
        for number, result in enumerate(results)
        for hit in result.helpful
    ]
    assert max(differences) < 1e-3 * max(1.0, float(np.abs(scores[:2]).max())), max(differences)
    return float(max(differences))


def kronfluence_scores(folder: Path, train: list[dict], queries: list[dict]) -> np.ndarray | None:
    """EK-FAC influence scores [queries, rows] when kronfluence is installed, else None."""
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return None
    from lds_kronfluence import ekfac_scores  # beside this file; imports kronfluence

    return ekfac_scores(folder / "full", train, queries, folder / "kronfluence")


def linear_datamodeling_score(
    scores: np.ndarray, masks: np.ndarray, losses: np.ndarray
) -> list[float | None]:
    """Per query: Spearman over subsets of (sum of scores over the subset) against -loss."""
    predicted = masks.astype(np.float64) @ scores.T  # [models, queries]
    return [spearman(predicted[:, query], -losses[:, query]) for query in range(scores.shape[0])]


def summarize(per_query: list[float | None], triggered: int) -> dict:
    def mean(values):
        defined = [value for value in values if value is not None]
        return float(np.mean(defined)) if defined else None

    return {
        "lds": mean(per_query),
        "lds_triggered": mean(per_query[:triggered]),
        "lds_clean": mean(per_query[triggered:]),
        "undefined_queries": sum(value is None for value in per_query),
        "per_query": per_query,
    }


def smoke_cache(folder: Path) -> Path:
    """The cache the scripts that read this one's (lds_kfac.py, ...) use in their smoke runs: this script's
    smoke setting (its exact indexes, K = 2^8), without the variants, run in this process into ``folder``; the
    K = 2^16 indexes made after it are smaller (`SMOKE_SKETCH`)."""
    global SMOKE_SKETCH
    SMOKE_SKETCH = SketchSettings(4096, algorithm="rapidgrad-kron")
    arguments = ["--smoke", "--folder", str(folder), "--sketch-dims", "256", "--variants", "off"]
    main([*arguments, "--costs", "off", "--out", str(folder / "lds.json")])
    return folder


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.threads)
    started = time.perf_counter()
    folder = Path(arguments.folder)
    check_cache(folder, arguments)
    train, queries = prepare_data(folder, arguments.rows, arguments.queries)
    masks = subset_masks(len(train), arguments.models, arguments.fraction)
    losses = train_models(folder, train, queries, masks, arguments.epochs, arguments.smoke)
    trained = time.perf_counter()
    sketch_dims = [int(k) for k in arguments.sketch_dims.split(",")]
    results, all_scores = {}, {}
    for name, (sketch, normalize) in method_settings(sketch_dims).items():
        all_scores[name] = attribution_scores(folder, name, sketch, normalize)
        results[name] = summarize(
            linear_datamodeling_score(all_scores[name], masks, losses), arguments.queries
        )
    costs = {}
    if arguments.variants == "on":
        from lds_variants import run_variants  # beside this file

        costs = run_variants(folder, queries, masks, losses, arguments, results, all_scores)
    check = (
        check_against_query(folder, queries, all_scores["RapidIn K=2^16"]) if 65536 in sketch_dims else None
    )
    ekfac = kronfluence_scores(folder, train, queries)
    if ekfac is None:
        print("kronfluence is not installed: EK-FAC skipped")
    else:
        results["kronfluence EK-FAC"] = summarize(
            linear_datamodeling_score(ekfac, masks, losses), arguments.queries
        )
    random_scores = np.random.default_rng(0).standard_normal(all_scores[name].shape)
    results["random"] = summarize(linear_datamodeling_score(random_scores, masks, losses), arguments.queries)
    report = {
        "rows": len(train),
        "poisoned": sum(row["poisoned"] for row in train),
        "queries": {"triggered": arguments.queries, "clean": arguments.queries},
        "models": arguments.models,
        "fraction": arguments.fraction,
        "epochs": arguments.epochs,
        "full_model_epoch_losses": json.loads((folder / "full" / REPORT_FILE).read_text())["epoch_losses"],
        "query_loss_spread": {
            "mean_std_over_models": float(losses.std(axis=0).mean()),
            "mean_loss": float(losses.mean()),
        },
        "kronfluence": ekfac is not None,
        "query_rows_check_max_difference": check,
        "training_seconds": trained - started,
        "seconds": time.perf_counter() - started,
        "methods": results,
        "costs": costs,
        "build_seconds": BUILD_SECONDS,
    }
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(report: dict) -> None:
    print(
        f"\n{report['rows']} rows ({report['poisoned']} poisoned), {report['models']} models on "
        f"{report['fraction']:.0%} subsets, {sum(report['queries'].values())} queries\n"
    )
    print_methods(report["methods"], "| method | LDS (all queries) | LDS (triggered) | LDS (clean) |")


def print_methods(methods: dict, header: str) -> None:
    """A markdown table of each method's LDS over all, triggered and clean queries, under ``header``."""
    print(header)
    print("|---|---:|---:|---:|")
    for name, result in methods.items():
        cells = [result[key] for key in ("lds", "lds_triggered", "lds_clean")]
        print(f"| {name} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
