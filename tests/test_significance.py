"""Paired significance tests and intervals (significance.py, --mode=compare, the seed intervals of --mode=aggregate)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from common import copy_demo_without_test_labels, train_two_seeds
from scipy import stats

import run_records
import scorer
import significance
from main import main


def impressions(n: int, seed: int = 0):
    """A generated labelled split: flat scores of a model, labels and offsets, every impression two-class."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 12, n)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    labels = np.zeros(offsets[-1], dtype=np.int64)
    for i in range(n):  # 1 .. size-2 clicks among all but the last candidate, which stays a non-click
        labels[offsets[i] + rng.choice(sizes[i] - 1, size=rng.integers(1, sizes[i] - 1), replace=False)] = 1
    return labels, offsets, rng


def record(tmp_path, name, scores, labels, offsets, ids=None, split="dev", **meta) -> Path:
    per = scorer.per_impression_metrics(scores, labels, offsets)
    ids = np.arange(100, 100 + len(offsets) - 1) if ids is None else ids
    return significance.write_per_impression(tmp_path / f"{name}.npz", per, ids, offsets, labels,
                                             {"model": name, "split": split, "dataset": "demo", **meta})


# -- the statistics --------------------------------------------------------------------------------------------

def test_identical_runs_give_zero_difference_and_p_one():
    a = np.random.default_rng(0).random((300, 4))
    res = significance.paired_tests(a, a.copy(), resamples=500, seed=3)
    assert (res["diff"] == 0).all() and (res["ci_low"] == 0).all() and (res["ci_high"] == 0).all()
    assert (res["p_perm"] == 1).all() and (res["p_t"] == 1).all() and (res["t"] == 0).all()


