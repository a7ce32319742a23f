"""Serve latency: a warm `rapidin-index serve` query against the CLI's cold `rapidin-index query` (issue 22).

Same index, same query, one run. The cold side is a fresh ``python`` process running ``rapidin-index
query`` from spawn to exit (imports, manifest and tokenizer checks, model load, the query, JSON out). The
warm side is one ``rapidin-index serve`` process, started once (its start-up and first query are reported
apart), then the same query sent over HTTP from this process, timed from request to parsed answer.
Two query settings: the CLI's defaults (per-token hits, top 3 explained) and the cheapest query
(``--per-token off --explain 0``), where the model load is nearly all a cold call costs. Cold and warm
samples are interleaved so machine noise hits both alike; medians (and minima) are reported.

The model is a tiny Llama from ``rapidin_index.demo.tiny_models`` (``--hidden-size``, ``--layers``) over
the bundled docstring rows; a real model makes the cold load (and so the ratio) larger.

Run from the repository root::

    .venv/bin/python benchmarks/serve_latency.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cli_latency import APP, tiny_model_and_data
from common import parse_arguments, write_json

PROMPT = "What does the `DeprecationWarning` class do?"
RESPONSE = "Base class for warnings about deprecated features."
SETTINGS = {
    "defaults (per-token on, explain 3)": {"cli": [], "api": {}},
    "cheapest (per-token off, explain 0)": {
        "cli": ["--per-token", "off", "--explain", "0"],
        "api": {"per_token": False, "explain": 0},
    },
}


def prepare(folder: Path, rows: int, hidden_size: int, layers: int, sketch_dim: int) -> Path:
    """A tiny Llama over the first ``rows`` docstring rows, and its index; returns the index folder."""
    from rapidin_index.build import build_index
    from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

    folder = folder.resolve()
    model, data = tiny_model_and_data(folder, rows, hidden_size, layers)
    index = folder / "index"
    settings = BuildSettings(ModelSettings(str(model)), SketchSettings(sketch_dim), device="cpu")
    build_index(data, index, settings, progress=False)  # "nothing to do" when it is already built
    return index


def cold_query(index: Path, extra: list[str]) -> float:
    arguments = [
        "query",
        "--index",
        str(index),
        "--prompt",
        PROMPT,
        "--response",
        RESPONSE,
        "--device",
        "cpu",
    ]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", APP, *arguments, *extra],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),  # `python -c` puts the working folder first on sys.path
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"rapidin-index query failed: {done.stderr[-2000:]}")
    json.loads(done.stdout)
    return elapsed


def warm_query(url: str, options: dict) -> float:
    body = json.dumps({"prompt": PROMPT, "response": RESPONSE, **options}).encode()
    request = urllib.request.Request(url + "/api/query", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        json.loads(answer.read())
    return time.perf_counter() - started


def start_server(index: Path) -> tuple[subprocess.Popen, str, float]:
    """(process, url, seconds until /api/info answered)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-c",
        APP,
        "serve",
        "--index",
        str(index),
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    while True:
        if process.poll() is not None:
            raise SystemExit("rapidin-index serve stopped before it answered")
        try:
            urllib.request.urlopen(url + "/api/info", timeout=2).read()
            return process, url, time.perf_counter() - started
        except OSError:
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", default=".bench/serve_latency")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parse_arguments(
        parser,
        repeats=1,
        folder="{smoke}/serve_latency",
        rows=8,
        hidden_size=16,
        layers=1,
        k=256,
        out="{smoke}/result.json",
    )

    if args.smoke:  # one setting: one cold CLI process fewer
        SETTINGS.pop(next(iter(SETTINGS)))
    index = prepare(Path(args.folder), args.rows, args.hidden_size, args.layers, args.k)
    process, url, start_seconds = start_server(index)
    try:
        first = {name: warm_query(url, setting["api"]) for name, setting in SETTINGS.items()}
        samples = {(name, side): [] for name in SETTINGS for side in ("cold", "warm")}
        for _ in range(args.repeats):
            for name, setting in SETTINGS.items():
                samples[(name, "cold")].append(cold_query(index, setting["cli"]))
                samples[(name, "warm")].append(warm_query(url, setting["api"]))
    finally:
        process.terminate()
        process.wait(timeout=60)
    report(args, start_seconds, first, samples)


def report(args, start_seconds: float, first: dict, samples: dict) -> None:
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.repeats} interleaved repeats; "
        f"{args.rows} rows, Llama hidden {args.hidden_size} x {args.layers} layers, K = {args.k}"
    )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"server start (spawn to /api/info answering): {start_seconds:.2f} s; load average after: {load}")
    print(
        "| query | cold CLI median (min) s | warm server median (min) s | first server query s | cold / warm |"
    )
    print("|---|---|---|---|---|")
    for name in SETTINGS:
        cold, warm = samples[(name, "cold")], samples[(name, "warm")]
        ratio = statistics.median(cold) / statistics.median(warm)
        print(
            f"| {name} | {statistics.median(cold):.2f} ({min(cold):.2f}) | {statistics.median(warm):.3f} "
            f"({min(warm):.3f}) | {first[name]:.2f} | {ratio:.1f}x |"
        )
    rows = [{"query": name, "side": side, "seconds": values} for (name, side), values in samples.items()]
    write_json(args.out, {"server_start_s": start_seconds, "first": first, "samples": rows})


if __name__ == "__main__":
    main()
