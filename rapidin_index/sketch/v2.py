"""rapidgrad-v2, the default flat sketch: a keyed pseudo-random permutation of the whole padded gradient
(`KeyedPermutation`, a Feistel network with cycle-walking), hashed signs, K equal bins; O(1) state."""

from __future__ import annotations

import math

import torch

from rapidin_index.errors import SketchError
from rapidin_index.settings import SketchSettings, resolve_algorithm
from rapidin_index.sketch.hashed import DEFAULT_CACHE_LIMIT, MAP_CHUNK, PERMUTE_CHUNK_CPU, HashedProjector
from rapidin_index.sketch.hashing import GOLDEN32, MASK32, mix32, rademacher_signs

# Feistel rounds of rapidgrad-v2 (changing it changes every v2 sketch: that would be a new algorithm name).
FEISTEL_ROUNDS = 6


# v2's Feistel halves stay below 2^31: a half xor a 32-bit key is a valid ``mix32`` input.
MAX_PERMUTATION_SIZE = 1 << 62


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
        seed_word = mix32((seed >> 32) & MASK32) ^ (seed & MASK32)
        counters = (seed_word + GOLDEN32 * torch.arange(1, rounds + 1, dtype=torch.int64)) & MASK32
        # two passes, so that the keys of nearby seeds and rounds share no structure
        self.keys = [int(key) for key in mix32(mix32(counters) ^ 0x5BD1E995).tolist()]

    def network(self, values: torch.Tensor) -> torch.Tensor:
        """One pass of the Feistel network over int64 values in [0, a^2)."""
        side = self.side
        left = torch.div(values, side, rounding_mode="floor")
        right = values - left * side
        for key in self.keys:
            shift = (mix32(right ^ key) * side) >> 32  # [0, a): a 32-bit hash times a < 2^31 is < 2^63
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
        step = PERMUTE_CHUNK_CPU if self.device.type == "cpu" else MAP_CHUNK
        for chunk_start in range(0, length, step):
            chunk_end = min(length, chunk_start + step)
            positions = self.final_positions(start + chunk_start, chunk_end - chunk_start)
            bins[chunk_start:chunk_end] = positions // self.bin_width
            signs[chunk_start:chunk_end] = rademacher_signs(positions, self.settings.seed)
        return bins, signs
