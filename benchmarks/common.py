"""What the benchmark scripts share: the ``--smoke`` setting every script has (tests/test_benchmarks_*.py run
each script with it, so none can rot), and the driver and memory probe of the scripts that measure in child
processes.

``--smoke`` runs a script's whole code path on a tiny model / tiny index / few rows in seconds. Its outputs
go to a fresh temp folder (``tempfile.mkdtemp``, so under ``$TMPDIR``), never into .bench/ or BENCHMARKS.md:
the results JSON is ``<that folder>/result.json``. Options given explicitly still win over the tiny values.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

SMOKE_HELP = "a tiny setting that runs every step in seconds; outputs go to a temp folder (result.json)"
SMOKE_MODEL = {"hidden_size": 16, "layers": 1, "epochs": 1}
LINEAR_PARAMS = r"_proj\.weight|lm_head"
"""`build --params` for the tiny Llamas' nn.Linear weights: the only tensors an ekfac-weights query uses."""
"""The fine-tuned models of a smoke run (`FinetuneSettings(**SMOKE_MODEL)`): 16 wide, one layer, one epoch."""


def parse_arguments(
    parser: argparse.ArgumentParser, argv: list[str] | None = None, **tiny
) -> argparse.Namespace:
    """``parser``'s arguments plus ``--smoke``. With ``--smoke``, ``tiny`` (option -> value) become the defaults;
    a string value's ``{smoke}`` is the fresh temp folder (``out="{smoke}/result.json"``), converted by the
    option's own ``type``, as argparse converts string defaults."""
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    arguments = parser.parse_args(argv)
    if not arguments.smoke:
        return arguments
    folder = smoke_folder()
    parser.set_defaults(
        **{
            key: value.format(smoke=folder) if isinstance(value, str) else value
            for key, value in tiny.items()
        }
    )
    arguments = parser.parse_args(argv)
    arguments.smoke_folder = folder
    return arguments


def smoke_folder() -> Path:
    """A fresh folder for a smoke run's outputs (under ``$TMPDIR``), said on stdout."""
    folder = Path(tempfile.mkdtemp(prefix="smoke-"))
    print(f"smoke: outputs in {folder}", flush=True)
    return folder


def write_json(path: Path | str | None, data) -> None:
    """``data`` as indented JSON in ``path`` (its folder made); nothing where ``path`` is None."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


def memory() -> dict:
    """This process's VmHWM (peak resident), VmRSS, RssAnon (private) and RssFile (mapped files), bytes."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def drive(
    arguments: argparse.Namespace, child: Callable[[], dict], measure: Callable, table: Callable
) -> None:
    """The driver of a script that measures in child processes: ``--table FILE`` prints a results file's
    tables; ``--child`` runs one measurement (``child()``) and prints it as the last line; else ``measure``
    runs in a temp folder (under ``--folder``), its results go to ``--out`` and are printed as tables."""
    if arguments.table:
        print(table(json.loads(Path(arguments.table).read_text())))
        return
    if arguments.child:
        print(json.dumps(child()))
        return
    with tempfile.TemporaryDirectory(dir=arguments.folder) as folder:
        results = measure(arguments, Path(folder))
    if arguments.out:
        Path(arguments.out).write_text(json.dumps(results, indent=1))
    print(table(results))


def tiny_index(folder: Path, rows: int = 8, sketch_dim: int = 256) -> tuple[Path, Path]:
    """A smoke run's index: the first ``rows`` docstring rows (``folder/train.jsonl``) built with a 16-wide
    one-layer Llama at K = ``sketch_dim`` into ``folder/index``; returns (index folder, data file)."""
    from rapidin_index.build import build_index
    from rapidin_index.demo.datasets import load_docstring_rows, write_jsonl
    from rapidin_index.demo.tiny_models import save_tiny_model
    from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

    chosen = load_docstring_rows()[:rows]
    data = write_jsonl(chosen, folder / "train.jsonl")
    texts = [row["instruction"] + " " + row["output"] for row in chosen]
    model = save_tiny_model(folder / "model", "llama", texts, vocab_size=300, hidden_size=16, layers=1)
    settings = BuildSettings(ModelSettings(str(model)), SketchSettings(sketch_dim), device="cpu")
    build_index(data, folder / "index", settings, progress=False)
    return folder / "index", data
