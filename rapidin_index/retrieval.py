"""The retrieval stage: sketch a generation's gradient (whole and per token), search, join to the text.

``Index.open(path).query(prompt, response)`` is the Python face of ``rapidin-index query``. The query is
prepared by `rapidin_index.query` exactly as the index's training rows were (template, tokenization and
normalisation all read from the manifest), after the model and tokenizer are checked against the
manifest's fingerprints. The stages are public functions over an opened `Index`, so that each can be
timed on its own: `sketch_queries`, `search`, `collect_results`, `join_text`, `explain`.

Per generated token j the query vector is the layer-normalised, sketched gradient of token j's loss alone
(SPEC 2.4, Eq. 7); the whole generation uses the mean loss over the response tokens (or over the "hot"
tokens only, when the query names some). Per token, a query costs one forward pass and batched backward
passes (`token_gradients`); every vector of every query is searched in one scan of the index.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from rapidin_index.aggregate import AggregateResult, aggregate_found, combined_vector
from rapidin_index.capture import gradient_blocks
from rapidin_index.data import Template, tokenize_example
from rapidin_index.errors import IndexMismatchError, ModelError, PreconditionError, QueryError, RowError
from rapidin_index.gradients import GradientSketcher, check_environment
from rapidin_index.losses import collate
from rapidin_index.model_identity import check_model_sources
from rapidin_index.models import load_model, select_parameters
from rapidin_index.parallel import faiss_gpu_count, resolve_device, search_index
from rapidin_index.preflight import check_query
from rapidin_index.progress import RowProgress
from rapidin_index.query import (
    PreparedQuery,
    generation_prompt,
    prepare,
    prepare_generated,
    prepare_row,
)
from rapidin_index.rerank import exact_query_direction, rerank_hits, training_row
from rapidin_index.results import Hit, QueryResult, TokenHits
from rapidin_index.settings import ModelSettings, QuerySettings, SketchSettings
from rapidin_index.sketch import make_projector
from rapidin_index.store import index_folder, row_table, vector_index
from rapidin_index.store.identity import (
    check_loaded_model,
    check_tokenizer,
    manifest_identity,
    moved_model_hint,
)
from rapidin_index.store.lock import read_generation
from rapidin_index.store.manifest import Manifest, verify_files
from rapidin_index.store.verify import check_files
from rapidin_index.token_attribution import score_examples
from rapidin_index.token_gradients import sketch_loss_combinations

QUERY_DEFAULTS = QuerySettings()
"""The query options' defaults, here and in the CLI and the server (`settings.QuerySettings`)."""


