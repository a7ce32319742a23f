"""Issue 23 analysis: where weight-space EK-FAC loses LDS on the index: the rows' layer norm or the sketch.

On `lds.py`'s cached models (run it first), the same weight-space EK-FAC factors (`ekfac_fit.fit_weights`, sampled
labels, every tensor, no row-norm scale) applied to the held-out queries' plain gradients, scored against:

* raw: each training row's exact plain gradient (what kronfluence scores against);
* ln: the same, layer-normalised per tensor (what the index's rows hold, before the sketch);
* sketched: the stored K = 2^16 rows (the index), the query sketched with the index's projector;

each with every tensor or the nn.Linear weights alone ("lin"), at each damping (x mean(Lambda)).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/lds_ekfac_weights_exact.py --queries 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from common import parse_arguments
from lds import index_folder
from lds_ekfac_weights import lds, selected, smoke_index

from rapidin_index import Index, SketchSettings, ekfac, ekfac_fit
from rapidin_index.retrieval import sketch_query_vectors
from rapidin_index.store import vector_index


@dataclasses.dataclass
class ExactSetting:
    masks: np.ndarray
    losses: np.ndarray
    triggered: int
    chosen: list[int]  # the chosen queries' numbers in queries.jsonl
    index: Index  # the K = 2^16 train index, precondition none
    gradients: torch.Tensor  # [queries, D] the chosen queries' plain gradients
    factors: list  # weight-space EK-FAC of every tensor (head Kronecker), damping 1 x mean, scale 1


def exact_setting(arguments, labels: str) -> ExactSetting:
    """What the exact-gradient analyses share (this script and `lds_ekfac_symmetric.py`): lds.py's cached
    models and train index (the smoke one made if ``arguments.smoke``), the chosen queries' plain
    gradients, and the EK-FAC factors of every tensor as first measured (the head Kronecker, no row
    norms)."""
    arguments.models = None
    torch.set_num_threads(1)
    folder = Path(arguments.folder)
    if arguments.smoke:
        smoke_index(folder)
    masks, losses, chosen, triggered = selected(folder, arguments)
    index = Index.open(index_folder(folder, SketchSettings(65536), "layer", False, "train"), device="cpu")
    index.use_precondition("none")
    query_rows = [json.loads(line) for line in open(folder / "queries.jsonl")]
    prepared = index._prepare_rows([query_rows[n] for n in chosen], False, 0)
    gradients, _ = ekfac.WeightPreconditioner([], {}).gradients(index, prepared, False, sketch_query_vectors)
    factors, _ = ekfac_fit.fit_weights(index, labels=labels, damping=1.0, tensors="all", head="kronecker")
    factors = [dataclasses.replace(f, scale=1.0) for f in factors]
    return ExactSetting(masks, losses, triggered, chosen, index, gradients, factors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/lds")
    parser.add_argument("--queries", type=int, default=10, help="N triggered + N clean")
    parser.add_argument("--dampings", default="0.001,0.01,0.1,1")
    parser.add_argument("--out", default=".bench/lds-ekfac-weights-exact.json")
    # the smoke run: lds.py's smoke cache and its train index (made here, lds_ekfac_weights.smoke_index), one
    # damping
    arguments = parse_arguments(parser, folder="{smoke}/lds", dampings="0.1", out="{smoke}/result.json")
    setting = exact_setting(arguments, "sampled")
    masks, losses, triggered = setting.masks, setting.losses, setting.triggered
    index, gradients, factors = setting.index, setting.gradients, setting.factors
    _, rows = vector_index.stored_vectors(index.faiss_index)
    dampings = [float(d) for d in arguments.dampings.split(",")]
    queries = {}
    for damping in dampings:
        preconditioned = ekfac.apply_factors(
            [dataclasses.replace(f, damping=f.damping * damping) for f in factors], gradients
        )
        linear = preconditioned.clone()
        for f in factors:
            if not f.kronecker:
                linear[:, f.offset : f.offset + f.numel] = 0
        queries[damping] = {"all": preconditioned, "lin": linear}
    scores = {(d, side, t): [] for d in dampings for side in ("raw", "ln") for t in ("all", "lin")}
    batches, _ = ekfac_fit.training_batches(index)  # table order = id order (checked by the row count)
    sketcher = ekfac.exact_sketcher(index)
    for batch in batches:
        raw = sketcher.sketch(batch).vectors  # [batch, D] plain gradients of the rows
        normalised = raw.clone()
        for block in index.blocks:
            part = normalised[:, block.offset : block.offset + block.numel]
            part /= part.norm(dim=1, keepdim=True).clamp_min(1e-30)
        for (damping, side, tensors), out in scores.items():
            out.append((queries[damping][tensors] @ (raw if side == "raw" else normalised).T).numpy())
    assert sum(s.shape[1] for s in scores[next(iter(scores))]) == len(rows)
    results = {}
    for (damping, side, tensors), parts in scores.items():
        results[f"{side}, {tensors}, damping {damping}"] = lds(
            np.concatenate(parts, axis=1), masks, losses, triggered
        )
    projector = index.sketcher.projector
    for damping in dampings:
        for tensors in ("all", "lin"):
            vectors = ekfac.project(projector, queries[damping][tensors]).numpy()
            results[f"sketched, {tensors}, damping {damping}"] = lds(
                vectors @ rows.T, masks, losses, triggered
            )
    index.lease.close()
    Path(arguments.out).write_text(json.dumps(results, indent=2))
    print("| rows scored against | tensors | damping | LDS |\n|---|---|---:|---:|")
    for name, result in results.items():
        side, tensors, damping = name.split(", ")
        print(f"| {side} | {tensors} | {damping.split()[1]} | {result['lds']:.3f} |")


if __name__ == "__main__":
    main()
