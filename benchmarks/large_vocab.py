"""Large embeddings and heads (issue 27 item 5) on SmolLM2-135M (a 49,152 x 576 embedding tied to its head).

Each case runs in its own process (torch on one thread): load the model, one warm-up forward, then
sketch ``--rows`` rows in batches of ``--batch-size`` with `gradients.GradientSketcher` as a build does.
It prints seconds a row, the peak RSS growth over the warmed-up model (the peak is reset first, via
/proc/self/clear_refs), and the model's own batched forward + backward of the same rows (the floor).

    .venv/bin/python benchmarks/large_vocab.py --out .bench/large_vocab.json
    PYTHONPATH=/work/main .venv/bin/python benchmarks/large_vocab.py --cases embed-kron   # main, before

The model folder comes from tests/realmodel.py (cached under ~/.cache/rapidin-index-tests).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import parse_arguments

CASES = {  # name: (parameter regex, sketch algorithm)
    "embed-kron": ("embed_tokens", "auto"),  # one tensor: auto picks rapidgrad-kron with all K for it
    "embed-ts": ("embed_tokens", "rapidgrad-ts"),
    "embed-v2": ("embed_tokens", "rapidgrad-v2"),
    "full-auto": (None, "auto"),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(
    folder: str, case: str, rows: int, batch_size: int, tokens: int, sketch_dim: int = 65536
) -> dict:
    import torch

    torch.set_num_threads(1)
    import rapidin_index
    from rapidin_index.capture import gradient_blocks, gradient_dim
    from rapidin_index.gradients import GradientSketcher
    from rapidin_index.losses import Batch, example_losses
    from rapidin_index.models import load_model, select_parameters
    from rapidin_index.settings import ModelSettings, SketchSettings
    from rapidin_index.sketch import make_projector

    params, algorithm = CASES[case]
    settings = ModelSettings(folder, params=params)
    model = load_model(settings).model
    blocks = gradient_blocks(select_parameters(model, settings))
    projector = make_projector(
        SketchSettings(sketch_dim, 20, 42, algorithm), gradient_dim(blocks), blocks=blocks
    )
    sketcher = GradientSketcher(model, blocks, projector)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = []
    for _ in range(0, rows, batch_size):
        input_ids = torch.randint(4, vocab, (batch_size, tokens), generator=generator)
        labels = input_ids.clone()
        labels[:, : tokens // 4] = -100
        batches.append(Batch(input_ids, torch.ones_like(input_ids), labels))
    with torch.no_grad():
        model(input_ids=batches[0].input_ids)  # touch the weights: their pages are not the build's
    before = rss_mb()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak RSS (the model's load) so that ru_maxrss is the build's
    started = time.perf_counter()
    for batch in batches:
        sketched = sketcher.sketch(batch)
    seconds = time.perf_counter() - started
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    selected = [block.parameter for block in blocks]
    started = time.perf_counter()
    for batch in batches:  # the floor: the model's own batched forward + backward into the selection
        torch.autograd.grad(example_losses(model, batch).sum(), selected)
    floor = time.perf_counter() - started
    return {
        "case": case,
        "library": str(Path(rapidin_index.__file__).parent.parent),
        "projector": type(projector).__name__,
        "rows": len(batches) * batch_size,
        "tokens": tokens,
        "seconds_per_row": seconds / (len(batches) * batch_size),
        "floor_seconds_per_row": floor / (len(batches) * batch_size),
        "ratio_to_floor": seconds / floor,
        "peak_rss_growth_mb": growth,
        "exact_path": sorted(sketcher.exact_path),
        "finite": bool(sketched.finite.all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in the child process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--sketch-dim", type=int, default=65536, help="K")
    # the smoke run: a tiny Llama (a 16-wide embedding of 300 tokens) instead of SmolLM2, two of the cases
    arguments = parse_arguments(
        parser,
        cases="embed-kron,full-auto",
        rows=4,
        batch_size=2,
        tokens=8,
        sketch_dim=256,
        out="{smoke}/result.json",
    )
    if arguments.case:
        result = run_case(
            arguments.folder,
            arguments.case,
            arguments.rows,
            arguments.batch_size,
            arguments.tokens,
            arguments.sketch_dim,
        )
        print(json.dumps(result))
        return
    if arguments.smoke:
        from rapidin_index.demo.tiny_models import save_tiny_model

        texts = [f"word{i} token{i % 7} text" for i in range(300)]
        folder = str(
            save_tiny_model(arguments.smoke_folder / "model", "llama", texts, 300, hidden_size=16, layers=1)
        )
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from realmodel import smollm2_folder

        folder = str(smollm2_folder())
    results = []
    for case in arguments.cases.split(","):
        command = [sys.executable, __file__, "--case", case, "--folder", folder]
        command += ["--rows", str(arguments.rows), "--batch-size", str(arguments.batch_size)]
        command += ["--tokens", str(arguments.tokens), "--sketch-dim", str(arguments.sketch_dim)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            results.append({"case": case, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if arguments.out:
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        arguments.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
