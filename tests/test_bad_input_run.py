"""Training and evaluation without surprises (issue 13): every mistake or accident of a run ends in one clear line
(never a traceback, a wrong file or a silently different model), and evaluation ranks every impression by a
documented rule. Data-level bad input is tested in test_bad_input.py; the DDP pairings in test_ddp.py; the PLM's
frozen layers in test_plm_miner.py.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from common import SMALL_MODEL, TINY_DEMO  # noqa: E402

import checkpoints
import devices
import evaluation
import scorer
import trainer
from config import Config
from main import cli, main
from model import Model

ROOT = Path(__file__).resolve().parents[1]
# 608 training samples (TINY_DEMO); 3 steps of 64 per epoch.
TRAIN = ["--mode=train", "--dataset=demo", "--epoch=1", "--batch_size=64", "--max_steps_per_epoch=3", *TINY_DEMO,
         *SMALL_MODEL]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One NRMS run (1 epoch) on the tiny demo: `(tmp, data flag, result)`."""
    tmp = tmp_path_factory.mktemp("run13")
    data = f"--data_dir={tmp / 'data'}"
    result = main([*TRAIN, data, f"--output_dir={tmp / 'best_model'}"])
    return tmp, data, result


def new_run(tmp_path: Path, data: str, *extra: str) -> dict:
    return main([*TRAIN, data, f"--output_dir={tmp_path / 'runs'}", *extra])


# ----------------------------------------------------------------------------------------------------------
# Gradient accumulation: the epoch's last, incomplete window
# ----------------------------------------------------------------------------------------------------------

def test_last_partial_accumulation_window_steps_on_the_mean_of_its_micro_batches(trained, tmp_path, monkeypatch):
    """608 samples in batches of 150: 5 micro-batches (4 x 150, 1 x 8); 3 per step, so the second (last) step holds
    2. Its gradient must be the mean of those 2 micro-batches' gradients (not their sum / 3)."""
    _, data, _ = trained
    batches, steps, models = [], [], []
    forward = Model.forward

    def recording_forward(self, batch):
        if self.training:
            batches.append(batch)
        return forward(self, batch)

    build = trainer.build_optimizer

    def recording_build(model, config):
        optimizer = build(model, config)
        models.append(model)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: steps.append(
            {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None}))
        return optimizer

    monkeypatch.setattr(Model, "forward", recording_forward)
    monkeypatch.setattr(trainer, "build_optimizer", recording_build)
    main(["--mode=train", "--dataset=demo", "--epoch=1", "--batch_size=150", "--grad_accum_steps=3",
          "--dropout_rate=0", "--gradient_clip_norm=0", *TINY_DEMO, *SMALL_MODEL, data,
          f"--output_dir={tmp_path / 'runs'}"])
    monkeypatch.setattr(Model, "forward", forward)
    assert [len(b) for b in batches] == [150, 150, 150, 150, 8] and len(steps) == 2
    model = models[0]
    model.train()
    for step, window in ((0, batches[:3]), (1, batches[3:])):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in steps[step]:
                    p.copy_(steps[step][name][0])  # the weights this step's gradient was computed at
        model.zero_grad(set_to_none=True)
        (sum(model(b).loss for b in window) / len(window)).backward()
        for name, p in model.named_parameters():
            if name in steps[step]:
                torch.testing.assert_close(steps[step][name][1], p.grad, rtol=1e-4, atol=1e-7,
                                           msg=f"step {step + 1}, {name}")


# ----------------------------------------------------------------------------------------------------------
# Ranking rules: non-finite scores, padding, ties
# ----------------------------------------------------------------------------------------------------------

def test_nonfinite_scores_rank_after_every_finite_score_and_before_padding():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.5, nan, -inf, 0.2, 0.0, 0.0],
                           [inf, 1.0, 0.0, 0.0, 0.0, 0.0],
                           [-inf, -inf, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False, False],
                         [True, True, True, False, False, False],
                         [True, True, False, False, False, False]])
    ranks = evaluation.batch_ranks(logits, mask)
    assert ranks[0, :4].tolist()[0] == 1 and ranks[0, 3] == 2 and sorted(ranks[0, 1:3].tolist()) == [3, 4]
    assert ranks[1, :3].tolist() == [3, 1, 2]  # +inf is no usable score either
    for row, n in enumerate(mask.sum(1).tolist()):
        assert sorted(ranks[row, :n].tolist()) == list(range(1, n + 1))  # padding always after real candidates
    tied, nonfinite = evaluation.tie_and_nonfinite_counts(logits, mask)
    assert nonfinite.tolist() == [2, 1, 2] and tied.tolist() == [False, False, False]


