"""CLI latency: whole-process wall time of the commands that should answer fast (issue 12).

Each command is a fresh ``python`` process running the ``rapidin-index`` typer app, timed from spawn to
exit, so imports, model loading and checks are all counted:

* ``info``               ``info --index IDX``
* ``no-op rebuild``      ``build`` with the arguments the index was built with (answers "nothing to do")
* ``refused query (K)``  ``query --k 2048`` on a K = 1024 index (refused: K mismatch)
* ``refused query (tokenizer)``  ``query --model OTHER`` whose tokenizer differs (only its chat template)

Variants: ``after`` is this checkout; ``--before DIR`` adds a second variant run with ``PYTHONPATH=DIR``
(a copy of an older ``rapidin_index/`` with ``cli/`` copied to ``rapidin_index/cli``, e.g. from
``git archive``). Repeats are interleaved (every variant's k-th sample of a command back to back) so
machine noise hits all alike; medians and minima are reported. The model is a tiny Llama from
``rapidin_index.demo.tiny_models`` saved to disk; the index is built once, by this checkout.

Run from the repository root::

    .venv/bin/python benchmarks/cli_latency.py --repeats 5 [--before /tmp/rapidin_before]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import parse_arguments, write_json

NEUTRAL = tempfile.gettempdir()
APP = "import sys; from rapidin_index.cli.main import app; sys.argv[0] = 'rapidin-index'; app()"


def tiny_model_and_data(folder: Path, rows: int, hidden_size: int, layers: int) -> tuple[Path, Path]:
    """(model folder, data file) in ``folder``: the first ``rows`` bundled docstring rows and a tiny
    Llama whose tokenizer was trained on them (kept when already there)."""
    from rapidin_index.demo.tiny_models import save_tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    assets = Path(__file__).resolve().parents[1] / "rapidin_index" / "demo" / "assets" / "docstrings.jsonl"
    lines = assets.read_text().splitlines()[:rows]
    data = folder / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    model = folder / "model"
    if not (model / "config.json").exists():
        texts = [" ".join(json.loads(line).values()) for line in lines]
        save_tiny_model(model, "llama", texts, vocab_size=2000, hidden_size=hidden_size, layers=layers)
        time.sleep(2.1)  # the build records the model files' stat only once they have settled
    return model, data


def prepare(folder: Path, rows: int, hidden_size: int, layers: int) -> dict[str, str]:
    """Tiny model (+ a copy with another chat template), data file, and a finished index in ``folder``."""
    folder = folder.resolve()
    model, data = tiny_model_and_data(folder, rows, hidden_size, layers)
    other = folder / "model-other-tokenizer"
    if not other.exists():
        shutil.copytree(model, other)
        config_path = other / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = "{{ messages }}"
        config_path.write_text(json.dumps(config))
        (other / "chat_template.jinja").unlink(missing_ok=True)
    index = folder / "index"
    paths = {"model": str(model), "other": str(other), "data": str(data), "index": str(index)}
    shutil.rmtree(index, ignore_errors=True)
    subprocess.run([sys.executable, "-c", APP, *commands(paths)["no-op rebuild"]], check=True)
    return paths


def commands(paths: dict[str, str]) -> dict[str, list[str]]:
    index = paths["index"]
    query = [
        "query",
        "--index",
        index,
        "--prompt",
        "What does str.upper do?",
        "--response",
        "It upper-cases.",
    ]
    return {
        "info": ["info", "--index", index],
        "no-op rebuild": [
            "build",
            "--model",
            paths["model"],
            "--data",
            paths["data"],
            "--index",
            index,
            "--k",
            "1024",
            "--quiet",
            "--device",
            "cpu",
        ],  # fmt: skip
        "refused query (K)": [*query, "--k", "2048", "--device", "cpu"],
        "refused query (tokenizer)": [*query, "--model", paths["other"], "--device", "cpu"],
    }


def run_once(arguments: list[str], python_path: str | None) -> tuple[float, int, str]:
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = python_path
    started = time.perf_counter()
    # from a neutral folder: `python -c` puts the working folder first on sys.path, before PYTHONPATH
    done = subprocess.run(
        [sys.executable, "-c", APP, *arguments], env=env, capture_output=True, text=True, cwd=NEUTRAL
    )
    elapsed = time.perf_counter() - started
    said = [line for line in done.stderr.splitlines() if line.startswith("error") or "nothing to do" in line]
    last_line = said[0] if said else ""
    return elapsed, done.returncode, last_line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", help="PYTHONPATH of the older version to compare against")
    parser.add_argument("--folder", default=".bench/cli_latency")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parse_arguments(
        parser,
        repeats=1,
        folder="{smoke}/cli_latency",
        rows=8,
        hidden_size=16,
        layers=1,
        out="{smoke}/result.json",
    )

    paths = prepare(Path(args.folder), args.rows, args.hidden_size, args.layers)
    variants = {"after": None} if args.before is None else {"before": args.before, "after": None}
    samples: dict[tuple[str, str], list[float]] = {}
    outcomes: dict[tuple[str, str], tuple[int, str]] = {}
    for _ in range(args.repeats):
        for name, arguments in commands(paths).items():
            for variant, python_path in variants.items():
                elapsed, code, last_line = run_once(arguments, python_path)
                samples.setdefault((name, variant), []).append(elapsed)
                outcomes[(name, variant)] = (code, last_line)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.repeats} interleaved repeats")
    print("| command | variant | median s | min s | exit | last line |")
    print("|---|---|---|---|---|---|")
    for (name, variant), values in samples.items():
        code, last_line = outcomes[(name, variant)]
        print(
            f"| {name} | {variant} | {statistics.median(values):.2f} | {min(values):.2f} | {code} "
            f"| {last_line[:90]} |"
        )
    print("\ncommands:")
    for name, arguments in commands(paths).items():
        print(f"  {name}: rapidin-index {' '.join(arguments)}")
    rows = [
        {"command": name, "variant": variant, "seconds": values, "exit": outcomes[(name, variant)][0]}
        for (name, variant), values in samples.items()
    ]
    write_json(args.out, {"repeats": args.repeats, "commands": rows})


if __name__ == "__main__":
    main()
