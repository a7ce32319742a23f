"""rapidin-index beside bergson, dattri, kronfluence and captum: same model, rows and queries, one run.

Two settings, each a tiny model fine-tuned in-process on the lexical backdoor set
(`demo_data.make_backdoor_dataset` over the bundled docstring rows, as `{"prompt", "completion"}` rows):

* `lora`: a GPT-2 (hidden 64, 3 layers) pre-trained on the clean rows, then a LoRA r=8 adapter on every
  linear layer trained on all rows (D = 24,576 attributed parameters); 900 training rows.
* `full`: a Llama (hidden 384, 3 layers, 5.5M parameters) trained on all rows, every parameter
  attributed; 400 training rows.

Queries: 10 held-out triggered prompts with the model's own greedy generation where the backdoor fired
(the Llama: all 10), else with the poisoned answer (the tiny GPT-2's adapter learns the style but does
not fire within its recipe; the table's header line says how many fired). Every tool sees the same
token ids: rows are tokenized once, as the index tokenizes them (`finetune.tokenize_rows`), and the
peers get them pre-tokenised. The loss is each row's mean next-token cross-entropy over its response
tokens.

The reference is exact TracIn with layer norm, computed here by brute force: for every row and query,
plain autograd of Hugging Face's own `model(input_ids, labels=...).loss`, each attributed parameter
tensor's gradient scaled to unit norm, then dot products. Each tool's scores over all rows are compared
with it (Spearman per query, averaged), and scored as a backdoor detector (auPRC@10 over the top-10 and
bottom-10 rows, ROC-AUC over all rows; `rapidin_index.demo.metrics`).

How each tool is called (all on CPU, torch on 1 thread, in this process):

* rapidin-index: the public API. `build_index` with `--k 0` and `--k 4096` (`lora`), `--k 4096`
  (`full`: `--k 0` would store 22 MB a row), then `Index.open` and `query_rows(rows, top_k=10,
  explain=0)`, one batched call for the queries (or `query` per row, where an Index lacks
  `query_rows`). Where the Index has a `per_token` option (feature-detected), the query is timed
  with `per_token=False` too (the "whole" column); the "with per-token" column is the default query,
  which also sketches and searches every generated token. Every row's score comes from one more
  query with `top_k` = all rows (untimed in the table; `per_token=False` where it exists).
* bergson: `bergson.build.build` (what `bergson build` runs) on a pre-tokenised `datasets` folder,
  `loss_reduction="mean"`; `lora`: exact gradients of the adapter (`projection_dim=0`), `full`:
  the factored projection, 16 x 16 per module (`projection_dim=16`). Queries: `Attributor(unit_norm=
  True)` (cosine, bergson's normalisation) and one `Attributor.trace` over a backward of the 10 queries.
  Its LoRA path reads the base model from `base_model_name_or_path` in the adapter config, which is
  written there.
* dattri: `LoGraAttributor(proj_dim=256, hessian="eFIM")` on the linear layers (`lora`: the LoRA A/B
  layers), `cache` = build, `attribute` = query.
* kronfluence: EK-FAC, `fit_all_factors` = build, `compute_pairwise_scores` = query (it recomputes the
  training gradients), tracked modules as dattri's.
* captum: `TracInCP` with `sample_wise_grads_per_batch=True` on the same linear layers; no build,
  `influence(k=None)` = query (plain TracIn, no normalisation).
* floor (`--tools ...,floor`): no attribution, the model's own forward and backward with its weights
  frozen (no weight gradient), from the input embeddings: over the training rows in batches of 8 (the
  build's size, longest first; "build" includes loading the model), and over the queries in one batch
  ("whole"). What any tool's build and whole query must at least pay.

Timing: every tool builds into a fresh folder and queries, the tools interleaved (tool 1, tool 2, ...,
then again), 3 repeats, medians. Build includes loading the model from disk; "open" (index and model
loading before the first query) is reported apart; imports are paid once before the timed repeats.
A missing peer is a row saying "not installed".

The peers live in their own venv (this script installs nothing):

    python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install -e "/work/main[peft]"
    echo torch==2.13.0 > /tmp/c.txt
    /work/peers-venv/bin/pip install -c /tmp/c.txt bergson dattri kronfluence captum
    /work/peers-venv/bin/pip uninstall -y torchvision torchaudio   # their CUDA wheels break transformers
    /work/peers-venv/bin/python benchmarks/peers.py --out .bench/peers.json

On the shared 2-core machine at a load average of 4 to 11, a run took 25 minutes with the models
cached (one repeat of all tools is about 430 s, kronfluence over half of it), plus about 21 minutes
to train the two models the first time. `--repeats 2` or leaving kronfluence out of `--tools` brings
it to about 15. Models, data and the reference scores are cached in `--folder`, keyed by recipe and
sizes (another size retrains).
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import parse_arguments as parse_with_smoke  # noqa: E402

from rapidin_index import BuildSettings, Index, ModelSettings, SketchSettings, build_index  # noqa: E402
from rapidin_index.data import Template  # noqa: E402
from rapidin_index.demo.datasets import (  # noqa: E402
    is_backdoor_response,
    load_docstring_rows,
    make_backdoor_dataset,
    write_jsonl,
)
from rapidin_index.demo.finetune import FinetuneSettings, finetune, generate_responses, tokenize_rows  # noqa: E402
from rapidin_index.demo.metrics import mean_metrics, retrieval_metrics, spearman  # noqa: E402

IGNORE_INDEX = -100
TEMPLATE = "completion"
MAX_LENGTH = 128
PEERS = ("bergson", "dattri", "kronfluence", "captum")


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One model + data set that every tool attributes."""

    name: str
    description: str
    rows: int
    """Training rows (100 more are drawn and held out, 50 of them triggered)."""
    finetune: FinetuneSettings
    sketch_dims: tuple[tuple[int, str | None], ...]
    """rapidin-index (K, sketch algorithm or None for the default) pairs to build."""
    bergson_projection: int
    """bergson projection_dim (0: exact gradients; p: p x p per module)."""

    @property
    def lora(self) -> bool:
        return self.finetune.lora


