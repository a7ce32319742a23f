"""The literal sketches: every algorithm done the slow, obvious way, with explicit permutations, sign
vectors and selection matrices (O(D) memory). Tests and benchmarks compare the fast projectors with it."""

from __future__ import annotations

import torch

from rapidin_index.settings import SketchSettings, resolve_algorithm, resolve_sketch_dim
from rapidin_index.sketch.hashed import padded_dim
from rapidin_index.sketch.hashing import rademacher_signs
from rapidin_index.sketch.kron import COL_SIDE, KRON_ALGORITHM, ROW_SIDE, kron_layout, side_hash
from rapidin_index.sketch.ts import matrix_blocks, matrix_hash
from rapidin_index.sketch.v1 import shuffle_plan
from rapidin_index.sketch.v2 import KeyedPermutation


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
