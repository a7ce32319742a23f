"""Per-token query gradients (SPEC 2.4, the paper's Eq. 7) from batched backward passes over prefixes.

A query of T scored tokens has T token losses ``l_j``. Every vector a query needs is the normalised,
sketched gradient of a weighted sum of them: the whole generation is ``sum_j w_j l_j`` (w = the hot mask
over its count), token j is ``l_j`` alone. A causal model's ``l_j`` does not see the tokens after j's
label, so a row is differentiated on the prefix through its last weighted token: the rows go in order
of that token, in passes bounded by ``ROW_TOKENS_PER_PASS`` (rows x prefix tokens). A pass runs one
forward over its prefix, keeping each hooked module's input and output;
``torch.autograd.grad(..., is_grads_batched=True)`` sends every row of the pass back at once (the rows
play the batch axis); and each row's weight gradients are rebuilt from (input, row's output gradient)
by the same per-example rules as the build (``capture.GradientCapture``). This equals one truncated
forward + backward per token, at the price of one forward a pass; the work is token j's own reverse
pass over its j-token prefix, so a per-token query of T tokens costs sum_j (j x the per-position cost,
plus j^2 in attention), and its memory is one pass's. Exact-path tensors are differentiated directly
(batched, too). Under rapidgrad-ts and -kron the rows' matrix blocks are sketched from their factors as
the build sketches examples (``GradientSketcher.add_hooked``), so query and index vectors share one
sketch space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rapidin_index.capture import GradientBlock
from rapidin_index.data import IGNORE_INDEX
from rapidin_index.errors import GradientError
from rapidin_index.gradients import GradientSketcher, SketchedBatch, frozen
from rapidin_index.losses import Batch, scored_token_losses

ROWS_PER_PASS = 64
"""Most weight rows sent back in one batched backward."""
ROW_TOKENS_PER_PASS = 1 << 14
"""Bound on rows x prefix tokens in one batched backward: a pass holds about this many positions' output
gradients of every hooked module (plus the pass's own forward), whatever the response's length."""
_EXACT_ELEMENTS_PER_PASS = 1 << 26
"""Bound on rows x backward-path parameter elements held at once (their gradients are dense)."""


def sketch_loss_combinations(
    sketcher: GradientSketcher,
    example: Batch,
    weights: torch.Tensor,
    rows_per_pass: int = ROWS_PER_PASS,
    row_tokens_per_pass: int = ROW_TOKENS_PER_PASS,
    advance=lambda rows: None,
) -> SketchedBatch:
    """Row r: the normalised, sketched gradient of ``sum_j weights[r, j] * l_j`` for one example.

    ``weights``: [rows, T] over the example's scored tokens (labels != -100) in order. A causal model's
    ``l_j`` depends on the tokens through j's label only, so a row whose last non-zero weight is token j
    is differentiated on that prefix alone: rows go in order of their last token, in passes of at most
    ``rows_per_pass`` rows and ``row_tokens_per_pass`` rows x prefix tokens, each pass one forward over
    its prefix and one batched backward. ``advance(rows)`` is called after each pass.
    """
    if example.size != 1:
        raise GradientError("sketch_loss_combinations takes a batch of one example")
    if not sketcher.self_checked:
        sketcher.sketch(example)  # the first pass checks the hooked rules against plain backward passes
    backward = [block for block in sketcher.blocks if block.name in sketcher.backward_path]
    if backward:
        largest = max(block.numel for block in backward)
        rows_per_pass = max(1, min(rows_per_pass, _EXACT_ELEMENTS_PER_PASS // largest))
    scored_at = (example.labels[0, 1:] != IGNORE_INDEX).nonzero().squeeze(1)  # logits p predict label p+1
    if weights.shape[1] != len(scored_at):
        raise GradientError(f"weights cover {weights.shape[1]} tokens, the example scores {len(scored_at)}")
    last = _last_weighted(weights)  # [rows]: the last scored token each row needs
    pieces: list[tuple[torch.Tensor, SketchedBatch]] = []
    for rows in _passes(last, scored_at + 2, rows_per_pass, row_tokens_per_pass):
        kept = int(last[rows].max()) + 1  # scored tokens of this pass's prefix
        length = int(scored_at[kept - 1]) + 2  # through the label of the last one
        prefix = Batch(
            *(tensor[:, :length] for tensor in (example.input_ids, example.attention_mask, example.labels))
        )
        pieces.append((rows, _sketch_prefix(sketcher, prefix, backward, weights[rows, :kept])))
        advance(len(rows))
    order = torch.cat([rows for rows, _ in pieces]).argsort()  # back to the rows' own order
    return SketchedBatch(*(torch.cat([getattr(p, name) for _, p in pieces])[order] for name in _FIELDS))


def _last_weighted(weights: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-zero weight (0 for a row of zeros)."""
    nonzero = (weights != 0).flip(1).int()
    return torch.where(nonzero.any(1), weights.shape[1] - 1 - nonzero.argmax(1), 0)


def _passes(last: torch.Tensor, lengths: torch.Tensor, most_rows: int, most_row_tokens: int) -> list:
    """Row indices grouped into passes, by their last token: each pass at most ``most_rows`` rows and
    ``most_row_tokens`` rows x the prefix length (``lengths[last]``) its longest row needs (one row
    always goes, whatever its length)."""
    passes: list[list[int]] = []
    for row in last.argsort(stable=True).tolist():
        need = int(lengths[last[row]])
        current = passes[-1] if passes else None
        if current is None or len(current) >= most_rows or (len(current) + 1) * need > most_row_tokens:
            passes.append([row])
        else:
            current.append(row)
    return [torch.tensor(rows, dtype=torch.long) for rows in passes]


def _sketch_prefix(
    sketcher: GradientSketcher, example: Batch, backward: list[GradientBlock], weights: torch.Tensor
) -> SketchedBatch:
    """One forward over ``example`` with the hooks keeping every call, then its rows' batched backward."""
    capture = sketcher.capture
    capture.batch_size, capture.keep_outputs = 1, True
    hooked = [block.parameter for block in sketcher.blocks if block.name not in sketcher.backward_path]
    head = _HeadWatch(sketcher.model, capture)
    try:
        with capture, frozen(hooked), head:
            losses, mask = scored_token_losses(sketcher.model, example)
        scored = losses[mask]  # [T]
        calls = capture.calls()
        split = head_split(head, scored, calls, backward)
        return _sketch_rows(sketcher, scored, calls, backward, weights.to(scored.device, scored.dtype), split)
    finally:
        capture.keep_outputs = False
        capture.clear()


_FIELDS = ("vectors", "losses", "gradient_norms", "finite")


def _sketch_rows(
    sketcher: GradientSketcher,
    scored: torch.Tensor,
    calls: list,
    backward: list[GradientBlock],
    weights: torch.Tensor,
    split: HeadSplit | None = None,
) -> SketchedBatch:
    rows = weights.shape[0]
    parameters = [block.parameter for block in backward]
    if split is None:
        grads = _batched_grad(scored, [call.output for call in calls] + parameters, weights)
    else:
        grads = split.batched_grads(calls, parameters, weights)
    original_args = [call.args for call in calls]
    for call, grad in zip(calls, grads[: len(calls)], strict=True):
        # the call as `rows` examples: its input shared, its output gradient one per row
        call.output_grad = None if grad is None else _per_row(grad, call.output.shape, rows)
        call.args = tuple(_expand(a, rows) if isinstance(a, torch.Tensor) else a for a in call.args)
    backward_grads = {
        block.name: torch.zeros(rows, block.numel, device=scored.device)
        if grad is None
        else grad.reshape(rows, -1)
        for block, grad in zip(backward, grads[len(calls) :], strict=True)
    }
    state = sketcher.new_state(rows, (weights @ scored.detach()).float())
    try:
        for block in sketcher.blocks:
            if block.name in backward_grads:
                state.add(block, backward_grads[block.name], sketcher.normalize)
            else:  # from the factors where the sketcher factors this block (rapidgrad-ts): same space
                sketcher.add_hooked(state, block, rows)
    finally:
        for call, args in zip(calls, original_args, strict=True):  # the one example again
            call.args, call.output_grad = args, None
    return state.result()


class _HeadWatch:
    """Context manager: keeps the output head's (input, output) of the forward, and which hooked calls
    were recorded by the time the head ran (a call recorded later would not be upstream of its input)."""

    def __init__(self, model, capture) -> None:
        self.module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.capture = capture
        self.seen: tuple | None = None  # (input, output, ids of the calls recorded so far)
        self._handle = None

    def __enter__(self) -> _HeadWatch:
        if isinstance(self.module, torch.nn.Module):  # registered after the capture's: sees its output
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output) -> None:
        if (
            self.seen is None
            and args
            and isinstance(args[0], torch.Tensor)
            and isinstance(output, torch.Tensor)
        ):
            self.seen = (args[0], output, {id(call) for call in self.capture.calls()})
        else:
            self.seen = (None, None, set())  # called twice, or not on one tensor: no split

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()


