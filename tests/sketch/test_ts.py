"""rapidgrad-ts: factored sketches and Gram-matrix norms against the materialised reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    blocks_of,
    brute_force_sketch,
    digest_in_another_process,
    low_rank_sketch_estimates,
    tensor_digest,
)
from test_gradients import load, sequences

from rapidin_index.capture import gradient_dim
from rapidin_index.factors import OuterFactors, factors_gradient, squared_norms
from rapidin_index.gradients import GradientSketcher
from rapidin_index.losses import collate
from rapidin_index.settings import SketchSettings
from rapidin_index.sketch import make_projector, reference_sketch
from rapidin_index.sketch.ts import RapidGradTSProjector, fft_is_cheaper, matrix_hash
from rapidin_index.sketch.v2 import RapidGradV2Projector

TS = "rapidgrad-ts"


def materialised(projector, factors, shape, offset, batch):
    out = projector.new_output(batch)
    projector.project_block(out, factors_gradient(factors, shape), offset)
    return out


@pytest.mark.parametrize("sketch_dim", [64, 1000, 4096])
def test_block_by_block_equals_the_literal_reference(sketch_dim):
    blocks = blocks_of((30, 20), (7,), (50, 9), (3, 1))
    dim = gradient_dim(blocks)
    settings = SketchSettings(sketch_dim, algorithm=TS, seed=5)
    projector = make_projector(settings, dim, blocks=blocks)
    assert isinstance(projector, RapidGradTSProjector) and len(projector.matrices) == 3
    vectors = torch.randn(3, dim)
    out = projector.new_output(3)
    bounds = [0, 111, 600, 607, 900, dim]  # arbitrary slices, across block boundaries
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        projector.project_block(out, vectors[:, start:end], start)
    expected = reference_sketch(vectors, settings, blocks)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the 2-D blocks really are hashed apart from rapidgrad-v2: same seed, different sketch
    v2 = reference_sketch(vectors, SketchSettings(sketch_dim, seed=5))
    assert not torch.allclose(expected, v2)
    torch.testing.assert_close(reference_sketch(vectors, settings), v2)  # no blocks: all flat


@pytest.mark.parametrize("sketch_dim", [64, 1000, 4096])
def test_outer_product_sketch_by_fft_equals_materialised(sketch_dim):
    torch.manual_seed(0)
    blocks = blocks_of((40, 24), (24, 40))
    projector = make_projector(SketchSettings(sketch_dim, algorithm=TS), gradient_dim(blocks), blocks=blocks)
    for block, tokens in zip(blocks, (13, 1), strict=True):
        rows, cols = block.parameter.shape
        factors = [OuterFactors(torch.randn(4, tokens, cols), rows=torch.randn(4, tokens, rows))]
        expected = materialised(projector, factors, (rows, cols), block.offset, 4)
        for method in ("fft", "dense"):
            projector.method = method
            out = projector.new_output(4)
            projector.project_factors(out, factors, block.offset)
            torch.testing.assert_close(out, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4)
            sketch, squared = projector.sketch_factors(factors, block.offset)  # norm from M or the Grams
            torch.testing.assert_close(sketch, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4)
            exact = factors_gradient(factors, (rows, cols)).double().square().sum(dim=1)
            torch.testing.assert_close(squared, exact, rtol=1e-5, atol=0)


def test_embedding_rows_and_tied_calls_equal_materialised_with_scale():
    torch.manual_seed(1)
    blocks = blocks_of((5,), (50, 9))
    block = blocks[1]
    projector = make_projector(SketchSettings(256, algorithm=TS), gradient_dim(blocks), blocks=blocks)
    ids = torch.randint(0, 50, (3, 11))
    ids[:, 3] = ids[:, 4]  # repeated ids sum into one row
    factors = [
        OuterFactors(torch.randn(3, 11, 9), ids=ids),  # an embedding call ...
        OuterFactors(torch.randn(3, 6, 9), rows=torch.randn(3, 6, 50)),  # ... and a tied output layer
    ]
    scale = torch.tensor([0.5, 2.0, 1.0])
    out = projector.new_output(3)
    projector.project_factors(out, factors, block.offset, scale)
    expected = materialised(projector, factors, (50, 9), block.offset, 3) * scale[:, None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_gram_norms_equal_materialised_norms_with_cross_terms():
    torch.manual_seed(2)
    ids = torch.randint(0, 20, (2, 9))
    ids[0, :4] = 7
    factors = [
        OuterFactors(torch.randn(2, 9, 6), ids=ids),
        OuterFactors(torch.randn(2, 5, 6), rows=torch.randn(2, 5, 20)),
        OuterFactors(torch.randn(2, 3, 6), ids=torch.randint(0, 20, (2, 3))),
    ]
    expected = factors_gradient(factors, (20, 6)).double().square().sum(dim=1)
    torch.testing.assert_close(squared_norms(factors), expected, rtol=1e-6, atol=1e-6)
    one = factors[1:2]
    torch.testing.assert_close(
        squared_norms(one), factors_gradient(one, (20, 6)).double().square().sum(1), rtol=1e-6, atol=1e-6
    )
    assert not torch.allclose(squared_norms(factors), sum(squared_norms([f]) for f in factors))


def test_inner_products_are_unbiased_with_noise_of_order_one_over_sqrt_k():
    # Low-rank gradients as a linear layer makes them; 200 independent hashes (seeds); exact <x, y> by torch.
    estimates, true, sketch_dim = low_rank_sketch_estimates(TS)
    assert abs(estimates.mean() - true) < 4 * estimates.std() / np.sqrt(len(estimates))
    assert estimates.std() < 3 / np.sqrt(sketch_dim)
    assert estimates.std() > 0.1 / np.sqrt(sketch_dim)  # it is a sketch: not exact


def test_hash_is_fixed_by_seed_offset_and_shape_across_processes():
    here = matrix_hash(11, 12345, 300, 200, 4096)
    assert digest_in_another_process(
        "from rapidin_index.sketch.ts import matrix_hash", "matrix_hash(11, 12345, 300, 200, 4096)"
    ) == tensor_digest(here)
    h1, s1, h2, s2 = here
    assert int(h1.min()) >= 0 and int(h1.max()) < 4096 and set(s1.tolist()) == {-1.0, 1.0}
    assert len(set(h1.tolist())) > 280  # spread over the bins
    assert not torch.equal(matrix_hash(11, 0, 300, 200, 4096)[0], h1)  # another block, another hash
    assert not torch.equal(matrix_hash(12, 12345, 300, 200, 4096)[0], h1)


def test_cost_model_picks_the_fft_for_big_matrices_only():
    assert fft_is_cheaper(512, (4096, 4096), 4096)  # a 7B layer at K = 4096
    assert not fft_is_cheaper(40, (384, 384), 65536)  # a tiny one
    assert fft_is_cheaper(40, (2000, 384), 4096)  # a tiny model's output layer at a small K


# --------------------------------------------------------------------------- on tiny models


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("normalize,method", [("layer", "fft"), ("layer", "dense"), ("none", "auto")])
def test_factored_sketcher_equals_brute_force_on_a_tiny_model(
    tiny_model_dirs, training_rows, architecture, normalize, method
):
    loaded, blocks = load(tiny_model_dirs, architecture, False)
    settings = SketchSettings(2048, algorithm=TS)
    projector = make_projector(settings, gradient_dim(blocks), blocks=blocks)
    projector.method = method
    assert_factored_equals_brute_force(loaded, blocks, projector, training_rows[:4], normalize)


def assert_factored_equals_brute_force(loaded, blocks, projector, rows, normalize: str) -> None:
    """The sketcher's factored vectors, and its materialising ones, equal the literal brute force."""
    pairs = sequences(loaded.tokenizer, rows)
    batch = collate(pairs, loaded.tokenizer.pad_token_id, "cpu")
    sketcher = GradientSketcher(loaded.model, blocks, projector, normalize)
    result = sketcher.sketch(batch)
    assert sketcher.uses_hooks
    matrices = {block.name for block in blocks if block.parameter.dim() == 2}
    assert sketcher.factored_blocks == matrices  # every weight matrix and embedding, tied GPT-2 wte too
    settings = projector.settings
    reference = torch.stack([brute_force_ts(loaded, blocks, pair, settings, normalize) for pair in pairs])
    tolerance = 1e-4 * float(reference.abs().max())
    torch.testing.assert_close(result.vectors, reference, atol=tolerance, rtol=1e-4)
    materialising = GradientSketcher(loaded.model, blocks, projector, normalize, factored="never")
    again = materialising.sketch(batch)
    assert not materialising.factored_blocks
    torch.testing.assert_close(again.vectors, reference, atol=tolerance, rtol=1e-4)
    torch.testing.assert_close(result.gradient_norms, again.gradient_norms, rtol=1e-5, atol=0)


