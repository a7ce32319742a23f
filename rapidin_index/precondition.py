"""Curvature in the sketch space: a damped inverse of the empirical Fisher of the stored vectors, query side only.

With ``G`` the index's stored vectors ([N, K], one row a training example), the empirical Fisher (the
Gauss-Newton matrix of the sketched, normalised gradients) is ``F = G^T G / N``. A fitted index scores a
query vector q against row g as ``<(F + lambda I)^-1 q, g>``: only q changes, so the FAISS inner-product
index and its search stay as they are. Preconditioning one side with ``(F + lambda I)^-1`` is the same
bilinear form as ``(F + lambda I)^-1/2`` on both sides (TRAK, LoGra); the rows are not normalised again
after whitening, which would need new stored vectors.

``fit_index(kind=...)``: ``fisher`` (this module, the default: the best LDS measured), or ``kfac`` /
``ekfac`` (`kfac`: Kronecker factors of each rapidgrad-kron tensor's row x column bins, full rank), stored
in the same file (format 2 tells the block kinds apart). With ``query_norms`` (off by default: it costs the
backdoor retrieval at the top, auPRC@10 1.000 -> 0.965, for LDS 0.476 -> 0.532) a query on a layer-normalised index keeps its per-tensor gradient norms: the rows stay normalised, and each tensor's
preconditioned cosine counts by the query's gradient norm there (`Index.use_precondition`).

Structure (``structure="auto"``):

* block-diagonal, one block per parameter tensor, where the vectors keep each tensor in its own
  coordinates: rapidgrad-kron (each tensor's segment of bins, when the segments do not share bins) and
  exact vectors (K = 0: each tensor's own coordinates);
* one block over all K coordinates otherwise (rapidgrad-v1/v2/ts mix every tensor into every bin).

Each block of width w is a dense eigendecomposition of ``F_b`` when w <= ``DENSE_LIMIT`` and w <= N;
otherwise its top ``rank`` eigenpairs (from the N x N Gram matrix, or a randomized SVD when N is large),
never a dense w x w matrix. F_b has at most N nonzero eigenvalues, so with N <= rank this is exact; when
eigenpairs are left out, their directions are given the mean of the eigenvalues left out (the trace's
rest), so that a truncated block still damps them like a dense one would on average.

Damping: ``lambda_b = damping x trace(F_b) / min(N, w)``, the mean of F_b's nonzero eigenvalues (F_b has
at most min(N, w)), ``damping`` 0.5 by default (``fit --damping``). Relative to the mean over all w
eigenvalues, the best damping depended on the block's width (LDS, BENCHMARKS.md issue 23: 3 per tensor,
30-100 for one 65,536-wide block, at N = 650); relative to the nonzero ones both optima sit near 0.5. The fit is stored as ``fisher-gNNNN.npz`` (versioned; listed with its
sha256 in the manifest's files, so export, import and verify treat it like the vectors); an append or
a merge writes a generation without it and says so (``rapidin-index fit`` again, or ``build --fit
fisher``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rapidin_index.errors import PreconditionError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2
"""1: Fisher eigen blocks only; 2: also `kfac.KroneckerBlock` blocks (``block_kinds``)."""
DEFAULT_DAMPING = 0.5
"""fisher: lambda = DEFAULT_DAMPING x trace(F_b) / min(N, w): see the module docstring and BENCHMARKS.md, issue 23."""
DEFAULT_KIND = "fisher"
DEFAULT_DAMPINGS = {"fisher": DEFAULT_DAMPING, "kfac": 0.01, "ekfac": 0.01}
"""Each kind's damping multiple (kfac, ekfac: of the mean eigenvalue trace(F_b) / w; BENCHMARKS.md issue 23)."""
DEFAULT_RANK = 512
"""Eigenpairs kept per block wider than DENSE_LIMIT (at most N, the rows)."""
DENSE_LIMIT = 4096
"""A block at most this wide (and no wider than the rows) gets a dense eigendecomposition (w x w doubles)."""
STRUCTURES = ("auto", "tensor", "whole")
KINDS = ("fisher", "kfac", "ekfac")
"""What `fit --kind` fits: the empirical Fisher of the stored rows, or `kfac`'s (E)K-FAC factors."""
WEIGHT_KINDS = ("ekfac-weights", "fisher+ekfac-weights")
"""`ekfac`: weight-space EK-FAC on the query gradient before it is sketched (needs the model), alone or
summed with the Fisher as one z-scored query vector."""
PRECONDITIONS = ("none", *KINDS, *WEIGHT_KINDS)
GRAM_ROW_LIMIT = 8192
"""Up to this many rows a wide block's eigenpairs come from the exact N x N Gram matrix."""


