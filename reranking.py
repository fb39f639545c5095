"""Re-ranking: a step between a model's scores and the ranks that are written and scored (--rerank). It is no part
of a model: it takes the scores and ranks of an evaluation and returns new ranks, so any checkpoint can be
re-ranked, and the accuracy-diversity trade-off of one checkpoint can be swept without scoring it again
(bench/tradeoff.py).

- mmr: maximal marginal relevance (Carbonell & Goldstein 1998) on the news vectors of beyond_accuracy.py.
- calibrated: Steck (RecSys 2018): the next news is the one that keeps the list's category distribution closest
  (KL, smoothed) to the user's history's.

Both are greedy: step t takes, among the candidates not yet placed, the argmax of
    (1 - lam) * rel_i - lam * penalty_i(S)
with rel_i the model's score min-max scaled to [0, 1] within the impression (scores of different models and
impressions are on different scales; equal scores all get 1) and S the news already placed; lam = 0 keeps the
model's ranking exactly. Ties (also every tie at lam = 1 while the penalties are equal) go to the candidate ranked
first by the model, so the evaluation's tie rule (--tie_break) carries over; candidates with a non-finite score
stay last in the model's order, as without re-ranking. Padding never enters (flat arrays, one impression each).

Legend: G impressions of one candidate count n, D embedding dim, C categories.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from beyond_accuracy import CALIBRATION_ALPHA, NewsFeatures, distributions

METHODS = ("mmr", "calibrated")
BLOCK_VALUES = 4_000_000  # G * n * n (mmr similarities) or G * n * C held at once


def relevance(scores: np.ndarray) -> np.ndarray:
    """[G, n] scores -> min-max scaled to [0, 1] per row over the finite ones (a row of equal scores: all 1);
    non-finite scores -> -inf (placed last)."""
    finite = np.isfinite(scores)
    lo = np.where(finite, scores, np.inf).min(1, keepdims=True)
    hi = np.where(finite, scores, -np.inf).max(1, keepdims=True)
    span = hi - lo
    with np.errstate(invalid="ignore"):
        rel = np.where(span > 0, (scores - lo) / np.where(span > 0, span, 1), 1.0)
    return np.where(finite, rel, -np.inf)


def _greedy(rel: np.ndarray, lam: float, penalty_step) -> np.ndarray:
    """rel [G, n] in the model's order (position 0 = ranked first) -> the new order [G, n] (positions). Each step
    calls `penalty_step(picked [G] or None)` for the penalties [G, n] given what was placed so far."""
    g, n = rel.shape
    placed = np.zeros((g, n), dtype=bool)
    order = np.empty((g, n), dtype=np.int64)
    rows = np.arange(g)
    picked = None
    for t in range(n):
        penalty = penalty_step(picked) if lam > 0 else 0.0
        finite = np.isfinite(rel)
        obj = np.where(finite, (1 - lam) * np.where(finite, rel, 0) - lam * penalty, -np.inf)
        key = np.where(placed, -np.inf, obj)
        top = key.max(1, keepdims=True)
        # The first unplaced position with the largest objective; a row with only non-finite scores left takes
        # its first unplaced candidate (the model's order).
        best = (~placed & ((key == top) | np.isneginf(top))).argmax(1)
        order[:, t] = best
        placed[rows, best] = True
        picked = best
    return order


def _mmr_penalty(vectors: np.ndarray):
    """vectors [G, n, D] unit (zero: no vector, similarity 0) -> step function: max cosine similarity to the
    news placed so far (0 before any)."""
    return mmr_penalty_from_similarity(np.einsum("gid,gjd->gij", vectors, vectors, optimize=True))


def mmr_penalty_from_similarity(sim: np.ndarray):
    """sim [G, n, n] -> the step function of `_mmr_penalty` (max similarity to the news placed so far)."""
    g, n, _ = sim.shape
    rows = np.arange(g)
    state = {"best": np.zeros((g, n))}

    def step(picked):
        if picked is None:
            return state["best"]
        sim_to_picked = sim[rows, picked]  # [G, n]
        state["best"] = sim_to_picked if not state.get("started") else np.maximum(state["best"], sim_to_picked)
        state["started"] = True
        return state["best"]
    return step


def _calibration_penalty(cand_cat: np.ndarray, p: np.ndarray, alpha: float = CALIBRATION_ALPHA):
    """cand_cat [G, n] category ids (0: none), p [G, C] the history's distribution (a zero row: empty history,
    penalty 0) -> step function: KL(p || q~) of the list if candidate i were placed next."""
    g, n = cand_cat.shape
    c = p.shape[1]
    onehot = np.zeros((g, n, c))
    gi, ni = np.nonzero(cand_cat > 0)
    onehot[gi, ni, cand_cat[gi, ni]] = 1.0
    counts = np.zeros((g, c))
    has_p = p.sum(1) > 0

    def step(picked):
        nonlocal counts
        if picked is not None:
            counts = counts + onehot[np.arange(g), picked]
        with_i = counts[:, None, :] + onehot  # [G, n, C]
        q = with_i / np.maximum(with_i.sum(-1, keepdims=True), 1)
        q_s = (1 - alpha) * q + alpha * p[:, None, :]
        pp = p[:, None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(pp > 0, pp * np.log(pp / np.where(q_s > 0, q_s, 1)), 0.0).sum(-1)
        return np.where(has_p[:, None], kl, 0.0)
    return step


def rerank(method: str, lam: float, scores: np.ndarray, ranks: np.ndarray, beh: Mapping[str, Any],
           features: NewsFeatures) -> tuple[np.ndarray, dict[str, int]]:
    """New flat 1-based ranks of every impression of `beh` (offsets, candidates, histories, history_row) after
    re-ranking the model's `scores` / `ranks` (flat, behaviors order). Returns (ranks, counts): impressions kept
    in the model's order because the method has nothing to work with (calibrated: an empty history or none of its
    news with a category)."""
    if method not in METHODS:
        raise ValueError(f"unknown --rerank {method!r}; choose from none, {', '.join(METHODS)}")
    if not 0 <= lam <= 1:
        raise ValueError(f"--rerank_lambda must be in [0, 1], got {lam}")
    if method == "mmr" and features.embedding is None:
        raise ValueError("--rerank=mmr needs news vectors (beyond_accuracy.news_features with an embedding)")
    offsets = np.asarray(beh["offsets"])
    cands = np.asarray(beh["candidates"], dtype=np.int64)
    ranks = np.asarray(ranks, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    sizes = np.diff(offsets)
    out = ranks.copy()
    kept = 0
    groups = int(max(features.category.max(), 0)) + 1
    for n in np.unique(sizes[sizes > 1]):
        rows_all = np.flatnonzero(sizes == n)
        per = max(1, BLOCK_VALUES // (n * max(n, groups)))
        for start in range(0, len(rows_all), per):
            rows = rows_all[start:start + per]
            idx = offsets[rows, None] + np.arange(n)  # [G, n] flat positions, behaviors order
            model_order = np.argsort(ranks[idx], axis=1)  # position 0 = the model's first
            pos = np.take_along_axis(idx, model_order, 1)
            rel = relevance(scores[pos])
            news = cands[pos]
            if method == "mmr":
                step = _mmr_penalty(features.embedding[news])
            else:
                hist = np.asarray(beh["histories"])[np.asarray(beh["history_row"])[rows]]
                p, known = distributions(features.category[hist], groups)
                kept += int((known == 0).sum())
                step = _calibration_penalty(features.category[news], p)
            order = _greedy(rel, lam, step)  # [G, n] positions in the model's order
            new_rank = np.empty_like(order)
            np.put_along_axis(new_rank, order, np.arange(1, n + 1)[None].repeat(len(rows), 0), 1)
            out[pos] = new_rank
    return out.astype(ranks.dtype), {"kept_model_order": kept}


# ----------------------------------------------------------------------------------------------------------
# The accuracy-diversity trade-off of one checkpoint (bench/tradeoff.py)
# ----------------------------------------------------------------------------------------------------------

TRADEOFF_DIVERSITY = ("ild_category", "ild_embedding", "calibration_kl")


def sweep(methods: Sequence[str], lambdas: Sequence[float], scores: np.ndarray, ranks: np.ndarray,
          beh: Mapping[str, Any], features: NewsFeatures, k: int = 10) -> list[dict[str, Any]]:
    """One row per (method, lam): the official accuracy metrics of the re-ranked lists (score = 1 / rank, as a
    submission is scored) and their ILD (category, embedding) and calibration KL at k."""
    import beyond_accuracy as ba
    import scorer

    labels = np.asarray(beh["labels"]).astype(np.int64)
    rows = []
    for method in methods:
        for lam in lambdas:
            new, counts = rerank(method, lam, scores, ranks, beh, features)
            acc = scorer.mean_metrics(scorer.per_impression_metrics(1.0 / new, labels, beh["offsets"]))
            div = ba.compute(new, beh, features, [k], list(TRADEOFF_DIVERSITY)).means
            rows.append({"method": method, "lambda": float(lam), **{m: acc[m] for m in scorer.METRIC_KEYS},
                         **{f"{m}@{k}": div[f"{m}@{k}"] for m in TRADEOFF_DIVERSITY},
                         "impressions": acc["impressions"], **counts})
    return rows


def tradeoff_tsv(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = list(rows[0])
    return ["\t".join(keys)] + ["\t".join(repr(r[k]) if isinstance(r[k], float) else str(r[k]) for k in keys)
                                for r in rows]


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], out, k: int = 10, title: str = "") -> None:
    """A 2 x 2 PNG: AUC and nDCG@10 (rows) against ILD by embedding and calibration KL at k (columns), one curve
    per method, each point labelled with its lambda (0 = the model's ranking)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import util

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for i, (acc, acc_name) in enumerate((("auc", "AUC"), ("ndcg10", "nDCG@10"))):
        for j, (div, div_name) in enumerate(((f"ild_embedding@{k}", f"ILD (embedding) @{k}, higher = more diverse"),
                                             (f"calibration_kl@{k}", f"calibration KL @{k}, lower = better "
                                              f"calibrated"))):
            ax = axes[i, j]
            for method, marker in zip(METHODS, "os"):
                pts = [r for r in rows if r["method"] == method]
                if not pts:
                    continue
                ax.plot([r[div] for r in pts], [r[acc] for r in pts], marker=marker, label=method)
                for r in pts:
                    ax.annotate(f"{r['lambda']:g}", (r[div], r[acc]), fontsize=7, textcoords="offset points",
                                xytext=(3, 3))
            ax.set_xlabel(div_name)
            ax.set_ylabel(acc_name)
            ax.grid(alpha=0.3)
            ax.legend(title="--rerank (points: lambda)", fontsize=8)
    fig.suptitle(title or "accuracy vs diversity / calibration")
    fig.tight_layout()
    util.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
