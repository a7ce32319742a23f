"""Fitting weight-space EK-FAC (`ekfac`) with the index's model over the index's own rows.

`fit_index_weights` (``rapidin-index fit --kind ekfac-weights | fisher+ekfac-weights``) opens the index, runs
its model over its stored rows (`training_batches`, prepared as its queries are), fits the factors
(`ekfac.fit_factors`) and records them beside the vectors; the combined kind fits the sketch-space Fisher
(`precondition.fit_index`) first. Apart from `ekfac` because it opens a `retrieval.Index`, which itself
loads the fitted factors from `ekfac` at query time.
"""

from __future__ import annotations

import json
from pathlib import Path

from rapidin_index.ekfac import (
    COMBINED_KIND,
    DAMPING_RULE,
    DEFAULT_HEAD,
    DEFAULT_LABELS,
    DEFAULT_TENSORS,
    FORMAT_VERSION,
    HEADS,
    KINDS,
    LABELS,
    WEIGHTS_KIND,
    TensorFactors,
    default_damping,
    exact_sketcher,
    fit_factors,
    save_factors,
    weights_file,
)
from rapidin_index.errors import PreconditionError


def training_batches(index) -> tuple[list, int]:
    """(batches, skipped): the index's own rows (their JSON as stored), prepared as its queries are and
    collated ``index.batch_size`` at a time."""
    from rapidin_index.errors import QueryError, RowError
    from rapidin_index.losses import collate
    from rapidin_index.query import prepare_row
    from rapidin_index.store import index_folder

    sequences, skipped = [], 0
    for page in index_folder.iter_rows(index.path, index.manifest.generation):
        for row in page:
            try:
                prepared = prepare_row(json.loads(row["source"]), index.loaded.tokenizer, index.manifest)
            except (QueryError, RowError, ValueError):
                skipped += 1
                continue
            sequences.append((prepared.input_ids, prepared.labels_for(prepared.hot_positions)))
    pad = index.loaded.tokenizer.pad_token_id
    size = index.batch_size
    batches = [
        collate(sequences[start : start + size], pad, index.device)
        for start in range(0, len(sequences), size)
    ]
    return batches, skipped


def fit_weights(
    index,
    labels: str = DEFAULT_LABELS,
    damping: float | None = None,
    seed: int = 0,
    tensors: str = DEFAULT_TENSORS,
    head: str = DEFAULT_HEAD,
) -> tuple[list[TensorFactors], dict]:
    """(factors, record) of an opened `retrieval.Index` over its own rows; the rows' mean norms scale the
    query's tensors where the index is layer-normalised (`fit_factors`)."""
    import time

    if index.manifest.optimizer_state is not None:
        raise PreconditionError(
            f"--kind {WEIGHTS_KIND}: this index was built with --optimizer-state, which weight-space EK-FAC "
            "does not model; use --kind fisher"
        )
    damping = default_damping(index.manifest.sketch["sketch_dim"]) if damping is None else damping
    started = time.perf_counter()
    batches, skipped = training_batches(index)
    row_norms = index.manifest.normalize == "layer"
    model, sketcher = index.loaded.model, exact_sketcher(index)
    factors = fit_factors(
        model, index.blocks, sketcher, batches, labels, damping, seed, tensors, row_norms, head
    )
    record = {
        "damping": damping,
        "damping_rule": DAMPING_RULE,
        "labels": labels,
        "tensors": tensors,
        "head": head,
        "row_norms": row_norms,
        "kronecker_tensors": sum(f.kronecker for f in factors),
        "diagonal_tensors": sum(not f.kronecker for f in factors),
        "rows": sum(batch.size for batch in batches),
        "skipped_rows": skipped,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return factors, record


def fit_index_weights(
    index_dir: str | Path,
    kind: str = WEIGHTS_KIND,
    damping: float | None = None,
    labels: str = DEFAULT_LABELS,
    locked: bool = False,
    fisher_damping: float | None = None,
    device: str = "auto",
    tensors: str = DEFAULT_TENSORS,
    head: str = DEFAULT_HEAD,
) -> dict:
    """Fit ``ekfac-weights`` (or ``fisher+ekfac-weights``: the sketch-space Fisher with query norms too)
    with the index's model over its rows; write it beside the vectors and record it in the manifest."""
    import contextlib

    from rapidin_index.precondition import fisher_file, fit_index
    from rapidin_index.retrieval import Index
    from rapidin_index.store.checksums import file_entry
    from rapidin_index.store.lock import writer_lock
    from rapidin_index.store.manifest import read_manifest, write_manifest

    if kind not in KINDS:
        raise PreconditionError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    if labels not in LABELS:
        raise PreconditionError(f"--labels {labels!r} is not one of {', '.join(LABELS)}")
    if head not in HEADS:
        raise PreconditionError(f"--head {head!r} is not one of {', '.join(HEADS)}")
    index_dir = Path(index_dir)
    if read_manifest(index_dir).optimizer_state is not None:  # before the Fisher part is written
        raise PreconditionError(
            f"--kind {kind}: this index was built with --optimizer-state, which weight-space EK-FAC does "
            "not model; use --kind fisher"
        )
    if kind == COMBINED_KIND:  # the Fisher first: its record is the base of the combined one
        fisher = fit_index(index_dir, damping=fisher_damping, locked=locked, kind="fisher", query_norms=True)
    index = Index.open(index_dir, device=device, precondition="none")
    try:
        generation = index.manifest.generation
        factors, weights = fit_weights(index, labels, damping, tensors=tensors, head=head)
    finally:
        index.lease.close()
    with contextlib.nullcontext() if locked else writer_lock(index_dir, "fit"):
        manifest = read_manifest(index_dir)
        if manifest.generation != generation:
            raise PreconditionError(f"{index_dir} changed while fitting (an append?); fit it again")
        name = weights_file(generation)
        save_factors(index_dir / name, factors)
        manifest.files[name] = file_entry(index_dir / name)
        weights["file"] = name
        if kind == WEIGHTS_KIND:
            manifest.files.pop(fisher_file(generation), None)
            manifest.precondition = {
                "kind": WEIGHTS_KIND,
                "version": FORMAT_VERSION,
                "structure": "weight space",
                "blocks": len(factors),
                **weights,
                "query_norms": True,
                "kept_eigenpairs": int(sum(f.eigenvalues.size for f in factors)),
            }
        else:
            manifest.precondition = {**fisher, "kind": COMBINED_KIND, "weights": weights}
            manifest.precondition["seconds"] = round(fisher["seconds"] + weights["seconds"], 3)
        write_manifest(index_dir, manifest)
    return manifest.precondition


# --------------------------------------------------------------------------- queries
