"""Metrics against brute-force definitions on small cases."""

import itertools
import warnings

import numpy as np
import pytest

from rapidin_index.demo.metrics import (
    average_precision,
    mean_metrics,
    retrieval_metrics,
    roc_auc,
    top_bottom_metrics,
)


def brute_roc_auc(labels, scores):
    pairs = [
        (p, n) for p, n in itertools.product(range(len(labels)), repeat=2) if labels[p] and not labels[n]
    ]
    return np.mean(
        [1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0 for p, n in pairs]
    )


def brute_average_precision(labels, scores):
    # Untied scores: mean over positives of the precision at that positive's rank.
    order = np.argsort(-np.asarray(scores))
    hits, total = 0, []
    for rank, index in enumerate(order, start=1):
        if labels[index]:
            hits += 1
            total.append(hits / rank)
    return np.mean(total)


@pytest.mark.parametrize("seed", range(5))
def test_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(30) < 0.3
    labels[0], labels[1] = True, False
    scores = rng.standard_normal(30)
    assert roc_auc(labels, scores) == pytest.approx(brute_roc_auc(labels, scores))
    assert average_precision(labels, scores) == pytest.approx(brute_average_precision(labels, scores))
    tied = np.round(scores)
    assert roc_auc(labels, tied) == pytest.approx(brute_roc_auc(labels, tied))


def test_perfect_and_top_bottom_protocol():
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
    scores = np.array([9, 8, 1, 2, 3, 0, -1, -2], float)
    assert roc_auc(labels, scores) == 1.0 and average_precision(labels, scores) == 1.0
    metrics = top_bottom_metrics(labels, scores, 2)
    assert metrics == {"auprc@2": 1.0, "auroc@2": 1.0, "precision@2": 1.0}
    worst = top_bottom_metrics(labels, -scores, 2)
    assert worst["precision@2"] == 0.0 and worst["auroc@2"] == 0.0
    all_metrics = retrieval_metrics(labels, scores, ks=(2, 50))
    assert "auprc@2" in all_metrics and "auprc@50" not in all_metrics
    assert mean_metrics([{"a": 1.0}, {"a": 0.0}]) == {"a": 0.5}


def test_spearman_and_overlap():
    from rapidin_index.demo.metrics import spearman, top_k_overlap

    values = np.array([0.1, 0.5, 0.3, 0.9])
    assert spearman(values, values**3) == pytest.approx(1.0)
    assert spearman(values, -values) == pytest.approx(-1.0)
    assert top_k_overlap(values, values**3, 2) == 1.0
    assert top_k_overlap(values, -values, 2) == 0.0


def test_undefined_metrics_are_none_with_a_reason_and_no_warning():
    labels = np.array([1, 1, 1, 1, 0, 1, 1, 1], bool)
    scores = np.array([9, 8, 7, 6, 5, -1, -2, -3], float)  # top-2 and bottom-2 all poisoned
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning (e.g. "Mean of empty slice") fails the test
        metrics = retrieval_metrics(labels, scores, ks=(2,))
        assert metrics["auroc@2"] is None and metrics["auprc@2"] == 1.0
        assert metrics.notes == {"auroc@2": "the top-2 and bottom-2 rows are all poisoned"}
        clean = retrieval_metrics(np.zeros(8, bool), scores, ks=(2,))
        assert clean["roc_auc"] is None and clean["auprc@2"] is None and clean["auroc@2"] is None
        assert clean.notes["roc_auc"] == "every row has the same label"
        assert clean.notes["auprc@2"] == "no poisoned row among the top-2 and bottom-2"
        assert clean.notes["auroc@2"] == "the top-2 and bottom-2 rows are all clean"
        mixed = np.array([1, 0, 1, 1, 0, 1, 0, 1], bool)
        mean = mean_metrics([metrics, retrieval_metrics(mixed, scores, ks=(2,))])
        assert mean["auroc@2"] == roc_auc(mixed[[0, 1, 6, 7]], scores[[0, 1, 6, 7]])  # the defined one
        assert mean.notes["auroc@2"] == (
            "undefined for 1 of 2 queries: the top-2 and bottom-2 rows are all poisoned"
        )
        everywhere = mean_metrics([metrics, metrics])
        assert everywhere["auroc@2"] is None
        assert everywhere.notes["auroc@2"].startswith("undefined for every query")
        assert roc_auc([], []) is None and average_precision([0, 0], [1, 2]) is None
        from rapidin_index.demo.metrics import spearman

        assert spearman([1, 1, 1], [1, 2, 3]) is None
