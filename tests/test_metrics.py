"""Metrics: golden cases from the official scorer (docs/MIND.md §4), tie rule, skipping, parity, leaderboard files."""
from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import scorer

# labels, scores, AUC, MRR, nDCG@5, nDCG@10 (docs/MIND.md §4, computed with the official scorer's functions)
GOLDEN = [
    ([0, 1, 0, 0, 1], [.3, .5, 0, 0, .2], 0.833333, 0.666667, 0.919721, 0.919721),
    ([1, 0, 0], [.9, .5, .1], 1.0, 1.0, 1.0, 1.0),
    ([0, 0, 1, 0], [.5, 1 / 3, .25, 1.0], 0.0, 0.25, 0.430677, 0.430677),
    ([1, 0, 1], [3, 2, 1], 0.5, 0.666667, 0.919721, 0.919721),
    ([0, 0, 0, 1, 1], [5, 4, 3, 2, 1], 0.0, 0.225, 0.501266, 0.501266),
    ([1, 0, 0], [1, 1, 1], 0.5, 0.333333, 0.5, 0.5),
]
KEYS = ("auc", "mrr", "ndcg5", "ndcg10")


@pytest.mark.parametrize("labels, scores, auc, mrr, ndcg5, ndcg10", GOLDEN)
def test_golden_table(labels, scores, auc, mrr, ndcg5, ndcg10):
    m = scorer.compute_metrics([scores], [labels])
    assert m["impressions"] == 1 and m["skipped_single_class"] == 0 and m["skipped_empty"] == 0
    for key, want in zip(KEYS, (auc, mrr, ndcg5, ndcg10)):
        assert m[key] == pytest.approx(want, abs=1e-6), key


def test_golden_table_as_one_batch_is_the_mean():
    m = scorer.compute_metrics([g[1] for g in GOLDEN], [g[0] for g in GOLDEN])
    assert m["impressions"] == len(GOLDEN)
    for j, key in enumerate(KEYS):
        assert m[key] == pytest.approx(np.mean([g[2 + j] for g in GOLDEN]), abs=1e-6)


def test_closed_forms():
    m = scorer.compute_metrics([[3, 2, 1]], [[1, 0, 1]])
    assert m["ndcg10"] == pytest.approx(1.5 / (1 + 1 / math.log2(3)), abs=1e-12)
    assert m["ndcg10"] == pytest.approx(0.9197207891481876, abs=1e-12)
    m = scorer.compute_metrics([[5, 4, 3, 2, 1]], [[0, 0, 0, 1, 1]])
    want = (1 / math.log2(5) + 1 / math.log2(6)) / (1 + 1 / math.log2(3))
    assert m["ndcg5"] == pytest.approx(want, abs=1e-12)
    assert m["ndcg5"] == pytest.approx(0.5012658353418871, abs=1e-12)
    assert m["mrr"] == pytest.approx((1 / 4 + 1 / 5) / 2, abs=1e-12)
    # nDCG@5 ignores a click below position 5, nDCG@10 does not
    m = scorer.compute_metrics([[7, 6, 5, 4, 3, 2, 1]], [[1, 0, 0, 0, 0, 0, 1]])
    assert m["ndcg5"] == pytest.approx(1 / (1 + 1 / math.log2(3)), abs=1e-12)
    assert m["ndcg10"] == pytest.approx((1 + 1 / math.log2(8)) / (1 + 1 / math.log2(3)), abs=1e-12)


def test_ties_follow_the_official_order():
    # all tied: the official order is [2, 1, 0], so the click at index 0 comes last
    m = scorer.compute_metrics([[1.0, 1.0, 1.0]], [[1, 0, 0]])
    assert m["mrr"] == pytest.approx(1 / 3) and m["auc"] == pytest.approx(0.5)
    # click at the highest tied index comes first
    m = scorer.compute_metrics([[1.0, 1.0, 1.0]], [[0, 0, 1]])
    assert m["mrr"] == pytest.approx(1.0) and m["ndcg5"] == pytest.approx(1.0) and m["auc"] == pytest.approx(0.5)
    # partial tie: AUC counts the tied (positive, negative) pair one half, like sklearn
    m = scorer.compute_metrics([[0.5, 0.5, 0.1, 0.9]], [[1, 0, 0, 0]])
    assert m["auc"] == pytest.approx(roc_auc_score([1, 0, 0, 0], [0.5, 0.5, 0.1, 0.9]))
    assert m["mrr"] == pytest.approx(1 / 3)  # order: 3, 1, 0, 2


