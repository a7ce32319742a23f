"""Issue 23: LDS of every query-side preconditioner on `lds.py`'s cached models (Fisher, K-FAC, EK-FAC, ...).

Run `benchmarks/lds.py` first (it trains the models in --folder); this script builds the K = 2^16 indexes it
still lacks (train rows and queries, with and without layer norm and the optimizer state, through
`lds.stored_pair`), fits each preconditioner once with the library's own code (`precondition.fit_fisher`,
`precondition.fit_kronecker`) and scores the held-out queries at each damping:

* fisher: the empirical Fisher of the stored rows per tensor (at most N directions a block);
* kfac / ekfac: Kronecker factors of each rapidgrad-kron piece (`kfac`), eigenvalues from the factors or
  refitted from the rows;
* the same with the query's per-tensor gradient norms put back (the rows stay layer-normalised: scores
  weigh each tensor by how strongly the query's loss pulls on it), and on indexes without layer norm;
* "both sides": (F + lambda I)^-1/2 on the query and the rows, the rows normalised again (analysis only).

    .venv/bin/python benchmarks/lds_kfac.py --folder .bench/lds --out .bench/lds-kfac.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import parse_arguments as parse_with_smoke
from lds import index_folder, linear_datamodeling_score, smoke_cache, stored_pair, subset_masks, summarize

from rapidin_index import SketchSettings
from rapidin_index.kfac import layouts
from rapidin_index.precondition import Preconditioner, fit_fisher, fit_kronecker, spans_for
from rapidin_index.store.manifest import read_manifest


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/lds")
    parser.add_argument("--dampings", default="0.1,0.3,1,3")
    parser.add_argument("--kinds", default="fisher,kfac,ekfac")
    parser.add_argument("--sides", default="query,query-norms,none")
    parser.add_argument("--adam", default="off,on")
    parser.add_argument("--sketch-dim", type=int, default=65536, help="K of the indexes (0: exact vectors)")
    parser.add_argument("--tensors", default="all", help="all, or linear: score the weight matrices alone")
    parser.add_argument(
        "--ekfac-scores", help="kronfluence's EK-FAC scores [queries, rows] (.npy) on these models"
    )
    parser.add_argument("--costs", default="off", choices=("on", "off"), help="time build, fits and queries")
    parser.add_argument("--end-to-end", default="off", choices=("on", "off"), help="LDS through fit + Index")
    parser.add_argument("--out", default=".bench/lds-kfac.json")
    # the smoke run: lds.py's smoke cache (made here, lds.smoke_cache: its K = 2^16 indexes are K = 2^12
    # rapidgrad-kron ones), one damping, one side with the optimizer state; the costs and end to end (real
    # K = 2^16 builds, whose K-FAC eigendecompositions take minutes) are left out
    return parse_with_smoke(
        parser,
        folder="{smoke}/lds",
        dampings="0.1",
        sides="query-norms",
        adam="on",
        out="{smoke}/result.json",
    )


def losses_and_masks(folder: Path) -> tuple[np.ndarray, np.ndarray, int]:
    stamp = json.loads((folder / "settings.json").read_text())
    rows = sum(1 for _ in open(folder / "train.jsonl"))
    masks = subset_masks(rows, stamp["models"], stamp["fraction"])
    losses = np.array(
        [
            json.loads((folder / "subsets" / f"{n:03d}" / "query_losses.json").read_text())
            for n in range(stamp["models"])
        ]
    )
    return masks, losses, stamp["queries"]


def fit(kind: str, train: np.ndarray, manifest, damping: float) -> list:
    if kind == "fisher":
        return fit_fisher(train, spans_for(manifest, "auto")[1], damping)
    return fit_kronecker(train, layouts(manifest), kind, damping, 512)


def redamp(blocks: list, factor: float) -> list:
    return [dataclasses.replace(block, damping=block.damping * factor) for block in blocks]


def query_norms(folder: Path, adam: bool, manifest, sketch_dim: int) -> np.ndarray:
    """[queries, K] factors that turn layer-normalised query sketches into plain ones: with rapidgrad-kron
    each tensor keeps its own bins, so the plain sketch of a tensor is its norm times the normalised one."""
    plain = stored_pair(folder, SketchSettings(sketch_dim), "none", adam)["queries"]
    layer = stored_pair(folder, SketchSettings(sketch_dim), "layer", adam)["queries"]
    factors = np.ones_like(layer, dtype=np.float64)
    for segment in layouts(manifest):
        block = slice(segment.start, segment.stop)
        norm_plain = np.linalg.norm(plain[:, block].astype(np.float64), axis=1)
        norm_layer = np.linalg.norm(layer[:, block].astype(np.float64), axis=1)
        factors[:, block] = (norm_plain / np.maximum(norm_layer, 1e-30))[:, None]
    return factors


def linear_mask(manifest) -> np.ndarray:
    """[K] 1 on the bins of 2-D weights other than the embedding (kronfluence's nn.Linear modules), else 0."""
    mask = np.zeros(manifest.sketch["output_dim"])
    names, shapes = manifest.parameters["names"], manifest.parameters["shapes"]
    for segment, name, shape in zip(layouts(manifest), names, shapes, strict=False):  # a trailing pad last
        if len(shape) == 2 and "embed" not in name:
            mask[segment.start : segment.stop] = 1.0
    return mask


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(1)
    folder = Path(arguments.folder)
    if arguments.smoke and not (folder / "settings.json").exists():
        smoke_cache(folder)
    sketch_dim = arguments.sketch_dim
    masks, losses, count = losses_and_masks(folder)
    dampings = [float(d) for d in arguments.dampings.split(",")]
    out = {}

    def record(name: str, scores: np.ndarray, extra: dict | None = None) -> None:
        result = summarize(linear_datamodeling_score(scores, masks, losses), count)
        out[name] = {key: result[key] for key in ("lds", "lds_triggered", "lds_clean")} | (extra or {})
        print(f"{name}: {out[name]['lds']:.3f}", flush=True)

    for adam in [value == "on" for value in arguments.adam.split(",")]:
        for side in arguments.sides.split(","):
            normalize = "none" if side == "none" else "layer"
            pair = stored_pair(folder, SketchSettings(sketch_dim), normalize, adam)
            manifest = read_manifest(
                index_folder(folder, SketchSettings(sketch_dim), normalize, adam, "train")
            )
            train = pair["train"].astype(np.float32)
            queries = pair["queries"].astype(np.float64)
            if side == "query-norms":
                queries = queries * query_norms(folder, adam, manifest, sketch_dim)
            if arguments.tensors == "linear":
                queries = queries * linear_mask(manifest)
            label = f"{'adam, ' if adam else ''}{side}"
            record(f"no preconditioner ({label})", queries @ train.T.astype(np.float64))
            for kind in arguments.kinds.split(","):
                started = time.perf_counter()
                fitted = fit(kind, train, manifest, 1.0)
                seconds = time.perf_counter() - started
                for damping in dampings:
                    preconditioner = Preconditioner(redamp(fitted, damping), {})
                    scores = preconditioner.apply(queries).astype(np.float64) @ train.T.astype(np.float64)
                    record(f"{kind}, damping {damping} ({label})", scores, {"fit_seconds": seconds})
    if arguments.ekfac_scores:
        record("kronfluence EK-FAC (weight space, every nn.Linear)", np.load(arguments.ekfac_scores))
    report = {"methods": out, "costs": costs(folder) if arguments.costs == "on" else None}
    if arguments.end_to_end == "on":  # after costs: it refits the index costs built
        report["end_to_end"] = end_to_end(folder, masks, losses, count)
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["costs"], indent=2))


