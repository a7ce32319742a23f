"""Batched per-example gradients (hooks) against one plain backward per example, on tiny models."""

import pytest
import torch
from conftest import brute_force_sketch

from rapidin_index.capture import gradient_blocks, gradient_dim
from rapidin_index.errors import GradientError
from rapidin_index.gradients import GradientSketcher
from rapidin_index.losses import collate
from rapidin_index.models import load_model, select_parameters
from rapidin_index.settings import ModelSettings, SketchSettings
from rapidin_index.sketch import make_projector

CONFIGS = [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)]


def load(tiny_model_dirs, architecture: str, lora: bool, params: str | None = None):
    adapter = tiny_model_dirs[f"{architecture}_lora"] if lora else None
    settings = ModelSettings(tiny_model_dirs[architecture], adapter, params=params)
    loaded = load_model(settings)
    return loaded, gradient_blocks(select_parameters(loaded.model, settings))


def sequences(tokenizer, rows):
    pairs = []
    for row in rows:
        prompt = tokenizer(row["instruction"]).input_ids
        response = tokenizer(row["output"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        pairs.append((prompt + response, [-100] * len(prompt) + response))
    return pairs


def brute_force(loaded, blocks, pairs, settings: SketchSettings, normalize: str = "layer") -> torch.Tensor:
    return brute_force_sketch(loaded.model, blocks, pairs, loaded.tokenizer.pad_token_id, settings, normalize)


@pytest.mark.parametrize("architecture,lora", CONFIGS)
@pytest.mark.parametrize("sketch_dim", [0, 4096])
def test_batched_sketch_equals_brute_force(tiny_model_dirs, training_rows, architecture, lora, sketch_dim):
    loaded, blocks = load(tiny_model_dirs, architecture, lora)
    settings = SketchSettings(sketch_dim, 20, 42)
    pairs = sequences(loaded.tokenizer, training_rows[:5])
    sketcher = GradientSketcher(loaded.model, blocks, make_projector(settings, gradient_dim(blocks)), "layer")
    result = sketcher.sketch(collate(pairs, loaded.tokenizer.pad_token_id, "cpu"))
    assert sketcher.uses_hooks, "the fast path must cover Linear, Conv1D, Embedding and norm layers"
    torch.testing.assert_close(
        result.vectors, brute_force(loaded, blocks, pairs, settings), atol=2e-5, rtol=1e-4
    )
    assert bool(result.finite.all())


@pytest.mark.parametrize("architecture,lora", [("llama", False), ("gpt2", True)])
def test_no_normalisation_and_raw_norms(tiny_model_dirs, training_rows, architecture, lora):
    loaded, blocks = load(tiny_model_dirs, architecture, lora)
    pairs = sequences(loaded.tokenizer, training_rows[:3])
    settings = SketchSettings(0)
    sketcher = GradientSketcher(loaded.model, blocks, make_projector(settings, gradient_dim(blocks)), "none")
    result = sketcher.sketch(collate(pairs, loaded.tokenizer.pad_token_id, "cpu"))
    expected = brute_force(loaded, blocks, pairs, settings, "none")
    torch.testing.assert_close(result.vectors, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(result.gradient_norms, expected.norm(dim=1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_batch_size_and_padding_invariance(tiny_model_dirs, training_rows, architecture):
    loaded, blocks = load(tiny_model_dirs, architecture, False)
    settings = SketchSettings(2048, 20, 42)
    sketcher = GradientSketcher(loaded.model, blocks, make_projector(settings, gradient_dim(blocks)), "layer")
    pairs = sequences(loaded.tokenizer, training_rows[:6])
    pad = loaded.tokenizer.pad_token_id
    together = sketcher.sketch(collate(pairs, pad, "cpu")).vectors
    alone = torch.cat([sketcher.sketch(collate([pair], pad, "cpu")).vectors for pair in pairs])
    reversed_order = sketcher.sketch(collate(pairs[::-1], pad, "cpu")).vectors.flip(0)
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(together, reversed_order, atol=2e-5, rtol=1e-4)


def test_gpt2_dropout_is_off(tiny_model_dirs, training_rows):
    loaded, blocks = load(tiny_model_dirs, "gpt2", False)
    assert loaded.model.config.resid_pdrop > 0 and not loaded.model.training
    sketcher = GradientSketcher(loaded.model, blocks, make_projector(SketchSettings(0), gradient_dim(blocks)))
    batch = collate(sequences(loaded.tokenizer, training_rows[:2]), loaded.tokenizer.pad_token_id, "cpu")
    torch.testing.assert_close(sketcher.sketch(batch).vectors, sketcher.sketch(batch).vectors, atol=0, rtol=0)


def test_one_by_one_fallback_matches(tiny_model_dirs, training_rows):
    loaded, blocks = load(tiny_model_dirs, "llama", False)
    settings = SketchSettings(1024)
    batch = collate(sequences(loaded.tokenizer, training_rows[:3]), loaded.tokenizer.pad_token_id, "cpu")
    fast = GradientSketcher(loaded.model, blocks, make_projector(settings, gradient_dim(blocks)))
    slow = GradientSketcher(
        loaded.model, blocks, make_projector(settings, gradient_dim(blocks)), backward_only=True
    )
    torch.testing.assert_close(fast.sketch(batch).vectors, slow.sketch(batch).vectors, atol=2e-5, rtol=1e-4)


def test_params_regex_narrows_the_blocks(tiny_model_dirs):
    _, blocks = load(tiny_model_dirs, "llama", False, params=r"layers\.1\..*mlp")
    assert [b.name.split(".")[-2] for b in blocks] == ["gate_proj", "up_proj", "down_proj"]
    assert all("layers.1." in b.name for b in blocks)


def test_non_finite_gradient_is_flagged(tiny_model_dirs, training_rows):
    loaded, blocks = load(tiny_model_dirs, "llama", False)
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    sketcher = GradientSketcher(
        loaded.model, blocks, make_projector(SketchSettings(256), gradient_dim(blocks))
    )
    result = sketcher.sketch(collate(sequences(loaded.tokenizer, training_rows[:2]), 0, "cpu"))
    assert not bool(result.finite.any())


def test_errors_are_clear(tiny_model_dirs):
    loaded, blocks = load(tiny_model_dirs, "llama", False)
    with pytest.raises(GradientError, match="normalize"):
        GradientSketcher(loaded.model, blocks, make_projector(SketchSettings(0), 10), "batch")
    with pytest.raises(GradientError, match="empty batch"):
        collate([], 0, "cpu")


@pytest.mark.parametrize(
    "architecture,params", [("llama", r"layers\.1\..*(mlp|norm)"), ("gpt2", r"h\.1\.(mlp|ln_2)")]
)
def test_a_selection_starting_deep_in_the_network_equals_brute_force(
    tiny_model_dirs, training_rows, architecture, params
):
    loaded, blocks = load(tiny_model_dirs, architecture, False, params=params)
    assert blocks and all(".1." in block.name for block in blocks)
    settings = SketchSettings(0)
    pairs = sequences(loaded.tokenizer, training_rows[:4])
    sketcher = GradientSketcher(loaded.model, blocks, make_projector(settings, gradient_dim(blocks)), "layer")
    result = sketcher.sketch(collate(pairs, loaded.tokenizer.pad_token_id, "cpu"))
    assert sketcher.uses_hooks
    torch.testing.assert_close(
        result.vectors, brute_force(loaded, blocks, pairs, settings), atol=2e-5, rtol=1e-4
    )
    assert all(block.parameter.requires_grad for block in blocks)  # unfrozen after the hooked pass


class SquaredWeightNorm(torch.nn.Module):
    """Named like a norm layer, but its output is quadratic in its weight: the norm rule cannot hold."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(1.0 + 0.3 * torch.randn(dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.weight**2


class DoubledEmbedding(torch.nn.Embedding):
    """An embedding subclass with a forward of its own (as Gemma's scaled embedding)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


def test_odd_modules_take_the_exact_path_and_the_vectors_stay_exact(tiny_model_dirs, training_rows):
    loaded, _ = load(tiny_model_dirs, "llama", False)
    torch.manual_seed(0)
    model = loaded.model
    model.model.norm = SquaredWeightNorm(model.config.hidden_size)
    old = model.model.embed_tokens
    model.model.embed_tokens = DoubledEmbedding(old.num_embeddings, old.embedding_dim)
    model.model.embed_tokens.weight.data.copy_(old.weight.data)
    settings = ModelSettings(tiny_model_dirs["llama"])
    blocks = gradient_blocks(select_parameters(model, settings))
    sketcher = GradientSketcher(
        model, blocks, make_projector(SketchSettings(0), gradient_dim(blocks)), "layer"
    )
    assert "no per-example rule for DoubledEmbedding" in sketcher.backward_path["model.embed_tokens.weight"]
    assert "model.norm.weight" not in sketcher.backward_path  # the name matches the norm rule ...
    pairs = sequences(loaded.tokenizer, training_rows[:4])
    result = sketcher.sketch(collate(pairs, loaded.tokenizer.pad_token_id, "cpu"))
    assert sketcher.backward_path["model.norm.weight"].startswith(
        "self-check"
    )  # ... the self-check catches it
    assert set(sketcher.backward_path) == {"model.embed_tokens.weight", "model.norm.weight"}
    torch.testing.assert_close(
        result.vectors, brute_force(loaded, blocks, pairs, SketchSettings(0)), atol=2e-5, rtol=1e-4
    )
    later = sketcher.sketch(collate(pairs[::-1], loaded.tokenizer.pad_token_id, "cpu"))
    torch.testing.assert_close(later.vectors.flip(0), result.vectors, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "architecture,rows_path", [("llama", {"model.embed_tokens.weight"}), ("gpt2", {"transformer.wpe.weight"})]
)
@pytest.mark.parametrize("sketch_dim", [0, 4096])
def test_embeddings_are_scattered_by_row_and_equal_the_dense_path(
    tiny_model_dirs, training_rows, architecture, rows_path, sketch_dim
):
    # GPT-2's token embedding is tied to its output layer (a dense gradient): it stays materialised.
    loaded, blocks = load(tiny_model_dirs, architecture, False)
    pairs = sequences(loaded.tokenizer, training_rows[:4])
    batch = collate(pairs, loaded.tokenizer.pad_token_id, "cpu")
    projector = make_projector(SketchSettings(sketch_dim), gradient_dim(blocks))
    lean = GradientSketcher(loaded.model, blocks, projector, "layer")
    dense = GradientSketcher(loaded.model, blocks, projector, "layer", factored="never")
    result, expected = lean.sketch(batch), dense.sketch(batch)
    assert lean.factored_blocks == rows_path and not dense.factored_blocks
    torch.testing.assert_close(result.vectors, expected.vectors, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(result.gradient_norms, expected.gradient_norms, atol=0, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["rapidgrad-v2", "rapidgrad-ts"])
def test_the_self_check_holds_one_hooked_block_at_a_time(
    tiny_model_dirs, training_rows, algorithm, monkeypatch
):
    """Each hooked block's check rows are compared as soon as they are sketched and then dropped: at 7B a
    check that kept every block's rows before comparing would hold [rows, D] float32 twice (4 x 27 GB)."""
    import gc
    import weakref

    from rapidin_index import gradients

    loaded, blocks = load(tiny_model_dirs, "llama", False)
    sketcher = GradientSketcher(
        loaded.model,
        blocks,
        make_projector(SketchSettings(64, algorithm=algorithm), gradient_dim(blocks), blocks=blocks),
        "layer",
    )
    alive, most = weakref.WeakSet(), [0]
    real_add = gradients.GradientSketcher.add_hooked

    def tracked(self, *args, **kwargs):
        gc.collect()
        most[0] = max(most[0], len(alive))
        head = real_add(self, *args, **kwargs)
        if head is not None:
            alive.add(head)
        return head

    compared = []
    real_compare = gradients._SelfCheck.compare

    def counting(self, block, hooked):
        compared.append(block.name)
        real_compare(self, block, hooked)
        assert block.name not in self.reference  # its plain gradient is dropped too

    monkeypatch.setattr(gradients.GradientSketcher, "add_hooked", tracked)
    monkeypatch.setattr(gradients._SelfCheck, "compare", counting)
    pairs = sequences(loaded.tokenizer, training_rows[:4])
    sketcher.sketch(collate(pairs, loaded.tokenizer.pad_token_id, "cpu"))
    assert compared == [block.name for block in blocks]  # every block was checked ...
    assert most[0] <= 1  # ... with at most the previous block's rows still alive when the next is made
    assert not sketcher.backward_path


def test_a_partial_selection_forms_no_weight_gradient(tiny_model_dirs, training_rows, monkeypatch):
    """With only the MLP attributed and the other tensors trainable (a model handed to the Python API as
    training left it): the sketch equals the brute force, and the backward forms no ``.grad`` at all."""
    loaded, blocks = load(tiny_model_dirs, "llama", False, params=r"mlp\.")
    assert 0 < len(blocks) < len(list(loaded.model.parameters()))
    for parameter in loaded.model.parameters():  # select_parameters froze them; a user's model may not be
        parameter.requires_grad_(True)
    pairs = sequences(loaded.tokenizer, training_rows[:4])
    settings = SketchSettings(4096, 20, 42)
    sketcher = GradientSketcher(loaded.model, blocks, make_projector(settings, gradient_dim(blocks)), "layer")
    batch = collate(pairs, loaded.tokenizer.pad_token_id, "cpu")
    sketcher.sketch(batch)  # the self-check's batch
    accumulated = []
    for parameter in loaded.model.parameters():
        parameter.register_post_accumulate_grad_hook(lambda p: accumulated.append(p))
    result = sketcher.sketch(batch)
    assert not accumulated
    assert all(p.grad is None for p in loaded.model.parameters())
    assert all(p.requires_grad for p in loaded.model.parameters())  # restored
    torch.testing.assert_close(
        result.vectors, brute_force(loaded, blocks, pairs, settings), atol=2e-5, rtol=1e-4
    )