def flips_direct(d, resamples, seed):
    """The documented sign-flip scheme written out in one go: bits of raw 64-bit words, W words per resample."""
    rng, _ = significance.generators(seed)
    n = len(d)
    words = -(-n // 64)
    bits = np.unpackbits(rng.bit_generator.random_raw(resamples * words).view(np.uint8)).reshape(resamples, -1)[:, :n]
    signs = np.where(bits == 1, 1.0, -1.0)
    return signs @ d / n


def boot_direct(d, resamples, seed):
    _, rng = significance.generators(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    return np.stack([d[row].mean(0) for row in idx])


@pytest.mark.parametrize("shift", [0.02, -0.02])
def test_planted_difference_is_found_with_its_sign_and_the_direct_p_value(tmp_path, shift):
    labels, offsets, rng = impressions(400)
    base = rng.normal(size=offsets[-1])
    # B sees the clicks better (or worse): its clicked candidates get a boost (a penalty).
    better = base + np.sign(shift) * 0.8 * labels
    a, b = record(tmp_path, "A", base, labels, offsets), record(tmp_path, "B", better, labels, offsets)
    runs = significance.load_runs([str(a), str(b)], "dev")
    rows = significance.compare_runs(runs, resamples=2000, seed=7)
    assert [r["metric"] for r in rows] == list(scorer.METRIC_KEYS)
    va, vb = significance.align(runs)
    d = vb - va
    for col, r in enumerate(rows):
        assert np.sign(r["diff"]) == np.sign(shift) and r["p_perm"] < 0.01
        assert r["diff"] == pytest.approx(d[:, col].mean(), abs=1e-15)
        assert r["mean_b"] - r["mean_a"] == pytest.approx(r["diff"], abs=1e-12)
        assert r["ci_low"] < r["diff"] < r["ci_high"] and np.sign(r["ci_low"]) == np.sign(r["ci_high"])
    # the same numbers computed directly from the documented resampling schemes
    flips = flips_direct(d, 2000, 7)
    p_direct = (1 + (np.abs(flips) >= np.abs(d.mean(0)) - 1e-12).sum(0)) / 2001
    boot = boot_direct(d, 2000, 7)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    for col, r in enumerate(rows):
        assert r["p_perm"] == p_direct[col]
        assert r["ci_low"] == pytest.approx(low[col], abs=1e-13) and r["ci_high"] == pytest.approx(high[col], abs=1e-13)
        assert r["p_t"] == pytest.approx(stats.ttest_rel(vb[:, col], va[:, col]).pvalue, rel=1e-12)


def test_resampling_does_not_depend_on_the_chunk_size():
    # integer values: every sum is exact, so equal outputs mean equal resamples (not a rounding coincidence)
    d = np.random.default_rng(1).integers(-9, 10, size=(130, 3)).astype(np.float64)
    for fn in (significance.sign_flip_means, significance.bootstrap_means):
        whole = fn(d, 50, np.random.default_rng(5), chunk=50)
        pieces = fn(d, 50, np.random.default_rng(5), chunk=7)
        auto = fn(d, 50, np.random.default_rng(5))
        np.testing.assert_array_equal(whole, pieces)
        np.testing.assert_array_equal(whole, auto)


def test_sign_flip_p_value_matches_scipys_exact_permutation_test():
    rng = np.random.default_rng(2)
    a = rng.random(12)
    b = a + rng.normal(0.05, 0.15, 12)
    exact = stats.permutation_test((a, b), lambda x, y, axis: np.mean(y - x, axis=axis), permutation_type="samples",
                                   n_resamples=np.inf, alternative="two-sided").pvalue  # all 2^12 sign patterns
    ours = significance.paired_tests(a, b, resamples=40_000, seed=0)["p_perm"][0]
    # Monte Carlo standard error sqrt(p (1 - p) / 40000) <= 0.0025
    assert 0.01 < exact < 0.5 and ours == pytest.approx(exact, abs=0.01)
    # and by enumerating the sign patterns ourselves
    d = b - a
    means = np.array([np.mean(np.array(s) * d) for s in itertools.product([1, -1], repeat=12)])
    assert np.mean(np.abs(means) >= abs(d.mean()) - 1e-12) == pytest.approx(exact, abs=1e-12)


def test_paired_t_test_and_bootstrap_interval_match_scipy():
    rng = np.random.default_rng(4)
    a = rng.random((60, 2))
    b = a + rng.normal([0.03, -0.01], 0.1, (60, 2))
    res = significance.paired_tests(a, b, resamples=20_000, seed=1)
    t = stats.ttest_rel(b, a, axis=0)
    np.testing.assert_allclose(res["t"], t.statistic, rtol=1e-12)
    np.testing.assert_allclose(res["p_t"], t.pvalue, rtol=1e-12)
    for col in range(2):
        ci = stats.bootstrap((a[:, col], b[:, col]), lambda x, y, axis: np.mean(y - x, axis=axis), paired=True,
                             method="percentile", n_resamples=20_000, rng=np.random.default_rng(9),
                             vectorized=True).confidence_interval
        se = (b[:, col] - a[:, col]).std(ddof=1) / np.sqrt(60)
        # two independent Monte Carlo estimates of the same percentiles (each off by ~0.02 SE): agree within 0.1 SE
        assert res["ci_low"][col] == pytest.approx(ci.low, abs=0.1 * se)
        assert res["ci_high"][col] == pytest.approx(ci.high, abs=0.1 * se)


def test_holm_against_a_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(significance.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(significance.holm([0.5, 0.6]), [1.0, 1.0])  # 0.5 x 2 = 1, then capped
    np.testing.assert_allclose(significance.holm([0.04]), [0.04])  # one test: unchanged
    out = significance.holm([0.01, np.nan, 0.02])  # NaN is not counted: m = 2
    assert out[0] == pytest.approx(0.02) and np.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_holm_is_applied_per_metric_over_the_comparisons(tmp_path):
    labels, offsets, rng = impressions(200, seed=3)
    base = rng.normal(size=offsets[-1])
    paths = [record(tmp_path, f"M{i}", base + 0.3 * i * labels + rng.normal(0, 0.3, len(base)), labels, offsets)
             for i in range(3)]
    rows = significance.compare_runs(significance.load_runs([str(p) for p in paths], "dev"), resamples=300)
    assert {(r["a"], r["b"]) for r in rows} == {("M0", "M1"), ("M0", "M2")}  # each against the first
    for key in scorer.METRIC_KEYS:
        family = [r for r in rows if r["metric"] == key]
        np.testing.assert_allclose([r["p_holm"] for r in family], significance.holm([r["p_perm"] for r in family]))
    every = significance.compare_runs(significance.load_runs([str(p) for p in paths], "dev"), all_pairs=True,
                                      resamples=300)
    assert {(r["a"], r["b"]) for r in every} == {("M0", "M1"), ("M0", "M2"), ("M1", "M2")}


# -- records and their checks ----------------------------------------------------------------------------------

def test_per_impression_metrics_are_the_official_ones_impression_by_impression():
    labels, offsets, rng = impressions(50, seed=5)
    labels[offsets[3]:offsets[4]] = 1  # one single-class impression: skipped and counted
    scores = rng.normal(size=offsets[-1])
    per = scorer.per_impression_metrics(scores, labels, offsets)
    assert per["skipped_single_class"] == 1 and 3 not in per["index"] and len(per["index"]) == 49
    for j, i in enumerate(per["index"][:10]):
        one = scorer.compute_metrics([scores[offsets[i]:offsets[i + 1]]], [labels[offsets[i]:offsets[i + 1]]])
        for key in scorer.METRIC_KEYS:
            assert per[key][j] == pytest.approx(one[key], abs=1e-12)
    flat = scorer.compute_metrics_flat(scores, labels, offsets)
    for key in scorer.METRIC_KEYS:
        assert flat[key] == pytest.approx(per[key].mean(), abs=1e-12)


def test_records_round_trip_and_are_aligned_by_impression_id(tmp_path):
    labels, offsets, rng = impressions(30, seed=6)
    scores = rng.normal(size=offsets[-1])
    ids = np.arange(1, 31)
    path = record(tmp_path, "A", scores, labels, offsets, ids=ids, seed=3, run="#4")
    run = significance.load_per_impression(path)
    assert run.label == "A #4" and run.meta["seed"] == 3 and run.meta["skipped_single_class"] == 0
    np.testing.assert_array_equal(run.impression_ids, ids)
    np.testing.assert_array_equal(run.candidates, np.diff(offsets))
    np.testing.assert_array_equal(run.clicks, np.add.reduceat(labels, offsets[:-1]))
    # the same impressions written in another order pair up with the first file's
    order = np.random.default_rng(0).permutation(30)
    shuffled = record_shuffled(tmp_path, scores, labels, offsets, ids, order)
    a, b = significance.align([run, significance.load_per_impression(shuffled)])
    np.testing.assert_array_equal(a, b)


def record_shuffled(tmp_path, scores, labels, offsets, ids, order):
    parts_s = [scores[offsets[i]:offsets[i + 1]] for i in order]
    parts_l = [labels[offsets[i]:offsets[i + 1]] for i in order]
    new_offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts_s])])
    return record(tmp_path, "shuffled", np.concatenate(parts_s), np.concatenate(parts_l), new_offsets, ids=ids[order])


