"""Retrieval metrics of the paper's backdoor experiment (Tables 4 and 11), without scikit-learn.

Protocol: rank all training rows by influence score; take the top-k and bottom-k rows; with label 1 for
poisoned rows, compute the area under the precision-recall curve (average precision) and under the ROC
curve of the scores over those 2k rows. Also precision@k of the top-k and the plain ROC-AUC over all rows.
"""

from __future__ import annotations

import numpy as np


def roc_auc(labels, scores) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    positives, negatives = scores[labels], scores[~labels]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    ranks = _average_ranks(scores)  # 1-based, ties averaged
    rank_sum = ranks[labels].sum()
    return float((rank_sum - len(positives) * (len(positives) + 1) / 2) / (len(positives) * len(negatives)))


def average_precision(labels, scores) -> float:
    """Area under the precision-recall curve as average precision (scikit-learn's definition)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    if not labels.any():
        return float("nan")
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


def top_bottom_metrics(labels, scores, k: int) -> dict[str, float]:
    """The paper's auPRC@k and auROC@k (top-k plus bottom-k rows) and precision@k."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    order = np.argsort(-scores, kind="mergesort")
    k = min(k, len(scores) // 2)
    chosen = np.r_[order[:k], order[-k:]]
    return {
        f"auprc@{k}": average_precision(labels[chosen], scores[chosen]),
        f"auroc@{k}": roc_auc(labels[chosen], scores[chosen]),
        f"precision@{k}": float(labels[order[:k]].mean()),
    }


def retrieval_metrics(labels, scores, ks=(5, 10, 50, 100)) -> dict[str, float]:
    """All metrics for one query: per k, plus ROC-AUC over every row."""
    result = {"roc_auc": roc_auc(labels, scores)}
    for k in ks:
        if k <= len(scores) // 2:
            result.update(top_bottom_metrics(labels, scores, k))
    return result


def mean_metrics(per_query: list[dict[str, float]]) -> dict[str, float]:
    keys = per_query[0].keys()
    return {key: float(np.nanmean([m[key] for m in per_query])) for key in keys}


def spearman(first, second) -> float:
    """Spearman rank correlation (ties averaged)."""
    first, second = _average_ranks(np.asarray(first, float)), _average_ranks(np.asarray(second, float))
    return float(np.corrcoef(first, second)[0, 1])


def top_k_overlap(first, second, k: int) -> float:
    """Share of the top-k ids of ``first`` that are also in the top-k of ``second``."""
    top_first = set(np.argsort(-np.asarray(first), kind="mergesort")[:k].tolist())
    top_second = set(np.argsort(-np.asarray(second), kind="mergesort")[:k].tolist())
    return len(top_first & top_second) / k
