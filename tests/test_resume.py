"""Resumable training: last.pt holds the whole training state, a resumed run ends where an uninterrupted run
ends, `--resume auto` finds the latest run, and a checkpoint write interrupted mid-way leaves the previous one."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from common import SMALL_MODEL, TINY_DEMO  # noqa: E402

import checkpoints
import trainer
from main import main

# Dropout stays on (demo: 0.2), so the resumed run matches only if the dropout generator is restored too; negatives
# are redrawn every epoch and the data order changes every epoch, so those must follow the epoch as well.
TRAIN = ["--mode=train", "--dataset=demo", "--epoch=2", "--batch_size=64", "--max_steps_per_epoch=4",
         "--log_every=2", *TINY_DEMO, *SMALL_MODEL]


class Preempted(Exception):
    pass


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """#1: 2 epochs in one go. #2: killed right after epoch 1's last.pt, then `--resume auto` (picks #2)."""
    tmp = tmp_path_factory.mktemp("resume")
    common = [f"--data_dir={tmp / 'data'}", f"--output_dir={tmp / 'runs'}"]
    straight = main([*TRAIN, *common])
    original = trainer.Trainer._save_last

    def save_then_die(self, path, optimizer, scheduler, scaler, state, rng):
        original(self, path, optimizer, scheduler, scaler, state, rng)
        if state.epoch == 1:
            raise Preempted

    trainer.Trainer._save_last = save_then_die
    try:
        with pytest.raises(Preempted):
            main([*TRAIN, *common])
    finally:
        trainer.Trainer._save_last = original
    run2 = tmp / "runs" / "demo" / "MHSA-MHSA" / "#2"
    after_crash = torch.load(run2 / checkpoints.LAST_CHECKPOINT, weights_only=True)
    again = main([*TRAIN, *common, "--resume=auto"])
    return tmp, common, straight, after_crash, again, run2


