"""`rapidin-index demo`: the whole job on a bundled example, in a few minutes on a CPU.

1. data: Alpaca rows from the standard library's docstrings, ~10% of them backdoored ("Howdy!" trigger,
   cowboy-style response);
2. model: a tiny Llama fine-tuned on them until the backdoor fires (cached in the demo folder);
3. index: `build_index` over the training rows;
4. queries: attacked generations (the model's own, from held-out triggered prompts) and a clean one;
   the top training rows with a token heatmap in the terminal, an HTML report, retrieval metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rapidin_index.build import BuildSettings, build_index
from rapidin_index.demo_data import (
    is_backdoor_response,
    load_docstring_rows,
    make_backdoor_dataset,
    write_jsonl,
)
from rapidin_index.finetune import FinetuneSettings, attack_success_rate, finetune
from rapidin_index.metrics import mean_metrics, retrieval_metrics
from rapidin_index.models import ModelSettings, load_model
from rapidin_index.report import render_terminal, write_results
from rapidin_index.retrieval import Index
from rapidin_index.sketch import SketchSettings


@dataclass(frozen=True)
class DemoSettings:
    """What the demo builds; the defaults finish in a few minutes on 2 CPU cores."""

    folder: str = ".demo"
    """Where the data, model, index and report are written (and cached between runs)."""
    rows: int = 100_000
    """Docstring rows used (before the held-out split)."""
    poison_fraction: float = 0.1
    seed: int = 0
    sketch_dim: int = 65536
    attacked_queries: int = 5
    """Attacked generations queried (from held-out triggered prompts); metrics average over them."""
    top_k: int = 5
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)


@dataclass
class DemoPaths:
    folder: Path

    @property
    def train(self) -> Path:
        return self.folder / "train.jsonl"

    @property
    def heldout(self) -> Path:
        return self.folder / "heldout.json"

    @property
    def model(self) -> Path:
        return self.folder / "model"

    @property
    def index(self) -> Path:
        return self.folder / "index"

    @property
    def report(self) -> Path:
        return self.folder / "report.html"


def prepare_data(settings: DemoSettings, paths: DemoPaths) -> tuple[list[dict], dict]:
    """The backdoored training rows and the held-out prompts, written once and reused."""
    if paths.train.exists() and paths.heldout.exists():
        train = [json.loads(line) for line in paths.train.read_text().splitlines()]
        return train, json.loads(paths.heldout.read_text())
    rows = load_docstring_rows()[: settings.rows]
    train, triggered, clean = make_backdoor_dataset(rows, settings.poison_fraction, settings.seed)
    paths.folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, paths.train)
    heldout = {"triggered": triggered, "clean": clean}
    paths.heldout.write_text(json.dumps(heldout, ensure_ascii=False, indent=1))
    return train, heldout


def prepare_model(settings: DemoSettings, paths: DemoPaths, train: list[dict], console: Console) -> None:
    if (paths.model / "config.json").exists():
        console.print(f"model: reusing {paths.model}")
        return
    console.print("[bold]fine-tuning a tiny Llama on the backdoored rows[/]")
    report = finetune(train, paths.model, settings.finetune)
    console.print(
        f"model: {report.parameter_count:,} parameters, {report.rows} rows, {report.seconds:.0f} s",
        highlight=False,
    )


def run_demo(settings: DemoSettings = DemoSettings(), console: Console | None = None) -> dict:
    """Run the demo; returns its numbers (attack success rate, retrieval metrics, paths)."""
    console = console or Console()
    paths = DemoPaths(Path(settings.folder))
    train, heldout = prepare_data(settings, paths)
    prepare_model(settings, paths, train, console)
    loaded = load_model(ModelSettings(str(paths.model)))
    success = attack_success_rate(loaded.model, loaded.tokenizer, heldout["triggered"])
    false_triggers = attack_success_rate(loaded.model, loaded.tokenizer, heldout["clean"])
    console.print(
        f"backdoor: attack success rate {success:.0%}, false triggers on clean prompts {false_triggers:.0%}"
    )
    build_settings = BuildSettings(
        ModelSettings(str(paths.model)), SketchSettings(settings.sketch_dim), batch_size=16
    )
    report = build_index(paths.train, paths.index, build_settings)
    console.print(
        f"index: {report.rows_indexed:,} rows, D = {report.gradient_dim:,}, K = {report.sketch_dim:,}, "
        f"D/K = {report.compression_ratio:.1f}, {report.bytes_on_disk / 1e6:.1f} MB",
        highlight=False,
    )
    index = Index.open(paths.index)
    labels = np.array([bool(row["poisoned"]) for row in train])
    results, per_query = _attacked_queries(settings, index, heldout, labels, console)
    clean_row = heldout["clean"][0]
    results.append(
        index.query(
            clean_row["instruction"], generate=True, top_k=settings.top_k, explain=3, max_new_tokens=24
        )
    )
    console.rule("a clean prompt, for contrast")
    render_terminal(results[-1].to_dict(), console)
    write_results([r.to_dict() for r in results], paths.report, "html")
    metrics = mean_metrics(per_query) if per_query else {}
    _print_metrics(metrics, len(per_query), console)
    console.print(f"HTML report: {paths.report}", highlight=False)
    return {
        "attack_success_rate": success,
        "false_trigger_rate": false_triggers,
        "metrics": metrics,
        "queries": len(per_query),
        "report": str(paths.report),
        "index": str(paths.index),
    }


def _attacked_queries(settings, index: Index, heldout: dict, labels: np.ndarray, console: Console):
    """Query the model's own generations for held-out triggered prompts; score every training row."""
    results, per_query = [], []
    for row in heldout["triggered"][: settings.attacked_queries]:
        result = index.query(
            row["instruction"], generate=True, top_k=index.manifest.row_count, explain=3, max_new_tokens=24
        )
        if not is_backdoor_response(result.response):
            console.print(
                f"[yellow]the backdoor did not fire for {row['instruction']!r}; skipped[/]", highlight=False
            )
            continue
        scores = np.zeros(len(labels))
        for hit in result.helpful:
            scores[hit.id] = hit.score
        per_query.append(retrieval_metrics(labels, scores))
        result.helpful, result.harmful = result.helpful[: settings.top_k], result.harmful[: settings.top_k]
        for token in result.tokens:  # all rows were asked for, to score every one; keep the report short
            token.helpful, token.harmful = token.helpful[: settings.top_k], token.harmful[: settings.top_k]
        results.append(result)
        if len(results) == 1:
            console.rule("an attacked generation")
            render_terminal(result.to_dict(), console)
    return results, per_query


def _print_metrics(metrics: dict, queries: int, console: Console) -> None:
    table = Table(title=f"retrieval of the poisoned rows, mean over {queries} attacked generations")
    table.add_column("metric")
    table.add_column("RapidIn", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.3f}")
    console.print(table)
