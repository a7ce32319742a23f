"""Conformance of rapidgrad-kron on the 22 architectures of test_conformance.py (its own file, so that
pytest-xdist's --dist loadfile runs it beside the K = 0 matrix, not after it).

Where every tensor has bins of its own the stored vectors' inner products must equal the oracle's exact
scores (Hugging Face's own loss, plain autograd, normalised by the oracle); at a small K the stored
vectors must equal the literal reference sketch of the oracle's gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import stored_vectors
from test_conformance import ARCHITECTURES, ROWS, oracle_gradients

from rapidin_index import SketchSettings, build_index
from rapidin_index.settings import BuildSettings, ModelSettings

KRON_SKETCH_DIMS = (1 << 17, 512)  # every tensor in bins of its own (exact up to signs), and hashed


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_rapidgrad_kron_scores_equal_hugging_face_autograd(
    conformance_models, conformance_rows, tmp_path, model_type, lora
):
    """The factored Kronecker sketch on every architecture: where each tensor has bins of its own, the
    stored vectors' inner products are the oracle's exact scores; at a small K, the stored vectors are
    the literal reference sketch of the oracle's gradients."""
    from conftest import blocks_of

    from rapidin_index.sketch import reference_sketch

    model_dir, adapter_dir = conformance_models[model_type]
    adapter_dir = adapter_dir if lora else None
    expected = np.stack(oracle_gradients(model_dir, adapter_dir, "layer"))  # [rows, D]
    for sketch_dim in KRON_SKETCH_DIMS:
        sketch = SketchSettings(sketch_dim, algorithm="rapidgrad-kron")
        settings = BuildSettings(
            ModelSettings(model_dir, adapter_dir),
            sketch,
            template="completion",
            max_length=None,
            batch_size=3,
            vector_dtype="float32",
        )
        report = build_index(conformance_rows, tmp_path / str(sketch_dim), settings, progress=False)
        stored = stored_vectors(tmp_path / str(sketch_dim))
        actual = np.stack([stored[i] for i in range(len(ROWS))]).astype(np.float64)
        if sketch_dim > expected.shape[1]:
            scores, exact = actual @ actual.T, expected @ expected.T
            np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
            continue
        shapes = [p.shape for p in _attributed(model_dir, adapter_dir)]
        reference = (
            reference_sketch(torch.from_numpy(expected).float(), sketch, blocks_of(*shapes)).double().numpy()
        )
        error = np.linalg.norm(actual - reference) / np.linalg.norm(reference)
        assert error < 1e-4, (
            f"{model_type} K={sketch_dim}: relative error {error:.2e}; exact path {report.backward_path}"
        )


def _attributed(model_dir: str, adapter_dir: str | None) -> list[torch.nn.Parameter]:
    """The oracle's parameter list, in its order (the index's block order)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is None:
        return list(model.parameters())
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    return [p for _, p in model.named_parameters() if p.requires_grad]
