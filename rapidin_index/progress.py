"""Progress bars for long work: rows/s and tokens/s on the terminal (rich), silent when disabled."""

from __future__ import annotations

import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RowProgress:
    """``with RowProgress(total) as bar: bar.advance(rows, tokens)``."""

    def __init__(self, total: int, description: str = "indexing", enabled: bool = True) -> None:
        self.total = total
        self.enabled = enabled
        self.rows = 0
        self.tokens = 0
        self.started = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self._task = self._progress.add_task(description, total=total, rates="")

    def __enter__(self) -> RowProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def advance(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rates = f"{self.rows / elapsed:.1f} rows/s" + (
            f", {self.tokens / elapsed:,.0f} tokens/s" if self.tokens else ""
        )
        self._progress.update(self._task, advance=rows, rates=rates)