def fisher_file(generation: int) -> str:
    return f"fisher-g{generation:04d}.npz"


@dataclass
class FisherBlock:
    """One diagonal block: coordinates [start, stop) of the vectors."""

    start: int
    stop: int
    eigenvectors: np.ndarray  # [width, rank] float32, orthonormal columns
    eigenvalues: np.ndarray  # [rank] float64
    rest: float  # the mean eigenvalue of the directions not kept (0 when all are)
    damping: float  # lambda of this block

    def apply(self, queries: np.ndarray) -> np.ndarray:
        """(F_b + lambda I)^-1 q_b for queries [n, width], float32."""
        import torch

        out = np.array(queries, dtype=np.float32)
        FisherProduct(self).apply_(torch.from_numpy(out))
        return out


class FisherProduct:
    """A `FisherBlock` made ready for queries once (at open): ``(F_b + lambda I)^-1 q = q / (rest + lambda)
    + V ((V^T q) * c)`` with ``c = 1 / (eigenvalues + lambda) - 1 / (rest + lambda)``, float32 products by
    torch (on one thread for a few queries: `Preconditioner.apply`; numpy's BLAS ran threads of its own,
    which on a busy machine cost 10x the products: BENCHMARKS.md, "Issue 23: cost of a preconditioned
    query").

    V is kept transposed, [rank, width] contiguous, and the block's ``eigenvectors`` become a view of it
    (one copy in memory). A few queries read V in slices of ``SLICE_EIGENPAIRS`` rows, each used for both
    products while it is in the CPU cache: one pass over V instead of two, which is what a small batch's
    products cost (they are memory-bound); a larger batch takes V in one piece (compute-bound)."""

    SMALL_BATCH = 16
    SLICE_EIGENPAIRS = 32

    def __init__(self, block: FisherBlock) -> None:
        import torch  # here, not at the top: `rapidin-index fit` loads no torch for it

        self.inverse_rest = 1.0 / (block.rest + block.damping)
        self.rank = block.eigenvalues.size  # 0 for bins no tensor uses: the product is q / lambda
        vectors = torch.from_numpy(np.asarray(block.eigenvectors, dtype=np.float32))  # [width, rank]
        self.transposed = vectors.T.contiguous()  # [rank, width] (torch's copy: 4x numpy's here)
        block.eigenvectors = self.transposed.numpy().T  # the same values, sharing that copy
        factors = 1.0 / (np.asarray(block.eigenvalues, dtype=np.float64) + block.damping) - self.inverse_rest
        self.factors = torch.from_numpy(factors.astype(np.float32))  # [rank]

    def apply_(self, part: torch.Tensor) -> None:
        """Overwrite ``part`` [n, width] float32 (a view of the query vectors) with (F_b + lambda I)^-1 part."""
        out = part * self.inverse_rest  # [n, width]
        step = self.SLICE_EIGENPAIRS if len(part) <= self.SMALL_BATCH else max(self.rank, 1)
        for first in range(0, self.rank, step):
            vectors = self.transposed[first : first + step]  # [step, width]
            inside = (part @ vectors.T).mul_(self.factors[first : first + step])  # [n, step]
            out.addmm_(inside, vectors)
        part.copy_(out)


@dataclass
class Preconditioner:
    blocks: list[FisherBlock]
    record: dict
    products: list = field(init=False, repr=False)
    """Per block its `FisherProduct`, or None for a block with its own ``apply`` (`kfac.KroneckerBlock`)."""

    threads: int = field(init=False, repr=False)
    """torch's threads when the fit was loaded: what a few queries' products give back after one thread."""

    def __post_init__(self) -> None:
        import torch

        self.products = [FisherProduct(b) if isinstance(b, FisherBlock) else None for b in self.blocks]
        self.threads = torch.get_num_threads()

    def apply(self, queries: np.ndarray) -> np.ndarray:
        """[n, K] query vectors -> (F + lambda I)^-1 applied per block, float32.

        A few queries (`FisherProduct.SMALL_BATCH`) run on one thread: their products are memory-bound
        slices, which more threads slow down (2 threads: 85 ms a query against 15 ms; BENCHMARKS.md, "Issue
        23: cost of a preconditioned query"); torch gets ``threads`` back after them."""
        import torch

        out = np.array(queries, dtype=np.float32)  # a copy, overwritten block by block
        vectors = torch.from_numpy(out)  # the same memory
        few = len(out) <= FisherProduct.SMALL_BATCH and self.threads > 1
        if few:
            torch.set_num_threads(1)
        try:
            for block, product in zip(self.blocks, self.products, strict=True):
                if product is None:
                    out[:, block.start : block.stop] = block.apply(out[:, block.start : block.stop])
                else:
                    product.apply_(vectors[:, block.start : block.stop])
        finally:
            if few:
                torch.set_num_threads(self.threads)
        return out


