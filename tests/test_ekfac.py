"""Weight-space EK-FAC on the query side (`rapidin_index.ekfac`): the fitted A, S, Lambda against plain
autograd of Hugging Face's own loss, H^-1 g against a dense solve, the query vector against the literal
sketch of H^-1 g, the Fisher + EK-FAC combination against brute-force z-scored sums, the file's life
(export/import, append), refusals, and the CLI in separate processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import build_settings, stored_vectors

from rapidin_index import ekfac, ekfac_fit
from rapidin_index.build import build_index
from rapidin_index.errors import PreconditionError
from rapidin_index.precondition import fit_index
from rapidin_index.retrieval import Index, sketch_queries
from rapidin_index.store.manifest import read_manifest

QUERIES = [
    {"prompt": "What does str.upper do?", "response": "Return a copy of the string converted to uppercase."},
    {"prompt": "What does list.sort do?", "response": "Sort the list in ascending order and return None."},
]


@pytest.fixture(scope="module")
def exact_index(tmp_path_factory, tiny_model_dirs, training_file) -> str:
    """K = 0 over every tensor of the tiny Llama (embeddings, norms, nn.Linear weights, head): 24 rows."""
    folder = tmp_path_factory.mktemp("ekfac") / "exact"
    build_index(training_file, folder, build_settings(tiny_model_dirs["llama"], sketch_dim=0), progress=False)
    return str(folder)


@pytest.fixture(scope="module")
def kron_index(tmp_path_factory, tiny_model_dirs, training_file) -> str:
    """K = 4096 rapidgrad-kron over the tiny Llama, layer-normalised rows."""
    from rapidin_index.settings import SketchSettings

    folder = tmp_path_factory.mktemp("ekfac") / "kron"
    settings = build_settings(
        tiny_model_dirs["llama"], sketch=SketchSettings(4096, 20, 42, algorithm="rapidgrad-kron")
    )
    build_index(training_file, folder, settings, progress=False)
    return str(folder)


def copy_of(index_dir, tmp_path) -> str:
    target = tmp_path / "index"
    shutil.copytree(index_dir, target)
    return str(target)


def stored_matrix(index_dir) -> np.ndarray:
    vectors = stored_vectors(index_dir)
    return np.stack([vectors[i] for i in sorted(vectors)]).astype(np.float64)


def fitted_factors(index_dir) -> list:
    manifest = read_manifest(index_dir)
    path = f"{index_dir}/{ekfac.weights_file(manifest.generation)}"
    return ekfac.load_factors(__import__("pathlib").Path(path), manifest.sketch["gradient_dim"])


def hf_model(index_dir):
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(index_dir)
    return AutoModelForCausalLM.from_pretrained(manifest.model["name_or_path"]).float().eval(), manifest


def training_pairs(index_dir, training_rows) -> list[tuple[list[int], list[int]]]:
    """Each training row as the index renders it: (input_ids, labels)."""
    from transformers import AutoTokenizer

    from rapidin_index.query import prepare_row

    manifest = read_manifest(index_dir)
    tokenizer = AutoTokenizer.from_pretrained(manifest.model["name_or_path"])
    prepared = [prepare_row(row, tokenizer, manifest) for row in training_rows]
    return [(p.input_ids, p.labels) for p in prepared]


@pytest.mark.parametrize("head", ["diagonal", "kronecker"])
def test_fitted_factors_equal_plain_autograd_of_the_hf_loss(tmp_path, exact_index, training_rows, head):
    """Empirical labels: A = E[a a^T], S = E[d d^T] over every token, Lambda = E_n[(Q_S^T G_n Q_A)^2] and
    a diagonal tensor's E[g_n^2], each from one example at a time through `model(ids, labels=...).loss`;
    the vocabulary head is a diagonal by default, Kronecker with ``head="kronecker"``."""
    index_dir = copy_of(exact_index, tmp_path)
    record = ekfac_fit.fit_index_weights(index_dir, "ekfac-weights", damping=0.2)  # default labels: sampled
    assert record["labels"] == "sampled" and record["rows"] == 24 and record["query_norms"] is True
    assert record["tensors"] == "linear" and record["row_norms"] is True
    record = ekfac_fit.fit_index_weights(
        index_dir, "ekfac-weights", damping=0.2, labels="empirical", head=head
    )
    assert record["head"] == head
    manifest = read_manifest(index_dir)
    assert manifest.precondition == record and record["file"] in manifest.files
    factors = fitted_factors(index_dir)
    model, _ = hf_model(index_dir)
    parameters = dict(model.named_parameters())
    names = manifest.parameters["names"]
    linear = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    (head_name,) = [name for name, module in linear.items() if module is model.get_output_embeddings()]
    assert head_name in names  # the tiny Llama's head is untied: an attributed nn.Linear
    diagonal_head = head_name if head == "diagonal" else None
    assert record["kronecker_tensors"] == sum(name in linear for name in names) - (head == "diagonal") > 0
    assert record["diagonal_tensors"] == len(names) - record["kronecker_tensors"] > 0
    inputs, outputs = {}, {}

    def keep(name):
        def hook(module, arguments, output):
            inputs[name], outputs[name] = arguments[0].detach(), output

        return hook

    hooks = [module.register_forward_hook(keep(name)) for name, module in linear.items()]
    covariances = {name: [0.0, 0.0] for name in linear}
    gradients = {name: [] for name in names}
    tokens = 0
    for ids, labels in training_pairs(index_dir, training_rows):
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        hooked = list(linear)
        found = torch.autograd.grad(loss, [outputs[n] for n in hooked] + [parameters[n] for n in names])
        for name, d in zip(hooked, found[: len(hooked)], strict=True):
            a, d = inputs[name][0].double(), d[0].double()
            covariances[name][0] += (a.T @ a).numpy()
            covariances[name][1] += (d.T @ d).numpy()
        for name, g in zip(names, found[len(hooked) :], strict=True):
            gradients[name].append(g.double().numpy())
        tokens += len(ids)
    for hook in hooks:
        hook.remove()
    for name, tensor in zip(names, factors, strict=True):
        per_example = np.stack(gradients[name])  # [rows, *shape]
        if name in linear and name != diagonal_head:
            assert tensor.kronecker
            a, s = (c / tokens for c in covariances[name])
            for basis, covariance in ((tensor.basis_in, a), (tensor.basis_out, s)):
                basis = basis.astype(np.float64)
                np.testing.assert_allclose(basis.T @ basis, np.eye(len(basis)), atol=1e-5)
                rotated = basis.T @ covariance @ basis  # diagonal: the eigenbasis of A (or S)
                off = rotated - np.diag(np.diag(rotated))
                assert np.abs(off).max() <= 1e-4 * np.abs(covariance).max(), name
            q_s, q_a = tensor.basis_out.astype(np.float64), tensor.basis_in.astype(np.float64)
            expected = np.mean([(q_s.T @ g @ q_a) ** 2 for g in per_example], axis=0)
        else:
            assert not tensor.kronecker
            expected = np.mean(per_example**2, axis=0).reshape(-1)
        np.testing.assert_allclose(tensor.eigenvalues, expected, rtol=2e-3, atol=1e-5 * expected.max())
        assert tensor.damping == pytest.approx(0.2 * expected.mean(), rel=2e-3)
        # the query's scale: the rows' mean gradient norm there (a layer-normalised index); the diagonal
        # tensors but the head are left out by default (tensors="linear", kronfluence's modules)
        mean_norm = np.mean([np.linalg.norm(g) for g in per_example])
        assert tensor.scale == pytest.approx(mean_norm if name in linear else 0.0, rel=2e-3)


def test_the_inverse_equals_a_dense_solve_of_the_kronecker_eigendecomposition():
    generator = np.random.default_rng(0)
    out, inside, rows = 5, 7, 40
    a = generator.standard_normal((rows, inside))
    s = generator.standard_normal((rows, out))
    _, q_a = np.linalg.eigh(a.T @ a / rows)
    _, q_s = np.linalg.eigh(s.T @ s / rows)
    values = generator.uniform(0.01, 2.0, (out, inside))
    tensor = ekfac.TensorFactors(
        0, out * inside, values.astype(np.float32), 0.05, q_s.astype(np.float32), q_a.astype(np.float32)
    )
    gradients = generator.standard_normal((3, out * inside))
    basis = np.kron(q_s, q_a)  # row-major vec(Q_S X Q_A^T) = (Q_S (x) Q_A) vec(X)
    dense = basis @ np.diag(values.reshape(-1) + 0.05) @ basis.T
    expected = np.linalg.solve(dense, gradients.T).T
    got = tensor.apply(torch.tensor(gradients, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    diagonal = ekfac.TensorFactors(0, 4, np.array([1.0, 2.0, 0.5, 0.0], np.float32), 0.5)
    np.testing.assert_allclose(
        diagonal.apply(torch.ones(1, 4)).numpy(), [[1 / 1.5, 1 / 2.5, 1.0, 2.0]], rtol=1e-6
    )


def raw_gradients(index_dir) -> np.ndarray:
    """[queries, D] plain gradients of QUERIES by autograd of Hugging Face's loss, in the index's order."""
    index = Index.open(index_dir, device="cpu", precondition="none")
    model, manifest = hf_model(index_dir)
    parameters = dict(model.named_parameters())
    attributed = [parameters[name] for name in manifest.parameters["names"]]
    out = []
    for query in QUERIES:
        prepared = index.prepare(query["prompt"], query["response"])
        loss = model(
            input_ids=torch.tensor([prepared.input_ids]), labels=torch.tensor([prepared.labels])
        ).loss
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, attributed)]).double().numpy())
    return np.stack(out)


def numpy_inverse(factors, gradients: np.ndarray) -> np.ndarray:
    out = gradients.copy()
    for tensor in factors:
        part = gradients[:, tensor.offset : tensor.offset + tensor.numel]
        values = tensor.eigenvalues.astype(np.float64) + tensor.damping
        if tensor.kronecker:
            q_s, q_a = tensor.basis_out.astype(np.float64), tensor.basis_in.astype(np.float64)
            matrices = part.reshape(len(part), *values.shape)
            part = np.stack([q_s @ ((q_s.T @ g @ q_a) / values) @ q_a.T for g in matrices]).reshape(
                len(part), -1
            )
        else:
            part = part / values
        out[:, tensor.offset : tensor.offset + tensor.numel] = part * tensor.scale
    return out


def scores_of(index: Index, per_token: bool = False) -> np.ndarray:
    prepared = [index.prepare(q["prompt"], q["response"]) for q in QUERIES]
    results = index.query_prepared(prepared, index.manifest.row_count, explain=0, per_token=per_token)
    scores = np.zeros((len(QUERIES), index.manifest.row_count))
    for number, result in enumerate(results):
        for hit in result.helpful:
            scores[number, hit.id] = hit.score
    return scores


def test_the_query_vector_is_the_literal_sketch_of_the_preconditioned_gradient(tmp_path, kron_index):
    from rapidin_index.settings import SketchSettings
    from rapidin_index.sketch import reference_sketch

    index_dir = copy_of(kron_index, tmp_path)
    ekfac_fit.fit_index_weights(index_dir, "ekfac-weights")
    index = Index.open(index_dir, device="cpu")
    assert index.precondition == "ekfac-weights"
    preconditioned = numpy_inverse(fitted_factors(index_dir), raw_gradients(index_dir))
    expected = (
        reference_sketch(
            torch.tensor(preconditioned, dtype=torch.float32),
            SketchSettings.from_dict(index.manifest.sketch),
            index.blocks,
        )
        .double()
        .numpy()
    )
    prepared = [index.prepare(q["prompt"], q["response"]) for q in QUERIES]
    got = sketch_queries(index, prepared, per_token=False)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    scores = scores_of(index)
    want = expected @ stored_matrix(index_dir).T
    np.testing.assert_allclose(scores, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    # it ranks otherwise than the plain query; per token the whole-generation hits are the same
    plain = scores_of(Index.open(index_dir, device="cpu", precondition="none"))
    assert not np.array_equal(np.argsort(-plain[0]), np.argsort(-scores[0]))
    np.testing.assert_allclose(
        scores_of(index, per_token=True), scores, rtol=1e-3, atol=1e-4 * np.abs(want).max()
    )
    with pytest.raises(
        PreconditionError, match="--no-query-norms: a ekfac-weights query .* always with its norms"
    ):
        Index.open(index_dir, device="cpu", query_norms=False)


def test_exact_vectors_without_layer_norm_score_as_the_hf_gradients_preconditioned(
    tmp_path_factory, tiny_model_dirs, training_file, training_rows
):
    """The retraining recipe (K = 0, ``--normalize none``, ``fit --kind ekfac-weights`` with its defaults):
    the fit takes the exact-vector damping (0.3), no row-norm scale, and each score is the brute-force
    ``<H^-1 g_q, g_i>`` with both gradients from autograd of Hugging Face's loss, one example at a time."""
    folder = tmp_path_factory.mktemp("ekfac") / "exact-none"
    settings = build_settings(tiny_model_dirs["llama"], sketch_dim=0, normalize="none", fit="ekfac-weights")
    report = build_index(training_file, folder, settings, progress=False)  # build --fit ekfac-weights
    assert "fitted the ekfac-weights preconditioner over 24 rows" in report.notes
    record = read_manifest(folder).precondition
    assert (
        record["kind"] == "ekfac-weights"
        and record["damping"] == ekfac.EXACT_DAMPING == 0.3
        and record["row_norms"] is False
    )
    assert ekfac.exact_vectors_hint(read_manifest(folder)) is None
    factors = fitted_factors(folder)
    model, manifest = hf_model(folder)
    kept = {manifest.parameters["names"].index("lm_head.weight")}  # the head: a diagonal, kept
    scales = [1.0 if f.kronecker or n in kept else 0.0 for n, f in enumerate(factors)]
    assert [f.scale for f in factors] == scales
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert not factors[min(kept)].kronecker and sum(f.kronecker for f in factors) == len(linear) - 1 > 0
    parameters = dict(model.named_parameters())
    attributed = [parameters[name] for name in manifest.parameters["names"]]
    rows = []
    for input_ids, labels in training_pairs(folder, training_rows):
        loss = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, attributed)]).double().numpy())
    want = numpy_inverse(factors, raw_gradients(folder)) @ np.stack(rows).T
    got = scores_of(Index.open(folder, device="cpu"))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_build_fit_takes_every_kind_fit_does():
    from rapidin_index import precondition
    from rapidin_index.settings import FIT_KINDS

    assert FIT_KINDS == precondition.PRECONDITIONS