class Index:
    """An opened index: manifest, FAISS vectors, LanceDB rows, and the model that made them."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        loaded,
        selected,
        device: torch.device,
        batch_size: int,
        max_memory: int | None = None,
    ):
        self.path = path
        self.manifest = manifest
        self.loaded = loaded
        self.blocks = gradient_blocks(selected)
        self.device = device
        self.batch_size = batch_size
        self.template = Template.from_dict(manifest.template)
        sketch = manifest.sketch
        # the transform the index was built with (an old rapidgrad-v1 index keeps v1)
        projector = make_projector(
            SketchSettings.from_dict(sketch), sketch["gradient_dim"], device, blocks=self.blocks
        )
        self.sketcher = GradientSketcher(loaded.model, self.blocks, projector, manifest.normalize)
        stored = index_folder.open_vectors(path, manifest.generation, max_memory)  # mapped, not read
        if stored.dimension != sketch["output_dim"] or stored.count != manifest.row_count:
            raise IndexMismatchError(
                f"{path}: the FAISS file holds {stored.count} vectors of {stored.dimension} dims, the manifest "
                f"says {manifest.row_count} of {sketch['output_dim']}; the index is damaged"
            )
        self.optimizer_scaling = None  # optimizer_state.OptimizerScaling (use_optimizer_state)
        self.precondition, self.preconditioner = "none", None  # use_precondition
        self.progress = False  # a progress bar over the queries of a call (the CLI's, on a terminal)
        self.stored_index = stored  # the vectors file read in place: searched on the CPU, vectors by id
        self._faiss_index = None
        self.searches_faiss = faiss_gpu_count() > 0  # GPUs: the index is resident there (`search_index`)
        if self.searches_faiss:
            self._faiss_index = search_index(index_folder.load_faiss(path, manifest.generation))
        self.table = index_folder.open_rows(path, manifest.generation)  # kept open: joins are per query

    @property
    def faiss_index(self):
        """The FAISS index (read on first use, its vectors mapped from the file: `index_folder.load_faiss`);
        assigning one (a `parallel.PartitionedSearch`, a GPU index) makes queries search it."""
        if self._faiss_index is None:
            self._faiss_index = index_folder.load_faiss(self.path, self.manifest.generation, mapped=True)
        return self._faiss_index

    @faiss_index.setter
    def faiss_index(self, value) -> None:
        self._faiss_index, self.searches_faiss = value, True

    @classmethod
    def open(
        cls,
        path: str | Path,
        model: str | None = None,
        adapter: str | None = None,
        device: str = "auto",
        sketch_dim: int | None = None,
        verify: bool = False,
        batch_size: int = 16,
        max_memory: int | None = None,
        optimizer_state: str | None = None,
        precondition: str | None = None,
        query_norms: bool | None = None,
        checked: Manifest | None = None,
    ) -> Index:
        """Open ``path``; ``model``/``adapter`` override the manifest's paths (same weights required).

        The first query checks the hooked gradients against plain backward passes, unless the build
        already checked these weights with the same libraries, device type and dtype (the manifest's
        ``self_checks``). ``verify=True`` checks every file's sha256 and always runs that check again.

        The vectors file is mapped, not read (`vector_file.StoredVectors`): opening costs its ids (8 bytes a
        row), and a search reads it in blocks of `vector_file.SCAN_BLOCK_BYTES`. ``max_memory`` (bytes)
        caps what a search holds, the mapped pages included: smaller blocks, each block's pages released
        after it; an index whose ids alone do not fit is refused.

        ``optimizer_state``: where the optimizer state the index was built with is now (default: the
        manifest's path). ``precondition``: none or the fitted kind (default: the fitted kind where the index is fitted).
        ``query_norms``: a preconditioned query keeps its per-tensor gradient norms (default: as fitted).
        ``checked``: a manifest of this folder against which the caller already ran `preflight.check_query`
        and `identity.check_tokenizer` with these arguments (the CLI, before torch loads); they are not run
        again while the opened generation has the same identity.
        """
        path = Path(path)
        # The manifest (refusing a format version this rapidin-index does not know) and a lease that keeps
        # the files it names in place while this Index lives, whatever a writer commits meanwhile.
        manifest, lease = read_generation(path)
        SketchSettings.from_dict(manifest.sketch)  # ... and a sketch algorithm it does not implement
        prechecked = checked is not None and manifest_identity(checked) == manifest_identity(manifest)
        if not prechecked:
            check_query(path, manifest, sketch_dim)  # K, files present: cheap checks first
        if verify:
            verify_files(path, manifest)
        else:  # the fast checksums; a file unchanged since it last verified is only stat'ed
            check_files(path, manifest)
        adapter = adapter or (manifest.adapter or {}).get("path")
        settings = ModelSettings(
            model or manifest.model["name_or_path"],
            adapter,
            manifest.model["dtype"],
            manifest.parameters["regex"],
        )
        torch_device = resolve_device(device)
        if not prechecked:
            check_tokenizer(manifest, settings.model)  # a tokenizer loads in a moment; the model may not
        try:
            check_model_sources(settings)  # a moved adapter is named before the model loads
            loaded = load_model(settings, torch_device)
        except ModelError as error:
            raise ModelError(f"{error}\n{moved_model_hint(manifest)}") from None
        check_loaded_model(manifest, loaded)
        selected = select_parameters(loaded.model, settings)
        if [name for name, _ in selected] != manifest.parameters["names"]:
            raise IndexMismatchError("the model's attributed parameters differ from the index's (--params?)")
        opened = cls(path, manifest, loaded, selected, torch_device, batch_size, max_memory)
        if not verify and check_environment(loaded.model) in manifest.self_checks:
            opened.sketcher.take_self_check(manifest.backward_path)  # the build checked these weights here
        opened.lease = lease  # released with the Index (lease.close() to release it sooner)
        opened.use_optimizer_state(optimizer_state)
        opened.use_precondition(precondition, query_norms, verified=True)  # its files were checked above
        return opened

    def use_optimizer_state(self, path: str | None = None) -> None:
        """Scale query gradients as the build scaled the rows (`optimizer_state`); refuses a missing or
        different state on an index built with one, and a state on an index built without."""
        from rapidin_index.optimizer_state import check_recorded, load_scaling

        recorded = self.manifest.optimizer_state
        self.optimizer_scaling = None
        if recorded is None:
            if path is not None:
                raise QueryError(
                    f"{self.path} was built without --optimizer-state; its rows are plain gradients, so "
                    "queries must be too: drop --optimizer-state"
                )
            return
        path = path or recorded["path"]
        if not Path(path).exists():
            raise QueryError(
                f"{self.path} was built with the optimizer state {recorded['path']} (fingerprint "
                f"{recorded['fingerprint'][:12]}), which is not there: pass --optimizer-state PATH"
            )
        scaling = load_scaling(path, self.loaded.model, self.blocks, self.manifest.adapter is not None)
        check_recorded(scaling, recorded)
        self.optimizer_scaling = scaling
        self.sketcher.use_optimizer_state(scaling)

    def use_precondition(
        self, precondition: str | None = None, query_norms: bool | None = None, verified: bool = False
    ) -> None:
        """Apply the fitted preconditioner to query vectors (`precondition`): none, fisher, kfac, ekfac (the
        fitted kind), or None for the default. ``query_norms``: the preconditioned query keeps its per-tensor
        gradient norms (the rows stay layer-normalised); None: as the fit recorded (`fit --query-norms`).
        ``verified``: `open` has just checked the fit file with the others (its sha256 is not computed
        again); a later call checks it against the manifest's sha256."""
        from rapidin_index.precondition import WEIGHT_KINDS, load_preconditioner, resolve_precondition

        self.precondition = resolve_precondition(self.manifest, precondition)
        self.preconditioner = None
        self.sketcher.normalize = self.manifest.normalize
        if self.precondition == "none":
            if query_norms:
                raise PreconditionError(
                    "--query-norms applies to a preconditioned query: drop it, or pass --precondition "
                    "with the fitted kind (rapidin-index fit --index DIR fits one)"
                )
            return
        if self.precondition in WEIGHT_KINDS:  # fitted with the model (`ekfac`), the Fisher part from here
            from rapidin_index.ekfac import load_weight_preconditioner

            self.preconditioner = load_weight_preconditioner(
                self.path, self.manifest, self.precondition, verified
            )
        else:
            self.preconditioner = load_preconditioner(self.path, self.manifest, self.precondition, verified)
        if getattr(self.preconditioner, "weight_space", False) and query_norms is False:
            raise PreconditionError(
                f"--no-query-norms: a {self.precondition} query is the plain gradient preconditioned in weight "
                "space, always with its norms; drop --no-query-norms (or query with --precondition none)"
            )
        if query_norms is None:
            query_norms = bool(self.preconditioner.record.get("query_norms"))
        if query_norms and self.manifest.normalize == "layer":  # the query keeps its per-tensor norms
            self.sketcher.normalize = "none"

    # ----------------------------------------------------------------------- public queries

    def query(
        self,
        prompt: str,
        response: str | None = None,
        *,
        generate: bool = False,
        hot: list | None = None,
        system: str | None = None,
        top_k: int = QUERY_DEFAULTS.top_k,
        explain: int = QUERY_DEFAULTS.explain,
        max_new_tokens: int = QUERY_DEFAULTS.max_new_tokens,
        per_token: bool = QUERY_DEFAULTS.per_token,
        token_top_k: int = QUERY_DEFAULTS.token_top_k,
        rerank: int = QUERY_DEFAULTS.rerank,
        where: str | None = None,
    ) -> QueryResult:
        """Attribute ``response`` (or, with ``generate``, the model's greedy continuation of ``prompt``).

        The query is rendered as a training row of the index's form with this content (``system``: a
        system turn, for chat indexes). ``top_k`` hits for the whole generation, ``token_top_k`` for
        each generated token (``per_token``; off, the tokens are listed without hits and the query
        costs one backward pass).
        """
        if generate:
            prepared = self.prepare_generation(prompt, max_new_tokens, hot=hot, system=system)
        elif not response or not response.strip():
            raise QueryError("the query's response is empty; give --response TEXT or use --generate")
        else:
            prepared = self.prepare(prompt, response, hot=hot, system=system)
        return self.query_prepared([prepared], top_k, explain, per_token, token_top_k, rerank, where)[0]

    def query_rows(
        self,
        rows: list[dict],
        top_k: int = QUERY_DEFAULTS.top_k,
        explain: int = QUERY_DEFAULTS.explain,
        per_token: bool = QUERY_DEFAULTS.per_token,
        token_top_k: int = QUERY_DEFAULTS.token_top_k,
        generate: bool = False,
        max_new_tokens: int = QUERY_DEFAULTS.max_new_tokens,
        rerank: int = QUERY_DEFAULTS.rerank,
        where: str | None = None,
    ) -> list[QueryResult]:
        """Queries in training-row form (any form the index's rows take), each with an optional ``hot``.

        ``generate``: each row gives a ``prompt`` (and optional ``system``) whose greedy continuation
        is attributed.
        """
        prepared = self._prepare_rows(rows, generate, max_new_tokens)
        return self.query_prepared(prepared, top_k, explain, per_token, token_top_k, rerank, where)

    def aggregate(
        self,
        rows: list[dict],
        how: str = "mean",
        top_k: int = QUERY_DEFAULTS.top_k,
        depth: int = QUERY_DEFAULTS.depth,
        generate: bool = False,
        max_new_tokens: int = QUERY_DEFAULTS.max_new_tokens,
        where: str | None = None,
    ) -> AggregateResult:
        """One helpful and harmful list for the whole set of query rows (`rapidin_index.aggregate`):
        ``how`` is mean, sum (exact, by linearity), max or count (from each query's top ``depth``)."""
        prepared = self._prepare_rows(rows, generate, max_new_tokens)
        return self.aggregate_prepared(prepared, how, top_k, depth, where)

    def aggregate_prepared(
        self,
        prepared: list[PreparedQuery],
        how: str = "mean",
        top_k: int = QUERY_DEFAULTS.top_k,
        depth: int = QUERY_DEFAULTS.depth,
        where: str | None = None,
    ) -> AggregateResult:
        """`aggregate` over queries already prepared (`prepare`, `prepare_row`, `prepare_generation`)."""
        among = rows_where(self, where)
        searched = self.manifest.row_count if among is None else len(among)
        depth = min(max(depth, top_k), searched)
        vectors, _ = sketch_queries(self, prepared, per_token=False)  # [queries, K]
        combined = combined_vector(vectors, how)
        found = search(self, np.concatenate([combined[None], vectors]), depth, among)
        return aggregate_found(self, prepared, vectors, found, how, top_k, depth, searched)

    def _prepare_rows(self, rows: list[dict], generate: bool, max_new_tokens: int) -> list[PreparedQuery]:
        prepared = []
        for number, row in enumerate(rows):
            try:
                prepared.append(self._prepare_row(row, generate, max_new_tokens))
            except (RowError, QueryError) as error:
                raise QueryError(f"query row {number}: {error}") from None
        return prepared

    def _prepare_row(self, row: dict, generate: bool, max_new_tokens: int) -> PreparedQuery:
        if not generate:
            return prepare_row(row, self.loaded.tokenizer, self.manifest)
        if not isinstance(row.get("prompt"), str):
            raise QueryError("with --generate every query row needs a text 'prompt'")
        return self.prepare_generation(row["prompt"], max_new_tokens, row.get("hot"), row.get("system"))

    def prepare(self, prompt: str, response: str, hot=None, system: str | None = None) -> PreparedQuery:
        return prepare(prompt, response, self.loaded.tokenizer, self.manifest, hot, system)

    def prepare_generation(
        self,
        prompt: str,
        max_new_tokens: int = QUERY_DEFAULTS.max_new_tokens,
        hot=None,
        system: str | None = None,
    ) -> PreparedQuery:
        """The model's greedy continuation of ``prompt``, labelled on exactly the ids it produced."""
        tokenizer = self.loaded.tokenizer
        rendered_prompt, prompt_ids = generation_prompt(prompt, tokenizer, self.manifest, system)
        generated = self.generate_ids(prompt_ids, max_new_tokens)
        return prepare_generated(
            prompt, rendered_prompt, prompt_ids, generated, tokenizer, self.manifest, hot
        )

    def generate(
        self, prompt: str, max_new_tokens: int = QUERY_DEFAULTS.max_new_tokens, system: str | None = None
    ) -> str:
        """Greedy generation by the indexed model, as text (special tokens left out)."""
        _, prompt_ids = generation_prompt(prompt, self.loaded.tokenizer, self.manifest, system)
        generated = self.generate_ids(prompt_ids, max_new_tokens)
        return self.loaded.tokenizer.decode(generated, skip_special_tokens=True)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64) -> list[int]:
        """The ids greedy decoding appends to ``prompt_ids``, through the first stop id (kept: the model
        generated it) and no further."""
        if max_new_tokens < 1:
            raise QueryError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        input_ids = torch.tensor([prompt_ids], device=self.device)
        with torch.no_grad():
            output = self.loaded.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.loaded.tokenizer.pad_token_id,
            )
        generated = output[0, len(prompt_ids) :].tolist()
        stops = _stop_ids(self.loaded)
        end = next((i + 1 for i, token in enumerate(generated) if token in stops), len(generated))
        return generated[:end]

    def query_prepared(
        self,
        queries: list[PreparedQuery],
        top_k: int,
        explain: int,
        per_token: bool = QUERY_DEFAULTS.per_token,
        token_top_k: int = QUERY_DEFAULTS.token_top_k,
        rerank: int = QUERY_DEFAULTS.rerank,
        where: str | None = None,
    ) -> list[QueryResult]:
        """Sketch, search (one scan; ``where``: among the rows an SQL filter keeps), collect, join the
        text, re-rank (``rerank`` > 0: the top and
        bottom ``rerank`` rows scored exactly, `rapidin_index.rerank`), explain the top hits."""
        if top_k < 1 or token_top_k < 1:
            raise QueryError(f"--top-k and --token-top-k must be at least 1, got {top_k} and {token_top_k}")
        if self.manifest.row_count == 0:
            raise QueryError(
                f"{self.path} holds no rows (all {self.manifest.rejected_count} were rejected; "
                "`rapidin-index info` lists why): fix the data and rebuild"
            )
        if rerank > 0 and self.preconditioner is not None:
            raise QueryError(
                "--rerank scores rows with exact gradients, which the sketch-space Fisher does not cover; "
                "query with --precondition none to re-rank"
            )
        among = rows_where(self, where)
        rows = self.manifest.row_count if among is None else len(among)
        top_k, token_top_k = min(top_k, rows), min(token_top_k, rows)
        shortlist = max(top_k, min(rerank, rows))
        vectors, losses = sketch_queries(self, queries, per_token)
        found = search(self, vectors, max(shortlist, token_top_k if per_token else 0), among)
        results = collect_results(self, queries, found, losses, shortlist, token_top_k, per_token)
        join_text(self, results)
        for query, result in zip(queries, results, strict=True):
            if where is not None:
                result.index["where"] = where
            if rerank > 0:
                rerank_hits(self, query, result, rerank, top_k)
            result.helpful, result.harmful = result.helpful[:top_k], result.harmful[:top_k]
        if explain > 0:
            for query, result in zip(queries, results, strict=True):
                explain_hits(self, query, result, explain)
        return results


