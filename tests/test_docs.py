"""The docs say where we stand in one place each: README's results table and BENCHMARKS.md's "Current results"
are the same rows, every row names its command and the run (commit, date), and every section of
BENCHMARKS.md sits under a topic (no run appended after the last one)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def results_table(path: Path, heading: str) -> list[str]:
    lines = (ROOT / path).read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("| result | number"))
    end = next(i for i in range(header, len(lines)) if not lines[i].startswith("|"))
    return lines[header:end]


def test_readme_results_and_benchmarks_current_results_are_the_same_rows():
    readme = results_table(Path("README.md"), "## Results")
    benchmarks = results_table(Path("BENCHMARKS.md"), "## Current results")
    assert readme == benchmarks, "copy README's results table into BENCHMARKS.md's Current results (or back)"


def test_every_result_row_names_a_command_and_a_dated_run():
    for row in results_table(Path("README.md"), "## Results")[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 4, row
        assert cells[2], f"no command: {row}"
        assert re.search(r"\b[0-9a-f]{7,40}, 20\d\d-\d\d-\d\d$", cells[3]), (
            f"run is not 'commit, date': {row}"
        )


def test_benchmarks_sections_sit_under_topics_with_their_history_last():
    lines = (ROOT / "BENCHMARKS.md").read_text().split("\n")
    topics = [i for i, line in enumerate(lines) if line.startswith("## ")]
    for start, end in zip(topics, [*topics[1:], len(lines)], strict=True):
        sections = [line for line in lines[start:end] if line.startswith("### ")]
        history = [k for k, line in enumerate(sections) if line.startswith("### History")]
        assert len(history) <= 1, lines[start]
        assert not history or history[0] == len(sections) - 1, f"{lines[start]}: a run after its History"
