"""A 13 GB index on one machine (issue 27 item 4): open time, query memory and search time at the paper's scale.

Building 100,000 rows at K = 65,536 with a model takes hours on 2 CPU cores, so the index is made in two
steps, both through the project's own code:

seed     a real index of ``--seed-rows`` synthetic rows built with the tiny Llama of `scaling.py --growth`
         at K = ``--sketch-dim`` in ``--dtype`` (`scaling.py`'s build child, a fresh process): its manifest,
         model fingerprints, self-check and LanceDB schema are the real ones.
grow     generation 2 of that index written as a build's finalise writes one (`index_folder.vector_writer` +
         `index_folder.write_generation`: the vectors file streamed block by block, LanceDB in one write, the
         checksums), with ``--rows`` random unit-norm rows (stored as
         ``--dtype``) and ``--rows`` synthetic text rows, then the manifest committed with the new
         generation, its files and row count. `Index.open` and the `query` CLI take it as any index.
         The rows are random sign vectors +-1/sqrt(K) by default (unit norm, and exact in float16 at
         K = 4^n; random bits cost a seventh of normal draws on this machine: ``--row-kind normal``
         for normalised Gaussian rows); a search's cost does not depend on the values.

Then each measurement is a fresh process (torch, BLAS and FAISS on one thread) on the real query path:
`Index.open` (model load timed on its own), a whole-generation query's vector (1) or a per-token query's
(1 + its tokens, about 20), sketched by the model, then `retrieval.search` twice: ``first`` after the
vectors file's pages were dropped from the page cache (``posix_fadvise(DONTNEED)`` on that file only: a
cold read from disk), ``second`` right after (warm, as far as the page cache kept it); uncapped and with
``max_memory`` = ``--max-memory`` (the CLI's ``--max-memory``). Each reports its peak RSS (VmHWM) split
into private memory (RssAnon) and mapped file pages (RssFile, shared with the page cache). Last, one
``rapidin-index query --max-memory`` process through the CLI (``/usr/bin/time -v``: wall and max RSS).

The index (``--rows`` x K x 2 bytes in float16: 13.1 GB at the defaults) is deleted at the end unless
``--keep``. Results go to ``--out`` as JSON; ``--table FILE`` prints them as Markdown. Run from the
repository root; disk: the index once (plus its LanceDB rows, a few MB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scaling  # noqa: E402  (the tiny model, the synthetic rows, the build child, memory())
from common import parse_arguments  # noqa: E402

ONE_THREAD = scaling.ONE_THREAD
# A response of 17 tokens of the tiny tokenizer: 1 + 17 = 18 per-token vectors (the child reports the count)
PER_TOKEN_RESPONSE = " the number of items in the list is returned as an integer value for each element"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sketch-dim", type=int, default=65_536, help="K")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--seed-rows", type=int, default=64, help="rows of the real (model-built) seed index")
    parser.add_argument("--max-memory", default="2GB", help="the capped runs' --max-memory")
    parser.add_argument("--block-rows", type=int, default=256, help="rows written per block")
    parser.add_argument(
        "--row-kind",
        default="signs",
        choices=("signs", "normal"),
        help="signs: random +-1/sqrt(K) rows (random bits); normal: normalised Gaussian rows (7x the CPU)",
    )
    parser.add_argument(
        "--folder", type=Path, default=None, help="where the index goes (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the index (default: deleted at the end)")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI query at the end")
    parser.add_argument(
        "--child-timeout",
        type=int,
        default=None,
        help="stop a measurement after this many seconds (recorded)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--table", type=Path, default=None, help="print the Markdown tables of a results file"
    )
    parser.add_argument(
        "--project",
        nargs="+",
        type=Path,
        default=None,
        help="print the paper-scale projection from two results files of this script (the 13 GB index, then "
        "one that fits the page cache) and `scaling.py --growth` JSON-lines files (sizes at K = 4096 and a "
        "K = 65,536 / K = 4096 pair of 1,000 rows)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vectors", default="whole", help=argparse.SUPPRESS)
    parser.add_argument("--capped", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)  # keep the page cache
    # the smoke run: a 16-wide one-layer model, two of the four measurements (one uncapped, one capped), no CLI;
    # the children run in this process
    return parse_arguments(
        parser,
        argv,
        rows=64,
        sketch_dim=256,
        seed_rows=8,
        max_memory="64KB",
        block_rows=16,
        no_cli=True,
        out="{smoke}/result.json",
        folder="{smoke}",
    )


# --------------------------------------------------------------------------- grow (a child process)


def grow(args: argparse.Namespace) -> dict:
    """Write generation g + 1 of the seed index with ``--rows`` random rows, as a build's finalise does."""
    import numpy as np

    from rapidin_index.files import writing
    from rapidin_index.store import index_folder
    from rapidin_index.store.lock import remove_unread_generations
    from rapidin_index.store.manifest import read_manifest, write_manifest

    index_dir = args.index
    manifest = read_manifest(index_dir)
    seed_rows = index_folder.read_all_rows(index_dir, manifest.generation)
    texts = scaling.synthetic_rows(args.rows, seed=args.rows)
    generation = manifest.generation + 1
    dimension = manifest.sketch["output_dim"]
    writer = index_folder.vector_writer(index_dir, generation, dimension, manifest.vector_dtype)
    rng = np.random.default_rng(0)
    timings = {"random_s": 0.0}

    def row_batches():
        for start in range(0, args.rows, args.block_rows):
            count = min(args.block_rows, args.rows - start)
            started = time.perf_counter()
            ids = np.arange(start, start + count)
            if args.row_kind == "normal":
                block = rng.standard_normal((count, dimension), dtype=np.float32)
                block /= np.linalg.norm(block, axis=1, keepdims=True)
                timings["random_s"] += time.perf_counter() - started
                writer.add(block, ids)
            else:  # random signs times 1/sqrt(K): each float16 code is that value's bits with a random sign bit
                words = np.frombuffer(rng.bytes(2 * count * dimension), np.uint16).reshape(count, dimension)
                value = np.array(dimension**-0.5, dtype=np.dtype(manifest.vector_dtype))
                if manifest.vector_dtype == "float16":
                    codes = (words & np.uint16(0x8000)) | value.view(np.uint16)
                    timings["random_s"] += time.perf_counter() - started
                    writer.add_codes(codes.view(np.uint8), ids)  # [count, 2K] bytes: the file's own form
                else:
                    block = np.where(words & np.uint16(0x8000), -value, value)
                    timings["random_s"] += time.perf_counter() - started
                    writer.add(block, ids)
            rows = []
            for number in range(start, start + count):
                text, like = texts[number], seed_rows[number % len(seed_rows)]
                rows.append(
                    {
                        **like,
                        "id": number,
                        "source": json.dumps(text),
                        "prompt": text["prompt"],
                        "response": text["completion"],
                        "content_hash": f"synthetic-{number}",
                    }
                )
            yield rows

    started = time.perf_counter()
    files = index_folder.write_generation(index_dir, generation, writer, row_batches(), [], range(args.rows))
    timings["write_generation_s"] = time.perf_counter() - started
    per_row = manifest.token_count / max(1, manifest.row_count)
    manifest.generation = generation
    manifest.row_count = args.rows
    manifest.rejected_count = 0
    manifest.token_count = int(per_row * args.rows)
    manifest.files = files
    manifest.sources = [{**manifest.sources[0], "rows": args.rows, "id_offset": 0}]
    manifest.template_usage = {name: args.rows for name in manifest.template_usage}
    with writing(index_dir, 1 << 16):
        write_manifest(index_dir, manifest)
    remove_unread_generations(index_dir, generation)
    return {
        **timings,
        "vectors_bytes": files[index_folder.vector_file(generation)]["bytes"],
        "end": scaling.memory(),
    }


