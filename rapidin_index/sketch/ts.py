"""rapidgrad-ts: a tensor-product count sketch of each weight matrix, projected from its factors.

This module holds the FFT-or-matmul cost model, the tensor-product hash (``matrix_hash``) and the projector
(``RapidGradTSProjector``); its flat blocks reuse rapidgrad-v2 (`sketch.v2`), the factors and their norms
are `rapidin_index.factors`. `sketch.make_projector` picks it.

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

from rapidin_index.errors import SketchError
from rapidin_index.factors import OuterFactors, squared_norms
from rapidin_index.settings import SketchSettings
from rapidin_index.sketch.hashed import DEFAULT_CACHE_LIMIT, HashedProjector
from rapidin_index.sketch.hashing import index_hash, word
from rapidin_index.sketch.v2 import RapidGradV2Projector

# Cost model (nanoseconds on one CPU thread, from benchmarks/factored.py's micro-timings) for picking,
# per module call, the FFT or the signed-factor matmul + scatter: a multiply-add in a batched matmul, one
# scattered value, and one token's FFT work per K log2 K (two count sketches, two rFFTs, one product).
# Both give the same sketch, so a GPU (not measured) can only pick the slower one, never a wrong one.
GEMM_NS = 0.02
SCATTER_NS = 0.9
FFT_NS = 0.45


def fft_is_cheaper(tokens: int, shape: tuple[int, int], sketch_dim: int) -> bool:
    """Whether one dense call's FFT sketch costs less than its signed matmul + scatter (per example)."""
    rows, cols = shape
    dense = rows * cols * (tokens * GEMM_NS + SCATTER_NS)
    fft = tokens * (sketch_dim * math.log2(max(2, sketch_dim)) * FFT_NS + (rows + cols) * SCATTER_NS)
    return fft < dense


TS_ALGORITHM = "rapidgrad-ts"


# Bound on batch x tokens x K float32 values held by one FFT step of rapidgrad-ts (64 MB).
_FFT_ELEMENTS = 1 << 24


# Matrix blocks up to this many coordinates keep their int64 bins (8 bytes a coordinate) for project_dense.
_BINS_CACHE_LIMIT = 1 << 24


TS_METHODS = ("auto", "fft", "dense")


def _wrap(total: torch.Tensor, sketch_dim: int) -> torch.Tensor:
    """``total % sketch_dim`` for a sum of two bins (each in [0, K)), without the integer division."""
    if sketch_dim & (sketch_dim - 1) == 0:
        return total & (sketch_dim - 1)
    return torch.where(total >= sketch_dim, total - sketch_dim, total)


