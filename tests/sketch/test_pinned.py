"""Every sketch algorithm's bits, pinned: a sketch of integer-valued gradients (exact in float32, so any
summation order gives the same bits), its coordinate mapping, its factored and embedding-row paths.
The digests were taken from the flat modules before they became the `rapidin_index.sketch` package;
a change here means indexes built before it no longer match their queries."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import blocks_of

from rapidin_index.factors import OuterFactors
from rapidin_index.settings import SketchSettings
from rapidin_index.sketch import FactorProjector, make_projector, reference_sketch
from rapidin_index.sketch.hashed import HashedProjector
from rapidin_index.sketch.kron import RapidGradKronProjector
from rapidin_index.sketch.projectors import RowProjector

SHAPES = [(24, 16), (16,), (40, 8), (7, 5)]
PINNED = {
    "rapidgrad-v1": "9e1e695e95ede909",
    "rapidgrad-v1 map": "e4c612d353738f56",
    "rapidgrad-v1 rows": "fdd6f86f692b8c00",
    "rapidgrad-v2": "a968241ad6a70e6b",
    "rapidgrad-v2 map": "f12169e1c1667d18",
    "rapidgrad-v2 rows": "61347a3402c8c720",
    "rapidgrad-ts": "d77f5c79eca5929a",
    "rapidgrad-ts map": "9c6c00f457eb1d47",
    "rapidgrad-ts factors": "5a116d9f256cbcb6",
    "rapidgrad-ts rows": "e33677a7829cbb7b",
    "rapidgrad-kron": "bde704aa32ac56f6",
    "rapidgrad-kron map": "8dfd54449f28e61a",
    "rapidgrad-kron factors": "6a7a11a8f9e8f9bb",
    "rapidgrad-kron rows": "d3cef4807534d579",
    "auto": "d27e2b65621480e3",
    "auto rows": "0f23c0255ad5efdd",
}
ALGORITHMS = [
    (64, "rapidgrad-v1"),
    (64, "rapidgrad-v2"),
    (64, "rapidgrad-ts"),
    (4096, "rapidgrad-kron"),
    (0, "auto"),
]


def digest(*tensors: torch.Tensor) -> str:
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in tensors)).hexdigest()[:16]


@pytest.mark.parametrize("sketch_dim,algorithm", ALGORITHMS)
def test_sketch_bits_are_unchanged(sketch_dim, algorithm):
    blocks = blocks_of(*SHAPES)
    dimension = sum(block.parameter.numel() for block in blocks)
    generator = torch.Generator().manual_seed(11)
    vectors = torch.randint(-3, 4, (2, dimension), generator=generator).float()
    settings = SketchSettings(sketch_dim, 20, seed=5, algorithm=algorithm)
    projector = make_projector(settings, dimension, blocks=blocks)
    sketch = projector.new_output(2)
    for block in blocks:
        projector.project_block(
            sketch, vectors[:, block.offset : block.offset + block.parameter.numel()], block.offset
        )
    assert torch.equal(sketch, reference_sketch(vectors, settings, blocks))
    found = {algorithm: digest(sketch.to(torch.int32))}
    if isinstance(projector, HashedProjector):
        bins, signs = projector.bins_and_signs(0, dimension)
        found[f"{algorithm} map"] = digest(bins.long(), signs.to(torch.int8))
    if isinstance(projector, RapidGradKronProjector):
        hashes = [
            part.double()
            for segment in projector.segments
            for piece in projector.hashes(segment)
            for part in piece
        ]
        found[f"{algorithm} map"] = digest(*hashes)
    if isinstance(projector, FactorProjector):
        rows = torch.randint(-2, 3, (2, 3, 24), generator=generator).float()
        cols = torch.randint(-2, 3, (2, 3, 16), generator=generator).float()
        factored = projector.new_output(2)
        projector.project_factors(factored, [OuterFactors(cols=cols, rows=rows)], blocks[0].offset)
        found[f"{algorithm} factors"] = digest(torch.round(factored).to(torch.int32))
    row_generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 24, (2, 5), generator=row_generator)
    cols = torch.randint(-2, 3, (2, 5, 16), generator=row_generator).float()
    embedded = projector.new_output(2)
    if isinstance(projector, RowProjector):
        projector.project_rows(embedded, ids, cols, blocks[0].offset)
    else:
        projector.project_factors(embedded, [OuterFactors(cols=cols, ids=ids)], blocks[0].offset)
    found[f"{algorithm} rows"] = digest(torch.round(embedded).to(torch.int32))
    assert found == {name: PINNED[name] for name in found}
