"""Per-example loss gradients, layer-normalised and sketched, for a whole batch in one backward pass.

How: forward hooks on every module that owns an attributed parameter keep the module's input, and a
tensor hook on its output keeps the gradient flowing back into it. After one backward of the summed
per-example losses, each example's weight gradient is rebuilt from its own rows of (input, output grad):

* ``nn.Linear``          dW[b] = sum_t G[b,t]^T A[b,t]     (transformers' GPT-2 ``Conv1D``: the transpose)
* ``nn.Embedding``       dW[b] = scatter-add of G[b,t] into the rows of the token ids
* norm layers            dw[b] = sum_t G[b,t] * (f(w=1) - f(w=0))[b,t]; a norm's output is affine in its
                         elementwise weight, so that difference is the exact derivative

Examples never mix: the model runs in eval mode and padding positions carry no loss. Parameters owned by
any other kind of module (or a module that folds the batch into another axis) fall back to one backward
per example, which is also :func:`reference_gradient`, the brute force the tests compare against.

Each parameter tensor is one "block" of the flattened gradient; layer-wise normalisation scales every
block to unit L2 norm before the block is sketched (SPEC 2.2), so the full gradient is never concatenated.

A linear, Conv1D or embedding weight's per-example gradient is a sum of outer products over tokens, so
it can be handed to the sketch as its factors (``GradientCapture.example_factors``) instead of
materialised: rapidgrad-ts sketches any such block that way (:mod:`rapidin_index.factored`), every
other projector the embeddings (their looked-up rows, scattered), with norms from token Gram matrices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from rapidin_index.errors import GradientError
from rapidin_index.factored import OuterFactors, factors_gradient, squared_norms
from rapidin_index.losses import Batch, example_losses
from rapidin_index.settings import NORMALIZATIONS

FACTORED_MODES = ("auto", "never")


@dataclass(frozen=True)
class GradientBlock:
    """One attributed parameter tensor and where it sits in the flattened gradient."""

    name: str
    parameter: nn.Parameter
    offset: int

    @property
    def numel(self) -> int:
        return self.parameter.numel()


def gradient_blocks(selected: list[tuple[str, nn.Parameter]]) -> list[GradientBlock]:
    blocks, offset = [], 0
    for name, parameter in selected:
        blocks.append(GradientBlock(name, parameter, offset))
        offset += parameter.numel()
    return blocks


def gradient_dim(blocks: list[GradientBlock]) -> int:
    return sum(block.numel for block in blocks)


# --------------------------------------------------------------------------- per-example rules

# nn.Linear subclasses whose own forward we have read and which compute exactly x @ W^T + b.
_LINEAR_EQUIVALENTS = frozenset({"FalconLinear"})


def _module_kind(module: nn.Module, parameter_name: str, parameter: nn.Parameter) -> str | None:
    """The per-example rule that rebuilds this parameter's gradient exactly, or None (exact path).

    Only modules whose forward is provably the textbook one get a rule: a subclass with its own forward
    (Gemma's scaled embedding, OPT's position embedding) may compute anything, so it takes the exact path.
    """
    module_class = type(module)
    if isinstance(module, nn.Linear) and (
        module_class.forward is nn.Linear.forward or module_class.__name__ in _LINEAR_EQUIVALENTS
    ):
        return "linear"
    if module_class.__name__ == "Conv1D" and module_class.__module__.startswith("transformers"):
        return "conv1d"  # GPT-2's transposed linear layer
    if (
        isinstance(module, nn.Embedding)
        and module_class.forward is nn.Embedding.forward
        and parameter_name == "weight"
    ):
        return "embedding"
    if (
        "norm" in module_class.__name__.lower()
        and parameter.dim() == 1
        and parameter_name in ("weight", "bias")
    ):
        return "norm"  # affine in its weight; the build's self-check holds it to a plain backward
    return None


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    output_grad: torch.Tensor | None = None
    output: torch.Tensor | None = None  # kept only with ``GradientCapture.keep_outputs`` (token path)


@dataclass
class _Owner:
    module: nn.Module
    parameter_name: str
    kind: str
    calls: list[_Call] = field(default_factory=list)


def _flat_tokens(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    return tensor.reshape(batch_size, -1, tensor.shape[-1]).float()  # [batch, tokens, features]


def _owner_gradient(owner: _Owner, call: _Call, batch_size: int) -> torch.Tensor:
    """One module call's contribution to each example's gradient of ``owner.parameter_name``."""
    grad = _flat_tokens(call.output_grad, batch_size)  # [batch, tokens, out]
    if owner.kind == "embedding":
        ids = call.args[0].reshape(batch_size, -1)  # [batch, tokens]
        weight = owner.module.weight
        result = torch.zeros(batch_size * weight.shape[0], weight.shape[1], device=grad.device)
        flat_ids = ids + torch.arange(batch_size, device=ids.device)[:, None] * weight.shape[0]
        result.index_add_(0, flat_ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        result = result.reshape(batch_size, *weight.shape)  # [batch, vocab, dim]
        if owner.module.padding_idx is not None:
            result[:, owner.module.padding_idx] = 0
        return result
    if owner.parameter_name == "bias":
        return grad.sum(dim=1)  # [batch, out]
    if owner.kind == "norm":
        return (grad * _norm_direction(owner.module, call)).sum(dim=1)  # [batch, dim]
    inputs = _flat_tokens(call.args[0], batch_size)  # [batch, tokens, in]
    if owner.kind == "linear":
        return torch.bmm(grad.transpose(1, 2), inputs)  # [batch, out, in] (bmm: 2x einsum's speed)
    return torch.bmm(inputs.transpose(1, 2), grad)  # conv1d: [batch, in, out]


def _norm_direction(module: nn.Module, call: _Call) -> torch.Tensor:
    """d output / d weight for a norm layer: f(weight=1) - f(weight=0), with any bias zeroed."""
    weight = module.weight
    overrides = {}
    if getattr(module, "bias", None) is not None:
        overrides["bias"] = torch.zeros_like(module.bias)
    with torch.no_grad():
        ones = functional_call(
            module, {**overrides, "weight": torch.ones_like(weight)}, call.args, call.kwargs
        )
        zeros = functional_call(
            module, {**overrides, "weight": torch.zeros_like(weight)}, call.args, call.kwargs
        )
    batch_size = call.output_grad.shape[0]
    return _flat_tokens(ones - zeros, batch_size)


class GradientCapture:
    """Context manager: hooks that keep (inputs, output grads) of the modules owning the hooked blocks.

    A block is hooked when every module that uses its parameter has a per-example rule; the others are
    listed in ``unsupported`` ({block name: reason}) and take the exact path.
    """

    def __init__(self, model: nn.Module, blocks: list[GradientBlock]) -> None:
        wanted = {id(block.parameter): block for block in blocks}
        self.owners: dict[int, list[_Owner]] = {id(block.parameter): [] for block in blocks}
        self.unsupported: dict[str, str] = {}
        for module in model.modules():
            for parameter_name, parameter in module._parameters.items():
                if parameter is None or id(parameter) not in wanted:
                    continue
                kind = _module_kind(module, parameter_name, parameter)
                if kind is None:
                    name = wanted[id(parameter)].name
                    self.unsupported[name] = f"no per-example rule for {type(module).__name__}"
                    continue
                self.owners[id(parameter)].append(_Owner(module, parameter_name, kind))
        self._handles: list = []
        self.batch_size = 0
        # Token path: keep each call's output to differentiate many losses against, instead of a hook
        # that keeps the one gradient a single backward sends it.
        self.keep_outputs = False
        self.active: set[int] = {id(b.parameter) for b in blocks if b.name not in self.unsupported}

    def __enter__(self) -> GradientCapture:
        modules = {id(o.module): o.module for key in self.active for o in self.owners[key]}
        for module in modules.values():
            self._handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        for owners in self.owners.values():
            for owner in owners:
                owner.calls.clear()

    def _forward_hook(self, module, args, kwargs, output) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor):
            return None
        if not output.requires_grad:
            if not torch.is_grad_enabled():
                return None
            # Attributed parameters are frozen during the hooked pass (their summed gradient is never
            # used), so the first attributed module's output starts the graph: nothing upstream needs one.
            output = output.detach().requires_grad_(True)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        if output.shape[0] == 1 and self.batch_size > 1:
            # Shared across the batch (GPT-2's position embeddings): give every example its own copy so
            # that its gradient is not summed over the batch. Broadcasting downstream is unchanged.
            output = output.expand(self.batch_size, *output.shape[1:])
            args = tuple(
                a.expand(self.batch_size, *a.shape[1:]) if isinstance(a, torch.Tensor) else a for a in args
            )
        call = _Call(args, kwargs)
        if self.keep_outputs:
            call.output = output
        else:

            def keep_grad(grad: torch.Tensor) -> None:
                call.output_grad = grad.detach()

            output.register_hook(keep_grad)
        for key in self.active:
            for owner in self.owners[key]:
                if owner.module is module:
                    owner.calls.append(call)
        return output

    def calls(self) -> list[_Call]:
        """Every recorded call of the hooked modules, once each."""
        unique = {}
        for key in self.active:
            for owner in self.owners[key]:
                for call in owner.calls:
                    unique[id(call)] = call
        return list(unique.values())

    def example_gradients(self, block: GradientBlock, batch_size: int) -> torch.Tensor:
        """[batch, numel] float32 gradient of each example's loss w.r.t. ``block.parameter``.

        A bias gradient is a sum over tokens of output gradients; where that sum is below its float32
        rounding bound (terms x eps x sum of their magnitudes) it is zero, not noise: OPT's key bias has a
        mathematically zero gradient (softmax ignores a shift shared by all keys), and its round-off,
        scaled to unit norm by layer normalisation, would add a random cosine to every score.
        """
        total, magnitude, terms = None, None, 0
        for owner in self.owners[id(block.parameter)]:
            for call in owner.calls:
                if call.output_grad is None:
                    continue  # this call's output did not reach the loss
                if call.output_grad.shape[0] != batch_size:
                    raise GradientError(f"{block.name}: its module folds the batch axis")
                part = _owner_gradient(owner, call, batch_size).reshape(batch_size, -1)  # a new tensor
                total = part if total is None else total.add_(part)
                if owner.parameter_name == "bias" and owner.kind in ("linear", "conv1d"):
                    grad = _flat_tokens(call.output_grad, batch_size)  # [batch, tokens, out]
                    magnitude = grad.abs().sum(dim=1) + (0 if magnitude is None else magnitude)
                    terms += grad.shape[1]
        if total is None:
            return torch.zeros(batch_size, block.numel, device=block.parameter.device)
        if magnitude is not None:
            bound = terms * torch.finfo(torch.float32).eps * magnitude  # [batch, out]
            total = torch.where(total.abs() <= bound, torch.zeros_like(total), total)
        return total

    def example_factors(self, block: GradientBlock, batch_size: int) -> list[OuterFactors] | None:
        """The 2-D block's per-example gradient as outer-product factors (``factored.OuterFactors``).

        None where some module using it is not a linear, Conv1D or embedding weight, or no call reached
        the loss; those blocks are materialised by :meth:`example_gradients` instead.
        """
        if block.parameter.dim() != 2:
            return None
        factors = []
        for owner in self.owners[id(block.parameter)]:
            if owner.parameter_name != "weight" or owner.kind not in ("linear", "conv1d", "embedding"):
                return None
            for call in owner.calls:
                if call.output_grad is None:
                    continue
                if call.output_grad.shape[0] != batch_size:
                    raise GradientError(f"{block.name}: its module folds the batch axis")
                grad = _flat_tokens(call.output_grad, batch_size)  # [batch, tokens, out]
                if owner.kind == "embedding":
                    ids = call.args[0].reshape(batch_size, -1)  # [batch, tokens]
                    if owner.module.padding_idx is not None:  # that row's gradient is zeroed
                        grad = grad * (ids != owner.module.padding_idx)[:, :, None]
                    factors.append(OuterFactors(grad, ids=ids))
                    continue
                inputs = _flat_tokens(call.args[0], batch_size)  # [batch, tokens, in]
                if owner.kind == "linear":
                    factors.append(OuterFactors(inputs, rows=grad))  # dW = sum_t g_t x_t^T: [out, in]
                else:
                    factors.append(OuterFactors(grad, rows=inputs))  # conv1d: [in, out]
        return factors or None


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


class GradientSketcher:
    """Batch in, one normalised + sketched gradient per example out.

    ``projector`` is a :mod:`rapidin_index.sketch` projector (RapidGrad, or exact for K = 0).
    Every block is either *hooked* (rebuilt per example from one batched backward) or on the *exact path*
    (one plain backward per example). ``exact_path`` maps the latter's names to the reason. The first
    batch checks itself: the hooked gradients of its first two rows are compared with plain backward
    passes, and any block that differs moves to the exact path, so no model is approximated in silence.
    ``exact=True`` puts every block on the exact path (the slow reference).

    With a projector that sketches outer-product factors (rapidgrad-ts), every hooked linear, Conv1D and
    embedding weight is sketched from its factors (``factored="auto"``; the projector picks FFT or a
    signed matmul per call by cost); with any other projector, embedding weights are (their looked-up
    rows are scattered, never a dense [batch, vocab, dim]). ``factored="never"`` materialises every
    block. ``factored_blocks`` names the blocks that took the factored path.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: list[GradientBlock],
        projector,
        normalize: str = "layer",
        exact: bool = False,
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
        self.exact_path: dict[str, str] = dict(self.capture.unsupported)
        if exact:
            self.exact_path = {block.name: "asked for the exact path" for block in blocks}
        self.self_checked = False
        self._sync_capture()

    @property
    def uses_hooks(self) -> bool:
        """True when every block is rebuilt from the batched backward (no exact-path block)."""
        return not self.exact_path

    def _sync_capture(self) -> None:
        self.capture.active = {id(b.parameter) for b in self.blocks if b.name not in self.exact_path}

    def sketch(self, batch: Batch) -> SketchedBatch:
        if not self.self_checked and len(self.exact_path) < len(self.blocks):
            self.self_checked = True
            return self._sketch(batch, check_rows=min(SELF_CHECK_ROWS, batch.size))
        return self._sketch(batch, check_rows=0)

    def _sketch(self, batch: Batch, check_rows: int) -> SketchedBatch:
        hooked = [block for block in self.blocks if block.name not in self.exact_path]
        losses = self._hooked_backward(batch) if hooked else None
        try:
            exact = self._exact_gradients(batch)
            if losses is None:
                with torch.no_grad():
                    losses = example_losses(self.model, batch)
            state = _SketchState(self.projector, batch.size, losses.detach())
            kept: dict[str, torch.Tensor] = {}
            for block in self.blocks:
                if block.name in exact:
                    state.add(block, exact[block.name], self.normalize)
                    continue
                head = self.add_hooked(
                    state,
                    block,
                    batch.size,
                    check_rows,
                    lambda block=block: self._hooked_gradients(batch, block),
                )
                if check_rows:
                    kept[block.name] = head
        finally:
            self.capture.clear()
            self.model.zero_grad(set_to_none=True)
        if check_rows and self._self_check(batch, kept, check_rows):
            return self._sketch(batch, check_rows=0)  # some blocks moved to the exact path: redo
        return state.result()

    def _hooked_backward(self, batch: Batch) -> torch.Tensor:
        self.model.zero_grad(set_to_none=True)
        self.capture.batch_size = batch.size
        with self.capture, _frozen([block.parameter for block in self.blocks]):
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
        if factors is not None and self._add_factors(state, block, factors):
            self.factored_blocks.add(block.name)
            if not head_rows:
                return None
            head = [
                OuterFactors(
                    f.cols[:head_rows], *(None if t is None else t[:head_rows] for t in (f.rows, f.ids))
                )
                for f in factors
            ]
            return factors_gradient(head, tuple(block.parameter.shape))
        if materialise is None:
            gradients = self.capture.example_gradients(block, batch_size)
        else:
            gradients = materialise()
        state.add(block, gradients, self.normalize)
        return gradients[:head_rows].clone() if head_rows else None

    def _add_factors(self, state: _SketchState, block: GradientBlock, factors: list[OuterFactors]) -> bool:
        """Sketch the block from its factors if this projector can; False if it must be materialised.

        rapidgrad-ts sketches any factors; every other projector takes embedding rows only (a sparse
        scatter of the looked-up rows, instead of a dense [batch, vocab, dim] gradient).
        """
        if hasattr(self.projector, "sketch_factors"):
            sketch, squared = self.projector.sketch_factors(factors, block.offset)  # [batch, K], [batch]
            if not bool(torch.isfinite(squared).all()):
                return False
            state.add_sketch(sketch, squared, self.normalize)
            return True
        if any(factor.ids is None for factor in factors):
            return False
        squared = squared_norms(factors)  # [batch] from the token Gram matrices
        if not bool(torch.isfinite(squared).all()):
            return False
        state.add_rows(block, factors, squared, self.normalize)
        return True

    def _factors(self, block: GradientBlock, batch_size: int) -> list[OuterFactors] | None:
        if self.factored == "never" or block.parameter.dim() != 2:
            return None
        try:
            return self.capture.example_factors(block, batch_size)
        except GradientError:
            return None  # the materialising rule raises it again and moves the block to the exact path

    def _hooked_gradients(self, batch: Batch, block: GradientBlock) -> torch.Tensor:
        try:
            return self.capture.example_gradients(block, batch.size)
        except GradientError as error:  # e.g. a mixture-of-experts layer that flattens the batch
            self.exact_path[block.name] = str(error).split(": ", 1)[-1]
            self._sync_capture()
            return self._exact_gradients(batch, [block])[block.name]

    def _exact_gradients(
        self, batch: Batch, blocks: list[GradientBlock] | None = None
    ) -> dict[str, torch.Tensor]:
        """{block name: [batch, numel]} by one plain backward per example, for the exact-path blocks."""
        if blocks is None:
            blocks = [block for block in self.blocks if block.name in self.exact_path]
        if not blocks:
            return {}
        names = {block.name for block in blocks}
        others = [block.parameter for block in self.blocks if block.name not in names]
        with _frozen(others):  # a plain backward into these blocks only
            raw = torch.stack(
                [reference_gradient(self.model, blocks, _row(batch, i)) for i in range(batch.size)]
            )
        result, offset = {}, 0
        for block in blocks:
            result[block.name] = raw[:, offset : offset + block.numel]
            offset += block.numel
        return result

    def _self_check(self, batch: Batch, kept: dict[str, torch.Tensor], rows: int) -> bool:
        """Compare the hooked gradients of the first rows with plain backward passes; True if any moved."""
        checked = [block for block in self.blocks if block.name in kept]
        if not checked:
            return False
        head = Batch(batch.input_ids[:rows], batch.attention_mask[:rows], batch.labels[:rows])
        reference = self._exact_gradients(head, checked)
        tolerance = SELF_CHECK_TOLERANCE.get(checked[0].parameter.dtype, 1e-4)
        # A block whose plain gradient is round-off (a mathematically zero gradient, which the hooks
        # return as zero) is measured against the largest block, not against its own noise.
        floor = SELF_CHECK_ROUND_OFF * max(float(reference[block.name].norm()) for block in checked)
        moved = False
        for block in checked:
            expected = reference[block.name]
            difference = float((kept[block.name] - expected).norm())
            scale = max(float(expected.norm()), floor)
            relative = difference / scale if scale > 0 else difference
            if relative > tolerance:
                self.exact_path[block.name] = (
                    f"self-check: hooked gradient differs from a plain backward (relative error {relative:.2g})"
                )
                moved = True
        self._sync_capture()
        return moved


