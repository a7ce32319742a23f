"""Retrieval metrics of the paper's backdoor experiment (Tables 4 and 11), without scikit-learn.

Protocol: rank all training rows by influence score; take the top-k and bottom-k rows; with label 1 for
poisoned rows, compute the area under the precision-recall curve (average precision) and under the ROC
curve of the scores over those 2k rows. Also precision@k of the top-k and the plain ROC-AUC over all rows.

A metric that is undefined for a query (auROC over rows that are all one class, auPRC with no poisoned
row) is None, never NaN, and the `Metrics.notes` of the result say why; means skip such queries and say
for how many they did.
"""

from __future__ import annotations

import numpy as np


def roc_auc(labels, scores) -> float | None:
    """Probability that a random positive outscores a random negative (ties count half).

    None when the rows are all of one class: there is no pair to compare.
    """
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    positives, negatives = scores[labels], scores[~labels]
    if len(positives) == 0 or len(negatives) == 0:
        return None
    ranks = _average_ranks(scores)  # 1-based, ties averaged
    rank_sum = ranks[labels].sum()
    return float((rank_sum - len(positives) * (len(positives) + 1) / 2) / (len(positives) * len(negatives)))


def average_precision(labels, scores) -> float | None:
    """Area under the precision-recall curve as average precision (scikit-learn's definition).

    None when no row is positive: recall is undefined.
    """
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    if not labels.any():
        return None
    order = np.argsort(-scores, kind="mergesort")
    labels, scores = labels[order], scores[order]
    # Thresholds at the distinct scores: the last index of each run of equal scores.
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(labels)[last]
    precision = true_positives / (last + 1)
    recall = true_positives / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


class Metrics(dict):
    """Metric name -> value, None where the metric is undefined; `notes` says why (name -> reason)."""

    def __init__(self, values=(), notes: dict[str, str] | None = None) -> None:
        super().__init__(values)
        self.notes = dict(notes or {})


def top_bottom_metrics(labels, scores, k: int) -> Metrics:
    """The paper's auPRC@k and auROC@k (top-k plus bottom-k rows) and precision@k.

    auROC@k is undefined when those 2k rows are all poisoned or all clean, auPRC@k when none is
    poisoned: the value is None and `notes` says so.
    """
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    order = np.argsort(-scores, kind="mergesort")
    k = min(k, len(scores) // 2)
    chosen = np.r_[order[:k], order[-k:]]
    metrics = Metrics(
        {
            f"auprc@{k}": average_precision(labels[chosen], scores[chosen]),
            f"auroc@{k}": roc_auc(labels[chosen], scores[chosen]),
            f"precision@{k}": float(labels[order[:k]].mean()),
        }
    )
    kind = "poisoned" if labels[chosen].all() else "clean" if not labels[chosen].any() else None
    if kind is not None:
        metrics.notes[f"auroc@{k}"] = f"the top-{k} and bottom-{k} rows are all {kind}"
    if metrics[f"auprc@{k}"] is None:
        metrics.notes[f"auprc@{k}"] = f"no poisoned row among the top-{k} and bottom-{k}"
    return metrics


def retrieval_metrics(labels, scores, ks=(5, 10, 50, 100)) -> Metrics:
    """All metrics for one query: per k, plus ROC-AUC over every row (None, with a note, if undefined)."""
    metrics = Metrics({"roc_auc": roc_auc(labels, scores)})
    if metrics["roc_auc"] is None:
        metrics.notes["roc_auc"] = "every row has the same label"
    for k in ks:
        if k <= len(scores) // 2:
            part = top_bottom_metrics(labels, scores, k)
            metrics.update(part)
            metrics.notes.update(part.notes)
    return metrics


def mean_metrics(per_query: list[dict]) -> Metrics:
    """Each metric's mean over the queries where it is defined; None where it is defined for none.

    `notes` says, for every metric undefined for some query, for how many and why (the reasons come
    from each query's `Metrics.notes`).
    """
    mean = Metrics()
    for key in per_query[0]:
        values = [m[key] for m in per_query if m[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
        if len(values) < len(per_query):
            reasons = sorted(
                {getattr(m, "notes", {}).get(key, "undefined") for m in per_query if m[key] is None}
            )
            undefined = len(per_query) - len(values)
            scope = "every query" if not values else f"{undefined} of {len(per_query)} queries"
            mean.notes[key] = f"undefined for {scope}: {'; '.join(reasons)}"
    return mean


def spearman(first, second) -> float | None:
    """Spearman rank correlation (ties averaged); None when either side is constant (no ranking)."""
    first, second = _average_ranks(np.asarray(first, float)), _average_ranks(np.asarray(second, float))
    if np.ptp(first) == 0 or np.ptp(second) == 0:
        return None
    return float(np.corrcoef(first, second)[0, 1])


def top_k_overlap(first, second, k: int) -> float:
    """Share of the top-k ids of ``first`` that are also in the top-k of ``second``."""
    top_first = set(np.argsort(-np.asarray(first), kind="mergesort")[:k].tolist())
    top_second = set(np.argsort(-np.asarray(second), kind="mergesort")[:k].tolist())
    return len(top_first & top_second) / k
