"""rapidgrad-kron: the layout, the factored sketch against the materialised one and the literal reference."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    blocks_of,
    digest_in_another_process,
    low_rank_sketch_estimates,
    tensor_digest,
)
from test_gradients import load
from test_ts import assert_factored_equals_brute_force, assert_non_finite_block_is_flagged

from rapidin_index.capture import gradient_dim
from rapidin_index.errors import SketchError
from rapidin_index.factors import OuterFactors, factors_gradient
from rapidin_index.settings import SketchSettings
from rapidin_index.sketch import make_projector, reference_sketch
from rapidin_index.sketch.kron import RapidGradKronProjector, kron_layout, side_hash

KRON = "rapidgrad-kron"


def projector_for(blocks, sketch_dim: int, seed: int = 42) -> RapidGradKronProjector:
    projector = make_projector(
        SketchSettings(sketch_dim, algorithm=KRON, seed=seed), gradient_dim(blocks), blocks=blocks
    )
    assert isinstance(projector, RapidGradKronProjector)
    return projector


def test_layout_gives_small_tensors_their_own_bins_and_shares_the_rest():
    blocks = blocks_of((30, 20), (7,), (50, 9), (3, 1), (100, 64))
    segments = projector_for(blocks, 4096).segments
    shapes = [(s.rows, s.cols, s.row_bins, s.col_bins, s.pieces) for s in segments]
    assert shapes[:4] == [(30, 20, 30, 20, 1), (1, 7, 1, 7, 1), (50, 9, 50, 9, 1), (3, 1, 3, 1, 1)]  # whole
    big = segments[4]  # what the others leave: 4096 - 1060 bins, as pieces of 16 x 16
    assert (big.row_bins, big.col_bins) == (16, 16) and big.pieces == (4096 - 1060) // 256
    ends = [s.start + s.width for s in segments]
    assert [s.start for s in segments[1:]] == ends[:-1] and ends[-1] <= 4096  # disjoint, inside K
    # a share smaller than a 16 x 16 piece: one piece as square as it allows
    small = projector_for(blocks, 300).segments
    assert [(s.row_bins, s.col_bins, s.pieces) for s in small] == [
        (9, 10, 1), (1, 7, 1), (9, 9, 1), (3, 1, 1), (9, 10, 1)
    ]  # fmt: skip
    # more tensors than bins: one bin each, wrapping around K
    tiny = projector_for(blocks, 3).segments
    assert [s.width for s in tiny] == [1] * 5 and [s.start for s in tiny] == [0, 1, 2, 0, 1]


def test_layout_fills_gaps_and_refuses_overlaps():
    segments = kron_layout([(10, (4, 5))], 40, 1024)  # coordinates 0-9 and 30-39 belong to no tensor
    assert [(s.offset, s.rows, s.cols) for s in segments] == [(0, 1, 10), (10, 4, 5), (30, 1, 10)]
    assert kron_layout([], 12, 64)[0].cols == 12  # no blocks: the whole gradient is one vector
    with pytest.raises(SketchError, match="overlap"):
        kron_layout([(0, (4, 5)), (10, (3,))], 40, 1024)
    with pytest.raises(SketchError, match="past D"):
        kron_layout([(0, (4, 5))], 10, 1024)


@pytest.mark.parametrize("sketch_dim", [3, 300, 4096])
def test_block_by_block_equals_the_literal_reference(sketch_dim):
    blocks = blocks_of((30, 20), (7,), (50, 9), (3, 1), (100, 64))
    dim = gradient_dim(blocks)
    projector = projector_for(blocks, sketch_dim, seed=5)
    vectors = torch.randn(3, dim)
    out = projector.new_output(3)
    bounds = [0, 111, 600, 607, 900, 1500, dim]  # arbitrary slices, across and inside tensors
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        projector.project_block(out, vectors[:, start:end], start)
    expected = reference_sketch(vectors, SketchSettings(sketch_dim, algorithm=KRON, seed=5), blocks)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    other_seed = reference_sketch(vectors, SketchSettings(sketch_dim, algorithm=KRON, seed=6), blocks)
    assert not torch.allclose(expected, other_seed)


@pytest.mark.parametrize("sketch_dim", [300, 4096, 65536])
def test_factors_equal_the_materialised_gradient_with_embedding_rows_ties_and_scale(sketch_dim):
    torch.manual_seed(0)
    blocks = blocks_of((5,), (100, 64), (40, 24))
    projector = projector_for(blocks, sketch_dim)
    ids = torch.randint(0, 100, (3, 11))
    ids[:, 3] = ids[:, 4]  # repeated ids sum into one row
    cases = {
        blocks[1].offset: [  # an embedding call and a tied output layer on one tensor
            OuterFactors(torch.randn(3, 11, 64), ids=ids),
            OuterFactors(torch.randn(3, 6, 64), rows=torch.randn(3, 6, 100)),
        ],
        blocks[2].offset: [OuterFactors(torch.randn(3, 1, 24), rows=torch.randn(3, 1, 40))],  # one token
    }
    scale = torch.tensor([0.5, 2.0, 1.0])
    for block in blocks[1:]:
        factors = cases[block.offset]
        out = projector.new_output(3)
        projector.project_factors(out, factors, block.offset, scale)
        expected = projector.new_output(3)
        gradient = factors_gradient(factors, tuple(block.parameter.shape)) * scale[:, None]
        projector.project_block(expected, gradient, block.offset)
        torch.testing.assert_close(out, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4)
        assert float(out.abs().sum()) > 0


def test_a_tensor_that_fits_keeps_its_inner_products_exactly():
    blocks = blocks_of((30, 20), (7,))
    x, y = torch.randn(2, gradient_dim(blocks)).double().unbind(0)
    sketches = reference_sketch(torch.stack([x, y]).float(), SketchSettings(1024, algorithm=KRON), blocks)
    for block in blocks:
        segment = make_projector(SketchSettings(1024, algorithm=KRON), 607, blocks=blocks).segment(
            block.offset
        )
        part = slice(segment.start, segment.start + segment.width)
        exact = float(
            x[block.offset : block.offset + block.numel] @ y[block.offset : block.offset + block.numel]
        )
        assert float(sketches[0, part] @ sketches[1, part]) == pytest.approx(exact, rel=1e-5)


def test_inner_products_are_unbiased_with_noise_of_order_one_over_sqrt_k():
    # Low-rank gradients as a linear layer makes them; 200 independent hashes (seeds); exact <x, y> by torch.
    estimates, true, sketch_dim = low_rank_sketch_estimates(KRON)
    assert abs(estimates.mean() - true) < 4 * estimates.std() / np.sqrt(len(estimates))
    assert estimates.std() < 3 / np.sqrt(sketch_dim)
    assert estimates.std() > 0.1 / np.sqrt(sketch_dim)  # it is a sketch: not exact


def test_hash_is_fixed_by_seed_offset_and_shape_across_processes():
    here = side_hash(11, 12345, 3, 2, 300, 16)
    assert digest_in_another_process(
        "from rapidin_index.sketch.kron import side_hash", "side_hash(11, 12345, 3, 2, 300, 16)"
    ) == tensor_digest(here)
    bins, signs = here
    assert int(bins.min()) == 0 and int(bins.max()) == 15 and set(signs.tolist()) == {-1.0, 1.0}
    assert not torch.equal(side_hash(11, 12345, 3, 3, 300, 16)[0], bins)  # another piece, another hash
    assert torch.equal(side_hash(11, 0, 3, 0, 40, 40)[0], torch.arange(40))  # a side that fits: unhashed


def test_kron_hash_is_pinned():
    # rapidgrad-kron indexes must keep opening: any change to the hash or the layout is a new algorithm name.
    bins, signs = side_hash(42, 1000, 3, 0, 6, 4)
    assert bins.tolist() == PINNED_BINS and signs.tolist() == PINNED_SIGNS
    segments = projector_for(blocks_of((3,), (500, 300), (300, 500)), 65536).segments
    assert [(s.start, s.row_bins, s.col_bins, s.pieces) for s in segments] == PINNED_LAYOUT


PINNED_BINS = [3, 3, 3, 2, 0, 3]
PINNED_SIGNS = [1.0, -1.0, -1.0, 1.0, 1.0, -1.0]
PINNED_LAYOUT = [(0, 1, 3, 1), (3, 16, 16, 127), (32515, 16, 16, 127)]


# --------------------------------------------------------------------------- on tiny models


@pytest.mark.parametrize("architecture,lora", [("llama", False), ("gpt2", False), ("llama", True)])
@pytest.mark.parametrize("normalize", ["layer", "none"])
def test_factored_sketcher_equals_brute_force_on_a_tiny_model(
    tiny_model_dirs, training_rows, architecture, lora, normalize
):
    loaded, blocks = load(tiny_model_dirs, architecture, lora)
    projector = projector_for(blocks, 2048)
    assert_factored_equals_brute_force(loaded, blocks, projector, training_rows[:4], normalize)


def test_build_then_query_in_another_process_with_rapidgrad_kron(
    tmp_path, tiny_model_dirs, training_file, training_rows
):
    from rapidin_index.build import build_index
    from rapidin_index.settings import BuildSettings, ModelSettings
    from rapidin_index.store.manifest import read_manifest

    settings = BuildSettings(
        ModelSettings(tiny_model_dirs["llama"]),
        SketchSettings(4096, algorithm=KRON),
        batch_size=4,
        device="cpu",
        vector_dtype="float32",
    )
    report = build_index(training_file, tmp_path / "index", settings, progress=False)
    assert report.rows_indexed == len(training_rows)
    assert read_manifest(tmp_path / "index").sketch["algorithm"] == KRON
    code = (
        "import sys, json; from rapidin_index.retrieval import Index;"
        "index = Index.open(sys.argv[1], device='cpu'); rows = json.loads(sys.argv[2]);"
        "print([index.query(r['instruction'], r['output'], top_k=1, explain=0, per_token=False).helpful[0].id"
        " for r in rows])"
    )
    asked = [training_rows[i] for i in (0, 7)]
    environment = {**os.environ, "PYTHONHASHSEED": "4242"}
    import json

    other = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "index"), json.dumps(asked)],
        capture_output=True, text=True, env=environment, check=True,
    )  # fmt: skip
    assert other.stdout.strip().splitlines()[-1] == "[0, 7]"


def test_non_finite_factored_block_is_flagged_as_before(tiny_model_dirs, training_rows):
    assert_non_finite_block_is_flagged(tiny_model_dirs, training_rows, SketchSettings(4096, algorithm=KRON))