def test_a_sketched_index_keeps_the_sketch_damping_and_names_the_exact_recipe(kron_index):
    manifest = read_manifest(kron_index)
    assert ekfac.default_damping(manifest.sketch["sketch_dim"]) == ekfac.DEFAULT_DAMPING == 3.0
    hint = ekfac.exact_vectors_hint(manifest)
    assert "--k 0 --normalize none" in hint


def test_the_combination_ranks_as_the_sum_of_z_scores(tmp_path, kron_index):
    """fisher+ekfac-weights: one search whose scores are, per query, the brute-force sum of the two kinds'
    z-scored scores (numpy over every row) plus a constant."""
    index_dir = copy_of(kron_index, tmp_path)
    record = ekfac_fit.fit_index_weights(index_dir, "fisher+ekfac-weights")
    assert record["kind"] == "fisher+ekfac-weights" and record["query_norms"] is True
    combined = scores_of(Index.open(index_dir, device="cpu"))
    parts = [
        scores_of(Index.open(index_dir, device="cpu", precondition=k)) for k in ("fisher", "ekfac-weights")
    ]
    z = sum((p - p.mean(axis=1, keepdims=True)) / p.std(axis=1, keepdims=True) for p in parts)
    difference = combined - z
    assert np.abs(difference - difference.mean(axis=1, keepdims=True)).max() < 1e-3 * np.abs(z).max()
    for number in range(len(QUERIES)):
        assert np.array_equal(np.argsort(-combined[number]), np.argsort(-z[number]))
    with pytest.raises(PreconditionError, match="fitted with fisher\\+ekfac-weights; refit it with"):
        Index.open(index_dir, device="cpu", precondition="kfac")