# --------------------------------------------------------------------------- measure (a child process)


def drop_file_pages(path: Path) -> None:
    """Drop this one file's pages from the page cache (a cold read next; other files untouched)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def measure(args: argparse.Namespace) -> dict:
    """Open, sketch one query's vectors, search them cold then warm; times and memory of this process."""
    import numpy as np
    import torch

    from rapidin_index import retrieval
    from rapidin_index.settings import parse_memory
    from rapidin_index.store import index_folder

    torch.set_num_threads(1)
    stages = scaling.time_open_stages()
    result = {"before": scaling.memory()}
    cap = parse_memory(args.max_memory) if args.capped else None
    started = time.perf_counter()
    index = retrieval.Index.open(args.index, device="cpu", max_memory=cap)
    result["open_s"] = time.perf_counter() - started
    result["model_load_s"] = stages["load_model"]
    result["open_stages"] = stages
    result["after_open"] = scaling.memory()
    per_token = args.vectors == "per-token"
    response = PER_TOKEN_RESPONSE if per_token else scaling.QUERY["response"]
    prepared = [index.prepare(scaling.QUERY["prompt"], response)]
    started = time.perf_counter()
    vectors, _ = retrieval.sketch_queries(index, prepared, per_token=per_token)
    result["sketch_s"] = time.perf_counter() - started
    result["vectors"] = len(vectors)
    result["after_sketch"] = scaling.memory()
    if not args.warm:
        drop_file_pages(args.index / index_folder.vector_file(index.manifest.generation))
    for run in ("first", "second"):
        started = time.perf_counter()
        found = retrieval.search(index, vectors, 10)
        result[f"{run}_s"] = time.perf_counter() - started
        result[f"after_{run}"] = scaling.memory()
    assert (found[1][:, 0] >= 0).all(), "a search found no row"
    started = time.perf_counter()  # the join: the hits' text from LanceDB, as a query does it
    results = retrieval.collect_results(index, prepared, found, np.zeros(len(vectors)), 10, 5, per_token)
    retrieval.join_text(index, results)
    result["join_s"] = time.perf_counter() - started
    assert results[0].helpful[0].response, "the join found no text"
    result["scanned_bytes"] = index.stored_index.nbytes
    return result


