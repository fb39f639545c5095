"""reranking.py: MMR on Carbonell & Goldstein's worked example, calibrated re-ranking by hand, lambda = 0 keeps the
evaluation's ranks exactly (ties, non-finite scores), every result a permutation, and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import beyond_accuracy as ba
import reranking as rr
from evaluation import batch_ranks


def ranks_of(scores: np.ndarray, offsets: np.ndarray, tie_rank=None) -> np.ndarray:
    """The evaluation's ranks (batch_ranks, with its tie and non-finite rules) of flat scores."""
    out = []
    for s, e in zip(offsets[:-1], offsets[1:]):
        t = torch.tensor(scores[s:e])[None]
        tr = torch.tensor(tie_rank[s:e])[None] if tie_rank is not None else None
        out.append(batch_ranks(t, torch.ones_like(t, dtype=torch.bool), tr)[0].numpy())
    return np.concatenate(out)


def test_mmr_worked_example():
    """Carbonell & Goldstein, lambda' = 0.5 (our lam = 1 - lambda' = 0.5): relevance .9, .85, .5; sim(d1,d2) .95,
    sim(d1,d3) .1, sim(d2,d3) .2 -> d1 (.45), then d3 (.20 vs -.05), then d2."""
    rel = np.array([[0.9, 0.85, 0.5]])
    sim = np.array([[[1, 0.95, 0.1], [0.95, 1, 0.2], [0.1, 0.2, 1]]])
    order = rr._greedy(rel, 0.5, rr.mmr_penalty_from_similarity(sim))
    np.testing.assert_array_equal(order, [[0, 2, 1]])


def test_calibrated_by_hand():
    # history categories (1, 2): p = (.5, .5); candidates by score: cat 1 (.9), cat 1 (.8), cat 2 (.1)
    f = ba.NewsFeatures(np.array([0, 1, 2, 1, 1]), np.array([0, 1, 2, 1, 1]), np.zeros(5))
    beh = dict(offsets=np.array([0, 3]), candidates=np.array([3, 4, 2]), histories=np.array([[1, 2]]),
               history_row=np.array([0]))
    scores = np.array([0.9, 0.8, 0.1])
    ranks = np.array([1, 2, 3])
    # lam = 1: the first pick is a tie (either category alone: KL 1.9585), the model's first wins; then cat 2
    # (q = (.5, .5), KL 0) beats a second cat 1 (KL 1.9585)
    new, counts = rr.rerank("calibrated", 1.0, scores, ranks, beh, f)
    np.testing.assert_array_equal(new, [1, 3, 2])
    # lam = 0.5: rel (min-max) 1, 0.875, 0; step 2: cat 1 -> .5*.875 - .5*1.9585 < 0 = .5*0 - .5*0 -> cat 2 again
    np.testing.assert_array_equal(rr.rerank("calibrated", 0.5, scores, ranks, beh, f)[0], [1, 3, 2])
    # lam = 0.1: .9*.875 - .1*1.9585 = 0.59 > 0: the model's order stays
    np.testing.assert_array_equal(rr.rerank("calibrated", 0.1, scores, ranks, beh, f)[0], [1, 2, 3])
    # an empty history: nothing to calibrate to, the model's order, counted
    empty = {**beh, "histories": np.array([[0, 0]])}
    new, counts = rr.rerank("calibrated", 1.0, scores, ranks, empty, f)
    np.testing.assert_array_equal(new, [1, 2, 3])
    assert counts == {"kept_model_order": 1}


@pytest.mark.parametrize("method", rr.METHODS)
def test_lambda_0_keeps_the_evaluations_ranks_and_every_result_is_a_permutation(method):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 30, 300)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n_news = 60
    scores = np.round(rng.normal(size=offsets[-1]), 1)  # many ties
    scores[rng.random(offsets[-1]) < 0.05] = np.nan
    scores[rng.random(offsets[-1]) < 0.02] = np.inf
    cands = rng.integers(0, n_news, offsets[-1])
    tie_rank = rng.permutation(n_news)[cands]
    ranks = ranks_of(scores, offsets, tie_rank)
    f = ba.NewsFeatures(rng.integers(0, 5, n_news), rng.integers(0, 9, n_news), np.zeros(n_news),
                        ba.unit_rows(rng.normal(size=(n_news, 6))))
    hist = rng.integers(0, n_news, (300, 7))
    hist[:20] = 0
    beh = dict(offsets=offsets, candidates=cands, histories=hist, history_row=np.arange(300))
    same, _ = rr.rerank(method, 0.0, scores, ranks, beh, f)
    np.testing.assert_array_equal(same, ranks)
    for lam in (0.3, 1.0):
        new, _ = rr.rerank(method, lam, scores, ranks, beh, f)
        for i, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
            assert sorted(new[s:e]) == list(range(1, e - s + 1)), i
            bad = ~np.isfinite(scores[s:e])  # non-finite scores stay last, in the model's order
            if bad.any():
                np.testing.assert_array_equal(np.sort(new[s:e][bad]), np.arange(e - s - bad.sum() + 1, e - s + 1))
                np.testing.assert_array_equal(np.argsort(new[s:e][bad]), np.argsort(ranks[s:e][bad]))


def test_mmr_raises_diversity_and_calibrated_lowers_the_divergence():
    rng = np.random.default_rng(1)
    sizes = np.full(200, 20)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n_news = 80
    cands = rng.integers(1, n_news, offsets[-1])
    scores = rng.normal(size=offsets[-1])
    ranks = ranks_of(scores, offsets)
    f = ba.NewsFeatures(rng.integers(1, 6, n_news), rng.integers(1, 9, n_news), np.zeros(n_news),
                        ba.unit_rows(rng.normal(size=(n_news, 4))))
    beh = dict(offsets=offsets, candidates=cands, histories=rng.integers(1, n_news, (200, 10)),
               history_row=np.arange(200), labels=np.zeros(offsets[-1], np.int8))
    before = ba.compute(ranks, beh, f, [5], ["ild_embedding", "calibration_kl"]).means
    mmr = ba.compute(rr.rerank("mmr", 0.7, scores, ranks, beh, f)[0], beh, f, [5], ["ild_embedding"]).means
    cal = ba.compute(rr.rerank("calibrated", 0.7, scores, ranks, beh, f)[0], beh, f, [5], ["calibration_kl"]).means
    assert mmr["ild_embedding@5"] > before["ild_embedding@5"] + 0.05
    assert cal["calibration_kl@5"] < before["calibration_kl@5"] - 0.1


def test_errors():
    f = ba.NewsFeatures(np.zeros(3, int), np.zeros(3, int), np.zeros(3))
    beh = dict(offsets=np.array([0, 2]), candidates=np.array([1, 2]), histories=np.zeros((1, 1), int),
               history_row=np.array([0]))
    with pytest.raises(ValueError, match="unknown --rerank 'foo'"):
        rr.rerank("foo", 0.5, np.zeros(2), np.array([1, 2]), beh, f)
    with pytest.raises(ValueError, match=r"--rerank_lambda must be in \[0, 1\]"):
        rr.rerank("mmr", 1.5, np.zeros(2), np.array([1, 2]), beh, f)
    with pytest.raises(ValueError, match="--rerank=mmr needs news vectors"):
        rr.rerank("mmr", 0.5, np.zeros(2), np.array([1, 2]), beh, f)