def test_runs_scored_on_other_impressions_are_refused(tmp_path):
    labels, offsets, rng = impressions(40, seed=8)
    scores = rng.normal(size=offsets[-1])
    a = record(tmp_path, "A", scores, labels, offsets)
    fewer = offsets[:36]  # the first 35 impressions only
    b = record(tmp_path, "B", scores[:fewer[-1]], labels[:fewer[-1]], fewer)
    with pytest.raises(ValueError, match=r"B \(.*B\.npz\) was scored on other impressions than A .*35 vs 40 scored "
                                         r"impressions; 5 only in A \(135, 136, 137, 138, 139\), 0 only in B"):
        significance.compare_runs(significance.load_runs([str(a), str(b)], "dev"))
    other_ids = record(tmp_path, "C", scores, labels, offsets, ids=np.arange(40) + 1000)
    with pytest.raises(ValueError, match=r"40 vs 40 scored impressions; 40 only in A \(100, 101, 102, 103, 104, "
                                         r"\.\.\.\), 40 only in C \(1000, "):
        significance.compare_runs(significance.load_runs([str(a), str(other_ids)], "dev"))
    test_split = record(tmp_path, "T", scores, labels, offsets, split="test")
    with pytest.raises(ValueError, match="T .* holds test metrics but A .* holds dev metrics"):
        significance.compare_runs(significance.load_runs([str(a), str(test_split)], "dev"))
    moved = labels.copy()
    clicks = labels[offsets[2]:offsets[3]].sum()
    moved[offsets[2]:offsets[3]] = 0
    moved[offsets[2]:offsets[2] + (2 if clicks == 1 else 1)] = 1  # impression 102 gets another click count
    changed = record(tmp_path, "D", scores, moved, offsets)
    with pytest.raises(ValueError, match="same impression ids but 1 impressions with other candidate or click "
                                         r"counts \(102\)"):
        significance.compare_runs(significance.load_runs([str(a), str(changed)], "dev"))