# --------------------------------------------------------------------------- fitting


def fit_fisher(
    vectors: np.ndarray,
    spans: list[tuple[int, int]],
    damping: float = DEFAULT_DAMPING,
    rank: int = DEFAULT_RANK,
) -> list[FisherBlock]:
    """One `FisherBlock` per (start, stop) span of the [N, K] stored vectors."""
    if damping <= 0:
        raise PreconditionError(f"--damping must be > 0 (a multiple of the mean eigenvalue), got {damping}")
    if rank < 1:
        raise PreconditionError(f"--rank must be at least 1, got {rank}")
    if len(vectors) == 0:
        raise PreconditionError("the index holds no rows: there is nothing to fit a Fisher matrix from")
    return [_fit_block(vectors[:, start:stop], start, stop, damping, rank) for start, stop in spans]


def _fit_block(part: np.ndarray, start: int, stop: int, damping: float, rank: int) -> FisherBlock:
    rows, width = part.shape
    # A wide block stays in its stored float32 (its N x N Gram is accumulated by BLAS); a dense one is small.
    part = part.astype(np.float64) if width <= min(DENSE_LIMIT, rows) else np.asarray(part, dtype=np.float32)
    trace = float(np.square(np.linalg.norm(part, axis=1).astype(np.float64)).sum()) / rows  # trace(F_b)
    mean = trace / min(rows, width)  # the mean of F_b's (at most N) nonzero eigenvalues, if all are equal
    lam = damping * mean if mean > 0 else damping  # an all-zero block: any lambda is the same
    if width <= min(DENSE_LIMIT, rows):
        values, vectors = np.linalg.eigh(part.T @ part / rows)  # ascending
        values = np.clip(values, 0.0, None)
        return FisherBlock(start, stop, vectors.astype(np.float32), values, 0.0, lam)
    values, vectors = _top_eigenpairs(part, min(rank, rows, width))
    rest_count = width - len(values)
    rest = max(0.0, trace - float(values.sum())) / rest_count if rest_count else 0.0
    return FisherBlock(start, stop, vectors.astype(np.float32), values, rest, lam)


