"""benchmarks/gpu_check.sh (issue 27 item 6): valid shell, a clean one-line skip without CUDA, and its
Python part's every step run on the CPU with a tiny model (``--cpu-dry-run``), in separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_the_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run for real")
def test_without_cuda_it_skips_on_one_line_and_writes_the_summary(tmp_path):
    environment = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=environment, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "gpu_check: skipped, no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    ]
    assert "Traceback" not in result.stderr
    assert json.loads((tmp_path / "gpu_check.json").read_text())["skipped"].startswith("gpu_check: skipped")


def test_every_step_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    summary_path = tmp_path / "dry.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run", "--rows", "12"]
    result = subprocess.run(
        [*command, "--out", str(summary_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    for name in ("full", "lora"):
        assert summary[name]["rows"] == 12 and summary[name]["tokens"] > 0
        assert summary[name]["tokens_per_second"] > 0 and summary[name]["floor"]["tokens_per_second"] > 0
    assert summary["lora"]["gradient_dim"] < summary["full"]["gradient_dim"]
    assert summary["gpu_against_cpu"]["agree"]  # the CPU against itself here: the comparison runs
    faiss_gpu = summary["faiss_gpu"]
    assert faiss_gpu.get("same_ids") is True or faiss_gpu["skipped"].startswith("faiss-gpu: skipped")
