"""Append, merge, export and build memory against N (issue 27 item 2): old and new code in one run.

Synthetic indexes (no model): unit-norm vectors (K = 4096, float16, the default) written through the
project's own writer, and rows of about 300 characters of text with two metadata fields (``lang``,
``year``), written through `index_folder.write_generation`; the manifest is a tiny demo build's with the counts,
files and sources replaced. Every measurement runs in a fresh process (one thread) that imports the
package from ``--code`` (this checkout, or ``--old`` = another checkout, e.g. ``git worktree add --detach
/tmp/t-old <commit>``) and reports its wall time, its peak RSS (VmHWM) and its RSS after the imports
(``base``: the peak's growth over it is what the operation itself held):

append     1,000 rows appended the way build's finalize does it (the store-level calls of each version's
           `build._finalize`: the old generation's ids checked, its vectors and rows copied into the new
           generation with 1,000 new rows, the new files written; not committed, then removed)
merge      `shards.merge_shards` of two shards of N/2 rows (ids i % 2)
export     `bundle_export.export_index` to .tar.gz, .tar.zst (new code only) and .parquet: time, size
build      (``--build-rows``) `build.build_index` of N rows with the tiny demo Llama (K = 4096), whole,
           in a fresh process each: peak RSS against N
open       (``--open-rows``, issue 27: stamps) the first open after each writer that commits: `build
           --append` of 64 rows (`build.build_index`, the tiny Llama), `merge_shards` of two halves,
           `import_bundle` of a plain-tar export; each writer in a fresh process, then the open's file
           check (`verify.check_files`, what `Index.open` runs) in another fresh process, timed, with
           whether the writer had stamped the files it wrote (old code: hashed again; new: stat only)

Run from the repository root; see BENCHMARKS.md for the command and the results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import drive, memory, parse_arguments

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
K = 4096
WORDS = "model index gradient sketch token vector append merge export stream memory row text".split()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="16384,65536,131072", help="synthetic index sizes")
    parser.add_argument("--build-rows", default="1000,4000,16000", help="row counts of the model builds")
    parser.add_argument("--old", default=None, help="checkout of the old code (before/after in one run)")
    parser.add_argument("--folder", default=None, help="where the indexes go (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--table", default=None, help="print the Markdown tables of a results JSON file")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: append,merge,export,build")
    parser.add_argument(
        "--open-rows", default="", help="index sizes of the first-open-after-a-writer part (default: none)"
    )
    parser.add_argument(
        "--old-exports", default="tar.gz,parquet", help="formats exported by the old code too"
    )
    parser.add_argument(
        "--old-parquet-max",
        type=int,
        default=65536,
        help="no old Parquet export above (it holds 3x the index)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    # the smoke run: this checkout is also the "old" code, and each child runs in this process
    root = str(Path(__file__).resolve().parent.parent)
    return parse_arguments(parser, argv, rows="64", build_rows="8", old=root, out="{smoke}/result.json")


def text_row(example_id: int) -> dict:
    generator = random.Random(example_id)
    words = [generator.choice(WORDS) for _ in range(42)]  # about 300 characters in all
    return {
        "instruction": " ".join(words[:21]),
        "output": " ".join(words[21:]),
        "lang": generator.choice(["en", "de", "fr"]),
        "year": 2000 + example_id % 25,
    }


def stored_row(example_id: int) -> dict:
    """A row as the build stores it (`row_table.SCHEMA`)."""
    source = text_row(example_id)
    return {
        "id": example_id,
        "source": json.dumps(source),
        "prompt": source["instruction"],
        "response": source["output"],
        "num_tokens": 60,
        "num_response_tokens": 30,
        "truncated": False,
        "loss": 2.5,
        "gradient_norm": 1.5,
        "content_hash": f"{example_id:064x}",
    }


def unit_vectors(ids):
    import numpy as np

    vectors = np.random.default_rng(int(ids[0])).standard_normal((len(ids), K)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # [rows, K] float32


# --------------------------------------------------------------------------- child processes


def child(mode: str, paths: list[str]) -> dict:
    """One measurement in this (fresh) process, with the package of PYTHONPATH."""
    import rapidin_index
    from rapidin_index.store import (
        bundle_export,
        index_folder,  # noqa: F401  (imported before the baseline)
        shards,
    )

    result = {"code": str(Path(rapidin_index.__file__).parent.parent), "base": memory()}
    started = time.perf_counter()
    if mode == "append":
        append_rows(Path(paths[0]), 1000)
    elif mode == "merge":
        shards.merge_shards([Path(paths[0]), Path(paths[1])], Path(paths[2]))
    elif mode == "export":
        result["bytes"] = bundle_export.export_index(paths[0], paths[1]).stat().st_size
    elif mode == "build":
        from rapidin_index.build import build_index
        from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

        settings = BuildSettings(ModelSettings(paths[1]), sketch=SketchSettings(K), device="cpu")
        result["rows"] = build_index(paths[0], paths[2], settings, progress=False).rows_indexed
    elif mode == "append-commit":
        from rapidin_index.build import build_index
        from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

        settings = BuildSettings(ModelSettings(paths[1]), sketch=SketchSettings(K), device="cpu")
        build_index(paths[0], paths[2], settings, append=True, progress=False)
    elif mode == "import":
        from rapidin_index.store.bundle_import import import_bundle

        import_bundle(paths[0], paths[1])
    elif mode == "open":
        from rapidin_index.store import verify
        from rapidin_index.store.manifest import read_manifest

        manifest = read_manifest(paths[0])
        stamps = verify.read_stamps(Path(paths[0]))
        result["stamped"] = sorted(set(stamps) & set(manifest.files)) == sorted(manifest.files)
        result["bytes"] = sum(entry["bytes"] for entry in manifest.files.values())
        started = time.perf_counter()
        verify.check_files(paths[0], manifest)  # what Index.open runs (stat only where stamped)
    result["seconds"] = time.perf_counter() - started
    result["end"] = memory()
    return result


def append_rows(index_dir: Path, count: int) -> None:
    """What build's finalize does for ``--append`` of ``count`` rows, in the store-level calls of the
    version imported (old: the previous rows read whole; new: their ids, then pages)."""
    import numpy as np

    from rapidin_index.store import index_folder
    from rapidin_index.store.manifest import read_manifest

    existing = read_manifest(index_dir)
    generation, total = existing.generation, existing.total_rows_seen
    rejected = [
        {"id": r.example_id, "reason": r.reason} for r in index_folder.read_rejected(index_dir, existing)
    ]
    old_ids = index_folder.open_vectors(index_dir, generation).ids
    paged = hasattr(index_folder, "iter_rows")
    if paged:
        old_rows, row_ids = None, index_folder.read_row_ids(index_dir, generation).tolist()
    else:
        old_rows = index_folder.read_all_rows(index_dir, generation)
        row_ids = [row["id"] for row in old_rows]
    assert not index_folder.row_id_problem(old_ids.tolist(), row_ids, [], range(total))
    writer = index_folder.vector_writer(index_dir, generation + 1, K, existing.vector_dtype)

    def batches():
        old = index_folder.open_vectors(index_dir, generation)
        old.drop_pages = True
        old.copy_rows_to(writer)
        if paged:
            yield from index_folder.iter_rows(index_dir, generation)
        else:
            yield old_rows
        new_ids = np.arange(total, total + count)
        writer.add(unit_vectors(new_ids), new_ids)
        yield [stored_row(i) for i in new_ids.tolist()]

    index_folder.write_generation(
        index_dir, generation + 1, writer, batches(), rejected, range(total + count)
    )
    index_folder.remove_generation(index_dir, generation + 1)  # not committed: the index is measured again


def run_child(mode: str, code: str, *paths, smoke: bool = False) -> dict:
    if smoke:  # the smoke run's old code is this checkout: the child runs in this process
        return child(mode, [str(p) for p in paths])
    command = [sys.executable, __file__, "--child", mode, "--paths", json.dumps([str(p) for p in paths])]
    environment = {**os.environ, **ONE_THREAD, "PYTHONPATH": code, "LANCEDB_LOG": "error"}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"{mode} with {code} failed:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    if Path(result["code"]).resolve() != Path(code).resolve():
        raise SystemExit(f"{mode}: imported {result['code']}, not {code}")
    return result


# --------------------------------------------------------------------------- fixtures


def tiny_model(folder: Path) -> Path:
    from rapidin_index.demo.tiny_models import save_tiny_model

    texts = [f"{row['instruction']} {row['output']}" for row in map(text_row, range(200))]
    return save_tiny_model(folder / "model", "llama", texts, vocab_size=400)


def template_manifest(folder: Path, model: Path):
    """The manifest of a tiny build (8 rows): the synthetic indexes take its identity."""
    from rapidin_index.build import build_index
    from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings
    from rapidin_index.store.manifest import read_manifest

    data = write_data(folder / "template.jsonl", 8)
    settings = BuildSettings(ModelSettings(str(model)), sketch=SketchSettings(K), device="cpu")
    build_index(data, folder / "template", settings, progress=False)
    return read_manifest(folder / "template")


def write_data(path: Path, rows: int) -> Path:
    path.write_text("".join(json.dumps(text_row(i)) + "\n" for i in range(rows)))
    return path


def synthetic_index(index_dir: Path, template, total: int, shard: int | None = None) -> None:
    """An index of ``total`` rows (a shard: those with id % 2 == ``shard``), written by the store."""
    import numpy as np

    from rapidin_index.store import index_folder
    from rapidin_index.store.manifest import Manifest, write_manifest

    ids = np.arange(total) if shard is None else np.arange(shard, total, 2)
    writer = index_folder.vector_writer(index_dir, 1, K, template.vector_dtype)

    def batches():
        for start in range(0, len(ids), 4096):
            chunk = ids[start : start + 4096]
            writer.add(unit_vectors(chunk), chunk)
            yield [stored_row(i) for i in chunk.tolist()]

    files = index_folder.write_generation(index_dir, 1, writer, batches(), [])
    manifest = Manifest.from_dict(template.to_dict())
    manifest.generation, manifest.files, manifest.row_count, manifest.rejected_count = 1, files, len(ids), 0
    manifest.sources = [{**template.sources[0], "rows": total, "sha256": f"synthetic-{total}"}]
    manifest.shard = None if shard is None else {"count": 2, "index": shard}
    manifest.precondition = None
    write_manifest(index_dir, manifest)


# --------------------------------------------------------------------------- driver


def first_opens(folder: Path, codes: dict, template, model: Path, rows: int) -> dict:
    """Per writer that commits (append, merge, import) and per code: the writer in a fresh process, then
    the first open's file check in another; {f"{writer}_{code}": {"write": ..., "open": ...}}."""
    from rapidin_index.store.bundle_export import export_index

    base, halves = folder / f"open-base-{rows}", [folder / f"open-shard-{rows}-{i}" for i in (0, 1)]
    synthetic_index(base, template, rows)
    for shard, half in enumerate(halves):
        synthetic_index(half, template, rows, shard)
    bundle = export_index(base, folder / f"open-{rows}.tar")
    more = write_data(folder / "append-64.jsonl", 64)
    results = {}
    for name, code in codes.items():
        target = folder / f"open-target-{rows}"
        for writer in ("append", "merge", "import"):
            if writer == "append":
                shutil.copytree(base, target)
                write = run_child("append-commit", code, more, model, target)
            elif writer == "merge":
                write = run_child("merge", code, *halves, target)
            else:
                write = run_child("import", code, bundle, target)
            results[f"{writer}_{name}"] = {"write": write, "open": run_child("open", code, target)}
            shutil.rmtree(target)
    for path in (base, *halves):
        shutil.rmtree(path)
    bundle.unlink()
    return results


