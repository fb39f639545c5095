"""Research workflow (issue 7): run records (train_log.jsonl, environment.json, TensorBoard, curves.png),
`--config_file`, `--seeds`, and `--mode=explain` for NRMS and MINER, on a tiny generated corpus."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import run_records
import scorer
from layers import AdditiveAttention, AttentionRecorder
from main import main

ROOT = Path(__file__).resolve().parents[1]
from common import SMALL_MODEL, TINY_DEMO  # noqa: E402

TRAIN = ["--mode=train", "--dataset=demo", "--epoch=2", "--batch_size=32", "--max_steps_per_epoch=6",
         "--log_every=2", *TINY_DEMO, *SMALL_MODEL]
needs_tensorboard = pytest.mark.skipif(not run_records.tensorboard_available(),
                                       reason="tensorboard not installed (requirements.txt lists it)")


def png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    assert path.stat().st_size > 1000, path
    image = mpimg.imread(path)
    return image.shape[1], image.shape[0]


@pytest.fixture(scope="module")
def nrms(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workflow")
    common = [f"--data_dir={tmp / 'data'}", f"--output_dir={tmp / 'runs'}"]
    result = main([*TRAIN, *common])
    return tmp, common, result, Path(result["run_dir"])


@pytest.fixture(scope="module")
def miner(nrms):
    tmp, common, _, _ = nrms
    result = main([*TRAIN, *common, "--user_encoder=MINER", "--num_interest_vectors=4", "--context_code_dim=16"])
    return tmp, common, result, Path(result["run_dir"])


# -- run records ------------------------------------------------------------------------------------------------

def test_train_log_has_steps_and_epochs_with_loss_lr_throughput_and_dev_metrics(nrms):
    _, _, result, run = nrms
    records = run_records.read_jsonl(run / run_records.TRAIN_LOG)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]  # every --log_every optimizer steps
    assert [r["epoch"] for r in steps] == [1, 1, 1, 2, 2, 2]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 6), (2, 12)]
    for r in steps + epochs:
        assert set(r["lr"]) == {"model"} and all(v >= 0 for v in r["lr"].values())
        assert r["samples_per_s"] > 0 and 0 < r["impressions_per_s"] <= r["samples_per_s"]
        assert r["aux"] == {}  # NRMS has no auxiliary loss
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    # warmup then linear decay to 0 at the last step: the logged lr follows the schedule
    assert epochs[-1]["lr"]["model"] == 0.0 and steps[0]["lr"]["model"] > steps[-2]["lr"]["model"]
    # the epoch records carry the same dev metrics and mean loss as dev_log.jsonl and the returned history
    for rec, hist in zip(epochs, result["history"]):
        for key in ("auc", "mrr", "ndcg5", "ndcg10", "train_loss"):
            assert rec[key] == pytest.approx(hist[key], abs=1e-12), key
        assert rec["criterion"] == pytest.approx(scorer.criterion_value(hist, "avg"))
    # the epoch mean is the mean over its steps: the logged windows average to it
    first = [r["loss"] for r in steps if r["epoch"] == 1]
    assert epochs[0]["train_loss"] == pytest.approx(np.mean(first), rel=1e-6)


def test_run_files_and_corpus_cache_get_the_umask_permissions(nrms):
    """Files written through a temporary file (mkstemp: 0600, mkdtemp: 0700) and renamed must end up as readable
    as anything else the umask allows: on a shared cluster colleagues read each other's checkpoints."""
    tmp, _, result, run = nrms
    mask = os.umask(0)
    os.umask(mask)
    for name in ("last.pt", "dev_log.jsonl", "train_log.jsonl", "config.json", Path(result["checkpoint"]).name):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    caches = [p for p in (tmp / "data" / "cache").rglob("meta.json")]
    assert caches and all(p.parent.stat().st_mode & 0o777 == 0o777 & ~mask for p in caches)


