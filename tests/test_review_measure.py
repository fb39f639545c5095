"""Issue 22 §1.8: `--train_fraction` chooses one seeded share of the train impressions, and pretraining, training
and the popularity tie-break / baseline read the train labels of that share only (`dataset.train_share`)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import evaluation
import pretraining as P
from dataset import TrainDataset, train_share


def toy_train(n: int = 60) -> dict:
    """n impressions; impression i shows news 2i+1 (clicked) and 2i+2 (not), with an empty history, so the clicked
    news names the impression it came from. News 1..2n; user i+1."""
    return {"labels": np.tile(np.array([1, 0], dtype=np.int8), n), "offsets": np.arange(0, 2 * n + 1, 2),
            "candidates": np.arange(1, 2 * n + 1), "user": np.arange(1, n + 1),
            "history_row": np.zeros(n, dtype=np.int64), "histories": np.zeros((1, 4), dtype=np.int64), "path": "x"}


class ToyCorpus:
    splits = ("train",)

    def __init__(self, train):
        self.train = train

    def behaviors(self, split):
        assert split == "train"
        return self.train


def pretrain_config(fraction: float, seed: int) -> SimpleNamespace:
    return SimpleNamespace(train_fraction=fraction, seed=seed, max_history_num=4, pretrain_eval_histories=True)


@pytest.mark.parametrize("fraction,seed", [(0.1, 0), (0.1, 1), (0.35, 3), (1.0, 0)])
def test_pretraining_reads_the_train_impressions_training_uses(fraction, seed):
    beh = toy_train()
    trained = set(TrainDataset(beh, 1, seed=seed, fraction=fraction).sample_impression.tolist())
    seqs = P.pretraining_sequences(pretrain_config(fraction, seed), ToyCorpus(beh))
    clicked = seqs.news[seqs.news > 0]
    read = set(((clicked - 1) // 2).tolist())  # news 2i+1 -> impression i
    assert (clicked % 2 == 1).all()  # only clicked candidates, never a negative
    assert read == trained
    assert len(read) == max(1, round(fraction * 60))
    assert seqs.counts["train impressions"] == len(read)


def test_train_share_is_the_choice_training_makes():
    for fraction, seed in ((0.1, 0), (0.5, 7), (1.0, 2)):
        share = train_share(60, fraction, seed)
        assert share.dtype == bool and share.shape == (60,)
        assert set(np.flatnonzero(share)) == set(TrainDataset(toy_train(), 1, seed=seed,
                                                              fraction=fraction).sample_impression.tolist())


def restricted(beh: dict, keep: np.ndarray) -> dict:
    """The behaviour arrays of the impressions `keep` only (a reference written out independently)."""
    offsets = beh["offsets"]
    idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in keep])
    return {"candidates": beh["candidates"][idx], "labels": beh["labels"][idx],
            "offsets": np.concatenate([[0], np.cumsum(np.diff(offsets)[keep])])}


def popular_train(n: int = 60) -> dict:
    """Impression i shows news 1 and 2 plus news 3 + i % 5; the click alternates, so the share decides which of
    news 1 / 2 / 3..7 is most clicked."""
    rng = np.random.default_rng(5)
    cands, labels = [], []
    for i in range(n):
        c = [1, 2, 3 + i % 5]
        lab = [0, 0, 0]
        lab[rng.integers(3)] = 1
        cands += c
        labels += lab
    return {"candidates": np.array(cands), "labels": np.array(labels, dtype=np.int8),
            "offsets": np.arange(0, 3 * n + 1, 3), "user": np.arange(1, n + 1), "path": "x"}


def test_popularity_counts_only_the_share_training_reads():
    beh, news_num = popular_train(), 8
    dev = {"candidates": np.array([1, 2, 3, 4, 5, 6, 7]), "labels": np.array([1, 0, 0, 1, 0, 0, 1], dtype=np.int8),
           "offsets": np.array([0, 3, 7])}
    differs = False
    for seed in range(4):
        cfg = SimpleNamespace(train_fraction=0.2, seed=seed, tie_break="popularity")
        kept = np.sort(np.unique(TrainDataset(beh, 1, seed=seed, fraction=0.2).sample_impression))
        ref = restricted(beh, kept)
        want_rank = evaluation.popularity_rank(ref, news_num)
        assert np.array_equal(evaluation.tie_rank_for(cfg, beh, news_num), want_rank)
        got = evaluation.popularity_for(cfg, beh, dev, news_num)
        want = evaluation.popularity_per_impression(ref, dev, news_num)
        for key in ("auc", "mrr", "ndcg5", "ndcg10"):
            assert np.allclose(got[key], want[key])
        differs |= not np.array_equal(want_rank, evaluation.popularity_rank(beh, news_num))
    assert differs  # the share changes the order here, so the test can see which counts were used
    full = SimpleNamespace(train_fraction=1.0, seed=0, tie_break="popularity")
    assert np.array_equal(evaluation.tie_rank_for(full, beh, news_num), evaluation.popularity_rank(beh, news_num))