def measure(args: argparse.Namespace, folder: Path) -> dict:
    codes = {"new": str(Path(__file__).resolve().parent.parent)}
    if args.old:
        codes["old"] = str(Path(args.old).resolve())
    skip = set(args.skip.split(","))
    model = tiny_model(folder)
    sizes = args.rows.split(",") + args.open_rows.split(",")
    template = template_manifest(folder, model) if any(r for r in sizes) else None
    results = {"synthetic": [], "build": []}
    for rows in (int(r) for r in args.rows.split(",") if r):
        index_dir = folder / f"index-{rows}"
        started = time.perf_counter()
        synthetic_index(index_dir, template, rows)
        entry = {"rows": rows, "write_s": time.perf_counter() - started}
        for name, code in codes.items():
            if "append" not in skip:
                entry[f"append_{name}"] = run_child("append", code, index_dir, smoke=args.smoke)
            if "export" not in skip:
                formats = ["tar.gz", "tar.zst", "parquet"] if name == "new" else args.old_exports.split(",")
                if name == "old" and rows > args.old_parquet_max:
                    formats = [f for f in formats if f != "parquet"]
                for bundle_format in formats:
                    out = folder / f"bundle.{bundle_format}"
                    entry[f"export_{bundle_format}_{name}"] = run_child(
                        "export", code, index_dir, out, smoke=args.smoke
                    )
                    out.unlink()
        shutil.rmtree(index_dir)
        if "merge" not in skip:
            halves = [folder / f"shard-{rows}-{i}" for i in (0, 1)]
            for shard, half in enumerate(halves):
                synthetic_index(half, template, rows, shard)
            for name, code in codes.items():
                merged = folder / f"merged-{rows}"
                entry[f"merge_{name}"] = run_child("merge", code, *halves, merged, smoke=args.smoke)
                shutil.rmtree(merged)
            for half in halves:
                shutil.rmtree(half)
        print(json.dumps(entry), flush=True)
        results["synthetic"].append(entry)
    for rows in (int(r) for r in args.open_rows.split(",") if r):
        entry = {"rows": rows, **first_opens(folder, codes, template, model, rows)}
        print(json.dumps(entry), flush=True)
        results.setdefault("open", []).append(entry)
    for rows in (int(r) for r in args.build_rows.split(",") if r and "build" not in skip):
        data = write_data(folder / f"train-{rows}.jsonl", rows)
        entry = {"rows": rows}
        for name, code in codes.items():
            index_dir = folder / f"built-{rows}-{name}"
            entry[f"build_{name}"] = run_child("build", code, data, model, index_dir, smoke=args.smoke)
            shutil.rmtree(index_dir)
        print(json.dumps(entry), flush=True)
        results["build"].append(entry)
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    drive(args, lambda: child(args.child, json.loads(args.paths)), measure, table)


