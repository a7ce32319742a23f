"""Rejected rows: grouped by reason for people to read, and the share of them a build accepts.

A build never drops a row silently: each one it cannot index is kept with its id and reason in the
index (``rejected-gNNNN.jsonl``, listed by ``rapidin-index info --json``). People read them grouped:
a reason with its row-specific numbers (line, column, token counts) written as N, its count, and the
first few ids. A build whose data gives no indexed row, or more than ``max_rejected_share`` rejected
ones, raises `RejectedRowsError` with that summary on one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rapidin_index.errors import RejectedRowsError

if TYPE_CHECKING:
    from rapidin_index.data import RejectedRow
    from rapidin_index.store.manifest import Manifest

FIRST_IDS = 5
"""Ids shown per reason; the index keeps all of them."""
_NUMBER = re.compile(r"\b\d+\b")


@dataclass
class ReasonGroup:
    """The rows rejected for one reason."""

    reason: str
    """The reason, its numbers written as N ("line N: not valid JSON: ...")."""
    count: int = 0
    first_ids: list[int] = field(default_factory=list)


def reason_kind(reason: str) -> str:
    """``reason`` without what differs from row to row, so that rows rejected alike group together."""
    return _NUMBER.sub("N", reason)


def group_reasons(rejected: list[RejectedRow]) -> list[ReasonGroup]:
    """One group per kind of reason, the most frequent first (ties: the one seen first)."""
    groups: dict[str, ReasonGroup] = {}
    for row in sorted(rejected, key=lambda row: row.example_id):
        group = groups.setdefault(reason_kind(row.reason), ReasonGroup(reason_kind(row.reason)))
        group.count += 1
        if len(group.first_ids) < FIRST_IDS:
            group.first_ids.append(row.example_id)
    return sorted(groups.values(), key=lambda group: -group.count)


def describe_group(group: ReasonGroup) -> str:
    """``20 x field 'prompt' must be text, got list (rows 0, 1, 2, 3, 4, ...)``"""
    ids = ", ".join(map(str, group.first_ids)) + (", ..." if group.count > len(group.first_ids) else "")
    return f"{group.count} x {group.reason} (row{'s' if group.count > 1 else ''} {ids})"


def summary(rejected: list[RejectedRow], limit: int = 3) -> str:
    """The ``limit`` most frequent reasons on one line, and how many other reasons there are."""
    groups = group_reasons(rejected)
    text = "; ".join(describe_group(group) for group in groups[:limit])
    if len(groups) > limit:
        text += f"; and {len(groups) - limit} other reason(s)"
    return text


def check_rejected_share(
    indexed: int, rejected: list[RejectedRow], max_share: float, data: str, index_dir: str
) -> None:
    """Raise `RejectedRowsError` when the rows of ``data`` gave no indexed row, or a larger share of
    rejected rows than ``max_share``; ``rejected`` holds those of ``data`` alone."""
    total = indexed + len(rejected)
    if indexed > 0 and len(rejected) <= max_share * total:
        return
    if total == 0:
        raise RejectedRowsError(
            f"{data} holds no rows: nothing was indexed (is it the file, or split, you meant?)"
        )
    if indexed == 0:
        outcome = f"no row of {data} could be indexed ({len(rejected)} rejected"
    else:
        outcome = (
            f"{len(rejected)} of {total} rows of {data} were rejected ({len(rejected) / total:.0%}, more than "
            f"--max-rejected-share {max_share:g}"
        )
    accept = "" if indexed == 0 else "; to keep the index as it is, pass --max-rejected-share 1"
    raise RejectedRowsError(
        f"{outcome}: {summary(rejected)}); every row and reason: rapidin-index info --index {index_dir} "
        f"--json{accept}"
    )


def source_outcome(manifest: Manifest, source: dict, rejected: list[RejectedRow]) -> tuple[int, list]:
    """(rows indexed, rows rejected) of one of ``manifest.sources``, in this shard if it is one."""
    first, rows = source["id_offset"], source["rows"]
    ours = [row for row in rejected if first <= row.example_id < first + rows]
    in_shard = (
        rows if manifest.shard is None else len(range(manifest.shard["index"], rows, manifest.shard["count"]))
    )
    return in_shard - len(ours), ours