def test_the_umask_is_read_without_changing_it(tmp_path):
    """util reads the umask once at import (from /proc on Linux): a process with umask 027 gets 0640 files."""
    code = ("import os; os.umask(0o027); import util; assert os.umask(0o027) == 0o027; "
            "open('f', 'w').close(); util.umask_permissions('f'); print(oct(util._UMASK), oct(os.stat('f').st_mode & 0o777))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["0o27", "0o640"]


def test_bench_zoo_one_seed_and_mean_std_over_seeds(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    from zoo import main_cli

    common = ["--models", "NRMS", "--epoch", "1", f"--data_dir={tmp_path / 'data'}",
              f"--output_dir={tmp_path / 'runs'}", *(f"--extra={f}" for f in [*TINY_DEMO, *SMALL_MODEL,
                                                                             "--max_steps_per_epoch=3"])]
    one = main_cli(common)[0]
    assert one["runs"] == 1 and one["auc_std"] == 0.0 and 0 <= one["auc"] <= 1
    seeds = main_cli([*common, "--seeds", "0,1"])[0]
    logs = sorted((tmp_path / "runs" / "demo" / "MHSA-MHSA").glob("#*/dev_log.jsonl"))
    aucs = [json.loads(log.read_text().splitlines()[-1])["auc"] for log in logs[1:]]  # #2, #3: seeds 0 and 1
    assert seeds["runs"] == 2 and len(aucs) == 2
    assert seeds["auc"] == pytest.approx(np.mean(aucs)) and seeds["auc_std"] == pytest.approx(np.std(aucs, ddof=1))
    assert aucs[0] == pytest.approx(one["auc"])  # seed 0 again: the same run
    assert f"{seeds['auc']:.4f} ± {seeds['auc_std']:.4f}" in capsys.readouterr().out


def test_bench_miner_interests_measures_a_miner_checkpoint(miner, nrms):
    sys.path.insert(0, str(ROOT / "bench"))
    from miner_interests import main_cli

    tmp, _, result, _ = miner
    r = main_cli([result["checkpoint"], "--users", "20", f"--data_dir={tmp / 'data'}"])
    assert r["K"] == 4 and r["scale"] == "sqrt" and 0 < r["users"] <= 20
    for key in ("interests_mean_cosine", "random_items_mean_cosine"):
        assert 1 / 4 - 1e-6 <= r[key] <= 1 + 1e-6  # a mean K x K cosine with the diagonal: [1/K, 1]
    assert 0 < r["attention_entropy_over_log_H"] <= 1 + 1e-6 and r["logit_std_over_history"] > 0
    with pytest.raises(ValueError, match="not MINER"):
        main_cli([nrms[2]["checkpoint"], f"--data_dir={tmp / 'data'}"])


def test_auxiliary_losses_are_logged_by_name(miner):
    _, _, _, run = miner
    records = run_records.read_jsonl(run / run_records.TRAIN_LOG)
    assert records and all("disagreement" in r["aux"] for r in records)
    # MINER's disagreement (beta x mean cosine of the K interests) lies in (0, beta]
    assert all(0 < r["aux"]["disagreement"] <= 0.8 + 1e-6 for r in records)


def test_environment_names_versions_device_and_commit(nrms):
    _, _, _, run = nrms
    env = json.loads((run / run_records.ENVIRONMENT).read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["world_size"] == 1
    assert env["transformers"] and env["python"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one)
        assert env["git"]["commit"] == head.stdout.strip()


def test_curves_png_is_written(nrms):
    _, _, _, run = nrms
    width, height = png_size(run / run_records.CURVES)
    assert width > 400 and height > 200


@needs_tensorboard
def test_tensorboard_scalars(nrms):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, _, run = nrms
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr/model", "train/samples_per_s", "train/impressions_per_s", "dev/auc",
            "dev/ndcg10", "epoch/train_loss"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    log = [r for r in run_records.read_jsonl(run / run_records.TRAIN_LOG) if r["kind"] == "epoch"]
    assert [e.value for e in acc.Scalars("dev/auc")] == pytest.approx([r["auc"] for r in log], rel=1e-6)


def test_records_can_be_switched_off(nrms, tmp_path):
    tmp, _, _, _ = nrms
    result = main([*TRAIN, f"--data_dir={tmp / 'data'}", f"--output_dir={tmp_path}", "--epoch=1",
                   "--max_steps_per_epoch=2", "--no-tensorboard", "--no-plot"])
    run = Path(result["run_dir"])
    assert not (run / "tensorboard").exists() and not (run / run_records.CURVES).exists()
    assert (run / run_records.TRAIN_LOG).exists() and (run / run_records.ENVIRONMENT).exists()  # records are always written


def test_resumed_log_drops_records_after_the_saved_step(tmp_path):
    log = tmp_path / run_records.TRAIN_LOG
    log.write_text("".join(json.dumps({"kind": k, "step": s}) + "\n" for k, s in
                           [("step", 2), ("epoch", 3), ("step", 4), ("step", 6)]))
    run_records.RunRecorder(tmp_path, tensorboard=False, resumed_step=3, log=lambda *a: None)
    assert [r["step"] for r in run_records.read_jsonl(log)] == [2, 3]  # steps 4 and 6 will be redone
    run_records.RunRecorder(tmp_path, tensorboard=False, log=lambda *a: None)  # a new run starts a new log
    assert not log.exists()


# -- --config_file --------------------------------------------------------------------------------------------

def test_config_file_reproduces_a_run(nrms, tmp_path, capsys):
    tmp, common, result, run = nrms
    again = main([f"--config_file={run / 'config.json'}", f"--output_dir={tmp_path}"])
    capsys_out = capsys.readouterr().out
    assert f"--output_dir='{tmp_path}' overrides" in capsys_out  # the override is printed
    saved = json.loads((run / "config.json").read_text())
    rerun = json.loads((Path(again["run_dir"]) / "config.json").read_text())
    assert rerun.pop("output_dir") == str(tmp_path) and saved.pop("output_dir") != str(tmp_path)
    assert rerun.pop("config_file") == str(run / "config.json") and saved.pop("config_file") is None
    assert rerun == saved
    # same config, same seed, same data: the same training (CPU, deterministic kernels at this size)
    assert [r["train_loss"] for r in again["history"]] == pytest.approx([r["train_loss"] for r in result["history"]],
                                                                        rel=1e-5)
    assert again["dev_metrics"]["auc"] == pytest.approx(result["dev_metrics"]["auc"], abs=1e-6)


def test_config_file_errors_name_the_file(nrms, tmp_path):
    _, _, _, run = nrms
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads((run / "config.json").read_text()), "news_encodr": "MHSA"}))
    # issue 22: one line per key, naming the closest flag (was "unknown settings ['news_encodr']")
    with pytest.raises(ValueError, match=r'bad.json: "news_encodr": not a flag of this version of main.py \(the '
                                         r'closest is --news_encoder\)'):
        main([f"--config_file={bad}"])
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON \(line 1"):
        main([f"--config_file={bad}"])
    with pytest.raises(FileNotFoundError, match="--config_file .*missing.json: no such file"):
        main([f"--config_file={tmp_path / 'missing.json'}"])


# -- --seeds ----------------------------------------------------------------------------------------------------

def test_seeds_train_one_run_per_seed_and_aggregate_them(nrms, tmp_path):
    tmp, _, _, _ = nrms
    out = main([*TRAIN, f"--data_dir={tmp / 'data'}", f"--output_dir={tmp_path}", "--seeds=3,5", "--epoch=1",
                "--max_steps_per_epoch=2", "--no-plot"])
    configs = [json.loads((Path(r["run_dir"]) / "config.json").read_text()) for r in out["runs"]]
    assert [c["seed"] for c in configs] == [3, 5] and all(c["seeds"] is None for c in configs)
    assert len({r["run_dir"] for r in out["runs"]}) == 2
    assert sorted(r["seed"] for r in out["records"]) == [3, 5]
    row = next(line for line in out["markdown"].splitlines() if "MHSA-MHSA" in line)
    aucs = [r["dev_metrics"]["auc"] * 100 for r in out["runs"]]
    assert f"{np.mean(aucs):.2f} ± {np.std(aucs, ddof=1):.2f}" in row
    assert out["runs"][0]["history"] != out["runs"][1]["history"]  # the seeds really differ


def test_seeds_flag_rules():
    with pytest.raises(ValueError, match="either --seed or --seeds"):
        main(["--seeds=1,2", "--seed=3"])
    with pytest.raises(ValueError, match="repeated values"):
        main(["--seeds=1,1"])
    with pytest.raises(ValueError, match="--seeds runs training once per seed"):
        main(["--mode=dev", "--dev_model_path=x", "--seeds=1,2"])


# -- --mode=explain ---------------------------------------------------------------------------------------------

def explain(run: Path, common, impression: str = "2") -> dict:
    ckpt = run / run.parent.name
    return main(["--mode=explain", f"--dev_model_path={ckpt}", f"--impression_id={impression}", *common])


def test_explain_nrms_word_and_history_attention(nrms):
    _, common, _, run = nrms
    out = explain(run, common)
    assert Path(out["png"]) == run / "explain" / "impression-2.png"
    width, height = png_size(Path(out["png"]))
    assert width > 500 and height > 500
    saved = json.loads(Path(out["json"]).read_text())
    assert saved["impression_id"] == "2" and saved["model"] == "MHSA-MHSA"
    assert saved["word_attention"] == "news_encoder.attention/weights"
    line = next(x for x in (run.parents[3] / "data" / "MIND-demo" / "dev" / "behaviors.tsv").read_text().splitlines()
                if x.split("\t")[0] == "2")
    history_ids = line.split("\t")[3].split()[-50:]
    candidates = [tuple(c.rsplit("-", 1)) for c in line.split("\t")[4].split()]
    assert [h["news_id"] for h in saved["history"]] == history_ids
    assert [(c["news_id"], str(c["label"])) for c in saved["candidates"]] == candidates
    for item in saved["history"] + saved["candidates"]:
        # one weight per real title token, a softmax over them; the tokens are the title's own words
        assert len(item["tokens"]) == len(item["weights"]) > 0
        assert sum(item["weights"]) == pytest.approx(1.0, abs=1e-5)
        assert item["tokens"][0] == item["title"].lower().split()[0].strip(".,!?;|")
    history = saved["user_attention"]["history"]
    assert history["axes"] == ["history"] and len(history["weights"]) == len(history_ids)
    assert sum(history["weights"]) == pytest.approx(1.0, abs=1e-5)


def test_explain_scores_match_the_dev_ranking(nrms):
    """The picture's scores are the model's: their order is the ranking `--mode=dev` writes for that impression."""
    _, common, result, run = nrms
    out = explain(run, common, impression="5")
    report = main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common])
    ids, ranks = scorer.read_prediction(report["ranking"])
    expected = ranks[ids.index("5") if "5" in ids else ids.index(5)]
    scores = np.array([c["score"] for c in out["candidates"]])
    assert list(scorer.ranks_from_scores(scores)) == list(expected)


