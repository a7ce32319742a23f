"""Per-example matrix gradients as outer-product factors, and rapidgrad-ts, which sketches them.

This module holds the math on factors (``OuterFactors``: Gram-matrix norms, the materialised reference,
the FFT-or-matmul cost model); the projector, ``sketch.RapidGradTSProjector``, lives with the others.

A linear layer's per-example weight gradient is a sum over tokens of outer products,
``dW = sum_t u_t v_t^T`` (u = output gradient and v = input for ``nn.Linear``; the reverse for GPT-2's
``Conv1D``; u = one-hot(token id) for an embedding). rapidgrad-ts hashes a 2-D block of shape
(rows, cols) at ``offset`` with a tensor-product count sketch (TensorSketch, Pham and Pagh 2013)::

    bin(i, j) = (h1(i) + h2(j)) mod K        sign(i, j) = s1(i) * s2(j)

h1, s1, h2, s2 are counter-based hashes of (seed, offset, index), so nothing is stored and every process
derives the same ones. Distinct coordinates collide with probability 1/K and the signs are pairwise
independent, so ``<sketch(x), sketch(y)>`` is an unbiased estimate of ``<x, y>``; its variance is
somewhat above a fully random count sketch's, as (i, j), (i, j') collide exactly when (i', j), (i', j')
do (BENCHMARKS.md, "Factored sketch (issue 14)", measures what that costs in fidelity). The sketch of one
outer product u v^T is the circular convolution of the two small count sketches CS1(u) and CS2(v), so

    sketch(dW) = IFFT( sum_t FFT(CS1(u_t)) * FFT(CS2(v_t)) )            (``project_outer``)

never materialises dW: it costs about T * K log K a call instead of T * rows * cols. Where that is
more (small matrices, large K: ``fft_is_cheaper``), ``project_dense`` multiplies the signs into the
factors (s1 into u, s2 into v: the sign is separable), forms dW with one batched matmul and scatters it
into its bins, skipping the sign and normalisation passes over [batch, rows * cols]. An embedding's u_t is
one-hot, so its sketch is a plain scatter of v_t at bins shifted by h1(id_t) (``project_rows``). The
block's layer norm follows from the two token Gram matrices (``squared_norms``):
``||sum_t u_t v_t^T||_F^2 = sum_{t,t'} (u_t . u_t')(v_t . v_t')``; the scale goes into v.

Every other block (norm weights, biases; every block when no block list is given) is hashed by its
flat position exactly as rapidgrad-v2 hashes it. ``project_block`` applies the same hash to a
materialised [batch, numel] gradient: the reference of the factored methods, and the path of every
block the gradient stage cannot factor (exact-path blocks, norm weights, biases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Cost model (nanoseconds on one CPU thread, from benchmarks/factored.py's micro-timings) for picking,
# per module call, the FFT or the signed-factor matmul + scatter: a multiply-add in a batched matmul, one
# scattered value, and one token's FFT work per K log2 K (two count sketches, two rFFTs, one product).
# Both give the same sketch, so a GPU (not measured) can only pick the slower one, never a wrong one.
GEMM_NS = 0.02
SCATTER_NS = 0.9
FFT_NS = 0.45


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


# --------------------------------------------------------------------------- norms and costs


def _row_gram(a: OuterFactors, b: OuterFactors) -> torch.Tensor:
    """[batch, Ta, Tb]: u^a_t . u^b_t' (one-hot rows compare ids, or pick the dense entry)."""
    if a.ids is not None and b.ids is not None:
        return (a.ids[:, :, None] == b.ids[:, None, :]).float()
    if a.ids is not None:
        index = a.ids[:, None, :].expand(-1, b.tokens, -1)  # [batch, Tb, Ta]
        return b.rows.float().gather(2, index).transpose(1, 2)  # u^b_t'[id^a_t]
    if b.ids is not None:
        return _row_gram(b, a).transpose(1, 2)
    return torch.bmm(a.rows.float(), b.rows.float().transpose(1, 2))


def squared_norms(factors: list[OuterFactors]) -> torch.Tensor:
    """[batch] float64 ||sum of the factors' outer products||_F^2 from token Gram matrices, cross terms too.

    The Grams are float32 matmuls; their products are summed in float64, where terms of opposite signs
    cancel (the squared norm of a sum of outer products).
    """
    total = None
    for first, a in enumerate(factors):
        for second in range(first, len(factors)):
            b = factors[second]
            cols = torch.bmm(a.cols.float(), b.cols.float().transpose(1, 2))  # [batch, Ta, Tb]
            term = (_row_gram(a, b).double() * cols.double()).sum(dim=(1, 2)) * (1 if first == second else 2)
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


def fft_is_cheaper(tokens: int, shape: tuple[int, int], sketch_dim: int) -> bool:
    """Whether one dense call's FFT sketch costs less than its signed matmul + scatter (per example)."""
    rows, cols = shape
    dense = rows * cols * (tokens * GEMM_NS + SCATTER_NS)
    fft = tokens * (sketch_dim * math.log2(max(2, sketch_dim)) * FFT_NS + (rows + cols) * SCATTER_NS)
    return fft < dense
