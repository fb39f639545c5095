"""The results aggregator (`python main.py --mode=aggregate`): mean ± std and 95% interval per model over runs."""
from __future__ import annotations

import json

import numpy as np
import pytest

import run_records


def fake_run(root, dataset, model, n, seed, epochs, criterion="avg", test=None):
    run = root / dataset / model / f"#{n}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seed": seed, "dev_criterion": criterion}))
    (run / "dev_log.jsonl").write_text("".join(json.dumps({"epoch": i + 1, **m}) + "\n" for i, m in enumerate(epochs)))
    if test is not None:
        (run / "test").mkdir()
        (run / "test" / "metrics.json").write_text(json.dumps({"metrics": {**test, "labelled": True}}))
    return run


def m(auc, mrr, n5, n10):
    return {"auc": auc, "mrr": mrr, "ndcg5": n5, "ndcg10": n10}


def test_best_epoch_by_each_runs_criterion_then_mean_and_sample_std(tmp_path):
    # run 1: epoch 2 is best by avg; run 3 selects by AUC, so its epoch 1 (higher AUC, lower rest) wins. Issue 22:
    # a run selected by another criterion is another configuration (its own row), so the mean ± std below is over
    # runs 1 and 2 (both by avg; run 2 was run 3's epoch 1 before, with the same numbers).
    fake_run(tmp_path, "demo", "MHSA-MHSA", 1, 0, [m(.60, .20, .30, .40), m(.62, .30, .35, .45)])
    fake_run(tmp_path, "demo", "MHSA-MHSA", 2, 1, [m(.66, .10, .10, .10)])
    fake_run(tmp_path, "demo", "MHSA-MHSA", 3, 2, [m(.66, .10, .10, .10), m(.64, .30, .40, .50)], criterion="auc")
    fake_run(tmp_path, "demo", "NAML-ATT", 1, 0, [m(.70, .31, .36, .46)])
    records = run_records.collect_runs(tmp_path, "demo")
    by = {(r["model"], r["run"]): r for r in records}
    assert by[("MHSA-MHSA", "#1")]["dev_auc"] == .62 and by[("MHSA-MHSA", "#1")]["best_epoch"] == 2
    assert by[("MHSA-MHSA", "#3")]["dev_auc"] == .66 and by[("MHSA-MHSA", "#3")]["best_epoch"] == 1
    md, tsv = run_records.aggregate_runs(records)
    rows = {line.split("\t")[1]: line.split("\t") for line in tsv.splitlines()[1:]}
    header = tsv.splitlines()[0].split("\t")
    assert rows["MHSA-MHSA [dev_criterion=auc]"][2] == "1"
    nrms = dict(zip(header, rows["MHSA-MHSA [dev_criterion=avg]"]))
    assert nrms["runs"] == "2" and nrms["seeds"] == "0,1"
    assert float(nrms["dev_auc_mean"]) == pytest.approx(64.0)
    assert float(nrms["dev_auc_std"]) == pytest.approx(np.std([62.0, 66.0], ddof=1))
    assert float(nrms["dev_mrr_mean"]) == pytest.approx(20.0)
    naml = dict(zip(header, rows["NAML-ATT"]))
    assert naml["runs"] == "1" and naml["dev_auc_std"] == ""  # one run: no spread (issue 22: was 0.0)
    # 95% t-interval of the mean: 64 ± t(0.975, 1) * 2.83 / sqrt(2) = 64 ± 12.706 * 2
    assert float(nrms["dev_auc_ci_low"]) == pytest.approx(64.0 - 12.7062047 * 2.0)
    assert float(nrms["dev_auc_ci_high"]) == pytest.approx(64.0 + 12.7062047 * 2.0)
    assert naml["dev_auc_ci_low"] == "" and naml["dev_auc_ci_high"] == ""  # one run: no interval
    assert "| demo | MHSA-MHSA [dev_criterion=avg] | 2 | 0,1 | 64.00 ± 2.83 [38.59, 89.41] |" in md
    assert "| demo | NAML-ATT | 1 | 0 | 70.00 (n=1) |" in md  # issue 22: was "70.00 ± 0.00"


def test_test_metrics_only_where_every_run_has_them_and_incomplete_runs_are_listed(tmp_path):
    fake_run(tmp_path, "small", "CNN-LSTUR", 1, 0, [m(.6, .2, .3, .4)], test=m(.61, .21, .31, .41))
    fake_run(tmp_path, "small", "CNN-LSTUR", 2, 1, [m(.6, .2, .3, .4)], test=m(.63, .23, .33, .43))
    fake_run(tmp_path, "small", "MHSA-ATT", 1, 0, [m(.6, .2, .3, .4)], test=m(.6, .2, .3, .4))
    fake_run(tmp_path, "small", "MHSA-ATT", 2, 0, [m(.6, .2, .3, .4)])  # never tested
    (tmp_path / "small" / "MHSA-ATT" / "#3").mkdir()  # crashed before its first epoch
    records = run_records.collect_runs(tmp_path)
    assert [r["incomplete"] for r in records if "incomplete" in r] == [str(tmp_path / "small" / "MHSA-ATT" / "#3")]
    md, tsv = run_records.aggregate_runs(records)
    header = tsv.splitlines()[0].split("\t")
    rows = {line.split("\t")[1]: dict(zip(header, line.split("\t"))) for line in tsv.splitlines()[1:]}
    assert float(rows["CNN-LSTUR"]["test_auc_mean"]) == pytest.approx(62.0)
    assert rows["MHSA-ATT"]["test_auc_mean"] == ""  # one run has no test metrics: not averaged over the other
    assert "—" in md.splitlines()[-1]


def test_main_aggregate_mode_prints_and_writes_tables(tmp_path, capsys):
    from main import main

    fake_run(tmp_path, "demo", "MHSA-MHSA", 1, 0, [m(.60, .20, .30, .40)])
    fake_run(tmp_path, "demo", "MHSA-MHSA", 2, 1, [m(.64, .24, .34, .44)])
    result = main(["--mode=aggregate", f"--output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "| demo | MHSA-MHSA | 2 | 0,1 | 62.00 ± 2.83 [36.59, 87.41] | 22.00 ± 2.83 [-3.41, 47.41] |" in out
    assert (tmp_path / "aggregate.md").read_text().strip() == result["markdown"].strip()
    assert (tmp_path / "aggregate.tsv").read_text().splitlines()[1].startswith("demo\tMHSA-MHSA\t2\t0,1\t62.000000")


def test_main_aggregate_without_runs_says_what_to_do(tmp_path):
    from main import main

    with pytest.raises(FileNotFoundError, match="no finished run"):
        main(["--mode=aggregate", f"--output_dir={tmp_path}", "--dataset=small"])
