"""Large embeddings and heads (issue 27 item 5): sketched from the looked-up rows and the head's factors,
never from a materialised per-example [vocab, dim] gradient, in every sketch algorithm.

On a small vocabulary, the size limits are lowered so that every large-block path runs (only the
looked-up rows hashed, kron's count matrix hashed a row range at a time, a tied head materialised a few
rows at a time for v1 / v2 / exact), and each is compared with plain autograd's per-example gradient
sketched by the materialising path (``backward_only=True``: one backward per example, no hooks). On a real
262,144 x 640 embedding, a build of a few rows runs in a separate process whose peak RSS growth is
measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from rapidin_index import gradients
from rapidin_index.capture import GradientCapture, gradient_blocks, gradient_dim
from rapidin_index.gradients import GradientSketcher
from rapidin_index.losses import Batch
from rapidin_index.settings import SketchSettings
from rapidin_index.sketch import kron as kronecker
from rapidin_index.sketch import make_projector

ALGORITHMS = [
    pytest.param(0, "auto", id="exact"),
    pytest.param(256, "rapidgrad-v1", id="v1"),
    pytest.param(256, "rapidgrad-v2", id="v2"),
    pytest.param(256, "rapidgrad-ts", id="ts"),
    pytest.param(4096, "rapidgrad-kron", id="kron"),
]


def tiny_gemma(vocab_size: int, hidden_size: int = 32, seed: int = 0) -> Gemma3ForCausalLM:
    """One layer of Gemma-3: a scaled embedding, tied to the head."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        attn_implementation="eager",
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # Gemma's norms start at zero weight (1 + w): make every norm gradient non-zero
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.normal_(0.0, 0.5)
    return model


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """One layer of Llama with an untied embedding (its gradient is rows only) and head."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def random_batch(vocab_size: int, rows: int = 3, tokens: int = 12, seed: int = 1) -> Batch:
    """Rows of random ids (repeats included), right-padded, prompt tokens masked out of the loss."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (rows, tokens), generator=generator)
    input_ids[:, 3] = input_ids[:, 5]  # an id twice in a row: its rows' gradients add up
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -4:] = 0
    input_ids[1, -4:] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[:, :4] = -100
    return Batch(input_ids, attention_mask, labels)


def sketch_both_ways(model, selected, sketch_dim: int, algorithm: str, normalize: str = "layer"):
    """(hooked, exact): the large-block paths, and plain autograd per example sketched as materialised."""
    blocks = gradient_blocks(selected)
    settings = SketchSettings(sketch_dim, 20, 42, algorithm)
    batch = random_batch(model.config.vocab_size)
    projector = make_projector(settings, gradient_dim(blocks), blocks=blocks)
    hooked = GradientSketcher(model, blocks, projector, normalize=normalize)
    fast = hooked.sketch(batch)
    exact = GradientSketcher(model, blocks, projector, normalize=normalize, backward_only=True).sketch(batch)
    return hooked, fast, exact


@pytest.fixture
def large_limits(monkeypatch):
    """A 'large' block from 4,096 coordinates on, kron's count matrices hashed 64 rows at a time."""
    monkeypatch.setattr(gradients, "SELF_CHECK_MAX_NUMEL", 4096)
    monkeypatch.setattr(gradients, "ROW_CHUNK_ELEMENTS", 3 * 32 * 40)  # the head in ~13 row chunks
    monkeypatch.setattr(kronecker, "MATRIX_CACHE_LIMIT", 4 * 64 * 16 * 16)


def assert_close(fast, exact) -> None:
    assert torch.all(fast.finite) and torch.all(exact.finite)
    torch.testing.assert_close(fast.losses, exact.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.gradient_norms, exact.gradient_norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.vectors, exact.vectors, rtol=1e-4, atol=2e-5)
    assert float(fast.vectors.norm()) > 0


@pytest.mark.parametrize(("sketch_dim", "algorithm"), ALGORITHMS)
def test_scaled_tied_embedding_equals_plain_autograd_sketched(large_limits, sketch_dim, algorithm):
    model = tiny_gemma(vocab_size=600)
    selected = [(n, p) for n, p in model.named_parameters() if "embed_tokens" in n or "mlp" in n]
    hooked, fast, exact = sketch_both_ways(model, selected, sketch_dim, algorithm)
    assert "model.embed_tokens.weight" not in hooked.backward_path  # the scaled embedding has its rule
    assert "model.embed_tokens.weight" in hooked.factored_blocks  # from its factors, never materialised
    assert_close(fast, exact)


@pytest.mark.parametrize(("sketch_dim", "algorithm"), ALGORITHMS)
def test_untied_embedding_rows_equal_plain_autograd_sketched(large_limits, sketch_dim, algorithm):
    model = tiny_llama(vocab_size=700)
    selected = [(n, p) for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n]
    hooked, fast, exact = sketch_both_ways(model, selected, sketch_dim, algorithm, normalize="none")
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= hooked.factored_blocks
    assert_close(fast, exact)


def test_sparse_row_hashing_gives_the_bits_of_the_whole_block():
    """v1 / v2: hashing only the looked-up rows' coordinates gives exactly the block table's bits."""
    for algorithm in ("rapidgrad-v1", "rapidgrad-v2"):
        projector = make_projector(SketchSettings(512, 20, 7, algorithm), 50_000)
        coordinates = torch.tensor([[0, 1, 2], [48_000, 48_999, 123]])
        bins, signs = projector.coordinate_bins_and_signs(coordinates + 1000)
        table_bins, table_signs = projector.bins_and_signs(1000, 49_000)
        assert torch.equal(bins, table_bins[coordinates].long())
        assert torch.equal(signs, table_signs[coordinates].float())