def test_run_paths_resolve_to_their_records(tmp_path):
    run = tmp_path / "#1"
    (run / "dev").mkdir(parents=True)
    labels, offsets, rng = impressions(10)
    for name in (significance.PER_IMPRESSION, significance.POPULARITY):
        per = scorer.per_impression_metrics(rng.normal(size=offsets[-1]), labels, offsets)
        significance.write_per_impression(run / "dev" / name, per, np.arange(10), offsets, labels, {"split": "dev"})
    ckpt = run / "MHSA-MHSA"
    ckpt.write_bytes(b"weights")
    want = run / "dev" / significance.PER_IMPRESSION
    assert significance.resolve_run(str(run), "dev") == want
    assert significance.resolve_run(str(ckpt), "dev") == want
    assert significance.resolve_run(str(run / "dev"), "dev") == want
    assert significance.resolve_run(str(want), "dev") == want
    assert significance.resolve_run(f"popularity:{run}", "dev") == run / "dev" / significance.POPULARITY
    assert significance.resolve_run(f"popularity:{ckpt}", "dev") == run / "dev" / significance.POPULARITY
    with pytest.raises(FileNotFoundError, match=r"no .*#1/test/per_impression.npz; write it with `python main.py "
                                                r"--mode=test --test_model_path="):
        significance.resolve_run(str(ckpt), "test")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        significance.resolve_run(str(tmp_path / "nope"), "dev")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a per-impression metrics file"):
        significance.load_per_impression(junk)


# -- intervals over seeds ---------------------------------------------------------------------------------------

def test_t_interval_is_scipys():
    values = np.array([64.1, 63.2, 65.0, 64.4])
    low, high = run_records.t_interval(values)
    ref = stats.t.interval(0.95, 3, loc=values.mean(), scale=stats.sem(values))
    assert (low, high) == pytest.approx(ref, abs=1e-12)
    assert np.isnan(run_records.t_interval([1.0])).all()


def fake_run(root, model, n, seed, auc, test=None):
    run = root / "demo" / model / f"#{n}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seed": seed}))
    (run / "dev_log.jsonl").write_text(json.dumps({"epoch": 1, "auc": auc, "mrr": auc / 2, "ndcg5": auc / 2,
                                                   "ndcg10": auc / 2}) + "\n")
    return run


