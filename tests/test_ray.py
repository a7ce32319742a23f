"""The Ray build backend and sharded search give exactly what one process gives; a killed worker loses nothing.

CPU exercise of the multi-GPU paths: CPU Ray actors stand in for GPU actors, CPU FAISS shards for GPU ones.
Ray starts once for the module; everything skips when ray is not installed.
"""

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import build_settings
from rapidin_index.cli.main import app
from typer.testing import CliRunner

from rapidin_index.build import build_index
from rapidin_index.errors import ParallelError
from rapidin_index.parallel import (
    RAY_CRASH_MARKER_ENV,
    RAY_CRASH_ON_CHUNK_ENV,
    PartitionedSearch,
    RayChunkRunner,
    faiss_gpu_count,
    partition_index_by_rows,
    partitions_to_gpus,
    start_partition_actors,
)
from rapidin_index.retrieval import Index
from rapidin_index.store import index_folder, vector_index
from rapidin_index.store.manifest import read_manifest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    with warnings.catch_warnings():  # Ray's daemons are forked and exec'd at once
        warnings.filterwarnings("ignore", "lancedb fork support", RuntimeWarning)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


def settings(tiny_model_dirs, device="cpu"):
    return build_settings(tiny_model_dirs["llama"], sketch_dim=2048, chunk_size=4, device=device)


def stored(index_dir) -> tuple[np.ndarray, np.ndarray]:
    manifest = read_manifest(index_dir)
    ids, vectors = index_folder.load_vectors(index_dir, manifest.generation)
    order = np.argsort(ids)
    return ids[order], vectors[order]


class CountingRunner:
    """A RayChunkRunner whose writes are counted per chunk."""

    def __init__(self, *args) -> None:
        self.runner = RayChunkRunner(*args, workers=2)
        self.writes: Counter = Counter()
        self.rows = 0

    def run(self, jobs, write, advance) -> None:
        def counted_write(job, record, vectors):
            self.writes[job.chunk_number] += 1
            write(job, record, vectors)

        def counted_advance(rows, tokens):
            self.rows += rows
            advance(rows, tokens)

        self.runner.run(jobs, counted_write, counted_advance)


@pytest.fixture(scope="module")
def single_build(tmp_path_factory, tiny_model_dirs, training_file):
    index_dir = tmp_path_factory.mktemp("single") / "index"
    build_index(training_file, index_dir, settings(tiny_model_dirs), progress=False)
    return index_dir


def assert_same_index(found_dir, expected_dir, row_count):
    found_ids, found_vectors = stored(found_dir)
    expected_ids, expected_vectors = stored(expected_dir)
    np.testing.assert_array_equal(found_ids, np.arange(row_count))
    np.testing.assert_array_equal(found_ids, expected_ids)
    np.testing.assert_allclose(found_vectors, expected_vectors, atol=1e-5)
    found_rows = index_folder.read_all_rows(found_dir, read_manifest(found_dir).generation)
    expected_rows = index_folder.read_all_rows(expected_dir, read_manifest(expected_dir).generation)
    assert [row["id"] for row in found_rows] == list(range(row_count))
    for found, expected in zip(found_rows, expected_rows, strict=True):
        assert {k: v for k, v in found.items() if k not in ("loss", "gradient_norm")} == {
            k: v for k, v in expected.items() if k not in ("loss", "gradient_norm")
        }
        assert found["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_two_worker_ray_build_equals_the_single_process_build(
    tmp_path, tiny_model_dirs, training_file, training_rows, single_build
):
    counting = {}

    def factory(*args):
        counting["runner"] = CountingRunner(*args)
        return counting["runner"]

    report = build_index(training_file, tmp_path / "ray", settings(tiny_model_dirs), False, False, factory)
    runner = counting["runner"]
    assert report.rows_indexed == len(training_rows) and runner.runner.timings["actors"] == 2
    assert sorted(runner.writes) == list(range(6)) and set(runner.writes.values()) == {1}
    assert runner.rows == len(training_rows)
    assert_same_index(tmp_path / "ray", single_build, len(training_rows))
    row = training_rows[5]
    found = Index.open(tmp_path / "ray", device="cpu").query(
        row["instruction"], row["output"], top_k=6, explain=0
    )
    expected = Index.open(single_build, device="cpu").query(
        row["instruction"], row["output"], top_k=6, explain=0
    )
    for listing in ("helpful", "harmful"):
        found_hits, expected_hits = getattr(found, listing), getattr(expected, listing)
        assert [h.id for h in found_hits] == [h.id for h in expected_hits]
        np.testing.assert_allclose([h.score for h in found_hits], [h.score for h in expected_hits], rtol=1e-5)


def test_a_worker_killed_mid_chunk_loses_and_duplicates_nothing(
    tmp_path, monkeypatch, tiny_model_dirs, training_file, training_rows, single_build
):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(RAY_CRASH_ON_CHUNK_ENV, "2")
    monkeypatch.setenv(RAY_CRASH_MARKER_ENV, str(marker))
    runners = []

    def factory(*args):
        runners.append(CountingRunner(*args))
        return runners[-1]

    build_index(training_file, tmp_path / "ray", settings(tiny_model_dirs), False, False, factory)
    assert marker.exists()  # the worker did die halfway through chunk 2
    assert sorted(runners[0].writes) == list(range(6)) and set(runners[0].writes.values()) == {1}
    assert runners[0].rows == len(training_rows)
    assert_same_index(tmp_path / "ray", single_build, len(training_rows))