def test_export_import_keep_the_fit_an_append_drops_it(tmp_path, tiny_model_dirs, training_rows):
    from rapidin_index.errors import IntegrityError
    from rapidin_index.store.bundle_export import export_index
    from rapidin_index.store.bundle_import import import_bundle

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps(row) + "\n" for row in training_rows[:8]))
    second.write_text("".join(json.dumps(row) + "\n" for row in training_rows[8:12]))
    settings = build_settings(tiny_model_dirs["llama"], tiny_model_dirs["llama_lora"], sketch_dim=1024)
    build_index(first, tmp_path / "index", settings, progress=False)
    ekfac_fit.fit_index_weights(tmp_path / "index", "ekfac-weights")
    fitted = scores_of(Index.open(tmp_path / "index", device="cpu"))
    bundle = export_index(tmp_path / "index", tmp_path / "bundle.tar")
    import_bundle(bundle, tmp_path / "imported")
    np.testing.assert_allclose(scores_of(Index.open(tmp_path / "imported", device="cpu")), fitted, rtol=1e-5)
    name = ekfac.weights_file(read_manifest(tmp_path / "imported").generation)
    (tmp_path / "imported" / name).write_bytes(b"damaged")
    with pytest.raises(IntegrityError, match=f"{name} does not match its checksum"):
        Index.open(tmp_path / "imported", device="cpu")
    build_index(second, tmp_path / "index", settings, append=True, progress=False)
    manifest = read_manifest(tmp_path / "index")
    assert manifest.precondition is None and not any(f.startswith("ekfac-weights-") for f in manifest.files)
    with pytest.raises(PreconditionError, match="has no weight-space EK-FAC fit .*rapidin-index fit --index"):
        Index.open(tmp_path / "index", device="cpu", precondition="ekfac-weights")


