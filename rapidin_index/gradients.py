"""Per-example loss gradients, layer-normalised and sketched, for a whole batch in one backward pass.

`capture` rebuilds each example's gradient of every hooked tensor from one batched backward (a rule per
kind of module); the tensors no rule covers (or a module that folds the batch into another axis) take
the backward path here: one backward per example, which is also :func:`reference_gradient`, the brute force
the tests compare against. The first batch checks itself: two rows' hooked gradients against plain
backward passes; a tensor that differs moves to the backward path. A build records where its check ran
(:func:`check_environment`) and which tensors took the backward path, so that a query on the same
weights, libraries, device type and dtype takes the build's verdict instead of checking again
(``GradientSketcher.take_self_check``).

Each parameter tensor is one "block" of the flattened gradient; layer-wise normalisation scales every
block to unit L2 norm before the block is sketched (SPEC 2.2), so the full gradient is never concatenated.

A linear, Conv1D or embedding weight's per-example gradient is a sum of outer products over tokens, so
it can be handed to the sketch as its factors (``GradientCapture.example_factors``) instead of
materialised: rapidgrad-ts and rapidgrad-kron sketch any such block that way
(:mod:`rapidin_index.sketch.ts`, :mod:`rapidin_index.sketch.kron`; the factors are :mod:`rapidin_index.factors`), every other projector the embeddings
(their looked-up rows, scattered), with norms from token Gram matrices.
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass

import torch
from torch import nn

from rapidin_index.capture import GradientBlock, GradientCapture
from rapidin_index.errors import GradientError
from rapidin_index.factors import (
    GramCache,
    OuterFactors,
    factors_gradient,
    factors_gradient_rows,
    squared_norms,
)
from rapidin_index.losses import Batch, example_losses
from rapidin_index.optimizer_state import add_scaled_block
from rapidin_index.settings import NORMALIZATIONS
from rapidin_index.sketch.projectors import FactorProjector, NormingFactorProjector
from rapidin_index.store.manifest import software_version

FACTORED_MODES = ("auto", "never")


# --------------------------------------------------------------------------- normalise + sketch


@dataclass
class SketchedBatch:
    vectors: torch.Tensor  # [batch, output_dim] float32: sketched (or exact) normalised gradients
    losses: torch.Tensor  # [batch] mean response-token loss
    gradient_norms: torch.Tensor  # [batch] L2 norm of the raw gradient, before normalisation
    finite: torch.Tensor  # [batch] bool: False where the gradient had a NaN or inf


# Largest relative difference between a hooked per-example gradient and a plain backward that the
# self-check accepts, by weights dtype (the hooks accumulate in float32, autograd in the weights' dtype).
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
SELF_CHECK_ROWS = 2
SELF_CHECK_ROUND_OFF = 1e-6
# A hooked block above this many coordinates (a 150k-260k vocabulary's embedding or head) is not
# self-checked: its plain backward alone would materialise [vocab, dim] per row, the memory the hooks avoid.
# Only nn.Linear / nn.Embedding rules reach that size; tests/test_large_vocab.py holds them to autograd.
SELF_CHECK_MAX_NUMEL = 1 << 24
# Float32 values a large block's row chunk holds when it must be materialised (16 MB).
ROW_CHUNK_ELEMENTS = 1 << 22


class GradientSketcher:
    """Batch in, one normalised + sketched gradient per example out.

    ``projector`` is a :mod:`rapidin_index.sketch` projector (RapidGrad, or exact for K = 0).
    Every block is either *hooked* (rebuilt per example from one batched backward) or on the *backward path*
    (one plain backward per example). ``backward_path`` maps the latter's names to the reason. The first
    batch checks itself: the hooked gradients of its first two rows are compared with plain backward
    passes, and any block that differs moves to the backward path, so no model is approximated in silence.
    ``backward_only=True`` puts every block on the backward path (the slow reference).

    With a projector that sketches outer-product factors (rapidgrad-ts, rapidgrad-kron), every hooked
    linear, Conv1D and embedding weight is sketched from its factors (``factored="auto"``; ts picks FFT
    or a signed matmul per call by cost, kron multiplies them by its count-sketch matrices); with any
    other projector, embedding weights are (their looked-up rows are scattered, never a dense
    [batch, vocab, dim]). ``factored="never"`` materialises every
    block. ``factored_blocks`` names the blocks that took the factored path.

    With an optimizer state (:meth:`use_optimizer_state`) the scaled weight matrices are materialised a
    row chunk of the batch at a time and sketched by batched matmuls (``scaled_path="factors"``,
    `optimizer_state.add_scaled_block`); ``scaled_path="materialise"`` is the slow reference it is tested
    and timed against: the whole per-example gradient, projected coordinate by coordinate.
    """

    scaled_path = "factors"

    def __init__(
        self,
        model: nn.Module,
        blocks: list[GradientBlock],
        projector,
        normalize: str = "layer",
        backward_only: bool = False,
        factored: str = "auto",
    ) -> None:
        if normalize not in NORMALIZATIONS:
            raise GradientError(f"--normalize {normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        if factored not in FACTORED_MODES:
            raise GradientError(f"factored={factored!r} is not one of {', '.join(FACTORED_MODES)}")
        self.factored = factored
        self.factored_blocks: set[str] = set()
        self.model = model
        self.blocks = blocks
        self.projector = projector
        self.normalize = normalize
        self.capture = GradientCapture(model, blocks)
        self.backward_path: dict[str, str] = dict(self.capture.unsupported)
        if backward_only:
            self.backward_path = {block.name: "asked for the backward path" for block in blocks}
        self.self_checked = False
        self.checked_in: dict | None = None  # check_environment() where this sketcher's own check ran
        self.optimizer_scaling = None  # optimizer_state.OptimizerScaling: see use_optimizer_state
        self._sync_capture()

    def use_optimizer_state(self, scaling) -> None:
        """Divide every example's gradient by Adam's ``sqrt(v_hat) + eps`` before normalising it
        (`rapidin_index.optimizer_state`). The scaled tensors are materialised, whatever the projector: an
        elementwise scale breaks the rank-1 structure a factored sketch relies on."""
        self.optimizer_scaling = None if scaling is None else scaling.to(self.projector.new_output(1).device)

    def new_state(self, batch_size: int, losses: torch.Tensor) -> _SketchState:
        """An empty sketch of ``batch_size`` rows; every block added to it passes the optimizer scaling."""
        scales = None if self.optimizer_scaling is None else self.optimizer_scaling.scales
        return _SketchState(self.projector, batch_size, losses, scales)

    @property
    def uses_hooks(self) -> bool:
        """True when every block is rebuilt from the batched backward (no backward-path block)."""
        return not self.backward_path

    def _sync_capture(self) -> None:
        self.capture.active = {id(b.parameter) for b in self.blocks if b.name not in self.backward_path}

    def sketch(self, batch: Batch) -> SketchedBatch:
        if not self.self_checked and len(self.backward_path) < len(self.blocks):
            self.self_checked = True
            self.checked_in = check_environment(self.model)
            return self._sketch(batch, check_rows=min(SELF_CHECK_ROWS, batch.size))
        return self._sketch(batch, check_rows=0)

    def take_self_check(self, backward_path: dict) -> None:
        """Skip this sketcher's own check: take an earlier one's verdict (its backward-path tensors) instead.

        Only for the same weights, run where :func:`check_environment` says the earlier check ran.
        """
        names = {block.name for block in self.blocks}
        self.backward_path.update({name: why for name, why in backward_path.items() if name in names})
        self._sync_capture()
        self.self_checked = True

    def _sketch(self, batch: Batch, check_rows: int) -> SketchedBatch:
        hooked = [block for block in self.blocks if block.name not in self.backward_path]
        checked = [block for block in hooked if block.numel <= SELF_CHECK_MAX_NUMEL]
        check = _SelfCheck(self, batch, checked, check_rows) if check_rows and checked else None
        losses = self._hooked_backward(batch) if hooked else None
        try:
            backward = self._backward_gradients(batch)
            if losses is None:
                with torch.no_grad():
                    losses = example_losses(self.model, batch)
            state = self.new_state(batch.size, losses.detach())
            for block in self.blocks:
                if block.name in backward:
                    state.add(block, backward[block.name], self.normalize)
                    continue
                head = self.add_hooked(
                    state,
                    block,
                    batch.size,
                    check_rows if check and block.numel <= SELF_CHECK_MAX_NUMEL else 0,
                    lambda block=block: self._hooked_gradients(batch, block),
                )
                if check is not None:
                    check.compare(block, head)  # block by block: no [rows, D] is ever kept
        finally:
            self.capture.clear()
        if check is not None and check.move_failed():
            return self._sketch(batch, check_rows=0)  # some blocks moved to the backward path: redo
        return state.result()

    def _hooked_backward(self, batch: Batch) -> torch.Tensor:
        """One backward of the summed losses into the hooked outputs only: every parameter is frozen
        (the first hooked output starts the graph), so no weight gradient is formed or accumulated,
        not even for a trainable tensor outside the selection, and there is no ``.grad`` to clear."""
        self.capture.batch_size = batch.size
        with self.capture, frozen(self.model.parameters()):
            losses = example_losses(self.model, batch)
            losses.sum().backward()
        return losses

    def add_hooked(
        self, state: _SketchState, block: GradientBlock, batch_size: int, head_rows: int = 0, materialise=None
    ):
        """Sketch one hooked block into ``state``, from its factors where that is the chosen path.

        Returns the raw gradients of the first ``head_rows`` examples ([rows, numel], for the self-check),
        or None. ``materialise()`` gives the [batch, numel] gradients (default: the capture's rule). A block
        whose factored norm is not finite is materialised, so non-finite rows are flagged as before.
        """
        factors = self._factors(block, batch_size)
        scale = state.scales.get(block.name)
        if factors is not None and scale is not None:
            if add_scaled_block(state, block, factors, scale, self.normalize):
                return self._head(factors, block, head_rows)
            factors = None  # a norm that is not finite: materialised below, which flags its rows
        if factors is not None and self._add_factors(state, block, factors):
            self.factored_blocks.add(block.name)
            return self._head(factors, block, head_rows)
        if materialise is None:
            gradients = self.capture.example_gradients(block, batch_size)
        else:
            gradients = materialise()
        state.add(block, gradients, self.normalize)
        return gradients[:head_rows].clone() if head_rows else None

    @staticmethod
    def _head(factors: list[OuterFactors], block: GradientBlock, head_rows: int) -> torch.Tensor | None:
        """[head_rows, numel] raw gradients of the first examples, from the factors (for the self-check)."""
        if not head_rows:
            return None
        head = [
            OuterFactors(f.cols[:head_rows], *(None if t is None else t[:head_rows] for t in (f.rows, f.ids)))
            for f in factors
        ]
        return factors_gradient(head, tuple(block.parameter.shape))

    def _add_factors(self, state: _SketchState, block: GradientBlock, factors: list[OuterFactors]) -> bool:
        """Sketch the block from its factors if this projector can; False if it must be materialised.

        rapidgrad-ts and rapidgrad-kron sketch any factors; every other projector takes embedding rows
        only (a sparse scatter of the looked-up rows, instead of a dense [batch, vocab, dim] gradient).
        """
        if isinstance(self.projector, NormingFactorProjector):
            sketch, squared = self.projector.sketch_factors(factors, block.offset)  # [batch, K], [batch]
            if not bool(torch.isfinite(squared).all()):
                return False
            state.add_sketch(sketch, squared, self.normalize)
            return True
        dense = any(factor.ids is None for factor in factors)
        large = block.numel > SELF_CHECK_MAX_NUMEL
        if dense and not large and not isinstance(self.projector, FactorProjector):
            return False
        squared = squared_norms(factors, state.grams)  # [batch] from the token Gram matrices
        if not bool(torch.isfinite(squared).all()):
            return False
        if isinstance(self.projector, FactorProjector):  # rapidgrad-kron: scaled, straight into the batch's
            state.add_factors(block, factors, squared, self.normalize)
        elif dense:  # a tied head under v1, v2 or exact
            state.add_row_chunks(block, factors, squared, self.normalize)
        else:
            state.add_rows(block, factors, squared, self.normalize)
        return True

    def _factors(self, block: GradientBlock, batch_size: int) -> list[OuterFactors] | None:
        if self.factored == "never" or block.parameter.dim() != 2:
            return None
        scaled = self.optimizer_scaling is not None and block.name in self.optimizer_scaling.scales
        if scaled and self.scaled_path == "materialise":
            return None  # the reference: materialised whole, then projected (see the class docstring)
        try:
            return self.capture.example_factors(block, batch_size)
        except GradientError:
            return None  # the materialising rule raises it again and moves the block to the backward path

    def _hooked_gradients(self, batch: Batch, block: GradientBlock) -> torch.Tensor:
        try:
            return self.capture.example_gradients(block, batch.size)
        except GradientError as error:  # e.g. a mixture-of-experts layer that flattens the batch
            self.backward_path[block.name] = str(error).split(": ", 1)[-1]
            self._sync_capture()
            return self._backward_gradients(batch, [block])[block.name]

    def _backward_gradients(
        self, batch: Batch, blocks: list[GradientBlock] | None = None
    ) -> dict[str, torch.Tensor]:
        """{block name: [batch, numel]} by one plain backward per example, for the backward-path blocks."""
        if blocks is None:
            blocks = [block for block in self.blocks if block.name in self.backward_path]
        if not blocks:
            return {}
        names = {block.name for block in blocks}
        others = [block.parameter for block in self.blocks if block.name not in names]
        with frozen(others):  # a plain backward into these blocks only
            rows = [block_gradients(self.model, blocks, _row(batch, i)) for i in range(batch.size)]
        return {  # block by block: never the whole [batch, D] at once
            block.name: torch.stack([row[number] for row in rows]) for number, block in enumerate(blocks)
        }


def check_environment(model: nn.Module) -> dict:
    """What a self-check's verdict rests on besides the weights: library versions, device type, dtype."""
    parameter = next(model.parameters())
    return {
        "software": software_version(),
        "torch": torch.__version__,
        "transformers": _installed_version("transformers"),
        "peft": _installed_version("peft"),
        "device": parameter.device.type,
        "dtype": str(parameter.dtype).removeprefix("torch."),
    }


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class _SelfCheck:
    """The first batch's check: its first rows' hooked gradients against plain backward passes.

    The plain gradients are taken first (one backward per row, kept in the weights' dtype); each hooked
    block is then compared as soon as it is sketched and both are dropped, so the check holds one plain
    gradient per row and one block at a time, never [rows, D] twice in float32 (at 7B, 4 x 27 GB).
    """

    def __init__(self, sketcher: GradientSketcher, batch: Batch, blocks: list[GradientBlock], rows: int):
        self.sketcher = sketcher
        head = Batch(batch.input_ids[:rows], batch.attention_mask[:rows], batch.labels[:rows])
        names = {block.name for block in blocks}
        others = [block.parameter for block in sketcher.blocks if block.name not in names]
        with frozen(others):  # a plain backward into these blocks only
            per_row = [plain_gradients(sketcher.model, blocks, _row(head, i)) for i in range(rows)]
        self.reference = {block.name: [row[n] for row in per_row] for n, block in enumerate(blocks)}
        del per_row
        self.tolerance = SELF_CHECK_TOLERANCE.get(blocks[0].parameter.dtype, 1e-4)
        # A block whose plain gradient is round-off (a mathematically zero gradient, which the hooks
        # return as zero) is measured against the largest block, not against its own noise.
        largest = max(_norm(grads) for grads in self.reference.values())
        self.floor = SELF_CHECK_ROUND_OFF * largest
        self.failed: dict[str, float] = {}

    def compare(self, block: GradientBlock, hooked: torch.Tensor | None) -> None:
        """``hooked``: [rows, numel] of this block from the hooks (None: nothing to compare)."""
        grads = self.reference.pop(block.name, None)
        if grads is None or hooked is None:
            return
        expected = torch.stack([_flat_float32(block, g) for g in grads]).to(hooked.device)
        difference = float((hooked.float() - expected).norm())
        scale = max(float(expected.norm()), self.floor)
        relative = difference / scale if scale > 0 else difference
        if relative > self.tolerance:
            self.failed[block.name] = relative

    def move_failed(self) -> bool:
        """Send the blocks that differed to the backward path; True if any did."""
        for name, relative in self.failed.items():
            self.sketcher.backward_path[name] = (
                f"self-check: hooked gradient differs from a plain backward (relative error {relative:.2g})"
            )
        self.sketcher._sync_capture()
        return bool(self.failed)


def layer_norm_scale(norms: torch.Tensor) -> torch.Tensor:
    """SPEC 2.2's per-tensor scaling: 1 / norm, elementwise, and 1 where a block's gradient is zero (it
    stays zero). Every path that layer-normalises (build, query, per-token rows, heatmaps, the brute-force
    reference) scales through this one function."""
    return 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms))


