"""Progress bars (progress.py): counts of rows and tokens, shown with their rates, or silent."""

from __future__ import annotations

import re

from rapidin_index.progress import RowProgress


def test_a_bar_counts_rows_and_tokens_and_shows_their_rates(capsys):
    with RowProgress(10, description="sketching") as bar:
        bar.advance(4, 100)
        bar.advance(6, 1500)
    assert (bar.rows, bar.tokens) == (10, 1600)
    shown = capsys.readouterr().out
    assert "sketching" in shown and "10/10" in shown
    assert re.search(r"[\d.]+ rows/s, [\d,]+ tokens/s", shown)


def test_a_disabled_bar_counts_and_prints_nothing(capsys):
    with RowProgress(5, enabled=False) as bar:
        bar.advance(2, 30)
        bar.advance(3, 0)
    assert (bar.rows, bar.tokens) == (5, 30)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
