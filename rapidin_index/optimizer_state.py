"""Optimizer-aware gradients: Adam's second moments, matched to the attributed tensors, as a per-coordinate scale.

Every fine-tune our users run takes Adam or AdamW steps, whose update divides the gradient elementwise by
``sqrt(v_hat) + eps`` (``v_hat = exp_avg_sq / (1 - beta2^step)``). With ``build --optimizer-state PATH``
each example's gradient (build side and query side alike, before layer normalisation) is multiplied by
``1 / (sqrt(v_hat) + eps)``, Adam's own denominator at the checkpoint, so scores stay inner products of
stored vectors (TrackStar and LESS use the same normaliser).

PATH is a Trainer checkpoint folder (its ``optimizer.pt``) or a file saved with
``torch.save(optimizer.state_dict(), ...)`` of ``torch.optim.Adam`` / ``AdamW``. Its tensors are matched
to the model's, never guessed:

* by name, where the state carries ``param_names`` (an optimizer built from ``named_parameters()``);
* else by position, in the order the optimizer was given the trained tensors: one param group in model
  order (``AdamW(model.parameters())``; with an adapter, its trainable LoRA tensors), or Trainer's two
  groups (weight-decayed tensors, then the others, by Trainer's own rule).

A count or a shape that differs is refused, naming the first tensor that differs. The manifest records
the state's path and a fingerprint of the values used (:attr:`OptimizerScaling.record`); a query reloads
the state (from the recorded path, or ``--optimizer-state``) and refuses one whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rapidin_index.errors import OptimizerStateError
from rapidin_index.factors import gradient_rows
from rapidin_index.sketch.kron import RapidGradKronProjector

CHECKPOINT_FILE = "optimizer.pt"
"""The file a Hugging Face Trainer checkpoint folder keeps its optimizer state in."""
PEFT_PREFIX = "base_model.model."


@dataclass
class OptimizerScaling:
    """Per attributed tensor, ``1 / (sqrt(v_hat) + eps)`` (float32, flattened like its gradient block)."""

    path: str
    fingerprint: str
    matched_by: str  # "name", "position" or "trainer-groups"
    scales: dict[str, torch.Tensor]  # block name -> [numel] float32
    step: float
    eps: float

    @property
    def record(self) -> dict:
        """What the manifest keeps: where the state was and what was used of it."""
        return {
            "path": self.path,
            "fingerprint": self.fingerprint,
            "matched_by": self.matched_by,
            "tensors": len(self.scales),
            "step": self.step,
            "eps": self.eps,
        }

    def to(self, device) -> OptimizerScaling:
        moved = {name: scale.to(device) for name, scale in self.scales.items()}
        return OptimizerScaling(self.path, self.fingerprint, self.matched_by, moved, self.step, self.eps)


def state_file(path: str | Path) -> Path:
    """The optimizer state file of a Trainer checkpoint folder, or the file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
        if not path.exists():
            raise OptimizerStateError(
                f"--optimizer-state {path.parent}: the folder holds no {CHECKPOINT_FILE}; give a Trainer "
                "checkpoint folder or a file saved with torch.save(optimizer.state_dict(), PATH)"
            )
    elif not path.exists():
        raise OptimizerStateError(f"--optimizer-state {path} does not exist")
    return path


def load_state_dict(path: str | Path) -> dict:
    """The optimizer's ``state_dict()`` (tensors on the CPU; weights_only: no code runs from the file)."""
    path = state_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors for files it cannot read
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OptimizerStateError(
            f"--optimizer-state {path} is not a readable torch optimizer state ({first[:160]})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise OptimizerStateError(
            f"--optimizer-state {path} holds no optimizer state_dict (no 'param_groups'); save it with "
            "torch.save(optimizer.state_dict(), PATH)"
        )
    return state


def load_scaling(path: str | Path, model: nn.Module, blocks: list, with_adapter: bool) -> OptimizerScaling:
    """Read the state at ``path`` and match it to ``blocks`` (`capture.GradientBlock`) of ``model``."""
    file = state_file(path)
    state = load_state_dict(file)
    entries = _entries(state, file)
    by_name = _match(entries, model, blocks, with_adapter, file)
    scales, digest = {}, hashlib.sha256()
    steps, epsilons = set(), set()
    for block in blocks:
        entry = by_name[block.name]
        second_moment = entry["exp_avg_sq"]
        step = float(entry["step"])
        eps, beta2 = float(entry["group"].get("eps", 1e-8)), float(entry["group"]["betas"][1])
        correction = 1.0 - beta2**step if step > 0 else 1.0
        denominator = (second_moment.double() / correction).sqrt() + eps
        scales[block.name] = (1.0 / denominator).float().reshape(-1)
        digest.update(block.name.encode() + b"\0" + repr((step, eps, beta2)).encode())
        digest.update(second_moment.float().contiguous().numpy().tobytes())
        steps.add(step)
        epsilons.add(eps)
    return OptimizerScaling(
        str(file.resolve()),
        digest.hexdigest(),
        _matched_by(entries, state),
        scales,
        max(steps),
        max(epsilons),
    )