def test_nonfinite_scores_are_ranked_last_counted_and_the_ranking_is_written(trained, monkeypatch, capsys):
    tmp, data, result = trained
    score_cached = Model.score_cached
    poisoned = {}

    def nan_scores(self, batch, news_vectors):
        logits = score_cached(self, batch, news_vectors)
        if not poisoned:  # an impression of the first batch with 3+ candidates: one NaN and one +inf score
            row = int(np.flatnonzero(batch.candidate_mask.sum(1).numpy() >= 3)[0])
            logits[row, 0], logits[row, 1] = float("nan"), float("inf")
            poisoned["impression"] = int(batch.impression_index[row])
        return logits

    monkeypatch.setattr(Model, "score_cached", nan_scores)
    report = main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", data])
    out = capsys.readouterr().out
    assert report["ties"]["nonfinite_scores"] == 2
    saved = json.loads((Path(result["checkpoint"]).parent / "dev" / "metrics.json").read_text())
    assert saved["ties"]["nonfinite_scores"] == 2
    ids, ranks = scorer.read_prediction(report["ranking"])
    row = ranks[poisoned["impression"]]
    assert sorted(row) == list(range(1, len(row) + 1)) and sorted(row[:2]) == [len(row) - 1, len(row)]
    assert str(ids[poisoned["impression"]]) in saved["ties"]["nonfinite_impressions"]
    assert "2 non-finite (NaN/inf) scores, ranked last" in out