def test_explain_miner_interests_and_candidate_weights(miner):
    _, common, _, run = miner
    out = explain(run, common)
    png_size(Path(out["png"]))
    maps = out["user_attention"]
    interests, weights = np.array(maps["interests"]["weights"]), np.array(maps["candidate"]["weights"])
    assert maps["interests"]["axes"] == ["history", "candidate", "interest"]
    assert maps["candidate"]["axes"] == ["candidate", "interest"]
    h, c = len(out["history"]), len(out["candidates"])
    assert interests.shape == (h, c, 4) and weights.shape == (c, 4)
    np.testing.assert_allclose(interests.sum(0), 1.0, atol=1e-5)  # each interest: a softmax over the history
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)  # each candidate: a softmax over the interests


def test_explain_unknown_impression_is_a_clear_error(nrms):
    _, common, _, run = nrms
    with pytest.raises(ValueError, match=r"impression 'N0PE' is not in .*dev.behaviors.tsv \(column 1\); for example"):
        explain(run, common, impression="N0PE")
    with pytest.raises(ValueError, match="--mode=explain needs --dev_model_path"):
        main(["--mode=explain", "--impression_id=2"])


def test_attention_is_recorded_only_inside_a_recorder():
    att = AdditiveAttention(6, 4)
    x, mask = torch.randn(3, 5, 6), torch.tensor([[1, 1, 1, 0, 0]] * 3, dtype=torch.bool)
    with AttentionRecorder(att) as rec:
        _, w = att(x, mask, return_weights=True)
    assert list(rec.maps) == ["/weights"] and torch.equal(rec.maps["/weights"][0], w)
    assert rec.maps["/weights"][1] == ("item", "position")
    rec.clear()
    att(x, mask)
    assert rec.maps == {}  # outside the `with`: nothing kept


