"""Training-token attribution (SPEC 2.4, the paper's Eq. 6): which response tokens of a retrieved training
example s pushed the model toward the query's whole generation t.

Notation: ``q_b`` is the query direction for block b (one attributed parameter tensor): the query's
whole-generation gradient, unit norm per block with ``normalize="layer"`` or raw with ``"none"``; it is
exact (never sketched). ``L_i(s)`` is the cross-entropy of response token i of s alone, shifted as
``model(labels=...)`` shifts, and ``L(s) = mean_i L_i(s)`` is the example's loss.

Two ways to normalise a token's gradient, because layer-wise normalisation is not linear:

* ``normalization="example"`` (default): ``score_i = sum_b <grad_b L_i(s), q_b> / ||grad_b L(s)||``.
  Every token's gradient is divided by the *example's* block norms, so the scores are linear in the
  token losses and ``mean_i score_i`` is exactly the example's whole score ``<n(grad L(s)), q>``: the
  heatmap splits the retrieval score among the tokens. All scores are one Jacobian-vector product,
  ``d L_i / d theta . u`` with ``u_b = q_b / ||grad_b L(s)||``: one backward (for the norms) and one
  forward-mode pass, instead of one backward per token.
* ``normalization="token"``: ``score_i = sum_b <grad_b L_i(s), q_b> / ||grad_b L_i(s)||``, the literal
  per-token cosine of the paper. Each token needs its own block norms, so the scores are not a JVP and
  do NOT average (or sum) to the whole score. They come from per-token gradients: one forward, then
  backwards vmapped over one-hot seeds of the token-loss vector (``is_grads_batched``), a batch of
  ``token_batch_size`` tokens at a time; memory is about ``token_batch_size`` x the attributed size.

With ``normalize="none"`` there is no division and the two normalisations are the same (the JVP).

Forward-mode AD has no formula for the fused attention kernels (and their backward has no derivative
for the double-backward fallback), so both passes run with PyTorch's SDPA pinned to its math kernel: the
model can stay on ``attn_implementation="sdpa"``. The math kernel materialises the [heads, tokens,
tokens] attention; the double-backward graph keeps it per layer, the JVP (under no_grad) keeps none.
If the forward-mode pass still fails (an op without a forward-AD formula, e.g. FlashAttention-2), the
same product comes from the double-backward trick ``J u = d/dv <J^T v, u>``. The model must be in eval
mode (dropout off), as :func:`rapidin_index.models.load_model` leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from rapidin_index.capture import GradientBlock, GradientCapture, embedding_scale
from rapidin_index.data import IGNORE_INDEX
from rapidin_index.errors import TokenAttributionError
from rapidin_index.factors import squared_norms
from rapidin_index.gradients import frozen, layer_norm_scale
from rapidin_index.losses import Batch, collate, example_losses, token_losses
from rapidin_index.settings import NORMALIZATIONS

TOKEN_NORMALIZATIONS = ("example", "token")
METHODS = ("auto", "jvp", "double-backward")


@dataclass
class TokenScores:
    """Influence of each response token of one training example on a query's whole generation."""

    token_ids: list[int]
    """The example's response tokens (label != -100, position 0 excluded: nothing predicts it), in order."""
    scores: list[float]
    """One score per response token; see the module docstring for the normalisation."""
    losses: list[float]
    """Each response token's cross-entropy."""
    method: str
    """How the scores were computed: jvp, double-backward, batched-backward or per-token-backward."""
    normalization: str
    """example (scores average to the whole-example score) or token (per-token cosines)."""


def training_token_scores(
    model: nn.Module,
    blocks: list[GradientBlock],
    example: Batch,
    query_direction: list[torch.Tensor],
    normalize: str = "layer",
    normalization: str = "example",
    method: str = "auto",
    token_batch_size: int = 16,
    scales: list[torch.Tensor] | None = None,
) -> TokenScores:
    """Score every response token of ``example`` (a batch of one) against ``query_direction``.

    ``scales``: per block, the elementwise scale both sides' gradients took (`optimizer_state`, Adam's
    1 / (sqrt(v_hat) + eps)); the scores are then those of the scaled gradients (example normalisation).

    ``method`` (example normalisation): ``auto`` tries the JVP and falls back to double-backward.
    ``token_batch_size``: per-token gradients per vmapped backward in ``normalization="token"`` mode.
    """
    _check_inputs(blocks, example, query_direction, normalize, normalization)
    if method not in METHODS:
        raise TokenAttributionError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if normalization == "token" and normalize == "layer":
        if scales is not None:
            raise TokenAttributionError("scales (an optimizer state) go with normalization='example' only")
        return _token_normalised_scores(model, blocks, example, query_direction, token_batch_size)
    tangents = _example_tangents(model, blocks, example, query_direction, normalize, scales)
    if method in ("auto", "jvp"):
        try:
            scores, losses = _jvp_derivatives(model, blocks, example, tangents)
            return _result(example, scores, losses, "jvp", normalization)
        except torch.OutOfMemoryError:
            raise  # the fallback keeps a double graph: it would need more memory, not less
        except RuntimeError:  # includes NotImplementedError: an op without a forward-AD formula
            if method == "jvp":
                raise
    scores, losses = _double_backward_derivatives(model, blocks, example, tangents)
    return _result(example, scores, losses, "double-backward", normalization)


