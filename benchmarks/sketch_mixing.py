"""Sketch mixing: how well rapidgrad-v1 and rapidgrad-v2 scatter real models' gradients over the K bins.

No weights are needed: the parameter shapes of published configs (full fine-tuning of Llama-2-7B,
Llama-3-8B, Mistral-7B and Llama-2-70B; LoRA r = 16 on q/k/v/o of Llama-2-7B) fix D and where each
tensor sits in the flattened gradient. For rapidgrad-v1 (lambda 20 and 100), rapidgrad-v2 and an ideal
random permutation (uniform distinct positions, independent signs), at K = 2^16, it measures:

* the probability that two adjacent coordinates share a bin (2^20 random pairs for v2, 2^18 for v1,
  seeds 42, 1, 2); the ideal is (D/K - 1) / (padded D - 1);
* how many distinct bins a 4,096-coordinate block reaches (16 random blocks, the same 3 seeds);
* the variance over seeds of the estimate <sketch(x), sketch(y)> for structured x, y: one 4,096 block
  with cosine 0.5; eight smooth, all-positive 65,536 blocks; a layer-norm profile (every RMSNorm weight,
  or for LoRA the first 512 rows of every q_proj lora_B, with a log-normal channel profile shared by all
  blocks, a few outlier channels, each block normalised as layer norm does). The ideal variance of a
  uniformly random signed permutation followed by binning is analytic:
  (D/K - 1) / (padded D - 1) * (|x|^2 |y|^2 + <x, y>^2 - 2 sum x_i^2 y_i^2). Two estimates are reported:
  the empirical variance of the estimates, and the mean over seeds of the exact variance over the signs
  given the seed's binning (much less noisy; it assumes independent signs).

Only the coordinates in a vector's support are mapped, with the fast projectors' own position mapping,
so nothing of size D is ever built. Last, the cost per coordinate of mapping and of projecting, on this CPU
with one thread. Prints tables and writes JSON.

    .venv/bin/python benchmarks/sketch_mixing.py --out .bench/sketch_mixing.json
    .venv/bin/python benchmarks/sketch_mixing.py --models none --out .bench/sketch_costs.json  # costs only
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import parse_arguments

from rapidin_index.settings import SketchSettings
from rapidin_index.sketch import make_projector
from rapidin_index.sketch.hashed import padded_dim
from rapidin_index.sketch.hashing import rademacher_signs

SKETCH_DIM = 1 << 16
BLOCK = 4096
MAP_CHUNK = 1 << 16
TRANSFORMS = {  # name -> (algorithm, lambda); None: the ideal random permutation
    "v1 lambda=20": ("rapidgrad-v1", 20),
    "v1 lambda=100": ("rapidgrad-v1", 100),
    "v2": ("rapidgrad-v2", 20),
    "ideal": None,
}


@dataclass(frozen=True)
class ModelConfig:
    """The config numbers that fix a Llama-style model's parameter shapes (from its config.json)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


CONFIGS = {
    "Llama-2-7B": ModelConfig(4096, 11008, 32, 32, 32, 32000),
    "Llama-3-8B": ModelConfig(4096, 14336, 32, 32, 8, 128256),
    "Mistral-7B": ModelConfig(4096, 14336, 32, 32, 8, 32000),
    "Llama-2-70B": ModelConfig(8192, 28672, 80, 64, 8, 32000),
}