def test_ranks_from_scores_tie_rule():
    assert scorer.ranks_from_scores([1.0, 1.0, 1.0]).tolist() == [3, 2, 1]
    assert scorer.ranks_from_scores([0.3, 0.5, 0.0, 0.0, 0.2]).tolist() == [2, 1, 5, 4, 3]
    assert scorer.ranks_from_scores([2.0, 1.0, 2.0, 1.0]).tolist() == [2, 4, 1, 3]
    assert scorer.ranks_from_scores([]).tolist() == []
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        s = rng.integers(0, 4, size=n).astype(np.float64)  # many ties
        ranks = scorer.ranks_from_scores(s)
        official = np.argsort(s, kind="stable")[::-1]  # argsort(score)[::-1], ties explicit
        expected = np.empty(n, dtype=np.int64)
        expected[official] = np.arange(1, n + 1)
        assert ranks.tolist() == expected.tolist()
        # the same rule as a lexsort: score descending, then index descending
        lex = np.lexsort((-np.arange(n), -s))
        assert np.array_equal(np.argsort(ranks), lex)
    # row-wise on a 2-D array
    two_d = scorer.ranks_from_scores([[1.0, 1.0], [0.0, 1.0]])
    assert two_d.tolist() == [[2, 1], [2, 1]]


def test_empty_and_single_class_are_skipped_and_counted():
    scores = [[], [0.1, 0.2], [0.3, 0.2, 0.1], [0.5], [0.9, 0.1], []]
    labels = [[], [0, 0], [1, 1, 1], [1], [1, 0], []]
    m = scorer.compute_metrics(scores, labels)
    assert m["impressions"] == 1
    assert m["skipped_empty"] == 2
    assert m["skipped_single_class"] == 3
    assert all(m[k] == pytest.approx(1.0) for k in KEYS)
    # nothing scorable: NaN metrics, counts still right
    m = scorer.compute_metrics([[0.1, 0.2]], [[0, 0]])
    assert m["impressions"] == 0 and m["skipped_single_class"] == 1 and all(math.isnan(m[k]) for k in KEYS)
    m = scorer.compute_metrics([], [])
    assert m["impressions"] == 0 and m["skipped_empty"] == 0


def test_flat_form_equals_list_form():
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 12, size=300)
    scores = [rng.normal(size=n) for n in sizes]
    labels = [rng.integers(0, 2, size=n) for n in sizes]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    flat = scorer.compute_metrics_flat(np.concatenate(scores), np.concatenate(labels), offsets)
    assert flat == scorer.compute_metrics(scores, labels)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="labels"):
        scorer.compute_metrics([[0.1, 0.2]], [[0, 2]])
    with pytest.raises(ValueError, match="impression #1"):
        scorer.compute_metrics([[0.1, 0.2], [0.3]], [[0, 1], [0, 1]])
    with pytest.raises(ValueError, match="NaN"):
        scorer.compute_metrics([[np.nan, 0.2]], [[0, 1]])
    with pytest.raises(ValueError, match="offsets"):
        scorer.compute_metrics_flat(np.zeros(3), np.zeros(3), np.array([0, 2]))


def _random_impressions(rng, count):
    scores, labels = [], []
    for _ in range(count):
        n = int(rng.integers(0, 60))
        if rng.random() < 0.3:
            s = rng.integers(0, 5, size=n).astype(np.float64)  # heavy ties
        else:
            s = rng.normal(size=n)
        p = rng.choice([0.02, 0.1, 0.5])
        scores.append(s)
        labels.append((rng.random(n) < p).astype(np.int64))
    return scores, labels


def test_auc_with_ties_equals_sklearn():
    rng = np.random.default_rng(2)
    scores, labels = _random_impressions(rng, 400)
    m = scorer.compute_metrics(scores, labels)
    aucs = [roc_auc_score(y, s) for s, y in zip(scores, labels) if len(y) and 0 < y.sum() < len(y)]
    assert m["impressions"] == len(aucs)
    assert m["auc"] == pytest.approx(np.mean(aucs), abs=1e-12)


def test_random_parity_with_official_style_scorer(tmp_path):
    rng = np.random.default_rng(3)
    scores, labels = _random_impressions(rng, 500)
    ids = [1000 + i for i in range(len(scores))]
    keep = [i for i, s in enumerate(scores) if len(s)]  # a prediction line needs at least one candidate
    ranks = [scorer.ranks_from_scores(scores[i]) for i in keep]
    scorer.write_truth(tmp_path / "truth.txt", [ids[i] for i in keep], [labels[i] for i in keep])
    scorer.write_prediction(tmp_path / "prediction.txt", [ids[i] for i in keep], ranks,
                          zip_path=tmp_path / "prediction.zip")
    official = scorer.official_style_score(tmp_path / "truth.txt", tmp_path / "prediction.zip")
    assert official == scorer.official_style_score(tmp_path / "truth.txt", tmp_path / "prediction.txt")
    # what a submission is scored on: score = 1/rank
    ours = scorer.compute_metrics([1.0 / r for r in ranks], [labels[i] for i in keep])
    assert ours["impressions"] == official["impressions"] > 300
    assert ours["skipped_single_class"] == official["skipped_single_class"] > 0
    for key in KEYS:
        assert ours[key] == pytest.approx(official[key], abs=1e-9), key
    # ranks keep the official order, so MRR and nDCG of the raw (tied) scores are the same too
    raw = scorer.compute_metrics([scores[i] for i in keep], [labels[i] for i in keep])
    for key in ("mrr", "ndcg5", "ndcg10"):
        assert raw[key] == pytest.approx(official[key], abs=1e-9), key