def test_seed_differences_pair_runs_by_seed(tmp_path):
    for n, (seed, auc) in enumerate([(0, .60), (1, .62), (2, .61)], 1):
        fake_run(tmp_path, "A-A", n, seed, auc)
    for n, (seed, auc) in enumerate([(2, .64), (0, .63), (1, .66), (9, .70)], 1):  # seed 9: A has none
        fake_run(tmp_path, "B-B", n, seed, auc)
    fake_run(tmp_path, "C-C", 1, 0, .5)  # one shared seed: no pair
    md, tsv, notes = significance.seed_differences(run_records.collect_runs(tmp_path, "demo"))
    rows = [dict(zip(tsv.splitlines()[0].split("\t"), line.split("\t"))) for line in tsv.splitlines()[1:]]
    assert {(r["a"], r["b"]) for r in rows} == {("A-A", "B-B")} and not notes
    auc = next(r for r in rows if r["metric"] == "dev_auc")
    d = np.array([3.0, 4.0, 3.0])  # seeds 0, 1, 2: B - A in points
    assert auc["seeds"] == "0,1,2"
    assert float(auc["diff_mean"]) == pytest.approx(d.mean()) and float(auc["diff_std"]) == pytest.approx(d.std(ddof=1))
    assert (float(auc["ci_low"]), float(auc["ci_high"])) == pytest.approx(
        stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d)), abs=1e-5)
    assert float(auc["p_t"]) == pytest.approx(stats.ttest_rel([63, 66, 64], [60, 62, 61]).pvalue, rel=1e-5)
    assert "| demo | A-A | B-B | 0,1,2 | dev AUC | +3.33 ± 0.58 |" in md
    fake_run(tmp_path, "A-A", 4, 0, .59)  # a second run of seed 0: the latest is used, and said so
    _, tsv2, notes = significance.seed_differences(run_records.collect_runs(tmp_path, "demo"))
    assert notes == ["demo/A-A: runs #1 and #4 share seed 0; the paired-by-seed table uses #4"]
    assert float(tsv2.splitlines()[1].split("\t")[5]) == pytest.approx(np.mean([4.0, 4.0, 3.0]))


def test_main_aggregate_prints_intervals_and_the_paired_table(tmp_path, capsys):
    for n, (seed, auc) in enumerate([(0, .60), (1, .62)], 1):
        fake_run(tmp_path, "A-A", n, seed, auc)
        fake_run(tmp_path, "B-B", n, seed, auc + 0.01 * (n + 1))
    result = main(["--mode=aggregate", f"--output_dir={tmp_path}"])
    out = capsys.readouterr().out
    low, high = run_records.t_interval([60.0, 62.0])
    assert f"| demo | A-A | 2 | 0,1 | 61.00 ± 1.41 [{low:.2f}, {high:.2f}] |" in out
    assert "Paired by seed" in out and "| demo | A-A | B-B | 0,1 | dev AUC | +2.50 ± 0.71 |" in out
    assert (tmp_path / "aggregate.md").read_text().strip() == result["markdown"].strip()
    assert (tmp_path / "aggregate_paired.tsv").read_text().strip() == result["paired_tsv"].strip()


# -- end to end through main() -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    return train_two_seeds(tmp_path_factory.mktemp("compare"))


def test_training_and_dev_mode_write_per_impression_records(two_runs):
    tmp, common, ckpts = two_runs
    dev = ckpts[0].parent / "dev"
    from_training = significance.load_per_impression(dev / significance.PER_IMPRESSION)
    assert from_training.meta["written_by"] == "training" and from_training.meta["seed"] == 0
    report = main(["--mode=dev", f"--dev_model_path={ckpts[0]}", *common])
    assert Path(report["per_impression"]) == dev / significance.PER_IMPRESSION
    run = significance.load_per_impression(report["per_impression"])
    assert run.meta["written_by"] == "--mode=dev" and run.label == "MHSA-MHSA #1" and run.meta["split"] == "dev"
    saved = json.loads((dev / "metrics.json").read_text())
    for key, value in run.means().items():
        assert value == pytest.approx(saved["metrics"][key], abs=1e-12)
    np.testing.assert_array_equal(run.metrics, from_training.metrics)  # the best epoch's evaluation, reproduced
    pop = significance.load_per_impression(report["per_impression_popularity"])
    assert pop.label == "popularity" and pop.meta["seed"] is None
    for key, value in pop.means().items():
        assert value == pytest.approx(saved["popularity_metrics"][key], abs=1e-12)
    assert len(run.impression_ids) == saved["metrics"]["impressions"] == len(pop.impression_ids)


