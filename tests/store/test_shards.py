"""Static shards + merge give the same index as one build; bad merges are refused."""

import numpy as np
import pytest
from conftest import build_settings, stored_vectors

from rapidin_index.build import build_index
from rapidin_index.errors import BuildError, ShardError
from rapidin_index.retrieval import Index
from rapidin_index.settings import SketchSettings
from rapidin_index.store import index_folder
from rapidin_index.store.shards import merge_shards


def settings(tiny_model_dirs, **overrides):
    return build_settings(tiny_model_dirs["llama"], sketch_dim=2048, **{"chunk_size": 5, **overrides})


@pytest.fixture(scope="module")
def shard_builds(tmp_path_factory, tiny_model_dirs, training_file):
    root = tmp_path_factory.mktemp("shards")
    build_index(training_file, root / "single", settings(tiny_model_dirs), progress=False)
    for shard in range(3):
        build_index(
            training_file,
            root / f"shard{shard}",
            settings(tiny_model_dirs, num_shards=3, shard_index=shard),
            progress=False,
        )
    return root


def test_shards_merge_to_the_single_build(shard_builds, training_rows):
    root = shard_builds
    assert sorted(stored_vectors(root / "shard1")) == [i for i in range(len(training_rows)) if i % 3 == 1]
    merged = merge_shards([root / "shard2", root / "shard0", root / "shard1"], root / "merged")
    assert merged.row_count == len(training_rows) and merged.shard is None
    single, combined = stored_vectors(root / "single"), stored_vectors(root / "merged")
    assert sorted(single) == sorted(combined)
    for example_id, vector in single.items():
        np.testing.assert_allclose(combined[example_id], vector, atol=1e-6)
    assert [row["id"] for row in index_folder.read_all_rows(root / "merged", 1)] == list(
        range(len(training_rows))
    )
    row = training_rows[7]
    expected = Index.open(root / "single", device="cpu").query(
        row["instruction"], row["output"], top_k=5, explain=0
    )
    found = Index.open(root / "merged", device="cpu").query(
        row["instruction"], row["output"], top_k=5, explain=0
    )
    assert [h.id for h in found.helpful] == [h.id for h in expected.helpful]
    np.testing.assert_allclose(
        [h.score for h in found.helpful], [h.score for h in expected.helpful], rtol=1e-5
    )


def test_bad_merges_are_refused(shard_builds, tmp_path, tiny_model_dirs, training_file):
    root = shard_builds
    with pytest.raises(ShardError, match="shard 2 of 3 is missing"):
        merge_shards([root / "shard0", root / "shard1"], tmp_path / "a")
    with pytest.raises(ShardError, match="shard 1 of 3 is given more than once"):
        merge_shards([root / "shard0", root / "shard1", root / "shard1"], tmp_path / "b")
    with pytest.raises(ShardError, match="not a shard"):
        merge_shards([root / "single", root / "shard1"], tmp_path / "c")
    other = tmp_path / "other_k"
    build_index(
        training_file,
        other,
        settings(tiny_model_dirs, sketch=SketchSettings(1024, 20, 42), num_shards=3, shard_index=2),
        progress=False,
    )
    with pytest.raises(ShardError, match="other settings:\n  sketch"):
        merge_shards([root / "shard0", root / "shard1", other], tmp_path / "d")
    with pytest.raises(BuildError, match="--shard-index must be in"):
        settings(tiny_model_dirs, num_shards=2, shard_index=2)
    with pytest.raises(BuildError, match="merge the shards first"):
        build_index(
            training_file,
            root / "shard0",
            settings(tiny_model_dirs, num_shards=3, shard_index=0),
            append=True,
            progress=False,
        )


def test_a_merge_keeps_every_shards_exact_path_and_self_checks(shard_builds, tmp_path):
    """A shard checked elsewhere moved a tensor to the exact path: the merged index names both places
    and the tensor, so a query in either place takes a verdict that covers its own."""
    import shutil

    from rapidin_index.store.manifest import read_manifest, write_manifest

    copies = [shutil.copytree(shard_builds / f"shard{n}", tmp_path / f"shard{n}") for n in range(3)]
    first = read_manifest(copies[0])
    assert first.self_checks and not first.backward_path  # the tiny Llama: every tensor hooked, here
    elsewhere = {**first.self_checks[0], "device": "cuda", "dtype": "bfloat16"}
    name = first.parameters["names"][1]
    changed = read_manifest(copies[2])
    changed.self_checks, changed.backward_path = [elsewhere], {name: "self-check: differs (simulated)"}
    write_manifest(copies[2], changed)
    merged = merge_shards(copies, tmp_path / "merged")
    assert merged.self_checks == [first.self_checks[0], elsewhere]
    assert merged.backward_path == {name: "self-check: differs (simulated)"}
    opened = Index.open(tmp_path / "merged", device="cpu")
    assert opened.sketcher.self_checked and name in opened.sketcher.backward_path


def test_a_damaged_shard_is_refused_before_the_merge_reads_it(shard_builds, tmp_path):
    """merge re-hashes every file it reads (issue 25), stamps or not: a flipped byte names the file."""
    import shutil

    from rapidin_index.errors import IntegrityError

    copies = [shutil.copytree(shard_builds / f"shard{n}", tmp_path / f"shard{n}") for n in range(3)]
    vectors = copies[1] / "vectors-g0001.faiss"
    data = bytearray(vectors.read_bytes())
    data[len(data) // 2] ^= 0x10
    vectors.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="shard1/vectors-g0001.faiss does not match its checksum"):
        merge_shards(copies, tmp_path / "merged")
    assert not (tmp_path / "merged" / "manifest.json").exists()
