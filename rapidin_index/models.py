"""Load a causal LM (and optional PEFT LoRA adapter), pick the parameters to attribute, fingerprint both."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, is_dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from rapidin_index.errors import ModelError
from rapidin_index.model_identity import (
    ADAPTER_CONFIG_NAME,
    check_adapter_source,
    check_model_source,
    read_config,
)
from rapidin_index.settings import DTYPE_NAMES, ModelSettings

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16), strict=True))


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_fingerprint: str
    adapter_fingerprint: str | None
    tokenizer_fingerprint: str


def load_model(settings: ModelSettings, device: torch.device | str = "cpu") -> LoadedModel:
    """Load model + tokenizer, in eval mode (no dropout) with gradients enabled on the selected parameters."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(settings.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=DTYPES[settings.dtype])
    except (OSError, ValueError) as error:
        raise ModelError(_load_failure(settings.model, "model", error)) from error
    model_fingerprint = fingerprint_module(model)
    adapter_fingerprint = None
    if settings.adapter:
        model = _attach_adapter(model, settings.adapter, settings.model)
        adapter_fingerprint = fingerprint_adapter(model)
    model.eval()
    model.to(device)
    return LoadedModel(
        model, tokenizer, model_fingerprint, adapter_fingerprint, fingerprint_tokenizer(tokenizer)
    )


def load_tokenizer(model: str):
    """The model's tokenizer as every stage uses it (with a pad token): cheap, so checked before the model."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own progress bar covers the long work
    check_model_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ModelError(_load_failure(model, "tokenizer", error)) from error
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss (labels are -100 there), so any id works.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_failure(model: str, part: str, error: Exception) -> str:
    if Path(model).expanduser().is_dir():
        return f"cannot load model {model} ({part}): {error}"
    return (
        f"cannot load model {model!r}: there is no folder of that name here, and loading it as a hub id failed "
        f"(offline, or no such model on the hub): {error}"
    )


def _attach_adapter(model: nn.Module, adapter: str, model_name: str) -> nn.Module:
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError("--adapter needs the peft package: pip install 'rapidin-index[peft]'") from None
    check_adapter_source(adapter)
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as error:
        # PEFT's NoMatchingPeftModuleError (a ValueError) when the adapter's target modules are not in
        # this model; torch's "size mismatch" RuntimeError when they are, with other shapes.
        if isinstance(error, RuntimeError) and "size mismatch" not in str(error):
            raise
        base = (read_config(adapter, ADAPTER_CONFIG_NAME) or {}).get("base_model_name_or_path")
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise ModelError(
            f"--adapter {adapter} does not fit --model {model_name}: the adapter was made for base model "
            f"{base or '(not named in its adapter_config.json)'} ({reason}); give the model it was trained on"
        ) from None


def select_parameters(model: nn.Module, settings: ModelSettings) -> list[tuple[str, nn.Parameter]]:
    """The attributed parameters, in model order; every other parameter is frozen.

    With an adapter: its trainable tensors (lora_A, lora_B, modules_to_save). Without: every parameter.
    ``settings.params`` narrows either set. Tied parameters appear once.
    """
    if settings.adapter:
        candidates = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    else:
        candidates = list(model.named_parameters())
    if settings.params:
        pattern = re.compile(settings.params)
        candidates = [(name, p) for name, p in candidates if pattern.search(name)]
    if not candidates:
        names = [name for name, _ in model.named_parameters()][:8]
        raise ModelError(f"--params {settings.params!r} selects no parameter; names look like: {names}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, parameter in candidates:
        parameter.requires_grad_(True)
    return candidates


def _hash_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def canonical_json(value) -> str:
    """JSON that is a pure function of the value: sorted keys, sets sorted, no process-dependent text.

    Configs hold sets (PEFT's ``target_modules``), enums and dtypes; ``json.dumps(default=str)`` would
    write a set in its hash-seed-dependent iteration order, so a fingerprint would change from one shell
    to the next.
    """
    return json.dumps(_canonical(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _canonical(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Enum):
        return _canonical(value.value)
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(item) for item in value), key=lambda item: json.dumps(item, sort_keys=True))
    if is_dataclass(value) and not isinstance(value, type):
        return _canonical(asdict(value))
    if isinstance(value, (torch.dtype, Path)):
        return str(value)
    text = str(value)
    # An object whose str() is its memory address says nothing stable; its type does.
    return f"<{type(value).__qualname__}>" if " at 0x" in text else text


def fingerprint_module(model: nn.Module) -> str:
    """sha256 over every weight (names, dtypes, shapes, bytes) and the config: changes when any weight does."""
    named = list(model.state_dict().items())
    config = getattr(model, "config", None)
    config_dict = config.to_diff_dict() if config is not None else {}
    config_dict.pop("transformers_version", None)  # a library upgrade does not change the model
    return hashlib.sha256((_hash_tensors(named) + canonical_json(config_dict)).encode()).hexdigest()


# Adapter config keys that say where or how the adapter was loaded, not what it computes: the base
# model's weights are fingerprinted on their own, and a moved base model is still the same model.
_ADAPTER_CONFIG_LOCATION_KEYS = ("base_model_name_or_path", "revision", "inference_mode")


def fingerprint_adapter(model: nn.Module) -> str:
    """sha256 over the adapter's tensors and its config (canonical JSON, location keys left out)."""
    adapter_tensors = [
        (name, p) for name, p in model.named_parameters() if "lora_" in name or p.requires_grad
    ]
    configs = {}
    for adapter_name, config in getattr(model, "peft_config", {}).items():
        config_dict = config.to_dict()
        for key in _ADAPTER_CONFIG_LOCATION_KEYS:
            config_dict.pop(key, None)
        configs[adapter_name] = config_dict
    return hashlib.sha256((_hash_tensors(adapter_tensors) + canonical_json(configs)).encode()).hexdigest()


def fingerprint_tokenizer(tokenizer) -> str:
    """sha256 over the full tokenizer definition, its special tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    extra = canonical_json(
        {
            "special": tokenizer.special_tokens_map,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "class": type(tokenizer).__name__,
        }
    )
    return hashlib.sha256((definition + extra).encode()).hexdigest()
