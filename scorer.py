"""Metrics identical to the official MIND scorer, and the leaderboard's prediction / truth files.

Official semantics (msnews/MIND evaluate.py; docs/MIND.md §4), per impression and then the plain mean:
- AUC = sklearn's roc_auc_score on that impression (ties count one half);
- MRR = sum over the clicked items of 1/position in the score order, divided by the number of clicks;
- nDCG@k, k = 5, 10: gains 2^label - 1, discounts log2(position + 2), position from 0;
- the score order is `argsort(score)[::-1]`: among equal scores the higher index comes first;
- an impression without labels is skipped; one with a single class is skipped from every metric (sklearn's AUC
  is undefined there). Both are counted in the result.
A leaderboard file holds ranks; the official scorer reads them back as score = 1/rank.
"""
from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from util import atomic_write, write_lines_atomic

METRIC_KEYS = ("auc", "mrr", "ndcg5", "ndcg10")


CRITERIA = METRIC_KEYS + ("avg",)


def official_order(scores: np.ndarray) -> np.ndarray:
    """Candidate indices best first along the last axis, exactly `argsort(score)[::-1]` of the official scorer.

    A stable argsort of -score over the reversed candidates: equal scores keep the reversed index order, so the
    higher original index comes first. NaN sorts last (worst).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[-1]
    rev = np.argsort(-scores[..., ::-1], axis=-1, kind="stable")
    return (n - 1) - rev


def ranks_from_scores(scores: Sequence[float]) -> np.ndarray:
    """1-based ranks along the last axis (1 = highest score), ties broken as the official scorer orders them
    (among equal scores the higher index ranks first). int64, same shape as `scores`."""
    scores = np.asarray(scores, dtype=np.float64)
    order = official_order(scores)
    ranks = np.empty(scores.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(1, scores.shape[-1] + 1), scores.shape), axis=-1)
    return ranks


def _row_auc(scores: np.ndarray, labels: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUC of each row of [G, n] two-class impressions: the Mann-Whitney statistic with average ranks for ties,
    which is exactly sklearn's roc_auc_score (its trapezoids give ties one half)."""
    g, n = scores.shape
    order = np.argsort(scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, 1)
    y = np.take_along_axis(labels, order, 1)
    pos_idx = np.broadcast_to(np.arange(n), (g, n))
    starts_run = np.ones((g, n), dtype=bool)
    starts_run[:, 1:] = s[:, 1:] != s[:, :-1]
    ends_run = np.ones((g, n), dtype=bool)
    ends_run[:, :-1] = starts_run[:, 1:]
    first = np.maximum.accumulate(np.where(starts_run, pos_idx, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends_run, pos_idx, n)[:, ::-1], axis=1)[:, ::-1]
    avg_rank = (first + last) / 2.0 + 1.0  # 1-based average rank of each tie run
    neg = n - pos
    return ((avg_rank * y).sum(1) - pos * (pos + 1) / 2.0) / (pos * neg)


def _group_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """scores, labels [G, n] float64, every row with both classes -> per-row auc, mrr, ndcg5, ndcg10 [G]."""
    n = scores.shape[1]
    pos = labels.sum(1)
    out = {"auc": _row_auc(scores, labels, pos)}
    ranked = np.take_along_axis(labels, official_order(scores), 1)  # labels best first
    out["mrr"] = (ranked / np.arange(1, n + 1)).sum(1) / pos
    discounts = np.log2(np.arange(n) + 2.0)
    gains = 2.0 ** ranked - 1.0
    ideal = 2.0 ** (-np.sort(-labels, axis=1)) - 1.0
    for k in (5, 10):
        out[f"ndcg{k}"] = (gains[:, :k] / discounts[:k]).sum(1) / (ideal[:, :k] / discounts[:k]).sum(1)
    return out


