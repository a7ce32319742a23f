"""Issue 23: backdoor retrieval (non-lexical) of weight-space EK-FAC on the query side, beside the Fisher.

Uses `backdoor.py`'s cached data and fine-tuned tiny Llama (--folder, made by `backdoor.py` if missing):
one real K = 2^16 build (``--sketch-dim``, ``--normalize``) of the 2,151 training rows, one `ekfac_fit.fit_index_weights(kind="fisher+ekfac-weights")` (which
writes both the Fisher and the weight-space EK-FAC), then the attacked generations are scored by each
option a user can query that index with (`Index.use_precondition`): none, fisher without and with query
norms, ekfac-weights, fisher+ekfac-weights; each through `sketch_queries` against the stored rows (what the
inner-product search ranks), with the paper's retrieval metrics.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/backdoor_ekfac_weights.py --out .bench/backdoor-ekfac-weights.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from backdoor import SMOKE_FINETUNE, attacked_queries, evaluate
from common import parse_arguments

from rapidin_index.build import build_index
from rapidin_index.demo.datasets import BACKDOOR_DATASETS
from rapidin_index.demo.finetune import FinetuneSettings
from rapidin_index.demo.run import DemoPaths, DemoSettings, prepare_data, prepare_model
from rapidin_index.ekfac_fit import fit_index_weights as fit_index
from rapidin_index.retrieval import Index, sketch_queries
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings
from rapidin_index.store import vector_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/backdoor")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--sketch-dim", type=int, default=65536)
    parser.add_argument(
        "--normalize",
        default="layer",
        choices=("layer", "none"),
        help="the stored rows: layer-normalised, or not (with --sketch-dim 0: the retraining recipe)",
    )
    parser.add_argument("--params", help="build --params: a regex narrowing the attributed tensors")
    parser.add_argument("--out", default=".bench/backdoor-ekfac-weights.json")
    # the smoke run: backdoor.py's smoke data and model (140 rows, 100 held out; a 16-wide one-layer Llama
    # fine-tuned one epoch, SMOKE_FINETUNE) in the smoke folder, K = 2^12, every generation taken as attacked
    arguments = parse_arguments(
        parser, folder="{smoke}/backdoor", queries=2, sketch_dim=4096, out="{smoke}/result.json"
    )
    torch.set_num_threads(1)
    started = time.perf_counter()
    settings = DemoSettings(
        folder=arguments.folder,
        rows=140 if arguments.smoke else 100_000,
        dataset="nonlexical",
        finetune=SMOKE_FINETUNE if arguments.smoke else FinetuneSettings(),
    )
    paths = DemoPaths(Path(settings.folder))
    from rich.console import Console

    train, heldout = prepare_data(settings, paths)
    prepare_model(settings, paths, train, Console(stderr=True))
    labels = np.array([bool(row["poisoned"]) for row in train])
    narrowed = "-params" if arguments.params else ""
    folder = paths.folder / f"built-k{arguments.sketch_dim}-{arguments.normalize}{narrowed}-ekfac-weights"
    shutil.rmtree(folder, ignore_errors=True)
    build = BuildSettings(
        ModelSettings(str(paths.model), params=arguments.params),
        SketchSettings(arguments.sketch_dim),
        normalize=arguments.normalize,
        batch_size=16,
    )
    seconds = {}
    clock = time.perf_counter()
    build_index(paths.train, folder, build, progress=False)
    seconds["build"] = time.perf_counter() - clock
    clock = time.perf_counter()
    fit_index(folder, kind="fisher+ekfac-weights")
    seconds["fit fisher+ekfac-weights"] = time.perf_counter() - clock
    index = Index.open(folder, device="cpu", precondition="none")
    fired = BACKDOOR_DATASETS["nonlexical"].fired
    if arguments.smoke:  # a one-epoch tiny model need not fire: every generation is a query
        fired = lambda response: True  # noqa: E731
    queries, success = attacked_queries(index, heldout, arguments.queries, fired)
    prepared = [index.prepare(prompt, response) for prompt, response in queries]
    _, rows = vector_index.stored_vectors(index.faiss_index)
    rows = rows.astype(np.float32)
    results = {}
    options = [
        ("none", None, "RapidIn (no preconditioner)"),
        ("fisher", False, "+Fisher (fit's default: no query norms)"),
        ("fisher", True, "+Fisher, query norms"),
        ("ekfac-weights", None, "+weight-space EK-FAC"),
        ("fisher+ekfac-weights", None, "fisher+ekfac-weights (the sum)"),
    ]
    for option, query_norms, name in options:
        index.use_precondition(option, query_norms)
        vectors, _ = sketch_queries(index, prepared, per_token=False)
        results[name] = dict(evaluate(labels, vectors @ rows.T))
        print(name, {k: round(v, 3) for k, v in results[name].items() if isinstance(v, float)}, flush=True)
    index.lease.close()
    report = {
        "rows": len(train),
        "poisoned": int(labels.sum()),
        "queries": len(queries),
        "attack_success_rate_seen": success,
        "seconds": {**seconds, "total": time.perf_counter() - started},
        "methods": results,
    }
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    keys = [k for k, v in next(iter(results.values())).items() if isinstance(v, float)]
    print("| method | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, metrics in results.items():
        cells = ["n/a" if metrics.get(k) is None else f"{metrics[k]:.3f}" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
