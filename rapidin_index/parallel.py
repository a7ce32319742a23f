"""Everything about devices (and, later, processes) lives here; the stages only see a ``device`` argument."""

from __future__ import annotations

import faiss
import torch

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """A device was asked for that this machine does not have."""


def resolve_device(device: str) -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU; 'cuda' without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    if device not in DEVICES and not device.startswith("cuda:"):
        raise DeviceError(f"--device {device!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    return torch.device(device)


def faiss_gpu_count() -> int:
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus() if get_num_gpus is not None else 0


def search_index(cpu_index: faiss.Index, use_gpus: bool = True) -> faiss.Index:
    """The index to search: sharded across every GPU when faiss-gpu sees several, else on one GPU or the CPU.

    Sharding splits the rows, so each GPU holds 1/n of the vectors and FAISS merges the exact top-k.
    """
    gpus = faiss_gpu_count() if use_gpus else 0
    if gpus == 0:
        return cpu_index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(cpu_index, co=options, ngpu=gpus)
