"""Issue 23: LDS of weight-space EK-FAC on the query side (`rapidin_index.ekfac`) on `lds.py`'s cached models.

Run `benchmarks/lds.py` first (it trains the models and builds the K = 2^16 index of the train rows in
--folder). Every variant below scores the same held-out queries against the same stored rows (the index's
layer-normalised sketches), in one run:

* RapidIn: the layer-normalised query sketch (no preconditioner);
* +Fisher per tensor, query norms (`precondition.fit_fisher` on the stored rows, damping 0.5): today's best;
* +weight-space EK-FAC: the query's plain gradient, ``H^-1 g`` per tensor with EK-FAC's factors fitted by
  the library (`ekfac_fit.fit_weights`, a pass of the full model over the train rows; ``--labels`` sampled
  and/or empirical), then sketched with the index's projector; each damping of ``--dampings``
  (lambda = damping x mean(Lambda) per tensor) from one fit;
* the sum: `ekfac.combine` of the Fisher's and EK-FAC's query vectors (z-scored over the stored rows),
  one inner product;
* kronfluence's EK-FAC (``--ekfac-scores``, [queries, rows] .npy from `lds_kronfluence.ekfac_scores`).

``--end-to-end on``: `fit_index` with the kind's defaults on a copy of the index, queries through
`Index` (`sketch_queries`), for ekfac-weights and fisher+ekfac-weights. ``--costs on``: a fresh build of
the train rows, the ekfac-weights fit, and whole-generation queries (`Index.query_prepared`, per_token off,
explain 0) with none / fisher / ekfac-weights / fisher+ekfac-weights, interleaved, medians of CPU seconds
(`time.process_time`) and wall seconds; then `exact_costs`, the exact-vector recipe (K = 0, no layer norm,
the nn.Linear weights alone) beside today's K = 2^16 build and RapidIn query (``--costs exact``: that
alone). ``--sketch-dim 0 --normalize none``: the LDS of every variant against exact vectors (``--train-index``:
an index built otherwise, e.g. ``--costs exact``'s).

    .venv/bin/python benchmarks/lds_ekfac_weights.py --folder .bench/lds --ekfac-scores .bench/lds/ekfac_scores.npy
    .venv/bin/python benchmarks/lds_ekfac_weights.py --folder .bench/lds --sketch-dim 0 --normalize none \
        --dampings 0.1,0.3,1 --labels sampled --ekfac-scores .bench/lds/ekfac_scores.npy --end-to-end on
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import LINEAR_PARAMS
from common import parse_arguments as parse_with_smoke
from lds import index_folder, linear_datamodeling_score, print_methods, smoke_cache, stored_pair, summarize
from lds_kfac import losses_and_masks

from rapidin_index import Index, SketchSettings, ekfac, ekfac_fit
from rapidin_index.precondition import Preconditioner, fit_fisher, spans_for
from rapidin_index.store import vector_index


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/lds")
    parser.add_argument("--dampings", default="0.001,0.01,0.1,1")
    parser.add_argument("--labels", default="sampled,empirical")
    parser.add_argument("--fisher-damping", type=float, default=0.5)
    parser.add_argument("--seeds", default="0", help="the fit's label-sampling seeds, each fitted")
    parser.add_argument("--heads", default="diagonal", help="the fit's --head kinds, each fitted")
    parser.add_argument("--queries", type=int, help="score only the first N triggered + N clean queries")
    parser.add_argument("--models", type=int, help="use only the first M subset models")
    parser.add_argument("--ekfac-scores", help="kronfluence's EK-FAC scores [queries, rows] (.npy)")
    parser.add_argument("--end-to-end", default="off", choices=("on", "off"))
    parser.add_argument(
        "--costs",
        default="off",
        choices=("on", "off", "only", "exact"),
        help="on: the sketched kinds' costs (costs) and the exact-vector recipe's beside today's "
        "(exact_costs); only: the former, no LDS; exact: the latter, no LDS",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--normalize",
        default="layer",
        choices=("layer", "none"),
        help="the stored rows: layer-normalised (RapidIn's index) or not (built if missing)",
    )
    parser.add_argument(
        "--sketch-dim",
        type=int,
        default=65536,
        help="the stored rows' K: 65536 (the benchmark's index) or 0 (exact vectors; built if missing)",
    )
    parser.add_argument(
        "--train-index",
        help="score against this index of the train rows (ids in train.jsonl's order), built otherwise: "
        "e.g. --costs exact's K = 0 ones under --folder/indexes/costs-N",
    )
    parser.add_argument("--out", default=".bench/lds-ekfac-weights.json")
    # the smoke run: lds.py's smoke cache (made here, lds.smoke_cache: its K = 2^16 train index is a K = 2^12
    # rapidgrad-kron one), one damping, both label kinds, the end to end fits and the costs (one repeat)
    return parse_with_smoke(
        parser,
        folder="{smoke}/lds",
        dampings="0.1",
        end_to_end="on",
        costs="on",
        repeats=1,
        out="{smoke}/result.json",
    )


def smoke_index(folder: Path) -> None:
    """A smoke run's cache: lds.py's smoke setting and the train index this script reads (made if missing)."""
    if not (folder / "settings.json").exists():
        smoke_cache(folder)
    stored_pair(folder, SketchSettings(65536), "layer", False)


def selected(folder: Path, arguments) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """(masks, losses [models, chosen queries], chosen query numbers, triggered count)."""
    masks, losses, per_kind = losses_and_masks(folder)
    chosen_count = per_kind if arguments.queries is None else min(arguments.queries, per_kind)
    chosen = list(range(chosen_count)) + list(range(per_kind, per_kind + chosen_count))
    models = len(masks) if arguments.models is None else arguments.models
    return masks[:models], losses[:models][:, chosen], chosen, chosen_count


def lds(scores: np.ndarray, masks, losses, triggered: int) -> dict:
    result = summarize(linear_datamodeling_score(scores, masks, losses), triggered)
    result.pop("per_query")
    return result


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    folder = Path(arguments.folder)
    if arguments.smoke:
        smoke_index(folder)
    started = time.perf_counter()
    masks, losses, chosen, triggered = selected(folder, arguments)
    sketch = SketchSettings(arguments.sketch_dim)
    if arguments.normalize != "layer" or arguments.sketch_dim != 65536:
        stored_pair(folder, sketch, arguments.normalize, False)  # built once, then cached
    train_dir = index_folder(folder, sketch, arguments.normalize, False, "train")
    if arguments.train_index:
        train_dir = Path(arguments.train_index)
    if arguments.costs in ("only", "exact"):  # no LDS
        query_rows = [json.loads(line) for line in open(folder / "queries.jsonl")]
        chosen_rows = [query_rows[n] for n in chosen]
        if arguments.costs == "exact":
            measured = exact_costs(folder, chosen_rows, arguments.repeats)
        else:
            measured = costs(folder, train_dir, chosen_rows, arguments.repeats)
        Path(arguments.out).write_text(json.dumps({"costs": measured}, indent=2))
        return
    index = Index.open(train_dir, device="cpu", precondition="none")
    ids, rows = vector_index.stored_vectors(index.faiss_index)
    assert np.array_equal(ids, np.arange(len(ids)))
    rows = rows.astype(np.float32)
    query_rows = [json.loads(line) for line in open(folder / "queries.jsonl")]
    prepared = index._prepare_rows([query_rows[n] for n in chosen], False, 0)
    from rapidin_index.retrieval import sketch_queries, sketch_query_vectors

    plain, _ = sketch_queries(index, prepared, per_token=False)  # normalised as the rows: RapidIn
    weights = ekfac.WeightPreconditioner([], {})
    gradients, _ = weights.gradients(index, prepared, False, sketch_query_vectors)  # [queries, D] plain
    projector = index.sketcher.projector
    raw = ekfac.project(projector, gradients).numpy()  # query norms
    fisher_blocks = fit_fisher(rows, spans_for(index.manifest, "auto")[1], arguments.fisher_damping)
    fisher = Preconditioner(fisher_blocks, {}).apply(raw)
    results = {
        "RapidIn (no preconditioner)": lds(plain @ rows.T, masks, losses, triggered),
        f"+Fisher per tensor, query norms ({arguments.fisher_damping})": lds(
            fisher @ rows.T, masks, losses, triggered
        ),
    }
    fits = {}
    fittings = [
        (labels, seed, head)
        for labels in arguments.labels.split(",")
        for seed in [int(s) for s in arguments.seeds.split(",")]
        for head in arguments.heads.split(",")
    ]
    for labels, seed, head in fittings:
        fit_started = time.perf_counter()
        factors, record = ekfac_fit.fit_weights(index, labels=labels, damping=1.0, seed=seed, head=head)
        # in the names below: the seed and head only where not the defaults (older runs' names stay comparable)
        labels += (f", seed {seed}" if seed else "") + (f", head {head}" if head != "diagonal" else "")
        fits[labels] = {**record, "seconds": time.perf_counter() - fit_started}
        print(f"fit ({labels}): {fits[labels]['seconds']:.0f} s", flush=True)
        variants = {
            "": factors,
            ", every tensor, no row norms": [dataclasses.replace(f, scale=1.0) for f in factors],
        }
        for damping in [float(d) for d in arguments.dampings.split(",")]:
            for label, fitted in variants.items():
                redamped = [dataclasses.replace(f, damping=f.damping * damping) for f in fitted]
                vector = ekfac.project(projector, ekfac.apply_factors(redamped, gradients)).numpy()
                name = f"+weight-space EK-FAC ({labels} labels, damping {damping}{label})"
                results[name] = lds(vector @ rows.T, masks, losses, triggered)
                summed = ekfac.combine([fisher, vector], rows)
                results[f"sum: Fisher (query norms) + EK-FAC weights ({labels}, {damping}{label})"] = lds(
                    summed @ rows.T, masks, losses, triggered
                )
                print(name, results[name]["lds"], flush=True)
    if arguments.ekfac_scores:
        kron = np.load(arguments.ekfac_scores)[chosen]
        results["kronfluence EK-FAC (weight space, every nn.Linear)"] = lds(kron, masks, losses, triggered)
        fisher_scores = fisher @ rows.T
        z = [(s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True) for s in (fisher_scores, kron)]
        results["analysis: z-scored Fisher (query norms) + kronfluence EK-FAC"] = lds(
            z[0] + z[1], masks, losses, triggered
        )
    index.lease.close()
    report = {
        "models": len(masks),
        "queries": len(chosen),
        "fits": fits,
        "methods": results,
    }
    if arguments.end_to_end == "on":
        report["end_to_end"] = end_to_end(
            folder,
            train_dir,
            prepared_rows=[query_rows[n] for n in chosen],
            masks=masks,
            losses=losses,
            triggered=triggered,
        )
        results.update(report["end_to_end"])
    if arguments.costs == "on":
        report["costs"] = costs(folder, train_dir, [query_rows[n] for n in chosen], arguments.repeats)
        report["exact_costs"] = exact_costs(folder, [query_rows[n] for n in chosen], arguments.repeats)
    report["seconds"] = time.perf_counter() - started
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    print_table(report)


def end_to_end(folder: Path, train_dir: Path, prepared_rows, masks, losses, triggered) -> dict:
    """LDS through `fit_index` (each kind's defaults) and the index's own query path."""
    from rapidin_index.ekfac_fit import fit_index_weights as fit_index
    from rapidin_index.retrieval import sketch_queries

    copy = folder / "indexes" / "ekfac-weights-end-to-end"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(train_dir, copy)
    out = {}
    for kind in ("ekfac-weights", "fisher+ekfac-weights"):
        record = fit_index(copy, kind=kind)
        index = Index.open(copy, device="cpu")
        _, rows = vector_index.stored_vectors(index.faiss_index)
        prepared = index._prepare_rows(prepared_rows, False, 0)
        vectors, _ = sketch_queries(index, prepared, per_token=False)
        out[f"end to end: fit --kind {kind} (its defaults), Index query path"] = {
            **lds(vectors @ rows.astype(np.float32).T, masks, losses, triggered),
            "fit_seconds": record["seconds"],
        }
        index.lease.close()
    return out


def timed(work) -> dict:
    """{"wall", "cpu"} seconds of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def query_medians(indexes: dict, prepared, repeats: int) -> tuple[dict, dict]:
    """({option: median {"wall", "cpu"}} of whole-generation queries through each opened index, interleaved
    ``repeats`` times; {option: the timed warm-up, a first query of two rows}) (a combination reads its
    sigma rows in that first query)."""
    first = {
        option: timed(lambda index=index: index.query_prepared(prepared[:2], 10, explain=0, per_token=False))
        for option, index in indexes.items()
    }
    samples = {option: {"wall": [], "cpu": []} for option in indexes}
    for _ in range(repeats):
        for option, index in indexes.items():
            took = timed(lambda index=index: index.query_prepared(prepared, 10, explain=0, per_token=False))
            for key in took:
                samples[option][key].append(took[key])
    medians = {
        option: {key: statistics.median(values) for key, values in sample.items()}
        for option, sample in samples.items()
    }
    return medians, first


def exact_costs(folder: Path, query_rows, repeats: int) -> dict:
    """The exact-vector recipe's costs beside today's: fresh builds of the train rows at K = 2^16
    (layer-normalised, RapidIn's index) and at K = 0 without layer norm (every tensor; the nn.Linear
    weights alone, float32 and float16), `fit --kind ekfac-weights` (its defaults) on the K = 0 ones, and
    whole-generation queries: today's (K = 2^16, none), each K = 0 index with none and ekfac-weights,
    interleaved."""
    from rapidin_index import build_index
    from rapidin_index.ekfac_fit import fit_index_weights as fit_index
    from rapidin_index.settings import BuildSettings, ModelSettings

    recipes = {  # name: (sketch, normalize, params, vector dtype)
        "today": (SketchSettings(65536), "layer", None, None),
        "K = 0 none": (SketchSettings(0), "none", None, None),
        "K = 0 none, linear": (SketchSettings(0), "none", LINEAR_PARAMS, None),
        "K = 0 none, linear, float16": (SketchSettings(0), "none", LINEAR_PARAMS, "float16"),
    }
    targets = {name: folder / "indexes" / f"costs-{number}" for number, name in enumerate(recipes)}
    out = {}
    for _ in range(max(1, repeats // 3)):
        for name, target in targets.items():
            shutil.rmtree(target, ignore_errors=True)
            sketch, normalize, params, dtype = recipes[name]
            settings = BuildSettings(
                ModelSettings(str(folder / "full"), params=params),
                sketch,
                normalize=normalize,
                batch_size=16,
                vector_dtype=dtype,
            )
            took = timed(
                lambda t=target, s=settings: build_index(folder / "train.jsonl", t, s, progress=False)
            )
            out.setdefault(f"build {name}", []).append(took)
    for name in recipes:
        out[f"build {name}"] = {
            m: statistics.median(t[m] for t in out[f"build {name}"]) for m in ("wall", "cpu")
        }
    indexes = {"today, none": Index.open(targets["today"], device="cpu", precondition="none")}
    for name in list(recipes)[1:]:
        out[f"fit ekfac-weights ({name})"] = timed(lambda t=targets[name]: fit_index(t, kind="ekfac-weights"))
        indexes[f"{name}, none"] = Index.open(targets[name], device="cpu", precondition="none")
        indexes[f"{name}, ekfac-weights"] = Index.open(
            targets[name], device="cpu", precondition="ekfac-weights"
        )
    prepared = indexes["today, none"]._prepare_rows(query_rows, False, 0)
    medians, _ = query_medians(indexes, prepared, repeats)
    for index in indexes.values():
        index.lease.close()
    base, built = medians["today, none"], out["build today"]
    for option, took in medians.items():
        out[f"queries {option}"] = took
        out[f"query ratio {option}"] = {key: took[key] / base[key] for key in base}
    for name in list(recipes)[1:]:
        out[f"build ratio {name}"] = {key: out[f"build {name}"][key] / built[key] for key in built}
        out[f"fit ratio {name}"] = {
            key: out[f"fit ekfac-weights ({name})"][key] / built[key] for key in built
        }
    print(json.dumps(out, indent=2), flush=True)
    return out


def costs(folder: Path, train_dir: Path, query_rows, repeats: int) -> dict:
    """A fresh build of the train rows, the ekfac-weights fit, and interleaved whole-generation queries."""
    from rapidin_index import build_index
    from rapidin_index.ekfac_fit import fit_index_weights as fit_index
    from rapidin_index.settings import BuildSettings, ModelSettings

    target = folder / "indexes" / "ekfac-weights-costs"
    shutil.rmtree(target, ignore_errors=True)
    settings = BuildSettings(
        ModelSettings(str(folder / "full")), SketchSettings(65536), normalize="layer", batch_size=16
    )
    out = {"build": timed(lambda: build_index(folder / "train.jsonl", target, settings, progress=False))}
    for kind in ("fisher+ekfac-weights", "ekfac-weights"):  # the combined fit first: fisher's file stays
        out[f"fit {kind}"] = timed(lambda kind=kind: fit_index(target, kind=kind))
        if kind == "fisher+ekfac-weights":
            saved = {p.name: p.read_bytes() for p in target.glob("*-g*.npz")}
            manifest_text = (target / "manifest.json").read_text()
    (target / "manifest.json").write_text(manifest_text)  # back to the combined fit: every option works
    for name, data in saved.items():
        (target / name).write_bytes(data)
    options = ("none", "fisher", "ekfac-weights", "fisher+ekfac-weights")
    indexes = {option: Index.open(target, device="cpu", precondition=option) for option in options}
    prepared = indexes["none"]._prepare_rows(query_rows, False, 0)
    medians, first = query_medians(indexes, prepared, repeats)
    for index in indexes.values():
        index.lease.close()
    for option in options:
        out[f"first query {option}"] = first[option]
    for option in options:
        out[f"queries {option}"] = medians[option]
    base = out["queries none"]
    for option in options[1:]:
        out[f"query ratio {option}"] = {k: out[f"queries {option}"][k] / base[k] for k in base}
    for kind in ("fisher+ekfac-weights", "ekfac-weights"):
        out[f"fit ratio {kind}"] = {k: out[f"fit {kind}"][k] / out["build"][k] for k in out["build"]}
    print(json.dumps(out, indent=2), flush=True)
    return out


def print_table(report: dict) -> None:
    print(f"\n{report['models']} models, {report['queries']} queries\n")
    print_methods(report["methods"], "| variant | LDS | triggered | clean |")


if __name__ == "__main__":
    main()
