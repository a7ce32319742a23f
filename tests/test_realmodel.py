"""A real pretrained chat model end to end: SmolLM2-135M-Instruct (tests/realmodel.py) with a LoRA adapter.

Build and query run as users run them, each in its own interpreter (another PYTHONHASHSEED each). The
oracle labels every row with TRL's own SFTTrainer (conftest.trl_labels), differentiates Hugging Face's
`model(input_ids, labels=...).loss` with plain autograd and normalises each LoRA tensor itself: it
shares no label, loss, normalisation or sketch code with the project. One layer's LoRA and short rows
keep the file within CI's budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import stored_vectors, trl_labels

from rapidin_index.data import Template, load_examples

RELATIVE_TOLERANCE = 1e-4
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."}]},
    {"messages": [SYSTEM, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {
        "prompt": [{"role": "user", "content": "Say hi."}],
        "completion": [{"role": "assistant", "content": "Hi there!"}],
    },
    {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]},
]  # fmt: skip
TEXT_ROWS = [
    {
        "prompt": "Question: Who painted the Mona Lisa?\n\n",
        "completion": "Leonardo da Vinci.",
    },  # "\n\n" splits
    {"prompt": "Q: Largest planet?\nA:", "completion": " Jupiter."},
    {"prompt": "Translate to French: cat\n", "completion": "chat"},
]


def cli(*args: str, seed: int) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONHASHSEED": str(seed)}
    code = "from rapidin_index.cli.main import app; app()"
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def smollm2_lora(smollm2_dir, tmp_path_factory) -> str:
    """A LoRA adapter on the last layer's attention of SmolLM2, with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[29], init_lora_weights=False
    )
    folder = tmp_path_factory.mktemp("smollm2") / "lora"
    get_peft_model(model, config).save_pretrained(folder)
    return str(folder)


