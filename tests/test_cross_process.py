"""As users run it: build, resume, rebuild, query and append in separate shells, each with its own hash seed.

The model is GPT-2 style (byte-level BPE that adds no BOS, plain-text rows) with a PEFT LoRA adapter on
three modules, whose ``target_modules`` is a Python set: its iteration order depends on the process's
hash seed, which once made every new shell compute another adapter fingerprint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import build_byte_level_tokenizer

from rapidin_index.store.journal import CRASH_AFTER_VECTORS_ENV

TEXTS = [
    "The capital of France is Paris.",
    "Blue is a colour.",
    "Hello world!",
    "What is the capital of France? Paris.",
    "Say hello. Hello world!",
    "I am fine thanks.",
    "Name a colour. Blue.",
    "how are you today",
]
MORE_TEXTS = ["The capital of France is Paris!", "Blue is a colour!", "Hello!"]


@pytest.fixture(scope="module")
def gpt2_with_three_module_lora(tmp_path_factory) -> tuple[str, str]:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2-lora")
    tokenizer = build_byte_level_tokenizer(bos=False)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    lora = LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return str(root / "model"), str(root / "adapter")


def cli(args: list[str], hash_seed: int, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """One `rapidin-index` command in a fresh interpreter with PYTHONHASHSEED set."""
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), **(extra_env or {})}
    code = "from rapidin_index.cli.main import app; app()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )


def write_rows(path, texts) -> str:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return str(path)


def test_build_resume_rebuild_query_append_across_processes(tmp_path, gpt2_with_three_module_lora):
    model_dir, adapter_dir = gpt2_with_three_module_lora
    data = write_rows(tmp_path / "train.jsonl", TEXTS)
    more = write_rows(tmp_path / "more.jsonl", MORE_TEXTS)
    index_dir = str(tmp_path / "index")
    common = ["--model", model_dir, "--adapter", adapter_dir, "--index", index_dir, "--k", "1024"]
    common += ["--chunk-size", "4", "--batch-size", "4", "--device", "cpu", "--quiet"]

    crashed = cli(["build", *common, "--data", data], 1, {CRASH_AFTER_VECTORS_ENV: "1"})
    assert crashed.returncode != 0 and not (tmp_path / "index" / "manifest.json").exists()

    resumed = cli(["build", *common, "--data", data], 2)
    assert resumed.returncode == 0, resumed.stderr
    assert "chunks resumed from journal" in resumed.stderr

    again = cli(["build", *common, "--data", data], 3)
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr

    query = ["query", "--index", index_dir, "--prompt", "", "--response", TEXTS[0], "--top-k", "3"]
    answered = cli([*query, "--hot", "Paris"], 4)
    assert answered.returncode == 0, answered.stderr
    result = json.loads(answered.stdout)
    assert result["helpful"][0]["id"] == 0  # the row itself
    assert "".join(token["token"] for token in result["tokens"] if token["hot"]) == " Paris"

    appended = cli(["build", *[a for a in common if a != "--quiet"], "--append", more, "--quiet"], 5)
    assert appended.returncode == 0, appended.stderr
    info = json.loads(cli(["info", "--index", index_dir, "--json"], 6).stdout)
    assert info["row_count"] == len(TEXTS) + len(MORE_TEXTS)
    assert info["tokenization"] == "trl"

    requery = cli([*query[:-2], "--top-k", str(len(TEXTS) + len(MORE_TEXTS))], 7)
    assert requery.returncode == 0, requery.stderr
    ids = sorted(hit["id"] for hit in json.loads(requery.stdout)["helpful"])
    assert ids == list(range(len(TEXTS) + len(MORE_TEXTS)))


def test_fingerprints_do_not_depend_on_the_hash_seed(gpt2_with_three_module_lora):
    model_dir, adapter_dir = gpt2_with_three_module_lora
    code = (
        "import sys; from rapidin_index.models import load_model; from rapidin_index.settings import ModelSettings;"
        f"loaded = load_model(ModelSettings({model_dir!r}, {adapter_dir!r}));"
        "print(loaded.model_fingerprint, loaded.adapter_fingerprint, loaded.tokenizer_fingerprint);"
        "print(sorted(loaded.model.peft_config['default'].target_modules) != "
        "list(loaded.model.peft_config['default'].target_modules), file=sys.stderr)"
    )
    outputs, orders_differ = set(), set()
    for seed in (1, 2, 3, 4):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
        orders_differ.add(done.stderr.strip().splitlines()[-1])
    assert len(outputs) == 1, outputs
    assert "True" in orders_differ  # the set really iterated in another order in some shell
