"""The settings dataclasses: checked on construction, their defaults (the CLI's), and sketch 'auto'."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import blocks_of

from rapidin_index.capture import gradient_blocks
from rapidin_index.errors import BuildError, ModelError, QueryError, SketchError
from rapidin_index.settings import (
    AUTO_ALGORITHM,
    KRON_AUTO_BINS_PER_MATRIX,
    MAPPING_CACHE_LIMIT,
    MAX_VECTOR_DIMENSION,
    BuildSettings,
    ModelSettings,
    QuerySettings,
    SketchSettings,
    default_of,
    resolve_algorithm,
)

TS = "rapidgrad-ts"
KRON = "rapidgrad-kron"


def test_default_of_reads_plain_defaults_and_calls_factories():
    assert default_of(BuildSettings, "batch_size") == 8
    assert default_of(ModelSettings, "dtype") == "float32"
    assert default_of(BuildSettings, "sketch") == SketchSettings(algorithm=AUTO_ALGORITHM)
    # a bare SketchSettings(K) is 'auto' too: a Python build with its own K resolves as the CLI's does
    assert default_of(SketchSettings, "algorithm") == AUTO_ALGORITHM
    with pytest.raises(KeyError):
        default_of(BuildSettings, "no_such_field")


def test_bad_build_and_model_settings_are_refused_naming_the_option():
    model = ModelSettings("some/model")
    with pytest.raises(BuildError, match="--batch-size and --chunk-size"):
        BuildSettings(model, batch_size=0)
    with pytest.raises(BuildError, match="--vector-dtype"):
        BuildSettings(model, vector_dtype="int8")
    with pytest.raises(BuildError, match="--normalize 'unit'"):
        BuildSettings(model, normalize="unit")
    with pytest.raises(BuildError, match="--tokenization"):
        BuildSettings(model, tokenization="words")
    with pytest.raises(BuildError, match=r"--shard-index must be in \[0, 2\)"):
        BuildSettings(model, num_shards=2, shard_index=2)
    with pytest.raises(BuildError, match="more than FAISS opens"):
        BuildSettings(model, sketch=SketchSettings(MAX_VECTOR_DIMENSION + 1))
    with pytest.raises(ModelError, match="--dtype 'float8'"):
        ModelSettings("x", dtype="float8")
    with pytest.raises(ModelError, match="regular expression"):
        ModelSettings("x", params="(")
    assert BuildSettings(model, num_shards=3, shard_index=1).shard == {"index": 1, "count": 3}
    assert BuildSettings(model).shard is None


def test_bad_sketch_settings_are_refused():
    with pytest.raises(SketchError, match="K must be >= 0"):
        SketchSettings(-1)
    with pytest.raises(SketchError, match="shuffle-lambda"):
        SketchSettings(64, -2)
    with pytest.raises(SketchError, match="'rapidgrad-v9'.*rapidgrad-v2, rapidgrad-v1"):
        SketchSettings(64, algorithm="rapidgrad-v9")
    with pytest.raises(
        SketchError, match="built with sketch algorithm 'rapidgrad-v9'.*upgrade rapidin-index"
    ):
        SketchSettings.from_dict(
            {"algorithm": "rapidgrad-v9", "sketch_dim": 64, "shuffle_lambda": 20, "seed": 1}
        )


def test_auto_sketches_full_parameter_models_only_from_their_factors():
    full = blocks_of((8, 4), (4,))
    lora = gradient_blocks(
        [
            ("q.lora_A.default.weight", torch.nn.Parameter(torch.zeros(2, 4))),
            ("q.lora_B.default.weight", torch.nn.Parameter(torch.zeros(4, 2))),
        ]
    )
    auto = SketchSettings(65536, 20, 7, AUTO_ALGORITHM)
    assert resolve_algorithm(auto, full) == SketchSettings(65536, 20, 7, KRON)  # 65536 bins for 1 matrix
    crowded = blocks_of(*[(8, 4)] * (65536 // KRON_AUTO_BINS_PER_MATRIX + 1))  # fewer than 2048 bins each
    assert resolve_algorithm(auto, crowded) == SketchSettings(65536, 20, 7, TS)
    assert resolve_algorithm(auto, crowded[:-1]).algorithm == KRON
    small = SketchSettings(4096, 20, 7, AUTO_ALGORITHM)  # where ts measured a little less faithful
    assert resolve_algorithm(small, full) == SketchSettings(4096, 20, 7, "rapidgrad-v2")
    assert resolve_algorithm(auto, lora).algorithm == "rapidgrad-v2"
    assert resolve_algorithm(auto, blocks_of((4,))).algorithm == "rapidgrad-v2"  # no weight matrix
    assert resolve_algorithm(SketchSettings(0, algorithm=AUTO_ALGORITHM), full).algorithm == "rapidgrad-v2"
    named = SketchSettings(4096, algorithm="rapidgrad-v1")
    assert resolve_algorithm(named, full) is named
    assert resolve_algorithm(auto, full).to_dict()["algorithm"] == KRON  # what the manifest records


def test_auto_sketches_from_factors_at_any_k_where_v2_could_not_cache_its_mapping():
    def meta_blocks(*named_shapes):  # shapes only: nothing allocated
        return gradient_blocks(
            [(name, torch.nn.Parameter(torch.empty(shape, device="meta"))) for name, shape in named_shapes]
        )

    just_below = meta_blocks(("w", (MAPPING_CACHE_LIMIT // 4096, 4096)))
    above = meta_blocks(("w", (MAPPING_CACHE_LIMIT // 4096, 4096)), ("norm", (1,)))
    small_k = SketchSettings(4096, 20, 7, AUTO_ALGORITHM)
    assert resolve_algorithm(small_k, just_below).algorithm == "rapidgrad-v2"
    assert resolve_algorithm(small_k, above).algorithm == KRON  # 4096 bins for its one matrix
    many = meta_blocks(("w", (MAPPING_CACHE_LIMIT // 4096, 4096)), ("v", (4, 4)), ("x", (4, 4)))
    assert resolve_algorithm(small_k, many).algorithm == TS  # 2048 bins for each of 3 matrices: K < 6144

    big_lora = meta_blocks(("q.lora_A.default.weight", (MAPPING_CACHE_LIMIT, 2)))
    assert resolve_algorithm(small_k, big_lora).algorithm == "rapidgrad-v2"  # adapters stay flat
    from rapidin_index.sketch.hashed import DEFAULT_CACHE_LIMIT

    assert DEFAULT_CACHE_LIMIT == MAPPING_CACHE_LIMIT  # the rule follows the projector's real limit


def test_k_not_given_is_exact_up_to_the_default_k_and_the_default_past_it():
    from rapidin_index.settings import DEFAULT_SKETCH_DIM, resolve_sketch_dim
    from rapidin_index.sketch import make_projector, reference_sketch
    from rapidin_index.sketch.exact import ExactProjector

    not_given = SketchSettings()
    assert not_given.sketch_dim is None and default_of(SketchSettings, "sketch_dim") is None
    assert resolve_sketch_dim(not_given, 4096).sketch_dim == 0  # a LoRA-sized gradient: exact vectors
    assert resolve_sketch_dim(not_given, DEFAULT_SKETCH_DIM).sketch_dim == 0
    assert resolve_sketch_dim(not_given, DEFAULT_SKETCH_DIM + 1).sketch_dim == DEFAULT_SKETCH_DIM == 65536
    forced = SketchSettings(65536)
    assert resolve_sketch_dim(forced, 4096) is forced  # a given K is kept, even past D
    # resolve_algorithm resolves K first (the algorithm depends on it), from the blocks' D
    wide = resolve_algorithm(not_given, blocks_of((300, 300)))  # D = 90,000 > 65,536
    assert (wide.sketch_dim, wide.algorithm) == (DEFAULT_SKETCH_DIM, KRON)
    assert resolve_algorithm(not_given, blocks_of((64, 64))).exact
    with pytest.raises(SketchError, match="resolve_sketch_dim"):
        resolve_algorithm(not_given, [])
    # the projector and the slow reference resolve it the same way
    assert isinstance(make_projector(not_given, 100), ExactProjector)
    vectors = torch.randn(2, 100)
    assert torch.equal(reference_sketch(vectors, not_given), vectors)
    assert reference_sketch(torch.randn(2, DEFAULT_SKETCH_DIM + 1), not_given).shape == (
        2,
        DEFAULT_SKETCH_DIM,
    )


# --------------------------------------------------------------------------- query settings


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k": 0}, "--top-k must be at least 1, got 0"),
        ({"token_top_k": -1}, "--token-top-k must be at least 1, got -1"),
        ({"explain": -2}, "--explain must be at least 0, got -2"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1, got 0"),
        ({"depth": 0}, "--depth must be at least 1, got 0"),
        ({"rerank": -1}, "--rerank must be at least 0, got -1"),
        ({"aggregate": "median"}, "--aggregate 'median' is not one of mean, sum, max, count"),
    ],
)
def test_query_settings_refuse_what_cannot_work_naming_the_option(change, message):
    with pytest.raises(QueryError) as refused:
        QuerySettings(**change)
    assert str(refused.value) == message


def test_query_settings_accept_the_least_values_and_are_frozen():
    least = QuerySettings(top_k=1, token_top_k=1, explain=0, max_new_tokens=1, depth=1, aggregate="count")
    assert least.explain == 0 and least.aggregate == "count"
    with pytest.raises(dataclasses.FrozenInstanceError):
        least.top_k = 5
