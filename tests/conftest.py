"""Shared fixtures: tiny tokenizers built in-process (no hub, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# Enough words for the alpaca headers and the sentences the tests use; anything else maps to <unk>.
TRAINING_SENTENCES = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response:",
    "What is the capital of France? The capital of France is Paris.",
    "Name a colour. Blue is a colour. Say hello. Hello world!",
    "Question: Answer: how are you today I am fine thanks",
]

# Each assistant turn ends with </s>, as many real templates do; the generation prompt opens a turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %} </s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that prepends <s> when add_special_tokens=True and has a chat template."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        TRAINING_SENTENCES, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS)
    )
    return wrap_tokenizer(tokenizer, bos=True)


def wrap_tokenizer(tokenizer: Tokenizer, bos: bool, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A trained `tokenizers` backend as a transformers tokenizer: <s> prepended when ``bos``, the tests'
    special tokens, and (``chat_template``) the tests' chat template."""
    if bos:
        bos_id = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture
def word_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer()


# --------------------------------------------------------------------------- tiny models and data


def docstring_rows(count: int) -> list[dict]:
    """Alpaca rows from the standard library's own docstrings: real human-written text, shipped offline."""
    import collections
    import json as json_module

    from rapidin_index.demo.datasets import member_rows

    return member_rows((str, list, dict, set, bytes, collections.OrderedDict, json_module), count, 160)


@pytest.fixture(scope="module")
def bundled_docstring_rows() -> list[dict]:
    """The demo's bundled docstring rows (`demo.datasets.load_docstring_rows`), once a module."""
    from rapidin_index.demo.datasets import load_docstring_rows

    return load_docstring_rows()


@pytest.fixture(scope="session")
def training_rows() -> list[dict]:
    return docstring_rows(24)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, training_rows) -> dict[str, str]:
    """Saved tiny Llama and GPT-2 (+ a LoRA adapter each): {'llama', 'gpt2', 'llama_lora', 'gpt2_lora'}."""
    from rapidin_index.demo.tiny_models import save_lora_adapter, save_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    texts = [row["instruction"] + " " + row["output"] for row in training_rows]
    dirs = {}
    for architecture in ("llama", "gpt2"):
        model_dir = save_tiny_model(root / architecture, architecture, texts, vocab_size=400)
        dirs[architecture] = str(model_dir)
        dirs[f"{architecture}_lora"] = str(save_lora_adapter(model_dir, root / f"{architecture}_lora"))
    return dirs


@pytest.fixture(scope="session")
def training_file(tmp_path_factory, training_rows) -> str:
    import json as json_module

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json_module.dumps(row) + "\n" for row in training_rows))
    return str(path)


def copy_with_other_chat_template(model_dir: str, destination) -> str:
    """A copy of a saved model whose tokenizer differs only in its chat template."""
    import json as json_module
    import shutil

    shutil.copytree(model_dir, destination)
    config_path = destination / "tokenizer_config.json"
    config = json_module.loads(config_path.read_text())
    config["chat_template"] = "{{ messages }}"
    config_path.write_text(json_module.dumps(config))
    (destination / "chat_template.jinja").unlink(missing_ok=True)
    return str(destination)


def build_metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (Metaspace, prepend scheme "first"): Llama/Mistral/Gemma's leading "▁"."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.train_from_iterator(
        TRAINING_SENTENCES + ["Answer: Paris", "zParis qParis kParis"] * 4,
        trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False),
    )
    return wrap_tokenizer(tokenizer, bos=True, chat_template=False)


def build_byte_level_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE; with ``bos=False`` it adds no special token at all (as GPT-2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        TRAINING_SENTENCES * 4,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return wrap_tokenizer(tokenizer, bos=bos)


# --------------------------------------------------------------------------- shared test helpers


def write_rows(directory, file_format: str, rows: list[dict]) -> Path:
    """Write `rows` in one of the supported layouts and return the file path."""
    if file_format in ("jsonl", "ndjson"):
        path = directory / f"rows.{file_format}"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif file_format == "json_list":
        path = directory / "rows.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif file_format == "json_data":
        path = directory / "rows.json"
        path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    elif file_format == "parquet":
        path = directory / "rows.parquet"
        columns = dict.fromkeys(key for row in rows for key in row)  # from_pylist keeps row 0's keys only
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({column: [row.get(column) for row in rows] for column in columns}), path)
    elif file_format == "csv":
        import csv

        path = directory / "rows.csv"
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(file_format)
    return path


