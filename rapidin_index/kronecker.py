"""rapidgrad-kron: every parameter tensor gets its own bins, and a weight matrix a Kronecker count sketch.

rapidgrad-ts (`factored`) spreads every weight matrix over all K bins, so a factored sketch of a linear
layer costs a materialised matmul and a scatter of rows x cols values per example (or an FFT of K per
token). rapidgrad-kron instead gives each parameter tensor a segment of the K bins of its own
(``kron_layout``) and sketches a (rows, cols) block in it as ``pieces`` independent Kronecker count
sketches of ``row_bins x col_bins`` each::

    piece k:  bin(i, j) = start + k * a * b + h1_k(i) * b + h2_k(j)      sign = s1_k(i) * s2_k(j) / sqrt(p)

with h1_k in [0, a), h2_k in [0, b) and the signs counter-based hashes of (seed, offset, side, k), so
nothing is stored. A side that fits (a = rows, or b = cols) is not hashed at all (h is the identity), so a
tensor whose segment holds all of it is stored exactly, up to signs. Distinct coordinates of a piece
collide with probability at most 1/a or 1/b and their signs are independent, so ``<sketch(x), sketch(y)>``
is an unbiased estimate of ``<x, y>``; the pieces average away most of the variance that a single
Kronecker sketch pays for coordinates sharing a row or a column (BENCHMARKS.md, "Kronecker sketch").

Piece k of an outer product u v^T is ``(C1_k u) (C2_k v)^T`` with C the signed 0/1 count-sketch matrices,
so the sketch of a per-example gradient ``sum_t u_t v_t^T`` is two small matmuls per token and one
[a, T] x [T, b] product per piece (``project_factors``): no [rows, cols] gradient is formed and nothing
is scattered. The block's layer norm comes from the token Gram matrices (`factored.squared_norms`).
A materialised block (``project_block``: exact-path tensors, norm weights, biases, the reference) is
scattered coordinate by coordinate into the same bins.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from rapidin_index.errors import SketchError
from rapidin_index.factored import (
    OuterFactors,
    _index_hash,
    _word,
    _word_after,
    batched_matmul,
    shared_example,
)
from rapidin_index.settings import SketchSettings

KRON_ALGORITHM = "rapidgrad-kron"

PIECE_SIDE = 16
"""Rows (and columns) a piece hashes a matrix into: pieces of 16 x 16 bins. On a fine-tuned 5.5M-parameter
Llama at K = 65536, Spearman against exact scores rose from 0.944 (one 53 x 53 piece per matrix) to
0.971 (8 pieces of 18 x 18) and 0.980 (16 of 13 x 13); BENCHMARKS.md, "Kronecker sketch"."""

# The signed count-sketch matrices of the factored path are kept up to this many float32 values in all
# (64 MB); past that they are rebuilt from the hashes for every call (one scatter of rows values each).
MATRIX_CACHE_LIMIT = 1 << 24

# A C1 too large to keep (``MATRIX_CACHE_LIMIT``) keeps its hashes instead, 1 or 2 bytes a row and piece,
# up to this many bytes in all (128 MB).
ROW_CODE_CACHE_LIMIT = 1 << 27
_CODE_CHUNK = 1 << 19  # (row, piece) pairs hashed at a time into the codes

# Materialised blocks are scattered this many coordinates at a time (their int64 bins are temporaries).
_SCATTER_CHUNK = 1 << 22


@dataclass(frozen=True)
class KronSegment:
    """Where one parameter tensor, seen as (rows, cols), lands: ``pieces`` sketches of a x b bins each."""

    offset: int
    """Its first coordinate in the flattened gradient."""
    rows: int
    cols: int
    start: int
    """Its first bin; the segment is ``width`` bins from there, modulo K."""
    row_bins: int
    col_bins: int
    pieces: int

    @property
    def end(self) -> int:
        return self.offset + self.rows * self.cols

    @property
    def width(self) -> int:
        return self.pieces * self.row_bins * self.col_bins


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a parameter tensor: a vector is one row; a higher tensor is [shape[0], rest]."""
    if len(shape) <= 1:
        return 1, int(math.prod(shape))
    return int(shape[0]), int(math.prod(shape[1:]))