def sketch_choices(text: str) -> tuple[tuple[int, str | None], ...]:
    """'4096,65536:rapidgrad-kron' -> ((4096, None), (65536, 'rapidgrad-kron')): K, and `--sketch` if named."""
    choices = []
    for entry in text.split(","):
        k, _, algorithm = entry.partition(":")
        choices.append((int(k), algorithm or None))
    return tuple(choices)


def settings_from(arguments: argparse.Namespace) -> list[Setting]:
    known = {
        "lora": Setting(
            "lora",
            "GPT-2 (hidden 64, 3 layers) + LoRA r=8 on every linear layer",
            arguments.lora_rows,
            FinetuneSettings(
                architecture="gpt2",
                hidden_size=64,
                layers=3,
                lora=True,
                lora_rank=8,
                epochs=8,
                base_epochs=12,
            ),
            sketch_choices(arguments.lora_ks),
            0,
        ),
        "full": Setting(
            "full",
            f"Llama (hidden {arguments.full_hidden}, {arguments.full_layers} layers), all parameters",
            arguments.full_rows,
            FinetuneSettings(
                architecture="llama",
                hidden_size=arguments.full_hidden,
                layers=arguments.full_layers,
                epochs=10,
                learning_rate=2e-3,
            ),
            sketch_choices(arguments.full_ks),
            16,
        ),
    }
    if arguments.smoke:  # the LoRA setting's GPT-2 as small as the full one's Llama, one epoch each
        smaller = {"hidden_size": 16, "layers": 1, "epochs": 1, "base_epochs": 1}
        known = {name: replace(s, finetune=replace(s.finetune, **smaller)) for name, s in known.items()}
    return [known[name] for name in arguments.settings.split(",")]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".bench/peers.json")
    parser.add_argument("--folder", default=".bench/peers", help="cache: data, models, reference scores")
    parser.add_argument("--settings", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=10, help="attacked generations per setting")
    parser.add_argument("--lora-rows", type=int, default=900)
    parser.add_argument("--full-rows", type=int, default=400)
    parser.add_argument("--full-hidden", type=int, default=384)
    parser.add_argument("--full-layers", type=int, default=3)
    parser.add_argument(
        "--lora-ks", default="0,4096", help="rapidin-index K values on the LoRA model (K or K:algorithm)"
    )
    parser.add_argument(
        "--full-ks", default="4096", help="rapidin-index K values on the full model (K or K:algorithm)"
    )
    parser.add_argument(
        "--tools",
        default="rapidin-index," + ",".join(PEERS),
        help="comma-separated; 'floor' adds the model's own frozen forward + backward",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="free text kept in the JSON (e.g. which library snapshot)")
    # the smoke run: both settings on 20 rows, 16-wide one-layer models trained one epoch (SMOKE_MODEL); the
    # peers that are not installed are skipped with a line, as in a real run
    return parse_with_smoke(
        parser,
        folder="{smoke}/peers",
        queries=2,
        repeats=1,
        lora_rows=20,
        full_rows=20,
        full_hidden=16,
        full_layers=1,
        lora_ks="0,256",
        full_ks="256",
        out="{smoke}/result.json",
    )


