"""Conformance matrix: stored vectors (K = 0) equal plain autograd of Hugging Face's own loss, per example.

For every architecture below, a tiny random-init model is built from its transformers config class, with
full parameters and with a PEFT LoRA adapter on PEFT's default target modules (``all-linear`` where
PEFT has no default for the architecture, or its default matches no module). The index is built through the public API; the oracle
writes its own labels (TRL's way: the prompt's tokens are the joint tokenization's prefix), calls
``model(input_ids, labels=...).loss``, differentiates it with ``torch.autograd.grad`` and normalises each
parameter tensor itself. It shares no loss, label, normalisation or gradient code with the project.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_word_tokenizer, stored_vectors

from rapidin_index import SketchSettings, build_index
from rapidin_index.settings import BuildSettings, ModelSettings

ARCHITECTURES = [
    "llama", "mistral", "mixtral", "qwen2_moe", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "phi3", "phi", "opt", "gpt2", "gpt_neox", "bloom", "falcon", "olmo2", "granite", "cohere", "stablelm",
    "biogpt", "xglm",
]  # fmt: skip

ROWS = [
    {"prompt": "What is the capital of France? ", "completion": "The capital of France is Paris."},
    {"prompt": "Name a colour. ", "completion": "Blue is a colour."},
    {"prompt": "Say hello. ", "completion": "Hello world!"},
]
RELATIVE_TOLERANCE = 1e-5
# A tensor whose true gradient is zero comes back from autograd as round-off (OPT's key bias: ~1e-10 where
# the others are ~1): the oracle takes a block below this fraction of the largest one as zero.
ROUND_OFF = 1e-7


def tiny_config(model_type: str, tokenizer):
    from transformers import AutoConfig

    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = len(tokenizer)
    if model_type == "gpt2":
        sizes = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}
    elif model_type == "opt":
        sizes = {"hidden_size": 32, "ffn_dim": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
        sizes |= {"word_embed_proj_dim": 32, "max_position_embeddings": 128}
    elif model_type == "bloom":
        sizes = {"hidden_size": 32, "n_layer": 2, "n_head": 4}
    elif model_type == "falcon":
        sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2}
        sizes |= {"new_decoder_architecture": True}
    else:
        sizes = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
        sizes |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
        if model_type not in ("phi3", "stablelm", "gpt_neox", "phi", "biogpt", "xglm"):
            sizes["head_dim"] = 8
        if model_type in ("mixtral", "qwen2_moe"):
            sizes |= {"num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2}
            sizes |= {"moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}
    return AutoConfig.for_model(model_type, vocab_size=vocab, **sizes, **special)


def save_models(tmp_path_factory) -> dict:
    """{model_type: (model folder, adapter folder)}, each a tiny random-init model saved to disk."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    from peft.utils.error import NoMatchingPeftModuleError
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("conformance")
    tokenizer = build_word_tokenizer()
    saved = {}
    for model_type in ARCHITECTURES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, tokenizer))
        model_dir, adapter_dir = root / model_type, root / f"{model_type}-lora"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        targets = None if DEFAULTS.get(model_type) else "all-linear"
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        try:
            peft_model = get_peft_model(model, config)
        except NoMatchingPeftModuleError:  # PEFT's default names no module of this layout (mixtral)
            config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
            peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(adapter_dir)
        saved[model_type] = (str(model_dir), str(adapter_dir))
    return saved


def write_rows(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("conformance-data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


def oracle_gradients(model_dir: str, adapter_dir: str | None, normalize: str) -> list[np.ndarray]:
    """Per row: the flattened gradient of HF's own loss, each parameter tensor normalised by itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        parameters = [p for _, p in model.named_parameters() if p.requires_grad]
    else:
        parameters = list(model.parameters())
    model.eval()
    vectors = []
    for row in ROWS:
        prompt_ids = tokenizer(row["prompt"]).input_ids
        full_ids = tokenizer(row["prompt"] + row["completion"]).input_ids + [tokenizer.eos_token_id]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
        loss = model(input_ids=torch.tensor([full_ids]), labels=torch.tensor([labels])).loss
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        grads = [
            torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.detach().reshape(-1).double()
            for p, g in zip(parameters, grads, strict=True)
        ]
        largest = max(float(grad.norm()) for grad in grads)
        pieces = []
        for grad in grads:
            if float(grad.norm()) < ROUND_OFF * largest:
                grad = torch.zeros_like(grad)
            elif normalize == "layer":
                grad = grad / grad.norm()
            pieces.append(grad)
        vectors.append(torch.cat(pieces).numpy())
    return vectors


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_stored_vectors_equal_hugging_face_autograd(
    conformance_models, conformance_rows, tmp_path, model_type, lora
):
    model_dir, adapter_dir = conformance_models[model_type]
    adapter_dir = adapter_dir if lora else None
    for normalize in ("none", "layer"):
        settings = BuildSettings(
            ModelSettings(model_dir, adapter_dir),
            SketchSettings(0),
            normalize=normalize,
            template="completion",
            max_length=None,
            batch_size=3,
            vector_dtype="float32",
        )
        index_dir = tmp_path / normalize
        report = build_index(conformance_rows, index_dir, settings, progress=False)
        assert report.rows_indexed == len(ROWS) and report.rows_rejected == 0
        stored = stored_vectors(index_dir)
        for example_id, expected in enumerate(oracle_gradients(model_dir, adapter_dir, normalize)):
            actual = stored[example_id].astype(np.float64)
            assert actual.shape == expected.shape
            error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
            assert error < RELATIVE_TOLERANCE, (
                f"{model_type} {'lora' if lora else 'full'} normalize={normalize} row {example_id}: "
                f"relative error {error:.2e}; exact path: {report.backward_path}"
            )