def _entries(state: dict, file: Path) -> list[dict]:
    """One entry a tensor the optimizer holds, in its order: {group, group_number, name, exp_avg_sq, step}."""
    entries = []
    per_tensor = state.get("state", {})
    for group_number, group in enumerate(state["param_groups"]):
        if "betas" not in group:
            raise OptimizerStateError(
                f"--optimizer-state {file}: param group {group_number} has no 'betas'; only Adam and AdamW "
                "states (exp_avg_sq) can precondition gradients"
            )
        names = group.get("param_names")
        for number, key in enumerate(group["params"]):
            moments = per_tensor.get(key, {})
            entries.append(
                {
                    "group": group,
                    "group_number": group_number,
                    "name": None if names is None else names[number],
                    "exp_avg_sq": moments.get("exp_avg_sq"),
                    "step": moments.get("step", 0),
                }
            )
    return entries


def _matched_by(entries: list[dict], state: dict) -> str:
    if entries and all(entry["name"] is not None for entry in entries):
        return "name"
    return "trainer-groups" if len(state["param_groups"]) == 2 else "position"


def _match(entries: list[dict], model: nn.Module, blocks: list, with_adapter: bool, file: Path) -> dict:
    """{block name: entry}; refuses a count or shape that differs, naming the first tensor that does."""
    if entries and all(entry["name"] is not None for entry in entries):
        named = {_bare(entry["name"]): entry for entry in entries}
        by_name = {}
        for block in blocks:
            entry = named.get(_bare(block.name))
            if entry is None:
                raise OptimizerStateError(
                    f"--optimizer-state {file} holds no tensor named {block.name} (it names "
                    f"{len(entries)} tensors, e.g. {entries[0]['name']}); give the state of the run that "
                    "trained these weights"
                )
            by_name[block.name] = entry
    else:
        trained = _trained_order(model, with_adapter, [len(g["params"]) for g in _groups(entries)])
        if len(trained) != len(entries):
            raise OptimizerStateError(
                f"--optimizer-state {file} holds {len(entries)} tensors, the model trains {len(trained)} "
                f"({'the adapter' if with_adapter else 'every parameter'}); the first one: {trained[0]}. "
                "Give the state of the run that trained these weights (or save it with named parameters)"
            )
        by_name = dict(zip(trained, entries, strict=True))
    for block in blocks:
        _check_entry(block, by_name[block.name], file)
    return by_name


def _groups(entries: list[dict]) -> list[dict]:
    seen, groups = set(), []
    for entry in entries:
        if entry["group_number"] not in seen:
            seen.add(entry["group_number"])
            groups.append(entry["group"])
    return groups


def _check_entry(block, entry: dict, file: Path) -> None:
    second_moment = entry["exp_avg_sq"]
    where = f"tensor {block.name}" + ("" if entry["name"] is None else f" (state: {entry['name']})")
    if second_moment is None:
        raise OptimizerStateError(
            f"--optimizer-state {file} has no exp_avg_sq for {where}: the optimizer never stepped it, or "
            "it is not Adam/AdamW"
        )
    if tuple(second_moment.shape) != tuple(block.parameter.shape):
        raise OptimizerStateError(
            f"--optimizer-state {file}: {where} has shape {list(block.parameter.shape)} in the model, "
            f"{list(second_moment.shape)} in the state; give the state of the run that trained these weights"
        )


def _trained_order(model: nn.Module, with_adapter: bool, group_sizes: list[int]) -> list[str]:
    """Names of the tensors a fine-tune hands its optimizer, in its order (see the module docstring)."""
    names = [name for name, _ in model.named_parameters()]
    if with_adapter:
        names = [name for name in names if "lora_" in name or "modules_to_save" in name]
    if len(group_sizes) != 2:
        return names
    decayed = _trainer_decay_names(model)
    first = [name for name in names if name in decayed]
    second = [name for name in names if name not in decayed]
    if [len(first), len(second)] != group_sizes:
        return names  # not Trainer's split: the count/shape check names what differs
    return first + second


