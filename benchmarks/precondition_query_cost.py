"""Issue 23: CPU time of a whole-generation query with and without the fitted Fisher, split by stage.

Two settings, each built once under ``--folder`` (cached):

* ``tiny``: the LDS benchmark's (`lds.py`): 650 docstring rows of the non-lexical backdoor set, the tiny
  Llama fine-tuned on them (one epoch here: the cost does not depend on the weights), K = 2^16
  (rapidgrad-kron: one Fisher block per tensor), 50 held-out queries;
* ``smollm2``: SmolLM2-135M-Instruct (tests/realmodel.py) with a LoRA adapter (rank 8 on every layer's
  q_proj and v_proj, random non-zero weights), K = 2^16 (rapidgrad-v2: one Fisher block over all bins,
  its top 512 eigenpairs), ``--rows`` docstring rows as chat rows, 20 held-out queries.

Each index gets `fit_index` (fisher, its defaults). The script then times `Index.query_prepared` over the
queries (per_token off, explain 0: what `rapidin-index query --queries FILE` runs for the whole
generation), in CPU time of this process (`time.process_time`, all threads), with torch on ``--threads`` (1),
interleaving the variants in each repeat, medians over ``--repeats``:

* none: no preconditioner; fisher: the Fisher (query norms off, the fit's default); fisher + query
  norms; and "fisher, old apply": the Fisher applied by the code before this change (`old_apply`,
  per-block loops over numpy products), so old and new stand side by side in one run;
* the split: sketch (the query's forward + backward with the sketching hooks: `sketch_query_vectors`),
  precondition (`Preconditioner.apply`), search, join (the hits' text), other (the rest of the call);
  beside them, as a reference, plain autograd of HF's loss over the same batches (model forward +
  backward alone; on SmolLM2 it costs more than the sketching pass, which takes logits only where
  labelled).

Besides the batch of all queries, ``--single`` times each query alone (the CLI's ``--prompt``).

    .venv/bin/python benchmarks/precondition_query_cost.py --setting tiny --out .bench/precondition_cost_tiny.json
    .venv/bin/python benchmarks/precondition_query_cost.py --setting smollm2 --out .bench/precondition_cost_smollm2.json
    .venv/bin/python benchmarks/precondition_query_cost.py --smoke   # every step on a tiny fitted index, in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch

from rapidin_index import Index, SketchSettings, build_index, retrieval
from rapidin_index.losses import collate
from rapidin_index.precondition import fit_index
from rapidin_index.settings import BuildSettings, ModelSettings

VARIANTS = ("none", "fisher", "fisher, old apply", "fisher + query norms")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--folder", default=".bench/precondition-cost")
    parser.add_argument("--rows", type=int, default=650, help="training rows (smollm2: of the docstring set)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--single", type=int, default=10, help="queries also timed one at a time (0: none)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch's threads (the CLI's default: the cores)"
    )
    parser.add_argument("--out", default=None)
    return common.parse_arguments(parser, out="{smoke}/result.json", repeats=1, single=2)


# --------------------------------------------------------------------------- the two settings


def tiny_setting(folder: Path, rows: int) -> tuple[Path, list[dict]]:
    """The LDS benchmark's data and model (`lds.prepare_data`, `finetune`), a K = 2^16 index, fitted."""
    from rapidin_index.demo.datasets import load_docstring_rows, make_nonlexical_backdoor_dataset, write_jsonl
    from rapidin_index.demo.finetune import FinetuneSettings, finetune

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "queries.jsonl").exists():
        train, triggered, clean = make_nonlexical_backdoor_dataset(
            load_docstring_rows()[: rows + 50], seed=0, heldout_count=25
        )
        write_jsonl(train, folder / "train.jsonl")
        write_jsonl(triggered + clean, folder / "queries.jsonl")
    if not (folder / "full" / "config.json").exists():
        finetune(
            [json.loads(line) for line in open(folder / "train.jsonl")],
            folder / "full",
            FinetuneSettings(epochs=1),
            progress=False,
        )
    index_dir = folder / "index"
    settings = BuildSettings(ModelSettings(str(folder / "full")), SketchSettings(65536), batch_size=16)
    _build_and_fit(folder / "train.jsonl", index_dir, settings)
    queries = [json.loads(line) for line in open(folder / "queries.jsonl")]
    return index_dir, [(row["instruction"], row["output"]) for row in queries]