def full_blocks(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter in Hugging Face's order (untied embedding and head)."""
    hidden, kv = config.hidden, config.hidden // config.heads * config.kv_heads
    blocks = [("embed_tokens", (config.vocab, hidden))]
    for layer in range(config.layers):
        prefix = f"layers.{layer}."
        blocks += [
            (prefix + "q_proj", (hidden, hidden)),
            (prefix + "k_proj", (kv, hidden)),
            (prefix + "v_proj", (kv, hidden)),
            (prefix + "o_proj", (hidden, hidden)),
            (prefix + "gate_proj", (config.intermediate, hidden)),
            (prefix + "up_proj", (config.intermediate, hidden)),
            (prefix + "down_proj", (hidden, config.intermediate)),
            (prefix + "input_layernorm", (hidden,)),
            (prefix + "post_attention_layernorm", (hidden,)),
        ]
    return blocks + [("norm", (hidden,)), ("lm_head", (config.vocab, hidden))]


def lora_blocks(config: ModelConfig, rank: int = 16) -> list[tuple[str, tuple[int, ...]]]:
    """PEFT's lora_A [r, in] and lora_B [out, r] on q/k/v/o of every layer, in its order."""
    hidden, kv = config.hidden, config.hidden // config.heads * config.kv_heads
    blocks = []
    for layer in range(config.layers):
        for module, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            prefix = f"layers.{layer}.{module}."
            blocks += [(prefix + "lora_A", (rank, hidden)), (prefix + "lora_B", (out, rank))]
    return blocks


def offsets(blocks) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) in the flattened gradient."""
    table, offset = {}, 0
    for name, shape in blocks:
        table[name] = (offset, math.prod(shape))
        offset += math.prod(shape)
    return table


def structured_cases(blocks, lora: bool, generator: torch.Generator) -> dict[str, tuple]:
    """case -> (coordinates [m] int64, x [m], y [m] float64), x and y of unit norm."""
    table = offsets(blocks)
    layers = 1 + max(int(name.split(".")[1]) for name in table if name.startswith("layers."))
    middle = f"layers.{layers // 2}."
    one_start = table[middle + ("q_proj.lora_A" if lora else "input_layernorm")][0]
    x = torch.randn(BLOCK, generator=generator, dtype=torch.float64)
    y = 0.5 * x + math.sqrt(0.75) * torch.randn(BLOCK, generator=generator, dtype=torch.float64)
    cases = {"one block": (torch.arange(one_start, one_start + BLOCK), x, y)}
    smooth_names = [
        f"layers.{layer}." + ("o_proj.lora_A" if lora else "down_proj")
        for layer in range(0, layers, layers // 8)
    ][:8]
    coordinates, xs, ys = [], [], []
    for index, name in enumerate(smooth_names):
        start, size = table[name]
        length = min(65536, size)
        phase = torch.arange(length, dtype=torch.float64) * (2 * math.pi / 8192) + index
        coordinates.append(torch.arange(start, start + length))
        xs.append(1 + 0.5 * torch.sin(phase))
        ys.append(1 + 0.5 * torch.cos(phase))
    cases["smooth blocks"] = (torch.cat(coordinates), torch.cat(xs), torch.cat(ys))
    cases["layer-norm profile"] = layer_norm_profile(table, lora, generator)
    return {name: (c, x / x.norm(), y / y.norm()) for name, (c, x, y) in cases.items()}


def layer_norm_profile(table, lora: bool, generator: torch.Generator) -> tuple:
    """Every RMSNorm weight (LoRA: first 512 rows of every q_proj lora_B), a shared channel profile."""
    if lora:
        names = [name for name in table if name.endswith("q_proj.lora_B")]
        length = 512 * 16
    else:
        names = [name for name in table if name.endswith("norm")]
        length = table[names[0]][1]
    profile = torch.exp(torch.randn(length, generator=generator, dtype=torch.float64))  # log-normal scales
    profile[torch.randint(0, length, (4,), generator=generator)] *= 10  # massive-activation channels
    coordinates, xs, ys = [], [], []
    for name in names:
        start = table[name][0]
        x = profile * (1 + 0.5 * torch.randn(length, generator=generator, dtype=torch.float64))
        sign = 1.0 if torch.rand(1, generator=generator).item() < 0.8 else -1.0
        y = sign * profile * (1 + 0.5 * torch.randn(length, generator=generator, dtype=torch.float64))
        coordinates.append(torch.arange(start, start + length))
        xs.append(x / x.norm())  # layer normalisation: each block to unit norm
        ys.append(y / y.norm())
    return torch.cat(coordinates), torch.cat(xs), torch.cat(ys)


class Mapper:
    """Final positions and signs of chosen coordinates under one transform and seed."""

    def __init__(self, transform: str, gradient_dim: int, seed: int) -> None:
        self.total = padded_dim(gradient_dim, SKETCH_DIM)
        self.bin_width = self.total // SKETCH_DIM
        self.seed = seed
        spec = TRANSFORMS[transform]
        self.projector = None
        if spec is not None:
            settings = SketchSettings(SKETCH_DIM, spec[1], seed, spec[0])
            self.projector = make_projector(settings, gradient_dim)
        self.generator = torch.Generator().manual_seed(seed)

    def positions(self, coordinates: torch.Tensor) -> torch.Tensor:
        if self.projector is None:
            return distinct_positions(len(coordinates), self.total, self.generator)
        parts = [self.projector.map_positions(part) for part in coordinates.split(MAP_CHUNK)]
        return torch.cat(parts)

    def signs(self, positions: torch.Tensor) -> torch.Tensor:
        if self.projector is None:
            return torch.randint(0, 2, positions.shape, generator=self.generator).double() * 2 - 1
        return rademacher_signs(positions, self.seed).double()


def distinct_positions(count: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct uniform positions in [0, total): a uniformly random permutation's image."""
    positions = torch.randint(0, total, (count,), generator=generator)
    while True:
        ordered, order = positions.sort()
        duplicates = order[1:][ordered[1:] == ordered[:-1]]
        if not duplicates.numel():
            return positions
        positions[duplicates] = torch.randint(0, total, (duplicates.numel(),), generator=generator)


