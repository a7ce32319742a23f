"""Per-example matrix gradients as outer-product factors, and the math on them that needs no sketch.

A linear layer's per-example weight gradient is a sum over tokens of outer products,
``dW = sum_t u_t v_t^T`` (u = output gradient and v = input for ``nn.Linear``; the reverse for GPT-2's
``Conv1D``; u = one-hot(token id) for an embedding). The capture stage hands them over as
``OuterFactors``; the gradient stage takes each block's layer norm from two token Gram matrices
(``squared_norms``: ``||sum_t u_t v_t^T||_F^2 = sum_{t,t'} (u_t . u_t')(v_t . v_t')``) and materialises a
block only where it must (``factors_gradient``: the reference, exact-path tensors). The factored sketches
(`sketch.ts`, `sketch.kron`) project the factors without materialising them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OuterFactors:
    """One module call's share of a 2-D block's per-example gradient: ``sum_t u_t v_t^T`` per example.

    Exactly one of ``rows`` ([batch, tokens, block rows], u dense) and ``ids`` ([batch, tokens] int64,
    u = one-hot(id)) is set; ``cols`` is [batch, tokens, block cols]. Masked tokens carry v_t = 0.
    """

    cols: torch.Tensor
    rows: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.cols.shape[1]


class GramCache:
    """Token Gram matrices ``x x^T`` of the tensors one batch's factors share (a layer's q, k and v
    projections read the same input): each is formed once. It holds the tensors it keys on, so a freed
    tensor's storage cannot come back under another tensor with the same key."""

    def __init__(self) -> None:
        self._grams: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def gram(self, tensor: torch.Tensor) -> torch.Tensor:
        """[batch, T, T] of a [batch, T, features] tensor."""
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key not in self._grams:
            self._grams[key] = (tensor, _gram(tensor, tensor, False, None))
        return self._grams[key][1]


def shared_example(tensor: torch.Tensor) -> torch.Tensor | None:
    """[1, ...]: the one example a tensor repeats over its batch axis (expanded, stride 0), else None.

    A query's per-token rows share its forward pass: every row's module input is the same tensor.
    """
    if tensor.dim() and tensor.shape[0] > 1 and tensor.stride(0) == 0:
        return tensor[:1]
    return None


def batched_matmul(tensor: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """[batch, T, n] float32 @ [n, m]; once for a tensor that repeats one example (``shared_example``)."""
    one = shared_example(tensor)
    if one is not None:
        return (one.float() @ matrix).expand(tensor.shape[0], -1, -1)
    return tensor.float() @ matrix


def _gram(a: torch.Tensor, b: torch.Tensor, same: bool, cache: GramCache | None) -> torch.Tensor:
    if same and cache is not None:
        return cache.gram(a)
    one_a, one_b = shared_example(a), shared_example(b)
    if one_a is not None and one_b is not None:  # both repeat one example: one Gram, repeated
        return torch.bmm(one_a.float(), one_b.float().transpose(1, 2)).expand(a.shape[0], -1, -1)
    return torch.bmm(a.float(), b.float().transpose(1, 2))


def _row_gram(a: OuterFactors, b: OuterFactors, cache: GramCache | None = None) -> torch.Tensor:
    """[batch, Ta, Tb]: u^a_t . u^b_t' (one-hot rows compare ids, or pick the dense entry)."""
    if a.ids is not None and b.ids is not None:
        return (a.ids[:, :, None] == b.ids[:, None, :]).float()
    if a.ids is not None:
        index = a.ids[:, None, :].expand(-1, b.tokens, -1)  # [batch, Tb, Ta]
        return b.rows.float().gather(2, index).transpose(1, 2)  # u^b_t'[id^a_t]
    if b.ids is not None:
        return _row_gram(b, a).transpose(1, 2)
    return _gram(a.rows, b.rows, a is b, cache)


def squared_norms(factors: list[OuterFactors], cache: GramCache | None = None) -> torch.Tensor:
    """[batch] float64 ||sum of the factors' outer products||_F^2 from token Gram matrices, cross terms too.

    The Grams are float32 matmuls; their products are summed in float64, where terms of opposite signs
    cancel (the squared norm of a sum of outer products). ``cache`` shares Grams between blocks.
    """
    total = None
    for first, a in enumerate(factors):
        for second in range(first, len(factors)):
            b = factors[second]
            cols = _gram(a.cols, b.cols, a is b, cache)  # [batch, Ta, Tb]
            term = (_row_gram(a, b, cache).double() * cols.double()).sum(dim=(1, 2)) * (
                1 if first == second else 2
            )
            total = term if total is None else total + term
    return total


def factors_gradient(factors: list[OuterFactors], shape: tuple[int, int]) -> torch.Tensor:
    """The materialised per-example gradient [batch, rows * cols] float32 of the factors (reference)."""
    rows_count, cols_count = shape
    batch = factors[0].cols.shape[0]
    total = torch.zeros(batch, rows_count, cols_count, device=factors[0].cols.device)
    for factor in factors:
        cols = factor.cols.float()
        if factor.ids is not None:
            flat_ids = factor.ids + torch.arange(batch, device=cols.device)[:, None] * rows_count
            total.view(-1, cols_count).index_add_(0, flat_ids.reshape(-1), cols.reshape(-1, cols_count))
        else:
            total += torch.bmm(factor.rows.float().transpose(1, 2), cols)  # [batch, R, C]
    return total.reshape(batch, -1)


def factors_gradient_rows(
    factors: list[OuterFactors], cols_count: int, first: int, last: int
) -> torch.Tensor:
    """Rows [first, last) of :func:`factors_gradient`: [batch, (last - first) * cols] float32."""
    return gradient_rows(factors, cols_count, slice(first, last)).flatten(1)


def gradient_rows(factors: list[OuterFactors], cols_count: int, rows: slice | torch.Tensor) -> torch.Tensor:
    """[batch, n, cols] float32: rows ``rows`` of the factors' per-example gradient, a contiguous
    ``slice(first, last)`` or an ascending int64 [n] tensor of row indices (only those rows are formed)."""
    batch = factors[0].cols.shape[0]
    count = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
    total = torch.zeros(batch, count, cols_count, device=factors[0].cols.device)
    for factor in factors:
        if factor.ids is None:
            left = factor.rows[:, :, rows] if isinstance(rows, slice) else factor.rows.index_select(2, rows)
            total += torch.bmm(left.float().transpose(1, 2), factor.cols.float())  # [batch, n, cols]
            continue
        if isinstance(rows, slice):
            position = factor.ids - rows.start
            kept = (factor.ids >= rows.start) & (factor.ids < rows.stop)
        else:  # where each token's id sits among the rows, if it does
            position = torch.searchsorted(rows, factor.ids.contiguous()).clamp(max=count - 1)
            kept = rows[position] == factor.ids
        example, token = kept.nonzero(as_tuple=True)
        flat = example * count + position[example, token]
        total.view(-1, cols_count).index_add_(0, flat, factor.cols[example, token].float())
    return total