def reference_training_token_scores(
    model: nn.Module,
    blocks: list[GradientBlock],
    example: Batch,
    query_direction: list[torch.Tensor],
    normalize: str = "layer",
    normalization: str = "example",
) -> TokenScores:
    """Brute force: one autograd backward per response token, normalised as the module docstring says."""
    _check_inputs(blocks, example, query_direction, normalize, normalization)
    parameters = [block.parameter for block in blocks]
    example_norms = [
        gradient.norm() for gradient in _block_gradients(example_losses(model, example)[0], parameters)
    ]
    losses, mask = token_losses(model, example)
    token_loss_values = losses[0][mask[0]]  # [tokens]
    scores = []
    for token_loss in token_loss_values:
        gradients = _block_gradients(token_loss, parameters, retain_graph=True)
        score = torch.zeros((), device=token_loss.device)
        for gradient, direction, example_norm in zip(gradients, query_direction, example_norms, strict=True):
            inner = gradient.reshape(-1) @ direction.to(gradient.device, torch.float32)
            if normalize == "layer":
                inner = _safe_divide(inner, example_norm if normalization == "example" else gradient.norm())
            score = score + inner
        scores.append(score)
    scores = torch.stack(scores)
    return _result(example, scores, token_loss_values.detach(), "per-token-backward", normalization)


# --------------------------------------------------------------------------- many examples at once


def score_examples(
    model: nn.Module,
    blocks: list[GradientBlock],
    examples: list[tuple[list[int], list[int]]],
    query_direction: list[torch.Tensor],
    normalize: str = "layer",
    pad_token_id: int = 0,
    scales: list[torch.Tensor] | None = None,
) -> list[TokenScores]:
    """``training_token_scores`` of several (input_ids, labels) examples against one query direction:
    all at once (:func:`batched_training_token_scores`), or one by one where that does not apply (a
    module without a per-example rule, or ``scales``: gradients divided by an optimizer's sqrt(v))."""
    if not examples:
        return []
    device = blocks[0].parameter.device if blocks else "cpu"
    if scales is None:
        batch = collate(examples, pad_token_id, device)
        scores = batched_training_token_scores(model, blocks, batch, query_direction, normalize)
        if scores is not None:
            return scores
    return [
        training_token_scores(
            model,
            blocks,
            collate([example], pad_token_id, device),
            query_direction,
            normalize,
            scales=scales,
        )
        for example in examples
    ]


def batched_training_token_scores(
    model: nn.Module,
    blocks: list[GradientBlock],
    examples: Batch,
    query_direction: list[torch.Tensor],
    normalize: str = "layer",
) -> list[TokenScores] | None:
    """``training_token_scores`` (example normalisation) of every row of ``examples`` at once, or None
    where some attributed tensor's module has no per-example rule (`capture`): then score them one by one.

    One hooked backward of the batch gives every row's block norms ||grad_b L(s)|| (``normalize="layer"``;
    none with ``"none"``), and one forward-mode pass gives every row's token scores: each attributed
    module's output gets ``eps * c[s, b] * (d output / d theta_b . q_b)`` (the module is affine in its
    tensor, which is what its rule says), c = 1 / ||grad_b L(s)||, so d L_i(s) / d eps at eps = 0 is
    ``sum_b <grad_b L_i(s), q_b> / ||grad_b L(s)||``: a JVP in one scalar, for all rows together.
    """
    capture = GradientCapture(model, blocks)
    if capture.unsupported or not blocks:
        return None
    for block, direction in zip(blocks, query_direction, strict=True):
        if direction.numel() != block.numel:
            raise TokenAttributionError(f"query_direction for {block.name} has {direction.numel()} values")
    scales = _batched_block_scales(capture, model, blocks, examples, normalize)  # [batch, blocks]
    perturbation = _Perturbation(capture, blocks, query_direction, scales)
    try:
        losses, derivatives = perturbation.jvp(model, examples)
        method = "jvp"
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # an op without a forward-AD formula: the double-backward trick on eps
        losses, derivatives = perturbation.double_backward(model, examples)
        method = "double-backward"
    _, mask = losses
    results = []
    for row in range(examples.size):
        keep = int(examples.attention_mask[row].sum())
        one = Batch(
            examples.input_ids[row : row + 1, :keep],
            examples.attention_mask[row : row + 1, :keep],
            examples.labels[row : row + 1, :keep],
        )
        chosen = mask[row]
        results.append(_result(one, derivatives[row][chosen], losses[0][row][chosen], method, "example"))
    return results


