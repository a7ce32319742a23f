"""rapidgrad-v1 and rapidgrad-v2: the count sketches of a flattened gradient, and their hashing.

Both are a signed permutation of the gradient, zero-padded to ``padded_dim`` (the next multiple of K),
followed by sums over K equal bins of ``padded_dim / K`` consecutive positions (see `sketch` for the
overview). Here are the pieces: the keyed Feistel permutation of v2 (`KeyedPermutation`), v1's block
shuffle plan (`shuffle_plan`), the counter-based signs (`rademacher_signs`), and the fast projectors
(`RapidGradV2Projector`, `RapidGradProjector`) that map each coordinate to its bin and sign on the fly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rapidin_index.errors import SketchError
from rapidin_index.settings import MAPPING_CACHE_LIMIT, SketchSettings, resolve_algorithm

_MASK32 = 0xFFFFFFFF


# Below this many coordinates the projector caches each block's bins and signs (5 bytes a coordinate).
DEFAULT_CACHE_LIMIT = MAPPING_CACHE_LIMIT


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


def _mix32(values: torch.Tensor | int) -> torch.Tensor | int:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32), or on one Python int
    there (the same bits: Python's product is exact, the tensor's wraps mod 2^64 above the kept 32)."""
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
        seed_word = _mix32((seed >> 32) & _MASK32) ^ (seed & _MASK32)
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


class HashedProjector:
    """What the hashing projectors share: dimensions, the (bin, sign) cache, ``project_block``.

    A subclass maps coordinates in ``_map_bins_and_signs(start, length)``; ``bins_and_signs`` caches
    each block's result (5 bytes a coordinate) while the padded gradient is at most ``cache_limit``.
    """

    def __init__(
        self, settings: SketchSettings, gradient_dim: int, device: torch.device | str, cache_limit: int
    ) -> None:
        self.settings = settings
        self.gradient_dim = gradient_dim
        self.padded_dim = padded_dim(gradient_dim, settings.sketch_dim)
        self.bin_width = self.padded_dim // settings.sketch_dim
        self.device = torch.device(device)
        self.output_dim = settings.sketch_dim
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if self.padded_dim <= cache_limit else None
        )

    def bins_and_signs(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin [n] int32, sign [n] int8) of coordinates [start, start + length) of the gradient."""
        key = (start, length)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        bins, signs = self._map_bins_and_signs(start, length)
        if self._cache is not None:
            self._cache[key] = (bins, signs)
        return bins, signs

    def _map_bins_and_signs(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def project_block(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        """out: [batch, K] float32, updated in place; block: [batch, n] at ``offset`` in the gradient."""
        _add_signed_bins(out, block, offset, self.bins_and_signs)

    def coordinate_bins_and_signs(self, coordinates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bins int64, signs float32) of any int64 coordinates of the gradient: the bits of
        ``bins_and_signs`` at those coordinates, computed for them alone."""
        flat = coordinates.reshape(-1)
        bins = torch.empty_like(flat)
        signs = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        step = _PERMUTE_CHUNK_CPU if self.device.type == "cpu" else _MAP_CHUNK
        for first in range(0, flat.numel(), step):
            positions = self.map_positions(flat[first : first + step])
            bins[first : first + step] = positions // self.bin_width
            signs[first : first + step] = rademacher_signs(positions, self.settings.seed)
        return bins.view(coordinates.shape), signs.view(coordinates.shape)

    def project_rows(self, out: torch.Tensor, ids: torch.Tensor, cols: torch.Tensor, offset: int) -> None:
        """out: [batch, K] += the sketch of an embedding's gradient given by its looked-up rows: token t's
        ``cols[:, t]`` ([batch, T, C]) added to row ``ids[:, t]`` of the [vocab, C] block at ``offset``.

        Only the coordinates of the distinct ids are hashed (never vocab x C of them), and every token is
        scattered into its bins as the materialised block's coordinates would be: the same sketch.
        """
        width = cols.shape[-1]
        unique, inverse = torch.unique(ids, return_inverse=True)  # [U], [batch, T]
        columns = torch.arange(width, device=ids.device)
        bins, signs = self.coordinate_bins_and_signs(offset + unique[:, None] * width + columns)  # [U, C]
        batch, sketch_dim = out.shape
        target = bins[inverse] + torch.arange(batch, device=out.device)[:, None, None] * sketch_dim
        values = cols.float() * signs[inverse]  # [batch, T, C]
        out.view(-1).index_add_(0, target.reshape(-1), values.reshape(-1))

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.output_dim, dtype=torch.float32, device=self.device)


class RapidGradV2Projector(HashedProjector):
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
        settings = resolve_algorithm(settings, [])  # 'auto' without blocks is rapidgrad-v2
        if settings.exact or settings.algorithm != "rapidgrad-v2":
            raise SketchError(f"RapidGradV2Projector needs K > 0 and rapidgrad-v2, got {settings}")
        super().__init__(settings, gradient_dim, device, cache_limit)
        self.permutation = KeyedPermutation(self.padded_dim, settings.seed)

    def map_positions(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Final positions (int64) of int64 coordinates of the padded gradient."""
        return self.permutation(coordinates)

    def final_positions(self, start: int, length: int) -> torch.Tensor:
        """Where coordinates [start, start + length) of the padded gradient land."""
        return self.map_positions(torch.arange(start, start + length, dtype=torch.int64, device=self.device))

    def _map_bins_and_signs(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        bins = torch.empty(length, dtype=torch.int32, device=self.device)
        signs = torch.empty(length, dtype=torch.int8, device=self.device)
        # the Feistel rounds make ~100 passes over their int64 temporaries: keep them in a CPU's cache
        step = _PERMUTE_CHUNK_CPU if self.device.type == "cpu" else _MAP_CHUNK
        for chunk_start in range(0, length, step):
            chunk_end = min(length, chunk_start + step)
            positions = self.final_positions(start + chunk_start, chunk_end - chunk_start)
            bins[chunk_start:chunk_end] = positions // self.bin_width
            signs[chunk_start:chunk_end] = rademacher_signs(positions, self.settings.seed)
        return bins, signs


class RapidGradProjector(HashedProjector):
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
        super().__init__(settings, gradient_dim, device, cache_limit)
        # Forward maps (old index -> new index) of each step: the inverse of ``x[permutation]``.
        self._steps = [
            (
                step.axis,
                step.divisor,
                torch.as_tensor(np.argsort(step.permutation).astype(np.int32), device=self.device),
            )
            for step in shuffle_plan(self.padded_dim, settings.shuffle_lambda, settings.seed)
        ]

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

    def _map_bins_and_signs(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.final_positions(start, length)
        bins = (positions // self.bin_width).to(torch.int32)
        signs = rademacher_signs(positions, self.settings.seed).to(torch.int8)
        return bins, signs
