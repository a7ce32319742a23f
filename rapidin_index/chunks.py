"""Chunks of rows to sketch: the unit of work, of resumption, and of a distributed worker.

`ChunkSketcher` turns one `ChunkJob` into (record, vectors) for the journal; `LocalChunkRunner` runs the
jobs in this process, `parallel.RayChunkRunner` on Ray workers. Neither writes anything: the build does.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rapidin_index.data import Example, RejectedRow
from rapidin_index.store.journal import ChunkRecord

if TYPE_CHECKING:
    from rapidin_index.models import LoadedModel
    from rapidin_index.settings import BuildSettings


def stream_chunks(items, chunk_size: int, total_rows: int, keep=None):
    """(examples, rejected rows) of each chunk in order, from ``items`` (Examples and RejectedRows in id
    order): chunk c holds the ids [c * chunk_size, (c + 1) * chunk_size); every chunk of ``total_rows``
    comes out, empty ones too. One chunk is held at a time. ``keep(id)``: the rows this build takes."""
    chunk_count = -(-total_rows // chunk_size)
    number, examples, rejected = 0, [], []
    for item in items:
        while item.example_id >= (number + 1) * chunk_size:
            yield examples, rejected
            number, examples, rejected = number + 1, [], []
        if keep is None or keep(item.example_id):
            (examples if isinstance(item, Example) else rejected).append(item)
    for _ in range(number, chunk_count):
        yield examples, rejected
        examples, rejected = [], []


@dataclass
class ChunkJob:
    """One chunk of rows to sketch: the unit of work, of resumption, and of a distributed worker."""

    chunk_number: int
    examples: list[Example]
    rejected: list[RejectedRow]
    id_offset: int


class LocalChunkRunner:
    """Computes chunks one after the other in this process."""

    def __init__(self, loaded: LoadedModel, selected, settings: BuildSettings, device) -> None:
        self.chunk_sketcher = ChunkSketcher(loaded, selected, settings, device)

    def run(self, jobs: list[ChunkJob], write, advance) -> None:
        for job in jobs:
            record, vectors = self.chunk_sketcher.compute(job, advance)
            write(job, record, vectors)


class ChunkSketcher:
    """Sketch every example of a chunk; rows whose gradient is not finite join the rejected ones."""

    def __init__(self, loaded: LoadedModel, selected, settings: BuildSettings, device) -> None:
        from rapidin_index.capture import gradient_blocks, gradient_dim
        from rapidin_index.gradients import GradientSketcher
        from rapidin_index.sketch import make_projector

        blocks = gradient_blocks(selected)
        projector = make_projector(settings.sketch, gradient_dim(blocks), device, blocks=blocks)
        self.sketcher = GradientSketcher(loaded.model, blocks, projector, settings.normalize)
        if settings.optimizer_state is not None:
            from rapidin_index.optimizer_state import load_scaling

            adapter = settings.model.adapter is not None
            self.sketcher.use_optimizer_state(
                load_scaling(settings.optimizer_state, loaded.model, blocks, adapter)
            )
        self.tokenizer = loaded.tokenizer
        self.batch_size = settings.batch_size
        self.device = device

    def compute(self, job: ChunkJob, advance=lambda rows, tokens: None) -> tuple[ChunkRecord, np.ndarray]:
        from rapidin_index.losses import collate

        results: dict[int, tuple[np.ndarray, dict]] = {}
        rejected = [{"id": row.example_id + job.id_offset, "reason": row.reason} for row in job.rejected]
        advance(len(rejected), 0)
        ordered = sorted(
            job.examples, key=lambda example: len(example.input_ids), reverse=True
        )  # less padding
        for start in range(0, len(ordered), self.batch_size):
            batch_examples = ordered[start : start + self.batch_size]
            pairs = [(e.input_ids, e.labels) for e in batch_examples]
            sketched = self.sketcher.sketch(collate(pairs, self.tokenizer.pad_token_id, self.device))
            vectors = sketched.vectors.cpu().numpy()
            for row, example in enumerate(batch_examples):
                example_id = example.example_id + job.id_offset
                if not bool(sketched.finite[row]):
                    reason = "non-finite gradient (NaN or inf); try --dtype float32"
                    rejected.append({"id": example_id, "reason": reason})
                    continue
                results[example_id] = (vectors[row], _metadata_row(example, example_id, sketched, row))
            advance(len(batch_examples), sum(len(e.input_ids) for e in batch_examples))
        return _chunk_record(results, rejected, job.examples, self.sketcher)


def _chunk_record(
    results: dict, rejected: list[dict], examples: list[Example], sketcher
) -> tuple[ChunkRecord, np.ndarray]:
    ids = sorted(results)
    dimension = sketcher.projector.output_dim
    stacked = np.stack([results[i][0] for i in ids]) if ids else np.zeros((0, dimension), np.float32)
    record = ChunkRecord(
        ids=ids,
        rows=[results[i][1] for i in ids],
        rejected=sorted(rejected, key=lambda row: row["id"]),
        tokens=sum(results[i][1]["num_tokens"] for i in ids),
        truncated=sum(results[i][1]["truncated"] for i in ids),
        templates=dict(Counter(e.template_name for e in examples)),
        backward_path=dict(sketcher.backward_path),
        self_checked=sketcher.checked_in,  # where the hooks were checked (None: not by this worker)
    )
    return record, stacked.astype(np.float32, copy=False)  # already float32: no second copy


def _metadata_row(example: Example, example_id: int, sketched, row: int) -> dict:
    return {
        "id": example_id,
        "source": json.dumps(example.source, ensure_ascii=False, sort_keys=True),
        "prompt": example.prompt,
        "response": example.response,
        "num_tokens": len(example.input_ids),
        "num_response_tokens": example.num_response_tokens,
        "truncated": example.truncated,
        "loss": float(sketched.losses[row]),
        "gradient_norm": float(sketched.gradient_norms[row]),
        "content_hash": example.content_hash,
    }