def test_compare_end_to_end_and_never_overwrites(two_runs, capsys):
    tmp, common, ckpts = two_runs
    out = tmp / "cmp"
    result = main(["--mode=compare", "--runs", f"popularity:{ckpts[0].parent}", str(ckpts[0].parent), str(ckpts[1]),
                   "--resamples=500", f"--compare_output={out}", *common])
    printed = capsys.readouterr().out
    assert [r.label for r in result["runs"]] == ["popularity", "MHSA-MHSA #1", "MHSA-MHSA #2"]
    assert len(result["rows"]) == 8 and {r["a"] for r in result["rows"]} == {"popularity"}
    assert "| popularity | MHSA-MHSA #2 | AUC |" in printed
    assert f"| popularity | — | `{ckpts[0].parent / 'dev' / significance.POPULARITY}` |" in printed  # no seed
    assert f"| MHSA-MHSA #2 | 1 | `{ckpts[1].parent / 'dev' / significance.PER_IMPRESSION}` |" in printed
    assert "(500 resamples each, seed 0)" in printed  # the resampling seed, not a run's
    assert (out / "compare.md").read_text().strip() == result["markdown"].strip()
    tsv = (out / "compare.tsv").read_text().splitlines()
    assert tsv[0].startswith("a\tb\tmetric\timpressions") and len(tsv) == 9
    row = dict(zip(tsv[0].split("\t"), tsv[1].split("\t")))
    assert row["resamples"] == "500" and row["seed"] == "0"
    assert float(row["diff"]) == pytest.approx(result["rows"][0]["diff"], abs=1e-15)
    with pytest.raises(FileExistsError, match="already holds compare.md, compare.tsv"):
        main(["--mode=compare", "--runs", str(ckpts[0]), str(ckpts[1]), f"--compare_output={out}", *common])
    # the default folder is new each time
    again = main(["--mode=compare", "--runs", str(ckpts[0]), str(ckpts[1]), "--resamples=100", *common])
    again2 = main(["--mode=compare", "--runs", str(ckpts[0]), str(ckpts[1]), "--resamples=100", *common])
    assert again["folder"] != again2["folder"]
    assert Path(again["folder"]).parent == tmp / "best_model" / "demo" / "compare"


def test_compare_flag_rules():
    with pytest.raises(ValueError, match="--mode=compare needs --runs with at least two runs"):
        main(["--mode=compare", "--runs", "a"])
    with pytest.raises(ValueError, match="--runs lists the runs of --mode=compare"):
        main(["--mode=aggregate", "--runs", "a", "b"])
    with pytest.raises(ValueError, match="--resamples must be >= 1"):
        main(["--mode=compare", "--runs", "a", "b", "--resamples=0"])


def test_unlabelled_test_split_writes_no_records(two_runs, tmp_path, capsys):
    tmp, common, ckpts = two_runs
    data = copy_demo_without_test_labels(tmp / "data", tmp_path / "data")
    report = main(["--mode=test", f"--test_model_path={ckpts[0]}", f"--data_dir={data}", "--no-progress"])
    assert "per_impression" not in report
    assert "the test split has no labels: no per-impression metrics written" in capsys.readouterr().out
    assert not (ckpts[0].parent / "test" / significance.PER_IMPRESSION).exists()