# --------------------------------------------------------------------------- the stages


def sketch_queries(
    index: Index, queries: list[PreparedQuery], per_token: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, losses): each query's whole-generation vector, then (``per_token``) one per scored token.

    Per token, batched backward passes over each query's token losses, each on the prefix its rows need
    (:mod:`rapidin_index.token_gradients`): rows [1 + T] per query, the progress bar counting them. Whole
    generation only, the queries share batches: one row per query.
    """
    if getattr(index.preconditioner, "weight_space", False):  # ekfac-weights: H^-1 g before the sketch
        return index.preconditioner.sketch_queries(index, queries, per_token, sketch_query_vectors)
    vectors, losses = sketch_query_vectors(index, queries, per_token)
    if index.preconditioner is not None:  # (F + lambda I)^-1 q: the stored rows are left as they are
        vectors = index.preconditioner.apply(vectors)
    return vectors, losses


def sketch_query_vectors(
    index: Index, queries: list[PreparedQuery], per_token: bool
) -> tuple[np.ndarray, np.ndarray]:
    if not per_token:
        sequences = [(query.input_ids, query.labels_for(query.hot_positions)) for query in queries]
        return _sketch_sequences(index, sequences)
    vectors, losses = [], []
    total = sum(1 + len(query.hot) for query in queries)
    with RowProgress(total, "per-token vectors", enabled=index.progress) as bar:
        for query in queries:
            example = collate(
                [(query.input_ids, query.labels)], index.loaded.tokenizer.pad_token_id, index.device
            )
            hot = torch.tensor(query.hot, dtype=torch.float32)
            weights = torch.cat([(hot / hot.sum())[None], torch.eye(len(query.hot))])  # [1 + T, T]
            sketched = _finite(
                sketch_loss_combinations(
                    index.sketcher, example, weights, advance=lambda rows: bar.advance(rows, 0)
                )
            )
            vectors.append(sketched.vectors.cpu().numpy())
            losses.append(sketched.losses.cpu().numpy())
    return np.concatenate(vectors), np.concatenate(losses)


def _sketch_sequences(
    index: Index, sequences: list[tuple[list[int], list[int]]]
) -> tuple[np.ndarray, np.ndarray]:
    vectors, losses = [], []
    pad = index.loaded.tokenizer.pad_token_id
    for start in range(0, len(sequences), index.batch_size):
        batch = collate(sequences[start : start + index.batch_size], pad, index.device)
        sketched = _finite(index.sketcher.sketch(batch))
        vectors.append(sketched.vectors.cpu().numpy())
        losses.append(sketched.losses.cpu().numpy())
    return np.concatenate(vectors), np.concatenate(losses)


def _finite(sketched):
    if not bool(sketched.finite.all()):
        raise QueryError("the query's gradient has NaN or inf (fp16 overflow?); open the index with float32")
    return sketched


def search(index: Index, vectors: np.ndarray, count: int, among: list[int] | None = None) -> list[np.ndarray]:
    """(helpful scores, ids, harmful scores, ids), ``count`` each per vector, from one scan of the index
    (``among``: of the rows with these ids only, exactly)."""
    if among is None and index.searches_faiss:
        return vector_index.search_both(index.faiss_index, vectors, count)
    if among is None:
        return vector_index.search_both(index.stored_index, vectors, count)
    return vector_index.search_both_among(index.stored_index, vectors, count, among)


def rows_where(index: Index, where: str | None) -> list[int] | None:
    """The ids an SQL filter over the rows' columns keeps (None: every row); refuses one that keeps none."""
    if where is None:
        return None
    among = row_table.matching_ids(index.table, where, index.manifest.row_count)
    if not among:
        raise QueryError(f"--where {where!r} matches no row of the index")
    return among


