"""Issue 27: `build --append`, `merge` and `import`, run as users run them (the CLI, each in a new process),
stamp the files they wrote (`verify.stamp_written`), so the first open after them, in another new
process, only stats them; a file changed after the stamp is hashed again and refused. The digests are
compared with hashlib / xxhash over the files' bytes read here, never with the package's own."""

import hashlib
import json
import subprocess
import sys

import pytest
import xxhash
from conftest import build_settings
from processes import build_arguments, cli

from rapidin_index.build import build_index
from rapidin_index.errors import IntegrityError
from rapidin_index.store import verify
from rapidin_index.store.bundle_export import export_index
from rapidin_index.store.manifest import read_manifest

K = 256
FIRST_OPEN = """
import json, sys
from rapidin_index.store import verify
from rapidin_index.store.manifest import read_manifest

def hashed(path, algorithm):
    raise SystemExit(f"the first open hashed {path}")

verify.checksum = hashed  # the open may only stat what the writer stamped
for folder in sys.argv[1:]:
    verify.check_files(folder, read_manifest(folder))
print("stat only")
"""


def digests_on_disk(path) -> dict:
    """sha256 and xxh3-128 of a file, or of a folder as a tree (each file's relative path and digest)."""
    if not path.is_dir():
        data = path.read_bytes()
        return {"sha256": hashlib.sha256(data).hexdigest(), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    trees = {"sha256": hashlib.sha256(), "xxh3_128": xxhash.xxh3_128()}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        for name, digest in digests_on_disk(file).items():
            trees[name].update(f"{relative}\n{digest}\n".encode())
    return {name: tree.hexdigest() for name, tree in trees.items()}


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_model_dirs, training_file, training_rows):
    """An index appended to, a merged index and an imported one, each written by the CLI in its own
    process. {what: index folder}."""
    root = tmp_path_factory.mktemp("stamps")
    model = tiny_model_dirs["llama"]
    settings = build_settings(model, sketch_dim=K)
    build_index(training_file, root / "appended", settings, progress=False)
    for shard in range(2):
        shard_settings = build_settings(model, sketch_dim=K, num_shards=2, shard_index=shard)
        build_index(training_file, root / f"shard{shard}", shard_settings, progress=False)
    bundle = export_index(root / "appended", root / "bundle.tar.zst")
    more = root / "more.jsonl"
    more.write_text("".join(json.dumps(row) + "\n" for row in training_rows[:6]))
    append = build_arguments(model, more, root / "appended", K, 8)
    append[append.index("--data")] = "--append"
    runs = [
        append,
        ["merge", str(root / "shard0"), str(root / "shard1"), "--index", str(root / "merged")],
        ["import", str(bundle), "--index", str(root / "imported")],
    ]
    for arguments in runs:
        finished = cli(*arguments)
        assert finished.returncode == 0, finished.stderr[-2000:]
    return {name: root / name for name in ("appended", "merged", "imported")}


def test_append_merge_and_import_stamp_what_they_wrote(written, training_rows):
    appended = read_manifest(written["appended"])
    assert appended.generation == 2 and appended.row_count == len(training_rows) + 6  # it did append
    for folder in written.values():
        manifest = read_manifest(folder)
        stamps = verify.read_stamps(folder)
        assert set(stamps) == set(manifest.files)  # every file the manifest lists, and no other
        for relative, stamp in stamps.items():
            on_disk = digests_on_disk(folder / relative)
            assert stamp["algorithm"] == "xxh3_128" and stamp["digest"] == on_disk["xxh3_128"], relative
            assert manifest.files[relative]["sha256"] == on_disk["sha256"], relative


def test_the_first_open_after_them_in_a_new_process_only_stats(written):
    stamp_files = [folder / verify.STAMP_NAME for folder in written.values()]
    before = [(path.stat().st_ino, path.read_bytes()) for path in stamp_files]
    finished = subprocess.run(
        [sys.executable, "-c", FIRST_OPEN, *map(str, written.values())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0 and "stat only" in finished.stdout, finished.stderr[-2000:]
    # Nothing hashed, so nothing re-stamped: the stamp files are the very ones the writers left.
    assert [(path.stat().st_ino, path.read_bytes()) for path in stamp_files] == before


@pytest.mark.parametrize("what", ["appended", "merged", "imported"])
def test_a_file_changed_after_its_stamp_is_hashed_and_refused(written, what):
    """(Last in this file: it changes the written files.)"""
    folder = written[what]
    manifest = read_manifest(folder)
    vectors = folder / next(name for name in manifest.files if name.startswith("vectors-"))
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF
    vectors.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        verify.check_files(folder, manifest)