def test_miner_keeps_its_large_attention_only_when_explaining(miner):
    """MINER's [B, H, C, K] attention is what its candidate chunking avoids holding: not returned in training
    or evaluation, only inside an AttentionRecorder."""
    from userEncoders import MINERUserEncoder, UserInputs

    cfg = type("C", (), {"num_interest_vectors": 3, "context_code_dim": 8, "category_aware_lambda": 0.5,
                         "miner_aggregation": "weighted", "disagreement_beta": 0.8, "category_embedding_dim": 5,
                         "poly_attention_scale": "sqrt",
                         "use_category_glove": False})()
    meta = type("M", (), {"category_num": 4, "category_glove": None})()
    news = type("N", (), {"output_dim": 6, "category_embedding": torch.nn.Embedding(4, 5)})()
    enc = MINERUserEncoder(cfg, meta, news).eval()
    inp = UserInputs(history=torch.randn(2, 5, 6), history_mask=torch.ones(2, 5, dtype=torch.bool), user_id=None,
                     candidates=torch.randn(2, 3, 6), candidate_mask=torch.ones(2, 3, dtype=torch.bool))
    inp.history_category, inp.candidate_category = torch.randint(0, 4, (2, 5)), torch.randint(0, 4, (2, 3))
    assert enc(inp).attention == {}
    with AttentionRecorder(enc):
        att = enc(inp).attention
    assert att["interests"].shape == (2, 5, 3, 3) and att["candidate"].shape == (2, 3, 3)