def _budgets(sizes: list[int], sketch_dim: int) -> list[int]:
    """Bins per tensor: equal shares of K, where a tensor smaller than its share gets just its size and
    leaves the rest to the others (water-filling); at least one bin each."""
    budgets = [0] * len(sizes)
    remaining, left = sketch_dim, len(sizes)
    for number in sorted(range(len(sizes)), key=sizes.__getitem__):
        budgets[number] = min(sizes[number], max(1, remaining // left))
        remaining, left = max(0, remaining - budgets[number]), left - 1
    return budgets


def _piece_shape(rows: int, cols: int, budget: int) -> tuple[int, int, int]:
    """(a, b, pieces) for a (rows, cols) tensor given ``budget`` bins."""
    if rows * cols <= budget:
        return rows, cols, 1  # the whole tensor, unhashed
    if rows == 1:
        return 1, budget, 1  # a vector: one count sketch into its bins
    a = min(rows, PIECE_SIDE)
    b = min(cols, max(1, (PIECE_SIDE * PIECE_SIDE) // a))
    if a * b > budget:  # a small share: one piece as square as the share allows
        a = min(rows, max(1, math.isqrt(budget)))
        return a, min(cols, max(1, budget // a)), 1
    return a, b, budget // (a * b)


def kron_layout(
    shapes: list[tuple[int, tuple[int, ...]]], gradient_dim: int, sketch_dim: int
) -> list[KronSegment]:
    """The segments of (offset, shape) tensors covering [0, gradient_dim); gaps become vector tensors.

    Fixed by the shapes, offsets and K alone, so a query rebuilds the index's layout from its model.
    """
    tensors, position = [], 0
    for offset, shape in sorted(shapes):
        if offset < position:
            raise SketchError(f"parameter tensors overlap at coordinate {offset}")
        if offset > position:
            tensors.append((position, (offset - position,)))
        tensors.append((offset, shape))
        position = offset + int(math.prod(shape))
    if position > gradient_dim:
        raise SketchError(f"the parameter tensors end at {position}, past D = {gradient_dim}")
    if position < gradient_dim:
        tensors.append((position, (gradient_dim - position,)))
    matrices = [as_matrix(shape) for _, shape in tensors]
    budgets = _budgets([rows * cols for rows, cols in matrices], sketch_dim)
    segments, start = [], 0
    for (offset, _), (rows, cols), budget in zip(tensors, matrices, budgets, strict=True):
        a, b, pieces = _piece_shape(rows, cols, budget)
        segments.append(KronSegment(offset, rows, cols, start % sketch_dim, a, b, pieces))
        start += pieces * a * b
    return segments


def side_hash(seed: int, offset: int, side: int, piece: int, size: int, bins: int, device="cpu"):
    """(bins [size] int64 in [0, bins), signs [size] float32) of one side of one piece of a tensor.

    A side with as many bins as indices is the identity (unhashed), with hashed signs.
    """
    hashed, signs = side_hashes(seed, offset, side, 1, size, bins, device, first_piece=piece)
    return hashed[0], signs[0]


def side_hashes(
    seed: int,
    offset: int,
    side: int,
    pieces: int,
    size: int,
    bins: int,
    device="cpu",
    first_piece: int = 0,
    indices: torch.Tensor | None = None,
):
    """``side_hash`` of pieces first_piece, ..., first_piece + pieces - 1 at once: ([pieces, size] int64,
    [pieces, size] float32); the same bits, in a few tensor ops instead of a dozen per piece.

    ``indices`` (int64 [n], each in [0, size)) hashes those indices alone: ([pieces, n], [pieces, n]).
    """
    if indices is None:
        indices = torch.arange(size, dtype=torch.int64, device=device)
    indices = indices.to(device=device, dtype=torch.int64).expand(pieces, -1)
    numbers = range(first_piece, first_piece + pieces)

    prefix = _word(seed, offset, side)

    def keyed(role: int) -> torch.Tensor:  # one key a piece (a row): _word(seed, offset, side, piece, role)
        keys = [_word_after(prefix, piece, role) for piece in numbers]
        return _index_hash(indices, torch.tensor(keys, dtype=torch.int64, device=device)[:, None])

    hashed = indices.clone() if bins >= size else (keyed(0) * bins) >> 32
    signs = 1.0 - 2.0 * (keyed(1) & 1).to(torch.float32)
    return hashed, signs


# Side keys, apart from rapidgrad-ts's 1 and 2.
ROW_SIDE, COL_SIDE = 3, 4


class RapidGradKronProjector:
    """Fast rapidgrad-kron: ``project_block`` (materialised) and ``project_factors`` (factored) agree.

    ``blocks`` is the gradient's `capture.GradientBlock` list; without it the whole gradient is one
    vector tensor (one count sketch into K bins).
    """

    def __init__(
        self,
        settings: SketchSettings,
        gradient_dim: int,
        device: torch.device | str = "cpu",
        blocks: list | None = None,
    ) -> None:
        if settings.exact or settings.algorithm != KRON_ALGORITHM:
            raise SketchError(f"RapidGradKronProjector needs K > 0 and {KRON_ALGORITHM}, got {settings}")
        self.settings = settings
        self.gradient_dim = gradient_dim
        self.output_dim = settings.sketch_dim
        self.device = torch.device(device)
        shapes = [(block.offset, tuple(block.parameter.shape)) for block in blocks or []]
        self.segments = kron_layout(shapes, gradient_dim, settings.sketch_dim)
        self._by_offset = {segment.offset: segment for segment in self.segments}
        self._ends = [segment.end for segment in self.segments]  # ascending: segments tile [0, D)
        self._hashes: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self._matrices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._codes: dict[int, torch.Tensor] = {}  # large C1s' hashes, compact (``_row_codes``)

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.output_dim, dtype=torch.float32, device=self.device)

    def segment(self, offset: int) -> KronSegment:
        if offset not in self._by_offset:
            raise SketchError(f"no parameter tensor starts at offset {offset}")
        return self._by_offset[offset]

    def hashes(
        self, segment: KronSegment
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per piece: (h1 [rows], s1 [rows], h2 [cols], s2 [cols]); s1 carries the 1 / sqrt(pieces)."""
        if segment.offset not in self._hashes:
            seed, count, scale = self.settings.seed, segment.pieces, 1.0 / math.sqrt(segment.pieces)
            h1, s1 = side_hashes(
                seed, segment.offset, ROW_SIDE, count, segment.rows, segment.row_bins, self.device
            )
            h2, s2 = side_hashes(
                seed, segment.offset, COL_SIDE, count, segment.cols, segment.col_bins, self.device
            )
            self._hashes[segment.offset] = list(zip(h1, s1 * scale, h2, s2, strict=True))
        return self._hashes[segment.offset]

    def count_matrices(self, segment: KronSegment) -> tuple[torch.Tensor, torch.Tensor]:
        """(C1 [rows, pieces * a], C2 [cols, pieces * b]): every piece's signed count-sketch matrix."""
        if segment.offset in self._matrices:
            return self._matrices[segment.offset]
        left, right = self.side_matrix(segment, ROW_SIDE), self.side_matrix(segment, COL_SIDE)
        held = sum(m.numel() for pair in self._matrices.values() for m in pair)
        if held + left.numel() + right.numel() <= MATRIX_CACHE_LIMIT:
            self._matrices[segment.offset] = (left, right)
        return left, right

    def side_matrix(
        self, segment: KronSegment, side: int, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """C1 (``ROW_SIDE``) or C2 of ``count_matrices``, or just its rows ``indices``: [n, pieces * bins].

        Hashes only the rows asked for, so a 262,144-row embedding costs what its looked-up ids cost.
        """
        rows = side == ROW_SIDE
        size = segment.rows if rows else segment.cols
        bins = segment.row_bins if rows else segment.col_bins
        pieces = segment.pieces
        codes = self._row_codes(segment) if rows and self._large_rows(segment) else None
        if codes is not None:  # hashed once: h1 * 2 + (s1 < 0), [rows, pieces]
            chosen = (codes if indices is None else codes[indices.to(codes.device)]).T.long()  # [pieces, n]
            hashed, signs = chosen >> 1, 1.0 - 2.0 * (chosen & 1).to(torch.float32)
        else:
            hashed, signs = side_hashes(
                self.settings.seed, segment.offset, side, pieces, size, bins, self.device, indices=indices
            )  # [pieces, n] each
        if rows:
            signs = signs * (1.0 / math.sqrt(pieces))  # as ``hashes``: s1 carries 1 / sqrt(pieces)
        columns = hashed + torch.arange(pieces, device=self.device)[:, None] * bins  # [pieces, n]
        matrix = torch.zeros(hashed.shape[1], pieces * bins, device=self.device)
        return matrix.scatter_(1, columns.T.contiguous(), signs.T.contiguous())

    def _row_codes(self, segment: KronSegment) -> torch.Tensor | None:
        """[rows, pieces] int8 / int16 codes h1 * 2 + (s1 < 0) of a large C1, hashed once, a row range at a
        time (a 262,144-row embedding in 256 pieces: 67 MB, where hashing it costs seconds every batch);
        None past ``ROW_CODE_CACHE_LIMIT`` bytes."""
        if segment.offset in self._codes:
            return self._codes[segment.offset]
        dtype = torch.int8 if segment.row_bins < 64 else torch.int16 if segment.row_bins < 1 << 14 else None
        if dtype is None:
            return None
        size = segment.rows * segment.pieces * torch.tensor([], dtype=dtype).element_size()
        if size + sum(c.numel() * c.element_size() for c in self._codes.values()) > ROW_CODE_CACHE_LIMIT:
            return None
        codes = torch.empty(segment.rows, segment.pieces, dtype=dtype, device=self.device)
        step = max(1, _CODE_CHUNK // segment.pieces)  # the hashes' int64 temporaries stay small
        for first in range(0, segment.rows, step):
            last = min(segment.rows, first + step)
            indices = torch.arange(first, last, device=self.device)
            hashed, signs = side_hashes(
                self.settings.seed, segment.offset, ROW_SIDE, segment.pieces, segment.rows,
                segment.row_bins, self.device, indices=indices,
            )  # fmt: skip
            codes[first:last] = (hashed * 2 + (signs < 0)).T.to(dtype)
        self._codes[segment.offset] = codes
        return codes

    def _large_rows(self, segment: KronSegment) -> bool:
        """Whether C1 is too large to form whole (a vocabulary's rows times many pieces)."""
        return (
            segment.offset not in self._matrices
            and segment.rows * segment.pieces * segment.row_bins > MATRIX_CACHE_LIMIT
        )

    def _sketch_rows(self, segment: KronSegment, factor: OuterFactors, left: torch.Tensor | None):
        """[b, T, pieces * a]: every token's u_t times C1 (``left``, or C1 hashed a row range at a time)."""
        if factor.ids is not None:
            one = shared_example(factor.ids)
            ids = factor.ids if one is None else one
            if left is None:  # only the distinct looked-up rows of C1
                unique, inverse = torch.unique(ids, return_inverse=True)
                rows = self.side_matrix(segment, ROW_SIDE, unique)[inverse]
            else:
                rows = left[ids]
            return rows if one is None else rows.expand(len(factor.ids), -1, -1)
        if left is not None:
            return batched_matmul(factor.rows, left)  # [b, T, p * a]
        width = segment.pieces * segment.row_bins
        step = max(1, MATRIX_CACHE_LIMIT // (4 * width))
        total = None
        for first in range(0, segment.rows, step):
            last = min(segment.rows, first + step)
            part = self.side_matrix(segment, ROW_SIDE, torch.arange(first, last, device=self.device))
            product = batched_matmul(factor.rows[:, :, first:last], part)  # [b, T, p * a]
            total = product if total is None else total + product
        return total

    def project_factors(
        self, out: torch.Tensor, factors: list[OuterFactors], offset: int, scale: torch.Tensor | None = None
    ) -> None:
        """out: [batch, K] += scale[b] * sketch(sum of the factors' outer products) of the tensor at offset."""
        segment = self.segment(offset)
        if self._large_rows(segment):  # a large vocabulary: C1 by the rows the factors touch
            left, right = None, self.side_matrix(segment, COL_SIDE)
        else:
            left, right = self.count_matrices(segment)
        sketched_rows, sketched_cols = [], []
        for factor in factors:
            sketched_rows.append(self._sketch_rows(segment, factor, left))  # [b, T, p * a]
            sketched_cols.append(batched_matmul(factor.cols, right))  # [b, T, p * b]
        rows, cols = torch.cat(sketched_rows, dim=1), torch.cat(sketched_cols, dim=1)
        if scale is not None:
            cols = cols * scale[:, None, None]  # on the sketched side: p * b values a token, not cols
        batch, tokens = rows.shape[:2]
        a, b, pieces = segment.row_bins, segment.col_bins, segment.pieces
        rows = rows.view(batch, tokens, pieces, a).permute(0, 2, 3, 1).reshape(batch * pieces, a, tokens)
        cols = cols.view(batch, tokens, pieces, b).transpose(1, 2).reshape(batch * pieces, tokens, b)
        self._add_segment(out, torch.bmm(rows, cols).view(batch, -1), segment)  # [batch, p * a * b]

    def sketch_matrix(
        self, matrix: torch.Tensor, offset: int, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[batch, width] sketch of a materialised part of the 2-D tensor at ``offset``: ``matrix``
        [batch, n, cols] holds its rows ``rows`` (int64 [n]; default all), every other row is zero.

        The same sketch as ``project_block``, by two batched matmuls with the count-sketch matrices
        (C1^T M C2, piece by piece) instead of a scatter a coordinate and piece; add it with
        ``add_segment_sketch``. For an optimizer-scaled block (`optimizer_state.add_scaled_block`).
        """
        segment = self.segment(offset)
        if self._large_rows(segment):
            everything = torch.arange(segment.rows, device=self.device)
            left = self.side_matrix(segment, ROW_SIDE, everything if rows is None else rows)
            right = self.side_matrix(segment, COL_SIDE)
        else:
            left, right = self.count_matrices(segment)  # [rows, p * a], [cols, p * b]
            left = left if rows is None else left[rows.to(self.device)]
        batch, count, cols = matrix.shape
        a, b, pieces = segment.row_bins, segment.col_bins, segment.pieces
        if a * cols <= count * b:  # rows first: the smaller intermediate
            flat = matrix.float().permute(1, 0, 2).reshape(count, batch * cols)  # [n, batch * cols]
            reduced = (left.T @ flat).view(pieces, a, batch, cols).transpose(1, 2)  # [p, batch, a, cols]
            pieces_right = right.view(cols, pieces, b).transpose(0, 1)  # [p, cols, b]
            sketch = torch.bmm(reduced.reshape(pieces, batch * a, cols), pieces_right)  # [p, batch * a, b]
            return sketch.view(pieces, batch, a * b).transpose(0, 1).reshape(batch, -1)
        reduced = matrix.float().reshape(batch * count, cols) @ right  # [batch * n, p * b]
        reduced = reduced.view(batch, count, pieces, b).permute(2, 1, 0, 3).reshape(pieces, count, -1)
        left = left.view(count, pieces, a).permute(1, 2, 0)  # [p, a, n]
        sketch = torch.bmm(left, reduced).view(pieces, a, batch, b)  # [p, a, batch, b]
        return sketch.permute(2, 0, 1, 3).reshape(batch, -1)

    def add_segment_sketch(
        self, out: torch.Tensor, sketch: torch.Tensor, offset: int, scale: torch.Tensor | None = None
    ) -> None:
        """out: [batch, K] += scale[b] * sketch ([batch, width] of ``sketch_matrix``) in the tensor's bins."""
        self._add_segment(out, sketch if scale is None else sketch * scale[:, None], self.segment(offset))

    def _add_segment(self, out: torch.Tensor, sketch: torch.Tensor, segment: KronSegment) -> None:
        if segment.start + segment.width <= self.output_dim:
            out[:, segment.start : segment.start + segment.width] += sketch
            return
        bins = (segment.start + torch.arange(segment.width, device=out.device)) % self.output_dim
        out.index_add_(1, bins, sketch)  # only when K is smaller than the tensors need: the bins wrap

    def bins_and_signs(self, segment: KronSegment, piece: int, first: int, last: int):
        """(bins [n] int64, signs [n] float32) of the tensor's coordinates [first, last) in one piece."""
        h1, s1, h2, s2 = self.hashes(segment)[piece]
        local = torch.arange(first, last, dtype=torch.int64, device=self.device)
        row, col = local // segment.cols, local % segment.cols
        width = segment.row_bins * segment.col_bins
        bins = (segment.start + piece * width + h1[row] * segment.col_bins + h2[col]) % self.output_dim
        return bins, s1[row] * s2[col]

    def project_block(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        """out: [batch, K] += the sketch of ``block`` ([batch, n] at ``offset``), scattered piece by piece."""
        end = offset + block.shape[1]
        for segment in self.segments[bisect.bisect_right(self._ends, offset) :]:  # the first ending past it
            if segment.offset >= end:
                break
            first, last = max(offset, segment.offset), min(end, segment.end)
            for chunk in range(first, last, _SCATTER_CHUNK):
                stop = min(last, chunk + _SCATTER_CHUNK)
                values = block[:, chunk - offset : stop - offset].to(torch.float32)
                for piece in range(segment.pieces):
                    bins, signs = self.bins_and_signs(
                        segment, piece, chunk - segment.offset, stop - segment.offset
                    )
                    out.index_add_(1, bins, values * signs)
