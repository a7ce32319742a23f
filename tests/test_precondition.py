"""The query-side Fisher preconditioner: scores against brute-force numpy (G^T G / N + lambda I)^-1, and the
fitted file through fit, export/import, append, merge and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import build_settings, stored_vectors

from rapidin_index import precondition
from rapidin_index.build import build_index
from rapidin_index.errors import IntegrityError, PreconditionError
from rapidin_index.precondition import fit_index
from rapidin_index.retrieval import Index, sketch_queries
from rapidin_index.store.bundle_export import export_index
from rapidin_index.store.bundle_import import import_bundle
from rapidin_index.store.manifest import read_manifest

QUERIES = [
    {"prompt": "What does str.upper do?", "response": "Return a copy of the string converted to uppercase."},
    {"prompt": "What does list.sort do?", "response": "Sort the list in ascending order and return None."},
]


@pytest.fixture(scope="module")
def lora_index(tmp_path_factory, tiny_model_dirs, training_file) -> str:
    """An exact (K = 0) index of the LoRA adapter's gradients: D = a few thousand, 24 rows."""
    folder = tmp_path_factory.mktemp("fisher") / "index"
    settings = build_settings(tiny_model_dirs["llama"], tiny_model_dirs["llama_lora"], sketch_dim=0)
    build_index(training_file, folder, settings, progress=False)
    return str(folder)


def stored_matrix(index_dir) -> np.ndarray:
    """[N, K] float64 stored vectors by id, read with FAISS itself."""
    vectors = stored_vectors(index_dir)
    return np.stack([vectors[i] for i in sorted(vectors)]).astype(np.float64)


def brute_force(vectors: np.ndarray, queries: np.ndarray, spans, damping: float) -> np.ndarray:
    """Scores [queries, N]: each block's (G_b^T G_b / N + lambda_b I)^-1 q_b, lambda_b = damping x
    trace / min(N, width)."""
    rows = len(vectors)
    out = np.zeros_like(queries, dtype=np.float64)
    for start, stop in spans:
        part = vectors[:, start:stop]
        fisher = part.T @ part / rows
        lam = damping * np.trace(fisher) / min(rows, stop - start)  # the mean nonzero eigenvalue
        out[:, start:stop] = np.linalg.solve(fisher + lam * np.eye(stop - start), queries[:, start:stop].T).T
    return out @ vectors.T


def tensor_spans_of(manifest) -> list[tuple[int, int]]:
    """Each attributed tensor's coordinates in an exact (K = 0) vector, from the manifest's shapes."""
    ends = np.cumsum([int(np.prod(shape)) for shape in manifest.parameters["shapes"]])
    return list(zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True))


def scores_of(index: Index) -> np.ndarray:
    """[queries, N] scores of QUERIES' whole generations from the index's own search, by id."""
    prepared = [index.prepare(q["prompt"], q["response"]) for q in QUERIES]
    results = index.query_prepared(prepared, index.manifest.row_count, explain=0, per_token=False)
    scores = np.zeros((len(QUERIES), index.manifest.row_count))
    for number, result in enumerate(results):
        for hit in result.helpful:
            scores[number, hit.id] = hit.score
    return scores


def raw_queries(index_dir) -> np.ndarray:
    """[queries, D] each query's raw gradient (no layer norm) of Hugging Face's own loss, by plain autograd
    over the index's attributed parameters in its order: what a fit with query_norms scores, on K = 0."""
    import torch

    index = Index.open(index_dir, device="cpu", precondition="none")
    parameters = dict(index.loaded.model.named_parameters())
    attributed = [parameters[name] for name in index.manifest.parameters["names"]]
    out = []
    for query in QUERIES:
        prepared = index.prepare(query["prompt"], query["response"])
        loss = index.loaded.model(
            input_ids=torch.tensor([prepared.input_ids]), labels=torch.tensor([prepared.labels])
        ).loss
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, attributed)]).numpy())
    return np.stack(out).astype(np.float64)