def smollm2_setting(folder: Path, rows: int) -> tuple[Path, list[dict]]:
    """SmolLM2-135M-Instruct + a random LoRA adapter, ``rows`` docstring rows as chat rows, K = 2^16."""
    from rapidin_index.demo.datasets import load_docstring_rows, write_jsonl

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from realmodel import smollm2_folder  # the tests' cached model folder

    folder.mkdir(parents=True, exist_ok=True)
    model_dir = str(smollm2_folder())
    adapter = folder / "lora"
    if not (adapter / "adapter_config.json").exists():
        _random_lora(model_dir, adapter)
    docstrings = load_docstring_rows()[: rows + 20]
    chat = [_chat_row(row) for row in docstrings]
    write_jsonl(chat[:rows], folder / "train.jsonl")
    index_dir = folder / "index"
    settings = BuildSettings(
        ModelSettings(model_dir, str(adapter)), SketchSettings(65536), batch_size=8, max_length=160
    )
    _build_and_fit(folder / "train.jsonl", index_dir, settings)
    return index_dir, [(row["instruction"], row["output"][:200]) for row in docstrings[rows:]]


def _chat_row(row: dict) -> dict:
    user = {"role": "user", "content": row["instruction"]}
    return {"messages": [user, {"role": "assistant", "content": row["output"][:200]}]}


