"""Issue 23: the cost of a build with ``--optimizer-state`` against the plain build, in one run.

The LDS benchmark's setup (`lds.py`): nonlexical backdoor rows from 700 docstring rows (650 train), the
full tiny Llama (hidden 64, 2 layers, 2,000 tokens) fine-tuned with AdamW (its ``optimizer.pt`` saved as
a Trainer checkpoint does), K = 2^16, which resolves to rapidgrad-kron. Times, alternated, fresh folders,
medians of ``--repeats``:

* ``plain``                a build without the state;
* ``state``                a build with ``--optimizer-state`` (the scaled blocks materialised a row chunk
                           at a time and sketched by batched matmuls: `optimizer_state.add_scaled_block`);
* ``state, materialised``  the same build through the slow path kept as its reference
                           (``GradientSketcher.scaled_path = "materialise"``: the whole per-example
                           gradient, then the projector's coordinate-by-coordinate ``project_block``).

Then ``GradientSketcher.sketch`` alone is timed over the same batches in each mode (``sketcher_split``).
Wall seconds and this process's CPU seconds (torch on one thread: on a shared machine the CPU time is
the steadier measure). The builds' stored vectors are compared: the two state paths must agree to the float16 the vectors are stored in.

    .venv/bin/python benchmarks/optimizer_state_cost.py --out .bench/optimizer_state_cost.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import SMOKE_MODEL
from common import parse_arguments as parse_with_smoke

from rapidin_index.build import build_index
from rapidin_index.demo.datasets import load_docstring_rows, make_nonlexical_backdoor_dataset, write_jsonl
from rapidin_index.demo.finetune import FinetuneSettings, finetune
from rapidin_index.gradients import GradientSketcher
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings
from rapidin_index.store import vector_index

MODES = ("plain", "state", "state, materialised")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/optimizer_state_cost")
    parser.add_argument("--rows", type=int, default=700, help="docstring rows before the held-out split")
    parser.add_argument(
        "--epochs", type=int, default=1, help="fine-tuning epochs (the cost does not depend on them)"
    )
    parser.add_argument("--sketch-dim", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=".bench/optimizer_state_cost.json")
    # the smoke run: a 16-wide one-layer model (SMOKE_MODEL) on the 10 rows left after 2 x 25 held out, K = 2^8
    return parse_with_smoke(
        parser,
        folder="{smoke}/optimizer_state_cost",
        rows=60,
        sketch_dim=256,
        repeats=1,
        out="{smoke}/result.json",
    )


def prepare(folder: Path, rows: int, epochs: int, smoke: bool = False) -> Path:
    train, _, _ = make_nonlexical_backdoor_dataset(load_docstring_rows()[:rows], seed=0, heldout_count=25)
    write_jsonl(train, folder / "train.jsonl")
    model = folder / "model"
    if not (model / "optimizer.pt").exists():
        settings = FinetuneSettings(**SMOKE_MODEL) if smoke else FinetuneSettings(epochs=epochs)
        finetune(train, model, settings, progress=False)
    return folder / "train.jsonl"


def build(folder: Path, train: Path, mode: str, sketch_dim: int, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one build into a fresh ``out``."""
    state = None if mode == "plain" else str(folder / "model")
    settings = BuildSettings(
        ModelSettings(str(folder / "model")), SketchSettings(sketch_dim), batch_size=16, optimizer_state=state
    )
    GradientSketcher.scaled_path = "materialise" if mode.endswith("materialised") else "factors"
    shutil.rmtree(out, ignore_errors=True)
    started, cpu = time.perf_counter(), time.process_time()
    try:
        build_index(train, out, settings, progress=False)
    finally:
        GradientSketcher.scaled_path = "factors"
    return time.perf_counter() - started, time.process_time() - cpu


