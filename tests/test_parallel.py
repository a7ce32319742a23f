"""Devices and FAISS placement; GPU paths skip cleanly on CPU-only machines."""

import numpy as np
import pytest
import torch

from rapidin_index.errors import DeviceError
from rapidin_index.parallel import faiss_gpu_count, resolve_device, search_index
from rapidin_index.store import vector_index


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(DeviceError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda")


def test_cpu_search_is_exact():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 64)).astype(np.float32)
    ids = np.arange(1000, 1500)
    index = vector_index.new_index(64)
    vector_index.add_vectors(index, vectors, ids)
    queries = rng.standard_normal((3, 64)).astype(np.float32)
    scores, found = vector_index.search(search_index(index, use_gpus=False), queries, 10)
    brute = queries @ vectors.T
    expected = np.argsort(-brute, axis=1)[:, :10] + 1000
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected - 1000, axis=1), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(faiss_gpu_count() < 1, reason="needs faiss-gpu and a CUDA device")
def test_gpu_sharded_search_matches_cpu():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((5000, 128)).astype(np.float32)
    index = vector_index.new_index(128)
    vector_index.add_vectors(index, vectors, np.arange(5000))
    queries = rng.standard_normal((4, 128)).astype(np.float32)
    cpu_scores, cpu_ids = vector_index.search(index, queries, 20)
    gpu_scores, gpu_ids = vector_index.search(search_index(index), queries, 20)
    np.testing.assert_array_equal(gpu_ids, cpu_ids)
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-4)
