"""Backdoor retrieval (the paper's Tables 4 and 11) on the demo setup.

A tiny Llama is fine-tuned on docstring rows of which ~10% carry a backdoor: by default the non-lexical
one (`--dataset nonlexical`: varied greetings open the instruction, the answers are machine fables in
the clean rows' own words, no fixed string marks a poisoned row), or the lexical "Howdy!" one
(`--dataset lexical`). For at least 10 held-out triggered prompts on which the backdoor fires, every
training row is scored by each method and the paper's metrics are averaged over the queries: auPRC /
auROC on the top-k plus bottom-k rows, precision@k, and the plain ROC-AUC over all rows.

Methods: exact TracIn with and without layer norm (K = 0 indexes built by `build_index`); RapidIn at
K = 2^12, 2^14, 2^16 (`--algorithm rapidgrad-v1 --lambdas 20,100` for the paper's transform); BM25 (on prompt + generation, and on the generation
alone); embedding similarity (mean last hidden state, of the fine-tuned model and of one fine-tuned the
same way on the clean rows only); random.

RapidIn's sketches are linear in the normalised gradient, coordinate by coordinate, so sketching the exact
index's stored vectors with the build's own projector gives the very vectors a build at that K would
store; the script checks this once against a real K = 2^16 build and query, then reuses the exact
gradients for every (K, lambda), which keeps the run short.

    .venv/bin/python benchmarks/backdoor.py --out .bench/backdoor.json                    # non-lexical
    .venv/bin/python benchmarks/backdoor.py --dataset lexical --out .bench/backdoor-lexical.json

`--exact off` holds no exact index (2,151 exact rows are 2.8 GB): issue 23's variants (RapidIn, +optimizer
state, +Fisher, +both) come from real builds at the largest `--sketch-dims` K (`backdoor_variants.py`),
with their build, fit and query costs, and each fitted build as `query` scores it (the fit's defaults:
query norms; then refitted with K-FAC, EK-FAC and the Fisher without query norms); about 3.6 GB RSS
(OpenBLAS on one thread: its default threads make the fit ~10x slower on a busy machine):

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/backdoor.py --exact off --baselines off \
        --sketch-dims 65536 --out .bench/backdoor-variants.json

`--model smollm2` runs it on a real pretrained model instead, SmolLM2-135M-Instruct with a LoRA adapter
trained on chat rows (`backdoor_smollm2.py`; lexical backdoor by default, about half an hour on 2 cores):

    .venv/bin/python benchmarks/backdoor.py --model smollm2 --out .bench/backdoor-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from common import SMOKE_MODEL
from common import parse_arguments as parse_with_smoke

from rapidin_index.build import build_index
from rapidin_index.demo.baselines import BM25, mean_hidden_states, random_scores, words
from rapidin_index.demo.datasets import BACKDOOR_DATASETS
from rapidin_index.demo.finetune import FinetuneSettings, attack_success_rate, finetune
from rapidin_index.demo.metrics import mean_metrics, retrieval_metrics, spearman
from rapidin_index.demo.run import DemoPaths, DemoSettings, prepare_data, prepare_model
from rapidin_index.losses import collate
from rapidin_index.retrieval import Index
from rapidin_index.settings import (
    DEFAULT_SKETCH_ALGORITHM,
    SKETCH_ALGORITHMS,
    BuildSettings,
    ModelSettings,
    SketchSettings,
)
from rapidin_index.sketch import make_projector
from rapidin_index.store import vector_index


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="tiny",
        choices=("tiny", "smollm2"),
        help="tiny: a Llama fine-tuned in-process; smollm2: SmolLM2-135M-Instruct + LoRA (backdoor_smollm2.py)",
    )
    parser.add_argument(
        "--dataset", choices=sorted(BACKDOOR_DATASETS), help="default: nonlexical (tiny), lexical (smollm2)"
    )
    parser.add_argument(
        "--folder",
        help="cache for data, model and indexes (.bench/backdoor[-smollm2][-lexical]; tiny: nonlexical unsuffixed)",
    )
    parser.add_argument("--rows", type=int, help="docstring rows (default: all for tiny, 400 for smollm2)")
    parser.add_argument("--epochs", type=int, default=5, help="smollm2 only: LoRA fine-tuning epochs")
    parser.add_argument(
        "--learning-rate", type=float, default=3e-3, help="smollm2 only: LoRA AdamW peak rate"
    )
    parser.add_argument("--queries", type=int, default=10, help="attacked generations (backdoor fired)")
    parser.add_argument(
        "--sketch-dims", default="4096,16384,65536", help="tiny only (smollm2: the default K)"
    )
    parser.add_argument("--algorithm", default=DEFAULT_SKETCH_ALGORITHM, choices=SKETCH_ALGORITHMS)
    parser.add_argument("--lambdas", default="20", help="shuffles; only rapidgrad-v1 uses them (try 20,100)")
    parser.add_argument("--out", help="the JSON result (default: the folder's name + .json)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest when busy)")
    parser.add_argument(
        "--variants",
        default="on",
        choices=("on", "off"),
        help="tiny: issue 23's optimizer-state / Fisher rows",
    )
    parser.add_argument(
        "--baselines",
        default="on",
        choices=("on", "off"),
        help="tiny: off skips plain TracIn, the clean-model embeddings (a second fine-tune) and the K = 2^16 "
        "build check",
    )
    parser.add_argument(
        "--exact",
        default="on",
        choices=("on", "off"),
        help="tiny: off builds no exact index (2,151 exact rows hold 2.8 GB): RapidIn, +optimizer state, "
        "+Fisher and +both from real builds at the largest --sketch-dims K, and the text baselines",
    )
    # the smoke run: 140 rows (100 held out), a 16-wide one-layer Llama fine-tuned one epoch (SMOKE_FINETUNE), every
    # generation taken as attacked, K = 2^12; both the exact path and the --exact off path (main_built)
    arguments = parse_with_smoke(
        parser, queries=2, sketch_dims="4096", rows=140, folder="{smoke}/backdoor", out="{smoke}/result.json"
    )
    tiny = arguments.model == "tiny"
    if arguments.dataset is None:
        arguments.dataset = "nonlexical" if tiny else "lexical"
    if arguments.rows is None:
        arguments.rows = 100_000 if tiny else 400
    if arguments.folder is None:
        suffix = "" if tiny else "-smollm2"
        suffix += "" if arguments.dataset == "nonlexical" and tiny else f"-{arguments.dataset}"
        arguments.folder = f".bench/backdoor{suffix}"
    if arguments.out is None:
        arguments.out = f"{arguments.folder}.json"
    return arguments


SMOKE_FINETUNE = FinetuneSettings(**SMOKE_MODEL)

DERIVED_FOLDERS = ("exact-layer", "exact-none", "exact-layer-adam", "rapidin-65536", "model-clean")


def exact_index(paths: DemoPaths, normalize: str) -> Index:
    folder = paths.folder / f"exact-{normalize}"
    settings = BuildSettings(
        ModelSettings(str(paths.model)), SketchSettings(0), normalize=normalize, batch_size=16
    )
    build_index(paths.train, folder, settings, progress=False)
    return Index.open(folder, device="cpu")


def attacked_queries(index: Index, heldout: dict, count: int, fired, max_new_tokens: int = 24):
    """(prompt, generation) pairs on which the backdoor fired, and the attack success rate seen."""
    queries, tried = [], 0
    for row in heldout["triggered"]:
        tried += 1
        response = index.generate(row["instruction"], max_new_tokens)
        if fired(response):
            queries.append((row["instruction"], response))
        if len(queries) == count:
            break
    return queries, len(queries) / tried


def query_vectors(index: Index, queries) -> np.ndarray:
    """Whole-generation normalised query gradients from the index's own sketcher: [queries, D or K]."""
    vectors = []
    for prompt, response in queries:
        prepared = index.prepare(prompt, response)
        batch = collate(
            [(prepared.input_ids, prepared.labels)], index.loaded.tokenizer.pad_token_id, index.device
        )
        vectors.append(index.sketcher.sketch(batch).vectors[0].cpu().numpy())
    return np.stack(vectors)


