"""RapidGrad: compress a layer-normalised gradient of length D to a sketch of length K.

The transform (SPEC 2.3, after Lin et al. 2024) is fixed by (seed, D, K, lambda):

1. zero-pad the gradient to ``padded_dim``, the next multiple of K;
2. apply ``lambda`` random shuffles; each is a row permutation of a ``[r, padded_dim / r]`` reshape followed
   by a column permutation of a ``[padded_dim / c, c]`` reshape, r and c random divisors of ``padded_dim``
   (a product of a random subset of its prime factors, as in the reference code, capped at 2^18 so that
   no permutation is large);
3. multiply by a Rademacher (+1/-1) vector;
4. sum consecutive bins of ``padded_dim / K`` values.

Steps 2-4 are a signed permutation followed by binning, i.e. a count sketch in which every bin receives
exactly ``padded_dim / K`` coordinates. So ``<sketch(x), sketch(y)>`` is an unbiased estimate of ``<x, y>``.

Two implementations live here:

* :func:`reference_sketch` does literally the four steps with explicit permutation and sign vectors (O(D)
  memory). It is slow and obviously correct; tests compare the fast path against it.
* :class:`RapidGradProjector` maps each source coordinate to its bin and sign on the fly: the shuffle
  plan is ``lambda`` pairs of small permutations (sizes r and c, about sqrt(D)), and the signs come from a
  counter-based hash of the final position, so no O(D) state is kept. Gradient blocks are projected one
  parameter tensor at a time, at their offset in the flattened gradient, without ever concatenating them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

SKETCH_ALGORITHM = "rapidgrad-v1"
_MASK32 = 0xFFFFFFFF
# Below this many coordinates the projector caches each block's bins and signs (5 bytes a coordinate).
DEFAULT_CACHE_LIMIT = 1 << 24
# Coordinates mapped at a time, to bound the int64 temporaries of a huge block.
_MAP_CHUNK = 1 << 22
# Largest shuffle divisor: 40 permutations of at most 2^18 int32 entries are < 42 MB, where the
# reference code's sign vector alone is 2 * D bytes (13.5 GB at 7B).
MAX_DIVISOR = 1 << 18


class SketchError(ValueError):
    """Sketch settings that cannot work (K < 0, lambda < 0, ...)."""


@dataclass(frozen=True)
class SketchSettings:
    """How gradients are compressed. Recorded in the index manifest; a query must use the same."""

    sketch_dim: int = 65536
    """K, the sketch length. 0 stores the exact, uncompressed normalised gradient."""
    shuffle_lambda: int = 20
    """lambda, the number of random row+column shuffles."""
    seed: int = 42
    """Seed of the shuffles and signs."""

    def __post_init__(self) -> None:
        if self.sketch_dim < 0:
            raise SketchError(f"sketch dimension K must be >= 0 (0 = exact), got {self.sketch_dim}")
        if self.shuffle_lambda < 0:
            raise SketchError(f"--shuffle-lambda must be >= 0, got {self.shuffle_lambda}")

    @property
    def exact(self) -> bool:
        return self.sketch_dim == 0

    def to_dict(self) -> dict:
        return {"algorithm": SKETCH_ALGORITHM, **asdict(self)}


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
    """The 2 * lambda permutation steps for a padded vector of length ``total_dim``.

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


def reference_sketch(vectors: torch.Tensor, settings: SketchSettings) -> torch.Tensor:
    """The slow, literal RapidGrad: explicit padding, reshape-permutations, sign vector and bin sums.

    vectors: [batch, D] (or [D]); returns [batch, K] float32. O(D) memory; for tests and benchmarks.
    """
    squeeze = vectors.dim() == 1
    vectors = torch.atleast_2d(vectors).to(torch.float32)
    if settings.exact:
        return vectors[0] if squeeze else vectors
    batch, gradient_dim = vectors.shape
    total = padded_dim(gradient_dim, settings.sketch_dim)
    shuffled = torch.nn.functional.pad(vectors, (0, total - gradient_dim))  # [batch, total]
    for step in shuffle_plan(total, settings.shuffle_lambda, settings.seed):
        permutation = torch.as_tensor(step.permutation)
        if step.axis == "row":
            shuffled = shuffled.reshape(batch, step.divisor, -1)[:, permutation, :]
        else:
            shuffled = shuffled.reshape(batch, -1, step.divisor)[:, :, permutation]
        shuffled = shuffled.reshape(batch, total)
    signs = rademacher_signs(torch.arange(total, dtype=torch.int64), settings.seed)  # [total]
    sketched = (shuffled * signs).reshape(batch, settings.sketch_dim, -1).sum(dim=2)  # [batch, K]
    return sketched[0] if squeeze else sketched


class RapidGradProjector:
    """Fast RapidGrad: projects gradient blocks into a [batch, K] sketch without O(D) state.

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

    def final_positions(self, start: int, length: int) -> torch.Tensor:
        """Where coordinates [start, start + length) of the padded gradient land after all shuffles."""
        positions = torch.arange(start, start + length, dtype=torch.int64, device=self.device)
        for axis, divisor, forward in self._steps:
            if axis == "row":
                width = self.padded_dim // divisor
                rows = positions // width
                positions = forward[rows].long() * width + (positions - rows * width)
            else:
                columns = positions % divisor
                positions = positions - columns + forward[columns].long()
        return positions

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
        length = block.shape[1]
        for chunk_start in range(0, length, _MAP_CHUNK):
            chunk_length = min(_MAP_CHUNK, length - chunk_start)
            bins, signs = self.bins_and_signs(offset + chunk_start, chunk_length)
            chunk = block[:, chunk_start : chunk_start + chunk_length].to(torch.float32)
            # widen the compact cache entries first: mixed-dtype index_add is ~5x slower
            out.index_add_(1, bins.long(), chunk * signs.to(chunk.dtype))  # [batch, n] into [batch, K]

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
    settings: SketchSettings, gradient_dim: int, device: torch.device | str = "cpu"
) -> RapidGradProjector | ExactProjector:
    if settings.exact:
        return ExactProjector(gradient_dim, device)
    return RapidGradProjector(settings, gradient_dim, device)
