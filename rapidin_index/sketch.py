"""RapidGrad: compress a layer-normalised gradient of length D to a sketch of length K.

Both transforms are a signed permutation of the gradient, zero-padded to ``padded_dim`` (the next multiple
of K), followed by sums over K equal bins of ``padded_dim / K`` consecutive positions: a count sketch in
which every bin receives exactly ``padded_dim / K`` coordinates, so ``<sketch(x), sketch(y)>`` is an
unbiased estimate of ``<x, y>``. The sign of a coordinate is a counter-based hash of (seed, its final
position), so no sign vector is stored. They differ in the permutation (the manifest names the one used):

* ``rapidgrad-v2`` (a build's "auto" picks it except for full-parameter models at K >= 65536 or above
  2^24 parameters) is a keyed pseudo-random permutation of the whole of [0, padded_dim): an
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
* ``rapidgrad-kron`` (:class:`RapidGradKronProjector`, :mod:`rapidin_index.kronecker`) gives every
  parameter tensor bins of its own and sketches a weight matrix there as independent Kronecker count
  sketches of its factors: two small matmuls per token, no scatter. 'auto' picks it over rapidgrad-ts
  where K holds 2,048 bins a weight matrix.

Two implementations of each exist:

* :func:`reference_sketch` (here) does the transform literally, with an explicit permutation and sign
  vector (O(D) memory). It is slow and obviously correct; tests compare the fast paths against it.
* the projectors (`rapidgrad.RapidGradV2Projector`, `rapidgrad.RapidGradProjector` for v1,
  `factored.RapidGradTSProjector`; :func:`make_projector` picks one) map each source coordinate to its
  bin and sign on the fly, with vectorised integer ops on whole coordinate ranges (v1's shuffle plan is
  ``2 * lambda`` small permutations of about sqrt(D) entries). Gradient blocks are projected one parameter
  tensor at a time, at their offset in the flattened gradient, without ever concatenating them.
"""

from __future__ import annotations

import torch

from rapidin_index.factored import RapidGradTSProjector, matrix_blocks, matrix_hash
from rapidin_index.kronecker import (
    COL_SIDE,
    KRON_ALGORITHM,
    ROW_SIDE,
    RapidGradKronProjector,
    kron_layout,
    side_hash,
)
from rapidin_index.rapidgrad import (
    KeyedPermutation,
    RapidGradProjector,
    RapidGradV2Projector,
    padded_dim,
    rademacher_signs,
    shuffle_plan,
)
from rapidin_index.settings import SketchSettings, resolve_algorithm, resolve_sketch_dim


def reference_sketch(
    vectors: torch.Tensor, settings: SketchSettings, blocks: list | None = None
) -> torch.Tensor:
    """The slow, literal RapidGrad of ``settings.algorithm``: explicit padding, permutation, signs, bins.

    vectors: [batch, D] (or [D]); returns [batch, K] float32. O(D) memory; for tests and benchmarks.
    ``blocks`` (the gradient's block list) matters to rapidgrad-ts only, which hashes 2-D blocks by shape;
    'auto' resolves from them as a build resolves it (no blocks: rapidgrad-v2).
    """
    squeeze = vectors.dim() == 1
    vectors = torch.atleast_2d(vectors).to(torch.float32)
    settings = resolve_algorithm(resolve_sketch_dim(settings, vectors.shape[1]), blocks or [])
    if settings.exact:
        return vectors[0] if squeeze else vectors
    batch, gradient_dim = vectors.shape
    total = padded_dim(gradient_dim, settings.sketch_dim)
    padded = torch.nn.functional.pad(vectors, (0, total - gradient_dim))  # [batch, total]
    if settings.algorithm == "rapidgrad-ts":
        return _reference_ts(vectors, settings, blocks, total, squeeze)
    if settings.algorithm == KRON_ALGORITHM:
        sketched = _reference_kron(vectors, settings, blocks)
        return sketched[0] if squeeze else sketched
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


