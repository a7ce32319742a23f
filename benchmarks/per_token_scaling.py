"""Per-token query cost against the response length: 50, 200, 800 generated tokens, time and peak memory.

A per-token query (SPEC 2.4, Eq. 7) needs the gradient of every generated token's own loss
(``rapidin_index.token_gradients``): rows in order of their last token, each pass one forward over the
prefix its rows need and one batched backward of at most ``ROW_TOKENS_PER_PASS`` rows x prefix tokens.
Each length runs in a fresh process (peak RSS is per process) on a tiny Llama + LoRA index of ``--rows``
docstring rows at K = 4096, torch on one thread; the whole-generation query (``--per-token off``) is
timed beside it in the same process. ``--baseline COMMIT`` also runs that commit's token_gradients.py
(loaded from git in place of today's) on the same index, each length in its own process too.

    .venv/bin/python benchmarks/per_token_scaling.py --baseline 9cb7103 --out .bench/per_token_scaling.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import parse_arguments

WORDS = "the string is converted to upper case and returned as a new copy of the value".split()


def build(folder: Path, rows: int) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from build_throughput import docstring_rows

    from rapidin_index import build_index
    from rapidin_index.demo.tiny_models import save_lora_adapter, save_tiny_model
    from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

    texts = [row["instruction"] + " " + row["output"] for row in docstring_rows(rows)]
    model = save_tiny_model(folder / "model", "llama", texts, vocab_size=400, positions=2048)
    adapter = save_lora_adapter(model, folder / "lora")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in docstring_rows(rows)))
    settings = BuildSettings(ModelSettings(str(model), str(adapter)), SketchSettings(4096), max_length=2048)
    build_index(data, folder / "index", settings, progress=False)
    return folder / "index"


def use_baseline(commit: str) -> None:
    """Put ``commit``'s token_gradients.sketch_loss_combinations in the query path of this process."""
    import importlib.util

    import rapidin_index.retrieval

    source = subprocess.run(
        ["git", "show", f"{commit}:rapidin_index/token_gradients.py"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_token_gradients.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_token_gradients", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    rapidin_index.retrieval.sketch_loss_combinations = lambda sketcher, example, weights, advance=None: (
        module.sketch_loss_combinations(sketcher, example, weights)  # the baseline shows no progress
    )


def measure(index_dir: str, tokens: int, baseline: str = "") -> dict:
    """In this process: one whole-generation and one per-token query of a ``tokens``-token response."""
    import torch

    from rapidin_index.retrieval import Index

    if baseline:
        use_baseline(baseline)

    torch.set_num_threads(1)
    index = Index.open(index_dir, device="cpu")
    probe = [WORDS[i % len(WORDS)] for i in range(100)]  # tokens per word of this tokenizer
    labelled = len(index.prepare("What does str.upper do?", " ".join(probe)).response_positions)
    words = [WORDS[i % len(WORDS)] for i in range(round(100 * tokens / labelled))]  # ~ tokens
    prepared = index.prepare("What does str.upper do?", " ".join(words))
    seconds = {}
    for per_token in (False, True):
        started = time.perf_counter()
        index.query_prepared([prepared], 10, 0, per_token=per_token)
        seconds["per-token" if per_token else "whole"] = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    code = baseline or "today"
    return {
        "code": code,
        "tokens": len(prepared.response_positions),
        "seconds": seconds,
        "peak_rss_mib": peak,
    }


def run_child(index_dir: Path, length: int, baseline: str) -> dict:
    command = [sys.executable, __file__, "--measure", str(index_dir), str(length), baseline]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{length} tokens failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="50,200,800")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--out", default=".bench/per_token_scaling.json")
    parser.add_argument("--baseline", default="", help="also run this commit's token_gradients.py")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # index folder, tokens, baseline
    # the smoke run's baseline is HEAD (`git show HEAD:...`, no second checkout): both code paths run
    arguments = parse_arguments(parser, lengths="8", rows=8, baseline="HEAD", out="{smoke}/result.json")
    if arguments.measure:
        folder, tokens, baseline = arguments.measure
        print(json.dumps(measure(folder, int(tokens), baseline if baseline != "-" else "")))
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        index_dir = build(Path(folder), arguments.rows)
        for length in [int(value) for value in arguments.lengths.split(",")]:
            for baseline in [arguments.baseline] if arguments.baseline else []:
                results.append(run_child(index_dir, length, baseline))
            if not arguments.smoke:  # the smoke run measures the baseline's child alone (the same code path)
                results.append(run_child(index_dir, length, "-"))
    print("| code | labelled tokens | whole s | per-token s | per-token ms / token | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["seconds"]
        per_token_ms = 1000 * s["per-token"] / r["tokens"]
        print(
            f"| {r['code']} | {r['tokens']} | {s['whole']:.2f} | {s['per-token']:.2f} | {per_token_ms:.1f} "
            f"| {r['peak_rss_mib']:.0f} |"
        )
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