def sketch_rows(vectors: np.ndarray, settings: SketchSettings) -> np.ndarray:
    projector = make_projector(settings, vectors.shape[1])
    out = projector.new_output(len(vectors))
    for start in range(0, len(vectors), 256):
        chunk = torch.from_numpy(vectors[start : start + 256])
        part = projector.new_output(len(chunk))
        projector.project_block(part, chunk, 0)
        out[start : start + len(chunk)] = part
    return out.numpy()


def evaluate(labels: np.ndarray, score_rows: np.ndarray) -> dict:
    return mean_metrics([retrieval_metrics(labels, scores) for scores in score_rows])


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    if arguments.model == "smollm2":
        return main_smollm2(arguments)
    started = time.perf_counter()
    settings = DemoSettings(
        folder=arguments.folder,
        rows=arguments.rows,
        dataset=arguments.dataset,
        finetune=SMOKE_FINETUNE if arguments.smoke else FinetuneSettings(),
    )
    paths = DemoPaths(Path(settings.folder))
    from rich.console import Console

    cached = paths.cache_settings.read_text() if paths.cache_settings.exists() else None
    train, heldout = prepare_data(settings, paths)
    if paths.cache_settings.read_text() != cached:  # new data: the indexes of the old are stale
        for name in DERIVED_FOLDERS:
            shutil.rmtree(paths.folder / name, ignore_errors=True)
    prepare_model(settings, paths, train, Console(stderr=True))
    fired = BACKDOOR_DATASETS[arguments.dataset].fired
    if arguments.smoke:  # a one-epoch tiny model need not fire: every generation is a query
        fired = lambda response: True  # noqa: E731
    labels = np.array([bool(row["poisoned"]) for row in train])
    if arguments.exact == "off":
        return main_built(arguments, paths, train, heldout, fired, labels, started)
    if arguments.smoke:
        main_built(arguments, paths, train, heldout, fired, labels, started, out=paths.folder / "built.json")
    layer = exact_index(paths, "layer")
    backdoor = backdoor_rates(layer, heldout, fired)
    queries, success = attacked_queries(layer, heldout, arguments.queries, fired)
    ids, train_vectors = vector_index.stored_vectors(layer.faiss_index)
    assert np.array_equal(ids, np.arange(len(train)))
    query_exact = query_vectors(layer, queries)
    layer_scores = query_exact @ train_vectors.T
    results = {"TracIn + layer norm (exact)": evaluate(labels, layer_scores)}
    if arguments.baselines == "on":
        plain = exact_index(paths, "none")
        _, plain_vectors = vector_index.stored_vectors(plain.faiss_index)
        results["TracIn, no layer norm (exact)"] = evaluate(
            labels, query_vectors(plain, queries) @ plain_vectors.T
        )
        del plain_vectors
    for sketch_dim in [int(k) for k in arguments.sketch_dims.split(",")]:
        for shuffle_lambda in [int(v) for v in arguments.lambdas.split(",")]:
            sketch = SketchSettings(sketch_dim, shuffle_lambda, 42, arguments.algorithm)
            scores = sketch_rows(query_exact, sketch) @ sketch_rows(train_vectors, sketch).T
            label = f"RapidIn K=2^{sketch_dim.bit_length() - 1}"
            if arguments.algorithm == "rapidgrad-v1":
                label += f", lambda={shuffle_lambda}"
            results[label] = evaluate(labels, scores)
    if arguments.variants == "on":
        from backdoor_variants import variant_results  # beside this file

        results.update(variant_results(paths, layer, queries, query_exact, train_vectors, labels, evaluate))
    results.update(text_baselines(layer, train, queries, labels))
    check = None
    if arguments.baselines == "on":
        results["embedding similarity, model without the poisoned rows"] = clean_model_embeddings(
            paths, settings, train, queries, labels
        )
        check = check_against_real_build(paths, queries, query_exact, train_vectors)
    write_report(
        arguments.out,
        (arguments, train, labels, queries, backdoor, success, results, started),
        poisoned_scored_below_zero=float(np.mean([(row[labels] < 0).mean() for row in layer_scores])),
        poisoned_score_vs_word_overlap=word_overlap_diagnostic(train, queries, labels, layer_scores),
        gradient_dim=int(train_vectors.shape[1]),
        real_build_check=check,
    )


