"""One home for the evaluation protocol: ranking metrics, ranking with history exclusion, the popularity baseline,
popularity and history-length buckets, and the training windows that cover every training target.

Speeder's evaluation, the SASRec baseline and `recommend()` all exclude history items through one function,
`recommendation.exclude_history`, so the benchmarks leave out exactly what users are never recommended.
"""

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .arguments import COLD_ITEM_MAX_COUNT, NUM_NEGATIVES
from .recommendation import exclude_history

HISTORY_BUCKETS = ((1, 5), (6, 10), (11, 20), (21, 50), (51, None))


def ranking_metrics(scores, labels, ks=(1, 5, 10), valid=None) -> dict:
    """HR@k, NDCG@k and MRR of the target among candidates. scores: (B, C); labels: (B,) target positions.

    Ties count against the target (its rank is the number of candidates scoring >= it, minus itself), so
    constant scores give chance-level numbers, never perfect ones. NaN scores rank below everything, so a diverged
    model scores misses, not hits; `nonfinite_scores` counts them. `valid`: (B,) bool, whether each answer was a valid
    catalog item (generative baselines); ValidRatio is their share and VHR@1 = correct and valid / total.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    keep = labels >= 0
    nonfinite = int((~np.isfinite(scores[keep])).sum())
    rank = candidate_ranks(scores[keep], labels[keep])
    valid = np.ones(len(rank), dtype=bool) if valid is None else np.asarray(valid)[keep]
    out = {}
    for k in ks:
        out[f"hr@{k}"] = float(np.mean(rank < k))
        if k > 1:
            out[f"ndcg@{k}"] = float(np.mean((rank < k) / np.log2(rank + 2)))
    out["mrr"] = float(np.mean(1.0 / (rank + 1)))
    out["valid_ratio"] = float(valid.mean())
    out["vhr@1"] = float(np.mean((rank == 0) & valid))
    if nonfinite:
        out["nonfinite_scores"] = nonfinite
    return out


def candidate_ranks(scores, labels) -> np.ndarray:
    """(B,) 0-based rank of each target among its candidates (B, C), ties against the target, NaN as a miss."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    labels = np.asarray(labels)
    target = scores[np.arange(len(labels)), labels]
    return np.where(np.isneginf(target), scores.shape[1] - 1, (scores >= target[:, None]).sum(1) - 1)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) 0-based rank of each target among the catalog scores (B, N), ties against the target, NaN as a miss."""
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    target = scores.gather(1, targets[:, None])
    ranks = (scores >= target).sum(1) - 1
    return torch.where(torch.isneginf(target[:, 0]), scores.shape[1] - 1, ranks)


def full_ranking_metrics(ranks, prefix: str = "full_") -> dict:
    """Protocol R: HR@10 and NDCG@10 over the whole catalog from 0-based target ranks."""
    ranks = torch.as_tensor(ranks).float()
    return {f"{prefix}hr@10": float((ranks < 10).float().mean()),
            f"{prefix}ndcg@10": float(((ranks < 10) / torch.log2(ranks + 2)).mean())}


def training_item_counts(splits, item_index) -> np.ndarray:
    """(N,) interactions per item in the training split: every item of each user's training sequence (the validation
    history), never the validation or test targets."""
    counts = np.zeros(len(item_index), dtype=np.int64)
    for item, n in Counter(i for h in splits["validation"]["history"] for i in h).items():
        counts[item_index[item]] = n
    return counts


def popularity_bucket_names(target_rows: Sequence[int], counts: np.ndarray) -> list[str]:
    return ["cold" if counts[t] <= COLD_ITEM_MAX_COUNT else "warm" for t in target_rows]


def history_bucket_names(lengths: Sequence[int]) -> list[str]:
    names = []
    for n in lengths:
        low, high = next((lo, hi) for lo, hi in HISTORY_BUCKETS if n >= lo and (hi is None or n <= hi))
        names.append(f"{low}-{high}" if high else f"{low}+")
    return names


def bucketed(scores, labels, names: Sequence[str], order: Sequence[str] | None = None, ranks=None) -> dict:
    """ranking_metrics per bucket name (plus full-ranking metrics from `ranks` when given), with the user count."""
    names = np.asarray(names)
    out = {}
    for name in order or sorted(set(names.tolist())):
        keep = names == name
        if keep.any():
            out[name] = dict(ranking_metrics(np.asarray(scores)[keep], np.asarray(labels)[keep]), users=int(keep.sum()))
            if ranks is not None:
                out[name].update(full_ranking_metrics(torch.as_tensor(ranks)[torch.from_numpy(keep)]))
    return out


def report_for(candidate_scores, labels, catalog_ranks, history_lengths, target_rows, counts, raw_ranks=None) -> dict:
    """The evaluation report every system gets: protocol P overall, protocol R (history excluded; and, with
    `raw_ranks`, without exclusion as RecBole scores sequential models), and both by history length and by
    target-item popularity in the training split (cold = at most COLD_ITEM_MAX_COUNT training interactions)."""
    report = ranking_metrics(candidate_scores, labels)
    report.update(full_ranking_metrics(catalog_ranks))
    if raw_ranks is not None:
        report.update(full_ranking_metrics(raw_ranks, prefix="full_no_exclusion_"))
    report["users"] = len(labels)
    report["by_history_length"] = bucketed(
        candidate_scores, labels, history_bucket_names(history_lengths),
        order=[f"{lo}-{hi}" if hi else f"{lo}+" for lo, hi in HISTORY_BUCKETS], ranks=catalog_ranks,
    )
    report["by_target_popularity"] = bucketed(candidate_scores, labels, popularity_bucket_names(target_rows, counts),
                                              order=["cold", "warm"], ranks=catalog_ranks)
    return report


def popularity_baseline(splits, item_index, data) -> dict:
    """Ranks `data` (rows of a split) by training-split interaction count (ties against the target), on the stored
    candidates and the whole catalog with the history excluded: the floor every learned system must clear."""
    counts = training_item_counts(splits, item_index)
    histories = [[item_index[i] for i in h] for h in data["history"]]
    targets = torch.tensor([item_index[t] for t in data["target"]])
    candidates = [[item_index[c] for c in cs] for cs in data["candidates"]]
    popularity = torch.as_tensor(counts, dtype=torch.float32)
    candidate_scores = popularity[torch.tensor(candidates)].numpy()
    labels = [cs.index(t) for cs, t in zip(candidates, targets.tolist())]
    catalog = popularity.expand(len(targets), -1).clone()
    raw_ranks = target_ranks(catalog, targets)
    ranks = target_ranks(exclude_history(catalog, histories, keep=targets), targets)
    return report_for(candidate_scores, labels, ranks, [len(h) for h in histories], targets.tolist(), counts, raw_ranks)


def content_knn_scores(vectors: torch.Tensor, histories: Sequence[Sequence[int]], last: int) -> torch.Tensor:
    """(B, N) the content k-nearest-neighbour recommender, the standard cold-start baseline: the cosine between every
    item's content and the mean content of each user's `last` most recent history items. vectors: (N, D)."""
    profiles = torch.stack([vectors[list(h[-last:])].mean(0) for h in histories])  # (B, D)
    return F.normalize(profiles, dim=-1) @ vectors.T


def content_knn_baseline(vectors, histories, targets, candidates, counts, last: int) -> dict:
    """The content kNN's report on rows of catalog indices: stored candidates, whole catalog (history excluded) and
    buckets, as every system gets (`report_for`)."""
    scores = content_knn_scores(vectors, histories, last)
    targets = torch.as_tensor(targets)
    labels = [list(c).index(t) for c, t in zip(candidates, targets.tolist())]
    candidate_scores = scores.gather(1, torch.as_tensor(candidates)).numpy()
    raw_ranks = target_ranks(scores, targets)
    ranks = target_ranks(exclude_history(scores, histories, keep=targets), targets)
    return report_for(candidate_scores, labels, ranks, [len(h) for h in histories], targets.tolist(), counts, raw_ranks)


def training_windows(sequence: Sequence, max_length: int, stride: int | None = None) -> list[tuple[list, int]]:
    """Cover every next-item target of a training sequence with windows of at most `max_length` history items.

    Returns (window, first_labeled) pairs: `window` is a slice of the sequence of at most max_length + 1 items, where
    each item predicts the next; only the predictions of items at index >= first_labeled count, so every target of
    the sequence (items 1 .. n-1) is predicted exactly once, with at least max_length - stride items of context
    after the first window. stride defaults to max_length // 2.
    """
    n = len(sequence)
    if n < 2:
        return []
    stride = stride or max(1, max_length // 2)
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length={max_length}, got {stride}")
    windows, covered = [], 0  # targets at sequence index <= covered are done
    end = min(n - 1, max_length)  # index of the window's last target
    while True:
        start = max(0, end - max_length)
        windows.append((list(sequence[start : end + 1]), covered - start))
        covered = end
        if end == n - 1:
            return windows
        end = min(n - 1, end + stride)


__all__ = [
    "COLD_ITEM_MAX_COUNT",
    "HISTORY_BUCKETS",
    "NUM_NEGATIVES",
    "bucketed",
    "content_knn_baseline",
    "content_knn_scores",
    "full_ranking_metrics",
    "history_bucket_names",
    "popularity_baseline",
    "popularity_bucket_names",
    "ranking_metrics",
    "report_for",
    "target_ranks",
    "training_item_counts",
    "training_windows",
]