class _frozen:
    """Context manager: the parameters do not require grad inside (restored on exit)."""

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]

    def __enter__(self) -> None:
        for parameter in self.parameters:
            parameter.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for parameter in self.parameters:
            parameter.requires_grad_(True)


class _SketchState:
    """Accumulates one batch's sketch, raw norms and finiteness block by block."""

    def __init__(self, projector, batch_size: int, losses: torch.Tensor) -> None:
        self.projector = projector
        self.out = projector.new_output(batch_size)
        self.losses = losses.float()
        self.squared_norm = torch.zeros(batch_size, device=self.out.device)
        self.finite = torch.isfinite(self.losses).to(self.out.device)

    def add(self, block: GradientBlock, gradients: torch.Tensor, normalize: str) -> None:
        """One pass over the block for its norms (a NaN or inf anywhere makes the norm non-finite),
        one to project it; a block larger than the sketch is scaled as a sketch, after projecting."""
        gradients = gradients.to(self.out.device, torch.float32)  # [batch, numel]
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
        scale = 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms))  # [batch]
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
        norms = squared.sqrt()
        self.out.addcmul_(sketch, (1.0 / torch.where(norms > 0, norms, torch.ones_like(norms)))[:, None])

    def add_rows(
        self, block: GradientBlock, factors: list[OuterFactors], squared_norms: torch.Tensor, normalize: str
    ) -> None:
        """An embedding block given by its looked-up rows (``OuterFactors`` with ids), for any projector:
        each token's gradient row lands at its coordinates' bins (or, exact, at the coordinates)."""
        squared = squared_norms.to(self.out.device, torch.float32)
        self.squared_norm += squared
        scale = None
        if normalize == "layer":
            norms = squared.sqrt()
            scale = 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms))  # [batch]
        cols = block.parameter.shape[1]
        lookup = getattr(self.projector, "bins_and_signs", None)
        table = None if lookup is None else lookup(block.offset, block.numel)  # cached below the limit
        batch, width = self.out.shape
        for factor in factors:
            values = factor.cols.float() if scale is None else factor.cols.float() * scale[:, None, None]
            coordinates = factor.ids[:, :, None] * cols + torch.arange(
                cols, device=values.device
            )  # [b, T, C]
            if table is None:  # the exact projector: the coordinates themselves
                target = coordinates + block.offset
            else:
                target = table[0][coordinates].long()
                values = values * table[1][coordinates]
            target = target + torch.arange(batch, device=values.device)[:, None, None] * width
            self.out.view(-1).index_add_(0, target.reshape(-1), values.reshape(-1))

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
    if example.size != 1:
        raise GradientError("reference_gradient takes a batch of one example")
    parameters = [block.parameter for block in blocks]
    loss = example_losses(model, example)[0]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    flat = [
        torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1).float()
        for p, g in zip(parameters, grads, strict=True)
    ]
    return torch.cat(flat)


def normalize_flat(flat: torch.Tensor, blocks: list[GradientBlock], normalize: str) -> torch.Tensor:
    """Layer-wise normalisation of flattened gradients [batch, D] (reference path)."""
    if normalize == "none":
        return flat.clone()
    pieces = []
    for block in blocks:
        piece = flat[:, block.offset : block.offset + block.numel]
        norms = piece.norm(dim=1, keepdim=True)
        pieces.append(piece / torch.where(norms > 0, norms, torch.ones_like(norms)))
    return torch.cat(pieces, dim=1)
