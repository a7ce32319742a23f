"""Chunks: every row lands in the chunk its id names; a chunk's record and vectors equal brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import brute_force_sketch, build_settings

from rapidin_index.capture import gradient_blocks
from rapidin_index.chunks import ChunkJob, ChunkSketcher, LocalChunkRunner, stream_chunks
from rapidin_index.data import RejectedRow, load_examples, parse_template
from rapidin_index.models import load_model, select_parameters


@pytest.fixture(scope="module")
def chunk_inputs(tiny_model_dirs, training_file):
    settings = build_settings(tiny_model_dirs["llama"], sketch_dim=512)
    loaded = load_model(settings.model)
    selected = select_parameters(loaded.model, settings.model)
    examples, _ = load_examples(training_file, loaded.tokenizer, parse_template("auto"), settings.max_length)
    return settings, loaded, selected, examples


def test_stream_chunks_puts_each_id_in_its_own_chunk(chunk_inputs):
    examples = chunk_inputs[3][:10]
    rejected = [RejectedRow(example_id=11, reason="bad"), RejectedRow(example_id=3, reason="bad")]
    kept = [e for e in examples if e.example_id != 3]
    items = sorted([*kept, *rejected], key=lambda item: item.example_id)  # id order, as a build reads them
    groups = list(stream_chunks(items, chunk_size=4, total_rows=12))
    assert len(groups) == 3
    for number, (chunk_examples, chunk_rejected) in enumerate(groups):
        ids = [e.example_id for e in chunk_examples] + [r.example_id for r in chunk_rejected]
        assert all(number * 4 <= i < (number + 1) * 4 for i in ids)
    assert sorted(
        i
        for examples_, rejected_ in groups
        for i in [e.example_id for e in examples_] + [r.example_id for r in rejected_]
    ) == sorted([e.example_id for e in kept] + [3, 11])


def test_a_chunk_record_holds_its_rows_in_id_order_with_brute_force_vectors(chunk_inputs):
    settings, loaded, selected, examples = chunk_inputs
    job = ChunkJob(0, examples[:6], [RejectedRow(example_id=6, reason="row 6: no response")], id_offset=100)
    advanced = []
    record, vectors = ChunkSketcher(loaded, selected, settings, "cpu").compute(
        job, lambda rows, tokens: advanced.append((rows, tokens))
    )
    assert record.ids == [100 + e.example_id for e in examples[:6]]  # offset, sorted by id
    assert [row["id"] for row in record.rows] == record.ids
    assert record.rejected == [{"id": 106, "reason": "row 6: no response"}]
    assert record.tokens == sum(len(e.input_ids) for e in examples[:6])
    assert sum(rows for rows, _ in advanced) == 7  # every row of the chunk, the rejected one too
    blocks = gradient_blocks(selected)
    pairs = [(e.input_ids, e.labels) for e in examples[:6]]
    expected = brute_force_sketch(loaded.model, blocks, pairs, loaded.tokenizer.pad_token_id, settings.sketch)
    assert vectors.dtype == np.float32 and vectors.shape == (6, 512)
    torch.testing.assert_close(torch.from_numpy(vectors), expected, atol=2e-5, rtol=1e-4)


def test_the_local_runner_writes_every_job_once_in_order(chunk_inputs):
    settings, loaded, selected, examples = chunk_inputs
    jobs = [ChunkJob(n, examples[n * 3 : n * 3 + 3], [], 0) for n in (2, 0, 5)]
    written = []
    LocalChunkRunner(loaded, selected, settings, "cpu").run(
        jobs,
        lambda job, record, vectors: written.append((job.chunk_number, record.ids, len(vectors))),
        lambda *_: None,
    )
    assert written == [(n, [e.example_id for e in examples[n * 3 : n * 3 + 3]], 3) for n in (2, 0, 5)]
