"""Benchmark smoke runs, group a of tests/benchmark_smoke.py (a file of its own: one loadfile group)."""

from __future__ import annotations

import pytest
from benchmark_smoke import check_script, scripts


@pytest.mark.parametrize("name", scripts(0))
def test_benchmark_runs_with_smoke(name, tmp_path):
    check_script(name, tmp_path)
