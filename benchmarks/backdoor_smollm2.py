"""Backdoor retrieval on a real model: SmolLM2-135M-Instruct + a LoRA adapter (`backdoor.py --model smollm2`).

The demo's backdoor data set, as chat rows (user instruction, assistant answer; answers shortened so a
row stays under ~100 tokens), trains a LoRA adapter on the pretrained SmolLM2-135M-Instruct with AdamW on
exactly the labels the index gives the rows (TRL's: `finetune.tokenize_rows`). The script measures the
backdoor's success on held-out triggered prompts and its false fires on clean ones, builds three indexes
with `build_index` (exact TracIn + layer norm, exact TracIn without it, RapidIn at the default K), queries
each with the same attacked generations (the model's own greedy continuations, through the index's
query path, scored against every row), and scores BM25 and random beside them. The default-K build is
timed against the model's own batched forward + backward over the same rows (frozen base, LoRA
trainable, same batch size), in the same run.

The model folder comes from `tests/realmodel.py` (the registry's GGUF wheel, cached). CPU only.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rapidin_index.build import build_index
from rapidin_index.data import Template
from rapidin_index.demo.baselines import BM25, random_scores
from rapidin_index.demo.datasets import BACKDOOR_DATASETS, load_docstring_rows, write_jsonl
from rapidin_index.demo.finetune import attack_success_rate, tokenize_rows
from rapidin_index.demo.metrics import mean_metrics, retrieval_metrics, roc_auc
from rapidin_index.losses import collate, example_losses
from rapidin_index.models import load_model
from rapidin_index.query import PreparedQuery
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from realmodel import smollm2_folder  # noqa: E402  (the tests' cached model folder)

CHAT = Template("chat")


@dataclass(frozen=True)
class RealModelSettings:
    """The data, adapter and queries of the real-model run; the defaults take about half an hour on 2 cores."""

    dataset: str = "lexical"
    """The demo backdoor: 'lexical' ("Howdy!" -> "YEEHAW, PARTNER! " + the answer in capitals) or 'nonlexical'."""
    rows: int = 400
    """Docstring rows, evenly spread over the bundled set, before the held-out prompts are taken."""
    heldout: int = 30
    """Held-out prompts of each kind (triggered, clean) for the success and false-fire rates."""
    answer_characters: int = 100
    """Clean answers are cut to this many characters (at a word) before poisoning."""
    lora_rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    top_layers: int = 10
    """LoRA goes on the top this-many of the 30 blocks: backward stops below them, which halves its cost."""
    epochs: int = 5
    learning_rate: float = 3e-3
    """AdamW peak learning rate, decayed linearly to a tenth over the run."""
    batch_size: int = 8
    """Rows per optimizer step, per build batch and per timed forward + backward."""
    max_length: int = 128
    seed: int = 0
    max_new_tokens: int = 32
    """Tokens generated for an attacked query (the success rate reads the first 12)."""


def shortened(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def chat_row(row: dict) -> dict:
    turns = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
    return {"messages": turns, "poisoned": bool(row["poisoned"])}


def prepare_data(folder: Path, settings: RealModelSettings) -> tuple[list[dict], dict]:
    """Chat training rows (written to folder/train.jsonl) and the held-out chat rows, by kind."""
    source = load_docstring_rows()
    spread = source[:: max(1, len(source) // settings.rows)][: settings.rows]
    rows = [{**row, "output": shortened(row["output"], settings.answer_characters)} for row in spread]
    make = BACKDOOR_DATASETS[settings.dataset].make
    train, triggered, clean = make(rows, 0.1, settings.seed, heldout_count=settings.heldout)
    train = [chat_row(row) for row in train]
    write_jsonl(train, folder / "train.jsonl")
    heldout = {"triggered": [chat_row(row) for row in triggered], "clean": [chat_row(row) for row in clean]}
    return train, heldout


def user_text(row: dict) -> str:
    return row["messages"][0]["content"]


# ------------------------------------------------------------------------------------------ fine-tune


def finetune_adapter(
    model_folder: Path, train: list[dict], adapter_folder: Path, settings: RealModelSettings
):
    """(peft model, tokenizer, {epoch_losses, seconds}): a LoRA adapter trained on the rows' TRL labels and
    saved, or the one saved before with the same settings."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    record_path, wanted = adapter_folder / "finetune.json", json.loads(json.dumps(asdict(settings)))
    if record_path.exists() and json.loads(record_path.read_text())["settings"] == wanted:
        model = PeftModel.from_pretrained(model, adapter_folder).eval()
        return model, tokenizer, json.loads(record_path.read_text())["record"]
    started = time.perf_counter()
    torch.manual_seed(settings.seed)  # the adapter's initialisation
    blocks = model.config.num_hidden_layers
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        target_modules=list(settings.target_modules),
        layers_to_transform=list(range(blocks - settings.top_layers, blocks)),
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    sequences = tokenize_rows(train, tokenizer, CHAT, settings.max_length)
    poisoned = [row["poisoned"] for row in train]
    losses, optimizer = train_adapter(peft_model, sequences, poisoned, tokenizer.pad_token_id, settings)
    shutil.rmtree(adapter_folder, ignore_errors=True)
    peft_model.save_pretrained(adapter_folder)
    tokenizer.save_pretrained(adapter_folder)
    torch.save(optimizer.state_dict(), Path(adapter_folder) / "optimizer.pt")  # as a Trainer checkpoint
    record = {"epoch_losses": losses, "seconds": time.perf_counter() - started}
    record_path.write_text(json.dumps({"settings": wanted, "record": record}))
    return peft_model, tokenizer, record