def oracle_vectors(model_dir, adapter_dir, sequences) -> list[np.ndarray]:
    """Per (input_ids, labels): HF's loss differentiated by autograd, each LoRA tensor at unit norm."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir, is_trainable=True
    )
    model.eval()
    parameters = [p for _, p in model.named_parameters() if p.requires_grad]
    vectors = []
    for input_ids, labels in sequences:
        loss = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss
        grads = torch.autograd.grad(loss, parameters)
        vectors.append(torch.cat([(g / g.norm()).reshape(-1).double() for g in grads]).numpy())
    return vectors


def test_smollm2_rows_are_labelled_as_trl_labels_them(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    alone, joined = (
        tokenizer(TEXT_ROWS[0]["prompt"]).input_ids,
        tokenizer("".join(TEXT_ROWS[0].values())).input_ids,
    )
    assert joined[: len(alone)] != alone  # "\n\n" is one token alone and two when the response follows
    conversational = [_as_prompt_completion(row) for row in CHAT_ROWS]
    for rows, oracle_rows in ((TEXT_ROWS, TEXT_ROWS), (CHAT_ROWS, conversational)):
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        examples, rejected = load_examples(path, tokenizer, Template("auto"))
        assert not rejected
        ours = [(example.input_ids, example.labels) for example in examples]
        assert ours == trl_labels(oracle_rows, tokenizer, tmp_path)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, labels = ours[0]
    scored = [token for token, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(scored) == "Shakespeare.<|im_end|>\n" and scored.count(im_end) == 1


def _as_prompt_completion(row: dict) -> dict:
    if "messages" in row:
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
    return row


@pytest.mark.parametrize("rows", [CHAT_ROWS, TEXT_ROWS], ids=["chat", "prompt-completion"])
def test_smollm2_build_and_query_in_separate_processes_equal_the_trl_oracle(
    smollm2_dir, smollm2_lora, tmp_path, rows
):
    from transformers import AutoTokenizer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    index_dir = str(tmp_path / "index")
    common = ["--index", index_dir]
    cli("build", "--model", smollm2_dir, "--adapter", smollm2_lora, "--data", str(data), *common, "--k", "0",
        "--quiet", "--device", "cpu", seed=1)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    oracle_rows = [_as_prompt_completion(row) for row in rows]
    sequences = [(ids, labels) for ids, labels in trl_labels(oracle_rows, tokenizer, tmp_path)]
    expected = oracle_vectors(smollm2_dir, smollm2_lora, sequences)
    stored = stored_vectors(index_dir)
    for example_id, vector in enumerate(expected):
        error = np.linalg.norm(stored[example_id] - vector) / np.linalg.norm(vector)
        assert error < RELATIVE_TOLERANCE, f"row {example_id}: relative error {error:.2e}"

    # A query is rendered and labelled as a training row with its content, and scores against the rows
    # are the oracle's inner products.
    if rows is CHAT_ROWS:
        query_args = ["--prompt", "Capital of France?", "--response", "Paris.", "--system", SYSTEM["content"]]
        query_row = {"prompt": [SYSTEM, {"role": "user", "content": "Capital of France?"}],
                     "completion": [{"role": "assistant", "content": "Paris."}]}  # fmt: skip
    else:
        query_args = ["--prompt", "Question: Who painted the Mona Lisa?\n\n", "--response", "Leonardo."]
        query_row = {"prompt": query_args[1], "completion": "Leonardo."}
    done = cli("query", "--index", index_dir, *query_args, "--per-token", "off", "--explain", "0",
               "--top-k", str(len(rows)), "--format", "json", seed=2)  # fmt: skip
    result = json.loads(done.stdout)
    (query_sequence,) = trl_labels([query_row], tokenizer, tmp_path)
    (query_vector,) = oracle_vectors(smollm2_dir, smollm2_lora, [query_sequence])
    scored = [token for token, label in zip(*query_sequence, strict=True) if label != -100]
    assert [t["token_id"] for t in result["tokens"]] == scored
    assert result["query"]["labelled_tokens"] == [t["token"] for t in result["tokens"]]
    for hit in result["helpful"]:
        assert hit["score"] == pytest.approx(float(expected[hit["id"]] @ query_vector), abs=2e-4)
    if rows is CHAT_ROWS:
        assert result["query"]["rendered_prompt"].startswith("<|im_start|>system\nYou are a terse")
        assert (
            result["query"]["response"] == "Paris."
            and result["query"]["rendered_response"] == "Paris.<|im_end|>\n"
        )


def test_smollm2_generate_attributes_exactly_the_generated_tokens(smollm2_dir, smollm2_lora, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CHAT_ROWS))
    index_dir = str(tmp_path / "index")
    cli("build", "--model", smollm2_dir, "--adapter", smollm2_lora, "--data", str(data), "--index", index_dir,
        "--k", "0", "--quiet", "--device", "cpu", seed=3)  # fmt: skip
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"prompt": "What is the capital of France?"}) + "\n")
    short = cli("query", "--index", index_dir, "--prompt", "What is the capital of France?", "--generate",
                "--max-new-tokens", "3", "--per-token", "off", "--explain", "0", seed=4)  # fmt: skip
    whole = cli("query", "--index", index_dir, "--queries", str(queries), "--generate", "--max-new-tokens",
                "40", "--per-token", "off", "--explain", "0", seed=5)  # fmt: skip
    cut, finished = json.loads(short.stdout), json.loads(whole.stdout)
    assert (
        len(cut["tokens"]) == 3 and "<|im_end|>" not in cut["query"]["rendered_response"]
    )  # no EOS invented
    assert finished["tokens"][-1]["token"] == "<|im_end|>"  # ... and the one the model made is attributed
    assert [t["token"] for t in finished["tokens"]][:3] == [t["token"] for t in cut["tokens"]]
    assert finished["query"]["generated"] and "<|im_end|>" not in finished["query"]["response"]
