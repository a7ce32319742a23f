"""Every benchmark script run as users run it, in a new process, with ``--smoke`` (benchmarks/common.py): a
tiny setting that goes through the script's whole code path in seconds, so none can rot. The scripts are
found by a glob and split across tests/test_benchmarks_{a,b,c}.py by their measured seconds (pytest-xdist's
loadfile groups spread them over the workers); a new script without a smoke setting, or without a row in
EXPECTED, fails."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
GROUPS = 3
TIMEOUT_SECONDS = 240

# Files another script's smoke run covers: (that script, the text in it that runs this one's code). The modules
# are imported by it; gpu_check.sh --smoke runs gpu_check.py's every step on the CPU (as --cpu-dry-run).
COVERED_BY = {
    "common.py": ("build_throughput.py", "from common import"),
    "gpu_check.py": ("gpu_check.sh", 'benchmarks/gpu_check.py --out "$SUMMARY" --cpu-dry-run'),
    "lds_kronfluence.py": ("lds.py", "from lds_kronfluence import"),
    "lds_variants.py": ("lds.py", "from lds_variants import"),
}

# What each script's result.json must hold (top-level keys).
EXPECTED: dict[str, tuple[str, ...]] = {
    "build_throughput.py": ("models", "compression_7b", "settings"),
    "factored.py": ("methods", "fidelity_over_seeds", "micro_timings", "end_to_end"),
    "kron_pieces.py": ("sides",),
    "query_speed.py": ("search", "index", "projection"),
    "scaling.py": ("configurations", "largest_abs_error_vs_first"),
    "scaling_13gb.py": ("seed_build", "grow", "runs"),
    "per_token_query.py": ("results",),
    "per_token_scaling.py": ("code", "tokens", "seconds", "peak_rss_mib"),
    "search_topk.py": ("source", "results"),
    "lancedb_writer.py": ("rows", "variant", "growth_MB", "read_back"),
    "search_profile.py": ("results",),
    "search_scaling.py": (
        "rows",
        "vector_dtype",
        "open_new",
        "search_base_1",
        "search_old_100",
        "append_old",
    ),
    "append_scaling.py": ("synthetic", "build"),
    "open_verify.py": ("results",),
    "cli_latency.py": ("commands",),
    "serve_latency.py": ("server_start_s", "first", "samples"),
    "large_vocab.py": ("case", "seconds_per_row", "ratio_to_floor"),
    "explain_cost.py": ("tiny",),
    "token_attribution.py": ("results",),
    "sketch_mixing.py": ("models", "costs"),
    "precondition_query_cost.py": ("queries", "seconds", "ratio"),
    "gpu_check.sh": ("full", "lora", "gpu_against_cpu", "faiss_gpu", "cuda_tests"),
    "backdoor.py": ("methods", "attack_success_rate", "real_build_check", "gradient_dim"),
    "backdoor_smollm2.py": ("methods", "finetune", "build_time", "exact_layer_norm_signs"),
    "backdoor_variants.py": ("rows", "blocks", "wall_seconds"),
    "fidelity.py": ("results", "gradient_dim"),
    "rerank.py": ("exact", "sketched", "rerank 2", "rerank 5"),
    "error_tracing.py": ("results", "model_generation"),
    "peers.py": ("settings", "peers", "rapidin_index"),
    "lds.py": ("methods", "costs", "query_rows_check_max_difference", "build_seconds"),
    "lds_kfac.py": ("methods",),
    "lds_ekfac_weights.py": ("models", "queries", "fits", "methods", "end_to_end", "costs", "exact_costs"),
    "lds_ekfac_symmetric.py": ("exact symmetric, d=0.1", "sketch 4096 symmetric, d=0.1"),
    "lds_ekfac_weights_exact.py": (
        "raw, all, damping 0.1",
        "ln, lin, damping 0.1",
        "sketched, all, damping 0.1",
    ),
    "backdoor_ekfac_weights.py": (
        "rows",
        "poisoned",
        "queries",
        "attack_success_rate_seen",
        "seconds",
        "methods",
    ),
    "lds_token_kfac.py": ("ekfac token factors (true Fisher), damping 0.1 (query)",),
    "lds_damping_sweep.py": ("+Fisher (whole, damping 0.1), K=2^16", "+both (tensor, damping 2), K=2^16"),
    "optimizer_state_cost.py": ("median_seconds", "ratio_to_plain", "sketcher_split"),
}


# Seconds of each smoke run, measured in one `pytest -n 2 --dist loadfile` run of these files on a shared,
# loaded 2-core machine: the groups are balanced by them (a script not listed counts DEFAULT_SECONDS).
SECONDS = {
    "serve_latency.py": 73, "cli_latency.py": 59, "backdoor.py": 49, "lds.py": 49, "per_token_scaling.py": 48,
    "lds_token_kfac.py": 36, "backdoor_variants.py": 36, "lds_damping_sweep.py": 33, "large_vocab.py": 31,
    "gpu_check.sh": 28, "query_speed.py": 28, "per_token_query.py": 26, "append_scaling.py": 26,
    "fidelity.py": 26, "error_tracing.py": 25, "backdoor_smollm2.py": 24, "rerank.py": 24,
    "optimizer_state_cost.py": 23, "factored.py": 23, "kron_pieces.py": 22, "build_throughput.py": 21,
    "token_attribution.py": 21, "explain_cost.py": 19, "scaling_13gb.py": 14, "lds_kfac.py": 11, "peers.py": 10,
    "scaling.py": 9, "sketch_mixing.py": 9, "precondition_query_cost.py": 9, "open_verify.py": 6,
    "search_topk.py": 6, "search_profile.py": 6, "search_scaling.py": 2,
    # measured in one serial run beside lds_kfac.py (11 s there too)
    "lds_ekfac_weights.py": 16, "lds_ekfac_weights_exact.py": 10, "backdoor_ekfac_weights.py": 9,
    "lds_ekfac_symmetric.py": 9,  # alone, beside the three above (13 / 8 / -)
}  # fmt: skip
DEFAULT_SECONDS = 30


def scripts(group: int) -> list[str]:
    """The benchmark scripts of loadfile group ``group`` (of GROUPS), every file of benchmarks/ counted: the
    longest first, each to the group with the fewest seconds so far."""
    names = [path.name for path in BENCHMARKS.iterdir() if path.suffix in (".py", ".sh")]
    groups: list[list[str]] = [[] for _ in range(GROUPS)]
    seconds = [0.0] * GROUPS
    for name in sorted(names, key=lambda name: (-SECONDS.get(name, DEFAULT_SECONDS), name)):
        lightest = seconds.index(min(seconds))
        groups[lightest].append(name)
        seconds[lightest] += 0 if name in COVERED_BY else SECONDS.get(name, DEFAULT_SECONDS)
    return sorted(groups[group])


def finite_numbers(value, path: str = "") -> int:
    """How many numbers ``value`` holds (nested), asserting each is finite."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return 0
    if isinstance(value, int | float):
        assert math.isfinite(value), f"{path} is {value}"
        return 1
    if isinstance(value, dict):
        return sum(finite_numbers(item, f"{path}.{key}") for key, item in value.items())
    return sum(finite_numbers(item, f"{path}[{index}]") for index, item in enumerate(value))


def check_script(name: str, tmp_path: Path) -> None:
    """Run ``benchmarks/NAME --smoke`` in a new process (temp files under ``tmp_path``) and check its result."""
    if name in COVERED_BY:
        script, text = COVERED_BY[name]
        assert text in (BENCHMARKS / script).read_text(), f"{script} no longer runs {name}"
        return
    assert name in EXPECTED, f"benchmarks/{name}: give it a --smoke setting and a row in EXPECTED"
    command = ["bash"] if name.endswith(".sh") else [sys.executable]
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, str(BENCHMARKS / name), "--smoke"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    outputs = sorted(tmp_path.glob("smoke-*/result.json"))
    assert len(outputs) == 1, (outputs, result.stdout[-2000:])
    results = json.loads(outputs[0].read_text())
    for entry in results if isinstance(results, list) else [results]:  # a list: each entry has the keys
        missing = [key for key in EXPECTED[name] if key not in entry]
        assert not missing, f"{name}: result.json lacks {missing}; it has {sorted(entry)}"
    assert finite_numbers(results) > 0