# --------------------------------------------------------------------------------- data and models


@dataclass
class Prepared:
    """A setting's model, rows and queries on disk, tokenized once for every tool."""

    setting: Setting
    folder: Path
    model_dir: Path
    adapter_dir: Path | None
    train_path: Path
    train_rows: list[dict]
    query_rows: list[dict]
    train_sequences: list[tuple[list[int], list[int]]]
    query_sequences: list[tuple[list[int], list[int]]]
    labels: np.ndarray
    """1 for poisoned training rows."""
    pad_token_id: int
    facts: dict = field(default_factory=dict)


def as_completion(row: dict) -> dict:
    return {"prompt": row["instruction"] + "\n", "completion": row["output"], "poisoned": row["poisoned"]}


def prepare(setting: Setting, folder: Path, query_count: int) -> Prepared:
    key = {"rows": setting.rows, "queries": query_count, "finetune": asdict(setting.finetune)}
    if (folder / "key.json").exists() and json.loads((folder / "key.json").read_text()) != key:
        shutil.rmtree(folder)  # another size or recipe: retrain, and recompute the reference
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps(key))
    rows = load_docstring_rows()
    order = np.random.default_rng(0).permutation(len(rows))[: setting.rows + 100]
    train, triggered, _ = make_backdoor_dataset([rows[i] for i in sorted(order)], seed=0, heldout_count=50)
    train = [as_completion(row) for row in train]
    train_path = write_jsonl(train, folder / "train.jsonl")
    report_file = folder / "model" / "finetune_report.json"
    if not report_file.exists():
        report = finetune(train, folder / "model", setting.finetune, template=TEMPLATE, progress=False)
        report_file.write_text(json.dumps(report.to_dict(), indent=2))
    report = json.loads(report_file.read_text())
    # finetune's layout (base/ + adapter/ in LoRA mode), wherever the cache folder now is
    model_dir = folder / "model" / "base" if setting.lora else folder / "model"
    adapter_dir = folder / "model" / "adapter" if setting.lora else None
    if adapter_dir is not None:  # bergson finds the base model here
        config_file = adapter_dir / "adapter_config.json"
        config = json.loads(config_file.read_text())
        if config.get("base_model_name_or_path") != str(model_dir.resolve()):
            config["base_model_name_or_path"] = str(model_dir.resolve())
            config_file.write_text(json.dumps(config, indent=2))
    model, tokenizer = load_hf_model(model_dir, adapter_dir)
    queries, fired = attacked_queries(model, tokenizer, [as_completion(r) for r in triggered], query_count)
    template = Template(TEMPLATE)
    train_sequences = tokenize_rows(train, tokenizer, template, MAX_LENGTH)
    query_sequences = tokenize_rows(queries, tokenizer, template, MAX_LENGTH)
    facts = {
        "train_rows": len(train),
        "poisoned_rows": sum(row["poisoned"] for row in train),
        "mean_tokens_per_row": float(np.mean([len(ids) for ids, _ in train_sequences])),
        "queries": len(queries),
        "queries_fired": fired,
        "mean_query_response_tokens": float(
            np.mean([sum(label != IGNORE_INDEX for label in labels) for _, labels in query_sequences])
        ),
        "parameters": report["parameter_count"],
        "attributed_parameters": sum(p.numel() for p in attributed_parameters(model, setting.lora)[1]),
        "finetune_seconds": report["seconds"],
    }
    labels = np.array([row["poisoned"] for row in train], dtype=bool)
    return Prepared(
        setting,
        folder,
        model_dir,
        adapter_dir,
        train_path,
        train,
        queries,
        train_sequences,
        query_sequences,
        labels,
        tokenizer.pad_token_id,
        facts,
    )


def load_hf_model(model_dir: Path, adapter_dir: Path | None):
    """The model in eval mode, with requires_grad on the attributed parameters only, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)  # loads the adapter frozen
    model.requires_grad_(False)
    for parameter in attributed_parameters(model, adapter_dir is not None)[1]:
        parameter.requires_grad_(True)
    return model.eval(), AutoTokenizer.from_pretrained(adapter_dir or model_dir)


def attacked_queries(model, tokenizer, triggered: list[dict], count: int) -> tuple[list[dict], int]:
    """Completion rows of the model's own generations that fired the backdoor (else the target answer)."""
    generations = generate_responses(model, tokenizer, triggered, 24, TEMPLATE)
    fired = [
        {**row, "completion": text}
        for row, text in zip(triggered, generations, strict=True)
        if is_backdoor_response(text)
    ]
    queries = (fired + [row for row, text in zip(triggered, generations, strict=True)
                        if not is_backdoor_response(text)])[:count]  # fmt: skip
    return [{"prompt": q["prompt"], "completion": q["completion"]} for q in queries], min(len(fired), count)