def collect_results(
    index: Index,
    queries: list[PreparedQuery],
    found: list[np.ndarray],
    losses: np.ndarray,
    top_k: int,
    token_top_k: int,
    per_token: bool,
) -> list[QueryResult]:
    """One `QueryResult` per query from the search's rows (without text: `join_text` adds it)."""
    results, row = [], 0
    for query in queries:
        count = 1 + len(query.response_positions) if per_token else 1
        span = [part[row : row + count] for part in found]
        results.append(_result(index, query, span, losses[row : row + count], top_k, token_top_k, per_token))
        row += count
    return results


def _result(
    index: Index, query: PreparedQuery, found: list, losses, top_k: int, token_top_k: int, per_token: bool
) -> QueryResult:
    """``found``: (helpful scores, ids, harmful scores, ids), row 0 the whole generation, then tokens."""
    helpful_scores, helpful_ids, harmful_scores, harmful_ids = found
    tokenizer = index.loaded.tokenizer
    tokens = []
    for number, position in enumerate(query.response_positions):
        token_id = query.input_ids[position]
        row = 1 + number
        tokens.append(
            TokenHits(
                position=number,
                token=tokenizer.decode([token_id]),
                token_id=token_id,
                loss=float(losses[row]) if per_token else None,
                hot=query.hot[number],
                helpful=_hits(helpful_ids[row], helpful_scores[row], token_top_k) if per_token else [],
                harmful=_hits(harmful_ids[row], harmful_scores[row], token_top_k) if per_token else [],
            )
        )
    return QueryResult(
        prompt=query.prompt,
        response=query.response,
        rendered_prompt=query.rendered_prompt,
        rendered_response=query.rendered_response,
        tokenization=index.manifest.tokenization,
        generated=query.generated,
        hot=query.hot_spec,
        index={
            "path": str(index.path),
            "row_count": index.manifest.row_count,
            "sketch_dim": index.manifest.sketch["sketch_dim"],
            "normalize": index.manifest.normalize,
            "precondition": index.precondition,
            "optimizer_state": index.manifest.optimizer_state is not None,
        },
        tokens=tokens,
        helpful=_hits(helpful_ids[0], helpful_scores[0], top_k),
        harmful=_hits(harmful_ids[0], harmful_scores[0], top_k),
    )