def plain_queries(index_dir) -> np.ndarray:
    index = Index.open(index_dir, device="cpu", precondition="none")
    prepared = [index.prepare(q["prompt"], q["response"]) for q in QUERIES]
    return sketch_queries(index, prepared, per_token=False)[0].astype(np.float64)


def test_query_norms_are_a_query_time_choice(tmp_path, lora_index):
    """fit records query norms off by default; a query turns them on (or a query_norms fit off) without a
    refit, and gets what the other fit's default gives; with no preconditioner they are refused."""
    import shutil

    index_dir = tmp_path / "index"
    shutil.copytree(lora_index, index_dir)
    record = fit_index(index_dir, damping=0.5, structure="tensor")
    assert record["query_norms"] is False
    vectors, spans = stored_matrix(index_dir), tensor_spans_of(read_manifest(index_dir))
    with_norms = scores_of(Index.open(index_dir, device="cpu", query_norms=True))
    expected = brute_force(vectors, raw_queries(index_dir), spans, 0.5)
    np.testing.assert_allclose(with_norms, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    without = scores_of(Index.open(index_dir, device="cpu"))  # the fit's default: layer-normalised queries
    expected = brute_force(vectors, plain_queries(index_dir), spans, 0.5)
    np.testing.assert_allclose(without, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    with pytest.raises(PreconditionError, match="--query-norms applies to a preconditioned query"):
        Index.open(index_dir, device="cpu", precondition="none", query_norms=True)


@pytest.mark.parametrize("structure", ["whole", "tensor"])
def test_preconditioned_scores_equal_brute_force(tmp_path, lora_index, structure):
    import shutil

    index_dir = tmp_path / "index"
    shutil.copytree(lora_index, index_dir)
    # per tensor: the query keeps its per-tensor norms (the default); whole: it is layer-normalised too
    record = fit_index(index_dir, damping=0.5, structure=structure, query_norms=structure == "tensor")
    manifest = read_manifest(index_dir)
    assert record["structure"] == structure and manifest.precondition == record
    assert record["query_norms"] == (structure == "tensor")
    assert precondition.fisher_file(manifest.generation) in manifest.files
    vectors = stored_matrix(index_dir)
    if structure == "whole":
        spans = [(0, vectors.shape[1])]
    else:
        spans = tensor_spans_of(manifest)
        assert record["blocks"] == len(manifest.parameters["names"]) > 1
    queries = raw_queries(index_dir) if structure == "tensor" else plain_queries(index_dir)
    expected = brute_force(vectors, queries, spans, 0.5)
    got = scores_of(Index.open(index_dir, device="cpu"))  # default: fitted, so fisher
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    # --precondition none gives the plain inner products, and the two rank the rows differently
    plain = scores_of(Index.open(index_dir, device="cpu", precondition="none"))
    np.testing.assert_allclose(plain, plain_queries(index_dir) @ vectors.T, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(np.argsort(-plain[0]), np.argsort(-got[0]))


def test_the_low_rank_path_keeps_the_top_eigenpairs_and_damps_the_rest_by_their_mean(monkeypatch):
    """A block wider than DENSE_LIMIT: its top-r eigenpairs, the rest at their mean eigenvalue; with r at
    least the rows, exactly the dense inverse (the rest is 0)."""
    generator = np.random.default_rng(0)
    vectors = generator.standard_normal((30, 300)) @ np.diag(np.linspace(3, 0.1, 300))
    queries = generator.standard_normal((4, 300))
    monkeypatch.setattr(precondition, "DENSE_LIMIT", 50)
    for rank in (8, 64):
        (block,) = precondition.fit_fisher(vectors, [(0, 300)], damping=0.1, rank=rank)
        fisher = vectors.T @ vectors / 30
        values, basis = np.linalg.eigh(fisher)
        values, basis = values[::-1], basis[:, ::-1]
        kept = min(rank, 30)
        rest = values[kept:].sum() / (300 - kept)
        lam = 0.1 * np.trace(fisher) / 30  # min(rows, width)
        approximated = basis @ np.diag(np.r_[values[:kept], np.full(300 - kept, rest)]) @ basis.T
        expected = np.linalg.solve(approximated + lam * np.eye(300), queries.T).T
        np.testing.assert_allclose(block.apply(queries), expected, rtol=1e-4, atol=1e-5)  # float32 fit
        if rank >= 30:
            dense = np.linalg.solve(fisher + lam * np.eye(300), queries.T).T
            np.testing.assert_allclose(block.apply(queries), dense, rtol=1e-4, atol=1e-5)


def test_export_import_keeps_the_fit_and_append_drops_it(tmp_path, tiny_model_dirs, training_rows):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps(row) + "\n" for row in training_rows[:8]))
    second.write_text("".join(json.dumps(row) + "\n" for row in training_rows[8:12]))
    settings = build_settings(
        tiny_model_dirs["llama"], tiny_model_dirs["llama_lora"], sketch_dim=0, fit="fisher"
    )
    report = build_index(first, tmp_path / "index", settings, progress=False)
    assert any("fitted the Fisher" in note for note in report.notes)
    fitted = scores_of(Index.open(tmp_path / "index", device="cpu"))
    bundle = export_index(tmp_path / "index", tmp_path / "bundle.tar")
    import_bundle(bundle, tmp_path / "imported")
    imported = read_manifest(tmp_path / "imported")
    assert imported.precondition is not None
    np.testing.assert_allclose(scores_of(Index.open(tmp_path / "imported", device="cpu")), fitted, rtol=1e-5)
    # A damaged file is refused on one line that says how to fix it (by the open's check of every listed
    # file, before the fit is read)
    name = precondition.fisher_file(imported.generation)
    (tmp_path / "imported" / name).write_bytes(b"damaged")
    with pytest.raises(IntegrityError, match=f"{name} does not match its checksum.*re-import"):
        Index.open(tmp_path / "imported", device="cpu")
    # An append drops the fit and says so; asking for fisher then is refused; fit makes it current again.
    plain = build_settings(tiny_model_dirs["llama"], tiny_model_dirs["llama_lora"], sketch_dim=0)
    report = build_index(second, tmp_path / "index", plain, append=True, progress=False)
    assert any("no longer covers its rows and was dropped" in note for note in report.notes)
    manifest = read_manifest(tmp_path / "index")
    assert manifest.precondition is None and not any(f.startswith("fisher-") for f in manifest.files)
    assert Index.open(tmp_path / "index", device="cpu").precondition == "none"
    with pytest.raises(PreconditionError, match="has no fitted Fisher preconditioner.*rapidin-index fit"):
        Index.open(tmp_path / "index", device="cpu", precondition="fisher")
    fit_index(tmp_path / "index")
    assert read_manifest(tmp_path / "index").precondition["rows"] == 12


def test_open_checks_the_fit_file_once_and_a_later_switch_checks_it_again(tmp_path, lora_index, monkeypatch):
    """`Index.open` checks every listed file (xxh3 and stamps), the fit among them, so loading the fit then
    computes no sha256 of it; `use_precondition` called later (the file may have changed since) does."""
    import shutil

    import rapidin_index.files as files

    index_dir = tmp_path / "index"
    shutil.copytree(lora_index, index_dir)
    fit_index(index_dir)
    name = precondition.fisher_file(read_manifest(index_dir).generation)
    hashed = []
    real = files.sha256_path

    def counted(path, *arguments, **keywords):
        hashed.append(Path(path).name)
        return real(path, *arguments, **keywords)

    monkeypatch.setattr(files, "sha256_path", counted)
    index = Index.open(index_dir, device="cpu")
    assert index.precondition == "fisher" and name not in hashed
    index.use_precondition("none")
    index.use_precondition("fisher")
    assert hashed.count(name) == 1
    (index_dir / name).write_bytes(b"damaged")
    with pytest.raises(PreconditionError, match=f"{name} does not match its checksum in the manifest"):
        index.use_precondition("fisher")


def test_a_merge_drops_the_shards_fits(tmp_path, tiny_model_dirs, training_rows):
    from rapidin_index.store.shards import merge_shards

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in training_rows[:6]))
    for shard in range(2):
        settings = build_settings(
            tiny_model_dirs["llama"],
            tiny_model_dirs["llama_lora"],
            sketch_dim=0,
            num_shards=2,
            shard_index=shard,
        )
        build_index(data, tmp_path / f"shard{shard}", settings, progress=False)
        fit_index(tmp_path / f"shard{shard}")
    merged = merge_shards([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    assert merged.precondition is None and not any(f.startswith("fisher-") for f in merged.files)


def test_the_cli_fits_and_queries_with_and_without_it(tmp_path, lora_index):
    import shutil

    index_dir = tmp_path / "index"
    shutil.copytree(lora_index, index_dir)
    executable = [sys.executable, "-m", "rapidin_index.cli.main"]
    done = subprocess.run(
        executable + ["fit", "--index", str(index_dir), "--damping", "0.5", "--query-norms"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "fitted the Fisher of 24 rows" in done.stderr  # the console writes to stderr
    query = executable + ["query", "--index", str(index_dir), "--device", "cpu", "--explain", "0"]
    query += ["--prompt", QUERIES[0]["prompt"], "--response", QUERIES[0]["response"], "--per-token", "off"]
    query += ["--format", "json", "--top-k", "24"]
    results = {}
    for option in ("fisher", "none"):
        done = subprocess.run(query + ["--precondition", option], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        value = json.loads(done.stdout)
        assert value["index"]["precondition"] == option
        results[option] = {hit["id"]: hit["score"] for hit in value["helpful"]}
    vectors = stored_matrix(index_dir)
    spans = tensor_spans_of(read_manifest(index_dir))  # auto: per tensor, as K = 0 keeps tensors apart
    assert read_manifest(index_dir).precondition["structure"] == "tensor"
    expected = brute_force(vectors, raw_queries(index_dir)[:1], spans, 0.5)[0]
    got = np.array([results["fisher"][i] for i in range(24)])
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    done = subprocess.run(query + ["--no-query-norms"], capture_output=True, text=True)  # a query-time choice
    assert done.returncode == 0, done.stderr
    hits = {hit["id"]: hit["score"] for hit in json.loads(done.stdout)["helpful"]}
    expected = brute_force(vectors, plain_queries(index_dir)[:1], spans, 0.5)[0]
    got = np.array([hits[i] for i in range(24)])
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    done = subprocess.run(query + ["--precondition", "both"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --precondition 'both' is not one of none, fisher, kfac, ekfac, ekfac-weights, "
        "fisher+ekfac-weights"
    ]


def test_a_block_with_more_rows_than_coordinates_is_decomposed_densely():
    generator = np.random.default_rng(1)
    vectors = generator.standard_normal((80, 40)) * np.linspace(2, 0.01, 40)
    queries = generator.standard_normal((3, 40))
    (block,) = precondition.fit_fisher(vectors, [(0, 40)], damping=0.3, rank=4)
    assert block.eigenvectors.shape == (40, 40) and block.rest == 0  # every eigenpair, whatever the rank
    fisher = vectors.T @ vectors / 80
    lam = 0.3 * np.trace(fisher) / 40  # min(rows, width)
    expected = np.linalg.solve(fisher + lam * np.eye(40), queries.T).T
    np.testing.assert_allclose(block.apply(queries), expected, rtol=1e-4, atol=1e-5)  # float32


def dense_inverse_of_stored(path, width: int) -> np.ndarray:
    """[width, width] float64 (F + lambda I)^-1 of a fisher file's stored factors, read with numpy alone:
    per block V diag(eigenvalues) V^T + rest (I - V V^T) + damping I, inverted densely."""
    inverse = np.zeros((width, width))
    with np.load(path) as stored:
        for number, (start, stop) in enumerate(stored["spans"]):
            vectors = stored[f"eigenvectors_{number}"].astype(np.float64)  # [w, r]
            values = stored[f"eigenvalues_{number}"]
            projector = vectors @ vectors.T
            fisher = (vectors * values) @ vectors.T + stored["rest"][number] * (
                np.eye(stop - start) - projector
            )
            block = fisher + stored["damping"][number] * np.eye(stop - start)
            inverse[start:stop, start:stop] = np.linalg.inv(block)
    return inverse


def test_the_query_side_product_equals_a_dense_inverse_of_the_stored_factors(tmp_path, monkeypatch):
    """Every kind of Fisher block (dense, truncated with a rest, bins no tensor uses), saved and loaded as
    a query opens it: the preconditioned vectors equal numpy's dense (F + lambda I)^-1 of the same stored
    factors to float32 rounding, one query or many, the caller's array untouched."""
    generator = np.random.default_rng(3)
    vectors = generator.standard_normal((60, 300)) * np.linspace(3, 0.05, 300)
    vectors[:, 200:270] = 0  # bins no tensor uses (wider than the rows): no eigenpair is kept
    monkeypatch.setattr(precondition, "DENSE_LIMIT", 64)
    spans = [(0, 30), (30, 200), (200, 270), (270, 300)]  # dense (30 <= 60 rows), truncated, empty, dense
    blocks = precondition.fit_fisher(vectors, spans, damping=0.2, rank=40)
    assert [b.eigenvalues.size for b in blocks] == [30, 40, 0, 30] and blocks[1].rest > 0
    precondition.save_blocks(tmp_path / "fisher-g0001.npz", blocks)
    loaded = precondition.Preconditioner(precondition.load_blocks(tmp_path / "fisher-g0001.npz", 300), {})
    inverse = dense_inverse_of_stored(tmp_path / "fisher-g0001.npz", 300)
    for count in (1, 7, 20):  # a few queries take V in slices, more in one piece
        queries = generator.standard_normal((count, 300))  # float64: apply takes any float array
        before = queries.copy()
        got = loaded.apply(queries)
        expected = queries @ inverse  # symmetric
        assert got.dtype == np.float32 and np.array_equal(queries, before)
        scale = np.abs(expected).max(axis=1, keepdims=True)
        assert np.abs(got - expected).max() / scale.min() < 2e-6  # float32 rounding (eps 1.2e-7)
        np.testing.assert_allclose(got[:, 200:270], queries[:, 200:270] / blocks[2].damping, rtol=1e-6)


def test_a_few_queries_run_on_one_thread_and_give_torch_its_threads_back(monkeypatch):
    """A small batch's products run with torch on one thread, a larger one's on torch's threads; afterwards
    torch has the threads it had when the fit was loaded."""
    import torch

    generator = np.random.default_rng(4)
    blocks = precondition.fit_fisher(generator.standard_normal((20, 50)), [(0, 50)], damping=0.5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        preconditioner = precondition.Preconditioner(blocks, {})
        seen = []
        monkeypatch.setattr(
            precondition.FisherProduct, "apply_", lambda self, part: seen.append(torch.get_num_threads())
        )
        preconditioner.apply(generator.standard_normal((1, 50)))
        preconditioner.apply(generator.standard_normal((precondition.FisherProduct.SMALL_BATCH + 1, 50)))
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- K-FAC and EK-FAC


def kronecker_brute_force(vectors, queries, pieces_of, kind: str, damping: float) -> np.ndarray:
    """Scores [queries, N] with each tensor's (E)K-FAC inverse built densely: per piece (a x b matrices S_n
    of the vectors), L = mean S S^T, R = mean S^T S; K-FAC F = kron(L, R) / trace(L); EK-FAC F = U diag(d) U^T
    with U = kron(U_L, U_R) and d the mean squared coordinates of the rows in U; lambda = damping x
    trace(F_segment) / width. ``pieces_of``: [(start, pieces, a, b)] per tensor; other bins stay as they are."""
    rows = len(vectors)
    out = queries.astype(np.float64).copy()
    for start, pieces, a, b in pieces_of:
        width = pieces * a * b
        lam = damping * np.sum(vectors[:, start : start + width] ** 2) / rows / width
        for piece in range(pieces):
            first = start + piece * a * b
            matrices = vectors[:, first : first + a * b].reshape(rows, a, b)
            left = sum(m @ m.T for m in matrices) / rows
            right = sum(m.T @ m for m in matrices) / rows
            if not np.trace(left) > 0:
                continue  # rows all zero here (a tensor without gradient): no score to change
            if kind == "kfac":
                fisher = np.kron(left, right) / np.trace(left)
            else:
                basis = np.kron(np.linalg.eigh(left)[1], np.linalg.eigh(right)[1])
                fisher = basis @ np.diag(((matrices.reshape(rows, -1) @ basis) ** 2).mean(0)) @ basis.T
            part = queries[:, first : first + a * b].T
            out[:, first : first + a * b] = np.linalg.solve(fisher + lam * np.eye(a * b), part).T
    return out @ vectors.T


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kfac_scores_equal_brute_force_on_exact_vectors(tmp_path, lora_index, kind):
    """K = 0: each LoRA matrix is one (rows x cols) piece of its own coordinates."""
    import shutil

    index_dir = tmp_path / "index"
    shutil.copytree(lora_index, index_dir)
    record = fit_index(index_dir, kind=kind, damping=0.3, query_norms=True)
    manifest = read_manifest(index_dir)
    assert record["kind"] == kind and record["structure"] == "tensor"
    shapes = [tuple(shape) for shape in manifest.parameters["shapes"]]
    assert all(len(shape) == 2 and min(shape) > 1 for shape in shapes)  # real Kronecker factors
    starts = np.concatenate([[0], np.cumsum([a * b for a, b in shapes])[:-1]])
    pieces_of = [(int(start), 1, a, b) for start, (a, b) in zip(starts, shapes, strict=True)]
    vectors = stored_matrix(index_dir)
    expected = kronecker_brute_force(vectors, raw_queries(index_dir), pieces_of, kind, 0.3)
    got = scores_of(Index.open(index_dir, device="cpu"))  # default: the fitted kind
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    fisher = brute_force(vectors, raw_queries(index_dir), tensor_spans_of(manifest), 0.3)
    assert not np.allclose(got, fisher, rtol=1e-2)  # not the empirical Fisher under another name


@pytest.fixture(scope="module")
def kron_index(tmp_path_factory, tiny_model_dirs, training_file) -> str:
    """A full tiny Llama sketched by rapidgrad-kron at K = 16384: 4 hashed 16 x 16 pieces a larger tensor."""
    from rapidin_index.settings import SketchSettings

    folder = tmp_path_factory.mktemp("kron") / "index"
    settings = build_settings(
        tiny_model_dirs["llama"], sketch=SketchSettings(16384, algorithm="rapidgrad-kron")
    )
    build_index(training_file, folder, settings, progress=False)
    return str(folder)


def test_ekfac_on_kron_pieces_equals_brute_force_and_survives_export(tmp_path, kron_index):
    """Pieces laid out as the sketch lays them (`kronecker.kron_layout`), fitted apart; the format-2 file
    goes through export and import."""
    import shutil

    from rapidin_index.sketch.kron import kron_layout

    index_dir = tmp_path / "index"
    shutil.copytree(kron_index, index_dir)
    fit_index(index_dir, kind="ekfac", damping=1.0, query_norms=False)
    manifest = read_manifest(index_dir)
    sizes = [int(np.prod(shape)) for shape in manifest.parameters["shapes"]]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    tensors = list(zip(offsets, [tuple(s) for s in manifest.parameters["shapes"]], strict=True))
    segments = kron_layout(tensors, manifest.sketch["gradient_dim"], 16384)
    assert max(segment.pieces for segment in segments) > 1
    pieces_of = [(s.start, s.pieces, s.row_bins, s.col_bins) for s in segments if s.width]
    vectors = stored_matrix(index_dir)
    queries = plain_queries(index_dir)
    covered = np.zeros(16384, bool)
    for start, pieces, a, b in pieces_of:
        covered[start : start + pieces * a * b] = True
    expected = kronecker_brute_force(vectors, queries, pieces_of, "ekfac", 1.0)
    assert not covered.all() and not vectors[:, ~covered].any()  # bins no tensor reaches stay zero
    got = scores_of(Index.open(index_dir, device="cpu"))
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    bundle = export_index(index_dir, tmp_path / "bundle.tar")
    import_bundle(bundle, tmp_path / "imported")
    imported = Index.open(tmp_path / "imported", device="cpu")
    assert imported.precondition == "ekfac"
    np.testing.assert_allclose(scores_of(imported), got, rtol=1e-5)


def test_a_version_1_fisher_file_still_reads(tmp_path):
    generator = np.random.default_rng(2)
    vectors = generator.standard_normal((20, 12))
    blocks = precondition.fit_fisher(vectors, [(0, 5), (5, 12)], damping=0.5)
    arrays = {
        "version": np.array([1]),
        "spans": np.array([[0, 5], [5, 12]]),
        "rest": np.array([b.rest for b in blocks]),
        "damping": np.array([b.damping for b in blocks]),
    }
    for number, block in enumerate(blocks):
        arrays[f"eigenvectors_{number}"] = block.eigenvectors
        arrays[f"eigenvalues_{number}"] = block.eigenvalues
    np.savez(tmp_path / "fisher-g0001.npz", **arrays)
    loaded = precondition.Preconditioner(precondition.load_blocks(tmp_path / "fisher-g0001.npz", 12), {})
    queries = generator.standard_normal((3, 12))
    np.testing.assert_allclose(loaded.apply(queries), precondition.Preconditioner(blocks, {}).apply(queries))


def test_kfac_refusals_are_one_line(tmp_path, tiny_model_dirs, training_file, lora_index):
    """kfac on a sketch that mixes tensors (rapidgrad-v2), and a query asking for a kind the index is not
    fitted with: one line each, naming the fix."""
    from rapidin_index.settings import SketchSettings

    mixed = tmp_path / "mixed"
    settings = build_settings(
        tiny_model_dirs["llama"],
        tiny_model_dirs["llama_lora"],
        sketch=SketchSettings(256, algorithm="rapidgrad-v2"),
    )
    build_index(training_file, mixed, settings, progress=False)
    executable = [sys.executable, "-m", "rapidin_index.cli.main"]
    done = subprocess.run(
        executable + ["fit", "--index", str(mixed), "--kind", "kfac"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --kind kfac needs each tensor in its own bins as row x column blocks (rapidgrad-kron, or K = 0); "
        "this index's rapidgrad-v2 sketch mixes every tensor into every bin: use --kind fisher"
    ]
    import shutil

    fitted = tmp_path / "fitted"
    shutil.copytree(lora_index, fitted)
    fit_index(fitted, kind="fisher")
    query = executable + ["query", "--index", str(fitted), "--device", "cpu", "--precondition", "ekfac"]
    query += ["--prompt", QUERIES[0]["prompt"], "--response", QUERIES[0]["response"]]
    done = subprocess.run(query, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --precondition ekfac: this index is fitted with fisher; refit it with: rapidin-index fit "
        "--kind ekfac (or query with --precondition fisher or none)"
    ]
    with pytest.raises(PreconditionError, match="--kind 'shampoo' is not one of fisher, kfac, ekfac"):
        fit_index(fitted, kind="shampoo")
    # the fix the refusal names works: the CLI refits it with EK-FAC, which queries then take by default
    done = subprocess.run(
        executable + ["fit", "--index", str(fitted), "--kind", "ekfac"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "fitted EK-FAC of 24 rows" in done.stderr, done.stderr
    record = read_manifest(fitted).precondition
    assert record["kind"] == "ekfac" and record["damping"] == precondition.DEFAULT_DAMPINGS["ekfac"]
    assert (
        record["query_norms"] is False and Index.open(fitted, device="cpu").precondition == "ekfac"
    )  # default