def test_a_fit_needs_plain_gradients_and_known_options():
    from types import SimpleNamespace

    built_with_state = SimpleNamespace(manifest=SimpleNamespace(optimizer_state={"path": "x"}))
    with pytest.raises(PreconditionError, match="--optimizer-state.*use --kind fisher"):
        ekfac_fit.fit_weights(built_with_state)
    with pytest.raises(PreconditionError, match="--labels 'true' is not one of sampled, empirical"):
        ekfac_fit.fit_index_weights("nowhere", labels="true")
    with pytest.raises(PreconditionError, match="--head 'full' is not one of diagonal, kronecker"):
        ekfac_fit.fit_index_weights("nowhere", head="full")
    with pytest.raises(PreconditionError, match="fitted with the model over the rows: rapidin_index.ekfac"):
        fit_index("nowhere", kind="ekfac-weights")  # the sketch-space fit points at the model's


def test_the_cli_fits_and_queries(tmp_path, kron_index):
    index_dir = copy_of(kron_index, tmp_path)
    executable = [sys.executable, "-m", "rapidin_index.cli.main"]
    done = subprocess.run(
        executable + ["fit", "--index", index_dir, "--kind", "ekfac-weights", "--labels", "empirical"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "fitted weight-space EK-FAC of 24 rows" in done.stderr
    assert "damping 3.0 x mean eigenvalue" in done.stderr
    assert "build --k 0 --normalize none" in " ".join(done.stderr.split())
    query = executable + ["query", "--index", index_dir, "--device", "cpu", "--explain", "0", "--top-k", "24"]
    query += ["--prompt", QUERIES[0]["prompt"], "--response", QUERIES[0]["response"], "--per-token", "off"]
    done = subprocess.run(query + ["--format", "json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert value["index"]["precondition"] == "ekfac-weights"
    got = np.array([{h["id"]: h["score"] for h in value["helpful"]}[i] for i in range(24)])
    expected = scores_of(Index.open(index_dir, device="cpu"))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    done = subprocess.run(query + ["--precondition", "fisher"], capture_output=True, text=True)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "fitted with ekfac-weights; refit it with: rapidin-index fit --kind fisher" in done.stderr


def test_an_optimizer_state_index_is_refused_before_anything_is_written(tmp_path, kron_index):
    index_dir = copy_of(kron_index, tmp_path)
    from rapidin_index.store.manifest import write_manifest

    manifest = read_manifest(index_dir)  # as a build with --optimizer-state records it (resealed)
    manifest.optimizer_state = {"path": "elsewhere", "fingerprint": "0" * 64}
    write_manifest(index_dir, manifest)
    with pytest.raises(PreconditionError, match="built with --optimizer-state.*use --kind fisher"):
        ekfac_fit.fit_index_weights(index_dir, "fisher+ekfac-weights")
    assert read_manifest(index_dir).precondition is None  # not even the Fisher part


def test_the_cli_refuses_a_fit_without_the_model_on_one_line(tmp_path, kron_index):
    from rapidin_index.store.manifest import write_manifest

    index_dir = copy_of(kron_index, tmp_path)
    manifest = read_manifest(index_dir)
    manifest.model["name_or_path"] = str(tmp_path / "moved-away")
    write_manifest(index_dir, manifest)
    executable = [sys.executable, "-m", "rapidin_index.cli.main"]
    done = subprocess.run(
        executable + ["fit", "--index", index_dir, "--kind", "ekfac-weights"], capture_output=True, text=True
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) <= 2, done.stderr  # the error, and where the model was
    assert "moved-away" in done.stderr and "Traceback" not in done.stderr
    assert read_manifest(index_dir).precondition is None
