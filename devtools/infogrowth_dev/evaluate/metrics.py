"""Plain metrics over numpy arrays (no scikit-learn needed)."""

from __future__ import annotations

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney)."""
    p = np.asarray(positive, dtype=np.float64)
    q = np.asarray(negative, dtype=np.float64)
    if len(p) == 0 or len(q) == 0:
        return None
    r = average_ranks(np.concatenate([p, q]))
    u = r[: len(p)].sum() - len(p) * (len(p) + 1) / 2.0
    return float(u / (len(p) * len(q)))


def precision_recall(predicted: np.ndarray, truth: np.ndarray) -> tuple[float | None, float | None]:
    pred = np.asarray(predicted, dtype=bool)
    true = np.asarray(truth, dtype=bool)
    tp = int((pred & true).sum())
    precision = tp / int(pred.sum()) if pred.any() else None
    recall = tp / int(true.sum()) if true.any() else None
    return precision, recall


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0