def stored_vectors(index_dir) -> dict:
    """{training example id: stored vector} of an index folder, read with FAISS itself (not the store)."""
    import json as json_module
    from pathlib import Path

    import faiss

    index_dir = Path(index_dir)
    manifest = json_module.loads((index_dir / "manifest.json").read_text())
    vectors_file = next(name for name in manifest["files"] if name.endswith(".faiss"))
    index = faiss.read_index(str(index_dir / vectors_file))
    ids = faiss.vector_to_array(faiss.downcast_index(index).id_map)
    return {int(i): index.reconstruct(int(i)) for i in ids}


def build_settings(model_dir: str, adapter: str | None = None, sketch_dim: int = 4096, **overrides):
    """BuildSettings for the tiny models: K = ``sketch_dim`` (lambda 20, seed 42), batches of 4, chunks of
    8 rows, CPU; any BuildSettings field in ``overrides``."""
    from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

    values = {"sketch": SketchSettings(sketch_dim, 20, 42), "batch_size": 4, "chunk_size": 8, "device": "cpu"}
    values["vector_dtype"] = "float32"  # exact scores to compare with brute force (the default is float16)
    values.update(overrides)
    return BuildSettings(ModelSettings(model_dir, adapter), **values)


def brute_force_sketch(model, blocks, pairs, pad_token_id: int, sketch, normalize: str = "layer"):
    """[rows, K] slow reference: one plain backward per (input_ids, labels) pair, normalised block by
    block and sketched by the literal `sketch.reference_sketch` (no hooks, no fast projector)."""
    import torch

    from rapidin_index.gradients import normalize_flat, reference_gradient
    from rapidin_index.losses import collate
    from rapidin_index.sketch import reference_sketch

    raw = torch.stack(
        [reference_gradient(model, blocks, collate([pair], pad_token_id, "cpu")) for pair in pairs]
    )
    return reference_sketch(normalize_flat(raw, blocks, normalize), sketch, blocks)


@pytest.fixture(scope="module")
def exported_index(tmp_path_factory, tiny_model_dirs, training_file):
    """A tiny index (K = 1024) and its tar.gz bundle, built from a model that then moved: the receiving
    team has it somewhere else. Namespace(index, model, bundle)."""
    import shutil
    from types import SimpleNamespace

    from rapidin_index.build import build_index
    from rapidin_index.store.bundle_export import export_index

    root = tmp_path_factory.mktemp("export")
    model_at_build = root / "model-at-build"
    shutil.copytree(tiny_model_dirs["llama"], model_at_build)
    index_dir = root / "index"
    build_index(
        training_file, index_dir, build_settings(str(model_at_build), sketch_dim=1024), progress=False
    )
    moved = root / "model-moved"
    model_at_build.rename(moved)
    bundle = export_index(index_dir, root / "bundle.tar.gz")
    return SimpleNamespace(index=index_dir, model=str(moved), bundle=bundle)


def blocks_of(*shapes):
    """Gradient blocks of zero parameters of these shapes, named p0, p1, ... (no model needed)."""
    import torch

    from rapidin_index.capture import gradient_blocks

    return gradient_blocks(
        [(f"p{i}", torch.nn.Parameter(torch.zeros(shape))) for i, shape in enumerate(shapes)]
    )