def write_report(out, run, **fields) -> dict:
    """The JSON result of a tiny run, written to ``out`` and printed as a table. ``run``: (arguments, train,
    labels, queries, backdoor rates, attack success seen, method results, start time); ``fields`` sit
    between the run's description and its seconds and methods."""
    arguments, train, labels, queries, backdoor, success, results, started = run
    report = {
        "dataset": arguments.dataset,
        "rows": len(train),
        "poisoned": int(labels.sum()),
        "queries": len(queries),
        "generations": [response for _, response in queries],
        **backdoor,
        "attack_success_rate_seen": success,
        **fields,
        "seconds": time.perf_counter() - started,
        "methods": {name: dict(metrics) for name, metrics in results.items()},
        "notes": {name: metrics.notes for name, metrics in results.items() if metrics.notes},
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print_table(report)
    return report


def main_built(
    arguments, paths: DemoPaths, train, heldout, fired, labels: np.ndarray, started: float, out=None
) -> None:
    """``--exact off``: issue 23's variants from real builds (`backdoor_variants.built_variant_results`)."""
    from backdoor_variants import built_index, built_variant_results  # beside this file

    sketch_dim = max(int(k) for k in arguments.sketch_dims.split(","))
    # the default algorithm (rapidgrad-kron at the default K on this model; named in the smoke run's small K)
    sketch = (
        SketchSettings(sketch_dim, algorithm="rapidgrad-kron")
        if arguments.smoke
        else SketchSettings(sketch_dim)
    )
    plain, seconds = built_index(paths, None, sketch)
    backdoor = backdoor_rates(plain, heldout, fired)
    queries, success = attacked_queries(plain, heldout, arguments.queries, fired)
    results, costs = built_variant_results(paths, plain, seconds, queries, labels, evaluate, sketch)
    results.update(text_baselines(plain, train, queries, labels))
    write_report(
        out or arguments.out,
        (arguments, train, labels, queries, backdoor, success, results, started),
        configuration=f"--exact off: real builds only (no exact index), torch threads {arguments.threads}",
        gradient_dim=int(plain.manifest.sketch["gradient_dim"]),
        costs=costs,
    )
    print(json.dumps(costs, indent=2))


def main_smollm2(arguments: argparse.Namespace) -> None:
    from backdoor_smollm2 import RealModelSettings, run

    settings = RealModelSettings(
        arguments.dataset, arguments.rows, epochs=arguments.epochs, learning_rate=arguments.learning_rate
    )
    report = run(Path(arguments.folder), settings, arguments.queries, Path(arguments.out))
    print_table(report)
    timing = report["build_time"]
    print(
        f"build (K=2^{report['sketch_dim'].bit_length() - 1}): {timing['build_tokens_per_second']:.0f} tokens/s "
        f"({timing['build_seconds']:.0f} s); the model's own forward + backward: "
        f"{timing['floor_tokens_per_second']:.0f} tokens/s; the build runs at "
        f"{timing['build_share_of_floor_speed']:.2f} of the floor's speed; total {report['seconds']:.0f} s"
    )


def word_overlap_diagnostic(train, queries, labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Mean over queries of the Spearman correlation, over the poisoned rows, between a row's exact
    layer-norm score and the share of its answer's words that the generation also uses."""
    correlations = []
    for (_, response), row_scores in zip(queries, scores, strict=True):
        generated = set(words(response))
        overlap = [
            np.mean([word in generated for word in words(row["output"]) if word.isalpha()])
            for row, poisoned in zip(train, labels, strict=True)
            if poisoned
        ]
        correlations.append(spearman(row_scores[labels], overlap))
    defined = [value for value in correlations if value is not None]
    return float(np.mean(defined)) if defined else None


def backdoor_rates(index: Index, heldout: dict, fired) -> dict:
    """Attack success on every held-out triggered prompt, false triggers on every clean one (12 tokens)."""
    model, tokenizer = index.loaded.model, index.loaded.tokenizer
    return {
        "attack_success_rate": attack_success_rate(model, tokenizer, heldout["triggered"], fired=fired),
        "false_trigger_rate": attack_success_rate(model, tokenizer, heldout["clean"], fired=fired),
        "heldout_prompts": {name: len(rows) for name, rows in heldout.items()},
    }


def text_baselines(index: Index, train: list[dict], queries, labels: np.ndarray) -> dict:
    documents = [row["instruction"] + " " + row["output"] for row in train]
    bm25 = BM25(documents)
    bm25_scores = np.stack([bm25.scores(prompt + " " + response) for prompt, response in queries])
    model, tokenizer = index.loaded.model, index.loaded.tokenizer
    train_embeddings = mean_hidden_states(model, tokenizer, documents)
    query_embeddings = mean_hidden_states(model, tokenizer, [p + " " + r for p, r in queries])
    randoms = np.stack([random_scores(len(train), seed) for seed in range(len(queries))])
    bm25_generation = np.stack([bm25.scores(response) for _, response in queries])
    return {
        "BM25": evaluate(labels, bm25_scores),
        "BM25, generation only": evaluate(labels, bm25_generation),
        "embedding similarity": evaluate(labels, query_embeddings @ train_embeddings.T),
        "random": evaluate(labels, randoms),
    }


def clean_model_embeddings(paths: DemoPaths, settings: DemoSettings, train, queries, labels) -> dict:
    """Embedding similarity from a model fine-tuned the same way on the clean rows only (cached).

    The backdoored model's own hidden states are shaped by the backdoor; this embedder sees the same
    text with a representation the poisoned rows did not train, as a generic embedding model would.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = paths.folder / "model-clean"
    if not (folder / "config.json").exists():
        finetune([row for row in train if not row["poisoned"]], folder, settings.finetune, progress=False)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    documents = [row["instruction"] + " " + row["output"] for row in train]
    train_embeddings = mean_hidden_states(model, tokenizer, documents)
    query_embeddings = mean_hidden_states(model, tokenizer, [p + " " + r for p, r in queries])
    return evaluate(labels, query_embeddings @ train_embeddings.T)


def check_against_real_build(paths: DemoPaths, queries, query_exact, train_vectors) -> dict:
    """A real K=2^16 build and query must score like the sketched exact vectors (same transform)."""
    folder = paths.folder / "rapidin-65536"
    settings = BuildSettings(ModelSettings(str(paths.model)), SketchSettings(65536, 20, 42), batch_size=16)
    build_index(paths.train, folder, settings, progress=False)
    index = Index.open(folder, device="cpu")
    prompt, response = queries[0]
    result = index.query(prompt, response, top_k=10, explain=0)
    sketch = SketchSettings(65536, 20, 42)
    expected = sketch_rows(query_exact[:1], sketch) @ sketch_rows(train_vectors, sketch).T
    differences = [abs(hit.score - float(expected[0, hit.id])) for hit in result.helpful]
    assert max(differences) < 1e-3 * max(1.0, abs(result.helpful[0].score)), differences
    return {"max_abs_score_difference": max(differences), "top10_ids": [hit.id for hit in result.helpful]}


def print_table(report: dict) -> None:
    keys = [f"{metric}@{k}" for metric in ("auprc", "auroc", "precision") for k in (5, 10, 50, 100)]
    keys.append("roc_auc")
    print(
        f"\n{report['dataset']}: {report['rows']} rows ({report['poisoned']} poisoned), "
        f"{report['queries']} attacked generations, D = {report['gradient_dim']:,}; attack success "
        f"{report['attack_success_rate']:.0%}, false triggers {report['false_trigger_rate']:.0%}\n"
    )
    print("| method | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for method, metrics in report["methods"].items():
        print(f"| {method} | " + " | ".join(_shown(metrics.get(key)) for key in keys) + " |")
    for method, notes in report["notes"].items():
        for key, note in notes.items():
            print(f"{method} {key}: {note}")


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