def per_impression_metrics(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> dict:
    """Official metrics of each impression, from flat arrays: impression i is `[offsets[i], offsets[i+1])`.

    Args:
        scores: [N] float, higher = better.
        labels: [N] 0/1.
        offsets: [I+1] int, offsets[0] = 0, non-decreasing, offsets[-1] = N.
    Returns:
        {index: [S] int64, the positions (0..I-1, ascending) of the S scored impressions; auc, mrr, ndcg5,
         ndcg10: [S] float64, their metrics; skipped_single_class, skipped_empty: counts}.
    Impressions are grouped by candidate count and each group is scored as one 2-D array.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    offsets = np.asarray(offsets, dtype=np.int64).ravel()
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(scores) or (np.diff(offsets) < 0).any():
        raise ValueError(f"offsets must start at 0, never decrease and end at {len(scores)} (the number of scores)")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if len(labels) and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(np.unique(labels).tolist()) - {0, 1})[:5]}")
    labels = labels.astype(np.float64)
    sizes = np.diff(offsets)
    csum = np.concatenate([[0], np.cumsum(labels.astype(np.int64))])
    clicks = csum[offsets[1:]] - csum[offsets[:-1]]
    empty = sizes == 0
    two_class = ~empty & (clicks > 0) & (clicks < sizes)
    index = np.flatnonzero(two_class)
    out: dict = {"index": index, **{k: np.zeros(len(index)) for k in METRIC_KEYS}}
    for n in np.unique(sizes[two_class]):
        rows = np.flatnonzero(two_class & (sizes == n))
        at = np.searchsorted(index, rows)  # where these impressions sit among the scored ones
        idx = offsets[rows, None] + np.arange(n)  # [G, n]
        for key, values in _group_metrics(scores[idx], labels[idx]).items():
            out[key][at] = values
    out["skipped_single_class"] = int((~empty & ~two_class).sum())
    out["skipped_empty"] = int(empty.sum())
    return out


def mean_metrics(per_impression: Mapping) -> dict:
    """`per_impression_metrics`' result -> {auc, mrr, ndcg5, ndcg10 (means, NaN if none scored), impressions,
    skipped_single_class, skipped_empty}."""
    count = len(per_impression["index"])
    result: dict = {k: (float(per_impression[k].sum()) / count if count else float("nan")) for k in METRIC_KEYS}
    result["impressions"] = count
    result["skipped_single_class"] = per_impression["skipped_single_class"]
    result["skipped_empty"] = per_impression["skipped_empty"]
    return result


def compute_metrics_flat(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> dict:
    """Official metrics from flat arrays (see `per_impression_metrics` for the arguments).

    Returns:
        {auc, mrr, ndcg5, ndcg10 (means over scored impressions, NaN if none), impressions (scored),
         skipped_single_class, skipped_empty}.
    """
    return mean_metrics(per_impression_metrics(scores, labels, offsets))


def compute_metrics(scores_list: Sequence[Sequence[float]], labels_list: Sequence[Sequence[int]]) -> dict:
    """Official metrics from per-impression lists (or arrays); see `compute_metrics_flat` for the result."""
    if len(scores_list) != len(labels_list):
        raise ValueError(f"{len(scores_list)} score lists but {len(labels_list)} label lists")
    sizes = np.fromiter((len(s) for s in scores_list), dtype=np.int64, count=len(scores_list))
    label_sizes = np.fromiter((len(lab) for lab in labels_list), dtype=np.int64, count=len(labels_list))
    bad = np.flatnonzero(sizes != label_sizes)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"impression #{i}: {sizes[i]} scores but {label_sizes[i]} labels")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if sizes.sum() == 0:
        flat_s, flat_l = np.zeros(0), np.zeros(0, dtype=np.int64)
    else:
        flat_s = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores_list])
        flat_l = np.concatenate([np.asarray(lab).ravel() for lab in labels_list])
    return compute_metrics_flat(flat_s, flat_l, offsets)


def criterion_value(metrics: Mapping, name: str) -> float:
    """The dev criterion `name` of a metrics dict; `avg` = (AUC + MRR + (nDCG@5 + nDCG@10) / 2) / 3, NNR's
    criterion (docs/MIND.md §4): the two nDCGs count as one metric, not two."""
    if name == "avg":
        m = metrics
        return float((m["auc"] + m["mrr"] + (m["ndcg5"] + m["ndcg10"]) / 2) / 3)
    if name not in METRIC_KEYS:
        raise ValueError(f"unknown criterion {name!r}; choose from {list(CRITERIA)}")
    return float(metrics[name])


def format_prediction_line(impression_id, ranks: Iterable[int]) -> str:
    """`"<id> [r1,r2,...]"`, no spaces inside the brackets (the official scorer splits lines on whitespace)."""
    return f"{impression_id} [{','.join(str(int(r)) for r in ranks)}]"


def _check_id(impression_id, seen: set, what: str) -> str:
    key = str(impression_id)
    if not key or any(c.isspace() for c in key):
        raise ValueError(f"{what} id {impression_id!r} is empty or contains whitespace")
    if key in seen:
        raise ValueError(f"impression {key} appears twice in the {what}")
    seen.add(key)
    return key


def write_prediction(path_txt, impression_ids: Sequence, ranks_list: Sequence[Sequence[int]], zip_path=None) -> None:
    """Write a leaderboard file, one line per impression in the given order, after validating it all.

    Raises ValueError (naming the first bad impression) when the counts differ, an id repeats, or a rank list is
    not a permutation of 1..n. Files are written atomically; with `zip_path`, the same text is also zipped as
    `prediction.txt` at the zip's root (what the leaderboard expects).
    """
    if len(impression_ids) != len(ranks_list):
        raise ValueError(f"{len(impression_ids)} impression ids but {len(ranks_list)} rank lists")
    seen: set = set()
    lines = []
    for impr, ranks in zip(impression_ids, ranks_list):
        key = _check_id(impr, seen, "prediction")
        r = ranks.tolist() if isinstance(ranks, np.ndarray) else list(ranks)
        n = len(r)
        if n == 0:
            raise ValueError(f"impression {key}: empty rank list")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in r):
            raise ValueError(f"impression {key}: ranks must be integers, got {r[:10]}")
        if min(r) != 1 or max(r) != n or len(set(r)) != n:
            raise ValueError(f"impression {key}: ranks {r[:10]}{'...' if n > 10 else ''} "
                             f"are not a permutation of 1..{n}")
        lines.append(format_prediction_line(key, r))
    write_lines_atomic(path_txt, lines)
    if zip_path is not None:
        text = "".join(line + "\n" for line in lines).encode("utf-8")

        def write_zip(tmp):
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
                z.writestr("prediction.txt", text)
        atomic_write(zip_path, write_zip)


def _open_lines(path: Path) -> Iterator[str]:
    """Text lines of a .txt file, or of the one .txt member of a .zip (`prediction.txt` preferred), streamed."""
    path = Path(path)
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as z:
            members = [n for n in z.namelist() if n.lower().endswith(".txt") and not n.endswith("/")]
            if "prediction.txt" in members:
                members = ["prediction.txt"]
            if len(members) != 1:
                raise ValueError(f"{path}: expected one .txt file in the zip, found {members}")
            with z.open(members[0]) as raw:
                for line in _decode_lines(raw):
                    yield line
    else:
        with open(path, encoding="utf-8", newline=None) as f:
            yield from f


def _decode_lines(raw) -> Iterator[str]:
    yield from io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=None)


def _read_bracket_file(path) -> tuple[list, list[list[int]]]:
    ids: list = []
    lists: list[list[int]] = []
    for line_no, line in enumerate(_open_lines(Path(path)), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        body = parts[1].replace(" ", "") if len(parts) == 2 else ""
        if not (body.startswith("[") and body.endswith("]")):
            raise ValueError(f"{path}:{line_no}: expected '<ImpressionID> [v1,v2,...]', got {line[:80]!r}")
        try:
            values = [int(v) for v in body[1:-1].split(",")] if body != "[]" else []
        except ValueError:
            raise ValueError(f"{path}:{line_no}: non-integer value in {body[:80]!r}") from None
        ids.append(int(parts[0]) if parts[0].isdigit() else parts[0])
        lists.append(values)
    return ids, lists


def read_prediction(path) -> tuple[list, list[list[int]]]:
    """(impression ids, rank lists) of a prediction .txt or .zip; ids made of digits come back as int."""
    return _read_bracket_file(path)


def write_truth(path, impression_ids: Sequence, labels_list: Sequence[Sequence[int]]) -> None:
    """Truth file in the official scorer's format, `<ImpressionID> [l1,l2,...]` with 0/1 labels; atomic."""
    if len(impression_ids) != len(labels_list):
        raise ValueError(f"{len(impression_ids)} impression ids but {len(labels_list)} label lists")
    seen: set = set()
    lines = []
    for impr, labels in zip(impression_ids, labels_list):
        key = _check_id(impr, seen, "truth")
        lab = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
        if any(v not in (0, 1) for v in lab):
            raise ValueError(f"impression {key}: labels must be 0 or 1, got {lab[:10]}")
        lines.append(format_prediction_line(key, lab))
    write_lines_atomic(path, lines)


