"""beyond_accuracy.py: every metric on toy cases computed by hand (and ebrec's worked examples where the definition is
the same), the skip and count rules, the flags' errors, and the records through --mode=dev/test, compare and
aggregate."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import beyond_accuracy as ba
from common import copy_demo_without_test_labels, needs_glove50, train_two_seeds
from config import Config
from main import main

A, B, C = (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)  # ebrec's toy vectors: d(a,b) = 1, d(a,c) = d(b,c) = 1 - 1/sqrt(2)
D_AC = 1 - 1 / math.sqrt(2)


def split(cands, hist, labels=None, users=None, ranks=None):
    """A behaviors dict of impressions with the given candidate lists (ranked in the order given unless `ranks`)
    and one history row each."""
    sizes = [len(c) for c in cands]
    width = max([len(h) for h in hist] + [1])
    return dict(offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                candidates=np.concatenate(cands).astype(np.int64),
                labels=(np.concatenate(labels) if labels is not None else np.full(sum(sizes), -1)).astype(np.int8),
                histories=np.array([list(h) + [0] * (width - len(h)) for h in hist], dtype=np.int64),
                history_row=np.arange(len(cands)), user=np.asarray(users if users is not None else
                                                                    np.arange(1, len(cands) + 1)),
                impression_ids=np.arange(100, 100 + len(cands)),
                ranks=np.concatenate(ranks) if ranks is not None else np.concatenate([np.arange(1, n + 1)
                                                                                      for n in sizes]))


def features(n=8, category=None, subcategory=None, clicks=None, vectors=None, sentiment=None):
    cat = np.asarray(category if category is not None else [0] + [1] * (n - 1))
    return ba.NewsFeatures(cat, np.asarray(subcategory if subcategory is not None else cat),
                           np.asarray(clicks if clicks is not None else np.zeros(len(cat)), dtype=float),
                           None if vectors is None else ba.unit_rows(np.asarray(vectors, dtype=float)),
                           None if sentiment is None else np.asarray(sentiment, dtype=float))


def run(beh, f, ks, names):
    return ba.compute(beh["ranks"], beh, f, ks, names)


# -- per-impression metrics -----------------------------------------------------------------------------------

def test_top_k_follows_the_ranks_and_leaves_short_impressions_padded():
    beh = split([[5, 6, 7], [8]], [[1], [1]], ranks=[[3, 1, 2], [1]])
    top = ba.top_k(beh["ranks"], beh["candidates"], beh["offsets"], 2)
    np.testing.assert_array_equal(top, [[6, 7], [8, -1]])


def test_ild_by_category_counts_pairs_of_different_categories_and_skips_news_without_one():
    # categories of news 1..4: 1, 1, 2, none
    f = features(category=[0, 1, 1, 2, 0])
    beh = split([[1, 2, 3], [1, 2, 3, 4], [1, 4]], [[1], [1], [1]])
    res = run(beh, f, [4], ["ild_category"])
    v = res.values["ild_category@4"]
    assert v[0] == pytest.approx(4 / 6) and v[1] == pytest.approx(4 / 6)  # news 4 left out, not a "different" one
    assert np.isnan(v[2])  # one news with a category: no pair
    assert res.counts["ild_category@4"] == {"scored": 2, "skipped": 1, "missing_news": 2}
    assert res.means["ild_category@4"] == pytest.approx(4 / 6)


def test_ild_by_embedding_is_ebrecs_mean_pairwise_cosine_distance():
    f = features(n=5, vectors=[(0, 0), A, B, C, (0, 0)])
    beh = split([[1, 2, 3], [1, 2, 3, 4]], [[1], [1]])
    res = run(beh, f, [4], ["ild_embedding"])
    assert res.values["ild_embedding@4"] == pytest.approx([0.528595, 0.528595], abs=1e-6)  # ebrec's worked example
    assert res.counts["ild_embedding@4"]["missing_news"] == 1  # news 4 has no text


def test_novelty_is_the_mean_self_information_of_the_smoothed_click_share():
    # clicks 3, 1, 1 over 3 news: p = (c + 1) / (5 + 3) = 0.5, 0.25, 0.25 -> ebrec's worked example (0.5, 0.25) -> 1.5
    f = features(clicks=[0, 3, 1, 1], category=[0, 1, 1, 1])
    beh = split([[1, 2], [2, 3]], [[1], []])
    res = run(beh, f, [2], ["novelty", "popularity_bias"])
    np.testing.assert_allclose(res.values["novelty@2"], [1.5, 2.0])
    # history {news 1} has novelty 1 bit: the top-k is 0.5 bit less popular than it; an empty history is skipped
    assert res.values["popularity_bias@2"][0] == pytest.approx(1.0 - 1.5)
    assert np.isnan(res.values["popularity_bias@2"][1])
    assert res.counts["popularity_bias@2"]["skipped"] == 1


def test_calibration_is_stecks_kl_with_alpha_001_and_jensen_shannon_in_bits():
    # history categories (1, 2): p = (.5, .5); top-2 both category 1: q = (1, 0)
    f = features(category=[0, 1, 2, 1, 1])
    beh = split([[3, 4, 2]], [[1, 2]])
    res = run(beh, f, [2, 3], ["calibration_kl", "calibration_js", "category_bias"])
    assert res.values["calibration_kl@2"][0] == pytest.approx(1.958518, abs=1e-6)  # Steck's worked example
    m = np.array([0.75, 0.25])
    js = (0.5 * np.log2(0.5 / m[0]) + 0.5 * np.log2(0.5 / m[1]) + np.log2(1 / m[0])) / 2
    assert res.values["calibration_js@2"][0] == pytest.approx(js)
    assert res.values["category_bias@2"][0] == pytest.approx(1.0 - 0.5)  # main category 1: 100% of the top-k, 50%
    q = np.array([2 / 3, 1 / 3])  # top-3
    qs = 0.99 * q + 0.01 * np.array([0.5, 0.5])
    assert res.values["calibration_kl@3"][0] == pytest.approx((0.5 * np.log(0.5 / qs)).sum())


def test_calibration_direct_functions():
    p, q = np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]])
    assert ba.kl_calibration(p, q)[0] == pytest.approx(1.958518, abs=1e-6)
    assert ba.kl_calibration(p, p)[0] == 0 and ba.js_divergence(p, p)[0] == 0
    assert ba.js_divergence(np.array([[1.0, 0]]), np.array([[0, 1.0]]))[0] == pytest.approx(1.0)  # disjoint: 1 bit


def test_unexpectedness_is_ebrecs_serendipity_and_serendipity_weights_it_by_the_clicks():
    f = features(n=5, vectors=[(0, 0), A, B, C, A])
    beh = split([[1, 4], [1, 4], [1]], [[2, 3], [2, 3], [2, 3]], labels=[[1, 0], [0, 0], [0]])
    res = run(beh, f, [2], ["unexpectedness", "serendipity"])
    u = (1 + D_AC) / 2  # ebrec: R = {a}, H = {b, c} -> 0.646447
    assert u == pytest.approx(0.646447, abs=1e-6)
    np.testing.assert_allclose(res.values["unexpectedness@2"], [u, u, u])
    np.testing.assert_allclose(res.values["serendipity@2"], [u / 2, 0, 0])  # clicked news 1 of the two shown


def test_serendipity_needs_labels_and_the_rest_do_not():
    f = features(n=5, vectors=[(0, 0), A, B, C, A])
    beh = split([[1, 4]], [[2, 3]])  # unlabelled (test split)
    res = run(beh, f, [2], ["unexpectedness", "serendipity"])
    assert "serendipity@2" not in res.values and res.info["not_computed"] == {"serendipity": "needs labels"}
    assert "unexpectedness@2" in res.values


def test_sentiment_mean_and_spread_leave_out_news_without_text():
    f = features(sentiment=[np.nan, 0.9, 0.5, 0.1, np.nan])
    beh = split([[1, 2, 3, 4], [4, 1]], [[1], [1]])
    res = run(beh, f, [4], ["sentiment", "sentiment_spread"])
    assert res.values["sentiment@4"][0] == pytest.approx(0.5)  # ebrec's worked example (.9, .5, .1)
    assert res.values["sentiment_spread@4"][0] == pytest.approx(math.sqrt(0.32 / 3))
    assert res.values["sentiment@4"][1] == pytest.approx(0.9) and np.isnan(res.values["sentiment_spread@4"][1])
    assert res.counts["sentiment@4"]["missing_news"] == 2


# -- over all impressions -------------------------------------------------------------------------------------

def test_coverage_is_ebrecs_and_gini_of_exposure():
    beh = split([[1, 2, 4], [2, 3, 5]], [[1], [1]])
    res = run(beh, features(), [2], ["coverage", "gini"])
    assert res.means["coverage@2"] == pytest.approx(0.6)  # ebrec: [[1,2],[2,3]] of C = {1..5} -> 3/5
    assert res.means["gini@2"] == pytest.approx(ba.gini([1, 2, 1, 0, 0]))
    # by hand: ((2*3 - 4 - 1) * 1 + (2*4 - 4 - 1) * 3) / (4 * 4) = 10 / 16 (no n/(n-1) correction)
    assert ba.gini([0, 0, 1, 3]) == pytest.approx(0.625)
    assert ba.gini([2, 2, 2]) == 0 and np.isnan(ba.gini([0, 0]))


def test_personalization_over_pairs_of_different_users():
    beh = split([[1, 2], [2, 3], [1, 2]], [[1], [1], [1]], users=[7, 8, 7])
    res = run(beh, features(), [2], ["personalization"])
    # pairs (0,1) and (1,2) overlap 1 of 2; (0,2) is one user's two impressions: left out
    assert res.means["personalization@2"] == pytest.approx(0.5)
    assert res.counts["personalization@2"]["scored"] == 2
    short = split([[1, 2], [2]], [[1], [1]], users=[7, 8])  # lists of 2 and 1 news: cosine 1 / sqrt(2 * 1)
    assert run(short, features(), [2], ["personalization"]).means["personalization@2"] == pytest.approx(
        1 - 1 / math.sqrt(2))
    value, pairs = ba.personalization(np.arange(1, 301).reshape(100, 3), None, pairs=50)  # sampled, seeded
    assert value == 1.0 and pairs == 50


def test_personalization_keeps_users_unknown_to_train_apart(tmp_path):
    """Every dev user unknown to train has user index 0; the behaviors' `user_key` (a hash of the UserID) tells
    them apart, so two impressions of one unknown user are not a pair of different users, and two unknown users are."""
    import MIND_corpus as mc
    import pandas as pd

    root = tmp_path / "dev"
    root.mkdir()
    lines = ["1\tU9\t11/15/2019 8:00:00 AM\tN1\tN1-1 N2-0",
             "2\tU9\t11/15/2019 9:00:00 AM\tN1\tN1-0 N2-1",   # the same unknown user again: same top-2
             "3\tU8\t11/15/2019 9:00:00 AM\tN1\tN1-1 N3-0"]   # another unknown user
    (root / "behaviors.tsv").write_text("\n".join(lines) + "\n")
    beh, _ = mc.build_behaviors(root / "behaviors.tsv", "dev", pd.Index(["N1", "N2", "N3"]), pd.Index(["U1"]), 5)
    assert list(beh["user"]) == [0, 0, 0]
    keys = beh["user_key"]
    assert keys[0] == keys[1] != keys[2]
    beh = {**beh, "ranks": np.concatenate([np.arange(1, 3)] * 3)}  # each impression in its listed order
    res = run(beh, features(n=4), [2], ["personalization"])
    # pairs of different users: (0, 2) and (1, 2), each sharing N1 of 2 news; (0, 1) is one user: left out
    assert res.counts["personalization@2"]["scored"] == 2
    assert res.means["personalization@2"] == pytest.approx(0.5)


# -- flags and bad input --------------------------------------------------------------------------------------

def test_k_and_metric_names_errors_name_the_flag():
    beh = split([[1, 2, 3], [1, 2]], [[1], [1]])
    with pytest.raises(ValueError, match=r"--beyond_k 4: must be between 1 and 3"):
        run(beh, features(), [2, 4], ["novelty"])
    with pytest.raises(ValueError, match="--beyond_metrics: unknown metric 'ild'"):
        ba.parse_metric_names("ild,novelty")
    assert ba.parse_metric_names("novelty,ild_category") == ["ild_category", "novelty"]
    assert ba.parse_metric_names("none") == [] and ba.parse_metric_names("all") == list(ba.METRICS)
    for argv, message in ((["--beyond_k=0"], "--beyond_k must all be >= 1"),
                          (["--beyond_metrics=foo"], "--beyond_metrics unknown metric 'foo'"),
                          (["--rerank_lambda=2"], r"--rerank_lambda must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            Config.from_args(["--mode=dev", "--dev_model_path=x", *argv])
    with pytest.raises(ValueError, match="--rerank applies to --mode=dev and --mode=test"):
        Config.from_args(["--mode=train", "--rerank=mmr"])


def test_news_without_category_or_text_is_counted_not_zero():
    f = features(n=4, category=[0, 0, 0, 0], vectors=[(0, 0)] * 4, sentiment=[np.nan] * 4)
    beh = split([[1, 2, 3]], [[1, 2]])
    res = run(beh, f, [3], ["ild_category", "ild_embedding", "calibration_kl", "sentiment"])
    for key in ("ild_category@3", "ild_embedding@3", "calibration_kl@3", "sentiment@3"):
        assert np.isnan(res.values[key][0]) and res.counts[key]["skipped"] == 1, key
        assert res.counts[key]["missing_news"] == 3, key
    assert "| ild_category | nan | 1 | 3 |" in ba.format_table(res)


def test_vader_and_glove_features():
    s = ba.vader_sentiment(["", "a wonderful happy day", "a terrible horrible crash", "  "], np.array([1, 2, 3]))
    assert np.isnan(s[0]) and s[1] > 0.5 and s[2] < -0.5 and np.isnan(s[3])


@needs_glove50
def test_glove_title_vectors_average_the_found_words_only():
    from glove_vectors import lookup_found

    vocab = ["<PAD>", "<UNK>", "good", "morning", "zzqxwvv"]
    table, found = lookup_found(vocab)
    assert found.tolist() == [False, False, True, True, False]
    titles = np.array([[0, 0, 0], [2, 3, 1], [4, 1, 0], [2, 0, 0]])
    v = ba.glove_title_vectors(titles, vocab)
    want = (table[2] + table[3]) / 2
    np.testing.assert_allclose(v[1], want / np.linalg.norm(want), atol=1e-6)
    assert not v[0].any() and not v[2].any()  # padding; a title with no word found: no vector
    np.testing.assert_allclose(v[3], table[2] / np.linalg.norm(table[2]), atol=1e-6)


def test_records_round_trip(tmp_path):
    f = features(n=5, vectors=[(0, 0), A, B, C, A])
    beh = split([[1, 4], [2, 3]], [[2, 3], []], labels=[[1, 0], [0, 1]])
    res = run(beh, f, [2], ["ild_embedding", "popularity_bias", "serendipity"])
    path = ba.write_records(tmp_path, res, beh, {"split": "dev", "model": "X"})
    back = ba.load_records(path)
    np.testing.assert_array_equal(back["impression_id"], [100, 101])
    np.testing.assert_array_equal(back["clicks"], [1, 1])
    assert set(back["metrics"]) == set(res.values)
    for key, v in res.values.items():
        np.testing.assert_array_equal(back["metrics"][key], v)
    assert back["meta"]["model"] == "X" and back["meta"]["means"]["ild_embedding@2"] == res.means["ild_embedding@2"]
    (tmp_path / "bad.npz").write_bytes(b"no")
    with pytest.raises(ValueError, match="not a per_impression_beyond.npz file"):
        ba.load_records(tmp_path / "bad.npz")


# -- end to end: --mode=dev/test, compare, aggregate ----------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    return train_two_seeds(tmp_path_factory.mktemp("beyond"))


@needs_glove50
def test_dev_mode_prints_writes_and_compare_aggregate_cover_the_metrics(two_runs, capsys):
    tmp, common, ckpts = two_runs
    for ckpt in ckpts:
        report = main(["--mode=dev", f"--dev_model_path={ckpt}", *common])
    out = capsys.readouterr().out
    assert "beyond accuracy, dev" in out and "| ild_category |" in out and "| serendipity |" in out
    saved = json.loads((ckpts[1].parent / "dev" / "metrics.json").read_text())
    rec = ba.load_records(report["per_impression_beyond"])
    assert len(rec["impression_id"]) == saved["beyond"]["impressions"] == 80  # every impression, labels or not
    for key, mean in saved["beyond"]["means"].items():
        if key in rec["metrics"]:
            assert np.nanmean(rec["metrics"][key]) == pytest.approx(mean, nan_ok=True)
    cmp = main(["--mode=compare", "--runs", str(ckpts[0].parent), str(ckpts[1].parent), "--resamples=200", *common])
    assert "Beyond accuracy" in cmp["markdown"] and "| ild_embedding@10 |" in cmp["markdown"]
    rows = cmp["beyond_tsv"].splitlines()
    assert len(rows) == 1 + len([k for k in rec["metrics"]])  # one pair, every per-impression metric
    agg = main(["--mode=aggregate", *common])
    assert "Beyond accuracy" in agg["markdown"] and "| demo | MHSA-MHSA | 2 | dev novelty@5 |" in agg["markdown"]


@needs_glove50
def test_rerank_writes_its_own_folder_and_lambda_0_keeps_the_ranking(two_runs):
    tmp, common, ckpts = two_runs
    plain = main(["--mode=dev", f"--dev_model_path={ckpts[0]}", "--beyond_metrics=none", *common])
    same = main(["--mode=dev", f"--dev_model_path={ckpts[0]}", "--rerank=mmr", "--rerank_lambda=0",
                 "--beyond_metrics=none", *common])
    assert Path(same["ranking"]).parent.name == "dev-mmr0"
    assert Path(same["ranking"]).read_text() == Path(plain["ranking"]).read_text()
    diverse = main(["--mode=dev", f"--dev_model_path={ckpts[0]}", "--rerank=mmr", "--rerank_lambda=1",
                    "--beyond_metrics=ild_embedding", "--beyond_k=5", *common])
    base = main(["--mode=dev", f"--dev_model_path={ckpts[0]}", "--beyond_metrics=ild_embedding", "--beyond_k=5",
                 *common])
    assert diverse["beyond"]["means"]["ild_embedding@5"] > base["beyond"]["means"]["ild_embedding@5"]
    assert diverse["metrics"]["rerank"] == "mmr"


def test_unlabelled_test_split_gets_every_metric_that_needs_no_label(two_runs, tmp_path, capsys):
    tmp, common, ckpts = two_runs
    data = copy_demo_without_test_labels(tmp / "data", tmp_path / "data")
    report = main(["--mode=test", f"--test_model_path={ckpts[0]}", f"--data_dir={data}", "--no-progress",
                   "--beyond_metrics=novelty,serendipity,coverage"])
    assert report["beyond"]["not_computed"] == {"serendipity": "needs labels"}
    assert set(report["beyond"]["means"]) == {"novelty@5", "novelty@10", "coverage@5", "coverage@10"}
    assert Path(report["per_impression_beyond"]).is_file()


@needs_glove50
def test_tradeoff_sweep_writes_points_and_picture(two_runs):
    import importlib.util

    tmp, common, ckpts = two_runs
    spec = importlib.util.spec_from_file_location("tradeoff", Path(__file__).resolve().parents[1] / "bench" /
                                                  "tradeoff.py")
    tradeoff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tradeoff)
    data = next(a for a in common if a.startswith("--data_dir"))
    out = tmp / "tradeoff"
    result = tradeoff.main(["--checkpoint", str(ckpts[1]), "--lambdas", "0,1", f"--output={out}", f"--extra={data}"])
    rows = (out / "tradeoff.tsv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("method\tlambda\tauc")
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    plain = main(["--mode=dev", f"--dev_model_path={ckpts[1]}", "--beyond_metrics=ild_embedding",
                  "--beyond_k=10", *common])
    first = result["rows"][0]  # mmr at lambda 0: the model's own ranking
    assert first["auc"] == pytest.approx(plain["metrics"]["auc"], abs=1e-12)
    assert first["ild_embedding@10"] == pytest.approx(plain["beyond"]["means"]["ild_embedding@10"], abs=1e-12)
    with pytest.raises(SystemExit, match="already holds a trade-off"):
        tradeoff.main(["--checkpoint", str(ckpts[1]), "--lambdas", "0", f"--output={out}", f"--extra={data}"])


class _Corpus:
    """What news_features reads of a corpus."""

    def __init__(self, sentiment=None):
        self.news = {"category": np.array([0, 1, 2, 1]), "subcategory": np.array([0, 1, 1, 2]),
                     "title": np.zeros((4, 2), dtype=np.int64)}
        if sentiment is not None:
            self.news["sentiment"] = np.asarray(sentiment)

        class Meta:
            category_names = ["<PAD>", "news", ""]  # category 2 has an empty name: no category
            subcategory_names = ["<PAD>", "a", "b"]
            vocab = ["<PAD>", "<UNK>"]
        self.meta = Meta()

    def news_texts(self, column):
        return ["", "a wonderful day", "", "an awful crash"]


def test_news_features_sources_and_errors():
    corpus = _Corpus()
    f = ba.news_features(corpus, np.zeros(4), ["ild_category", "ild_embedding", "sentiment"], embedding="model",
                         model_vectors=np.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(f.category, [0, 1, 0, 1])  # the empty category name counts as none
    assert not f.embedding[0].any() and np.linalg.norm(f.embedding[1]) == pytest.approx(1)  # row 0: no news
    assert np.isnan(f.sentiment[[0, 2]]).all() and f.sentiment[1] > 0 > f.sentiment[3]
    assert f.sentiment_source.startswith("VADER") and f.embedding_source == "the model's news vectors"
    with pytest.raises(ValueError, match="--beyond_embedding=model: this model has no table of news vectors"):
        ba.news_features(corpus, np.zeros(4), ["ild_embedding"], embedding="model", model_vectors=np.zeros((0, 2)))
    own = ba.news_features(_Corpus(sentiment=[0, 0.5, -0.5, 0.25]), np.zeros(4), ["sentiment"])
    assert own.sentiment_source == "the dataset's sentiment column" and own.sentiment[1] == 0.5


def test_missing_vader_is_an_error_naming_the_fix(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ImportError, match="pip install -r requirements.txt"):
        ba.vader_sentiment(["x"], np.array([0]))


@needs_glove50
def test_model_embedding_option_end_to_end(two_runs):
    tmp, common, ckpts = two_runs
    report = main(["--mode=dev", f"--dev_model_path={ckpts[0]}", "--beyond_embedding=model",
                   "--beyond_metrics=ild_embedding", *common])
    assert report["beyond"]["embedding"] == "the model's news vectors"
    assert 0 <= report["beyond"]["means"]["ild_embedding@5"] <= 2


def test_metrics_without_their_features_are_reported_not_computed(monkeypatch):
    import glove_vectors

    def unavailable(*a, **k):
        raise glove_vectors.GloveUnavailable("no GloVe vectors for dimension 50 (not installed)")
    monkeypatch.setattr(glove_vectors, "lookup_found", unavailable)
    f = ba.news_features(_Corpus(), np.zeros(4), ["ild_embedding", "novelty"])
    assert f.embedding is None and "not installed" in f.embedding_source
    beh = split([[1, 2, 3]], [[1]])
    res = run(beh, f, [2], ["ild_embedding", "novelty", "sentiment"])
    assert set(res.means) == {"novelty@2"}
    assert res.info["not_computed"]["ild_embedding"].startswith("no news vectors: none (no GloVe vectors")
    assert res.info["not_computed"]["sentiment"] == "no sentiment of the news"
    assert "not computed: ild_embedding (no news vectors" in ba.format_table(res)