def test_equal_scores_are_ordered_by_training_popularity_then_the_official_order():
    logits = torch.tensor([[1.0, 1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    popularity = torch.tensor([[2, 0, 1, 3], [5, 5, 1, 0]])  # 0 = most popular
    assert evaluation.batch_ranks(logits, mask, popularity).tolist() == [[4, 2, 3, 1], [3, 2, 1, 4]]
    # position: the official scorer's order (among equal scores the higher index first)
    assert evaluation.batch_ranks(logits, mask).tolist() == [[4, 3, 2, 1], [3, 2, 1, 4]]
    tied, _ = evaluation.tie_and_nonfinite_counts(logits, mask)
    assert tied.tolist() == [True, True]


def test_popularity_rank_orders_news_by_train_clicks_then_impressions_then_index():
    beh = {"candidates": np.array([1, 2, 2, 3, 3, 3, 4]), "labels": np.array([1, 1, 0, 1, 0, 0, 0])}
    # clicks: 1 -> 1, 2 -> 1, 3 -> 1, 4 -> 0; shown: 1 -> 1, 2 -> 2, 3 -> 3, 4 -> 1
    assert evaluation.popularity_rank(beh, 6).tolist() == [4, 2, 1, 0, 3, 5]  # order: 3, 2, 1, 4, 0, 5


def _empty_history_copy(beh: dict, reverse: bool) -> dict:
    """`beh` with every history emptied (each impression then has one score for all its candidates, for every
    model) and, with `reverse`, each impression's candidates (and labels) in reverse order."""
    out = dict(beh)
    histories = np.asarray(beh["histories"])
    out["histories"] = np.concatenate([histories, np.zeros((1, histories.shape[1]), histories.dtype)])
    out["history_row"] = np.full(len(np.asarray(beh["history_row"])), len(histories))
    if reverse:
        offsets = np.asarray(beh["offsets"])
        index = np.concatenate([np.arange(lo, hi)[::-1] for lo, hi in zip(offsets[:-1], offsets[1:])])
        out["candidates"] = np.asarray(beh["candidates"])[index]
        out["labels"] = np.asarray(beh["labels"])[index]
    return out


def test_empty_history_metrics_do_not_depend_on_candidate_order_under_popularity_ties(trained):
    from MIND_corpus import Corpus

    tmp, data, result = trained
    ckpt = checkpoints.load_checkpoint(result["checkpoint"])
    cfg = Config.from_dict(ckpt["config"])
    cfg.progress = False
    corpus = Corpus(cfg, need_glove=False, log=lambda *a: None)
    model = Model(cfg, corpus.meta, corpus.news)
    checkpoints.load_state(model, ckpt, result["checkpoint"])
    dev = corpus.behaviors("dev")
    rt = devices.Runtime(device=torch.device("cpu"))
    popularity = evaluation.popularity_rank(corpus.behaviors("train"), model.news_num)
    results = {(rule, reverse): evaluation.evaluate(model, _empty_history_copy(dev, reverse), cfg, rt,
                                                 tie_rank=popularity if rule == "popularity" else None)
               for rule in ("popularity", "position") for reverse in (False, True)}
    sizes = np.diff(np.asarray(dev["offsets"]))
    for key, res in results.items():
        assert res.ties["tied_impressions"] == int((sizes > 1).sum()), key  # every score of an impression ties
        assert res.ties["tie_break"] == key[0]
    for metric in scorer.METRIC_KEYS:
        assert results["popularity", True].metrics[metric] == results["popularity", False].metrics[metric], metric
    # the position rule depends on where the clicks stand: reversing the candidates changes the metrics
    assert results["position", True].metrics["mrr"] != results["position", False].metrics["mrr"]


def test_dev_mode_reports_the_tie_rule_and_its_count(trained, capsys):
    """The written ranking carries the tie rule, so the official scorer on the files gives the printed metrics."""
    tmp, data, result = trained
    for rule in ("popularity", "position"):
        report = main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", data, f"--tie_break={rule}"])
        assert report["ties"]["tie_break"] == rule
        official = scorer.official_style_score(report["truth"], report["ranking"])
        for key in scorer.METRIC_KEYS:
            assert report["metrics"][key] == pytest.approx(official[key], abs=1e-12)
    saved = json.loads((Path(result["checkpoint"]).parent / "dev" / "metrics.json").read_text())
    assert set(saved["ties"]) >= {"tie_break", "tied_impressions", "nonfinite_scores"}
    logged = json.loads((Path(result["run_dir"]) / "dev_log.jsonl").read_text().splitlines()[0])
    assert logged["tie_break"] == "popularity" and logged["nonfinite_scores"] == 0 and "tied_impressions" in logged


# ----------------------------------------------------------------------------------------------------------
# A run that trains nothing
# ----------------------------------------------------------------------------------------------------------

def test_training_data_without_a_usable_sample_is_an_error_before_any_run_folder(trained, tmp_path):
    tmp, _, _ = trained
    shutil.copytree(tmp / "data" / "MIND-demo", tmp_path / "data" / "MIND-demo")
    beh = tmp_path / "data" / "MIND-demo" / "train" / "behaviors.tsv"
    rows = [line.split("\t") for line in beh.read_text().splitlines()]
    # every candidate clicked: no impression has a negative, so every sample is filtered out
    beh.write_text("".join("\t".join(r[:4] + [" ".join(c.rsplit("-", 1)[0] + "-1" for c in r[4].split())]) + "\n"
                           for r in rows))
    # the data layer refuses it while loading the corpus (MIND_corpus), before the trainer's own check
    with pytest.raises(ValueError, match=r"behaviors.tsv: none of its 300 impressions has both a clicked and a "
                                         r"non-clicked candidate known to news.tsv \(0 without clicks, 300 without "
                                         r"negatives"):
        new_run(tmp_path, f"--data_dir={tmp_path / 'data'}")
    assert not list((tmp_path / "runs").rglob("#*"))


def test_an_empty_training_loader_never_saves_a_best_epoch(trained, tmp_path, monkeypatch, capsys):
    _, data, _ = trained
    loader = trainer.DataLoader
    monkeypatch.setattr(trainer, "DataLoader", lambda *a, **k: [] if "sampler" in k else loader(*a, **k))
    with pytest.raises(ValueError, match="epoch 1: the training data loader gave no batch .* nothing saved"):
        new_run(tmp_path, data)
    out = capsys.readouterr().out
    assert "*best*" not in out and "loss 0.0000" not in out
    assert not [p for p in (tmp_path / "runs").rglob("MHSA-MHSA") if p.is_file()]  # no checkpoint
    assert not list((tmp_path / "runs").rglob("last.pt"))
    assert not list((tmp_path / "runs").rglob("#*"))  # a failed start leaves no run folder


# ----------------------------------------------------------------------------------------------------------
# Which checkpoint: --dev_model_path / --test_model_path
# ----------------------------------------------------------------------------------------------------------

def test_a_run_folder_stands_for_its_checkpoint_and_outputs_go_into_that_run(trained, capsys):
    tmp, data, result = trained
    run = Path(result["run_dir"])
    report = main(["--mode=dev", f"--dev_model_path={run}", data])
    assert report["checkpoint"] == str(run / "MHSA-MHSA") and Path(report["ranking"]).parent == run / "dev"
    assert "is a run folder: using its checkpoint" in capsys.readouterr().out
    report = main(["--mode=test", f"--test_model_path={run}", data])
    assert Path(report["prediction"]) == run / "test" / "prediction.zip"
    assert not (run.parent / "dev").exists() and not (run.parent / "test").exists()


def test_a_folder_of_runs_or_without_a_checkpoint_is_refused_with_the_right_path(trained, tmp_path):
    tmp, data, result = trained
    run = Path(result["run_dir"])
    with pytest.raises(FileNotFoundError, match=r"folder of runs \(#1\); pass one run's checkpoint, e\.g\. .*#1/MHSA-MHSA"):
        main(["--mode=dev", f"--dev_model_path={run.parent}", data])
    with pytest.raises(FileNotFoundError, match="--test_model_path .* is a folder that holds no checkpoint"):
        main(["--mode=test", f"--test_model_path={tmp_path}", data])
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope not found \(--dev_model_path"):
        main(["--mode=dev", f"--dev_model_path={tmp_path / 'nope'}", data])


def test_test_mode_names_both_prediction_files(trained, capsys):
    tmp, data, result = trained
    main(["--mode=test", f"--test_model_path={result['checkpoint']}", data])
    out = capsys.readouterr().out
    folder = Path(result["checkpoint"]).parent / "test"
    assert f"wrote {folder / 'prediction.txt'} and {folder / 'prediction.zip'}" in out


# ----------------------------------------------------------------------------------------------------------
# One training per run folder
# ----------------------------------------------------------------------------------------------------------

def _lock(run: Path, pid: int) -> Path:
    path = run / checkpoints.LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return path


def test_a_run_folder_being_trained_refuses_a_second_training(trained, tmp_path):
    _, data, _ = trained
    first = new_run(tmp_path, data)
    run = Path(first["run_dir"])
    assert not (run / checkpoints.LOCK_FILE).exists()  # released at the end of the run
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock(run, other.pid)  # another live process trains this run
        with pytest.raises(checkpoints.RunLocked, match=rf"being trained by another process \(pid {other.pid} "):
            new_run(tmp_path, data, "--resume=auto", "--epoch=2")
        last = torch.load(run / checkpoints.LAST_CHECKPOINT, weights_only=True)
        assert last["epoch"] == 1  # untouched
        # the lock of a live process is never taken over
        lock = checkpoints.RunLock(run)
        with pytest.raises(checkpoints.RunLocked):
            lock.acquire()
    finally:
        other.kill()
        other.wait()
    # the same process gone: a stale lock, taken over with a note
    again = new_run(tmp_path, data, "--resume=auto", "--epoch=2")
    assert Path(again["run_dir"]) == run and again["history"][-1]["epoch"] == 2
    assert not (run / checkpoints.LOCK_FILE).exists()


def test_the_lock_is_exclusive_and_released(tmp_path):
    a, b = checkpoints.RunLock(tmp_path, log=lambda *x: None), checkpoints.RunLock(tmp_path, log=lambda *x: None)
    a.acquire()
    assert json.loads((tmp_path / checkpoints.LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(checkpoints.RunLocked, match=f"pid {os.getpid()}"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()
    assert not (tmp_path / checkpoints.LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------------------------------------------

def _interrupt_at(monkeypatch, call: int) -> None:
    """Ctrl-C during the `call`-th training forward pass (3 per epoch here)."""
    forward, seen = Model.forward, []

    def interrupted(self, batch):
        if self.training:
            seen.append(1)
            if len(seen) == call:
                raise KeyboardInterrupt
        return forward(self, batch)

    monkeypatch.setattr(Model, "forward", interrupted)


def test_ctrl_c_ends_with_the_saved_epoch_and_the_command_that_resumes(trained, tmp_path, monkeypatch, capsys):
    _, data, _ = trained
    _interrupt_at(monkeypatch, 5)  # epoch 2, second step
    code = cli([*TRAIN, "--epoch=2", data, f"--output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    run = tmp_path / "runs" / "demo" / "MHSA-MHSA" / "#1"
    assert f"interrupted in epoch 2: epoch 1 is saved in {run / 'last.pt'}; resume with: python main.py " in err
    args = shlex.split(err.split("resume with: ")[1])
    assert f"--resume={run}" in args and data in args
    monkeypatch.undo()
    resumed = main(args[2:])
    assert Path(resumed["run_dir"]) == run and [r["epoch"] for r in resumed["history"]] == [1, 2]


def test_ctrl_c_before_the_first_step_leaves_no_run_folder(trained, tmp_path, monkeypatch, capsys):
    _, data, _ = trained
    _interrupt_at(monkeypatch, 1)
    with pytest.raises(trainer.TrainingInterrupted, match="before any epoch finished: nothing to resume .*removed"):
        new_run(tmp_path, data)
    assert not list((tmp_path / "runs").rglob("#*"))


# ----------------------------------------------------------------------------------------------------------
# Flags, checked before any data is read
# ----------------------------------------------------------------------------------------------------------

BAD_FLAGS = ["--lr=0", "--lr=-1e-4", "--plm_lr=0", "--num_workers=-1", "--batch_size=0", "--eval_batch_size=0",
             "--epoch=0", "--grad_accum_steps=0", "--dropout_rate=1", "--dropout_rate=-0.1", "--max_history_num=0",
             "--negative_sample_num=0", "--weight_decay=-1", "--gradient_clip_norm=-1", "--early_stopping_epoch=0",
             "--max_steps_per_epoch=-1", "--seed=-1", "--long_term_masking_probability=1", "--word_embedding_dim=0",
             "--attention_dim=0", "--category_embedding_dim=0", "--cnn_window_size=-1", "--demo_news=0",
             "--disagreement_beta=-0.5", "--word_threshold=-1", "--warmup_ratio=1", "--log_every=0"]


# A component's settings are checked when the run uses that component (settings.py); main refuses them otherwise.
COMPONENT_OF = {"--plm_lr": ["--news_encoder=PLMNRMS"], "--long_term_masking_probability": ["--user_encoder=LSTUR"],
                "--cnn_window_size": ["--news_encoder=CNN"], "--disagreement_beta": ["--user_encoder=MINER"]}


@pytest.mark.parametrize("flag", BAD_FLAGS)
def test_out_of_range_flag_is_an_error_naming_it(flag):
    name = flag.split("=")[0]
    with pytest.raises(ValueError, match=f"invalid configuration:\n  {name} must be"):
        Config.from_args([flag, *COMPONENT_OF.get(name, [])])


def test_bad_flag_fails_before_any_folder_is_made(tmp_path, capsys):
    code = cli([*TRAIN, "--num_workers=-1", f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'runs'}"])
    assert code == 2 and "--num_workers must be >= 0, got -1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_dir_is_one_line_naming_it_before_data_is_read(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = cli([*TRAIN, f"--data_dir={tmp_path / 'data'}", f"--output_dir={blocker / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"error: --output_dir {blocker / 'runs'}: cannot write run folders under" in err
    assert not (tmp_path / "data").exists()  # no data was read (the demo would have been generated)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoints.tempfile, "NamedTemporaryFile", read_only)  # tests run as root: simulate it
    with pytest.raises(ValueError, match=r"--output_dir .*ro: cannot write run folders under .*\(Permission denied\)"):
        main([*TRAIN, f"--data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'ro'}"])
    assert not (tmp_path / "data").exists()


def test_a_failed_start_removes_the_run_folder_it_made(trained, tmp_path, monkeypatch):
    _, data, _ = trained
    loader = trainer.DataLoader

    def broken(*args, **kwargs):
        if "sampler" in kwargs:
            raise RuntimeError("DataLoader could not start its workers")
        return loader(*args, **kwargs)

    monkeypatch.setattr(trainer, "DataLoader", broken)
    with pytest.raises(RuntimeError, match="could not start"):
        new_run(tmp_path, data)
    assert (tmp_path / "runs" / "demo" / "MHSA-MHSA").is_dir()
    assert not list((tmp_path / "runs").rglob("#*"))


# ----------------------------------------------------------------------------------------------------------
# Progress output
# ----------------------------------------------------------------------------------------------------------

def test_epoch_summary_starts_on_its_own_line_under_progress_bars(trained, tmp_path):
    _, data, _ = trained
    proc = subprocess.run([sys.executable, "main.py", *TRAIN, "--progress", data, f"--output_dir={tmp_path / 'runs'}"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    text = proc.stdout
    at = text.index("epoch 1: loss")
    before = text[text.rfind("\n", 0, at) + 1:at]
    assert before.replace("\r", "").strip() == "", repr(before)  # only the bar's erasure, no bar text
    assert "epochs:" in text  # the bars were on


def test_transformers_loading_bar_follows_no_progress(capfd):
    from transformers import AutoModel

    import main as main_module
    from newsEncoders import OFFLINE_MINILM, resolve_plm_path

    path = resolve_plm_path(OFFLINE_MINILM)
    try:
        for progress, shown in (("--no-progress", False), ("--progress", True)):
            main_module.follow_progress_flag(Config.from_args(["--news_encoder=PLMNRMS", progress]))
            capfd.readouterr()
            AutoModel.from_pretrained(path)
            err = capfd.readouterr().err
            assert ("Loading weights" in err) == shown, (progress, err[-500:])
    finally:
        main_module.follow_progress_flag(Config.from_args(["--news_encoder=PLMNRMS", "--progress"]))