@dataclass
class HeadSplit:
    """Token losses differentiated in two steps, at the output head's input h [1, T, H].

    The head (``get_output_embeddings``) and the loss act on each position alone, so token j's loss
    reaches h, and the head's output z, at its own position only: one plain backward of their sum gives
    every token's gradient there at once. Each row's batched backward then starts at h (row r carries
    ``sum_j weights[r, j]`` of them), not at the losses: the vocabulary-sized head is left out of the T
    reverse passes. The head's own call gets its rows' output gradients directly.
    """

    hidden: torch.Tensor  # [1, T, H]
    hidden_grad: torch.Tensor  # [1, T, H]: d (sum of token losses) / d h
    head_calls: set[int]  # ids of the capture's calls of the head module
    output_grad: torch.Tensor | None  # [1, T, V]: d (sum of token losses) / d z, if the head needs it
    head_backward: dict[int, str]  # backward-path parameter index -> the head's "weight" or "bias"

    def batched_grads(self, calls: list, parameters: list[torch.Tensor], weights: torch.Tensor) -> list:
        """As ``_batched_grad(scored, outputs + parameters, weights)``, for the calls then the parameters."""
        others = [index for index, call in enumerate(calls) if id(call) not in self.head_calls]
        rows = weights[:, None, :, None]  # [rows, 1, T, 1]
        found = _batched_grad(
            self.hidden, [calls[i].output for i in others] + parameters, rows * self.hidden_grad
        )
        grads: list = [None] * len(calls)
        for index, grad in zip(others, found, strict=False):
            grads[index] = grad
        for index, call in enumerate(calls):
            if id(call) in self.head_calls:
                grads[index] = rows * self.output_grad
        backward = found[len(others) :]
        for index, name in self.head_backward.items():  # the head's own share, which a backward from h misses
            share = self._head_share(name, weights).to(parameters[index].dtype)
            backward[index] = share if backward[index] is None else backward[index] + share
        return grads + backward

    def _head_share(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        """d (weights @ losses)[r] / d the head's weight or bias through the head's own call:
        z = h W^T + b at each position, so row r's is ``sum_j weights[r, j] dz_j h_j^T`` (bias: ``dz_j``)."""
        weighted = weights[:, :, None] * self.output_grad[0].to(weights.dtype)  # [rows, T, V]
        if name == "bias":
            return weighted.sum(dim=1)  # [rows, V]
        return weighted.transpose(1, 2) @ self.hidden[0].detach().to(weights.dtype)  # [rows, V, H]


def head_split(head: _HeadWatch, scored: torch.Tensor, calls: list, backward: list[GradientBlock]):
    """The `HeadSplit` of this forward, or None where it does not apply exactly.

    It needs the head run once, on one position per scored token (``logits_to_keep``), on a tensor in
    the graph, after every other hooked call. A backward-path tensor of the head's own (Gemma's, BioGPT's
    and XGLM's scaled embedding, tied to the head) also gets a gradient through the head, which a
    backward from h misses: that share is added from (dz, h), so the head must be a textbook
    ``nn.Linear`` there.
    """
    if head.seen is None or head.seen[0] is None:
        return None
    hidden, output, recorded = head.seen
    if not hidden.requires_grad or tuple(hidden.shape[:2]) != (1, scored.shape[0]):
        return None
    if any(id(call) not in recorded for call in calls):
        return None
    head_parameters = {id(parameter) for parameter in head.module.parameters()}
    head_backward = {
        index: _own_parameter_name(head.module, block.parameter)
        for index, block in enumerate(backward)
        if id(block.parameter) in head_parameters
    }
    if head_backward and (not _is_textbook_linear(head.module) or not output.requires_grad):
        return None
    head_calls = {id(call) for call in calls if call.output is output}
    needs_output = bool(head_calls or head_backward)
    wanted = [hidden] + ([output] if needs_output else [])
    found = torch.autograd.grad(scored.sum(), wanted, retain_graph=True)
    return HeadSplit(hidden, found[0], head_calls, found[1] if needs_output else None, head_backward)


def _is_textbook_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward


def _own_parameter_name(module: torch.nn.Module, parameter: torch.Tensor) -> str:
    for name, own in module.named_parameters(recurse=False):
        if own is parameter:
            return name
    return ""  # a submodule's: the head is then no textbook nn.Linear and the split is refused


def _per_row(grad: torch.Tensor, output_shape: torch.Size, rows: int) -> torch.Tensor:
    """[rows, *output_shape] -> [rows, tokens..., features]: the example's batch axis of 1 dropped."""
    if output_shape[0] == 1:
        return grad.reshape(rows, *output_shape[1:])
    return grad  # a module that flattened the batch: all its rows are this example's tokens


def _expand(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    one = tensor if tensor.shape[0] == 1 else tensor.unsqueeze(0)  # [1, ...]
    return one.expand(rows, *one.shape[1:])


def _batched_grad(scored: torch.Tensor, inputs: list[torch.Tensor], weights: torch.Tensor) -> list:
    """d (weights @ scored)[r] / d input for every row r, as [rows, *input.shape] (None if unused)."""
    try:
        return list(
            torch.autograd.grad(
                scored,
                inputs,
                grad_outputs=weights,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
        )
    except RuntimeError:  # an op without a batching rule for its backward: one backward per row
        per_row = [
            torch.autograd.grad(scored, inputs, grad_outputs=row, retain_graph=True, allow_unused=True)
            for row in weights
        ]
        return [
            None if per_row[0][i] is None else torch.stack([grads[i] for grads in per_row])
            for i in range(len(inputs))
        ]