def sketcher_split(folder: Path, train: Path, sketch_dim: int, batches: int = 8) -> dict:
    """CPU seconds of ``GradientSketcher.sketch`` alone over the same batches of 16 (no tokenising, no
    writes): plain, with the state, with the state the materialised way; and, with the state, the share
    spent in `optimizer_state.add_scaled_block` (materialising, scaling and sketching the matrices)."""
    from rapidin_index import gradients
    from rapidin_index.capture import gradient_blocks
    from rapidin_index.data import load_examples, parse_template
    from rapidin_index.losses import collate
    from rapidin_index.models import load_model, select_parameters
    from rapidin_index.optimizer_state import add_scaled_block, load_scaling
    from rapidin_index.sketch import make_projector

    model_settings = ModelSettings(str(folder / "model"))
    loaded = load_model(model_settings)
    blocks = gradient_blocks(select_parameters(loaded.model, model_settings))
    examples, _ = load_examples(train, loaded.tokenizer, parse_template("auto"), 1024)
    pairs = [(e.input_ids, e.labels) for e in examples[: 16 * batches]]
    collated = [
        collate(pairs[i : i + 16], loaded.tokenizer.pad_token_id, "cpu") for i in range(0, len(pairs), 16)
    ]
    scaling = load_scaling(folder / "model", loaded.model, blocks, False)
    inside = [0.0]

    def timed(*arguments):
        started = time.process_time()
        try:
            return add_scaled_block(*arguments)
        finally:
            inside[0] += time.process_time() - started

    gradients.add_scaled_block = timed
    split = {}
    try:
        for mode in MODES:
            projector = make_projector(
                SketchSettings(sketch_dim), sum(b.numel for b in blocks), "cpu", blocks
            )
            sketcher = GradientSketcher(loaded.model, blocks, projector)
            sketcher.scaled_path = "materialise" if mode.endswith("materialised") else "factors"
            sketcher.use_optimizer_state(None if mode == "plain" else scaling)
            sketcher.sketch(collated[0])  # self-check and caches
            inside[0] = 0.0
            started = time.process_time()
            for batch in collated:
                sketcher.sketch(batch)
            split[mode] = {"cpu_seconds": time.process_time() - started, "in_add_scaled_block": inside[0]}
    finally:
        gradients.add_scaled_block = add_scaled_block
    return split


def stored(folder: Path) -> np.ndarray:
    ids, vectors = vector_index.stored_vectors(Index.open(folder, device="cpu").faiss_index)
    return vectors[np.argsort(ids)]


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    folder = Path(arguments.folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = prepare(folder, arguments.rows, arguments.epochs, arguments.smoke)
    build(folder, train, "state", arguments.sketch_dim, folder / "warm-up")  # imports, caches, page cache
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu_seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(arguments.repeats):
        for mode in MODES:
            out = folder / "timing" / f"{mode.replace(', ', '-')}-{repeat}"
            wall, cpu = build(folder, train, mode, arguments.sketch_dim, out)
            seconds[mode].append(wall)
            cpu_seconds[mode].append(cpu)
            print(f"{mode}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    cpu_medians = {mode: statistics.median(values) for mode, values in cpu_seconds.items()}
    vectors = {mode: stored(folder / "timing" / f"{mode.replace(', ', '-')}-0") for mode in MODES}
    difference = np.abs(vectors["state"] - vectors["state, materialised"]).max()
    scale = np.abs(vectors["state, materialised"]).max()
    report = {
        "rows": int(len(vectors["plain"])),
        "sketch_dim": arguments.sketch_dim,
        "algorithm": Index.open(folder / "timing" / "plain-0", device="cpu").manifest.sketch["algorithm"],
        "threads": arguments.threads,
        "seconds": seconds,
        "median_seconds": medians,
        "ratio_to_plain": {mode: medians[mode] / medians["plain"] for mode in MODES},
        "cpu_seconds": cpu_seconds,
        "median_cpu_seconds": cpu_medians,
        "cpu_ratio_to_plain": {mode: cpu_medians[mode] / cpu_medians["plain"] for mode in MODES},
        "state_paths_max_abs_difference": float(difference),
        "state_paths_max_abs_value": float(scale),
        "state_vs_plain_max_abs_difference": float(np.abs(vectors["state"] - vectors["plain"]).max()),
    }
    report["sketcher_split"] = sketcher_split(folder, train, arguments.sketch_dim)
    assert difference <= 2**-10 * max(1.0, scale), report  # stored as float16: one rounding apart at most
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    shown = ("median_seconds", "ratio_to_plain", "median_cpu_seconds", "cpu_ratio_to_plain", "sketcher_split")
    print(json.dumps({key: report[key] for key in shown}, indent=2))


if __name__ == "__main__":
    main()