def read_truth(path) -> tuple[list, list[list[int]]]:
    """(impression ids, label lists) of a truth .txt or .zip."""
    return _read_bracket_file(path)


def official_style_score(truth_path, prediction_path) -> dict:
    """The parity reference: the official scorer's logic written plainly, one impression at a time.

    The two files are read in lockstep (the ids must agree line by line, as the official scorer demands);
    score = 1/rank; sklearn's roc_auc_score and the official mrr/dcg formulas. Impressions with no labels or one
    class only are skipped and counted. Returns the same keys as `compute_metrics`.
    """
    from sklearn.metrics import roc_auc_score

    def dcg_score(y_true, y_score, k=10):
        order = np.argsort(y_score, kind="stable")[::-1]
        y_true = np.take(y_true, order[:k])
        gains = 2 ** y_true - 1
        discounts = np.log2(np.arange(len(y_true)) + 2)
        return np.sum(gains / discounts)

    def ndcg_score(y_true, y_score, k=10):
        best = dcg_score(y_true, y_true, k)
        actual = dcg_score(y_true, y_score, k)
        return actual / best

    def mrr_score(y_true, y_score):
        order = np.argsort(y_score, kind="stable")[::-1]
        y_true = np.take(y_true, order)
        rr_score = y_true / (np.arange(len(y_true)) + 1)
        return np.sum(rr_score) / np.sum(y_true)

    t_ids, truths = read_truth(truth_path)
    p_ids, preds = read_prediction(prediction_path)
    if len(t_ids) != len(p_ids):
        raise ValueError(f"{len(t_ids)} truth lines but {len(p_ids)} prediction lines")
    aucs, mrrs, ndcg5s, ndcg10s = [], [], [], []
    skipped_single, skipped_empty = 0, 0
    for line_no, (t_id, labels, p_id, ranks) in enumerate(zip(t_ids, truths, p_ids, preds), 1):
        if str(t_id) != str(p_id):
            raise ValueError(f"line {line_no}: inconsistent impression id {p_id} (prediction) and {t_id} (truth)")
        if len(labels) == 0:
            skipped_empty += 1
            continue
        if len(ranks) != len(labels):
            raise ValueError(f"line {line_no}: impression {t_id} has {len(ranks)} ranks for {len(labels)} labels")
        y_true = np.array(labels, dtype=np.float64)
        if y_true.min() == y_true.max():
            skipped_single += 1
            continue
        y_score = []
        for rank in ranks:
            score = 1.0 / rank
            if score < 0 or score > 1:
                raise ValueError(f"line {line_no}: rank {rank} is not in 1..{len(labels)}")
            y_score.append(score)
        y_score = np.array(y_score)
        aucs.append(roc_auc_score(y_true, y_score))
        mrrs.append(mrr_score(y_true, y_score))
        ndcg5s.append(ndcg_score(y_true, y_score, 5))
        ndcg10s.append(ndcg_score(y_true, y_score, 10))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"auc": mean(aucs), "mrr": mean(mrrs), "ndcg5": mean(ndcg5s), "ndcg10": mean(ndcg10s),
            "impressions": len(aucs), "skipped_single_class": skipped_single, "skipped_empty": skipped_empty}