def _batched_block_scales(
    capture: GradientCapture, model: nn.Module, blocks: list[GradientBlock], examples: Batch, normalize: str
) -> torch.Tensor:
    """[batch, blocks] 1 / ||grad_b L(s)|| (1 where zero, or with ``normalize="none"``): one hooked backward."""
    device = examples.input_ids.device
    if normalize != "layer":
        return torch.ones(examples.size, len(blocks), device=device)
    capture.batch_size = examples.size
    try:
        with capture, frozen(model.parameters()):  # the hooked outputs start the graph
            example_losses(model, examples).sum().backward()
        norms = []
        for block in blocks:
            factors = capture.example_factors(block, examples.size)
            if factors is not None:
                squared = squared_norms(factors).float()  # from the token Gram matrices
            else:
                squared = capture.example_gradients(block, examples.size).square().sum(dim=1)
            norms.append(squared.sqrt().to(device))
    finally:
        capture.clear()
    return layer_norm_scale(torch.stack(norms, dim=1))  # [batch, blocks]


class _Perturbation:
    """Forward hooks adding ``eps * c[:, b] * (d output / d theta_b . q_b)`` to each attributed module."""

    def __init__(self, capture: GradientCapture, blocks, query_direction, scales: torch.Tensor) -> None:
        self.terms = {}  # id(module): [(module, kind, parameter name, direction, scale [batch])]
        for number, block in enumerate(blocks):
            direction = query_direction[number].to(block.parameter.device, block.parameter.dtype)
            direction = direction.reshape(block.parameter.shape)
            for owner in capture.owners[id(block.parameter)]:
                entry = (owner.module, owner.kind, owner.parameter_name, direction, scales[:, number])
                self.terms.setdefault(id(owner.module), []).append(entry)
        self.eps = None
        self.inside = False

    def _hook(self, module, args, kwargs, output):
        if not isinstance(output, torch.Tensor) or self.inside:
            return None  # inside: a norm's own calls for its direction
        self.inside = True
        try:
            for _, kind, name, direction, scale in self.terms[id(module)]:
                change = _directional_output(module, kind, name, direction, args, kwargs, output)
                shape = (-1,) + (1,) * (change.dim() - 1)
                output = output + self.eps * scale.to(change.dtype).reshape(shape) * change
        finally:
            self.inside = False
        return output

    def _losses(self, model: nn.Module, examples: Batch, eps: torch.Tensor):
        self.eps = eps
        modules = {key: terms[0][0] for key, terms in self.terms.items()}
        handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in modules.values()]
        try:
            losses, mask = token_losses(model, examples)  # [batch, tokens - 1]
        finally:
            for handle in handles:
                handle.remove()
        return losses, mask

    def jvp(self, model: nn.Module, examples: Batch):
        device = examples.input_ids.device
        zero, one = torch.zeros((), device=device), torch.ones((), device=device)
        mask_holder = []

        def losses_of(eps):
            losses, mask = self._losses(model, examples, eps)
            mask_holder.append(mask)
            return losses

        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            losses, derivatives = jvp(losses_of, (zero,), (one,))
        return (losses, mask_holder[-1]), derivatives

    def double_backward(self, model: nn.Module, examples: Batch):
        eps = torch.zeros((), device=examples.input_ids.device, requires_grad=True)
        with sdpa_kernel([SDPBackend.MATH]):
            losses, mask = self._losses(model, examples, eps)
            weights = torch.zeros_like(losses, requires_grad=True)  # v: J^T v is linear in it
            (gradient,) = torch.autograd.grad(losses, eps, grad_outputs=weights, create_graph=True)
            (derivatives,) = torch.autograd.grad(gradient, weights)
        return (losses.detach(), mask), derivatives