def adjacent_collisions(transform: str, gradient_dim: int, seeds, samples: int) -> list[float]:
    rates = []
    for seed in seeds:
        mapper = Mapper(transform, gradient_dim, seed)
        if mapper.projector is None:
            rates.append((mapper.bin_width - 1) / (mapper.total - 1))
            continue
        generator = torch.Generator().manual_seed(1000 + seed)
        coordinates = torch.randint(0, gradient_dim - 1, (samples,), generator=generator)
        same = (
            mapper.positions(coordinates) // mapper.bin_width
            == mapper.positions(coordinates + 1) // mapper.bin_width
        )
        rates.append(float(same.double().mean()))
    return rates


def bins_reached(transform: str, gradient_dim: int, seeds, blocks: int) -> list[int]:
    counts = []
    for seed in seeds:
        mapper = Mapper(transform, gradient_dim, seed)
        starts = torch.randint(
            0, gradient_dim - BLOCK, (blocks,), generator=torch.Generator().manual_seed(seed)
        )
        for start in starts.tolist():
            bins = mapper.positions(torch.arange(start, start + BLOCK)) // mapper.bin_width
            counts.append(int(torch.unique(bins).numel()))
    return counts


def ideal_bins_reached(gradient_dim: int) -> float:
    """Expected distinct bins of BLOCK distinct uniform positions: K * (1 - P(a bin gets none))."""
    total = padded_dim(gradient_dim, SKETCH_DIM)
    width = total // SKETCH_DIM
    log_empty = sum(math.log1p(-width / (total - t)) for t in range(BLOCK))
    return SKETCH_DIM * (1 - math.exp(log_empty))


def ideal_variance(x: torch.Tensor, y: torch.Tensor, gradient_dim: int) -> float:
    total = padded_dim(gradient_dim, SKETCH_DIM)
    same_bin = (total // SKETCH_DIM - 1) / (total - 1)
    return same_bin * float(x.norm() ** 2 * y.norm() ** 2 + (x @ y) ** 2 - 2 * (x * x * y * y).sum())


def estimate_and_sign_variance(bins, signs, x, y) -> tuple[float, float]:
    """The estimate <sketch x, sketch y> restricted to the support, and its exact variance over signs."""
    unique, inverse = torch.unique(bins, return_inverse=True)

    def per_bin(values):
        return torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, values)

    estimate = float(per_bin(signs * x) @ per_bin(signs * y))
    variance = per_bin(x * x) * per_bin(y * y) + per_bin(x * y) ** 2 - 2 * per_bin(x * x * y * y)
    return estimate, float(variance.sum())