def _trainer_decay_names(model: nn.Module) -> set[str]:
    """Trainer's weight-decayed tensors (its own rule, from the installed transformers)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def _bare(name: str) -> str:
    """A parameter name without a PEFT wrapper's or DDP's prefix."""
    name = name.removeprefix("module.")
    return name.removeprefix(PEFT_PREFIX)


def check_recorded(scaling: OptimizerScaling, recorded: dict) -> None:
    """Refuse a state whose values differ from the ones the index was built with."""
    if scaling.fingerprint != recorded["fingerprint"]:
        raise OptimizerStateError(
            f"--optimizer-state {scaling.path} differs from the state the index was built with "
            f"({recorded['path']}, fingerprint {recorded['fingerprint'][:12]}, this one "
            f"{scaling.fingerprint[:12]}); give that checkpoint's optimizer.pt"
        )


def scale_flat(flat: torch.Tensor, blocks: list, scaling: OptimizerScaling | None) -> torch.Tensor:
    """Flattened gradients [batch, D] with each block scaled by its ``1 / (sqrt(v_hat) + eps)`` (reference path)."""
    if scaling is None:
        return flat
    pieces = []
    for block in blocks:
        piece = flat[:, block.offset : block.offset + block.numel]
        scale = scaling.scales.get(block.name)
        pieces.append(piece if scale is None else piece * scale.to(piece.device))
    return torch.cat(pieces, dim=1)


# Float32 values of one materialised row chunk of a scaled block, over the batch (16 MB).
ROW_CHUNK_ELEMENTS = 1 << 22


def add_scaled_block(state, block, factors: list, scale: torch.Tensor, normalize: str) -> bool:
    """Sketch a hooked 2-D block given by its outer-product factors (`factors.OuterFactors`), times
    ``scale`` ([numel], Adam's ``1 / (sqrt(v_hat) + eps)``), into ``state`` (`gradients._SketchState`).
    False, with nothing added, where a squared norm is not finite: the caller then materialises the
    block the slow way, which flags those rows.

    The elementwise scale breaks the factors' rank-1 structure, so the gradient is materialised a row
    chunk of the whole batch at a time (one batched matmul; of an embedding, only the looked-up rows under
    rapidgrad-kron), scaled, and sketched: by rapidgrad-kron's two batched matmuls with its count-sketch
    matrices (``sketch_matrix``), by any other projector's ``project_block``.
    """
    projector = state.projector
    rows_count, cols_count = block.parameter.shape
    scale = scale.view(rows_count, cols_count)
    batch = factors[0].cols.shape[0]
    kron = isinstance(projector, RapidGradKronProjector)
    squared = torch.zeros(batch, dtype=torch.float64, device=state.out.device)
    sketch = None if kron else projector.new_output(batch)
    for rows in _row_chunks(factors, rows_count, batch * cols_count, kron):
        piece = gradient_rows(
            factors, cols_count, slice(0, rows_count) if rows is None else rows
        )  # [batch, n, cols]
        piece *= scale if rows is None else scale[rows]
        squared += torch.linalg.vector_norm(piece, dim=(1, 2)).double().square().to(squared.device)
        if kron:
            part = projector.sketch_matrix(piece, block.offset, rows)  # [batch, segment width]
            sketch = part if sketch is None else sketch + part
        else:  # the chunks are contiguous ranges here
            first = 0 if rows is None else int(rows[0])
            projector.project_block(sketch, piece.reshape(batch, -1), block.offset + first * cols_count)
    if not bool(torch.isfinite(squared).all()):
        return False
    if not kron:
        state.add_sketch(sketch, squared, normalize)
        return True
    layer_scale = state.add_norms(squared, normalize)
    if sketch is not None:  # None: no row was looked up
        projector.add_segment_sketch(state.out, sketch, block.offset, layer_scale)
    return True


def _row_chunks(factors: list, rows_count: int, row_width: int, looked_up_only: bool):
    """The rows to materialise at a time: None (all of them), or int64 [n] ascending indices."""
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, row_width))
    device = factors[0].cols.device
    if looked_up_only and all(factor.ids is not None for factor in factors):
        rows = torch.unique(torch.cat([factor.ids.reshape(-1) for factor in factors]))  # sorted
        for first in range(0, len(rows), step):
            yield rows[first : first + step]
        return
    if step >= rows_count:
        yield None
        return
    for first in range(0, rows_count, step):
        yield torch.arange(first, min(rows_count, first + step), device=device)