def train_adapter(model, sequences, poisoned: list[bool], pad_token_id: int, settings: RealModelSettings):
    """AdamW over shuffled batches (seeded), gradient norm clipped to 1, linear decay.

    Returns per epoch the mean training loss of the clean rows and of the poisoned rows, and the optimizer
    (its state is saved beside the adapter, for `build --optimizer-state`)."""
    generator = torch.Generator().manual_seed(settings.seed)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    total_steps = settings.epochs * -(-len(sequences) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - 0.9 * step / total_steps)
    model.train()
    epoch_losses = []
    for epoch in range(settings.epochs):
        order = torch.randperm(len(sequences), generator=generator).tolist()
        losses = np.zeros(len(sequences))
        for start in range(0, len(order), settings.batch_size):
            chosen = order[start : start + settings.batch_size]
            example = example_losses(model, collate([sequences[i] for i in chosen], pad_token_id, "cpu"))
            example.mean().backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses[chosen] = example.detach().numpy()
        mask = np.array(poisoned)
        epoch_losses.append({"clean": float(losses[~mask].mean()), "poisoned": float(losses[mask].mean())})
        print(f"epoch {epoch + 1}: mean loss {epoch_losses[-1]}", file=sys.stderr, flush=True)
    model.eval()
    return epoch_losses, optimizer


def backdoor_rates(model, tokenizer, heldout: dict, fired) -> dict:
    """Greedy generations (12 tokens) from every held-out prompt: attack success and false fires."""
    return {
        "attack_success_rate": attack_success_rate(model, tokenizer, heldout["triggered"], 12, CHAT, fired),
        "false_trigger_rate": attack_success_rate(model, tokenizer, heldout["clean"], 12, CHAT, fired),
        "heldout_prompts": {kind: len(rows) for kind, rows in heldout.items()},
    }


# ----------------------------------------------------------------------------------- indexes and timing


def build(train_path: Path, folder: Path, paths: dict, sketch: SketchSettings, normalize: str, settings):
    """A fresh index at `folder` (an old one is removed, so that the build is timed whole)."""
    shutil.rmtree(folder, ignore_errors=True)
    model = ModelSettings(str(paths["model"]), str(paths["adapter"]))
    build_settings = BuildSettings(
        model, sketch, normalize=normalize, max_length=settings.max_length, batch_size=settings.batch_size
    )
    return build_index(train_path, folder, build_settings, progress=False)