def variances(transform: str, gradient_dim: int, cases: dict, seeds) -> dict:
    """case -> empirical variance and mean sign-variance over ``seeds`` (support mapped once per seed)."""
    union = torch.cat([coordinates for coordinates, _, _ in cases.values()])
    estimates = {name: [] for name in cases}
    sign_variances = {name: [] for name in cases}
    for seed in seeds:
        mapper = Mapper(transform, gradient_dim, seed)
        positions = mapper.positions(union)
        signs = mapper.signs(positions)
        at = 0
        for name, (coordinates, x, y) in cases.items():
            part = slice(at, at + len(coordinates))
            at += len(coordinates)
            estimate, variance = estimate_and_sign_variance(
                positions[part] // mapper.bin_width, signs[part], x, y
            )
            estimates[name].append(estimate)
            sign_variances[name].append(variance)
    result = {}
    for name, (_, x, y) in cases.items():
        values = torch.tensor(estimates[name], dtype=torch.float64)
        ideal = ideal_variance(x, y, gradient_dim)
        result[name] = {
            "true": float(x @ y),
            "mean_estimate": float(values.mean()),
            "variance": float(values.var()),
            "sign_variance": float(torch.tensor(sign_variances[name]).mean()),
            "ideal_variance": ideal,
            "ratio": float(values.var()) / ideal,
            "sign_ratio": float(torch.tensor(sign_variances[name]).mean()) / ideal,
            "seeds": len(seeds),
        }
    return result


def timed(function, repeats: int = 5) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def costs(length: int = 1 << 20, batch: int = 16, dim: int = 1 << 22) -> dict:
    """ns per coordinate: uncached bin/sign mapping at 7B; projecting a [batch, 2^22] block cached and not."""
    result = {}
    seven_b = sum(math.prod(shape) for _, shape in full_blocks(CONFIGS["Llama-2-7B"]))
    for transform in ("v1 lambda=20", "v1 lambda=100", "v2"):
        algorithm, shuffle_lambda = TRANSFORMS[transform]
        projector = make_projector(SketchSettings(SKETCH_DIM, shuffle_lambda, 42, algorithm), seven_b)
        seconds = timed(lambda: projector.bins_and_signs(3_000_000_000, length))  # noqa: B023
        result[f"map bins+signs at 7B, {transform}"] = seconds / length * 1e9
    block = torch.randn(batch, dim)
    for transform in ("v1 lambda=20", "v2"):
        algorithm, shuffle_lambda = TRANSFORMS[transform]
        for cached in (True, False):
            settings = SketchSettings(SKETCH_DIM, shuffle_lambda, 42, algorithm)
            projector = make_projector(settings, dim)
            if not cached:
                projector._cache = None
            out = projector.new_output(batch)
            projector.project_block(out, block, 0)  # fills the cache
            seconds = timed(lambda: projector.project_block(out, block, 0))  # noqa: B023
            label = f"project [{batch}, 2^{dim.bit_length() - 1}] block, {transform}, {'cached table' if cached else 'uncached'}"
            result[label] = seconds / dim * 1e9
    return result


def model_setups() -> dict[str, list]:
    setups = {f"{name} full": full_blocks(config) for name, config in CONFIGS.items()}
    setups["Llama-2-7B LoRA r=16 q/k/v/o"] = lora_blocks(CONFIGS["Llama-2-7B"])
    return setups


