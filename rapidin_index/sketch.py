"""RapidGrad: compress a layer-normalised gradient of length D to a sketch of length K.

Both transforms are a signed permutation of the gradient, zero-padded to ``padded_dim`` (the next multiple
of K), followed by sums over K equal bins of ``padded_dim / K`` consecutive positions: a count sketch in
which every bin receives exactly ``padded_dim / K`` coordinates, so ``<sketch(x), sketch(y)>`` is an
unbiased estimate of ``<x, y>``. The sign of a coordinate is a counter-based hash of (seed, its final
position), so no sign vector is stored. They differ in the permutation (the manifest names the one used):

* ``rapidgrad-v2`` (the default of ``SketchSettings``; a build's "auto" picks it except for full-parameter
  models at K >= 65536) is a keyed pseudo-random permutation of the whole of [0, padded_dim): an
  unbalanced Feistel network on the smallest enclosing power of two, ``FEISTEL_ROUNDS`` rounds whose round
  function is murmur3's finaliser keyed by (seed, round), with cycle-walking back into [0, padded_dim). It
  is fixed by (seed, D, K); its whole state is the round keys, so a worker keeps O(1) memory at any D.
* ``rapidgrad-v1`` is the paper's transform (SPEC 2.3, after Lin et al. 2024), fixed by (seed, D, K,
  lambda): ``lambda`` random shuffles, each a row permutation of a ``[r, padded_dim / r]`` reshape followed
  by a column permutation of a ``[padded_dim / c, c]`` reshape, r and c random divisors of ``padded_dim``
  (a product of a random subset of its prime factors, as in the reference code, capped at 2^18 so that no
  permutation is large). It mixes poorly at 7B scale (benchmarks/sketch_mixing.py: adjacent coordinates
  often share a bin); it is kept, bit for bit, so that indexes built with it keep opening.
* ``rapidgrad-ts`` (:class:`RapidGradTSProjector`; the math on factors is :mod:`rapidin_index.factored`)
  hashes each 2-D parameter tensor with a tensor-product
  count sketch, bin (h1(i) + h2(j)) mod K and sign s1(i) s2(j), so that a linear layer's per-example
  gradient (a sum of outer products) is sketched from its factors by FFT, never materialised; every other
  coordinate is hashed as rapidgrad-v2 hashes it. Its bins are not equal-sized (a plain count sketch).

Two implementations of each live here:

* :func:`reference_sketch` does the transform literally, with an explicit permutation and sign vector
  (O(D) memory). It is slow and obviously correct; tests compare the fast path against it.
* :class:`RapidGradV2Projector` and :class:`RapidGradProjector` (v1) map each source coordinate to its
  bin and sign on the fly, with vectorised integer ops on whole coordinate ranges (v1's shuffle plan is
  ``2 * lambda`` small permutations of about sqrt(D) entries). Gradient blocks are projected one parameter
  tensor at a time, at their offset in the flattened gradient, without ever concatenating them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rapidin_index.errors import SketchError
from rapidin_index.factored import OuterFactors, fft_is_cheaper, squared_norms
from rapidin_index.settings import AUTO_ALGORITHM, SketchSettings

_MASK32 = 0xFFFFFFFF
# Below this many coordinates the projector caches each block's bins and signs (5 bytes a coordinate).
DEFAULT_CACHE_LIMIT = 1 << 24
# Coordinates mapped at a time, to bound the int64 temporaries of a huge block.
_MAP_CHUNK = 1 << 22
# rapidgrad-v2 permutes this many coordinates at a time on a CPU (3.5x faster than 2^22 at a time).
_PERMUTE_CHUNK_CPU = 1 << 16
# Largest shuffle divisor: 40 permutations of at most 2^18 int32 entries are < 42 MB, where the
# reference code's sign vector alone is 2 * D bytes (13.5 GB at 7B).
MAX_DIVISOR = 1 << 18
# Feistel rounds of rapidgrad-v2 (changing it changes every v2 sketch: that would be a new algorithm name).
FEISTEL_ROUNDS = 6
# v2's Feistel halves stay below 2^31: a half xor a 32-bit key is a valid ``_mix32`` input.
MAX_PERMUTATION_SIZE = 1 << 62
_GOLDEN32 = 0x9E3779B9


def padded_dim(gradient_dim: int, sketch_dim: int) -> int:
    """D rounded up to a multiple of K."""
    return -(-gradient_dim // sketch_dim) * sketch_dim


def prime_factors(n: int) -> list[int]:
    """Prime factors of n with multiplicity, ascending (trial division; n is at most ~1e11 here)."""
    factors, divisor = [], 2
    while divisor * divisor <= n:
        while n % divisor == 0:
            factors.append(divisor)
            n //= divisor
        divisor += 1
    if n > 1:
        factors.append(n)
    return factors


@dataclass(frozen=True)
class ShuffleStep:
    axis: (
        str  # "row": permute rows of [divisor, D/divisor]; "column": permute columns of [D/divisor, divisor]
    )
    divisor: int
    permutation: np.ndarray  # new index -> old index, as in ``x[permutation]``


def shuffle_plan(total_dim: int, shuffle_lambda: int, seed: int) -> list[ShuffleStep]:
    """The 2 * lambda permutation steps of rapidgrad-v1 for a padded vector of length ``total_dim``.

    numpy's legacy RandomState is used because its stream is frozen across numpy versions, so an index
    built today can be queried with tomorrow's numpy.
    """
    random_state = np.random.RandomState(seed)
    factors = prime_factors(total_dim)
    steps = []
    for step in range(2 * shuffle_lambda):
        count = random_state.randint(len(factors) // 4, len(factors) // 2 + 1)
        random_state.shuffle(factors)
        divisor = 1
        for factor in factors[:count]:
            if divisor * factor <= MAX_DIVISOR:  # keeps every permutation small at 7B scale
                divisor *= factor
        axis = "row" if step % 2 == 0 else "column"
        steps.append(ShuffleStep(axis, divisor, random_state.permutation(divisor)))
    return steps


def _mix32(values: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    values = values ^ (values >> 16)
    values = (values * 0x85EBCA6B) & _MASK32  # wraps mod 2^64; the low 32 bits are exact
    values = values ^ (values >> 13)
    values = (values * 0xC2B2AE35) & _MASK32
    return values ^ (values >> 16)


def rademacher_signs(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """+1/-1 for each (final) position, a pure function of (seed, position): no sign vector is stored."""
    high = _mix32(((positions >> 32) ^ (seed & _MASK32)) & _MASK32)
    hashed = _mix32((positions & _MASK32) ^ high)
    return 1.0 - 2.0 * (hashed & 1).to(torch.float32)


class KeyedPermutation:
    """rapidgrad-v2's bijection of [0, size), a pure function of (seed, size); its state is the round keys.

    A balanced Feistel network on Z_a x Z_a with modular addition (Black and Rogaway's FE2, "Ciphers with
    arbitrary finite domains", 2002), a = ceil(sqrt(size)): a value x = left * a + right goes through
    ``rounds`` rounds (left, right) -> (right, (left + F(right)) mod a), F(right) = murmur3's finaliser of
    right xor the round key, scaled into [0, a). Each round is invertible, so the network is a bijection
    of [0, a^2). Values that land in [size, a^2) are mapped again (cycle-walking) until they land in
    [0, size), which restricts it to a bijection of [0, size); as a^2 - size < 2a, only about one value in
    a / 2 walks (one in 40,000 at 7B), so the walking loop sees a handful of values per block.
    """

    def __init__(self, size: int, seed: int, rounds: int = FEISTEL_ROUNDS) -> None:
        if not 1 <= size <= MAX_PERMUTATION_SIZE:
            raise SketchError(f"rapidgrad-v2 permutes 1 .. 2^62 coordinates, got {size}")
        self.size = size
        self.side = max(2, math.isqrt(size - 1) + 1)  # a: a^2 >= size, a < 2^31
        seed_word = _mix32(torch.tensor([(seed >> 32) & _MASK32]))[0].item() ^ (seed & _MASK32)
        counters = (seed_word + _GOLDEN32 * torch.arange(1, rounds + 1, dtype=torch.int64)) & _MASK32
        # two passes, so that the keys of nearby seeds and rounds share no structure
        self.keys = [int(key) for key in _mix32(_mix32(counters) ^ 0x5BD1E995).tolist()]

    def network(self, values: torch.Tensor) -> torch.Tensor:
        """One pass of the Feistel network over int64 values in [0, a^2)."""
        side = self.side
        left = torch.div(values, side, rounding_mode="floor")
        right = values - left * side
        for key in self.keys:
            shift = (_mix32(right ^ key) * side) >> 32  # [0, a): a 32-bit hash times a < 2^31 is < 2^63
            total = left + shift
            left, right = right, total - (total >= side) * side
        return left * side + right

    def __call__(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Positions (int64) of int64 ``coordinates`` in [0, size); same shape and device."""
        positions = self.network(coordinates.reshape(-1))
        walking = (positions >= self.size).nonzero().squeeze(1)
        while walking.numel():  # only the still-outside values are walked
            walked = self.network(positions[walking])
            positions[walking] = walked
            walking = walking[walked >= self.size]
        return positions.reshape(coordinates.shape)


def reference_sketch(
    vectors: torch.Tensor, settings: SketchSettings, blocks: list | None = None
) -> torch.Tensor:
    """The slow, literal RapidGrad of ``settings.algorithm``: explicit padding, permutation, signs, bins.

    vectors: [batch, D] (or [D]); returns [batch, K] float32. O(D) memory; for tests and benchmarks.
    ``blocks`` (the gradient's block list) matters to rapidgrad-ts only, which hashes 2-D blocks by shape.
    """
    squeeze = vectors.dim() == 1
    vectors = torch.atleast_2d(vectors).to(torch.float32)
    if settings.exact:
        return vectors[0] if squeeze else vectors
    batch, gradient_dim = vectors.shape
    total = padded_dim(gradient_dim, settings.sketch_dim)
    padded = torch.nn.functional.pad(vectors, (0, total - gradient_dim))  # [batch, total]
    if settings.algorithm == "rapidgrad-ts":
        return _reference_ts(vectors, settings, blocks, total, squeeze)
    if settings.algorithm == "rapidgrad-v1":
        shuffled = _reference_v1_shuffle(padded, settings)
    else:
        permutation = KeyedPermutation(total, settings.seed)(torch.arange(total))  # coordinate -> position
        assert torch.equal(torch.sort(permutation).values, torch.arange(total)), "not a permutation"
        shuffled = torch.zeros_like(padded)
        shuffled[:, permutation] = padded
    signs = rademacher_signs(torch.arange(total, dtype=torch.int64), settings.seed)  # [total]
    sketched = (shuffled * signs).reshape(batch, settings.sketch_dim, -1).sum(dim=2)  # [batch, K]
    return sketched[0] if squeeze else sketched


def _reference_ts(vectors, settings: SketchSettings, blocks, total: int, squeeze: bool) -> torch.Tensor:
    """rapidgrad-ts literally: v2's bin and sign per flat coordinate, the outer-sum hash on 2-D blocks."""
    batch, gradient_dim = vectors.shape
    positions = KeyedPermutation(total, settings.seed)(torch.arange(total))[:gradient_dim]
    bins = positions // (total // settings.sketch_dim)  # [D]
    signs = rademacher_signs(positions, settings.seed)  # [D]
    for matrix in matrix_blocks(blocks):
        h1, s1, h2, s2 = matrix_hash(
            settings.seed, matrix.offset, matrix.rows, matrix.cols, settings.sketch_dim
        )
        bins[matrix.offset : matrix.end] = ((h1[:, None] + h2[None, :]) % settings.sketch_dim).reshape(-1)
        signs[matrix.offset : matrix.end] = (s1[:, None] * s2[None, :]).reshape(-1)
    sketched = torch.zeros(batch, settings.sketch_dim).index_add_(1, bins, vectors * signs)  # [batch, K]
    return sketched[0] if squeeze else sketched


def _reference_v1_shuffle(padded: torch.Tensor, settings: SketchSettings) -> torch.Tensor:
    """rapidgrad-v1's lambda reshape-permutations of [batch, total], literally."""
    batch, total = padded.shape
    shuffled = padded
    for step in shuffle_plan(total, settings.shuffle_lambda, settings.seed):
        permutation = torch.as_tensor(step.permutation)
        if step.axis == "row":
            shuffled = shuffled.reshape(batch, step.divisor, -1)[:, permutation, :]
        else:
            shuffled = shuffled.reshape(batch, -1, step.divisor)[:, :, permutation]
        shuffled = shuffled.reshape(batch, total)
    return shuffled


BinsAndSigns = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def _add_signed_bins(
    out: torch.Tensor, block: torch.Tensor, offset: int, bins_and_signs: BinsAndSigns
) -> None:
    """out: [batch, K] += the signed, binned ``block`` ([batch, n] at ``offset``), chunk by chunk."""
    length = block.shape[1]
    for chunk_start in range(0, length, _MAP_CHUNK):
        chunk_length = min(_MAP_CHUNK, length - chunk_start)
        bins, signs = bins_and_signs(offset + chunk_start, chunk_length)
        chunk = block[:, chunk_start : chunk_start + chunk_length].to(torch.float32)
        # widen the compact cache entries first: mixed-dtype index_add is ~5x slower
        out.index_add_(1, bins.long(), chunk * signs.to(chunk.dtype))  # [batch, n] into [batch, K]


class RapidGradV2Projector:
    """Fast rapidgrad-v2: projects gradient blocks into a [batch, K] sketch with O(1) state.

    ``project_block(out, block, offset)`` adds the sketch of ``block`` (a [batch, n] slice of the flattened
    gradient starting at ``offset``) into ``out``; projecting every block of a gradient gives exactly
    ``reference_sketch`` of the whole, up to float summation order. Below ``cache_limit`` padded
    coordinates each block's bins and signs are cached (5 bytes a coordinate); above, nothing is.
    """

    def __init__(
        self,
        settings: SketchSettings,
        gradient_dim: int,
        device: torch.device | str = "cpu",
        cache_limit: int = DEFAULT_CACHE_LIMIT,
    ) -> None:
        if settings.exact or settings.algorithm != "rapidgrad-v2":
            raise SketchError(f"RapidGradV2Projector needs K > 0 and rapidgrad-v2, got {settings}")
        self.settings = settings
        self.gradient_dim = gradient_dim
        self.padded_dim = padded_dim(gradient_dim, settings.sketch_dim)
        self.bin_width = self.padded_dim // settings.sketch_dim
        self.device = torch.device(device)
        self.output_dim = settings.sketch_dim
        self.permutation = KeyedPermutation(self.padded_dim, settings.seed)
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if self.padded_dim <= cache_limit else None
        )

    def map_positions(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Final positions (int64) of int64 coordinates of the padded gradient."""
        return self.permutation(coordinates)

    def final_positions(self, start: int, length: int) -> torch.Tensor:
        """Where coordinates [start, start + length) of the padded gradient land."""
        return self.map_positions(torch.arange(start, start + length, dtype=torch.int64, device=self.device))

    def bins_and_signs(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin [n] int32, sign [n] int8) of coordinates [start, start + length)."""
        key = (start, length)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        bins = torch.empty(length, dtype=torch.int32, device=self.device)
        signs = torch.empty(length, dtype=torch.int8, device=self.device)
        # the Feistel rounds make ~100 passes over their int64 temporaries: keep them in a CPU's cache
        step = _PERMUTE_CHUNK_CPU if self.device.type == "cpu" else _MAP_CHUNK
        for chunk_start in range(0, length, step):
            chunk_end = min(length, chunk_start + step)
            positions = self.final_positions(start + chunk_start, chunk_end - chunk_start)
            bins[chunk_start:chunk_end] = positions // self.bin_width
            signs[chunk_start:chunk_end] = rademacher_signs(positions, self.settings.seed)
        if self._cache is not None:
            self._cache[key] = (bins, signs)
        return bins, signs

    def project_block(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        """out: [batch, K] float32, updated in place; block: [batch, n] at ``offset`` in the gradient."""
        _add_signed_bins(out, block, offset, self.bins_and_signs)

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.output_dim, dtype=torch.float32, device=self.device)


class RapidGradProjector:
    """Fast rapidgrad-v1: projects gradient blocks into a [batch, K] sketch without O(D) state.

    ``project_block(out, block, offset)`` adds the sketch of ``block`` (a [batch, n] slice of the flattened
    gradient starting at ``offset``) into ``out``; projecting every block of a gradient gives exactly
    ``reference_sketch`` of the whole, up to float summation order.
    """

    def __init__(
        self,
        settings: SketchSettings,
        gradient_dim: int,
        device: torch.device | str = "cpu",
        cache_limit: int = DEFAULT_CACHE_LIMIT,
    ) -> None:
        if settings.exact:
            raise SketchError("RapidGradProjector needs K > 0; use ExactProjector for K = 0")
        if settings.algorithm != "rapidgrad-v1":
            raise SketchError(f"RapidGradProjector is rapidgrad-v1, got {settings.algorithm}")
        self.settings = settings
        self.gradient_dim = gradient_dim
        self.padded_dim = padded_dim(gradient_dim, settings.sketch_dim)
        self.bin_width = self.padded_dim // settings.sketch_dim
        self.device = torch.device(device)
        self.output_dim = settings.sketch_dim
        # Forward maps (old index -> new index) of each step: the inverse of ``x[permutation]``.
        self._steps = [
            (
                step.axis,
                step.divisor,
                torch.as_tensor(np.argsort(step.permutation).astype(np.int32), device=self.device),
            )
            for step in shuffle_plan(self.padded_dim, settings.shuffle_lambda, settings.seed)
        ]
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if self.padded_dim <= cache_limit else None
        )

    def map_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Where int64 coordinates of the padded gradient land after all shuffles."""
        for axis, divisor, forward in self._steps:
            if axis == "row":
                width = self.padded_dim // divisor
                rows = positions // width
                positions = forward[rows].long() * width + (positions - rows * width)
            else:
                columns = positions % divisor
                positions = positions - columns + forward[columns].long()
        return positions

    def final_positions(self, start: int, length: int) -> torch.Tensor:
        """Where coordinates [start, start + length) of the padded gradient land after all shuffles."""
        return self.map_positions(torch.arange(start, start + length, dtype=torch.int64, device=self.device))

    def bins_and_signs(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin [n] int32, sign [n] int8) of coordinates [start, start + length): 5 bytes a coordinate."""
        key = (start, length)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        positions = self.final_positions(start, length)
        bins = (positions // self.bin_width).to(torch.int32)
        signs = rademacher_signs(positions, self.settings.seed).to(torch.int8)
        if self._cache is not None:
            self._cache[key] = (bins, signs)
        return bins, signs

    def project_block(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        """out: [batch, K] float32, updated in place; block: [batch, n] at ``offset`` in the gradient."""
        _add_signed_bins(out, block, offset, self.bins_and_signs)

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.output_dim, dtype=torch.float32, device=self.device)


# --------------------------------------------------------------------------- rapidgrad-ts

TS_ALGORITHM = "rapidgrad-ts"
# Bound on batch x tokens x K float32 values held by one FFT step of rapidgrad-ts (64 MB).
_FFT_ELEMENTS = 1 << 24
# Matrix blocks up to this many coordinates keep their int64 bins (8 bytes a coordinate) for project_dense.
_BINS_CACHE_LIMIT = 1 << 24
TS_METHODS = ("auto", "fft", "dense")


def _word(*values: int) -> int:
    """A 32-bit hash of a tuple of Python integers (any size), via murmur3's finaliser."""
    state = 0x2545F491
    for value in values:
        for shift in (0, 32):
            word = ((value >> shift) & _MASK32) ^ ((state * _GOLDEN32) & _MASK32)
            state = int(_mix32(_mix32(torch.tensor([word])) ^ 0x5BD1E995)[0])
    return state


def _index_hash(indices: torch.Tensor, key: int) -> torch.Tensor:
    """A 32-bit hash (int64 in [0, 2^32)) of int64 indices in [0, 2^32), keyed."""
    return _mix32(_mix32((indices ^ key) & _MASK32) ^ ((key * _GOLDEN32) & _MASK32))


def matrix_hash(
    seed: int, offset: int, rows: int, cols: int, sketch_dim: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h1 [rows] int64, s1 [rows] float32, h2 [cols], s2 [cols]) of the 2-D block at ``offset``."""
    result = []
    for role, size in ((1, rows), (2, cols)):
        indices = torch.arange(size, dtype=torch.int64, device=device)
        bins = (_index_hash(indices, _word(seed, offset, role, 0)) * sketch_dim) >> 32  # [0, K)
        signs = 1.0 - 2.0 * (_index_hash(indices, _word(seed, offset, role, 1)) & 1).to(torch.float32)
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
    """The 2-D parameter tensors of a ``gradients.GradientBlock`` list, as (offset, rows, cols)."""
    found = []
    for block in blocks or []:
        shape = tuple(block.parameter.shape)
        if len(shape) == 2:
            found.append(MatrixBlock(block.offset, shape[0], shape[1]))
    return sorted(found, key=lambda matrix: matrix.offset)


class RapidGradTSProjector:
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
        self.settings = settings
        self.gradient_dim = gradient_dim
        self.padded_dim = padded_dim(gradient_dim, settings.sketch_dim)
        self.device = torch.device(device)
        self.output_dim = settings.sketch_dim
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
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if self.padded_dim <= cache_limit else None
        )

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

    def bins_and_signs(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin [n] int32, sign [n] int8) of coordinates [start, start + length) of the gradient."""
        key = (start, length)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
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
            bins[position - start : stop - start] = (h1[row] + h2[col]) % self.output_dim
            signs[position - start : stop - start] = s1[row] * s2[col]
            position = stop
        if position < end:
            self._flat_segment(bins, signs, start, position, end)
        if self._cache is not None:
            self._cache[key] = (bins, signs)
        return bins, signs

    def _flat_segment(self, bins, signs, start: int, first: int, stop: int) -> None:
        flat_bins, flat_signs = self.flat.bins_and_signs(first, stop - first)
        bins[first - start : stop - start] = flat_bins
        signs[first - start : stop - start] = flat_signs

    def project_block(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        """out: [batch, K] float32, updated in place; block: [batch, n] at ``offset`` in the gradient."""
        _add_signed_bins(out, block, offset, self.bins_and_signs)

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
        bins = ((h1[:, None] + h2[None, :]) % self.output_dim).reshape(-1)
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
        bins = (h1[ids][:, :, None] + h2) % sketch_dim  # [batch, T, C]
        bins = bins + torch.arange(batch, device=out.device)[:, None, None] * sketch_dim
        values = cols.float() * (s1[ids][:, :, None] * s2)  # [batch, T, C]
        flat = out.view(-1)  # [batch * K]: every example scatters into its own row
        flat.index_add_(0, bins.reshape(-1), values.reshape(-1))

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.output_dim, dtype=torch.float32, device=self.device)


class ExactProjector:
    """K = 0: the "sketch" is the normalised gradient itself, so scores are exact (for small models)."""

    def __init__(self, gradient_dim: int, device: torch.device | str = "cpu") -> None:
        self.gradient_dim = gradient_dim
        self.output_dim = gradient_dim
        self.device = torch.device(device)

    def project_block(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        out[:, offset : offset + block.shape[1]] += block.to(torch.float32)

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.output_dim, dtype=torch.float32, device=self.device)


def make_projector(
    settings: SketchSettings,
    gradient_dim: int,
    device: torch.device | str = "cpu",
    blocks: list | None = None,
) -> RapidGradV2Projector | RapidGradProjector | ExactProjector:
    """The projector of ``settings``: exact (K = 0), rapidgrad-v2, rapidgrad-v1 or rapidgrad-ts.

    ``blocks`` (the `gradients.GradientBlock` list, in order) is for algorithms that hash by a block's
    shape rather than by flat position (rapidgrad-ts); the flat ones ignore it.
    """
    if settings.algorithm == AUTO_ALGORITHM:
        raise SketchError("sketch algorithm 'auto' must be resolved first (settings.resolve_algorithm)")
    if settings.exact:
        return ExactProjector(gradient_dim, device)
    if settings.algorithm == "rapidgrad-ts":
        return RapidGradTSProjector(settings, gradient_dim, device, blocks=blocks)
    if settings.algorithm == "rapidgrad-v1":
        return RapidGradProjector(settings, gradient_dim, device)
    return RapidGradV2Projector(settings, gradient_dim, device)
