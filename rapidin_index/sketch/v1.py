"""rapidgrad-v1, the paper's transform (SPEC 2.3), kept bit for bit so that indexes built with it keep
opening: ``lambda`` block shuffles (`shuffle_plan`: a row permutation of a [r, D/r] reshape, then a column
permutation of a [D/c, c] reshape), hashed signs, K equal bins; `RapidGradV1Projector` maps coordinates
through the shuffles on the fly, never holding an O(D) vector."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rapidin_index.errors import SketchError
from rapidin_index.settings import SketchSettings
from rapidin_index.sketch.hashed import DEFAULT_CACHE_LIMIT, HashedProjector
from rapidin_index.sketch.hashing import rademacher_signs

# Largest shuffle divisor: 40 permutations of at most 2^18 int32 entries are < 42 MB, where the
# reference code's sign vector alone is 2 * D bytes (13.5 GB at 7B).
MAX_DIVISOR = 1 << 18


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


class RapidGradV1Projector(HashedProjector):
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
            raise SketchError("RapidGradV1Projector needs K > 0; use ExactProjector for K = 0")
        if settings.algorithm != "rapidgrad-v1":
            raise SketchError(f"RapidGradV1Projector is rapidgrad-v1, got {settings.algorithm}")
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