def attributed_parameters(model, lora: bool):
    """(names, tensors) that rapidin-index attributes: the adapter's LoRA tensors, else every parameter."""
    named = [(n, p) for n, p in model.named_parameters() if (not lora or "lora_" in n)]
    return [n for n, _ in named], [p for _, p in named]


def collate(sequences, pad_token_id: int) -> dict:
    """Right-padded input_ids, labels (-100 off the response) and attention_mask."""
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def response_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[batch] mean next-token cross-entropy over each row's response tokens (as HF shifts)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # [batch, tokens - 1, vocab], [batch, tokens - 1]
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum(1) / (labels != IGNORE_INDEX).sum(1)


# ----------------------------------------------------------------------- the reference: exact TracIn


def exact_tracin_layer_norm(prepared: Prepared) -> tuple[np.ndarray, float]:
    """[queries, rows] <n(grad L(q)), n(grad L(t))>, n = every tensor's gradient to unit norm; seconds."""
    cache = prepared.folder / "exact_tracin_layer_norm.npy"
    if cache.exists():
        return np.load(cache), json.loads((prepared.folder / "exact_seconds.json").read_text())
    started = time.perf_counter()
    model, _ = load_hf_model(prepared.model_dir, prepared.adapter_dir)
    _, parameters = attributed_parameters(model, prepared.setting.lora)

    def normalized_gradient(ids: list[int], labels: list[int]) -> torch.Tensor:
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        gradients = torch.autograd.grad(loss, parameters)
        return torch.cat([(g / g.norm().clamp_min(1e-30)).flatten() for g in gradients])  # [D]

    queries = torch.stack([normalized_gradient(*sequence) for sequence in prepared.query_sequences])
    scores = np.zeros((len(queries), len(prepared.train_sequences)))
    for row, sequence in enumerate(prepared.train_sequences):
        scores[:, row] = (queries @ normalized_gradient(*sequence)).double().numpy()
    seconds = time.perf_counter() - started
    np.save(cache, scores)
    (prepared.folder / "exact_seconds.json").write_text(json.dumps(seconds))
    return scores, seconds


# ---------------------------------------------------------------------------------------- the tools


@dataclass
class Sample:
    """One repeat of one tool: seconds, and [queries, rows] scores where the repeat computed them."""

    build: float | None = None
    open: float | None = None
    query_whole: float | None = None
    query_per_token: float | None = None
    scores: np.ndarray | None = None
    notes: dict = field(default_factory=dict)


