"""Merge statically sharded builds (``build --num-shards N --shard-index I``) into one index.

Each shard is an ordinary index folder holding the rows whose id % N == I. A merge refuses shards built
with different settings or data, a missing or duplicated shard, and any row id that is missing or present
twice; the merged index is written like any build (generation 1, manifest last).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from pathlib import Path

import numpy as np

from rapidin_index.errors import ShardError
from rapidin_index.files import writing
from rapidin_index.store import index_folder
from rapidin_index.store.identity import differences, manifest_identity
from rapidin_index.store.index_folder import read_rejected
from rapidin_index.store.lock import read_generation, writer_lock
from rapidin_index.store.manifest import (
    MANIFEST_NAME,
    Manifest,
    add_self_checks,
    write_manifest,
)
from rapidin_index.store.verify import check_files, stamp_written


def merge_shards(shard_dirs: list[str | Path], index_dir: str | Path) -> Manifest:
    """Merge the shards into a new index in ``index_dir``, holding its writer lock (see store/lock.py)."""
    shard_dirs, index_dir = [Path(d) for d in shard_dirs], Path(index_dir)
    for shard_dir in shard_dirs:
        if not (shard_dir / MANIFEST_NAME).is_file():
            raise ShardError(
                f"{shard_dir} holds no finished index (no {MANIFEST_NAME}); build that shard first"
            )
    with writer_lock(index_dir, "merge"):
        if (index_dir / MANIFEST_NAME).exists():
            raise ShardError(f"{index_dir} already holds an index; merge into a new folder")
        opened = [read_generation(d) for d in shard_dirs]  # leases: no writer removes what we read
        return _merge(shard_dirs, [manifest for manifest, _ in opened], index_dir)


def _merge(shard_dirs: list[Path], manifests: list[Manifest], index_dir: Path) -> Manifest:
    _check_compatible(shard_dirs, manifests)
    total_rows = manifests[0].total_rows_seen
    writer = index_folder.vector_writer(
        index_dir, 1, manifests[0].sketch["output_dim"], manifests[0].vector_dtype
    )
    row_ids, rejected, vector_ids = [], [], []  # ids only: the rows' text is copied page by page
    for shard_dir, manifest in zip(shard_dirs, manifests, strict=True):
        check_files(shard_dir, manifest, full=True)
        ids = index_folder.open_vectors(shard_dir, manifest.generation).ids
        row_ids.append(index_folder.read_row_ids(shard_dir, manifest.generation))
        rejected.extend({"id": r.example_id, "reason": r.reason} for r in read_rejected(shard_dir, manifest))
        vector_ids.append(ids)
    problem = index_folder.row_id_problem(
        np.concatenate(vector_ids),
        np.concatenate(row_ids),
        [row["id"] for row in rejected],
        range(total_rows),
    )
    if problem:
        raise ShardError(f"cannot merge {', '.join(map(str, shard_dirs))}: {problem}")
    rows = _rows_by_id(shard_dirs, manifests, row_ids)
    rejected.sort(key=lambda row: row["id"])
    files = index_folder.write_generation(
        index_dir, 1, writer, _merged_vectors(shard_dirs, manifests, writer, rows), rejected
    )
    merged = Manifest.from_dict(manifests[0].to_dict())
    merged.shard, merged.generation = None, 1
    merged.row_count, merged.rejected_count = writer.count, len(rejected)
    merged.token_count = sum(m.token_count for m in manifests)
    merged.truncated_count = sum(m.truncated_count for m in manifests)
    merged.template_usage = dict(sum((Counter(m.template_usage) for m in manifests), Counter()))
    # Every shard's backward-path tensors and every place a shard's self-check ran: a query in one of those
    # places takes the union, a superset of what its own place's check moved.
    merged.backward_path, merged.self_checks = {}, []
    for manifest in manifests:
        merged.backward_path.update(manifest.backward_path)
        add_self_checks(merged.self_checks, manifest.self_checks)
    merged.files = files
    merged.precondition = None  # a shard's fitted Fisher covers its own rows only: fit the merged index
    with writing(index_dir, 1 << 16):
        write_manifest(index_dir, merged)
    stamp_written(index_dir, merged, files)  # just hashed by write_generation: the first open stats them
    index_folder.remove_journal(index_dir)
    return merged


def _check_compatible(shard_dirs: list[Path], manifests: list[Manifest]) -> None:
    first = manifests[0]
    if first.shard is None:
        raise ShardError(f"{shard_dirs[0]} is not a shard (built without --num-shards)")
    count = first.shard["count"]
    reference = {**manifest_identity(first), "shard": None}
    for shard_dir, manifest in zip(shard_dirs, manifests, strict=True):
        if manifest.shard is None or manifest.shard["count"] != count:
            raise ShardError(f"{shard_dir} is not one of {count} shards")
        changed = differences(reference, {**manifest_identity(manifest), "shard": None})
        if changed:
            raise ShardError(f"{shard_dir} was built with other settings:\n  " + "\n  ".join(changed))
        if [s["sha256"] for s in manifest.sources] != [s["sha256"] for s in first.sources]:
            raise ShardError(f"{shard_dir} was built from other data than {shard_dirs[0]}")
    indices = Counter(m.shard["index"] for m in manifests)
    duplicated = sorted(i for i, n in indices.items() if n > 1)
    missing = sorted(set(range(count)) - set(indices))
    if duplicated:
        raise ShardError(f"shard {duplicated[0]} of {count} is given more than once")
    if missing:
        raise ShardError(
            f"shard {missing[0]} of {count} is missing; build it with --shard-index {missing[0]}"
        )


def _rows_by_id(shard_dirs: list[Path], manifests: list[Manifest], row_ids: list[np.ndarray]):
    """Every shard's rows in one id order, in pages of `row_table.ROW_BATCH`: each shard is read a page at
    a time in its own id order and the shards are interleaved (a heap merge), never a whole shard."""
    from rapidin_index.store.row_table import ROW_BATCH

    def shard_rows(shard_dir: Path, manifest: Manifest, ids: np.ndarray):
        for page in index_folder.iter_rows(shard_dir, manifest.generation, np.argsort(ids, kind="stable")):
            yield from page

    merged = heapq.merge(
        *(shard_rows(*shard) for shard in zip(shard_dirs, manifests, row_ids, strict=True)),
        key=lambda row: row["id"],
    )
    while page := list(itertools.islice(merged, ROW_BATCH)):
        yield page


def _merged_vectors(shard_dirs: list[Path], manifests: list[Manifest], writer, rows):
    """Each shard's vectors in id order into ``writer``, a block at a time (never a whole shard), then
    the rows (pages of `_rows_by_id`) for `index_folder.write_generation`."""
    from rapidin_index.store.vector_file import SCAN_BLOCK_BYTES

    for shard_dir, manifest in zip(shard_dirs, manifests, strict=True):
        stored = index_folder.open_vectors(shard_dir, manifest.generation)
        stored.drop_pages = True
        order = np.argsort(stored.ids, kind="stable")
        step = max(1, SCAN_BLOCK_BYTES // max(stored.row_bytes, 1))
        for start in range(0, len(order), step):
            positions = order[start : start + step]
            writer.add(stored.read_positions(positions), stored.ids[positions])
            stored.release(int(positions.min()), int(positions.max()) + 1)  # read once: drop its pages
    yield from rows