def _reference_kron(vectors: torch.Tensor, settings: SketchSettings, blocks) -> torch.Tensor:
    """rapidgrad-kron literally: per tensor and piece, C1^T X C2 with explicit signed 0/1 matrices."""
    batch, gradient_dim = vectors.shape
    shapes = [(block.offset, tuple(block.parameter.shape)) for block in blocks or []]
    sketched = torch.zeros(batch, settings.sketch_dim)
    for segment in kron_layout(shapes, gradient_dim, settings.sketch_dim):
        a, b, width = segment.row_bins, segment.col_bins, segment.row_bins * segment.col_bins
        matrix = vectors[:, segment.offset : segment.end].reshape(batch, segment.rows, segment.cols)
        for piece in range(segment.pieces):
            h1, s1 = side_hash(settings.seed, segment.offset, ROW_SIDE, piece, segment.rows, a)
            h2, s2 = side_hash(settings.seed, segment.offset, COL_SIDE, piece, segment.cols, b)
            left = _signed_selection(segment.rows, a, h1, s1 / segment.pieces**0.5)
            right = _signed_selection(segment.cols, b, h2, s2)
            product = torch.stack([(left.t() @ (right.t() @ item.T).T) for item in matrix])  # [batch, a, b]
            bins = (segment.start + piece * width + torch.arange(width)) % settings.sketch_dim
            sketched.index_add_(1, bins, product.reshape(batch, width))
    return sketched


def _signed_selection(rows: int, bins: int, hashes: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The explicit [rows, bins] matrix with ``signs[i]`` at (i, hashes[i]), stored sparse: one entry a
    row, so a 70,000 x 65,536 side costs O(rows) memory, not 18 GB."""
    where = torch.stack([torch.arange(rows), torch.as_tensor(hashes, dtype=torch.int64)])
    values = torch.as_tensor(signs, dtype=torch.float32).expand(rows).contiguous()
    return torch.sparse_coo_tensor(where, values, (rows, bins)).coalesce()


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


# --------------------------------------------------------------------------- rapidgrad-ts


class ExactProjector:
    """K = 0: the "sketch" is the normalised gradient itself, so scores are exact (for small models)."""

    def __init__(self, gradient_dim: int, device: torch.device | str = "cpu") -> None:
        self.gradient_dim = gradient_dim
        self.output_dim = gradient_dim
        self.device = torch.device(device)

    def project_block(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        out[:, offset : offset + block.shape[1]] += block.to(torch.float32)

    def project_rows(self, out: torch.Tensor, ids: torch.Tensor, cols: torch.Tensor, offset: int) -> None:
        """out += an embedding's gradient given by its looked-up rows (ids [batch, T], cols [batch, T, C])."""
        width = cols.shape[-1]
        target = offset + ids[:, :, None] * width + torch.arange(width, device=ids.device)  # [batch, T, C]
        target = target + torch.arange(out.shape[0], device=ids.device)[:, None, None] * out.shape[1]
        out.view(-1).index_add_(0, target.reshape(-1), cols.float().reshape(-1))

    def new_output(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.output_dim, dtype=torch.float32, device=self.device)


def make_projector(
    settings: SketchSettings,
    gradient_dim: int,
    device: torch.device | str = "cpu",
    blocks: list | None = None,
) -> (
    RapidGradV2Projector | RapidGradProjector | RapidGradTSProjector | RapidGradKronProjector | ExactProjector
):
    """The projector of ``settings``: exact (K = 0), rapidgrad-v2, rapidgrad-v1, rapidgrad-ts or -kron.

    ``blocks`` (the `capture.GradientBlock` list, in order) is for algorithms that hash by a block's
    shape rather than by flat position (rapidgrad-ts); the flat ones ignore it. 'auto' resolves from them
    as a build resolves it (:func:`settings.resolve_algorithm`; no blocks: rapidgrad-v2).
    """
    settings = resolve_algorithm(resolve_sketch_dim(settings, gradient_dim), blocks or [])
    if settings.exact:
        return ExactProjector(gradient_dim, device)
    if settings.algorithm == "rapidgrad-ts":
        return RapidGradTSProjector(settings, gradient_dim, device, blocks=blocks)
    if settings.algorithm == KRON_ALGORITHM:
        return RapidGradKronProjector(settings, gradient_dim, device, blocks=blocks)
    if settings.algorithm == "rapidgrad-v1":
        return RapidGradProjector(settings, gradient_dim, device)
    return RapidGradV2Projector(settings, gradient_dim, device)
