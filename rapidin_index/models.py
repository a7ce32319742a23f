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
        model = _attach_adapter(model, settings.adapter)
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


# Files of which a saved tokenizer has at least one (fast, SentencePiece, BPE and WordPiece ones).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# What the hub accepts as a repo id: "name" or "owner/name" of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_model_source(model: str) -> None:
    """Refuse, by name, a --model that is neither a saved model folder nor something a hub id could be."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"cannot load model {model}: the folder holds no config.json, so it is not a saved Hugging "
                "Face model; give the folder that save_pretrained() wrote (config.json, weights, tokenizer)"
            )
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelError(
                f"cannot load model {model}: the folder holds no tokenizer ({', '.join(_TOKENIZER_FILES)}); "
                "save it beside the model with tokenizer.save_pretrained(FOLDER)"
            )
        return
    if path.exists():
        raise ModelError(
            f"cannot load model {model}: it is a file; give the model's folder (with config.json) or a hub id"
        )
    if not _HUB_ID.match(model) or len(model) > 96 or "--" in model or ".." in model:
        raise ModelError(
            f"cannot load model {model}: no such folder, and it is not a hub id either (those look like "
            "'owner/name'); check the path"
        )


def _load_failure(model: str, part: str, error: Exception) -> str:
    if Path(model).expanduser().is_dir():
        return f"cannot load model {model} ({part}): {error}"
    return (
        f"cannot load model {model!r}: there is no folder of that name here, and loading it as a hub id failed "
        f"(offline, or no such model on the hub): {error}"
    )


def _attach_adapter(model: nn.Module, adapter: str) -> nn.Module:
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError("--adapter needs the peft package: pip install 'rapidin-index[peft]'") from None
    if not Path(adapter).expanduser().is_dir():
        raise ModelError(
            f"--adapter {adapter}: no such folder; give the folder PEFT's save_pretrained() wrote"
        )
    if not (Path(adapter) / "adapter_config.json").exists():
        raise ModelError(f"--adapter {adapter!r} is not a PEFT adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


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
