"""The caching stage: training rows -> sketched gradients in FAISS + text in LanceDB, resumable.

The index folder's layout is in `index_folder`. A build works through the rows in chunks of ``chunk_size`` ids
(`chunks`). Each finished chunk is written to the journal atomically (vectors first, then a JSON record
holding their checksum), so a build killed at any moment restarts at the first unfinished chunk.
Finalising writes a new generation of every file and then the manifest; a crash before the manifest
leaves the previous generation (or nothing) in force.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rapidin_index.chunks import ChunkJob, LocalChunkRunner, stream_chunks
from rapidin_index.data import (
    RejectedRow,
    Template,
    check_template_fields,
    iter_examples,
    parse_template,
)
from rapidin_index.errors import BuildError, IntegrityError, RejectedRowsError, StoreError
from rapidin_index.files import writing
from rapidin_index.model_identity import (
    adapter_identity,
    check_model_sources,
    max_positions,
    model_identity,
    read_config,
    resolve_location,
)
from rapidin_index.preflight import model_files_stat
from rapidin_index.progress import RowProgress
from rapidin_index.readers import DataSource, check_source, data_checksum, read_rows
from rapidin_index.rejections import check_rejected_share, source_outcome
from rapidin_index.settings import AUTO_ALGORITHM, DEFAULT_VECTOR_DTYPE, BuildSettings

# torch, transformers and lancedb are imported where they are first needed: `rapidin-index info` and a
# no-op rebuild never need them (see preflight.py).
from rapidin_index.store import index_folder, vector_index
from rapidin_index.store.identity import (
    build_conflicts,
    index_identity,
    settings_conflicts,
    settings_identity,
    tokenizer_conflicts,
)
from rapidin_index.store.journal import (
    ChunkRecord,
    chunk_problem,
    open_journal,
    read_chunk,
    write_chunk,
)
from rapidin_index.store.lock import pause_point, remove_unread_generations, writer_lock
from rapidin_index.store.manifest import (
    MANIFEST_NAME,
    Manifest,
    add_self_checks,
    read_manifest,
    write_manifest,
)
from rapidin_index.store.verify import check_files, stamp_written

if TYPE_CHECKING:
    from rapidin_index.models import LoadedModel


@dataclass
class BuildReport:
    index_dir: str
    rows_indexed: int = 0
    rows_rejected: int = 0
    rejected: list[RejectedRow] = field(default_factory=list)
    tokens: int = 0
    truncated: int = 0
    gradient_dim: int = 0
    sketch_dim: int = 0
    bytes_on_disk: int = 0
    elapsed_seconds: float = 0.0
    resumed_chunks: int = 0
    nothing_to_do: bool = False
    message: str = ""
    backward_path: dict = field(default_factory=dict)
    """{parameter name: why} for tensors whose gradients took one plain backward per example."""
    notes: list[str] = field(default_factory=list)
    """What the build decided for the user, said once: a K chosen for them, --max-length capped."""

    @property
    def compression_ratio(self) -> float:
        return self.gradient_dim / self.sketch_dim if self.sketch_dim else 1.0

    @property
    def exact_path(self) -> dict:
        """`backward_path` by its name before issue 24 (and in the manifest), kept for the callers that read it."""
        return self.backward_path


# --------------------------------------------------------------------------- entry point


def build_index(
    data: str | Path | DataSource,
    index_dir: str | Path,
    settings: BuildSettings,
    append: bool = False,
    progress: bool = True,
    runner_factory=None,
) -> BuildReport:
    """Index every row of ``data`` into ``index_dir`` (or, with ``append``, add them to the index there).

    ``data`` is a file or a ``datasets`` save_to_disk folder (`readers`; ``settings.split`` picks a
    DatasetDict's split). Raises `RejectedRowsError`, once the index is committed, when the data gives no
    indexed row or more than ``settings.max_rejected_share`` rejected ones.

    ``runner_factory(loaded, selected, settings, device)`` makes the object that computes the pending
    chunks (default: :class:`LocalChunkRunner`, in this process; :mod:`rapidin_index.parallel` has the
    Ray one). Whatever computes them, this process alone writes the journal and the index.
    """
    started = time.perf_counter()
    index_dir = Path(index_dir)
    path = data.path if isinstance(data, DataSource) else Path(data)
    if not path.exists():
        raise BuildError(f"data file {path} does not exist")
    data = check_source(path, data.split if isinstance(data, DataSource) else settings.split)
    with writer_lock(index_dir, "append" if append else "build"):  # refuses a second writer at once
        return _build_locked(data, index_dir, settings, append, progress, runner_factory, started)


def _build_locked(data, index_dir, settings, append, progress, runner_factory, started) -> BuildReport:
    existing = _existing_manifest(index_dir)
    if append and existing is None:
        raise BuildError(f"--append needs a finished index in {index_dir}; build one first with --data")
    if append and settings.shard is not None:
        raise BuildError("--append works on whole indexes: merge the shards first (rapidin-index merge)")
    if append:
        check_files(index_dir, existing, full=True)  # the new generation carries the old one's files
    check_model_sources(settings.model)  # a wrong path fails now, not after hashing data and loading
    if settings.vector_dtype is None and existing is not None:  # an index keeps its own dtype
        settings = replace(settings, vector_dtype=existing.vector_dtype)
    notes: list[str] = []
    positions = max_positions(read_config(settings.model.model))  # cheap: config.json, where readable
    settings = _cap_max_length(settings, positions, existing, notes)
    template = parse_template(settings.template, settings.response_field)
    check_template_fields(read_rows(data), template)  # before the model loads
    data_sha256 = data_checksum(data)
    # Taken before the model loads, so that they can only describe the files that were loaded, or older.
    model_files = {"model": model_files_stat(settings.model.model), "adapter": None}
    if settings.model.adapter is not None:
        model_files["adapter"] = model_files_stat(settings.model.adapter)
    if existing is not None:
        done = _check_before_loading(
            existing, settings, template, data_sha256, model_files, append, index_dir
        )
        if done:
            index_folder.remove_journal(index_dir)
            report = BuildReport(str(index_dir), gradient_dim=existing.sketch["gradient_dim"], notes=notes)
            report.sketch_dim = existing.sketch["output_dim"]
            return _checked(
                _finished_report(report, existing, started, done), existing, data, data_sha256, settings
            )

    from rapidin_index.models import load_model, select_parameters
    from rapidin_index.parallel import resolve_device

    device = resolve_device(settings.device)
    # With a distributed runner the workers load their own copies; the driver only fingerprints.
    loaded = load_model(settings.model, device if runner_factory is None else "cpu")
    selected = select_parameters(loaded.model, settings.model)
    settings = _cap_max_length(settings, max_positions(loaded.model.config.to_dict()), existing, notes)
    settings = _resolve_sketch(settings, selected, existing, notes)  # never 'auto' or no K in a manifest
    if settings.vector_dtype is None:  # a new index: float16 sketches; exact vectors (K = 0) stay exact
        settings = replace(
            settings, vector_dtype="float32" if settings.sketch.exact else DEFAULT_VECTOR_DTYPE
        )
    scaling = _optimizer_scaling(loaded, selected, settings)
    identity = index_identity(loaded, settings, selected, template, scaling)
    _check_dimension(identity["sketch"]["output_dim"])
    report = BuildReport(str(index_dir), gradient_dim=identity["sketch"]["gradient_dim"], notes=notes)
    report.sketch_dim = identity["sketch"]["output_dim"]
    if existing is not None:
        done = _check_existing(existing, identity, data_sha256, append, index_dir, settings)
        if done:
            index_folder.remove_journal(index_dir)
            return _checked(
                _finished_report(report, existing, started, done), existing, data, data_sha256, settings
            )
    plan = {
        "kind": "append" if append else "build",
        "data_path": str(data.path.resolve()),
        "data_sha256": data_sha256,
        "identity": identity,
        "id_offset": existing.total_rows_seen if append else 0,
        "base_generation": existing.generation if existing else 0,
        "chunk_size": settings.chunk_size,
    }
    run = _Run(data, index_dir, settings, plan, existing, loaded, selected, device, model_files)
    run.optimizer_state = None if scaling is None else scaling.record
    manifest = _index_rows(run, template, report, progress, runner_factory)
    _after_commit(run, manifest, report)
    return _checked(_finished_report(report, manifest, started, ""), manifest, data, data_sha256, settings)


def _checked(report: BuildReport, manifest: Manifest, data, data_sha256: str, settings) -> BuildReport:
    """``report``, unless the rows of ``data`` (the last source with its checksum) gave no indexed row or
    too many rejected ones: then `RejectedRowsError`, also on a rerun that finds nothing to do."""
    source = next(s for s in reversed(manifest.sources) if s["sha256"] == data_sha256)
    indexed, rejected = source_outcome(manifest, source, report.rejected)
    try:
        check_rejected_share(indexed, rejected, settings.max_rejected_share, str(data), report.index_dir)
    except RejectedRowsError as error:
        error.report = report
        raise
    return report


@dataclass
class _Run:
    """What one build (or append) works with once its checks have passed."""

    data: DataSource
    index_dir: Path
    settings: BuildSettings
    plan: dict
    existing: Manifest | None
    loaded: LoadedModel
    selected: list
    device: object
    model_files: dict
    optimizer_state: dict | None = None


def _index_rows(run: _Run, template: Template, report: BuildReport, progress: bool, runner_factory):
    """Sketch every row not yet in the journal, then write the new generation.

    Rows stream: they are read, tokenized and sketched a chunk at a time, so memory does not grow with the
    data (a first pass only counts the rows; ``--strict`` tokenizes them once more to refuse before any work).
    """
    settings, plan = run.settings, run.plan
    journal = open_journal(run.index_dir, plan, report.notes)

    def rows():
        return iter_examples(
            run.data, run.loaded.tokenizer, template, settings.max_length, settings.tokenization
        )

    if settings.strict:
        bad = [item for item in rows() if isinstance(item, RejectedRow)]
        if bad:
            raise BuildError(
                f"row {bad[0].example_id + plan['id_offset']}: {bad[0].reason} (--strict; {len(bad)} bad rows)"
            )
    total_rows = sum(1 for _ in read_rows(run.data))
    keep = None
    if settings.shard is not None:  # strided: row i goes to shard i % N, which balances lengths
        keep = lambda example_id: example_id % settings.num_shards == settings.shard_index  # noqa: E731

    def pending(bar):
        chunks = stream_chunks(rows(), settings.chunk_size, total_rows, keep)
        for chunk_number, (chunk_examples, chunk_rejected) in enumerate(chunks):
            problem = chunk_problem(journal, chunk_number)
            if problem is None:
                report.resumed_chunks += 1
                bar.advance(len(chunk_examples) + len(chunk_rejected), 0)
                continue
            if problem:  # a torn or damaged chunk is recomputed, never trusted: say which and why
                report.notes.append(f"journal chunk {chunk_number} is recomputed: {problem}")
            yield ChunkJob(chunk_number, chunk_examples, chunk_rejected, plan["id_offset"])

    def write(job: ChunkJob, record: ChunkRecord, vectors: np.ndarray) -> None:
        write_chunk(journal, job.chunk_number, record, vectors)

    with RowProgress(total_rows, enabled=progress) as bar:
        runner = (runner_factory or LocalChunkRunner)(run.loaded, run.selected, settings, run.device)
        runner.run(pending(bar), write, bar.advance)
    return _finalize(run, journal, total_rows)


def _optimizer_scaling(loaded, selected, settings: BuildSettings):
    """The optimizer state's scaling of the attributed tensors (`optimizer_state`), or None."""
    if settings.optimizer_state is None:
        return None
    from rapidin_index.capture import gradient_blocks
    from rapidin_index.optimizer_state import load_scaling

    adapter = settings.model.adapter is not None
    return load_scaling(settings.optimizer_state, loaded.model, gradient_blocks(selected), adapter)


def _after_commit(run: _Run, manifest: Manifest, report: BuildReport) -> None:
    """An append drops a fitted preconditioner (its rows changed): say so, or refit it (``settings.fit``)."""
    refit = run.settings.fit != "none"
    if run.existing is not None and run.existing.precondition is not None and not refit:
        report.notes.append(
            "the index's fitted preconditioner no longer covers its rows and was dropped; refit it "
            f"with: rapidin-index fit --index {run.index_dir}"
        )
    if refit:
        from rapidin_index.ekfac import is_weight_kind
        from rapidin_index.precondition import fit_index

        kind = run.settings.fit
        if is_weight_kind(kind):  # a pass of the model over the rows (`ekfac_fit`)
            from rapidin_index.ekfac_fit import fit_index_weights

            fit_index_weights(run.index_dir, kind, locked=True, device=run.settings.device)
        else:
            fit_index(run.index_dir, locked=True, kind=kind)  # this build holds the writer lock
        name = {"fisher": "Fisher", "kfac": "K-FAC", "ekfac": "EK-FAC"}.get(kind, kind)
        report.notes.append(f"fitted the {name} preconditioner over {manifest.row_count:,} rows")


def _check_dimension(output_dim: int) -> None:
    """FAISS reads back no index wider than 2^20 dimensions: refuse to build one (K = 0 stores D)."""
    if output_dim > vector_index.MAX_DIMENSION:
        raise BuildError(
            f"--k 0 stores the exact gradient, {output_dim:,} dimensions a row, but FAISS opens indexes of "
            f"at most {vector_index.MAX_DIMENSION:,}; sketch it (--k 65536) or attribute fewer parameters "
            "(--params, or a LoRA adapter)"
        )


def _existing_manifest(index_dir: Path) -> Manifest | None:
    if not (index_dir / MANIFEST_NAME).exists():
        return None
    return read_manifest(index_dir)


def _check_before_loading(
    existing: Manifest,
    settings: BuildSettings,
    template: Template,
    data_sha256: str,
    model_files: dict,
    append: bool,
    index_dir: Path,
) -> str:
    """The checks that need no model: '' to go on; a message when there is nothing to do; raises when the
    request conflicts. "Nothing to do" without the model needs proof that the model is the one indexed:
    its files (and the adapter's) have the stat fingerprint recorded when the index was built from them."""
    requested = settings_identity(settings, template)
    if settings.sketch.algorithm == AUTO_ALGORITHM:  # an existing index keeps its algorithm (_resolve_sketch)
        requested["sketch"]["algorithm"] = existing.sketch.get("algorithm")
    if settings.sketch.sketch_dim is None:  # ... and its K, where none is given
        requested["sketch"]["sketch_dim"] = existing.sketch["sketch_dim"]
    changed = settings_conflicts(existing, requested)
    if changed:
        raise BuildError(_other_settings(changed, append, index_dir))
    done = _data_status(existing, data_sha256, append, index_dir, settings.allow_duplicate_data)
    recorded = {"model": existing.model.get("files"), "adapter": (existing.adapter or {}).get("files")}
    proven = model_files["model"] is not None and (settings.model.adapter is None or model_files["adapter"])
    if done and proven and model_files == recorded:
        return done
    from rapidin_index.models import fingerprint_tokenizer, load_tokenizer

    tokenizer = fingerprint_tokenizer(load_tokenizer(settings.model.model))  # cheap next to the model
    changed = tokenizer_conflicts(existing, tokenizer)
    if changed:
        raise BuildError(_other_settings(changed, append, index_dir))
    return ""


def _resolve_sketch(
    settings: BuildSettings, selected, existing: Manifest | None, notes: list
) -> BuildSettings:
    """K not given and sketch algorithm 'auto' made concrete: the existing index's, else the settings
    module's choice for this gradient (`resolve_sketch_dim`, then `resolve_algorithm`)."""
    from rapidin_index.capture import gradient_blocks, gradient_dim
    from rapidin_index.settings import DEFAULT_SKETCH_DIM, resolve_algorithm, resolve_sketch_dim

    sketch = settings.sketch
    if existing is not None and sketch.sketch_dim is None:
        sketch = replace(sketch, sketch_dim=existing.sketch["sketch_dim"])
    if sketch.algorithm == AUTO_ALGORITHM and existing is not None and existing.sketch.get("algorithm"):
        sketch = replace(sketch, algorithm=existing.sketch["algorithm"])
    blocks = gradient_blocks(selected)
    dim = gradient_dim(blocks)
    resolved = resolve_algorithm(resolve_sketch_dim(sketch, dim), blocks)
    if sketch.sketch_dim is None and resolved.exact:
        notes.append(
            f"--k not given and the attributed gradient has only D = {dim:,} <= {DEFAULT_SKETCH_DIM:,} "
            "dimensions: the index stores exact vectors (K = 0: no larger than a sketch, and no sketch noise); "
            "--k N forces a sketch"
        )
    return replace(settings, sketch=resolved)


def _cap_max_length(
    settings: BuildSettings, positions, existing: Manifest | None, notes: list
) -> BuildSettings:
    """``max_length`` capped at the model's context (``positions``, from its config; None: unknown).

    A model with learned positions (GPT-2's n_positions) fails on a longer row. An index built before this
    cap with a longer max_length keeps it, so that appending to it truncates as it did.
    """
    requested = settings.max_length
    if positions is None or (requested is not None and requested <= positions):
        return settings
    if existing is not None and existing.max_length == requested:
        note = (
            f"--max-length {requested} is past the model's {positions:,} positions; kept, as the index "
            "in this folder was built with it"
        )
        if note not in notes:
            notes.append(note)
        return settings
    notes.append(
        f"--max-length {requested if requested is not None else 'none'} capped at {positions:,}, the "
        "model's maximum positions: longer rows are truncated (counted as truncated rows)"
    )
    return replace(settings, max_length=positions)


def _check_existing(
    existing: Manifest,
    identity: dict,
    data_sha256: str,
    append: bool,
    index_dir: Path,
    settings: BuildSettings,
) -> str:
    """'' to go on; a message when there is nothing to do; raises when the request conflicts."""
    changed = build_conflicts(existing, identity)
    if changed:
        raise BuildError(_other_settings(changed, append, index_dir))
    return _data_status(existing, data_sha256, append, index_dir, settings.allow_duplicate_data)


def _other_settings(changed: list[str], append: bool, index_dir: Path) -> str:
    verb = "append to" if append else "rebuild"
    return (
        f"cannot {verb} {index_dir}: it was built with other settings:\n  "
        + "\n  ".join(changed)
        + "\nUse the index's settings (rapidin-index info), or a new --index folder."
    )


def _data_status(
    existing: Manifest, data_sha256: str, append: bool, index_dir: Path, allow_duplicate: bool
) -> str:
    same = [source for source in existing.sources if source["sha256"] == data_sha256]
    if same and append and not allow_duplicate:
        first, rows = same[-1]["id_offset"], same[-1]["rows"]
        raise BuildError(
            f"{index_dir} already holds the rows of this data (same sha256 as {same[-1]['path']}, ids "
            f"{first}-{first + rows - 1}); appending it again would index every row twice. "
            "To do that on purpose, pass --allow-duplicate-data"
        )
    if same and not append:
        return f"{index_dir} already holds every row of this data file; nothing to do"
    if not append:
        raise BuildError(
            f"{index_dir} already holds an index built from other data; use --append FILE to add rows, "
            "or a new --index folder"
        )
    return ""


def _finished_report(report: BuildReport, manifest: Manifest, started: float, message: str) -> BuildReport:
    report.nothing_to_do = bool(message)
    report.message = message
    report.rows_indexed = manifest.row_count
    report.rows_rejected = manifest.rejected_count
    report.rejected = index_folder.read_rejected(report.index_dir, manifest)
    report.tokens = manifest.token_count
    report.truncated = manifest.truncated_count
    report.backward_path = dict(manifest.backward_path)
    report.bytes_on_disk = sum(item["bytes"] for item in manifest.files.values()) + len(
        json.dumps(manifest.to_dict())
    )
    report.elapsed_seconds = time.perf_counter() - started
    return report


# --------------------------------------------------------------------------- finalise


def _finalize(run: _Run, journal: Path, total_rows: int) -> Manifest:
    """Write generation N+1 of every file from the previous generation plus the journal, then the manifest."""
    index_dir, plan, existing, settings = run.index_dir, run.plan, run.existing, run.settings
    generation = plan["base_generation"] + 1
    identity = plan["identity"]
    chunk_count = -(-total_rows // settings.chunk_size)
    # The vectors and rows go to the new files as a stream (the old generation's copied block by block and
    # page by page, then each journal chunk's): memory holds one chunk, whatever the index's size.
    writer = index_folder.vector_writer(
        index_dir, generation, identity["sketch"]["output_dim"], identity["vector_dtype"]
    )
    rejected: list[dict] = []
    counts = {"tokens": 0, "truncated": 0}
    templates = Counter(existing.template_usage if existing else {})
    backward_path = dict(existing.backward_path if existing else {})
    self_checks = list(existing.self_checks if existing else [])
    if existing is not None:
        rejected = [
            {"id": row.example_id, "reason": row.reason}
            for row in index_folder.read_rejected(index_dir, existing)
        ]
        old_ids = index_folder.open_vectors(
            index_dir, existing.generation
        ).ids  # the ids only: vectors stay mapped
        old_row_ids = index_folder.read_row_ids(
            index_dir, existing.generation
        )  # its text is copied page by page
        _check_existing_rows(index_dir, existing, old_ids, old_row_ids, rejected)
        counts = {"tokens": existing.token_count, "truncated": existing.truncated_count}

    def row_batches():
        if existing is not None:
            old_vectors = index_folder.open_vectors(index_dir, existing.generation)
            old_vectors.drop_pages = True  # read once: its pages need not stay
            old_vectors.copy_rows_to(writer)
            yield from index_folder.iter_rows(index_dir, existing.generation)
        for chunk_number in range(chunk_count):
            record, vectors = read_chunk(journal, chunk_number)
            writer.add(vectors, np.asarray(record.ids, dtype=np.int64))
            rejected.extend(record.rejected)
            counts["tokens"] += record.tokens
            counts["truncated"] += record.truncated
            templates.update(record.templates)
            backward_path.update(record.backward_path)
            add_self_checks(self_checks, [record.self_checked] if record.self_checked else [])
            yield record.rows

    if settings.shard is None:
        expected_ids = range(plan["id_offset"] + total_rows)
    else:
        expected_ids = range(settings.shard_index, total_rows, settings.num_shards)
    try:
        files = index_folder.write_generation(
            index_dir, generation, writer, row_batches(), rejected, expected_ids
        )
    except StoreError as error:  # the journal's chunks do not add up: recompute them rather than guess
        index_folder.remove_journal(index_dir)
        raise BuildError(
            f"{error}; the journal was cleared: rerun the same command to recompute it"
        ) from None
    manifest = _new_manifest(existing, plan, settings, generation, run.data, total_rows)
    manifest.model["files"] = run.model_files["model"]  # for a no-op rebuild that skips the model
    if manifest.adapter is not None:
        manifest.adapter["files"] = run.model_files["adapter"]
    manifest.row_count = writer.count
    manifest.rejected_count = len(rejected)
    manifest.token_count = counts["tokens"]
    manifest.truncated_count = counts["truncated"]
    manifest.template_usage = dict(templates)
    manifest.backward_path = backward_path
    manifest.self_checks = self_checks
    manifest.files = files
    manifest.optimizer_state = run.optimizer_state  # a fitted preconditioner is not carried over
    pause_point("before-commit")
    with writing(index_dir, 1 << 16):  # uncommitted files left by a failure here go with the next writer
        write_manifest(index_dir, manifest)
    stamp_written(index_dir, manifest, files)  # the first open need not hash them again
    remove_unread_generations(index_dir, generation)
    index_folder.remove_journal(index_dir)
    return manifest


def _check_existing_rows(index_dir: Path, existing: Manifest, ids, row_ids, rejected: list) -> None:
    """The generation an append builds on holds every row once in FAISS and LanceDB, or nothing is appended."""
    problem = index_folder.row_id_problem(
        ids,
        row_ids,
        [row["id"] for row in rejected],
        range(existing.total_rows_seen),
    )
    if problem:
        raise IntegrityError(
            f"{index_dir}: generation {existing.generation} is damaged ({problem}); nothing was appended: "
            "re-import its bundle or rebuild the index"
        )


def _new_manifest(existing, plan, settings, generation, data, total_rows) -> Manifest:
    identity = plan["identity"]
    source = {
        "path": str(data.path),
        "sha256": plan["data_sha256"],
        "id_offset": plan["id_offset"],
        "rows": total_rows,
    }
    if data.split is not None:
        source["split"] = data.split
    model, adapter = settings.model.model, settings.model.adapter
    manifest = Manifest(
        # Resolved, so that a query from any directory finds them; the identity tells another machine.
        model={
            "name_or_path": resolve_location(model),
            **identity["model"],
            "identity": model_identity(model),
        },
        adapter=None
        if identity["adapter"] is None
        else {
            "path": resolve_location(adapter),
            **identity["adapter"],
            "identity": adapter_identity(adapter),
        },
        tokenizer=identity["tokenizer"],
        template=identity["template"],
        max_length=identity["max_length"],
        tokenization=identity["tokenization"],
        parameters=identity["parameters"],
        normalize=identity["normalize"],
        sketch=identity["sketch"],
        vector_dtype=identity["vector_dtype"],
        generation=generation,
        sources=([*existing.sources] if existing else []) + [source],
        shard=identity["shard"],
    )
    if existing is not None:
        manifest.created_at = existing.created_at
    return manifest