def _hits(ids: np.ndarray, scores: np.ndarray, count: int) -> list[Hit]:
    pairs = zip(ids[:count].tolist(), scores[:count].tolist(), strict=True)  # Python numbers at once
    return [Hit(id=i, rank=rank + 1, score=s) for rank, (i, s) in enumerate(pairs) if i >= 0]


def join_text(index: Index, results: list[QueryResult]) -> None:
    """Whole-generation hits get their row (prompt, response, source); per-token hits their text."""
    token_hits = [hit for r in results for t in r.tokens for hit in t.helpful + t.harmful]
    whole_hits = [hit for r in results for hit in r.helpful + r.harmful]
    rows = index_folder.rows_of_hits(
        index.path, index.table, sorted({hit.id for hit in whole_hits + token_hits})
    )
    for hit in whole_hits:
        row = rows[hit.id]
        hit.prompt, hit.response, hit.source = row["prompt"], row["response"], row["source"]
    for hit in token_hits:
        hit.prompt, hit.response = rows[hit.id]["prompt"], rows[hit.id]["response"]


def explain_hits(index: Index, query: PreparedQuery, result: QueryResult, count: int) -> None:
    """Training-token scores (SPEC 2.4, Eq. 6) for the top ``count`` helpful and harmful hits."""
    hits = result.helpful[:count] + result.harmful[:count]
    for hit, explanation in zip(hits, explanations(index, query, hits), strict=True):
        hit.explanation = explanation