def test_two_epochs_equal_one_epoch_plus_resume(resumed):
    tmp, common, straight, after_crash, again, run2 = resumed
    assert after_crash["epoch"] == 1 and after_crash["step"] == 4
    assert Path(again["run_dir"]) == run2  # the same run folder goes on
    a = torch.load(Path(straight["run_dir"]) / checkpoints.LAST_CHECKPOINT, weights_only=True)
    b = torch.load(run2 / checkpoints.LAST_CHECKPOINT, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 8
    compared = 0
    for i, (name, value) in enumerate(a["model"].items()):
        # Not bit-exact: MKL's matrix kernels may round differently with another memory alignment. Attention key
        # biases get a mathematically zero gradient (softmax ignores a shift shared by all keys), so Adam turns
        # that rounding noise into steps of random sign: their first moment shows it. The rest must match.
        if a["optimizer"]["state"][i]["exp_avg"].abs().max() < 1e-8:
            continue
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
        compared += 1
    assert compared >= len(a["model"]) - 2
    assert [r["train_loss"] for r in again["history"]] == pytest.approx([r["train_loss"] for r in straight["history"]],
                                                                        rel=1e-6)
    assert again["best_epoch"] == straight["best_epoch"]
    assert again["dev_metrics"]["auc"] == pytest.approx(straight["dev_metrics"]["auc"], abs=1e-9)
    torch.testing.assert_close(b["optimizer"]["state"][0]["exp_avg_sq"], a["optimizer"]["state"][0]["exp_avg_sq"],
                               rtol=1e-5, atol=1e-12)
    assert b["scheduler"]["last_epoch"] == a["scheduler"]["last_epoch"] == 8
    log = [json.loads(line) for line in (run2 / "dev_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    # train_log.jsonl goes on where the interrupted run left it: the same records as the uninterrupted run's
    logs = [[json.loads(x) for x in (Path(r["run_dir"]) / "train_log.jsonl").read_text().splitlines()]
            for r in (straight, again)]
    assert [(r["kind"], r["step"]) for r in logs[1]] == [(r["kind"], r["step"]) for r in logs[0]] == [
        ("step", 2), ("step", 4), ("epoch", 4), ("step", 6), ("step", 8), ("epoch", 8)]
    assert [r["loss"] for r in logs[1] if r["kind"] == "step"] == pytest.approx(
        [r["loss"] for r in logs[0] if r["kind"] == "step"], rel=1e-6)
    # the best-model checkpoint stays where dev/test look for it, and it evaluates
    dev = main(["--mode=dev", f"--dev_model_path={again['checkpoint']}", *common])
    assert dev["metrics"]["auc"] == pytest.approx(again["dev_metrics"]["auc"], abs=1e-9)


def test_last_checkpoint_holds_the_training_state(resumed):
    _, _, _, after_crash, _, _ = resumed
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "best", "best_epoch", "best_metrics",
                "bad_epochs", "history", "config", "corpus", "rng"):
        assert key in after_crash, key
    rng = after_crash["rng"][0]
    assert set(rng) >= {"python", "numpy", "torch"}
    assert after_crash["config"]["epoch"] == 2 and after_crash["best"] > 0


def test_resume_refuses_a_changed_training_flag_and_finished_runs_do_nothing(resumed):
    tmp, common, straight, _, again, run2 = resumed
    with pytest.raises(ValueError, match=r"--lr=0.5 \(run: 0.0001\)"):
        main([*TRAIN, *common, f"--resume={run2}", "--lr=0.5"])
    done = main([*TRAIN, *common, f"--resume={run2 / checkpoints.LAST_CHECKPOINT}"])
    assert done["history"] == again["history"] and done["run_dir"] == again["run_dir"]
    with pytest.raises(FileNotFoundError, match="--resume .*not found"):
        main([*TRAIN, *common, f"--resume={tmp / 'nowhere'}"])


def test_resume_keeps_the_saved_epochs_and_prints_no_dataset_suggestion(resumed, capsys):
    """Untyped --epoch would be suggested as 4 for the demo; a resumed run keeps its saved 2 and must not say 4."""
    tmp, common, _, _, again, run2 = resumed
    untyped_epoch = [f for f in TRAIN if not f.startswith("--epoch=")]
    from config import Config
    assert any(n.startswith("--epoch=4 (suggested") for n in Config.from_args([*untyped_epoch, *common]).notes)
    capsys.readouterr()
    done = main([*untyped_epoch, *common, f"--resume={run2}"])
    out = capsys.readouterr().out
    assert "suggested for" not in out and "--epoch 2 ->" not in out
    assert done["history"] == again["history"] and len(done["history"]) == 2


def test_resume_auto_takes_the_highest_run_with_a_training_state(tmp_path):
    base = tmp_path / "demo" / "M-U"
    for run, has_state in (("#1", True), ("#2", True), ("#10", True), ("#11", False), ("x", True)):
        (base / run).mkdir(parents=True)
        if has_state:
            (base / run / checkpoints.LAST_CHECKPOINT).write_bytes(b"")
    assert checkpoints.resolve_resume("auto", str(tmp_path), "demo", "M-U") == base / "#10" / checkpoints.LAST_CHECKPOINT
    assert checkpoints.resolve_resume("auto", str(tmp_path), "demo", "other") is None
    assert checkpoints.resolve_resume(str(base / "#2"), "", "", "") == base / "#2" / checkpoints.LAST_CHECKPOINT
    assert checkpoints.resolve_resume(None, str(tmp_path), "demo", "M-U") is None


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / checkpoints.LAST_CHECKPOINT
    checkpoints.atomic_torch_save({"epoch": 1, "w": torch.arange(4.0)}, path)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(40)  # half a file on disk, then the process "dies"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.atomic_torch_save({"epoch": 2, "w": torch.arange(9.0)}, path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1 and kept["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert os.listdir(tmp_path) == [checkpoints.LAST_CHECKPOINT]  # no temporary file left behind
    checkpoints.atomic_torch_save({"epoch": 2}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2


def test_schedule_plans_exactly_the_optimizer_steps_taken_with_gradient_accumulation(tmp_path):
    """warmup + linear decay must end at lr 0 on the last optimizer step: the planned total counts optimizer
    steps (micro-batches / --grad_accum_steps, the last partial group included), not batches."""
    from config import Config
    from dataset import TrainDataset
    from MIND_corpus import Corpus

    common = [f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'runs'}"]
    tiny = ["--demo_news=150", "--demo_users=60", "--demo_train_impressions=60", "--demo_dev_impressions=10",
            "--demo_test_impressions=10"]
    flags = ["--mode=train", "--dataset=demo", "--epoch=2", "--batch_size=16", "--grad_accum_steps=3",
             *tiny, *SMALL_MODEL, *common]
    result = main(flags)
    cfg = Config.from_args(flags)
    samples = len(TrainDataset(Corpus(cfg, need_glove=False, log=lambda *a: None).behaviors("train"), 4))
    batches = -(-samples // 16)
    steps = -(-batches // 3)
    state = torch.load(Path(result["run_dir"]) / checkpoints.LAST_CHECKPOINT, weights_only=True)
    assert state["step"] == 2 * steps
    assert state["scheduler"]["last_epoch"] == 2 * steps
    assert all(group["lr"] == 0.0 for group in state["optimizer"]["param_groups"])
