"""Per-example gradients from one batched backward: the hooks, and a rule per kind of module.

Forward hooks on every module that owns an attributed parameter keep the module's input, and a tensor
hook on its output keeps the gradient flowing back into it. After one backward of the summed
per-example losses, each example's weight gradient is rebuilt from its own rows of (input, output grad):

* ``nn.Linear``          dW[b] = sum_t G[b,t]^T A[b,t]     (transformers' GPT-2 ``Conv1D``: the transpose)
* ``nn.Embedding``       dW[b] = scatter-add of G[b,t] into the rows of the token ids (times ``embed_scale``
                         for the scaled embeddings of Gemma and BART, whose forward multiplies the rows)
* norm layers            dw[b] = sum_t G[b,t] * (f(w=1) - f(w=0))[b,t]; a norm's output is affine in its
                         elementwise weight, so that difference is the exact derivative

A rule applies only where a module's forward is provably the textbook one; any other owner leaves its
tensor to the backward path of `gradients.GradientSketcher`. A linear, Conv1D or embedding weight's
gradient can also be handed over as its outer-product factors (`GradientCapture.example_factors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from rapidin_index.errors import GradientError
from rapidin_index.factors import OuterFactors


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


# nn.Linear subclasses whose own forward we have read and which compute exactly x @ W^T + b.
_LINEAR_EQUIVALENTS = frozenset({"FalconLinear"})

# nn.Embedding subclasses whose own forward we have read and which compute exactly
# ``nn.Embedding.forward(ids) * embed_scale`` (a float, or a 0-d buffer cast to the weight's dtype first).
_SCALED_EMBEDDINGS = frozenset(
    {
        "GemmaTextScaledWordEmbedding",
        "Gemma3TextScaledWordEmbedding",
        "Gemma4TextScaledWordEmbedding",
        "VaultGemmaTextScaledWordEmbedding",
        "BartScaledWordEmbedding",
        "MBartScaledWordEmbedding",
        "BioGptScaledWordEmbedding",
    }
)


def embedding_scale(module: nn.Module) -> float:
    """The factor a (scaled) embedding multiplies its looked-up rows by, as its forward rounds it."""
    scale = getattr(module, "embed_scale", None) if type(module).__name__ in _SCALED_EMBEDDINGS else None
    if scale is None:
        return 1.0
    if isinstance(scale, torch.Tensor):
        return float(scale.to(module.weight.dtype))
    return float(scale)


def _module_kind(module: nn.Module, parameter_name: str, parameter: nn.Parameter) -> str | None:
    """The per-example rule that rebuilds this parameter's gradient exactly, or None (backward path).

    Only modules whose forward is provably the textbook one get a rule: a subclass with its own forward
    (Gemma's scaled embedding, OPT's position embedding) may compute anything, so it takes the backward path.
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
        and (module_class.forward is nn.Embedding.forward or module_class.__name__ in _SCALED_EMBEDDINGS)
        and parameter_name == "weight"
    ):
        return "embedding"  # a scaled one: its rows' gradient is the output gradient times the scale
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
        grad = grad * embedding_scale(owner.module)
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
    listed in ``unsupported`` ({block name: reason}) and take the backward path.
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
        """The 2-D block's per-example gradient as outer-product factors (``factors.OuterFactors``).

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
                    grad = grad * embedding_scale(owner.module)
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