def measure_model(name: str, blocks, arguments: argparse.Namespace) -> dict:
    gradient_dim = sum(math.prod(shape) for _, shape in blocks)
    cases = structured_cases(blocks, "LoRA" in name, torch.Generator().manual_seed(0))
    report = {
        "gradient_dim": gradient_dim,
        "padded_dim": padded_dim(gradient_dim, SKETCH_DIM),
        "bin_width": padded_dim(gradient_dim, SKETCH_DIM) // SKETCH_DIM,
        "case_coordinates": {case: len(values[0]) for case, values in cases.items()},
        "ideal_bins_reached": ideal_bins_reached(gradient_dim),
        "transforms": {},
    }
    for transform in TRANSFORMS:
        started = time.perf_counter()
        seeds = range(arguments.v1_seeds if transform.startswith("v1") else arguments.seeds)
        pairs = arguments.v1_pairs if transform.startswith("v1") else arguments.pairs
        reached = bins_reached(transform, gradient_dim, (42, 1, 2), arguments.blocks)
        report["transforms"][transform] = {
            "adjacent_same_bin": adjacent_collisions(transform, gradient_dim, (42, 1, 2), pairs),
            "bins_reached": {"mean": sum(reached) / len(reached), "min": min(reached), "max": max(reached)},
            "variance": variances(transform, gradient_dim, cases, seeds),
        }
        print(f"{name}, {transform}: {time.perf_counter() - started:.0f} s", flush=True)
    return report


def print_tables(report: dict) -> None:
    if report["models"]:
        print_mixing_tables(report)
    print("\n| cost (one CPU thread) | ns / coordinate |\n|---|---:|")
    for label, value in report["costs"].items():
        print(f"| {label} | {value:.1f} |")


def print_mixing_tables(report: dict) -> None:
    print(
        "\n| model | D (padded) | transform | adjacent same-bin (seeds 42 / 1 / 2) | bins of a 4,096 block: mean (min) |"
    )
    print("|---|---:|---|---|---:|")
    for name, model in report["models"].items():
        for transform, values in model["transforms"].items():
            rates = " / ".join(f"{rate:.2g}" for rate in values["adjacent_same_bin"])
            reached = values["bins_reached"]
            print(
                f"| {name} | {model['padded_dim']:,} | {transform} | {rates} | {reached['mean']:,.0f} ({reached['min']:,}) |"
            )
    print("\nvariance of <sketch x, sketch y> over seeds / ideal variance (empirical; exact over signs)\n")
    print("| model | case | ideal sd | " + " | ".join(TRANSFORMS) + " |")
    print("|---|---|---:|" + "---:|" * len(TRANSFORMS))
    for name, model in report["models"].items():
        for case in model["case_coordinates"]:
            cells = []
            for transform in TRANSFORMS:
                values = model["transforms"][transform]["variance"][case]
                cells.append(f"{values['ratio']:.3g}; {values['sign_ratio']:.3g}")
            ideal = model["transforms"]["v2"]["variance"][case]["ideal_variance"]
            print(f"| {name} | {case} | {math.sqrt(ideal):.2g} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=512, help="seeds of v2 and the ideal for the variances")
    parser.add_argument("--v1-seeds", type=int, default=32, help="seeds of v1 (slow to build), variances")
    parser.add_argument("--pairs", type=int, default=1 << 20, help="adjacent pairs sampled per seed (v2)")
    parser.add_argument("--v1-pairs", type=int, default=1 << 18, help="adjacent pairs sampled per seed (v1)")
    parser.add_argument("--blocks", type=int, default=16, help="4,096-coordinate blocks sampled per seed")
    parser.add_argument("--models", help="comma-separated subset of the model setups; 'none': costs only")
    parser.add_argument("--out", default=".bench/sketch_mixing.json")
    # the smoke run: the LoRA setup alone, a few seeds and pairs, the costs on small blocks
    arguments = parse_arguments(
        parser,
        seeds=2,
        v1_seeds=2,
        pairs=1024,
        v1_pairs=1024,
        blocks=2,
        models="Llama-2-7B LoRA r=16 q/k/v/o",
        out="{smoke}/result.json",
    )
    torch.set_num_threads(1)
    setups = model_setups()
    if arguments.models:
        names = [] if arguments.models == "none" else arguments.models.split(",")
        setups = {name: setups[name] for name in names}
    started = time.perf_counter()
    report = {
        "sketch_dim": SKETCH_DIM,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
        "models": {name: measure_model(name, blocks, arguments) for name, blocks in setups.items()},
        "costs": costs(1 << 12, 2, 1 << 14) if arguments.smoke else costs(),
    }
    report["seconds"] = time.perf_counter() - started
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    print_tables(report)


if __name__ == "__main__":
    main()