def brute_force_ts(loaded, blocks, pair, settings, normalize):
    return brute_force_sketch(
        loaded.model, blocks, [pair], loaded.tokenizer.pad_token_id, settings, normalize
    )[0]


def test_non_finite_factored_block_is_flagged_as_before(tiny_model_dirs, training_rows):
    assert_non_finite_block_is_flagged(tiny_model_dirs, training_rows, SketchSettings(256, algorithm=TS))


def assert_non_finite_block_is_flagged(tiny_model_dirs, training_rows, settings: SketchSettings) -> None:
    """An inf weight makes both rows non-finite (rejected later), and no inf reaches the vectors."""
    loaded, blocks = load(tiny_model_dirs, "llama", False)
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    projector = make_projector(settings, gradient_dim(blocks), blocks=blocks)
    sketcher = GradientSketcher(loaded.model, blocks, projector)
    result = sketcher.sketch(collate(sequences(loaded.tokenizer, training_rows[:2]), 0, "cpu"))
    assert not bool(result.finite.any())
    assert bool(torch.isfinite(result.vectors).all())


def test_build_and_query_end_to_end_with_rapidgrad_ts(
    tmp_path, tiny_model_dirs, training_file, training_rows
):
    from rapidin_index.build import build_index
    from rapidin_index.retrieval import Index
    from rapidin_index.settings import BuildSettings, ModelSettings
    from rapidin_index.store.manifest import read_manifest

    settings = BuildSettings(
        ModelSettings(tiny_model_dirs["gpt2"]),
        SketchSettings(4096, algorithm=TS),
        batch_size=4,
        device="cpu",
        vector_dtype="float32",
    )
    report = build_index(training_file, tmp_path / "index", settings, progress=False)
    assert report.rows_indexed == len(training_rows)
    assert read_manifest(tmp_path / "index").sketch["algorithm"] == TS
    opened = Index.open(tmp_path / "index", device="cpu")
    for row_id in (0, 7):
        row = training_rows[row_id]
        result = opened.query(row["instruction"], row["output"], top_k=3, explain=0, per_token=False)
        assert result.helpful[0].id == row_id, [hit.id for hit in result.helpful]