def end_to_end(folder: Path, masks, losses, count: int) -> dict:
    """LDS of each kind's default fit through the library alone: `fit_index` on the costs' index, queries
    sketched and preconditioned by `Index` (query norms included), scored against its stored rows."""
    from rapidin_index.precondition import fit_index
    from rapidin_index.retrieval import Index, sketch_queries
    from rapidin_index.store import vector_index

    index_dir = folder / "timing-kinds"
    rows = [json.loads(line) for line in open(folder / "queries.jsonl")]
    out = {}
    for kind in ("fisher", "kfac", "ekfac"):
        fit_index(index_dir, kind=kind)
        index = Index.open(index_dir, device="cpu")
        ids, train = vector_index.stored_vectors(index.faiss_index)
        assert np.array_equal(ids, np.arange(len(ids)))
        prepared = [index.prepare(row["instruction"], row["output"]) for row in rows]
        vectors = sketch_queries(index, prepared, per_token=False)[0].astype(np.float64)
        result = summarize(
            linear_datamodeling_score(vectors @ train.T.astype(np.float64), masks, losses), count
        )
        out[f"{kind} (fit defaults, through Index)"] = result["lds"]
        print(f"end to end, {kind}: {result['lds']:.3f}", flush=True)
    return out


def costs(folder: Path) -> dict:
    """Seconds of a plain K = 2^16 build of the train rows, of each kind's fit on it, and of the 50 held-out
    whole-generation queries without and with each fit (medians of 3, one warm-up), in this run."""
    import shutil

    from rapidin_index.build import build_index
    from rapidin_index.precondition import fit_index
    from rapidin_index.retrieval import Index
    from rapidin_index.settings import BuildSettings, ModelSettings

    index_dir = folder / "timing-kinds"
    shutil.rmtree(index_dir, ignore_errors=True)
    settings = BuildSettings(ModelSettings(str(folder / "full")), SketchSettings(65536), batch_size=16)
    started = time.perf_counter()
    build_index(folder / "train.jsonl", index_dir, settings, progress=False)
    seconds = {"build": time.perf_counter() - started}
    queries = [json.loads(line) for line in open(folder / "queries.jsonl")]
    for kind in ("none", "fisher", "kfac", "ekfac"):
        if kind != "none":
            started = time.perf_counter()
            fit_index(index_dir, kind=kind)
            seconds[f"fit {kind}"] = time.perf_counter() - started
        index = Index.open(index_dir, device="cpu", precondition=kind)
        prepared = [index.prepare(row["instruction"], row["output"]) for row in queries]
        index.query_prepared(prepared[:2], 10, explain=0, per_token=False)  # warm-up
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            index.query_prepared(prepared, 10, explain=0, per_token=False)
            runs.append(time.perf_counter() - started)
        seconds[f"query {kind}"] = float(np.median(runs))
    ratios = {key: value / seconds["build"] for key, value in seconds.items() if key.startswith("fit")}
    ratios |= {
        key: value / seconds["query none"] for key, value in seconds.items() if key.startswith("query")
    }
    return {"seconds": seconds, "ratios": ratios}


if __name__ == "__main__":
    main()