def _directional_output(module, kind: str, name: str, direction, args, kwargs, output) -> torch.Tensor:
    """d module(args) / d (its tensor ``name``) . direction; the module is affine in that tensor."""
    inputs = args[0]
    if kind == "embedding":
        rows = nn.functional.embedding(inputs, direction) * embedding_scale(module)
        if module.padding_idx is not None:  # that row's gradient is zero: so is its derivative here
            rows = rows * (inputs != module.padding_idx)[..., None]
        return rows
    if name == "bias":
        return direction.expand_as(output)
    if kind == "linear":
        return nn.functional.linear(inputs, direction)
    if kind == "conv1d":
        return inputs @ direction  # GPT-2's Conv1D: x @ W + b
    overrides = {name: direction}  # a norm: f(w = q) - f(w = 0), any bias zeroed
    zeros = {name: torch.zeros_like(direction)}
    if name != "bias" and getattr(module, "bias", None) is not None:
        overrides["bias"] = zeros["bias"] = torch.zeros_like(module.bias)
    return functional_call(module, overrides, args, kwargs) - functional_call(module, zeros, args, kwargs)


# --------------------------------------------------------------------------- checks and shared pieces


def _check_inputs(
    blocks: list[GradientBlock],
    example: Batch,
    query_direction: list[torch.Tensor],
    normalize: str,
    normalization: str,
) -> None:
    if example.size != 1:
        raise TokenAttributionError(
            f"token attribution takes a batch of one example, got {example.size}: score examples one by one"
        )
    if normalize not in NORMALIZATIONS:
        raise TokenAttributionError(f"normalize {normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
    if normalization not in TOKEN_NORMALIZATIONS:
        raise TokenAttributionError(
            f"normalization {normalization!r} is not one of {', '.join(TOKEN_NORMALIZATIONS)}"
        )
    if len(query_direction) != len(blocks):
        raise TokenAttributionError(
            f"query_direction has {len(query_direction)} blocks, "
            f"the model has {len(blocks)} attributed tensors"
        )
    for block, direction in zip(blocks, query_direction, strict=True):
        if direction.numel() != block.numel:
            raise TokenAttributionError(
                f"query_direction for {block.name} has {direction.numel()} values, "
                f"the tensor has {block.numel}"
            )
    if not bool((example.labels[0, 1:] != IGNORE_INDEX).any()):
        raise TokenAttributionError("the example has no response token to score (all labels are -100)")


def _result(
    example: Batch, scores: torch.Tensor, losses: torch.Tensor, method: str, normalization: str
) -> TokenScores:
    targets = example.labels[0, 1:]  # shifted as the losses are
    token_ids = targets[targets != IGNORE_INDEX]
    return TokenScores(
        token_ids=token_ids.tolist(),
        scores=scores.float().tolist(),
        losses=losses.float().tolist(),
        method=method,
        normalization=normalization,
    )


def _safe_divide(values: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return values * layer_norm_scale(norms)


def _block_gradients(
    loss: torch.Tensor, parameters: list[nn.Parameter], retain_graph: bool = False
) -> list[torch.Tensor]:
    """float32 gradient of ``loss`` for each parameter, zeros where the loss does not reach it."""
    gradients = torch.autograd.grad(loss, parameters, retain_graph=retain_graph, allow_unused=True)
    return [
        torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
        for p, g in zip(parameters, gradients, strict=True)
    ]


def _example_tangents(
    model: nn.Module,
    blocks: list[GradientBlock],
    example: Batch,
    query_direction: list[torch.Tensor],
    normalize: str,
    scales: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """u_b = q_b / ||grad_b L(s)|| (layer) or q_b (none), shaped and typed like each parameter; with
    ``scales`` s_b, u_b = s_b q_b / ||s_b grad_b L(s)||, since <s g, q> = <g, s q>."""
    parameters = [block.parameter for block in blocks]
    tangents = [
        direction.to(p.device, torch.float32).reshape(p.shape)
        for p, direction in zip(parameters, query_direction, strict=True)
    ]
    shaped = (
        None
        if scales is None
        else [s.to(p.device).reshape(p.shape) for s, p in zip(scales, parameters, strict=True)]
    )
    if shaped is not None:
        tangents = [t * s for t, s in zip(tangents, shaped, strict=True)]
    if normalize == "layer":
        gradients = _block_gradients(example_losses(model, example)[0], parameters)
        if shaped is not None:
            gradients = [g * s for g, s in zip(gradients, shaped, strict=True)]
        tangents = [_safe_divide(t, g.norm()) for t, g in zip(tangents, gradients, strict=True)]
    return [t.to(p.dtype) for t, p in zip(tangents, parameters, strict=True)]


# ----------------------------------------------------------------- J u: forward mode or double backward


def _jvp_derivatives(
    model: nn.Module, blocks: list[GradientBlock], example: Batch, tangents: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(J u [tokens], token losses [tokens]) in one forward-mode pass over the attributed parameters."""
    names_by_id = {id(parameter): name for name, parameter in model.named_parameters()}
    missing = [block.name for block in blocks if id(block.parameter) not in names_by_id]
    if missing:
        raise TokenAttributionError(f"attributed tensors are not parameters of the model: {missing[:3]}")
    names = [names_by_id[id(block.parameter)] for block in blocks]

    def response_losses(*parameters: torch.Tensor) -> torch.Tensor:
        def forward(**kwargs):
            return functional_call(model, dict(zip(names, parameters, strict=True)), args=(), kwargs=kwargs)

        losses, mask = token_losses(forward, example)
        return losses[mask]  # [tokens]

    primals = tuple(block.parameter.detach() for block in blocks)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):  # no_grad: no backward graph is needed
        losses, derivatives = jvp(response_losses, primals, tuple(tangents))
    return derivatives, losses


def _double_backward_derivatives(
    model: nn.Module, blocks: list[GradientBlock], example: Batch, tangents: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """J u as d/dv <J^T v, u>: J^T v is linear in v, so v's value does not matter (zeros here)."""
    parameters = [block.parameter for block in blocks]
    with sdpa_kernel([SDPBackend.MATH]):
        losses, mask = token_losses(model, example)
        losses = losses[mask]  # [tokens]
        weights = torch.zeros_like(losses, requires_grad=True)  # v
        gradients = torch.autograd.grad(
            losses, parameters, grad_outputs=weights, create_graph=True, allow_unused=True
        )
        inner = sum(
            (g.float() * t.float()).sum() for g, t in zip(gradients, tangents, strict=True) if g is not None
        )
        if not isinstance(inner, torch.Tensor):  # no attributed tensor reaches the loss
            return torch.zeros_like(losses), losses.detach()
        (derivatives,) = torch.autograd.grad(inner, weights)
    return derivatives, losses.detach()


# --------------------------------------------------------------------------- per-token normalisation, batched


def _token_normalised_scores(
    model: nn.Module,
    blocks: list[GradientBlock],
    example: Batch,
    query_direction: list[torch.Tensor],
    token_batch_size: int,
) -> TokenScores:
    """Per-token cosines from per-token gradients: one forward, then vmapped backwards in batches."""
    parameters = [block.parameter for block in blocks]
    directions = [
        d.to(p.device, torch.float32).reshape(-1) for p, d in zip(parameters, query_direction, strict=True)
    ]
    losses, mask = token_losses(model, example)
    losses = losses[mask]  # [tokens]
    seeds = torch.eye(len(losses), device=losses.device)  # row i selects L_i
    scores = []
    try:
        for start in range(0, len(losses), token_batch_size):
            chunk = seeds[start : start + token_batch_size]  # [chunk, tokens]
            gradients = torch.autograd.grad(
                losses,
                parameters,
                grad_outputs=chunk,
                retain_graph=True,
                is_grads_batched=True,  # vmap over the backward: one gradient per seed row
                allow_unused=True,
            )
            scores.append(_per_token_cosines(gradients, directions, len(chunk)))
    except torch.OutOfMemoryError:
        raise  # lower token_batch_size
    except RuntimeError:  # an op whose backward vmap cannot batch: one backward per token
        return reference_training_token_scores(model, blocks, example, query_direction, "layer", "token")
    return _result(example, torch.cat(scores), losses.detach(), "batched-backward", "token")


def _per_token_cosines(
    gradients: tuple[torch.Tensor | None, ...], directions: list[torch.Tensor], count: int
) -> torch.Tensor:
    """sum_b <g_b, q_b> / ||g_b|| for each of ``count`` per-token gradients: [count]."""
    scores = torch.zeros(count, device=directions[0].device)
    for gradient, direction in zip(gradients, directions, strict=True):
        if gradient is None:  # the loss does not reach this tensor
            continue
        gradient = gradient.reshape(count, -1).float()  # [count, numel]
        scores += _safe_divide(gradient @ direction, gradient.norm(dim=1)).to(scores.device)
    return scores