def test_auto_resolves_from_the_blocks_a_projector_is_given():
    blocks = blocks_of(*[(8, 4)] * 40, (4,))  # 40 matrices: fewer than 2048 bins each at K = 65536
    auto = SketchSettings(65536, 20, 7)  # a bare SketchSettings is 'auto'
    assert isinstance(make_projector(auto, 1284, blocks=blocks), RapidGradTSProjector)
    blocks = blocks_of((8, 4), (4,))
    assert isinstance(make_projector(SketchSettings(4096, 20, 7), 36, blocks=blocks), RapidGradV2Projector)
    assert isinstance(make_projector(auto, 36), RapidGradV2Projector)  # no blocks: flat
    vectors = torch.randn(3, 36)
    torch.testing.assert_close(
        reference_sketch(vectors, auto, blocks),
        reference_sketch(vectors, SketchSettings(65536, 20, 7, "rapidgrad-kron"), blocks),
    )


def test_a_build_with_auto_records_its_factored_sketch_and_resumes(
    tmp_path, tiny_model_dirs, training_file, training_rows
):
    from rapidin_index.build import build_index
    from rapidin_index.retrieval import Index
    from rapidin_index.settings import BuildSettings, ModelSettings
    from rapidin_index.store.manifest import read_manifest

    settings = BuildSettings(
        ModelSettings(tiny_model_dirs["llama"]),
        SketchSettings(65536),  # a bare SketchSettings is "auto", as the CLI default is
        batch_size=8,
        device="cpu",
        vector_dtype="float32",
    )
    build_index(training_file, tmp_path / "index", settings, progress=False)
    manifest = read_manifest(tmp_path / "index")
    assert manifest.sketch["algorithm"] == "rapidgrad-kron"  # resolved: a full-parameter model at K = 2^16
    again = build_index(training_file, tmp_path / "index", settings, progress=False)  # nothing to do
    assert again.nothing_to_do and read_manifest(tmp_path / "index").generation == manifest.generation
    opened = Index.open(tmp_path / "index", device="cpu")
    row = training_rows[3]
    result = opened.query(row["instruction"], row["output"], top_k=2, explain=0, per_token=False)
    assert result.helpful[0].id == 3


def test_ts_hash_is_pinned():
    # rapidgrad-ts indexes must keep opening: any change to the hash is a new algorithm name.
    h1, s1, h2, s2 = matrix_hash(42, 1000, 5, 4, 4096)
    assert h1.tolist() == [3358, 3520, 51, 3145, 2986] and s1.tolist() == [1.0, 1.0, -1.0, -1.0, 1.0]
    assert h2.tolist() == [161, 1059, 1063, 1282] and s2.tolist() == [1.0, 1.0, -1.0, -1.0]
    blocks = blocks_of((3,), (5, 4))  # the flat block keeps rapidgrad-v2's bins
    projector = make_projector(SketchSettings(64, seed=7, algorithm=TS), gradient_dim(blocks), blocks=blocks)
    v2 = make_projector(SketchSettings(64, seed=7), gradient_dim(blocks))
    bins, signs = projector.bins_and_signs(0, 3)
    assert (
        bins.tolist() == v2.bins_and_signs(0, 3)[0].tolist()
        and signs.tolist() == v2.bins_and_signs(0, 3)[1].tolist()
    )