def test_impossible_placements_are_refused(tmp_path, tiny_model_dirs, training_file):
    with pytest.raises(ParallelError, match="--workers 3 asked for, but the Ray cluster has 2 CPUs"):
        build_index(
            training_file,
            tmp_path / "index",
            settings(tiny_model_dirs),
            progress=False,
            runner_factory=RayChunkRunner.factory(workers=3),
        )
    if not torch.cuda.is_available():
        with pytest.raises(ParallelError, match="the Ray cluster has no GPU"):
            RayChunkRunner(None, None, settings(tiny_model_dirs, device="cuda"), None)._placement(ray)


def test_cli_build_routes_workers_to_ray(tmp_path, tiny_model_dirs, training_file):
    args = ["build", "--model", tiny_model_dirs["llama"], "--data", training_file, "--device", "cpu"]
    result = CliRunner().invoke(
        app, [*args, "--index", str(tmp_path / "index"), "--k", "1024", "--workers", "3"]
    )
    assert result.exit_code == 2
    assert "--workers 3 asked for, but the Ray cluster has 2 CPUs" in " ".join(result.output.split())


# --------------------------------------------------------------------------- sharded search


@pytest.fixture(scope="module")
def random_index():
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((1000, 32)).astype(np.float32)
    ids = rng.permutation(5000)[:1000].astype(np.int64)  # ids unrelated to positions
    index = vector_index.new_index(32)
    vector_index.add_vectors(index, vectors, ids)
    queries = rng.standard_normal((25, 32)).astype(np.float32)  # 25 > 20: FAISS's BLAS path too
    return index, queries


def assert_same_top_k(searcher, index, queries):
    for k in (1, 10, 334, 400, 1000, 1200):  # shard size 334, so k > shard size, k = all, k > all
        for signed in (queries, -queries, queries[:3]):  # helpful, harmful, FAISS's small-batch path
            found_scores, found_ids = searcher.search(signed, k)
            expected_scores, expected_ids = index.search(signed, k)
            np.testing.assert_array_equal(found_ids, expected_ids)
            np.testing.assert_allclose(found_scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_sharded_search_equals_one_index(random_index):
    index, queries = random_index
    searcher = PartitionedSearch(partition_index_by_rows(index, 3))
    assert searcher.ntotal == 1000 and searcher.d == 32 and searcher.sizes == [334, 333, 333]
    assert_same_top_k(searcher, index, queries)


def test_sharded_search_over_ray_shard_actors(random_index, tmp_path):
    index, queries = random_index
    shards = partition_index_by_rows(index, 3)
    vector_index.save_index(shards[0], tmp_path / "shard0.faiss")
    # One actor reads its shard from a file (as on a machine of its own), one gets arrays from the driver.
    actors = start_partition_actors(
        [tmp_path / "shard0.faiss", vector_index.stored_vectors(shards[1])], num_cpus=0
    )
    try:
        searcher = PartitionedSearch([*actors, shards[2]])  # Ray actors and a local shard together
        assert searcher.sizes == [334, 333, 333]
        assert_same_top_k(searcher, index, queries)
    finally:
        for actor in actors:
            ray.kill(actor)


def test_sharded_search_serves_queries_in_place_of_the_faiss_index(single_build, training_rows):
    opened = Index.open(single_build, device="cpu")
    row = training_rows[9]
    expected = opened.query(row["instruction"], row["output"], top_k=7, explain=0)
    opened.faiss_index = PartitionedSearch(partition_index_by_rows(opened.faiss_index, 3))
    found = opened.query(row["instruction"], row["output"], top_k=7, explain=0)
    # Same rows in the same order; scores agree to float rounding (the unsharded index is scanned by one
    # matrix product, the shards by FAISS).
    for kind in ("helpful", "harmful"):
        assert [h.id for h in getattr(found, kind)] == [h.id for h in getattr(expected, kind)]
        np.testing.assert_allclose(
            [h.score for h in getattr(found, kind)], [h.score for h in getattr(expected, kind)], rtol=1e-5
        )
    for token, expected_token in zip(found.tokens, expected.tokens, strict=True):
        assert [h.id for h in token.helpful] == [h.id for h in expected_token.helpful]


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(faiss_gpu_count() < 1, reason="needs faiss-gpu and a CUDA device")
def test_sharded_search_over_gpu_shards(random_index):
    index, queries = random_index
    assert_same_top_k(
        PartitionedSearch(partitions_to_gpus(partition_index_by_rows(index, 3))), index, queries
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ray_gpu_actors_build_equals_one_gpu_build(tmp_path, tiny_model_dirs, training_file, training_rows):
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("Ray sees no GPU")
    build_index(training_file, tmp_path / "one", settings(tiny_model_dirs, "cuda"), progress=False)
    build_index(
        training_file,
        tmp_path / "ray",
        settings(tiny_model_dirs, "cuda"),
        progress=False,
        runner_factory=RayChunkRunner.factory(),
    )
    assert_same_index(tmp_path / "ray", tmp_path / "one", len(training_rows))