def run_child(args: argparse.Namespace, mode: str, *extra: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--index",
        str(args.index_dir),
        "--rows",
        str(args.rows),
    ]
    command += [
        "--max-memory",
        args.max_memory,
        "--block-rows",
        str(args.block_rows),
        "--row-kind",
        args.row_kind,
    ]
    command += extra
    if (
        args.smoke
    ):  # the same child, parsed from the same command line, in this process (seconds, not minutes)
        child = parse_args(command[2:])
        result = json.loads(json.dumps(grow(child) if mode == "grow" else measure(child)))
        return result | {"process_s": 0.0, "load_average": os.getloadavg()[0]}
    started = time.perf_counter()
    try:
        finished = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, **ONE_THREAD},
            check=False,
            timeout=args.child_timeout if mode == "measure" else None,
        )
    except subprocess.TimeoutExpired:
        print(f"{mode} {' '.join(extra)}: stopped after {args.child_timeout} s", file=sys.stderr, flush=True)
        return {"timed_out_s": args.child_timeout, "load_average": os.getloadavg()[0]}
    if finished.returncode != 0:
        raise SystemExit(f"{mode} {extra} failed:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    result["load_average"] = os.getloadavg()[0]
    print(f"{mode} {' '.join(extra)}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def cli_query(args: argparse.Namespace) -> dict:
    """One `rapidin-index query` through the CLI with --max-memory: wall time and max RSS (/usr/bin/time -v)."""
    cli = Path(sys.executable).with_name("rapidin-index")
    command = ["/usr/bin/time", "-v", str(cli), "query", "--index", str(args.index_dir)]
    command += ["--prompt", scaling.QUERY["prompt"], "--response", PER_TOKEN_RESPONSE, "--explain", "0"]
    command += ["--device", "cpu", "--max-memory", args.max_memory, "--format", "json"]
    started = time.perf_counter()
    finished = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, check=False
    )
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"the CLI query failed:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout)
    peak_kb = next(
        int(line.split()[-1]) for line in finished.stderr.splitlines() if "Maximum resident" in line
    )
    return {
        "wall_s": wall,
        "max_rss_bytes": peak_kb * 1024,
        "helpful": len(result["helpful"]),
        "tokens": len(result["tokens"]),
        "row_count": result["index"]["row_count"],
    }


# --------------------------------------------------------------------------- driver


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return {}
    if args.project is not None:
        large, small = (json.loads(path.read_text()) for path in args.project[:2])
        growth = [
            json.loads(line) for path in args.project[2:] for line in path.read_text().splitlines() if line
        ]
        print(projection(large, small, growth))
        return {}
    if args.child == "grow":
        print(json.dumps(grow(args)))
        return {}
    if args.child == "measure":
        print(json.dumps(measure(args)))
        return {}
    root = Path(tempfile.mkdtemp(prefix="rapidin-13gb-", dir=args.folder))
    args.index_dir = root / "index"
    results = {"arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    try:
        model_dir = root / "model"
        texts = [r["instruction"] + " " + r["output"] for r in scaling.load_docstring_rows()]
        hidden_size, layers = (16, 1) if args.smoke else (128, 4)
        scaling.save_tiny_model(
            model_dir, "llama", texts, vocab_size=2000, hidden_size=hidden_size, layers=layers
        )
        data = scaling.write_jsonl(scaling.synthetic_rows(args.seed_rows, seed=1), root / "seed.jsonl")
        build_args = argparse.Namespace(
            sketch_dim=args.sketch_dim, batch_size=8, chunk_size=256, smoke=args.smoke
        )
        seed = scaling.run_growth_child(build_args, "build", data=data, model=model_dir, index=args.index_dir)
        if seed["vector_dtype"] != args.dtype:
            raise SystemExit(f"the seed index stores {seed['vector_dtype']}, not {args.dtype}")
        results["seed_build"] = seed
        results["grow"] = run_child(args, "grow")
        results["index_bytes"] = scaling.folder_bytes(args.index_dir)
        results["runs"] = {}
        for capped in (False, True):
            for vectors in ("whole", "per-token"):
                if args.smoke and (vectors == "per-token") != capped:
                    continue
                name = f"{vectors}{'-capped' if capped else ''}"
                extra = ["--vectors", vectors] + (["--capped"] if capped else [])
                measured = run_child(args, "measure", *extra)
                if "timed_out_s" in measured:  # e.g. a cold uncapped scan that the page cache cannot hold
                    results.setdefault("timed_out", {})[name] = measured
                else:
                    results["runs"][name] = measured
        if not args.no_cli:
            results["cli_query_capped"] = cli_query(args)
        results["machine"] = {
            "cpus": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
        }
        results["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    finally:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    return results


def table(results: dict) -> str:
    """The results as Markdown (MB = 10^6 bytes, GB = 10^9)."""
    mb, gb = 1e6, 1e9
    grow_result = results["grow"]
    lines = [
        f"Index: {results['arguments']['rows']:,} rows x K = {results['arguments']['sketch_dim']:,} "
        f"{results['arguments']['dtype']}, vectors file {grow_result['vectors_bytes'] / gb:.2f} GB, folder "
        f"{results['index_bytes'] / gb:.2f} GB; written in {grow_result['write_generation_s']:.0f} s "
        f"({grow_result['random_s']:.0f} s of it drawing the random rows), writer peak RSS "
        f"{grow_result['end']['VmHWM'] / mb:,.0f} MB.",
        "",
        "| query | cap | vectors | open s (tokenizer check; model load; files checked; vectors mapped) | RSS after open MB | sketch s | search cold s (GB/s) "
        "| search warm s (GB/s) | join s | peak RSS MB: total (private / mapped file) |",
        "|---" * 10 + "|",
    ]
    for name, run in results["runs"].items():
        size = run["scanned_bytes"] / gb
        end, stages = run["after_second"], run["open_stages"]
        lines.append(
            f"| {name.replace('-capped', '')} | {results['arguments']['max_memory'] if 'capped' in name else '-'} "
            f"| {run['vectors']} | {run['open_s']:.2f} ({stages['check_tokenizer']:.2f}; {run['model_load_s']:.2f}; "
            f"{stages['check_files']:.2f}; {stages['open_vectors']:.4f}) "
            f"| {run['after_open']['VmRSS'] / mb:,.0f} | {run['sketch_s']:.2f} "
            f"| {run['first_s']:.2f} ({size / run['first_s']:.2f}) | {run['second_s']:.2f} ({size / run['second_s']:.2f}) "
            f"| {run.get('join_s', float('nan')):.3f} "
            f"| {end['VmHWM'] / mb:,.0f} ({end['RssAnon'] / mb:,.0f} / {end['RssFile'] / mb:,.0f}) |"
        )
    for name, stopped in results.get("timed_out", {}).items():
        lines.append(
            f"| {name} | stopped after {stopped['timed_out_s']} s (load {stopped['load_average']:.1f}) |"
        )
    if "cli_query_capped" in results:
        cli = results["cli_query_capped"]
        lines += [
            "",
            f"CLI `query --max-memory {results['arguments']['max_memory']} --explain 0` (per token, "
            f"{cli['tokens']} tokens, {cli['row_count']:,} rows): {cli['wall_s']:.1f} s wall, max RSS "
            f"{cli['max_rss_bytes'] / mb:,.0f} MB.",
        ]
    return "\n".join(lines)


PROJECTED_ROWS = (52_000, 1_000_000, 10_000_000)


def search_costs(runs: dict, capped: bool) -> tuple[float, float, int]:
    """(a, b, q): a scan of B bytes with q vectors costs B x (a + b q) seconds, from the warm 1-vector and
    per-token (q vectors) searches, both capped or both not."""
    suffix = "-capped" if capped else ""
    whole, many = runs[f"whole{suffix}"], runs[f"per-token{suffix}"]
    one = whole["second_s"] / whole["scanned_bytes"]
    per_vector = max(0.0, (many["second_s"] / many["scanned_bytes"] - one) / (many["vectors"] - 1))
    return one - per_vector, per_vector, many["vectors"]


def projection(large: dict, small: dict, growth: list[dict]) -> str:
    """Build hours, disk, search seconds and RAM at 52K, 1M and 10M rows x K = 65,536 and 4,096 (float16).

    From the measured costs, each scaled linearly in what it reads or computes:

    * build s a row at K = 4096: the largest ``scaling.py --growth`` build's build_s / rows (its fixed
      costs included); at K = 65,536 times the ratio of two 1,000-row builds at the two K in one run;
      build memory: the largest build's peak RSS + the growth a row between the smallest and largest
      (the smallest of the same commit as the largest, where there is one);
    * disk: N x K x 2 bytes (float16) + 8 bytes a row (ids) + the LanceDB bytes a row of the largest build;
    * search: a scan of B bytes with q vectors costs B x (a + b q). An index under half this machine's RAM
      (shared: the page cache keeps it): a and b from ``small``'s warm uncapped searches (1 vector and per
      token); a larger one is read from disk each time: a and b from ``large``'s capped searches (the
      13 GB index, whose pages this shared machine's page cache did not keep);
    * RAM of a query: private = the query process's largest private memory (model, torch, one block) + 16
      bytes a row (ids and their order); mapped = the vectors file (page cache, shared, evictable), or at
      most ``--max-memory``.
    """
    gb, hour = 1e9, 3600.0
    cached, disk = search_costs(small["runs"], False), search_costs(large["runs"], True)
    q = cached[2]
    runs = list(large["runs"].values()) + list(small["runs"].values())
    private = max(run["after_second"]["RssAnon"] for run in runs)
    memory_bytes = large.get("machine", {}).get("memory_bytes", 24 * 2**30)
    sizes = sorted((e for e in growth if e["sketch_dim"] == 4096), key=lambda e: e["rows"])
    last = sizes[-1]
    same_code = [e for e in sizes if e.get("commit") == last.get("commit")]  # the memory slope: one code's
    first = same_code[0] if len(same_code) > 1 else sizes[0]
    per_row = {4096: last["build"]["build_s"] / last["build"]["rows"]}
    memory_per_row = (last["build"]["end"]["VmHWM"] - first["build"]["end"]["VmHWM"]) / (
        last["rows"] - first["rows"]
    )
    pair = {e["sketch_dim"]: e for e in growth if e["rows"] == 1000 and e["sketch_dim"] in (4096, 65536)}
    k_ratio = pair[65536]["build"]["build_s"] / pair[4096]["build"]["build_s"]
    per_row[65536] = per_row[4096] * k_ratio
    lance_per_row = last["disk"]["lancedb_bytes"] / last["rows"]
    lines = [
        f"Measured: build {1000 * per_row[4096]:.1f} ms a row at K = 4096 ({last['rows']:,}-row build), x "
        f"{k_ratio:.2f} at K = 65,536; build peak RSS {last['build']['end']['VmHWM'] / 1e6:,.0f} MB + "
        f"{memory_per_row / 1e3:.1f} kB a row; search in the page cache a = {cached[0] * gb:.3f} + b = "
        f"{cached[1] * gb:.3f} s/GB a vector, from disk a = {disk[0] * gb:.3f} + b = {disk[1] * gb:.3f} s/GB a "
        f"vector; private query memory {private / 1e6:,.0f} MB + 16 B a row; LanceDB {lance_per_row:,.0f} B a row.",
        "",
        "| rows | K | build h (this CPU, 1 process) | build peak RSS GB | disk GB (vectors + LanceDB) "
        f"| read from | search s: 1 vector | {q} vectors | + s a vector | query RAM: private GB + mapped GB |",
        "|---" * 10 + "|",
    ]
    for rows in PROJECTED_ROWS:
        for sketch_dim in (65536, 4096):
            vectors = rows * sketch_dim * 2 + 8 * rows
            fits = vectors < 0.5 * memory_bytes
            a, b, _ = cached if fits else disk
            build_memory = last["build"]["end"]["VmHWM"] + memory_per_row * (rows - last["rows"])
            lines.append(
                f"| {rows:,} | {sketch_dim:,} | {rows * per_row[sketch_dim] / hour:,.1f} | {build_memory / gb:,.1f} "
                f"| {(vectors + rows * lance_per_row) / gb:,.1f} | {'page cache' if fits else 'disk'} "
                f"| {vectors * (a + b):,.1f} | {vectors * (a + b * q):,.1f} | {vectors * b:,.2f} "
                f"| {(private + 16 * rows) / gb:,.2f} + {vectors / gb:,.1f} (or the cap) |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