def explain_row(index: Index, query: PreparedQuery, training_example_id: int) -> dict:
    """The training-token scores of one stored row against ``query``, as `explain_hits` gives a hit
    (the server's page asks for a hit outside the top ``explain``)."""
    row = index_folder.rows_of_hits(index.path, index.table, [training_example_id])[training_example_id]
    hit = SimpleNamespace(
        id=training_example_id, source=row["source"], prompt=row["prompt"], response=row["response"]
    )
    return explanations(index, query, [hit])[0]


def explanations(index: Index, query: PreparedQuery, hits: list) -> list[dict]:
    """Each hit's ``explanation``: its training tokens scored against the query's exact direction."""
    if not hits:
        return []
    tokenizer, manifest, blocks = index.loaded.tokenizer, index.manifest, index.blocks
    direction = exact_query_direction(index, query)
    per_block = [direction[b.offset : b.offset + b.numel] for b in blocks]
    examples = [
        tokenize_example(
            training_row(index, hit), None, tokenizer, manifest.max_length, manifest.tokenization
        )[:2]
        for hit in hits
    ]
    scaling = index.optimizer_scaling  # all hits in one batch, unless the optimizer's scales apply
    scales = None if scaling is None else [scaling.scales[b.name] for b in blocks]
    every_scores = score_examples(
        index.loaded.model, blocks, examples, per_block, manifest.normalize, tokenizer.pad_token_id, scales
    )
    return [
        {
            "tokens": [
                {"token": tokenizer.decode([token_id]), "token_id": token_id, "score": score}
                for token_id, score in zip(scores.token_ids, scores.scores, strict=True)
            ],
            "method": scores.method,
            "normalization": scores.normalization,
            # The exact (unsketched) whole score, which the token scores average to with the
            # default normalisation; ``hit.score`` is its sketched estimate when K > 0.
            "exact_score": float(np.mean(scores.scores)) if scores.scores else 0.0,
        }
        for scores in every_scores
    ]


def _stop_ids(loaded) -> set[int]:
    """The ids that end a generation: the tokenizer's EOS and the generation config's."""
    stops = {loaded.tokenizer.eos_token_id}
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    stops.update(configured if isinstance(configured, list) else [configured])
    return {token for token in stops if token is not None}
