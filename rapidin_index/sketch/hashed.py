"""What the projectors that hash coordinate by coordinate share (rapidgrad-v1, -v2, -ts): the padded
dimension, the (bin, sign) cache, and the scatter of a materialised block into its bins."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rapidin_index.settings import MAPPING_CACHE_LIMIT, SketchSettings
from rapidin_index.sketch.hashing import rademacher_signs

# Below this many coordinates the projector caches each block's bins and signs (5 bytes a coordinate).
DEFAULT_CACHE_LIMIT = MAPPING_CACHE_LIMIT


# Coordinates mapped at a time, to bound the int64 temporaries of a huge block.
MAP_CHUNK = 1 << 22


# rapidgrad-v2 permutes this many coordinates at a time on a CPU (3.5x faster than 2^22 at a time).
PERMUTE_CHUNK_CPU = 1 << 16


def padded_dim(gradient_dim: int, sketch_dim: int) -> int:
    """D rounded up to a multiple of K."""
    return -(-gradient_dim // sketch_dim) * sketch_dim


BinsAndSigns = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def _add_signed_bins(
    out: torch.Tensor, block: torch.Tensor, offset: int, bins_and_signs: BinsAndSigns
) -> None:
    """out: [batch, K] += the signed, binned ``block`` ([batch, n] at ``offset``), chunk by chunk."""
    length = block.shape[1]
    for chunk_start in range(0, length, MAP_CHUNK):
        chunk_length = min(MAP_CHUNK, length - chunk_start)
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
        step = PERMUTE_CHUNK_CPU if self.device.type == "cpu" else MAP_CHUNK
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
