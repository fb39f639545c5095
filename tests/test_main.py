"""End to end through main(argv): train -> dev -> test -> prediction.zip on a tiny generated corpus."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import scorer
from main import main

ROOT = Path(__file__).resolve().parents[1]
from common import SMALL_MODEL, TINY_DEMO, copy_demo_without_test_labels, needs_glove50, needs_minilm  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    common = [f"--data_dir={tmp / 'data'}", f"--output_dir={tmp / 'best_model'}"]
    result = main(["--mode=train", "--dataset=demo", "--epoch=2", "--batch_size=32", *TINY_DEMO, *SMALL_MODEL,
                   *common])
    return tmp, common, result


def test_train_writes_run_folder(trained):
    tmp, common, result = trained
    run = Path(result["run_dir"])
    assert run == tmp / "best_model" / "demo" / "MHSA-MHSA" / "#1"
    assert Path(result["checkpoint"]) == run / "MHSA-MHSA"
    saved = json.loads((run / "config.json").read_text())
    assert saved["news_encoder"] == "MHSA" and saved["seed"] == 0 and saved["head_num"] == 4
    log = [json.loads(line) for line in (run / "dev_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(0 <= r["auc"] <= 1 and np.isfinite(r["train_loss"]) for r in log)
    best = max(log, key=lambda r: scorer.criterion_value(r, "avg"))
    assert result["best_epoch"] == best["epoch"]
    assert result["dev_metrics"]["auc"] == pytest.approx(best["auc"])


def test_dev_mode_matches_official_scorer_on_written_files(trained):
    tmp, common, result = trained
    report = main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common, "--no-progress"])
    m = report["metrics"]
    official = scorer.official_style_score(report["truth"], report["ranking"])
    for key in ("auc", "mrr", "ndcg5", "ndcg10"):
        assert m[key] == pytest.approx(official[key], abs=1e-9)
    # same checkpoint, same data: the dev metrics logged at training time are reproduced
    for key in ("auc", "mrr", "ndcg5", "ndcg10"):
        assert m[key] == pytest.approx(result["dev_metrics"][key], abs=1e-9)
    saved = json.loads((Path(result["checkpoint"]).parent / "dev" / "metrics.json").read_text())
    assert saved["metrics"]["auc"] == pytest.approx(m["auc"])


def test_test_mode_writes_valid_leaderboard_zip(trained):
    tmp, common, result = trained
    report = main(["--mode=test", f"--test_model_path={result['checkpoint']}", *common, "--no-progress"])
    zpath = Path(report["prediction"])
    with zipfile.ZipFile(zpath) as z:
        assert z.namelist() == ["prediction.txt"]
        lines = z.read("prediction.txt").decode().splitlines()
    behaviors = (tmp / "data" / "MIND-demo" / "test" / "behaviors.tsv").read_text().splitlines()
    assert len(lines) == len(behaviors)
    for line, beh in zip(lines, behaviors):
        impr_id, _, _, _, cands = beh.split("\t")
        pid, ranks = line.split(" ")
        assert pid == impr_id  # behaviors.tsv order
        ranks = json.loads(ranks)
        assert sorted(ranks) == list(range(1, len(cands.split()) + 1))
    assert " " not in lines[0].split(" ", 1)[1]
    assert report["metrics"]["labelled"]  # the demo's test split has labels: metrics printed too


def test_unlabelled_test_split_still_predicts(trained, tmp_path):
    tmp, common, result = trained
    data = copy_demo_without_test_labels(tmp / "data", tmp_path / "data")
    report = main(["--mode=test", f"--test_model_path={result['checkpoint']}", f"--data_dir={data}", "--no-progress"])
    assert report["metrics"] == {"labelled": False}
    ids, ranks = scorer.read_prediction(report["prediction"])
    rows = [line.split("\t") for line in (data / "MIND-demo" / "test" / "behaviors.tsv").read_text().splitlines()]
    assert [str(i) for i in ids] == [r[0] for r in rows]


def test_typed_architecture_flag_conflicting_with_checkpoint_is_an_error(trained):
    tmp, common, result = trained
    with pytest.raises(ValueError, match=r"--head_num=8 .*checkpoint: 4"):
        main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", "--head_num=8", *common])


def test_checkpoint_of_another_architecture_is_refused(trained, tmp_path):
    tmp, common, result = trained
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    ckpt["config"]["user_encoder"] = "ATT"  # weights of MHSA-MHSA under an ATT config
    bad = tmp_path / "MHSA-ATT"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match=r"checkpoint of MHSA-ATT does not fit"):
        main(["--mode=dev", f"--dev_model_path={bad}", *common])
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint written by this framework"):
        main(["--mode=dev", f"--dev_model_path={junk}", *common])


def test_run_index_is_never_reused(trained):
    tmp, common, result = trained
    again = main(["--mode=train", "--dataset=demo", "--epoch=1", "--max_steps_per_epoch=2", "--batch_size=16",
                  *TINY_DEMO, *SMALL_MODEL, *common])
    assert Path(again["run_dir"]).name == "#2"


def test_command_line_user_mistake_gets_a_message_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "--mode=dev", f"--dev_model_path={tmp_path / 'nope'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: checkpoint" in proc.stderr and "Traceback" not in proc.stderr


@needs_minilm
@needs_glove50  # --use_category_glove reads the offline 50-d GloVe
def test_plm_miner_train_dev_test_with_offline_minilm(tmp_path):
    """PLMMiner-MINER end to end on a tiny generated corpus with the real offline MiniLM (CPU, a few steps)."""
    common = [f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'best_model'}", "--no-progress"]
    result = main(["--mode=train", "--dataset=demo", "--news_encoder=PLMMiner", "--user_encoder=MINER",
                   "--use_category_glove", "--epoch=1", "--max_steps_per_epoch=2", "--batch_size=8",
                   "--num_interest_vectors=4", "--context_code_dim=16", "--plm_max_length=16",
                   "--demo_news=150", "--demo_users=60", "--demo_train_impressions=60", "--demo_dev_impressions=30",
                   "--demo_test_impressions=30", *common])
    ckpt = Path(result["checkpoint"])
    assert ckpt.name == "PLMMiner-MINER" and ckpt.parent.name == "#1"
    saved = json.loads((ckpt.parent / "config.json").read_text())
    assert saved["plm_model_name"] == "offline-minilm" and saved["plm_frozen_layers"] == 4  # demo suggestions
    dev = main(["--mode=dev", f"--dev_model_path={ckpt}", *common])
    assert dev["metrics"]["auc"] == pytest.approx(result["dev_metrics"]["auc"], abs=1e-9)
    test = main(["--mode=test", f"--test_model_path={ckpt}", *common])
    ids, ranks = scorer.read_prediction(test["prediction"])
    assert len(ids) == 30 and all(sorted(r) == list(range(1, len(r) + 1)) for r in ranks)