def test_kron_hashes_kept_as_codes_give_the_same_count_matrix(monkeypatch):
    """A C1 too large to keep is rebuilt from compact codes: the bits of the hashes themselves."""
    monkeypatch.setattr(kronecker, "MATRIX_CACHE_LIMIT", 1000)
    blocks = gradient_blocks([("weight", torch.nn.Parameter(torch.zeros(900, 40)))])
    projector = make_projector(SketchSettings(4096, 20, 3, "rapidgrad-kron"), 900 * 40, blocks=blocks)
    segment = projector.segments[0]
    expected = torch.zeros(segment.rows, segment.pieces * segment.row_bins)
    for piece, (h1, s1, _, _) in enumerate(projector.hashes(segment)):  # side_hashes, no codes
        expected[torch.arange(segment.rows), piece * segment.row_bins + h1] = s1
    rows = torch.tensor([5, 0, 899, 5])
    assert torch.equal(projector.side_matrix(segment, kronecker.ROW_SIDE, rows), expected[rows])
    assert segment.offset in projector._codes  # it did take the codes


def test_kron_row_matrix_is_the_count_matrix_rows():
    blocks = gradient_blocks([("weight", torch.nn.Parameter(torch.zeros(900, 40)))])
    projector = make_projector(SketchSettings(4096, 20, 3, "rapidgrad-kron"), 900 * 40, blocks=blocks)
    segment = projector.segments[0]
    assert segment.pieces > 1 and segment.row_bins < segment.rows
    left, right = projector.count_matrices(segment)
    rows = torch.tensor([0, 899, 17, 17])
    assert torch.equal(projector.side_matrix(segment, kronecker.ROW_SIDE, rows), left[rows])
    assert torch.equal(projector.side_matrix(segment, kronecker.COL_SIDE), right)


def test_scaled_embedding_rule_multiplies_by_the_forward_scale():
    model = tiny_gemma(vocab_size=300, hidden_size=64)
    embedding = model.model.embed_tokens
    assert float(embedding.embed_scale) == pytest.approx(8.0)  # sqrt(hidden_size): a scale that matters
    blocks = gradient_blocks([("model.embed_tokens.weight", embedding.weight)])
    capture = GradientCapture(model, blocks)
    assert not capture.unsupported


LARGE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_large_vocab import random_batch, tiny_gemma
    from rapidin_index.capture import gradient_blocks, gradient_dim
    from rapidin_index.gradients import GradientSketcher
    from rapidin_index.settings import SketchSettings
    from rapidin_index.sketch import make_projector

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    model = tiny_gemma(vocab_size=262_144, hidden_size=640)
    selected = [(n, p) for n, p in model.named_parameters() if {params!r} in n]
    blocks = gradient_blocks(selected)
    settings = SketchSettings(None, 20, 42, {algorithm!r})
    projector = make_projector(settings, gradient_dim(blocks), blocks=blocks)
    sketcher = GradientSketcher(model, blocks, projector)
    batch = random_batch(262_144, rows=4, tokens=16)
    with torch.no_grad():  # the model's own forward first: its weights' pages and logits are not ours
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    before = rss_mb()
    with open("/proc/self/clear_refs", "w") as f:  # the peak so far (the model's init) is not the build's
        f.write("5")
    started = time.perf_counter()
    sketched = sketcher.sketch(batch)  # the first batch: the self-check's plain backwards too
    seconds = time.perf_counter() - started
    # VmHWM is this address space's own peak (reset above); getrusage's ru_maxrss also keeps the peak
    # of the process image before exec, which is the forking test worker's
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({{
        "growth_mb": peak - before, "seconds": seconds, "finite": bool(sketched.finite.all()),
        "algorithm": type(projector).__name__, "exact_path": sorted(sketcher.backward_path),
        "factored": sorted(sketcher.factored_blocks), "norm": float(sketched.vectors.norm()),
    }}))
    """
)


@pytest.mark.parametrize(
    ("params", "algorithm", "projector"),
    [
        ("embed_tokens", "auto", "RapidGradKronProjector"),  # the Gemma-3-270M report: all K for one tensor
        ("", "auto", "RapidGradKronProjector"),  # every tensor of the layer
        ("", "rapidgrad-ts", "RapidGradTSProjector"),
    ],
)
def test_a_262144_by_640_tied_embedding_builds_in_bounded_memory(params, algorithm, projector):
    """A batch of 4 rows in a separate process: peak RSS growth well under one dense [vocab, dim]
    float32 gradient (671 MB), every tensor hooked (no per-example backward) and the sketch finite."""
    tests = os.path.dirname(__file__)
    script = LARGE_SCRIPT.format(tests=tests, params=params, algorithm=algorithm)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["algorithm"] == projector
    assert report["exact_path"] == []
    assert "model.embed_tokens.weight" in report["factored"]
    assert report["finite"] and report["norm"] > 0
    assert report["growth_mb"] < 250, report  # a dense gradient alone is 671 MB, two rows 1.3 GB
    assert report["seconds"] < 120, report
