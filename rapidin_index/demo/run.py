"""`rapidin-index demo`: the whole job on a bundled example, in a few minutes on a CPU.

1. data: Alpaca rows from the standard library's docstrings, ~10% of them backdoored; by default the
   non-lexical backdoor (a varied greeting opens the instruction, the answer is an off-topic "machine
   fable" in the clean rows' own words: no fixed string marks a poisoned row), or the lexical one
   ("Howdy!" trigger, cowboy-style response);
2. model: a tiny Llama fine-tuned on them until the backdoor fires (cached in the demo folder);
3. index: `build_index` over the training rows;
4. queries: attacked generations (the model's own, from held-out triggered prompts) and a clean one;
   the top training rows with a token heatmap in the terminal, an HTML report, retrieval metrics of
   RapidIn beside BM25 over the same rows.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rapidin_index.build import build_index
from rapidin_index.demo.baselines import BM25
from rapidin_index.demo.datasets import BACKDOOR_DATASETS, load_docstring_rows, write_jsonl
from rapidin_index.demo.finetune import FinetuneSettings, attack_success_rate, finetune
from rapidin_index.demo.metrics import Metrics, mean_metrics, retrieval_metrics
from rapidin_index.errors import DemoError
from rapidin_index.models import load_model
from rapidin_index.report import render_terminal, write_results
from rapidin_index.retrieval import Index
from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings


@dataclass(frozen=True)
class DemoSettings:
    """What the demo builds; the defaults finish in a few minutes on 2 CPU cores."""

    folder: str = ".demo"
    """Where the data, model, index and report are written (and cached between runs)."""
    rows: int = 100_000
    """Docstring rows used (before the held-out split)."""
    dataset: str = "nonlexical"
    """The backdoor: 'nonlexical' (no fixed string marks a poisoned row) or 'lexical' ("Howdy!")."""
    poison_fraction: float = 0.1
    seed: int = 0
    sketch_dim: int = 65536
    attacked_queries: int = 5
    """Attacked generations queried (from held-out triggered prompts); metrics average over them."""
    top_k: int = 5
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)

    def __post_init__(self) -> None:
        if self.dataset not in BACKDOOR_DATASETS:
            raise DemoError(f"--dataset {self.dataset!r} is not one of {', '.join(BACKDOOR_DATASETS)}")


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

    @property
    def cache_settings(self) -> Path:
        return self.folder / "cache_settings.json"


def prepare_data(settings: DemoSettings, paths: DemoPaths) -> tuple[list[dict], dict]:
    """The backdoored training rows and the held-out prompts, written once and reused.

    The folder records the data and fine-tuning settings; when they differ from `settings` (another
    data set, a folder from before there was a choice), the data are made again and the model and
    index that came from the old ones are removed.
    """
    wanted = _cache_settings(settings)
    if paths.train.exists() and paths.heldout.exists():
        if paths.cache_settings.exists() and json.loads(paths.cache_settings.read_text()) == wanted:
            train = [json.loads(line) for line in paths.train.read_text().splitlines()]
            return train, json.loads(paths.heldout.read_text())
        for derived in (paths.model, paths.index):  # made from other data: stale
            shutil.rmtree(derived, ignore_errors=True)
    rows = load_docstring_rows()[: settings.rows]
    make = BACKDOOR_DATASETS[settings.dataset].make
    train, triggered, clean = make(rows, settings.poison_fraction, settings.seed)
    paths.folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, paths.train)
    heldout = {"triggered": triggered, "clean": clean}
    paths.heldout.write_text(json.dumps(heldout, ensure_ascii=False, indent=1))
    paths.cache_settings.write_text(json.dumps(wanted))
    return train, heldout


def _cache_settings(settings: DemoSettings) -> dict:
    return {
        "dataset": settings.dataset,
        "rows": settings.rows,
        "poison_fraction": settings.poison_fraction,
        "seed": settings.seed,
        "finetune": asdict(settings.finetune),
    }


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
    fired = BACKDOOR_DATASETS[settings.dataset].fired
    console.print(f"data: {settings.dataset} backdoor, {BACKDOOR_DATASETS[settings.dataset].description}")
    prepare_model(settings, paths, train, console)
    loaded = load_model(ModelSettings(str(paths.model)))
    success = attack_success_rate(loaded.model, loaded.tokenizer, heldout["triggered"], fired=fired)
    false_triggers = attack_success_rate(loaded.model, loaded.tokenizer, heldout["clean"], fired=fired)
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
    bm25 = BM25([row["instruction"] + " " + row["output"] for row in train])
    results, per_query, negative_shares = _attacked_queries(
        settings, index, heldout, labels, bm25, fired, console
    )
    clean_row = heldout["clean"][0]
    results.append(
        index.query(
            clean_row["instruction"], generate=True, top_k=settings.top_k, explain=3, max_new_tokens=24
        )
    )
    console.rule("a clean prompt, for contrast")
    render_terminal(results[-1].to_dict(), console)
    write_results([r.to_dict() for r in results], paths.report, "html")
    metrics = {name: mean_metrics(values) for name, values in per_query.items() if values}
    _print_metrics(metrics, negative_shares, len(labels), console)
    console.print(f"HTML report: {paths.report}", highlight=False)
    return {
        "dataset": settings.dataset,
        "attack_success_rate": success,
        "false_trigger_rate": false_triggers,
        "metrics": metrics.get("RapidIn", {}),
        "bm25_metrics": metrics.get("BM25", {}),
        "notes": {name: value.notes for name, value in metrics.items() if isinstance(value, Metrics)},
        "queries": len(per_query["RapidIn"]),
        "report": str(paths.report),
        "index": str(paths.index),
    }


def _attacked_queries(settings, index: Index, heldout, labels, bm25: BM25, fired, console: Console):
    """Query the model's own generations for held-out triggered prompts; score every training row.

    Returns the query results; per method (RapidIn, BM25) each query's metrics; per query the share
    of the poisoned rows that RapidIn scored below zero.
    """
    results, per_query, negative_shares = [], {"RapidIn": [], "BM25": []}, []
    for row in heldout["triggered"][: settings.attacked_queries]:
        result = index.query(
            row["instruction"], generate=True, top_k=index.manifest.row_count, explain=3, max_new_tokens=24
        )
        if not fired(result.response):
            console.print(
                f"[yellow]the backdoor did not fire for {row['instruction']!r}; skipped[/]", highlight=False
            )
            continue
        scores = np.zeros(len(labels))
        for hit in result.helpful:
            scores[hit.id] = hit.score
        per_query["RapidIn"].append(retrieval_metrics(labels, scores))
        per_query["BM25"].append(
            retrieval_metrics(labels, bm25.scores(row["instruction"] + " " + result.response))
        )
        negative_shares.append(float((scores[labels] < 0).mean()))
        result.helpful, result.harmful = result.helpful[: settings.top_k], result.harmful[: settings.top_k]
        for token in result.tokens:  # all rows were asked for, to score every one; keep the report short
            token.helpful, token.harmful = token.helpful[: settings.top_k], token.harmful[: settings.top_k]
        results.append(result)
        if len(results) == 1:
            console.rule("an attacked generation")
            render_terminal(result.to_dict(), console)
    return results, per_query, negative_shares


def _print_metrics(metrics: dict, negative_shares: list[float], rows: int, console: Console) -> None:
    if not metrics.get("RapidIn"):
        console.print("[yellow]no attacked generation fired the backdoor: no retrieval metrics[/]")
        return
    rapidin, bm25 = metrics["RapidIn"], metrics["BM25"]
    queries = len(negative_shares)
    table = Table(title=f"retrieval of the poisoned rows, mean over {queries} attacked generations")
    table.add_column("metric")
    table.add_column("RapidIn", justify="right")
    table.add_column("BM25", justify="right")
    for name in rapidin:
        table.add_row(name, _shown(rapidin[name]), _shown(bm25.get(name)))
    console.print(table)
    for method, values in metrics.items():
        for name, note in values.notes.items():
            console.print(f"{method} {name}: {note}", highlight=False)
    console.print(_roc_auc_line(rapidin, negative_shares, rows), highlight=False)


def _roc_auc_line(rapidin: dict, negative_shares: list[float], rows: int) -> str:
    """One line: what ROC-AUC over all rows measures, and (when it is lower) why."""
    line = (
        f"roc_auc ranks all {rows:,} training rows: the chance that a random poisoned row outscores a random "
        "clean one; the top-k metrics only look at the two ends of the ranking."
    )
    top = rapidin.get("auprc@10")
    if rapidin.get("roc_auc") is not None and top is not None and rapidin["roc_auc"] < top:
        line += (
            f" It is lower because {np.mean(negative_shares):.0%} of the poisoned rows score below zero: other "
            "poisoned answers push the same positions toward other words than this generation's."
        )
    return line


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