def test_official_style_scorer_counts_and_checks_ids(tmp_path):
    scorer.write_truth(tmp_path / "t.txt", [1, 2, 3], [[1, 0], [1, 1], []])
    (tmp_path / "p.txt").write_text("1 [1,2]\n2 [2,1]\n3 []\n")
    m = scorer.official_style_score(tmp_path / "t.txt", tmp_path / "p.txt")
    assert m["impressions"] == 1 and m["skipped_single_class"] == 1 and m["skipped_empty"] == 1
    assert m["auc"] == 1.0
    (tmp_path / "q.txt").write_text("1 [1,2]\n3 [2,1]\n2 []\n")
    with pytest.raises(ValueError, match="inconsistent impression id"):
        scorer.official_style_score(tmp_path / "t.txt", tmp_path / "q.txt")


def test_large_input_runs():
    rng = np.random.default_rng(4)
    sizes = rng.integers(2, 300, size=5400)
    sizes = sizes[np.cumsum(sizes) <= 200_000]
    sizes = np.append(sizes, 200_000 - sizes.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    labels = (rng.random(offsets[-1]) < 0.05).astype(np.int64)
    m = scorer.compute_metrics_flat(rng.normal(size=offsets[-1]), labels, offsets)
    assert m["impressions"] + m["skipped_single_class"] + m["skipped_empty"] == len(sizes)
    assert 0.4 < m["auc"] < 0.6


def test_criterion_value():
    m = {"auc": 0.7, "mrr": 0.3, "ndcg5": 0.35, "ndcg10": 0.4}
    assert scorer.criterion_value(m, "auc") == 0.7
    assert scorer.criterion_value(m, "ndcg10") == 0.4
    assert scorer.criterion_value(m, "avg") == pytest.approx((0.7 + 0.3 + (0.35 + 0.4) / 2) / 3)
    with pytest.raises(ValueError, match="unknown criterion"):
        scorer.criterion_value(m, "loss")


def test_prediction_line_format():
    assert scorer.format_prediction_line(17, [2, 1, 3]) == "17 [2,1,3]"
    assert scorer.format_prediction_line(5, np.array([1], dtype=np.int32)) == "5 [1]"


def test_write_prediction_validates(tmp_path):
    out = tmp_path / "prediction.txt"
    with pytest.raises(ValueError, match="impression 2: .*not a permutation"):
        scorer.write_prediction(out, [1, 2, 3], [[1, 2], [1, 1], [1, 3]])
    with pytest.raises(ValueError, match="impression 3: .*not a permutation"):
        scorer.write_prediction(out, [1, 2, 3], [[1, 2], [2, 1], [1, 3]])
    with pytest.raises(ValueError, match="impression 1 appears twice"):
        scorer.write_prediction(out, [1, 2, 1], [[1, 2], [2, 1], [1]])
    with pytest.raises(ValueError, match="2 impression ids but 3 rank lists"):
        scorer.write_prediction(out, [1, 2], [[1], [1], [1]])
    with pytest.raises(ValueError, match="impression 9: empty"):
        scorer.write_prediction(out, [9], [[]])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_write_prediction_zip_layout_and_round_trip(tmp_path):
    ids = [7, 3, 12]
    ranks = [np.array([2, 1, 3]), [1], [4, 3, 2, 1]]
    txt, zpath = tmp_path / "out" / "ranking.txt", tmp_path / "out" / "prediction.zip"
    scorer.write_prediction(txt, ids, ranks, zip_path=zpath)
    text = txt.read_text()
    assert text == "7 [2,1,3]\n3 [1]\n12 [4,3,2,1]\n"
    with zipfile.ZipFile(zpath) as z:
        assert z.namelist() == ["prediction.txt"]  # at the zip's root
        assert z.read("prediction.txt").decode() == text
    for path in (txt, zpath):
        got_ids, got_ranks = scorer.read_prediction(path)
        assert got_ids == ids
        assert got_ranks == [[2, 1, 3], [1], [4, 3, 2, 1]]
    # overwriting is atomic and leaves only the final files
    scorer.write_prediction(txt, [1], [[1]], zip_path=zpath)
    assert scorer.read_prediction(zpath) == ([1], [[1]])
    assert sorted(p.name for p in txt.parent.iterdir()) == ["prediction.zip", "ranking.txt"]


def test_truth_round_trip(tmp_path):
    scorer.write_truth(tmp_path / "truth.txt", [1, 2], [np.array([0, 1, 0]), [1]])
    assert (tmp_path / "truth.txt").read_text() == "1 [0,1,0]\n2 [1]\n"
    assert scorer.read_truth(tmp_path / "truth.txt") == ([1, 2], [[0, 1, 0], [1]])
    with pytest.raises(ValueError, match="0 or 1"):
        scorer.write_truth(tmp_path / "bad.txt", [1], [[0, 2]])