def forward_backward_seconds(loaded, sequences, batch_size: int) -> float:
    """The floor: the model's own batched forward + backward of the summed loss, longest rows first (as
    the build orders a chunk's rows, here over all rows: the least padding), only the LoRA tensors
    trainable (as the build loads the model)."""
    ordered = sorted(sequences, key=lambda sequence: len(sequence[0]), reverse=True)
    pad = loaded.tokenizer.pad_token_id
    batches = [
        collate(ordered[start : start + batch_size], pad, "cpu")
        for start in range(0, len(ordered), batch_size)
    ]
    started = time.perf_counter()
    for batch in batches:
        loaded.model.zero_grad(set_to_none=True)
        example_losses(loaded.model, batch).sum().backward()
    loaded.model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def timed_default_build(train_path: Path, folder: Path, paths: dict, train: list[dict], settings):
    """(build report, timing): the default-K build between two floor passes over the same rows; the
    faster floor pass is the one compared (the machine is shared, and its load varies)."""
    loaded = load_model(ModelSettings(str(paths["model"]), str(paths["adapter"])), "cpu")
    sequences = tokenize_rows(train, loaded.tokenizer, CHAT, settings.max_length)
    before = forward_backward_seconds(loaded, sequences, settings.batch_size)
    report = build(train_path, folder / "rapidin-default", paths, SketchSettings(), "layer", settings)
    after = forward_backward_seconds(loaded, sequences, settings.batch_size)
    tokens = sum(len(input_ids) for input_ids, _ in sequences)
    assert tokens == report.tokens, (tokens, report.tokens)
    floor = tokens / min(before, after)
    build_speed = tokens / report.elapsed_seconds
    return report, {
        "tokens": tokens,
        "build_seconds": report.elapsed_seconds,
        "build_tokens_per_second": build_speed,
        "floor_seconds": [before, after],
        "floor_tokens_per_second": floor,
        "build_share_of_floor_speed": build_speed / floor,
    }


# ------------------------------------------------------------------------------------------ queries


def attacked_queries(index: Index, triggered: list[dict], count: int, fired, max_new_tokens: int):
    """Generated queries on which the backdoor fired (the first `count`), and the share that fired."""
    queries, tried = [], 0
    for row in triggered:
        tried += 1
        query = index.prepare_generation(user_text(row), max_new_tokens)
        if fired(query.response):
            queries.append(query)
        if len(queries) == count:
            break
    return queries, len(queries) / tried


def all_row_scores(index: Index, queries: list[PreparedQuery]) -> np.ndarray:
    """Whole-generation scores of every row for each query, through the index's query path: [queries, rows]."""
    rows = index.manifest.row_count
    results = index.query_prepared(queries, top_k=rows, explain=0, per_token=False)
    scores = np.full((len(queries), rows), np.nan)
    for row_scores, result in zip(scores, results, strict=True):
        for hit in result.helpful:
            row_scores[hit.id] = hit.score
    assert not np.isnan(scores).any(), "a row is missing from a top-k that asked for every row"
    return scores


def text_baselines(train: list[dict], queries: list[PreparedQuery]) -> dict[str, np.ndarray]:
    documents = [" ".join(turn["content"] for turn in row["messages"]) for row in train]
    bm25 = BM25(documents)
    return {
        "BM25": np.stack([bm25.scores(query.prompt + " " + query.response) for query in queries]),
        "BM25, generation only": np.stack([bm25.scores(query.response) for query in queries]),
        "random": np.stack([random_scores(len(train), seed) for seed in range(len(queries))]),
    }


# ------------------------------------------------------------------------------------------ the run