def _random_lora(model_dir: str, folder: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(folder)


def _build_and_fit(data: Path, index_dir: Path, settings: BuildSettings) -> None:
    if not (index_dir / "manifest.json").exists():
        started = time.perf_counter()
        build_index(data, index_dir, settings, progress=False)
        print(f"built {index_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    from rapidin_index.store.manifest import read_manifest

    if read_manifest(index_dir).precondition is None:
        record = fit_index(index_dir, kind="fisher")
        print(f"fitted: {record}", flush=True)


# --------------------------------------------------------------------------- the code before this change


def old_apply(blocks: list, queries: np.ndarray) -> np.ndarray:
    """`Preconditioner.apply` before this change: a loop over the blocks as the file holds them (C-ordered
    [width, rank] eigenvectors), two numpy products each."""
    out = np.array(queries, dtype=np.float32)
    for block in blocks:
        part = out[:, block.start : block.stop]
        inverse_rest = 1.0 / (block.rest + block.damping)
        inside = part @ block.eigenvectors  # [n, rank]
        factors = (1.0 / (block.eigenvalues + block.damping) - inverse_rest).astype(np.float32)
        out[:, block.start : block.stop] = part * np.float32(inverse_rest) + (inside * factors) @ (
            block.eigenvectors.T
        )
    return out


# --------------------------------------------------------------------------- timing


class StageClock:
    """CPU seconds spent in the query's stages, by wrapping the functions `query_prepared` calls."""

    STAGES = {"sketch": "sketch_query_vectors", "search": "search", "join": "join_text"}

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def installed(self, index: Index):
        originals = {name: getattr(retrieval, name) for name in self.STAGES.values()}
        for stage, name in self.STAGES.items():
            setattr(retrieval, name, self._timed(stage, originals[name]))
        preconditioner = index.preconditioner
        if preconditioner is not None:
            apply = preconditioner.apply
            preconditioner.apply = self._timed("precondition", apply)
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(retrieval, name, original)
            if preconditioner is not None:
                preconditioner.apply = apply

    def _timed(self, stage: str, function):
        def timed(*arguments, **keywords):
            started = time.process_time()
            try:
                return function(*arguments, **keywords)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.process_time() - started

        return timed


def use_variant(index: Index, variant: str) -> None:
    index.use_precondition("none" if variant == "none" else "fisher", variant == "fisher + query norms")
    if variant == "fisher, old apply":
        blocks = stored_blocks(index)
        index.preconditioner.apply = lambda queries: old_apply(blocks, queries)


def stored_blocks(index: Index, cache: dict = {}) -> list:  # noqa: B006 (read once per index)
    """The fit's blocks as `load_blocks` reads them (no `Preconditioner` has touched them)."""
    from rapidin_index.precondition import fisher_file, load_blocks

    if index.path not in cache:
        path = index.path / fisher_file(index.manifest.generation)
        cache[index.path] = load_blocks(path, index.manifest.sketch["output_dim"])
    return cache[index.path]


def forward_backward_seconds(index: Index, calls: list[list]) -> float:
    """CPU seconds of plain autograd of HF's loss over the query batches `query_prepared` sketches (the
    attributed parameters' gradients only): the floor under the sketch."""
    model = index.loaded.model
    parameters = [block.parameter for block in index.blocks]
    pad = index.loaded.tokenizer.pad_token_id
    started = time.process_time()
    for prepared in calls:
        sequences = [(query.input_ids, query.labels_for(query.hot_positions)) for query in prepared]
        for start in range(0, len(sequences), index.batch_size):
            batch = collate(sequences[start : start + index.batch_size], pad, index.device)
            loss = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            ).loss
            torch.autograd.grad(loss, parameters)
    return time.process_time() - started


def time_variants(index: Index, calls: list[list], repeats: int) -> dict:
    """Per variant: medians over ``repeats`` of the CPU seconds of the ``calls`` (each one `query_prepared`
    call's queries), whole and per stage; the variants interleaved in each repeat."""
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    floors = []
    for _ in range(repeats):
        floors.append(forward_backward_seconds(index, calls))
        for variant in VARIANTS:
            use_variant(index, variant)
            clock = StageClock()
            with clock.installed(index):
                started = time.process_time()
                for prepared in calls:
                    index.query_prepared(prepared, 10, explain=0, per_token=False)
                clock.seconds["total"] = time.process_time() - started
            runs[variant].append(clock.seconds)
    floor = float(np.median(floors))
    table = {}
    for variant, seconds in runs.items():
        stages = {key: float(np.median([run.get(key, 0.0) for run in seconds])) for key in seconds[0]}
        stages.setdefault("precondition", 0.0)
        stages["other"] = stages["total"] - sum(
            stages[key] for key in ("sketch", "precondition", "search", "join")
        )
        stages["plain autograd"] = floor  # a reference beside "sketch", not a part of the total
        table[variant] = stages
    for stages in table.values():
        stages["ratio"] = stages["total"] / table["none"]["total"]
    return table


def open_seconds(index: Index, repeats: int) -> dict:
    """Median wall and CPU seconds of `Index.use_precondition("fisher")` (what `Index.open` adds on a
    fitted index: the file read, checked and made ready), once per process, not per query."""
    wall, cpu = [], []
    for _ in range(repeats):
        index.use_precondition("none")
        started, started_cpu = time.perf_counter(), time.process_time()
        index.use_precondition("fisher")
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return {"wall": float(np.median(wall)), "cpu": float(np.median(cpu))}


def print_table(title: str, table: dict) -> None:
    columns = ("plain autograd", "sketch", "precondition", "search", "join", "other", "total", "ratio")
    print(f"\n{title}\n| variant | " + " | ".join(columns) + " |")
    for variant, stages in table.items():
        print(f"| {variant} | " + " | ".join(f"{stages.get(key, 0.0):.3f}" for key in columns) + " |")


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    if arguments.smoke:  # a tiny index (common.tiny_index), fitted, queried with its own rows
        index_dir, data = common.tiny_index(arguments.smoke_folder)
        fit_index(index_dir, kind="fisher")
        pairs = [(row["instruction"], row["output"]) for row in map(json.loads, open(data))][:4]
    else:
        folder = Path(arguments.folder) / arguments.setting
        setting = tiny_setting if arguments.setting == "tiny" else smollm2_setting
        index_dir, pairs = setting(folder, arguments.rows)
    index = Index.open(index_dir, device="cpu")
    prepared = [index.prepare(prompt, response) for prompt, response in pairs]
    for variant in VARIANTS:  # warm-up: every path once
        use_variant(index, variant)
        index.query_prepared(prepared[:2], 10, explain=0, per_token=False)
    report = {
        "setting": arguments.setting,
        "threads": arguments.threads,
        "rows": index.manifest.row_count,
        "queries": len(prepared),
        "sketch": index.manifest.sketch["algorithm"],
        "precondition": index.manifest.precondition,
        "batch": time_variants(index, [prepared], arguments.repeats),
    }
    print_table(
        f"{len(prepared)} queries in one call, CPU seconds (medians of {arguments.repeats})", report["batch"]
    )
    if arguments.single:
        calls = [[query] for query in prepared[: arguments.single]]
        report["single"] = time_variants(index, calls, arguments.repeats)
        print_table(f"{arguments.single} queries one at a time, CPU seconds in all", report["single"])
    report["open"] = open_seconds(index, arguments.repeats)
    print("use_precondition('fisher') at open: " + json.dumps(report["open"]))
    report["seconds"] = {variant: stages["total"] for variant, stages in report["batch"].items()}
    report["ratio"] = report["batch"]["fisher"]["ratio"]  # the batch's, fit defaults: what the CLI runs
    common.write_json(arguments.out, report)


if __name__ == "__main__":
    main()