def _top_eigenpairs(part: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``rank`` eigenpairs of part^T part / N without forming it ([rank], [width, rank])."""
    rows = part.shape[0]
    if rows <= GRAM_ROW_LIMIT:
        gram = (part @ part.T).astype(np.float64) / rows  # [N, N]: F's nonzero eigenvalues
        values, left = np.linalg.eigh(gram)
        order = np.argsort(values)[::-1][:rank]
        values, left = np.clip(values[order], 0.0, None), left[:, order]
        keep = values > values.max(initial=0.0) * 1e-12
        values, left = values[keep], left[:, keep]
        vectors = (part.T @ left.astype(part.dtype)) / np.sqrt(rows * values)  # unit columns: F v = lambda v
        return values, vectors
    import torch

    matrix = torch.from_numpy(np.ascontiguousarray(part))
    _, singular, right = torch.svd_lowrank(matrix, q=min(rank + 10, min(part.shape)), niter=4)
    values = singular.numpy()[:rank] ** 2 / rows
    return values, right.numpy()[:, :rank]


def tensor_spans(manifest) -> list[tuple[int, int]] | None:
    """Per-tensor coordinate spans of the stored vectors, or None where the sketch mixes tensors."""
    sketch = manifest.sketch
    shapes = [tuple(shape) for shape in manifest.parameters.get("shapes", [])]
    if not shapes:
        return None
    sizes = [int(np.prod(shape)) for shape in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    if sketch["sketch_dim"] == 0:
        return [(offset, offset + size) for offset, size in zip(offsets, sizes, strict=True)]
    if sketch.get("algorithm") != "rapidgrad-kron":
        return None
    from rapidin_index.sketch.kron import kron_layout

    segments = kron_layout(
        list(zip(offsets, shapes, strict=True)), sketch["gradient_dim"], sketch["sketch_dim"]
    )
    spans = sorted((segment.start, segment.start + segment.width) for segment in segments)
    disjoint = all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    if not disjoint or spans[-1][1] > sketch["sketch_dim"]:
        return None  # segments share bins: one block over the whole sketch
    covered = [span for span in spans if span[1] > span[0]]
    return _with_gaps(covered, sketch["sketch_dim"])


def _with_gaps(spans: list[tuple[int, int]], width: int) -> list[tuple[int, int]]:
    """``spans`` plus a block for every range of bins none of them covers (those bins stay zero)."""
    out, position = [], 0
    for start, stop in spans:
        if start > position:
            out.append((position, start))
        out.append((start, stop))
        position = stop
    if position < width:
        out.append((position, width))
    return out


def spans_for(manifest, structure: str) -> tuple[str, list[tuple[int, int]]]:
    if structure not in STRUCTURES:
        raise PreconditionError(f"--structure {structure!r} is not one of {', '.join(STRUCTURES)}")
    width = manifest.sketch["output_dim"]
    per_tensor = None if structure == "whole" else tensor_spans(manifest)
    if structure == "tensor" and per_tensor is None:
        raise PreconditionError(
            f"--structure tensor: this index's {manifest.sketch.get('algorithm')} sketch mixes every tensor "
            "into every bin; only rapidgrad-kron and exact (K = 0) vectors keep tensors apart; use whole"
        )
    if per_tensor is None:
        return "whole", [(0, width)]
    return "tensor", per_tensor


# --------------------------------------------------------------------------- the file


def save_blocks(path: Path, blocks: list) -> None:
    """Write the blocks as one .npz (``version`` first), atomically."""
    from rapidin_index.files import atomic_file
    from rapidin_index.kfac import KroneckerBlock

    arrays = {
        "version": np.array([FORMAT_VERSION]),
        "spans": np.array([[b.start, b.stop] for b in blocks], dtype=np.int64).reshape(-1, 2),
        "block_kinds": np.array([int(isinstance(b, KroneckerBlock)) for b in blocks], dtype=np.int64),
        "rest": np.array([getattr(b, "rest", 0.0) for b in blocks]),
        "damping": np.array([b.damping for b in blocks]),
    }
    for number, block in enumerate(blocks):
        if isinstance(block, KroneckerBlock):
            arrays[f"left_{number}"], arrays[f"right_{number}"] = block.left, block.right
        else:
            arrays[f"eigenvectors_{number}"] = block.eigenvectors
        arrays[f"eigenvalues_{number}"] = block.eigenvalues
    with atomic_file(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)


def _read_block(stored, number: int, start: int, stop: int) -> object:
    from rapidin_index.kfac import KroneckerBlock

    damping = float(stored["damping"][number])
    kinds = stored["block_kinds"] if "block_kinds" in stored else None  # version 1: Fisher blocks only
    if kinds is not None and kinds[number] == 1:
        block = KroneckerBlock(
            start,
            stop,
            stored[f"left_{number}"],
            stored[f"right_{number}"],
            stored[f"eigenvalues_{number}"],
            damping,
        )
        pieces, rows, cols = block.eigenvalues.shape
        if block.left.shape != (pieces, rows, rows) or block.right.shape != (pieces, cols, cols):
            raise PreconditionError(f"block {number}'s factors do not match its eigenvalues")
        if pieces * rows * cols != stop - start:
            raise PreconditionError(f"block {number} does not cover its span")
        return block
    vectors = stored[f"eigenvectors_{number}"]
    if vectors.shape[0] != stop - start:
        raise PreconditionError(f"block {number} does not cover its span")
    return FisherBlock(
        start, stop, vectors, stored[f"eigenvalues_{number}"], float(stored["rest"][number]), damping
    )


def load_blocks(path: Path, width: int) -> list:
    """The blocks of a preconditioner file, checked: its version, and blocks that tile [0, width)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            version = int(stored["version"][0])
            if version > FORMAT_VERSION:
                raise PreconditionError(
                    f"{path.name} is preconditioner format {version}; this rapidin-index reads up to "
                    f"{FORMAT_VERSION}: upgrade rapidin-index"
                )
            blocks = [_read_block(stored, n, int(a), int(b)) for n, (a, b) in enumerate(stored["spans"])]
    except (OSError, KeyError, ValueError) as error:
        raise PreconditionError(
            f"{path.name} is not a readable preconditioner file ({str(error)[:120]}); refit it: rapidin-index "
            f"fit --index {path.parent}"
        ) from None
    if any(block.stop > width for block in blocks):
        raise PreconditionError(f"{path.name} does not fit vectors of {width} dims; refit it")
    return blocks


# --------------------------------------------------------------------------- an index's fit


def fit_index(
    index_dir: str | Path,
    damping: float | None = None,
    rank: int = DEFAULT_RANK,
    structure: str = "auto",
    locked: bool = False,
    kind: str = DEFAULT_KIND,
    query_norms: bool = False,
) -> dict:
    """Fit ``kind`` (fisher, kfac, ekfac) from the index's stored vectors, write it beside them, record it in
    the manifest. ``damping`` None: the kind's default (``DEFAULT_DAMPINGS``). ``query_norms``: on a
    layer-normalised index, the query's vector keeps its per-tensor gradient norms (`Index.use_precondition`
    sketches it with ``normalize none``), so each tensor's preconditioned cosine counts by how strongly the
    query's loss pulls on it (LDS 0.476 -> 0.53; BENCHMARKS.md, issue 23).

    ``locked``: the caller already holds the writer lock (a build that fits at its end). Returns the
    manifest's ``precondition`` record.
    """
    import contextlib
    import time

    from rapidin_index.store import index_folder
    from rapidin_index.store.checksums import file_entry
    from rapidin_index.store.lock import writer_lock
    from rapidin_index.store.manifest import read_manifest, write_manifest

    if kind in WEIGHT_KINDS:  # `ekfac` builds on this module, not the other way round
        raise PreconditionError(
            f"--kind {kind} is fitted with the model over the rows: rapidin_index.ekfac_fit.fit_index_weights "
            f"(rapidin-index fit --index {index_dir} --kind {kind})"
        )
    if kind not in KINDS:
        raise PreconditionError(f"--kind {kind!r} is not one of {', '.join(KINDS + WEIGHT_KINDS)}")
    damping = DEFAULT_DAMPINGS[kind] if damping is None else damping
    index_dir = Path(index_dir)
    started = time.perf_counter()
    with contextlib.nullcontext() if locked else writer_lock(index_dir, "fit"):
        manifest = read_manifest(index_dir)
        layout, spans = _structure(manifest, structure, kind)
        _, vectors = index_folder.load_vectors(index_dir, manifest.generation)
        blocks = _fit(vectors, kind, manifest, spans, damping, rank)
        name = fisher_file(manifest.generation)
        save_blocks(index_dir / name, blocks)
        manifest.files[name] = file_entry(index_dir / name)  # sha256, xxh3_128 (checked on open), bytes
        manifest.files.pop(f"ekfac-weights-g{manifest.generation:04d}.npz", None)  # an earlier weights fit
        manifest.precondition = {
            "kind": kind,
            "version": FORMAT_VERSION,
            "structure": layout,
            "blocks": len(blocks),
            "damping": damping,
            "damping_rule": DAMPING_RULES[kind],
            "query_norms": bool(query_norms and manifest.normalize == "layer"),
            "rank": rank,
            "kept_eigenpairs": int(sum(b.eigenvalues.size for b in blocks)),
            "rows": len(vectors),
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_manifest(index_dir, manifest)
    return manifest.precondition


DAMPING_RULES = {
    "fisher": "lambda = damping x trace(F_b) / min(rows, width) for each block b",
    "kfac": "lambda = damping x trace(F_b) / width for each tensor's block b",
    "ekfac": "lambda = damping x trace(F_b) / width for each tensor's block b",
}


def _structure(manifest, structure: str, kind: str) -> tuple[str, list[tuple[int, int]]]:
    """(structure, spans) of the fit; (E)K-FAC needs the sketch's per-tensor (row x col bins) blocks."""
    if kind == "fisher":
        return spans_for(manifest, structure)
    from rapidin_index.kfac import layouts

    if structure == "whole" or layouts(manifest) is None:
        raise PreconditionError(
            f"--kind {kind} needs each tensor in its own bins as row x column blocks (rapidgrad-kron, or K = 0); "
            f"this index's {manifest.sketch.get('algorithm')} sketch mixes every tensor into every bin"
            + (" and --structure whole asks for one block" if structure == "whole" else "")
            + ": use --kind fisher"
        )
    return "tensor", []


def _fit(vectors: np.ndarray, kind: str, manifest, spans, damping: float, rank: int) -> list:
    if kind == "fisher":
        return fit_fisher(vectors, spans, damping, rank)
    from rapidin_index.kfac import layouts

    if damping <= 0:
        raise PreconditionError(f"--damping must be > 0 (a multiple of the mean eigenvalue), got {damping}")
    if len(vectors) == 0:
        raise PreconditionError(f"the index holds no rows: there is nothing to fit {kind} from")
    return fit_kronecker(vectors, layouts(manifest), kind, damping, rank)


def fit_kronecker(vectors: np.ndarray, segments: list, kind: str, damping: float, rank: int) -> list:
    """One block per `kfac.Layout` segment of the [N, K] stored vectors (a `kfac.KroneckerBlock`, or the
    empirical Fisher's `FisherBlock` for a side past ``kfac.SIDE_LIMIT``) and a Fisher block per range of
    bins that no segment covers."""
    from rapidin_index.kfac import fit_kronecker_blocks

    kronecker = fit_kronecker_blocks(vectors, segments, kind, damping)
    blocks = []
    for start, stop in _with_gaps([(s.start, s.stop) for s in segments], vectors.shape[1]):
        if start in kronecker:
            blocks.append(kronecker[start])
        else:
            blocks += fit_fisher(vectors, [(start, stop)], damping, rank)
    return blocks


def resolve_precondition(manifest, asked: str | None) -> str:
    """``asked`` (none, fisher, kfac, ekfac) or, when None, what the index was fitted with; a kind other
    than the fitted one is refused with the fit that makes it."""
    fitted = None if manifest.precondition is None else manifest.precondition.get("kind", "fisher")
    if asked is None:
        return fitted or "none"
    if asked not in PRECONDITIONS:
        raise PreconditionError(f"--precondition {asked!r} is not one of {', '.join(PRECONDITIONS)}")
    if asked != "none" and fitted is not None and asked != fitted and asked not in fitted.split("+"):
        raise PreconditionError(
            f"--precondition {asked}: this index is fitted with {fitted}; refit it with: rapidin-index fit "
            f"--kind {asked} (or query with --precondition {fitted} or none)"
        )
    return asked


def load_preconditioner(
    index_dir: str | Path, manifest, kind: str = DEFAULT_KIND, verified: bool = False
) -> Preconditioner:
    """The index's fitted preconditioner, checked against the manifest's sha256 of its file (``verified``:
    the caller has just checked every listed file, as `Index.open` does; see `checked_fit_file`)."""
    index_dir = Path(index_dir)
    if kind in WEIGHT_KINDS:
        raise PreconditionError(
            f"--precondition {kind} is loaded by rapidin_index.ekfac.load_weight_preconditioner"
        )
    if manifest.precondition is None:
        name = (
            "Fisher" if kind == "fisher" else kind.upper().replace("EKFAC", "EK-FAC").replace("KFAC", "K-FAC")
        )
        raise PreconditionError(
            f"{index_dir} has no fitted {name} preconditioner (an append or merge drops it); fit it with: "
            f"rapidin-index fit --index {index_dir} --kind {kind}, or query with --precondition none"
        )
    name = fisher_file(manifest.generation)
    path = checked_fit_file(index_dir, manifest, name, f"--index {index_dir}", verified)
    return Preconditioner(load_blocks(path, manifest.sketch["output_dim"]), manifest.precondition)


def checked_fit_file(index_dir: str | Path, manifest, name: str, refit: str, verified: bool = False) -> Path:
    """The fit file ``name`` of the index, listed in its manifest and matching the sha256 there; ``refit`` is
    the `rapidin-index fit` arguments the refusal tells the user to run. ``verified``: the caller has just
    checked every file the manifest lists (`store.verify.check_files`, as `Index.open` does), so the file's
    sha256 is not computed again (0.1 s for the LDS benchmark's 130 MB fit, on every open)."""
    from rapidin_index.files import sha256_path

    entry = manifest.files.get(name)
    path = Path(index_dir) / name
    if entry is None or not path.exists():
        raise PreconditionError(f"{name} is missing from {index_dir}; refit it: rapidin-index fit {refit}")
    if not verified and sha256_path(path) != entry["sha256"]:
        raise PreconditionError(
            f"{name} does not match its checksum in the manifest (corrupted or edited); refit it"
        )
    return path