def low_rank_sketch_estimates(algorithm: str, seeds: int = 200):
    """(estimates [seeds], true <x, y>, K): sketched inner products of two unit low-rank matrices (as a
    linear layer's gradients are) under ``seeds`` independent hashes; the true value from torch alone."""
    import numpy as np
    import torch

    from rapidin_index.settings import SketchSettings
    from rapidin_index.sketch import reference_sketch

    torch.manual_seed(3)
    rows, cols, sketch_dim = 64, 48, 1024
    u, v = torch.randn(2, 3, rows), torch.randn(2, 3, cols)
    x = torch.einsum("tr,tc->rc", u[0], v[0]).reshape(-1)
    y = (0.5 * x + torch.einsum("tr,tc->rc", u[1], v[1]).reshape(-1)) / 1.5
    x, y = x / x.norm(), y / y.norm()
    blocks = blocks_of((rows, cols))
    estimates = []
    for seed in range(seeds):
        settings = SketchSettings(sketch_dim, seed=seed, algorithm=algorithm)
        sx, sy = reference_sketch(torch.stack([x, y]), settings, blocks)
        estimates.append(float(sx @ sy))
    return np.array(estimates), float(x @ y), sketch_dim


def tensor_digest(tensors) -> str:
    """sha256 over the bytes of a sequence of CPU tensors."""
    import hashlib

    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()


def digest_in_another_process(import_line: str, call: str) -> str:
    """``tensor_digest`` of what ``call`` returns, computed in a subprocess with another PYTHONHASHSEED."""
    import os
    import subprocess
    import sys

    code = f"{import_line}; from conftest import tensor_digest; print(tensor_digest({call}))"
    environment = {**os.environ, "PYTHONHASHSEED": "999", "PYTHONPATH": os.path.dirname(__file__)}
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    )
    return other.stdout.strip()


# The conformance matrix's models and rows (test_conformance.py, test_conformance_kron.py): module-scoped,
# so each of the two files, which pytest-xdist's --dist loadfile runs side by side, saves its own copy.
@pytest.fixture(scope="module")
def conformance_models(tmp_path_factory) -> dict:
    from test_conformance import save_models

    return save_models(tmp_path_factory)


@pytest.fixture(scope="module")
def conformance_rows(tmp_path_factory) -> str:
    from test_conformance import write_rows

    return write_rows(tmp_path_factory)


# --------------------------------------------------------------------------- the TRL oracle and the real model


def trl_labels(rows: list[dict], tokenizer, tmp_path, **sft_options) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row as TRL's SFTTrainer (dataset preparation + collator) makes them;
    ``config``: more SFTConfig fields (e.g. assistant_only_loss=True)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=1, **sizes)
    arguments = SFTConfig(
        output_dir=str(tmp_path / "trl"), report_to="none", max_length=None, use_cpu=True, **sft_options
    )
    trainer = SFTTrainer(
        model=LlamaForCausalLM(config),
        args=arguments,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    sequences = []
    for example in trainer.train_dataset:
        batch = trainer.data_collator([example])
        input_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        sequences.append((input_ids, [-100, *labels[1:]]))
    return sequences


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct from the registry's GGUF wheel, as a cached model folder (tests/realmodel.py)."""
    pytest.importorskip("gguf", reason="the real-model tests need gguf (pip install 'rapidin-index[dev]')")
    from realmodel import smollm2_folder

    try:
        return str(smollm2_folder())
    except RuntimeError as error:
        pytest.skip(f"SmolLM2 is not available: {error}")


def small_manifest(**overrides):
    """A manifest of a made-up K = 4096 index (no files), with ``overrides``."""
    from rapidin_index.store.manifest import Manifest

    values = {
        "model": {"name_or_path": "/models/tiny", "fingerprint": "model-sha", "dtype": "float32"},
        "adapter": None,
        "tokenizer": {"fingerprint": "tokenizer-sha", "chat_template_sha256": None},
        "template": {"name": "alpaca"},
        "max_length": 256,
        "parameters": {"regex": ".*", "names": ["a"], "shapes": [[2, 2]], "gradient_dim": 4},
        "normalize": "layer",
        "sketch": {
            "sketch_dim": 4096,
            "shuffle_lambda": 20,
            "seed": 42,
            "gradient_dim": 4,
            "output_dim": 4096,
        },
        "vector_dtype": "float32",
    }
    values.update(overrides)
    return Manifest(**values)