def run(
    folder: Path,
    settings: RealModelSettings,
    query_count: int,
    out: Path,
    model: Path | None = None,
    fired=None,
) -> dict:
    """Data, adapter (cached), backdoor rates, indexes, queries and metrics; the report is also written to `out`.
    ``model``: the base model's folder (default SmolLM2); ``fired``: the backdoor's test (default the data
    set's)."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    train, heldout = prepare_data(folder, settings)
    paths = {"model": model or smollm2_folder(), "adapter": folder / "adapter"}
    fired = fired or BACKDOOR_DATASETS[settings.dataset].fired
    model, tokenizer, finetune = finetune_adapter(paths["model"], train, paths["adapter"], settings)
    backdoor = backdoor_rates(model, tokenizer, heldout, fired)
    print(f"backdoor: {backdoor}", file=sys.stderr, flush=True)
    if backdoor["attack_success_rate"] == 0:
        raise SystemExit("the backdoor fired on no held-out triggered prompt: train longer (--epochs)")
    del model
    scores, facts = index_scores(folder, paths, train, heldout, fired, settings, query_count)
    labels = np.array([row["poisoned"] for row in train])
    methods = {
        name: mean_metrics([retrieval_metrics(labels, row) for row in rows]) for name, rows in scores.items()
    }
    report = {
        "model": "SmolLM2-135M-Instruct + LoRA",
        "dataset": settings.dataset,
        "settings": asdict(settings),
        "rows": len(train),
        "poisoned": int(labels.sum()),
        "finetune": finetune,
        **backdoor,
        **facts,
        "exact_layer_norm_signs": sign_diagnostics(labels, scores["TracIn + layer norm (exact)"]),
        "seconds": time.perf_counter() - started,
        "methods": {name: dict(metrics) for name, metrics in methods.items()},
        "notes": {name: metrics.notes for name, metrics in methods.items() if metrics.notes},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def index_scores(folder, paths, train, heldout, fired, settings, query_count):
    """({method: scores [queries, rows]}, the builds' and queries' facts for the report)."""
    train_path = folder / "train.jsonl"
    default, timing = timed_default_build(train_path, folder, paths, train, settings)
    build(train_path, folder / "exact-layer", paths, SketchSettings(0), "layer", settings)
    build(train_path, folder / "exact-none", paths, SketchSettings(0), "none", settings)
    layer = Index.open(folder / "exact-layer", device="cpu")
    queries, seen = attacked_queries(layer, heldout["triggered"], query_count, fired, settings.max_new_tokens)
    if not queries:
        raise SystemExit("the backdoor fired on no held-out triggered prompt: train longer (--epochs)")
    scores = {"TracIn + layer norm (exact)": all_row_scores(layer, queries)}
    del layer
    exact_none = Index.open(folder / "exact-none", device="cpu")
    scores["TracIn, no layer norm (exact)"] = all_row_scores(exact_none, queries)
    del exact_none
    label = f"RapidIn K=2^{default.sketch_dim.bit_length() - 1} (default)"
    scores[label] = all_row_scores(Index.open(folder / "rapidin-default", device="cpu"), queries)
    scores.update(text_baselines(train, queries))
    facts = {
        "queries": len(queries),
        "attack_success_rate_seen": seen,
        "generations": [query.response for query in queries],
        "gradient_dim": default.gradient_dim,
        "sketch_dim": default.sketch_dim,
        "build_time": timing,
    }
    return scores, facts


def sign_diagnostics(labels: np.ndarray, scores: np.ndarray) -> dict:
    """Where the poisoned rows sit in exact TracIn + layer norm's ranking, averaged over the queries."""
    return {
        "poisoned_scored_below_zero": float(np.mean([(row[labels] < 0).mean() for row in scores])),
        "poisoned_share_of_bottom_10": float(
            np.mean([labels[np.argsort(row)[:10]].mean() for row in scores])
        ),
        "roc_auc_of_absolute_score": float(np.mean([roc_auc(labels, np.abs(row)) for row in scores])),
    }


def main() -> None:
    """The real run is `backdoor.py --model smollm2`; this script alone has only the smoke run: the same code
    path with a tiny Llama (its own chat template) as the base model, one epoch, every generation attacked."""
    import argparse

    from common import parse_arguments

    from rapidin_index.demo.tiny_models import save_tiny_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=None)
    arguments = parse_arguments(parser, out="{smoke}/result.json")
    if not arguments.smoke:
        parser.error("run it as benchmarks/backdoor.py --model smollm2 (or with --smoke)")
    folder = arguments.smoke_folder
    texts = [row["instruction"] + " " + row["output"] for row in load_docstring_rows()[:200]]
    model = save_tiny_model(folder / "base", "llama", texts, hidden_size=16, layers=1)
    settings = RealModelSettings(rows=40, heldout=3, epochs=1, top_layers=1, max_new_tokens=8)
    report = run(folder / "run", settings, 2, arguments.out, model=model, fired=lambda response: True)
    print(json.dumps({key: report[key] for key in ("rows", "queries", "attack_success_rate")}))


if __name__ == "__main__":
    main()