def table(results: dict) -> str:
    """The results as Markdown tables (MB = 10^6 bytes; peak = VmHWM, grown = peak - RSS after imports)."""
    mb = 10**6

    def cell(result: dict | None, size: bool = False) -> str:
        if not result:
            return "-"
        text = f"{result['seconds']:.1f} s, {result['end']['VmHWM'] / mb:,.0f} MB"
        text += f" (+{(result['end']['VmHWM'] - result['base']['VmRSS']) / mb:,.0f})"
        return text + (f", {result['bytes'] / mb:,.0f} MB" if size else "")

    lines = ["| rows | operation | old: time, peak RSS (+ growth) | new: time, peak RSS (+ growth) |"]
    lines.append("|---" * 4 + "|")
    for entry in results["synthetic"]:
        for operation, label, size in (
            ("append", "append 1,000 rows", False),
            ("merge", "merge two halves", False),
            ("export_tar.gz", "export .tar.gz (time, RSS, size)", True),
            ("export_tar.zst", "export .tar.zst (time, RSS, size)", True),
            ("export_parquet", "export .parquet (time, RSS, size)", True),
        ):
            old, new = entry.get(f"{operation}_old"), entry.get(f"{operation}_new")
            if old or new:
                lines.append(f"| {entry['rows']:,} | {label} | {cell(old, size)} | {cell(new, size)} |")
    if results.get("open"):
        lines += [
            "",
            "| rows | writer | old: write s; first open's file check s (stamped?) | new: write s; first open's file check s (stamped?) |",
            "|---|---|---|---|",
        ]
        for entry in results["open"]:
            for writer in ("append", "merge", "import"):
                cells = []
                for name in ("old", "new"):
                    found = entry.get(f"{writer}_{name}")
                    cells.append(
                        "-"
                        if not found
                        else f"{found['write']['seconds']:.1f} s; {found['open']['seconds']:.3f} s "
                        f"({'stamped' if found['open']['stamped'] else 'not stamped'})"
                    )
                lines.append(f"| {entry['rows']:,} | {writer} | {cells[0]} | {cells[1]} |")
    if results["build"]:
        lines += ["", "| rows | build (tiny Llama, K = 4096): old | new |", "|---|---|---|"]
        for entry in results["build"]:
            lines.append(
                f"| {entry['rows']:,} | {cell(entry.get('build_old'))} | {cell(entry.get('build_new'))} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