def _norm(grads: list[torch.Tensor | None]) -> float:
    return math.sqrt(sum(float(g.float().norm()) ** 2 for g in grads if g is not None))


class frozen:
    """Context manager: the parameters do not require grad inside (restored on exit)."""

    def __init__(self, parameters) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]

    def __enter__(self) -> None:
        for parameter in self.parameters:
            parameter.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for parameter in self.parameters:
            parameter.requires_grad_(True)


class _SketchState:
    """Accumulates one batch's sketch, raw norms and finiteness block by block."""

    def __init__(self, projector, batch_size: int, losses: torch.Tensor, scales: dict | None = None) -> None:
        self.projector = projector
        self.scales = scales or {}  # {block name: [numel]}: optimizer_state's 1 / (sqrt(v_hat) + eps)
        self.out = projector.new_output(batch_size)
        self.losses = losses.float()
        self.squared_norm = torch.zeros(batch_size, device=self.out.device)
        self.finite = torch.isfinite(self.losses).to(self.out.device)
        self.grams = GramCache()  # blocks that read one input share its token Gram matrix

    def add(self, block: GradientBlock, gradients: torch.Tensor, normalize: str) -> None:
        """One pass over the block for its norms (a NaN or inf anywhere makes the norm non-finite),
        one to project it; a block larger than the sketch is scaled as a sketch, after projecting."""
        gradients = gradients.to(self.out.device, torch.float32)  # [batch, numel]
        if block.name in self.scales:  # before the norms: layer norm acts on the scaled gradient
            gradients = gradients * self.scales[block.name]
        norms = torch.linalg.vector_norm(gradients, dim=1)  # [batch]
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            self.finite &= finite
            gradients = torch.nan_to_num(gradients, nan=0.0, posinf=0.0, neginf=0.0)
            norms = torch.linalg.vector_norm(gradients, dim=1)
        self.squared_norm += norms.square()
        if normalize != "layer":
            self.projector.project_block(self.out, gradients, block.offset)
            return
        scale = layer_norm_scale(norms)  # [batch]
        if gradients.shape[1] > self.out.shape[1]:
            sketch = self.projector.new_output(gradients.shape[0])  # [batch, K]
            self.projector.project_block(sketch, gradients, block.offset)
            self.out.addcmul_(sketch, scale[:, None])
        else:
            self.projector.project_block(self.out, gradients * scale[:, None], block.offset)

    def add_sketch(self, sketch: torch.Tensor, squared_norms: torch.Tensor, normalize: str) -> None:
        """A block already sketched ([batch, K], unnormalised) with its finite squared norms [batch]."""
        squared = squared_norms.to(self.out.device, torch.float32)
        self.squared_norm += squared
        if normalize != "layer":
            self.out += sketch
            return
        self.out.addcmul_(sketch, layer_norm_scale(squared.sqrt())[:, None])

    def add_norms(self, squared_norms: torch.Tensor, normalize: str) -> torch.Tensor | None:
        """Count a factored block's finite squared norms [batch]; its layer-norm scale, or None."""
        squared = squared_norms.to(self.out.device, torch.float32)
        self.squared_norm += squared
        if normalize != "layer":
            return None
        return layer_norm_scale(squared.sqrt())  # [batch]

    def add_factors(
        self, block: GradientBlock, factors: list[OuterFactors], squared_norms: torch.Tensor, normalize: str
    ) -> None:
        """A block given by its factors, for a projector that adds their scaled sketch (rapidgrad-kron)."""
        scale = self.add_norms(squared_norms, normalize)
        self.projector.project_factors(self.out, factors, block.offset, scale)

    def add_rows(
        self, block: GradientBlock, factors: list[OuterFactors], squared_norms: torch.Tensor, normalize: str
    ) -> None:
        """An embedding block given by its looked-up rows (``OuterFactors`` with ids), for any projector:
        each token's gradient row lands at its coordinates' bins (or, exact, at the coordinates)."""
        scale = self.add_norms(squared_norms, normalize)
        for factor in factors:  # only the looked-up rows are hashed: never [vocab, dim] coordinates
            values = factor.cols.float() if scale is None else factor.cols.float() * scale[:, None, None]
            self.projector.project_rows(self.out, factor.ids, values, block.offset)

    def add_row_chunks(
        self, block: GradientBlock, factors: list[OuterFactors], squared_norms: torch.Tensor, normalize: str
    ) -> None:
        """A large block with a dense factor (a tied head), for a projector that cannot sketch factors:
        materialised a few of its rows at a time, so memory is bounded by the batch, not [vocab, dim]."""
        scale = self.add_norms(squared_norms, normalize)
        rows, cols = block.parameter.shape
        step = max(1, ROW_CHUNK_ELEMENTS // max(1, self.out.shape[0] * cols))
        for first in range(0, rows, step):
            last = min(rows, first + step)
            piece = factors_gradient_rows(factors, cols, first, last)  # [batch, (last - first) * cols]
            if scale is not None:
                piece *= scale[:, None]
            self.projector.project_block(self.out, piece, block.offset + first * cols)

    def result(self) -> SketchedBatch:
        return SketchedBatch(self.out, self.losses, self.squared_norm.sqrt(), self.finite)


def _row(batch: Batch, index: int) -> Batch:
    keep = int(batch.attention_mask[index].sum())
    return Batch(
        batch.input_ids[index : index + 1, :keep],
        batch.attention_mask[index : index + 1, :keep],
        batch.labels[index : index + 1, :keep],
    )


# --------------------------------------------------------------------------- brute force


def reference_gradient(model: nn.Module, blocks: list[GradientBlock], example: Batch) -> torch.Tensor:
    """The raw flattened gradient [D] of one example's loss: one plain backward, no tricks."""
    return torch.cat(block_gradients(model, blocks, example))


def block_gradients(model: nn.Module, blocks: list[GradientBlock], example: Batch) -> list[torch.Tensor]:
    """One example's raw gradient block by block ([numel] float32 each): one plain backward."""
    return [
        _flat_float32(block, g)
        for block, g in zip(blocks, plain_gradients(model, blocks, example), strict=True)
    ]


def _flat_float32(block: GradientBlock, grad: torch.Tensor | None) -> torch.Tensor:
    """[numel] float32 of one autograd gradient; zeros where the block was unused (None)."""
    if grad is None:
        return torch.zeros(block.numel, device=block.parameter.device)
    return grad.reshape(-1).float()


def plain_gradients(model: nn.Module, blocks: list[GradientBlock], example: Batch) -> tuple:
    """autograd's gradients of one example's loss for the blocks (the weights' dtype; None if unused)."""
    if example.size != 1:
        raise GradientError("reference_gradient takes a batch of one example")
    loss = example_losses(model, example)[0]
    return torch.autograd.grad(loss, [block.parameter for block in blocks], allow_unused=True)


def normalize_flat(flat: torch.Tensor, blocks: list[GradientBlock], normalize: str) -> torch.Tensor:
    """Layer-wise normalisation of flattened gradients [batch, D] (reference path)."""
    if normalize == "none":
        return flat.clone()
    pieces = []
    for block in blocks:
        piece = flat[:, block.offset : block.offset + block.numel]
        pieces.append(piece * layer_norm_scale(piece.norm(dim=1, keepdim=True)))
    return torch.cat(pieces, dim=1)