def linear_layer_names(model, lora: bool) -> list[str]:
    """The nn.Linear modules the peers attribute: the LoRA A/B layers, else every linear layer."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (not lora or "lora_" in name)
    ]


def rapidin_query(index: Index, rows: list[dict], top_k: int, per_token: bool | None = None):
    """`query_rows` (one batched call) where the Index has it, else `query` per row; `per_token` if known."""
    method = getattr(index, "query_rows", None)
    kwargs = {"top_k": top_k, "explain": 0}
    if per_token is not None:
        kwargs["per_token"] = per_token
    if method is not None:
        return method(rows, **kwargs)
    return [index.query(row["prompt"], row["completion"], **kwargs) for row in rows]


def has_per_token_option() -> bool:
    method = getattr(Index, "query_rows", None) or Index.query
    return "per_token" in inspect.signature(method).parameters


def run_rapidin(
    prepared: Prepared, folder: Path, want_scores: bool, sketch_dim: int, algorithm: str | None = None
) -> Sample:
    sample = Sample()
    adapter = str(prepared.adapter_dir) if prepared.adapter_dir else None
    sketch = SketchSettings(sketch_dim=sketch_dim)
    if algorithm is not None:
        sketch = SketchSettings(sketch_dim=sketch_dim, algorithm=algorithm)
    settings = BuildSettings(
        ModelSettings(str(prepared.model_dir), adapter=adapter),
        sketch,
        template=TEMPLATE,
        device="cpu",
    )
    started = time.perf_counter()
    build_index(prepared.train_path, folder, settings, progress=False)
    sample.build = time.perf_counter() - started
    started = time.perf_counter()
    index = Index.open(folder, device="cpu")
    sample.open = time.perf_counter() - started
    rows, per_token = prepared.query_rows, has_per_token_option()
    if per_token:
        started = time.perf_counter()
        rapidin_query(index, rows, 10, per_token=False)
        sample.query_whole = time.perf_counter() - started
    started = time.perf_counter()
    rapidin_query(index, rows, 10)
    sample.query_per_token = time.perf_counter() - started
    if want_scores:  # every row's score: one more query, untimed in the table, with top_k = all rows
        started = time.perf_counter()
        count = len(prepared.train_rows)
        results = rapidin_query(index, rows, count, per_token=False if per_token else None)
        sample.scores = np.zeros((len(rows), count))
        for number, result in enumerate(results):
            for hit in result.helpful:
                sample.scores[number, hit.id] = hit.score
            if len({hit.id for hit in result.helpful}) != count:
                raise RuntimeError(f"query {number}: top_k={count} did not return every row")
        sample.notes["all_rows_query_seconds"] = time.perf_counter() - started
    return sample


def bergson_dataset(prepared: Prepared) -> Path:
    """The training rows pre-tokenised (input_ids, labels, length) as a `datasets` folder."""
    from datasets import Dataset

    folder = prepared.folder / "bergson_train"
    if not (folder / "dataset_info.json").exists():
        ids = [list(map(int, i)) for i, _ in prepared.train_sequences]
        labels = [list(map(int, label)) for _, label in prepared.train_sequences]
        Dataset.from_dict({"input_ids": ids, "labels": labels, "length": [len(i) for i in ids]}).save_to_disk(
            str(folder)
        )
    return folder


def run_bergson(prepared: Prepared, folder: Path, want_scores: bool) -> Sample:
    from bergson import Attributor, DataConfig, IndexConfig, PreprocessConfig
    from bergson.build import build
    from bergson.config.config import DistributedConfig
    from bergson.utils.worker_utils import setup_model_and_peft

    sample, dataset = Sample(), bergson_dataset(prepared)
    config = IndexConfig(
        run_path=str(folder / "index"),
        model=str(prepared.adapter_dir or prepared.model_dir),
        data=DataConfig(dataset=str(dataset)),
        projection_dim=prepared.setting.bergson_projection,
        loss_reduction="mean",
        token_batch_size=512,  # the tiny models' context; bergson's default 2048 is refused
        precision="fp32",
        distributed=DistributedConfig(nproc_per_node=1),
    )
    started = time.perf_counter()
    build(config, PreprocessConfig())
    sample.build = time.perf_counter() - started
    started = time.perf_counter()
    model, _ = setup_model_and_peft(config)
    model.eval()
    attributor = Attributor(config.run_path, device="cpu", unit_norm=True)
    sample.open = time.perf_counter() - started
    started = time.perf_counter()
    batch = collate(prepared.query_sequences, prepared.pad_token_id)
    with attributor.trace(model.base_model, None, modules=set(attributor.ordered_modules)) as result:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        response_losses(logits, batch["labels"]).sum().backward()
    model.zero_grad(set_to_none=True)
    scores = np.zeros((len(batch["input_ids"]), attributor.N))
    np.put_along_axis(scores, result.indices.numpy(), result.scores.double().numpy(), axis=1)
    sample.query_whole = time.perf_counter() - started
    sample.scores = scores
    return sample


def run_floor(prepared: Prepared, folder: Path, want_scores: bool) -> Sample:
    """The model's own frozen forward + backward over the rows, then over the queries (no scores)."""
    sample = Sample()
    started = time.perf_counter()
    model, _ = load_hf_model(prepared.model_dir, prepared.adapter_dir)
    model.requires_grad_(False)
    ordered = sorted(prepared.train_sequences, key=lambda pair: len(pair[0]), reverse=True)
    for start in range(0, len(ordered), 8):
        frozen_forward_backward(model, collate(ordered[start : start + 8], prepared.pad_token_id))
    sample.build = time.perf_counter() - started
    started = time.perf_counter()
    frozen_forward_backward(model, collate(prepared.query_sequences, prepared.pad_token_id))
    sample.query_whole = time.perf_counter() - started
    return sample


def frozen_forward_backward(model, batch: dict) -> None:
    embeddings = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], use_cache=False).logits
    response_losses(logits, batch["labels"]).sum().backward()


