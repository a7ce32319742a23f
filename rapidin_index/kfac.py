"""K-FAC and EK-FAC in the sketch space: Kronecker-factored curvature of rapidgrad-kron's per-tensor blocks.

rapidgrad-kron stores each weight matrix's gradient as ``pieces`` count sketches of ``row_bins x
col_bins`` (`kronecker`): piece k of a row is a small matrix ``S_k = C1_k G C2_k^T`` (exact vectors, K = 0,
are one piece of the whole matrix, ``rows x cols``). Over the N stored rows, each piece gets the two
Kronecker factors K-FAC uses in weight space, here from whole-example gradients::

    L_k = sum_n S_nk S_nk^T / N   [a, a]      R_k = sum_n S_nk^T S_nk / N   [b, b]

For ``F = L0 (x) R0`` exactly, ``L_k (x) R_k = trace(F) F``, so K-FAC's estimate of the piece's Fisher is
``L_k (x) R_k / trace(L_k)``: eigenbasis ``U_L (x) U_R``, eigenvalues ``l_i r_j / t``. EK-FAC keeps the
basis and refits the eigenvalues from the rows themselves (George et al. 2018): ``s_ij = mean_n
(U_L^T S_n U_R)_ij^2``. Unlike the empirical Fisher of `precondition` (at most N nonzero eigenvalues a
block), both are full rank, so the damped inverse ``U ((U^T q) / (s + lambda)) U^T`` weighs every
direction of the query, not only those the N rows span.

Pieces of a tensor are fitted apart (each is an independent sketch of the same gradient; their sum is an
average of p preconditioned estimates). Damping: ``lambda = damping x trace(F_b) / width`` for the
tensor's segment b (the mean eigenvalue of the full-rank estimate). A tensor with a side wider than
``SIDE_LIMIT`` (an exact vector of a large embedding) and the bins no tensor covers keep the empirical
Fisher block (`precondition.fit_fisher`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE_LIMIT = 4096
"""A factor at most this many rows (or columns) wide gets a dense eigendecomposition."""
KINDS = ("kfac", "ekfac")


@dataclass(frozen=True)
class Layout:
    """One tensor's segment of the vectors: ``pieces`` blocks of ``row_bins x col_bins``, row-major."""

    start: int
    pieces: int
    row_bins: int
    col_bins: int

    @property
    def stop(self) -> int:
        return self.start + self.pieces * self.row_bins * self.col_bins


@dataclass
class KroneckerBlock:
    """The (E)K-FAC inverse of one segment: per piece an eigenbasis U_L (x) U_R and its eigenvalues."""

    start: int
    stop: int
    left: np.ndarray  # [pieces, a, a] float32, orthonormal columns (U_L)
    right: np.ndarray  # [pieces, b, b] float32 (U_R)
    eigenvalues: np.ndarray  # [pieces, a, b] float64: K-FAC's l_i r_j / t or EK-FAC's refitted s_ij
    damping: float  # lambda of this block

    def apply(self, queries: np.ndarray) -> np.ndarray:
        """(F_b + lambda I)^-1 q_b for queries [n, width], float32."""
        pieces, rows, cols = self.eigenvalues.shape
        matrices = np.asarray(queries, dtype=np.float32).reshape(len(queries), pieces, rows, cols)
        rotated = np.einsum("pia,npij,pjb->npab", self.left, matrices, self.right, optimize=True)
        rotated /= (self.eigenvalues + self.damping).astype(np.float32)
        back = np.einsum("pai,npij,pbj->npab", self.left, rotated, self.right, optimize=True)
        return back.reshape(len(queries), -1)


def fit_block(part: np.ndarray, layout: Layout, damping: float, kind: str) -> KroneckerBlock:
    """K-FAC (``kind`` kfac) or EK-FAC (ekfac) of one segment's stored vectors ``part`` [N, width]."""
    rows = len(part)
    shape = (layout.pieces, layout.row_bins, layout.col_bins)
    matrices = np.asarray(part, dtype=np.float64).reshape(rows, *shape)  # [N, p, a, b]
    left_factor = np.einsum("npij,npkj->pik", matrices, matrices, optimize=True) / rows  # [p, a, a]
    right_factor = np.einsum("npji,npjk->pik", matrices, matrices, optimize=True) / rows  # [p, b, b]
    left_values, left = np.linalg.eigh(left_factor)
    right_values, right = np.linalg.eigh(right_factor)
    traces = np.trace(left_factor, axis1=1, axis2=2)  # [p]: trace(F) of each piece
    if kind == "kfac":
        products = np.clip(left_values, 0, None)[:, :, None] * np.clip(right_values, 0, None)[:, None, :]
        eigenvalues = products / np.where(traces > 0, traces, 1.0)[:, None, None]
    else:
        rotated = np.einsum("pia,npij,pjb->npab", left, matrices, right, optimize=True)
        eigenvalues = np.square(rotated).mean(axis=0)  # [p, a, b]
    mean = float(traces.sum()) / (layout.stop - layout.start)
    lam = damping * mean if mean > 0 else damping
    return KroneckerBlock(
        layout.start, layout.stop, left.astype(np.float32), right.astype(np.float32), eigenvalues, lam
    )


def layouts(manifest) -> list[Layout] | None:
    """Each attributed tensor's (pieces, row_bins, col_bins) segment, or None where the vectors mix tensors
    (rapidgrad-v1/v2/ts) or segments share bins."""
    from rapidin_index.sketch.kron import as_matrix, kron_layout

    sketch = manifest.sketch
    shapes = [tuple(shape) for shape in manifest.parameters.get("shapes", [])]
    if not shapes:
        return None
    sizes = [int(np.prod(shape)) for shape in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    if sketch["sketch_dim"] == 0:
        return [Layout(o, 1, *as_matrix(s)) for o, s in zip(offsets, shapes, strict=True)]
    if sketch.get("algorithm") != "rapidgrad-kron":
        return None
    segments = kron_layout(
        list(zip(offsets, shapes, strict=True)), sketch["gradient_dim"], sketch["sketch_dim"]
    )
    out = sorted(
        (Layout(s.start, s.pieces, s.row_bins, s.col_bins) for s in segments if s.width > 0),
        key=lambda s: s.start,
    )
    if (
        any(a.stop > b.start for a, b in zip(out, out[1:], strict=False))
        or out[-1].stop > sketch["sketch_dim"]
    ):
        return None
    return out


def fit_kronecker_blocks(vectors: np.ndarray, segments: list[Layout], kind: str, damping: float) -> dict:
    """{segment start: `KroneckerBlock`} of the [N, K] stored vectors, for every segment whose sides are
    within ``SIDE_LIMIT``; `precondition.fit_kronecker` fits the empirical Fisher on the rest."""
    return {
        segment.start: fit_block(vectors[:, segment.start : segment.stop], segment, damping, kind)
        for segment in segments
        if max(segment.row_bins, segment.col_bins) <= SIDE_LIMIT
    }