def matrix_hash(
    seed: int, offset: int, rows: int, cols: int, sketch_dim: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h1 [rows] int64, s1 [rows] float32, h2 [cols], s2 [cols]) of the 2-D block at ``offset``."""
    result = []
    for role, size in ((1, rows), (2, cols)):
        indices = torch.arange(size, dtype=torch.int64, device=device)
        bins = (index_hash(indices, word(seed, offset, role, 0)) * sketch_dim) >> 32  # [0, K)
        signs = 1.0 - 2.0 * (index_hash(indices, word(seed, offset, role, 1)) & 1).to(torch.float32)
        result += [bins, signs]
    return tuple(result)


@dataclass(frozen=True)
class MatrixBlock:
    offset: int
    rows: int
    cols: int

    @property
    def end(self) -> int:
        return self.offset + self.rows * self.cols


def matrix_blocks(blocks: list | None) -> list[MatrixBlock]:
    """The 2-D parameter tensors of a ``capture.GradientBlock`` list, as (offset, rows, cols)."""
    found = []
    for block in blocks or []:
        shape = tuple(block.parameter.shape)
        if len(shape) == 2:
            found.append(MatrixBlock(block.offset, shape[0], shape[1]))
    return sorted(found, key=lambda matrix: matrix.offset)


class RapidGradTSProjector(HashedProjector):
    """Fast rapidgrad-ts: ``project_block`` (materialised) and ``project_factors`` (factored) agree.

    ``blocks`` is the gradient's block list; its 2-D tensors get the tensor-product hash, the rest of
    the coordinates rapidgrad-v2's. Without blocks every coordinate is flat: this is rapidgrad-v2.
    """

    def __init__(
        self,
        settings: SketchSettings,
        gradient_dim: int,
        device: torch.device | str = "cpu",
        blocks: list | None = None,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
    ) -> None:
        if settings.exact or settings.algorithm != TS_ALGORITHM:
            raise SketchError(f"RapidGradTSProjector needs K > 0 and {TS_ALGORITHM}, got {settings}")
        super().__init__(settings, gradient_dim, device, cache_limit)
        flat = SketchSettings(settings.sketch_dim, settings.shuffle_lambda, settings.seed, "rapidgrad-v2")
        self.flat = RapidGradV2Projector(flat, gradient_dim, device, cache_limit=0)
        self.matrices = matrix_blocks(blocks)
        if self.matrices and self.matrices[-1].end > gradient_dim:
            raise SketchError(f"a 2-D block ends at {self.matrices[-1].end}, past D = {gradient_dim}")
        self._by_offset = {matrix.offset: matrix for matrix in self.matrices}
        self._hashes: dict[int, tuple[torch.Tensor, ...]] = {}
        self._matrix_bins: dict[int, torch.Tensor] = {}
        self.method = "auto"
        """How ``project_factors`` sketches a dense factor: 'auto' (by ``fft_is_cheaper``), 'fft', 'dense'."""

    def hashes(self, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h1, s1, h2, s2) of the 2-D block at ``offset``."""
        if offset not in self._hashes:
            matrix = self._by_offset.get(offset)
            if matrix is None:
                raise SketchError(f"no 2-D block starts at offset {offset}")
            self._hashes[offset] = matrix_hash(
                self.settings.seed, offset, matrix.rows, matrix.cols, self.output_dim, self.device
            )
        return self._hashes[offset]

    def is_matrix(self, offset: int) -> bool:
        return offset in self._by_offset

    def _map_bins_and_signs(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        bins = torch.empty(length, dtype=torch.int32, device=self.device)
        signs = torch.empty(length, dtype=torch.int8, device=self.device)
        position, end = start, start + length
        for matrix in self.matrices:
            if matrix.end <= position or matrix.offset >= end:
                continue
            if matrix.offset > position:
                self._flat_segment(bins, signs, start, position, matrix.offset)
                position = matrix.offset
            stop = min(end, matrix.end)
            h1, s1, h2, s2 = self.hashes(matrix.offset)
            local = torch.arange(position - matrix.offset, stop - matrix.offset, device=self.device)
            row, col = local // matrix.cols, local % matrix.cols
            bins[position - start : stop - start] = _wrap(h1[row] + h2[col], self.output_dim)
            signs[position - start : stop - start] = s1[row] * s2[col]
            position = stop
        if position < end:
            self._flat_segment(bins, signs, start, position, end)
        return bins, signs

    def _flat_segment(self, bins, signs, start: int, first: int, stop: int) -> None:
        flat_bins, flat_signs = self.flat.bins_and_signs(first, stop - first)
        bins[first - start : stop - start] = flat_bins
        signs[first - start : stop - start] = flat_signs

    def project_factors(
        self,
        out: torch.Tensor,
        factors: list[OuterFactors],
        offset: int,
        scale: torch.Tensor | None = None,
    ) -> None:
        """out += scale[b] * sketch(sum of the factors' outer products) for the 2-D block at ``offset``."""
        for factor in factors:
            cols = factor.cols if scale is None else factor.cols * scale[:, None, None]
            if factor.ids is not None:
                self.project_rows(out, factor.ids, cols, offset)
            elif self._uses_fft(factor, offset):
                self.project_outer(out, factor.rows, cols, offset)
            else:
                self.project_dense(out, factor.rows, cols, offset)

    def sketch_factors(self, factors: list[OuterFactors], offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sketch [batch, K], squared Frobenius norms [batch] float64) of the factors' sum, unscaled.

        One dense call on the matmul path takes its norm from the signed product it forms anyway (the
        signs do not change it): one pass, where the Gram matrices cost tokens^2 (rows + cols).
        """
        factor = factors[0]
        if len(factors) == 1 and factor.ids is None and not self._uses_fft(factor, offset):
            _, s1, _, s2 = self.hashes(offset)
            signed = torch.bmm((factor.rows.float() * s1).transpose(1, 2), factor.cols.float() * s2)
            signed = signed.reshape(signed.shape[0], -1)  # [batch, R * C]
            squared = torch.linalg.vector_norm(signed, dim=1).double().square()
            sketch = self.new_output(signed.shape[0]).index_add_(1, self.matrix_bins(offset), signed)
            return sketch, squared
        sketch = self.new_output(factor.cols.shape[0])
        self.project_factors(sketch, factors, offset)
        return sketch, squared_norms(factors)

    def _uses_fft(self, factor: OuterFactors, offset: int) -> bool:
        if self.method != "auto":
            return self.method == "fft"
        matrix = self._by_offset[offset]
        if factor.cols.shape[0] * matrix.rows * matrix.cols > _BINS_CACHE_LIMIT:
            return True  # the matmul would materialise a [batch, rows, cols] larger than the bound
        return fft_is_cheaper(factor.tokens, (matrix.rows, matrix.cols), self.output_dim)

    def project_dense(self, out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, offset: int) -> None:
        """out: [batch, K] += sketch(sum_t rows[:, t] cols[:, t]^T) by one matmul of the signed factors."""
        h1, s1, h2, s2 = self.hashes(offset)
        signed = torch.bmm((rows.float() * s1).transpose(1, 2), cols.float() * s2)  # [batch, R, C]
        out.index_add_(1, self.matrix_bins(offset), signed.reshape(out.shape[0], -1))

    def matrix_bins(self, offset: int) -> torch.Tensor:
        """[rows * cols] int64 bins (h1(i) + h2(j)) mod K of the 2-D block at ``offset``, row-major."""
        if offset in self._matrix_bins:
            return self._matrix_bins[offset]
        h1, _, h2, _ = self.hashes(offset)
        bins = _wrap(h1[:, None] + h2[None, :], self.output_dim).reshape(-1)
        if sum(b.numel() for b in self._matrix_bins.values()) + bins.numel() <= _BINS_CACHE_LIMIT:
            self._matrix_bins[offset] = bins
        return bins

    def project_outer(self, out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, offset: int) -> None:
        """out: [batch, K] += sketch(sum_t rows[:, t] cols[:, t]^T) by FFT (rows [b, T, R], cols [b, T, C])."""
        h1, s1, h2, s2 = self.hashes(offset)
        batch, tokens, sketch_dim = rows.shape[0], rows.shape[1], self.output_dim
        step = max(1, _FFT_ELEMENTS // max(1, batch * sketch_dim))
        spectrum = None
        for first in range(0, tokens, step):
            last = min(tokens, first + step)
            left = torch.zeros(batch, last - first, sketch_dim, device=out.device)
            left.index_add_(2, h1, rows[:, first:last].float() * s1)  # CS1(u_t): [batch, t, K]
            right = torch.zeros_like(left)
            right.index_add_(2, h2, cols[:, first:last].float() * s2)  # CS2(v_t): [batch, t, K]
            product = (torch.fft.rfft(left) * torch.fft.rfft(right)).sum(dim=1)  # [batch, K/2 + 1]
            spectrum = product if spectrum is None else spectrum + product
        if spectrum is not None:
            out += torch.fft.irfft(spectrum, n=sketch_dim)  # circular convolution: bins h1 + h2 mod K

    def project_rows(self, out: torch.Tensor, ids: torch.Tensor, cols: torch.Tensor, offset: int) -> None:
        """out: [batch, K] += sketch(sum_t onehot(ids[:, t]) cols[:, t]^T): an embedding, no FFT."""
        h1, s1, h2, s2 = self.hashes(offset)
        batch, sketch_dim = cols.shape[0], self.output_dim
        bins = _wrap(h1[ids][:, :, None] + h2, sketch_dim)  # [batch, T, C]
        bins = bins + torch.arange(batch, device=out.device)[:, None, None] * sketch_dim
        values = cols.float() * (s1[ids][:, :, None] * s2)  # [batch, T, C]
        flat = out.view(-1)  # [batch * K]: every example scatters into its own row
        flat.index_add_(0, bins.reshape(-1), values.reshape(-1))
