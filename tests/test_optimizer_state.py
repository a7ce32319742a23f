"""`build --optimizer-state`: gradients divided by Adam's sqrt(v_hat) + eps, checked against an oracle written
from plain autograd of Hugging Face's loss and the saved optimizer state dict alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import build_settings, stored_vectors

from rapidin_index.build import build_index
from rapidin_index.data import load_examples, parse_template
from rapidin_index.errors import OptimizerStateError, QueryError
from rapidin_index.retrieval import Index, sketch_queries
from rapidin_index.store.manifest import read_manifest

ROWS = 6


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, training_rows) -> str:
    path = tmp_path_factory.mktemp("optimizer_data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in training_rows[:ROWS]))
    return str(path)


def _adam_steps(model, named: list[tuple[str, torch.nn.Parameter]], tokenizer, texts, groups=None):
    """Two AdamW steps on ``texts``; the optimizer (its groups as given, default one in ``named`` order)."""
    optimizer = torch.optim.AdamW(groups or [p for _, p in named], lr=1e-2, weight_decay=0.0)
    model.train()
    for part in (texts[:3], texts[3:6]):
        loss = sum(
            model(**(ids := tokenizer(t, return_tensors="pt")), labels=ids["input_ids"]).loss for t in part
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return optimizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_dirs, training_rows) -> dict:
    """Trainer-style checkpoint folders (weights + optimizer.pt): a full llama and a LoRA adapter on it,
    with the names of the tensors each optimizer was given, in order."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("checkpoints")
    texts = [row["instruction"] + " " + row["output"] for row in training_rows[:6]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    named = list(model.named_parameters())
    optimizer = _adam_steps(model, named, tokenizer, texts)
    full = root / "full"
    model.save_pretrained(full)
    tokenizer.save_pretrained(full)
    torch.save(optimizer.state_dict(), full / "optimizer.pt")

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    peft_model = PeftModel.from_pretrained(base, tiny_model_dirs["llama_lora"], is_trainable=True)
    lora_named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    optimizer = _adam_steps(peft_model, lora_named, tokenizer, texts)
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    torch.save(optimizer.state_dict(), adapter / "optimizer.pt")
    return {
        "full": str(full),
        "full_names": [n for n, _ in named],
        "adapter": str(adapter),
        "adapter_names": [n for n, _ in lora_named],
        "base": tiny_model_dirs["llama"],
    }


def adam_denominators(state_file: str, names: list[str]) -> dict[str, torch.Tensor]:
    """{name: sqrt(exp_avg_sq / (1 - beta2^step)) + eps}, read from the state dict alone."""
    state = torch.load(state_file, weights_only=True)
    (group,) = state["param_groups"]
    eps, beta2 = group["eps"], group["betas"][1]
    out = {}
    for key, name in zip(group["params"], names, strict=True):
        moments = state["state"][key]
        out[name] = (moments["exp_avg_sq"] / (1 - beta2 ** float(moments["step"]))).sqrt() + eps
    return out


def oracle_vector(model, names, denominators, input_ids, labels) -> np.ndarray:
    """HF's loss, plain autograd, each tensor's gradient / denominator, each block to unit norm."""
    parameters = dict(model.named_parameters())
    loss = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss
    grads = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
    pieces = []
    for name, grad in zip(names, grads, strict=True):
        scaled = (torch.zeros_like(parameters[name]) if grad is None else grad) / denominators[name]
        scaled = scaled.reshape(-1)
        pieces.append(scaled / scaled.norm() if scaled.norm() > 0 else scaled)
    return torch.cat(pieces).detach().numpy()


def load_hf(checkpoints, adapter: bool):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter:
        base = AutoModelForCausalLM.from_pretrained(checkpoints["base"])
        model = PeftModel.from_pretrained(base, checkpoints["adapter"], is_trainable=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoints["full"])
    model.eval()
    return model, AutoTokenizer.from_pretrained(checkpoints["base"])


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_exact_vectors_equal_the_oracle_on_both_sides(tmp_path, checkpoints, data_file, adapter):
    model_dir = checkpoints["base"] if adapter else checkpoints["full"]
    folder = checkpoints["adapter"] if adapter else checkpoints["full"]
    settings = build_settings(
        model_dir, checkpoints["adapter"] if adapter else None, sketch_dim=0, optimizer_state=folder
    )
    build_index(data_file, tmp_path / "index", settings, progress=False)
    manifest = read_manifest(tmp_path / "index")
    assert manifest.optimizer_state["matched_by"] == "position"
    names = checkpoints["adapter_names" if adapter else "full_names"]
    denominators = adam_denominators(folder + "/optimizer.pt", names)
    model, tokenizer = load_hf(checkpoints, adapter)
    examples, _ = load_examples(data_file, tokenizer, parse_template("auto"), 1024)
    vectors = stored_vectors(tmp_path / "index")
    expected = {
        e.example_id: oracle_vector(model, names, denominators, e.input_ids, e.labels) for e in examples
    }
    for example_id, vector in expected.items():
        np.testing.assert_allclose(vectors[example_id], vector, atol=5e-5)
    # The scaling changes the vectors: a build without it differs.
    plain = build_settings(model_dir, checkpoints["adapter"] if adapter else None, sketch_dim=0)
    build_index(data_file, tmp_path / "plain", plain, progress=False)
    assert np.abs(stored_vectors(tmp_path / "plain")[0] - vectors[0]).max() > 1e-2
    # Query side, whole generation and per token: a training row as a query is sketched the same way.
    index = Index.open(tmp_path / "index", device="cpu")
    prepared = index.prepare("What does str.capitalize do?", "Return a capitalized version of the string.")
    queried, _ = sketch_queries(index, [prepared], per_token=True)
    input_ids, labels = prepared.input_ids, prepared.labels
    np.testing.assert_allclose(
        queried[0], oracle_vector(model, names, denominators, input_ids, labels), atol=5e-5
    )
    for number, position in enumerate(prepared.response_positions[:3]):
        one = [-100] * len(labels)
        one[position] = labels[position]
        np.testing.assert_allclose(
            queried[1 + number], oracle_vector(model, names, denominators, input_ids, one), atol=5e-5
        )


def test_factored_sketches_take_the_scaled_gradient(tmp_path, checkpoints, data_file):
    """rapidgrad-kron sketches linear layers from their factors; with a state, it sketches the materialised
    scaled gradient instead: the stored sketch is the sketch of the oracle's vector."""
    from rapidin_index.capture import gradient_blocks
    from rapidin_index.models import load_model, select_parameters
    from rapidin_index.settings import ModelSettings, SketchSettings
    from rapidin_index.sketch import reference_sketch

    sketch = SketchSettings(8192, 20, 42, "rapidgrad-kron")
    folder = checkpoints["full"]
    settings = build_settings(folder, sketch=sketch, optimizer_state=folder)
    build_index(data_file, tmp_path / "index", settings, progress=False)
    loaded = load_model(ModelSettings(folder))
    blocks = gradient_blocks(select_parameters(loaded.model, ModelSettings(folder)))
    names = checkpoints["full_names"]
    denominators = adam_denominators(folder + "/optimizer.pt", names)
    model, tokenizer = load_hf(checkpoints, False)
    examples, _ = load_examples(data_file, tokenizer, parse_template("auto"), 1024)
    oracle = torch.tensor(
        np.stack([oracle_vector(model, names, denominators, e.input_ids, e.labels) for e in examples])
    )
    expected = reference_sketch(oracle, sketch, blocks).numpy()
    vectors = stored_vectors(tmp_path / "index")
    for row, example in enumerate(examples):
        np.testing.assert_allclose(vectors[example.example_id], expected[row], atol=2e-4)


def test_trainer_groups_and_named_states_match_the_same_tensors(tmp_path, checkpoints):
    """Trainer's two groups (decayed tensors first) and a state saved with names give the same scales as
    the one-group state of the same moments."""
    from transformers import AutoModelForCausalLM, Trainer

    from rapidin_index.capture import gradient_blocks
    from rapidin_index.optimizer_state import load_scaling

    model = AutoModelForCausalLM.from_pretrained(checkpoints["full"])
    blocks = gradient_blocks(list(model.named_parameters()))
    reference = load_scaling(checkpoints["full"], model, blocks, False)
    state = torch.load(checkpoints["full"] + "/optimizer.pt", weights_only=True)
    key_of = dict(zip(checkpoints["full_names"], state["param_groups"][0]["params"], strict=True))
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    order = [n for n in checkpoints["full_names"] if n in decayed] + [
        n for n in checkpoints["full_names"] if n not in decayed
    ]
    group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    first = sum(n in decayed for n in order)
    trainer_state = {
        "state": {number: state["state"][key_of[name]] for number, name in enumerate(order)},
        "param_groups": [
            {**group, "params": list(range(first))},
            {**group, "params": list(range(first, len(order)))},
        ],
    }
    torch.save(trainer_state, tmp_path / "trainer.pt")
    trainer = load_scaling(tmp_path / "trainer.pt", model, blocks, False)
    assert trainer.matched_by == "trainer-groups" and 0 < first < len(order)
    named_state = {
        "state": {number: state["state"][key_of[name]] for number, name in enumerate(reversed(order))},
        "param_groups": [{**group, "params": list(range(len(order))), "param_names": list(reversed(order))}],
    }
    torch.save(named_state, tmp_path / "named.pt")
    named = load_scaling(tmp_path / "named.pt", model, blocks, False)
    assert named.matched_by == "name"
    for name in checkpoints["full_names"]:
        torch.testing.assert_close(trainer.scales[name], reference.scales[name], rtol=0, atol=0)
        torch.testing.assert_close(named.scales[name], reference.scales[name], rtol=0, atol=0)
    assert trainer.fingerprint == named.fingerprint == reference.fingerprint


def test_a_state_that_does_not_match_is_refused_naming_the_tensor(tmp_path, checkpoints, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    from rapidin_index.capture import gradient_blocks
    from rapidin_index.optimizer_state import load_scaling

    model = AutoModelForCausalLM.from_pretrained(checkpoints["full"])
    blocks = gradient_blocks(list(model.named_parameters()))
    state = torch.load(checkpoints["full"] + "/optimizer.pt", weights_only=True)
    key = state["param_groups"][0]["params"][3]
    state["state"][key]["exp_avg_sq"] = state["state"][key]["exp_avg_sq"][:1]
    torch.save(state, tmp_path / "shape.pt")
    fourth = checkpoints["full_names"][3]
    with pytest.raises(OptimizerStateError, match=rf"tensor {fourth} has shape .* in the model, \[1"):
        load_scaling(tmp_path / "shape.pt", model, blocks, False)
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    torch.save(state, tmp_path / "count.pt")
    with pytest.raises(OptimizerStateError, match=r"holds \d+ tensors, the model trains \d+"):
        load_scaling(tmp_path / "count.pt", model, blocks, False)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save(sgd.state_dict(), tmp_path / "sgd.pt")
    with pytest.raises(OptimizerStateError, match="only Adam and AdamW"):
        load_scaling(tmp_path / "sgd.pt", model, blocks, False)
    with pytest.raises(OptimizerStateError, match="holds no optimizer.pt"):
        load_scaling(tiny_model_dirs["llama"], model, blocks, False)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(OptimizerStateError, match="junk.pt is not a readable torch optimizer state"):
        load_scaling(tmp_path / "junk.pt", model, blocks, False)


def test_a_query_without_the_state_or_with_another_is_refused(tmp_path, checkpoints, data_file):
    moved = tmp_path / "checkpoint"
    shutil.copytree(checkpoints["full"], moved)
    settings = build_settings(str(moved), sketch_dim=0, optimizer_state=str(moved))
    build_index(data_file, tmp_path / "index", settings, progress=False)
    (moved / "optimizer.pt").rename(tmp_path / "elsewhere.pt")
    with pytest.raises(
        QueryError, match=r"built with the optimizer state .*optimizer.pt .* pass --optimizer-state"
    ):
        Index.open(tmp_path / "index", device="cpu")
    Index.open(tmp_path / "index", device="cpu", optimizer_state=str(tmp_path / "elsewhere.pt"))
    state = torch.load(tmp_path / "elsewhere.pt", weights_only=True)
    first = next(iter(state["state"].values()))
    first["exp_avg_sq"] = first["exp_avg_sq"] * 2
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(OptimizerStateError, match="differs from the state the index was built with"):
        Index.open(tmp_path / "index", device="cpu", optimizer_state=str(tmp_path / "other.pt"))
    plain = build_settings(str(moved), sketch_dim=0)
    build_index(data_file, tmp_path / "plain", plain, progress=False)
    with pytest.raises(QueryError, match="built without --optimizer-state"):
        Index.open(tmp_path / "plain", device="cpu", optimizer_state=str(tmp_path / "elsewhere.pt"))


def test_the_cli_builds_with_a_state_and_refuses_a_wrong_one_on_one_line(tmp_path, checkpoints, data_file):
    executable = [sys.executable, "-m", "rapidin_index.cli.main"]
    build = executable + ["build", "--model", checkpoints["full"], "--data", data_file, "--k", "0"]
    build += ["--quiet", "--device", "cpu"]
    done = subprocess.run(
        build + ["--index", str(tmp_path / "index"), "--optimizer-state", checkpoints["full"]],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert read_manifest(tmp_path / "index").optimizer_state["tensors"] == len(checkpoints["full_names"])
    wrong = build + ["--index", str(tmp_path / "wrong"), "--optimizer-state", checkpoints["adapter"]]
    done = subprocess.run(wrong, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: --optimizer-state ") and "holds" in line and "the model trains" in line


@pytest.mark.parametrize(
    "architecture, algorithm, sketch_dim",
    [
        ("llama", "rapidgrad-kron", 8192),
        ("gpt2", "rapidgrad-kron", 8192),  # tied wte: looked-up rows and the head's dense factor, one block
        ("llama", "rapidgrad-ts", 4096),
        ("gpt2", "rapidgrad-v2", 4096),
        ("llama", "exact", 0),
    ],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "row-chunks"])
def test_the_batched_scaled_path_equals_the_materialised_reference(
    monkeypatch, tiny_model_dirs, training_rows, architecture, algorithm, sketch_dim, chunked
):
    """Scaled weight matrices are materialised a row chunk of the batch at a time and sketched by batched
    matmuls (``scaled_path="factors"``); the whole per-example gradient projected coordinate by coordinate
    (``"materialise"``, the path before) gives the same vectors, norms and losses."""
    from rapidin_index import gradients as gradients_module
    from rapidin_index import optimizer_state
    from rapidin_index.capture import gradient_blocks
    from rapidin_index.gradients import GradientSketcher
    from rapidin_index.losses import collate
    from rapidin_index.models import load_model, select_parameters
    from rapidin_index.optimizer_state import OptimizerScaling
    from rapidin_index.settings import ModelSettings, SketchSettings
    from rapidin_index.sketch import make_projector

    if chunked:  # a few rows at a time; under kron an embedding's looked-up rows only
        monkeypatch.setattr(optimizer_state, "ROW_CHUNK_ELEMENTS", 3000)
    taken = []  # the blocks the batched path sketched: every weight matrix, or the test proves nothing

    def counted(state, block, *arguments):
        taken.append(block.name)
        return optimizer_state.add_scaled_block(state, block, *arguments)

    monkeypatch.setattr(gradients_module, "add_scaled_block", counted)
    model_settings = ModelSettings(tiny_model_dirs[architecture])
    loaded = load_model(model_settings)
    blocks = gradient_blocks(select_parameters(loaded.model, model_settings))
    generator = torch.Generator().manual_seed(0)
    scales = {  # positive, varied over four orders of magnitude, as 1 / (sqrt(v_hat) + eps) are
        block.name: torch.exp(torch.randn(block.numel, generator=generator) * 2.0) for block in blocks
    }
    scaling = OptimizerScaling("test", "fingerprint", "position", scales, 1.0, 1e-8)
    sketch = SketchSettings(sketch_dim, 20, 42, "rapidgrad-v2" if algorithm == "exact" else algorithm)
    texts = [row["instruction"] + " " + row["output"] for row in training_rows[:5]]
    pairs = []
    for text in texts:
        ids = loaded.tokenizer(text)["input_ids"]
        pairs.append((ids, [-100] * 2 + ids[2:]))
    batch = collate(pairs, loaded.tokenizer.pad_token_id, "cpu")
    results = {}
    for path in ("factors", "materialise"):
        projector = make_projector(sketch, sum(b.numel for b in blocks), "cpu", blocks)
        sketcher = GradientSketcher(loaded.model, blocks, projector)
        sketcher.scaled_path = path
        sketcher.use_optimizer_state(scaling)
        results[path] = sketcher.sketch(batch)
        if path == "factors":
            assert set(taken) == {block.name for block in blocks if block.parameter.dim() == 2}
    fast, reference = results["factors"], results["materialise"]
    assert fast.vectors.shape == (len(texts), sketch_dim or sum(b.numel for b in blocks))
    difference = (fast.vectors - reference.vectors).norm(dim=1) / reference.vectors.norm(dim=1)
    assert float(difference.max()) < 1e-6, difference
    # float32 sums of squares, block by block, in another order: a few float32 roundings apart
    torch.testing.assert_close(fast.gradient_norms, reference.gradient_norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast.losses, reference.losses, rtol=0, atol=0)
    assert bool(fast.finite.all()) and bool(reference.finite.all())


def oracle_token_scores(model, names, denominators, input_ids, labels, query_vector: np.ndarray):
    """(token ids, scores): each response token's loss alone (HF's loss with only its label kept), plain
    autograd, divided by the denominators, against the query vector, over the example's scaled block norms."""
    parameters = dict(model.named_parameters())

    def scaled_gradients(kept_labels: list[int]) -> list[torch.Tensor]:
        loss = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([kept_labels])).loss
        grads = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
        return [
            (torch.zeros_like(parameters[n]) if g is None else g).reshape(-1) / denominators[n].reshape(-1)
            for n, g in zip(names, grads, strict=True)
        ]

    norms = [gradient.norm() for gradient in scaled_gradients(labels)]
    query, blocks, start = torch.tensor(query_vector), [], 0
    for name in names:
        blocks.append(query[start : start + parameters[name].numel()])
        start += parameters[name].numel()
    token_ids, scores = [], []
    for position in range(1, len(labels)):  # HF shifts: label i is predicted at i - 1; nothing predicts 0
        if labels[position] == -100:
            continue
        one = [-100] * len(labels)
        one[position] = labels[position]
        gradients = scaled_gradients(one)
        score = sum(
            float(g @ q) / float(n) for g, q, n in zip(gradients, blocks, norms, strict=True) if n > 0
        )
        token_ids.append(labels[position])
        scores.append(score)
    return token_ids, np.array(scores)


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_the_heatmap_with_a_state_equals_the_oracle(tmp_path, checkpoints, data_file, adapter):
    """`query --explain` on an index built with a state: every hit's token scores are those of the scaled
    gradients, from HF's loss of each token alone, plain autograd and the state dict (the oracle above)."""
    model_dir = checkpoints["base"] if adapter else checkpoints["full"]
    folder = checkpoints["adapter"] if adapter else checkpoints["full"]
    settings = build_settings(
        model_dir, checkpoints["adapter"] if adapter else None, sketch_dim=0, optimizer_state=folder
    )
    build_index(data_file, tmp_path / "index", settings, progress=False)
    index = Index.open(tmp_path / "index", device="cpu")
    prompt, response = "What does str.capitalize do?", "Return a capitalized version of the string."
    result = index.query(prompt, response, top_k=2, explain=2, per_token=False)
    names = checkpoints["adapter_names" if adapter else "full_names"]
    denominators = adam_denominators(folder + "/optimizer.pt", names)
    model, tokenizer = load_hf(checkpoints, adapter)
    examples, _ = load_examples(data_file, tokenizer, parse_template("auto"), 1024)
    by_id = {example.example_id: example for example in examples}
    prepared = index.prepare(prompt, response)
    query = oracle_vector(model, names, denominators, prepared.input_ids, prepared.labels)
    ones = {name: torch.ones_like(value) for name, value in denominators.items()}
    unscaled_query = oracle_vector(model, names, ones, prepared.input_ids, prepared.labels)
    assert len(result.helpful) == 2
    differences = []
    for hit in result.helpful:
        example = by_id[hit.id]
        token_ids, expected = oracle_token_scores(
            model, names, denominators, example.input_ids, example.labels, query
        )
        explained = hit.explanation["tokens"]
        assert [token["token_id"] for token in explained] == token_ids
        scores = np.array([token["score"] for token in explained])
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        # the token scores average to the exact whole score, the stored vectors' inner product
        np.testing.assert_allclose(scores.mean(), hit.score, rtol=1e-4, atol=1e-5)
        unscaled = oracle_vector(model, names, ones, example.input_ids, example.labels) @ unscaled_query
        differences.append(abs(unscaled - scores.mean()) / abs(scores.mean()))
    # the scaling shows: without it, a whole score (the tokens' mean) differs (the query's own row, a
    # hit, has cosine 1 in every block either way)
    assert max(differences) > 1e-2, differences


def test_per_token_query_vectors_take_the_batched_scaled_path_too(tmp_path, checkpoints, data_file):
    """A query's per-token rows share one forward (their factors repeat one example): under rapidgrad-kron
    with a state, the batched scaled path gives the per-token and whole vectors of the materialised one."""
    from rapidin_index.settings import SketchSettings

    folder = checkpoints["full"]
    sketch = SketchSettings(8192, 20, 42, "rapidgrad-kron")
    build_index(data_file, tmp_path / "index", build_settings(folder, sketch=sketch, optimizer_state=folder))
    index = Index.open(tmp_path / "index", device="cpu")
    prepared = index.prepare("What does str.capitalize do?", "Return a capitalized version of the string.")
    fast, _ = sketch_queries(index, [prepared], per_token=True)
    index.sketcher.scaled_path = "materialise"
    reference, _ = sketch_queries(index, [prepared], per_token=True)
    assert fast.shape == reference.shape and len(fast) > 3  # the whole generation, then one row a token
    difference = np.linalg.norm(fast - reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert difference.max() < 1e-5, difference