def run_dattri(prepared: Prepared, folder: Path, want_scores: bool) -> Sample:
    from dattri.algorithm.logra import LoGraAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader

    sample, pad = Sample(), prepared.pad_token_id

    def loss_func(model, batch, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return response_losses(logits, batch["labels"]).sum()

    def loader(sequences, batch_size):
        return DataLoader(
            sequences, batch_size=batch_size, shuffle=False, collate_fn=lambda b: collate(b, pad)
        )

    started = time.perf_counter()
    model, _ = load_hf_model(prepared.model_dir, prepared.adapter_dir)
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    attributor = LoGraAttributor(
        task,
        layer_names=linear_layer_names(model, prepared.setting.lora),
        hessian="eFIM",
        proj_dim=256,
        offload="cpu",
        device="cpu",
        cache_dir=str(folder),
    )
    train_loader = loader(prepared.train_sequences, 16)
    attributor.cache(train_loader)
    sample.build = time.perf_counter() - started
    started = time.perf_counter()
    scores = attributor.attribute(
        train_loader, loader(prepared.query_sequences, len(prepared.query_sequences))
    )
    sample.query_whole = time.perf_counter() - started
    sample.scores = scores.T.double().numpy()  # [queries, rows]
    return sample


def kronfluence_task(tracked: list[str]):
    from kronfluence.task import Task

    class ResponseLossTask(Task):
        """Each row's mean response cross-entropy, summed over the batch; True Fisher samples labels."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            if sample:
                with torch.no_grad():
                    sampled = torch.distributions.Categorical(logits=logits[:, :-1].float()).sample()
                shifted = torch.where(labels[:, 1:] != IGNORE_INDEX, sampled, labels[:, 1:])
                labels = torch.cat([labels[:, :1], shifted], dim=1)
            return response_losses(logits, labels).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return ResponseLossTask()


def run_kronfluence(prepared: Prepared, folder: Path, want_scores: bool) -> Sample:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    sample, pad = Sample(), prepared.pad_token_id

    def dataset(sequences):
        return [{"input_ids": ids, "labels": labels} for ids, labels in sequences]

    def collate_dicts(items):
        return collate([(item["input_ids"], item["labels"]) for item in items], pad)

    started = time.perf_counter()
    model, _ = load_hf_model(prepared.model_dir, prepared.adapter_dir)
    task = kronfluence_task(linear_layer_names(model, prepared.setting.lora))
    model = prepare_model(model, task)
    analyzer = Analyzer("peers", model, task, cpu=True, disable_tqdm=True, output_dir=str(folder))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate_dicts))
    train = dataset(prepared.train_sequences)
    analyzer.fit_all_factors(
        "ekfac", train, per_device_batch_size=16, factor_args=FactorArguments(strategy="ekfac")
    )
    sample.build = time.perf_counter() - started
    started = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "ekfac",
        "ekfac",
        dataset(prepared.query_sequences),
        train,
        per_device_query_batch_size=16,
        per_device_train_batch_size=32,
    )
    scores = analyzer.load_pairwise_scores("ekfac")["all_modules"]
    sample.query_whole = time.perf_counter() - started
    sample.scores = scores.double().numpy()
    return sample


class LogitsModel(torch.nn.Module):
    """captum calls model(*inputs): input_ids and attention_mask in, logits out."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class ResponseLoss(torch.nn.Module):
    """Sum over the batch of each row's mean response cross-entropy (captum's 'sum' reduction)."""

    reduction = "sum"

    def forward(self, logits, labels):
        return response_losses(logits, labels).sum()


def run_captum(prepared: Prepared, folder: Path, want_scores: bool) -> Sample:
    from captum.influence import TracInCP
    from torch.utils.data import DataLoader

    sample, pad = Sample(), prepared.pad_token_id

    def as_tuple(sequences):
        batch = collate(sequences, pad)
        return batch["input_ids"], batch["attention_mask"], batch["labels"]

    started = time.perf_counter()
    model, _ = load_hf_model(prepared.model_dir, prepared.adapter_dir)
    # captum hooks every layer's input tensor, which must then require grad (LoRA A's input does not)
    model.enable_input_require_grads()
    wrapper = LogitsModel(model).eval()
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "checkpoint.pt"
    torch.save(wrapper.state_dict(), checkpoint)

    def load_checkpoint(module, path):
        module.load_state_dict(torch.load(path))
        return 1.0  # the learning rate TracInCP multiplies by

    tracin = TracInCP(
        wrapper,
        DataLoader(prepared.train_sequences, batch_size=16, shuffle=False, collate_fn=as_tuple),
        checkpoints=[str(checkpoint)],
        checkpoints_load_func=load_checkpoint,
        layers=["model." + name for name in linear_layer_names(model, prepared.setting.lora)],
        loss_fn=ResponseLoss(),
        sample_wise_grads_per_batch=True,
    )
    sample.open = time.perf_counter() - started
    started = time.perf_counter()
    scores = tracin.influence(as_tuple(prepared.query_sequences), k=None)
    sample.query_whole = time.perf_counter() - started
    sample.scores = scores.double().numpy()
    return sample


# ------------------------------------------------------------------------------------------ the run

PEER_MODULES = {
    "bergson": ["bergson", "bergson.build", "bergson.utils.worker_utils", "datasets"],
    "dattri": ["dattri.algorithm.logra", "dattri.task"],
    "kronfluence": ["kronfluence.analyzer", "kronfluence.task"],
    "captum": ["captum.influence"],
}


def peer_status() -> dict[str, str | None]:
    """Peer -> None when it imports (its modules are imported now, before any timing), else why not."""
    status = {}
    for peer, modules in PEER_MODULES.items():
        if importlib.util.find_spec(peer) is None:
            status[peer] = "not installed"
            continue
        try:
            for module in modules:
                importlib.import_module(module)
            status[peer] = None
        except Exception as error:  # a broken install is reported, not fatal
            status[peer] = f"not importable: {type(error).__name__}: {error}"
    return status


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


@dataclass
class Tool:
    label: str
    run: object = None
    """(prepared, folder, want_scores) -> Sample; None when the tool is missing."""
    missing: str | None = None


def tools_for(setting: Setting, wanted: set[str], status: dict) -> list[Tool]:
    tools = []
    if "rapidin-index" in wanted:
        for k, algorithm in setting.sketch_dims:

            def run(prepared, folder, want_scores, k=k, algorithm=algorithm):
                return run_rapidin(prepared, folder, want_scores, k, algorithm)

            options = f"`--k {k}`" + (f" `--sketch {algorithm}`" if algorithm else "")
            tools.append(Tool(f"rapidin-index {version('rapidin-index')}, {options} (Python API)", run))
    p = setting.bergson_projection
    labels = {
        "bergson": f"bergson {version('bergson')}, "
        + ("exact gradients (projection_dim 0)" if p == 0 else f"factored projection ({p} x {p} per module)"),
        "dattri": f"dattri {version('dattri')} LoGra (p = 256)",
        "kronfluence": f"kronfluence {version('kronfluence')} EK-FAC",
        "captum": f"captum {version('captum')} TracInCP",
    }
    runs = {
        "bergson": run_bergson,
        "dattri": run_dattri,
        "kronfluence": run_kronfluence,
        "captum": run_captum,
    }
    if "floor" in wanted:
        tools.append(Tool("floor: the model's own frozen forward + backward (no attribution)", run_floor))
    for peer in PEERS:
        if peer in wanted:
            tools.append(Tool(labels[peer], runs[peer], status[peer]) if not status[peer] else
                         Tool(f"{peer}", None, status[peer]))  # fmt: skip
    return tools


def quality(scores: np.ndarray, exact: np.ndarray, labels: np.ndarray) -> dict:
    """Mean over queries of Spearman against exact TracIn + layer norm, auPRC@10 and ROC-AUC."""
    per_query = [retrieval_metrics(labels, row, ks=(10,)) for row in scores]
    mean = mean_metrics(per_query)
    correlations = [spearman(row, reference) for row, reference in zip(scores, exact, strict=True)]
    defined = [c for c in correlations if c is not None]
    return {
        "spearman": float(np.mean(defined)) if defined else None,
        "spearman_per_query": correlations,
        "auprc@10": mean.get("auprc@10"),
        "roc_auc": mean.get("roc_auc"),
        "notes": mean.notes,
    }


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_setting(setting: Setting, arguments: argparse.Namespace, status: dict) -> dict:
    folder = Path(arguments.folder) / setting.name
    print(f"[{setting.name}] preparing data and model ({setting.description})", flush=True)
    prepared = prepare(setting, folder, arguments.queries)
    print(f"[{setting.name}] {prepared.facts}", flush=True)
    exact, exact_seconds = exact_tracin_layer_norm(prepared)
    print(f"[{setting.name}] exact TracIn + layer norm: {exact_seconds:.1f} s", flush=True)
    tools = tools_for(setting, set(arguments.tools.split(",")), status)
    samples: dict[str, list[Sample]] = {tool.label: [] for tool in tools}
    errors: dict[str, str] = {}
    for repeat in range(arguments.repeats):
        for number, tool in enumerate(tools):
            if tool.run is None or tool.label in errors:
                continue
            run_folder = folder / "runs" / f"{number}-{repeat}"
            shutil.rmtree(run_folder, ignore_errors=True)
            try:
                sample = tool.run(prepared, run_folder, repeat == 0)
            except Exception as error:  # one tool failing leaves the others' rows
                errors[tool.label] = f"{type(error).__name__}: {error}"
                print(f"[{setting.name}] {tool.label} FAILED: {errors[tool.label]}", flush=True)
                continue
            finally:
                shutil.rmtree(run_folder, ignore_errors=True)
            samples[tool.label].append(sample)
            print(
                f"[{setting.name}] repeat {repeat + 1} {tool.label}: build {sample.build}, open {sample.open}, "
                f"whole {sample.query_whole}, per-token {sample.query_per_token}",
                flush=True,
            )
    rows = [
        {
            "tool": "exact TracIn + layer norm (brute force, this script)",
            "query_whole_s": exact_seconds,
            "spearman": 1.0,
            **{k: v for k, v in quality(exact, exact, prepared.labels).items() if k != "spearman"},
        }
    ]
    for tool in tools:
        row = {"tool": tool.label}
        if tool.run is None or tool.label in errors:
            row["status"] = tool.missing or f"failed: {errors[tool.label]}"
        else:
            runs = samples[tool.label]
            for key in ("build", "open", "query_whole", "query_per_token"):
                row[f"{key}_s"] = median([getattr(s, key) for s in runs])
                row[f"{key}_s_repeats"] = [getattr(s, key) for s in runs]
            if runs[0].scores is not None:  # the floor computes none
                row.update(quality(runs[0].scores, exact, prepared.labels))
            row["notes"] = {**row.get("notes", {}), **runs[0].notes}
        rows.append(row)
    return {
        "setting": setting.name,
        "description": setting.description,
        "facts": prepared.facts,
        "rows": rows,
    }


def cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    facts = result["facts"]
    lines = [
        f"**{result['setting']}**: {result['description']}; {facts['train_rows']} training rows "
        f"({facts['poisoned_rows']} poisoned, {facts['mean_tokens_per_row']:.0f} tokens a row), "
        f"{facts['queries']} attacked queries ({facts['queries_fired']} own generations that fired, "
        f"{facts['mean_query_response_tokens']:.0f} response tokens each), "
        f"{facts['attributed_parameters']:,} attributed parameters of {facts['parameters']:,}.",
        "",
        f"| tool (version, setting) | build s | open s | {facts['queries']} queries s, whole "
        f"| {facts['queries']} queries s, with per-token "
        "| auPRC@10 | ROC-AUC | Spearman vs exact TracIn+LN |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "status" in row:
            lines.append(f"| {row['tool']} | {row['status']} | | | | | | |")
            continue
        lines.append(
            f"| {row['tool']} | {cell(row.get('build_s'), 1)} | {cell(row.get('open_s'), 1)} "
            f"| {cell(row.get('query_whole_s'), 2)} | {cell(row.get('query_per_token_s'), 2)} "
            f"| {cell(row.get('auprc@10'), 3)} | {cell(row.get('roc_auc'), 3)} "
            f"| {cell(row.get('spearman'), 3)} |"
        )
    return "\n".join(lines)


def library_commit(package: Path) -> str:
    """The git commit of the rapidin_index that was imported, and whether it had uncommitted changes."""

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", "-C", str(package), *command], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", ".")
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "not in a git checkout"


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    import faiss

    faiss.omp_set_num_threads(arguments.threads)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    status = peer_status()
    started = time.perf_counter()
    import rapidin_index

    package = Path(rapidin_index.__file__).resolve().parent
    report = {
        "command": "benchmarks/peers.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(arguments).items()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": arguments.threads,
        "note": arguments.note,
        "repeats": arguments.repeats,
        "rapidin_index": {"path": str(package), "commit": library_commit(package)},
        "peers": {peer: version(peer) if not why else why for peer, why in status.items()},
        "per_token_option": has_per_token_option(),
        "settings": [],
    }
    for setting in settings_from(arguments):
        report["settings"].append(run_setting(setting, arguments, status))
        Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.out).write_text(json.dumps(report, indent=2, default=float))
    report["seconds"] = time.perf_counter() - started
    Path(arguments.out).write_text(json.dumps(report, indent=2, default=float))
    print()
    for result in report["settings"]:
        print(markdown(result) + "\n")
    print(f"rapidin-index {report['rapidin_index']['commit']}; whole run {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
