"""The sketch stage (the sketch package): every algorithm's projector against its literal reference, and the
sketch's statistical promises (unbiased inner products, noise of order 1/sqrt(K))."""

import numpy as np
import pytest
import torch

from rapidin_index.settings import AUTO_ALGORITHM, DEFAULT_SKETCH_ALGORITHM, SKETCH_ALGORITHMS, SketchSettings
from rapidin_index.sketch import make_projector, reference_sketch
from rapidin_index.sketch.exact import ExactProjector
from rapidin_index.sketch.hashed import padded_dim
from rapidin_index.sketch.v1 import RapidGradV1Projector
from rapidin_index.sketch.v2 import RapidGradV2Projector

V1, V2 = "rapidgrad-v1", "rapidgrad-v2"
LLAMA_2_7B = 6_738_415_616  # full fine-tuning: padded to 2^16 * 229 * 449 at K = 2^16
_MASK32 = 0xFFFFFFFF


def fast_sketch(vectors: torch.Tensor, settings: SketchSettings, cuts: list[int]) -> torch.Tensor:
    """Project ``vectors`` block by block, cut at ``cuts``, as the gradient stage does."""
    projector = make_projector(settings, vectors.shape[1])
    out = projector.new_output(vectors.shape[0])
    bounds = [0, *cuts, vectors.shape[1]]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        projector.project_block(out, vectors[:, start:end], start)
    return out


@pytest.mark.parametrize("algorithm", SKETCH_ALGORITHMS)
@pytest.mark.parametrize(
    "gradient_dim,sketch_dim,shuffle_lambda",
    [
        (1000, 64, 20),
        (5000, 4096, 20),
        (100, 256, 20),
        (70000, 65536, 5),
        (4096, 4096, 0),
        (3 * 7 * 11 * 13, 10, 3),
        (229 * 449, 16, 2),
        (4099 * 8 - 5, 8, 1),
    ],
)
def test_fast_projector_equals_reference(gradient_dim, sketch_dim, shuffle_lambda, algorithm):
    torch.manual_seed(0)
    settings = SketchSettings(sketch_dim, shuffle_lambda, seed=7, algorithm=algorithm)
    vectors = torch.randn(3, gradient_dim)
    cuts = sorted({gradient_dim // 7, gradient_dim // 3, gradient_dim // 2})
    expected = reference_sketch(vectors, settings)
    assert expected.shape == (3, sketch_dim)
    summed = (
        padded_dim(gradient_dim, sketch_dim) // sketch_dim
    )  # float sums of this many values differ in order
    torch.testing.assert_close(
        fast_sketch(vectors, settings, cuts), expected, atol=1e-4 * summed**0.5, rtol=1e-5
    )


@pytest.mark.parametrize("algorithm", SKETCH_ALGORITHMS)
def test_bin_width_one_preserves_inner_products_exactly(algorithm):
    # K >= D: the sketch is a signed permutation, an isometry.
    x, y = torch.randn(2, 900)
    sx, sy = reference_sketch(torch.stack([x, y]), SketchSettings(1024, 20, 1, algorithm))
    assert float(sx @ sy) == pytest.approx(float(x @ y), rel=1e-4)
    assert float(sx.norm()) == pytest.approx(float(x.norm()), rel=1e-5)


@pytest.mark.parametrize("algorithm", SKETCH_ALGORITHMS)
def test_inner_product_is_unbiased_with_noise_of_order_one_over_sqrt_k(algorithm):
    torch.manual_seed(1)
    x = torch.randn(20_000)
    y = 0.3 * x + torch.randn(20_000)
    x, y = x / x.norm(), y / y.norm()
    true_cosine = float(x @ y)
    sketch_dim = 1024
    estimates = []
    for seed in range(40):
        sx, sy = reference_sketch(torch.stack([x, y]), SketchSettings(sketch_dim, 2, seed, algorithm))
        estimates.append(float(sx @ sy))
    estimates = np.array(estimates)
    assert abs(estimates.mean() - true_cosine) < 4 * estimates.std() / np.sqrt(len(estimates))
    assert estimates.std() < 3 / np.sqrt(sketch_dim)


def test_exact_mode_keeps_the_vector():
    vectors = torch.randn(2, 50)
    projector = make_projector(SketchSettings(0), 50)
    assert isinstance(projector, ExactProjector)
    out = projector.new_output(2)
    projector.project_block(out, vectors[:, :20], 0)
    projector.project_block(out, vectors[:, 20:], 20)
    torch.testing.assert_close(out, vectors)
    torch.testing.assert_close(reference_sketch(vectors, SketchSettings(0)), vectors)


def test_make_projector_follows_the_algorithm():
    assert DEFAULT_SKETCH_ALGORITHM == V2 and SketchSettings().algorithm == AUTO_ALGORITHM
    assert isinstance(make_projector(SketchSettings(64), 1000), RapidGradV2Projector)  # 'auto', no blocks
    assert isinstance(make_projector(SketchSettings(64, algorithm=V1), 1000), RapidGradV1Projector)


def test_settings_round_trip_through_a_manifest_dict():
    settings = SketchSettings(4096, 20, 42, V2)
    record = settings.to_dict()
    assert record == {"algorithm": V2, "sketch_dim": 4096, "shuffle_lambda": 20, "seed": 42}
    assert (
        SketchSettings.from_dict({**record, "gradient_dim": 10, "padded_dim": 4096, "output_dim": 4096})
        == settings
    )
    old = {"algorithm": V1, "sketch_dim": 2048, "shuffle_lambda": 20, "seed": 42, "gradient_dim": 10}
    assert SketchSettings.from_dict(old) == SketchSettings(2048, 20, 42, V1)
    assert SketchSettings.from_dict({"sketch_dim": 2048, "shuffle_lambda": 20, "seed": 42}).algorithm == V1
