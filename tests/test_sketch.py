"""RapidGrad: the fast projector against the literal reference, and the sketch's statistical promises."""

import numpy as np
import pytest
import torch

from rapidin_index.sketch import (
    MAX_DIVISOR,
    ExactProjector,
    RapidGradProjector,
    SketchError,
    SketchSettings,
    make_projector,
    padded_dim,
    prime_factors,
    rademacher_signs,
    reference_sketch,
    shuffle_plan,
)


def fast_sketch(vectors: torch.Tensor, settings: SketchSettings, cuts: list[int]) -> torch.Tensor:
    """Project ``vectors`` block by block, cut at ``cuts``, as the gradient stage does."""
    projector = make_projector(settings, vectors.shape[1])
    out = projector.new_output(vectors.shape[0])
    bounds = [0, *cuts, vectors.shape[1]]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        projector.project_block(out, vectors[:, start:end], start)
    return out


@pytest.mark.parametrize(
    "gradient_dim,sketch_dim,shuffle_lambda",
    [
        (1000, 64, 20),
        (5000, 4096, 20),
        (100, 256, 20),
        (70000, 65536, 5),
        (4096, 4096, 0),
        (3 * 7 * 11 * 13, 10, 3),
    ],
)
def test_fast_projector_equals_reference(gradient_dim, sketch_dim, shuffle_lambda):
    torch.manual_seed(0)
    settings = SketchSettings(sketch_dim, shuffle_lambda, seed=7)
    vectors = torch.randn(3, gradient_dim)
    cuts = sorted({gradient_dim // 7, gradient_dim // 3, gradient_dim // 2})
    expected = reference_sketch(vectors, settings)
    assert expected.shape == (3, sketch_dim)
    torch.testing.assert_close(fast_sketch(vectors, settings, cuts), expected, atol=1e-4, rtol=1e-5)


def test_transform_is_determined_by_seed_dim_k_lambda():
    vectors = torch.randn(2, 3000)
    base = reference_sketch(vectors, SketchSettings(512, 4, 42))
    torch.testing.assert_close(reference_sketch(vectors, SketchSettings(512, 4, 42)), base)
    assert not torch.allclose(reference_sketch(vectors, SketchSettings(512, 4, 43)), base)
    assert not torch.allclose(reference_sketch(vectors, SketchSettings(512, 5, 42)), base)


def test_plan_is_a_permutation_of_small_pieces():
    total = padded_dim(6_738_415_616, 65536)  # a 7B model
    plan = shuffle_plan(total, 20, 42)
    assert len(plan) == 40
    for step in plan:
        assert total % step.divisor == 0
        assert sorted(step.permutation.tolist())[:3] == list(range(min(3, step.divisor)))
    # The fast path's state: the permutations, far below the 2*D bytes of a stored sign vector.
    assert sum(step.divisor for step in plan) * 4 < 42e6
    assert max(step.divisor for step in plan) <= MAX_DIVISOR
    assert np.prod(prime_factors(total)) == total


def test_signs_are_a_pure_function_of_seed_and_position():
    positions = torch.tensor([0, 1, 2, 2**32 + 5, 7_000_000_123])
    first = rademacher_signs(positions, 42)
    assert set(first.tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(rademacher_signs(positions, 42), first)
    many = rademacher_signs(torch.arange(100_000), 42)
    assert abs(float(many.mean())) < 0.02  # balanced
    assert not torch.equal(rademacher_signs(torch.arange(64), 1), rademacher_signs(torch.arange(64), 2))


def test_bin_width_one_preserves_inner_products_exactly():
    # K >= D: the sketch is a signed permutation, an isometry.
    x, y = torch.randn(2, 900)
    sx, sy = reference_sketch(torch.stack([x, y]), SketchSettings(1024, 20, 1))
    assert float(sx @ sy) == pytest.approx(float(x @ y), rel=1e-4)
    assert float(sx.norm()) == pytest.approx(float(x.norm()), rel=1e-5)


def test_inner_product_is_unbiased_with_noise_of_order_one_over_sqrt_k():
    torch.manual_seed(1)
    x = torch.randn(20_000)
    y = 0.3 * x + torch.randn(20_000)
    x, y = x / x.norm(), y / y.norm()
    true_cosine = float(x @ y)
    sketch_dim = 1024
    estimates = []
    for seed in range(40):
        sx, sy = reference_sketch(torch.stack([x, y]), SketchSettings(sketch_dim, 2, seed))
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


def test_projector_caches_bins_below_the_limit_only():
    settings = SketchSettings(64, 2, 0)
    small = RapidGradProjector(settings, 1000)
    small.bins_and_signs(0, 10)
    assert (0, 10) in small._cache
    assert RapidGradProjector(settings, 1000, cache_limit=10)._cache is None


def test_bad_settings_are_refused():
    with pytest.raises(SketchError, match="K must be >= 0"):
        SketchSettings(-1)
    with pytest.raises(SketchError, match="shuffle-lambda"):
        SketchSettings(64, -2)
    with pytest.raises(SketchError):
        RapidGradProjector(SketchSettings(0), 10)
