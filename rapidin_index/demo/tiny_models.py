"""Tiny causal LMs built in-process from transformers config classes (no hub download).

Used by the tests, the demo, the notebooks and the benchmarks: a word-level tokenizer trained on the
project's own text, a 2-layer Llama or GPT-2, an optional LoRA adapter, and a short CPU fine-tune.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rapidin_index.errors import DemoError

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A BPE tokenizer trained on ``texts`` that adds <s> at the start, with a small chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    from tokenizers import decoders

    backend.decoder = decoders.ByteLevel()
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    architecture: str,
    vocab_size: int,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    positions: int = 512,
):
    """A randomly initialised 'llama' or 'gpt2' causal LM with a few thousand parameters a layer, and a
    context of ``positions`` tokens (GPT-2's are learned: a longer sequence fails)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if architecture == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)
    if architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=layers,
            n_head=4,
            n_positions=positions,
            bos_token_id=2,
            eos_token_id=3,
            resid_pdrop=0.1,  # dropout on, so the tests prove that the model runs in eval mode
            embd_pdrop=0.1,
            attn_pdrop=0.1,
        )
        return GPT2LMHeadModel(config)
    raise DemoError(f"unknown tiny architecture {architecture!r}: use 'llama' or 'gpt2'")


def save_tiny_model(
    folder: str | Path, architecture: str, texts: list[str], vocab_size: int = 2000, **kwargs
) -> Path:
    """Train a tokenizer on ``texts``, build a tiny model, save both to ``folder`` (a local model path)."""
    folder = Path(folder)
    tokenizer = train_tokenizer(texts, vocab_size)
    model = make_tiny_model(architecture, len(tokenizer), **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_lora_adapter(
    model_folder: str | Path, adapter_folder: str | Path, rank: int = 4, seed: int = 0
) -> Path:
    """A LoRA adapter on the attention and MLP projections, with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder)
    targets = ["c_attn", "c_fc"] if model.config.model_type == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(adapter_folder)
    return Path(adapter_folder)
