"""Run folders and checkpoints under review (issue 22): the run lock's takeover is atomic and its release
owner-checked; dev/test/explain never write over a run's records from another checkpoint or mode; a full disk
while saving is one line with the previous files intact; a failed start's `#n` is given to the next run as the
docs say; pretraining, random-bytes and other-architecture checkpoints are one-line errors; `--explain_output`
writes the name it prints, and an empty history is drawn without a matplotlib warning."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from common import SMALL_MODEL, TINY_DEMO  # noqa: E402

import checkpoints
import run_records
import significance
from main import cli, main

ROOT = Path(__file__).resolve().parents[1]
# 608 training samples (TINY_DEMO); 3 steps of 64 per epoch.
TRAIN = ["--mode=train", "--dataset=demo", "--epoch=2", "--batch_size=64", "--max_steps_per_epoch=3", *TINY_DEMO,
         *SMALL_MODEL]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One NRMS run of 2 epochs on the tiny demo: `(tmp, data flag, result, run folder)`."""
    tmp = tmp_path_factory.mktemp("review_runs")
    data = f"--data_dir={tmp / 'data'}"
    result = main([*TRAIN, data, f"--output_dir={tmp / 'best_model'}"])
    return tmp, data, result, Path(result["run_dir"])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _stale_lock(run: Path) -> Path:
    path = run / checkpoints.LOCK_FILE
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    return path


# ----------------------------------------------------------------------------------------------------------
# §1.7 the run lock
# ----------------------------------------------------------------------------------------------------------

def test_two_takeovers_of_a_stale_lock_let_exactly_one_proceed(tmp_path, monkeypatch):
    """Both threads read the stale owner before either acts (the injected race): with check-then-unlink both went
    on (the second unlinked the first's fresh lock)."""
    _stale_lock(tmp_path)
    both_read = threading.Barrier(2)
    owner = checkpoints.RunLock.owner

    def owner_then_wait(self):
        found = owner(self)
        try:
            both_read.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return found

    monkeypatch.setattr(checkpoints.RunLock, "owner", owner_then_wait)
    outcome, locks = [], []

    def take():
        lock = checkpoints.RunLock(tmp_path, log=lambda *a: None)
        try:
            lock.acquire()
            outcome.append("held")
            locks.append(lock)
        except checkpoints.RunLocked:
            outcome.append("refused")

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcome) == ["held", "refused"]
    assert json.loads((tmp_path / checkpoints.LOCK_FILE).read_text())["pid"] == os.getpid()
    locks[0].release()
    assert not (tmp_path / checkpoints.LOCK_FILE).exists()


def test_two_processes_taking_over_a_stale_lock_one_proceeds(tmp_path):
    """Each process reports whether it got the lock; a holder keeps it until both have reported (however slowly
    they start under load), so the two attempts always overlap."""
    import time

    run = tmp_path / "run"
    run.mkdir()
    _stale_lock(run)
    script = ("import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import checkpoints\n"
              "run, me = Path(sys.argv[2]), Path(sys.argv[3])\n"
              "lock = checkpoints.RunLock(run, log=lambda *a: None)\n"
              "try:\n    lock.acquire()\nexcept checkpoints.RunLocked:\n    me.write_text('refused'); sys.exit(0)\n"
              "me.write_text('held')\n"
              "deadline = time.time() + 120\n"
              "while not (run.parent / 'release').exists() and time.time() < deadline: time.sleep(0.05)\n"
              "lock.release()\n")
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(ROOT), str(run), str(out)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for out in outs]
    deadline = time.time() + 120
    while not all(o.exists() for o in outs) and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "release").touch()
    for p in procs:
        p.wait(60)
    assert sorted(o.read_text() for o in outs) == ["held", "refused"]
    assert not (run / checkpoints.LOCK_FILE).exists()


def test_releasing_a_lock_owned_by_someone_else_keeps_it(tmp_path):
    lock = checkpoints.RunLock(tmp_path, log=lambda *a: None)
    lock.acquire()
    path = tmp_path / checkpoints.LOCK_FILE
    other = json.dumps({"pid": 1, "host": "elsewhere", "token": "theirs"})
    path.unlink()  # e.g. deleted by hand, then another process made its own
    path.write_text(other)
    lock.release()
    assert path.read_text() == other
    # and the same lock object released twice does nothing
    lock.release()
    assert path.read_text() == other


# ----------------------------------------------------------------------------------------------------------
# §2 never write over a run's records
# ----------------------------------------------------------------------------------------------------------

def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_dev_of_last_pt_writes_its_own_folder_and_keeps_the_best_records(trained, capsys):
    tmp, data, result, run = trained
    main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", data])  # the best: into dev/
    before = _files(run / "dev")
    capsys.readouterr()
    report = main(["--mode=dev", f"--dev_model_path={run / checkpoints.LAST_CHECKPOINT}", data])
    out = capsys.readouterr().out
    assert _files(run / "dev") == before  # the best epoch's records untouched
    assert Path(report["folder"]) == run / "dev-last"
    last_epoch = torch.load(run / checkpoints.LAST_CHECKPOINT, weights_only=True, mmap=True)["epoch"]
    assert f"{run / checkpoints.LAST_CHECKPOINT} (epoch {last_epoch}" in out
    assert f"wrote {run / 'dev-last' / 'metrics.json'}" in out
    meta = significance.load_per_impression(run / "dev-last" / significance.PER_IMPRESSION).meta
    assert meta["epoch"] == last_epoch and meta["checkpoint"].endswith(checkpoints.LAST_CHECKPOINT)


def test_compare_of_last_pt_reads_its_own_records_not_the_best(trained):
    tmp, data, result, run = trained
    last = run / checkpoints.LAST_CHECKPOINT
    main(["--mode=dev", f"--dev_model_path={last}", data])
    assert significance.resolve_run(str(last), "dev") == run / "dev-last" / significance.PER_IMPRESSION
    assert significance.resolve_run(str(result["checkpoint"]), "dev") == run / "dev" / significance.PER_IMPRESSION
    (run / "dev-last-2").mkdir()
    (run / "dev-last" / significance.PER_IMPRESSION).rename(run / "dev-last-2" / significance.PER_IMPRESSION)
    (run / "dev-last" / "per_impression_popularity.npz").unlink()
    with pytest.raises(FileNotFoundError, match="dev-last-2"):  # the records moved: named, never the best's read
        significance.resolve_run(str(last), "dev")
    (run / "dev-last-2" / significance.PER_IMPRESSION).rename(run / "dev-last" / significance.PER_IMPRESSION)
    (run / "dev-last-2").rmdir()


def test_dev_lists_metrics_json_and_reruns_refresh_only_their_own_records(trained, capsys):
    tmp, data, result, run = trained
    main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", data])
    out = capsys.readouterr().out
    assert f"wrote {run / 'dev' / 'metrics.json'}" in out
    saved = json.loads((run / "dev" / "metrics.json").read_text())
    again = main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", data])  # same provenance: same folder
    assert Path(again["folder"]) == run / "dev"
    other = main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", data, "--tie_break=position"])
    assert Path(other["folder"]).name.startswith("dev-") and Path(other["folder"]) != run / "dev-last"
    assert json.loads((run / "dev" / "metrics.json").read_text())["provenance"] == saved["provenance"]
    assert json.loads((Path(other["folder"]) / "metrics.json").read_text())["provenance"]["tie_break"] == "position"


def test_a_seed_typed_in_dev_mode_is_not_read_and_the_records_keep_the_runs_seed(trained, capsys):
    """--seed in dev/test replaced the run's seed: in the records (aggregate and compare pair runs by it) and in the
    --train_fraction share the popularity baseline and tie rule read. Now it is an unread flag, said so."""
    tmp, data, result, run = trained
    trained_seed = json.loads((run / "config.json").read_text())["seed"]
    capsys.readouterr()
    report = main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", data, f"--seed={trained_seed + 7}"])
    assert "--seed does nothing in --mode=dev" in capsys.readouterr().out
    meta = significance.load_per_impression(Path(report["folder"]) / "per_impression.npz").meta
    assert meta["seed"] == trained_seed, meta


def test_explain_never_replaces_a_record(trained):
    tmp, data, result, run = trained
    main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", data])
    for target, kept in ((run / "dev" / "metrics.png", run / "dev" / "metrics.json"),
                         (run / "config.png", run / "config.json"),
                         (run / "curves.png", run / "curves.png")):
        before = kept.read_bytes()
        with pytest.raises(FileExistsError, match=f"--explain_output.*{kept.name}"):
            main(["--mode=explain", f"--dev_model_path={result['checkpoint']}", "--impression_id=2", data,
                  f"--explain_output={target}"])
        assert kept.read_bytes() == before


def test_explain_output_without_extension_gets_png_and_says_so(trained, tmp_path, capsys):
    tmp, data, result, run = trained
    capsys.readouterr()
    out = main(["--mode=explain", f"--dev_model_path={result['checkpoint']}", "--impression_id=2", data,
                f"--explain_output={tmp_path / 'picture'}"])
    printed = capsys.readouterr().out
    assert out["png"] == str(tmp_path / "picture.png") and (tmp_path / "picture.png").is_file()
    assert out["json"] == str(tmp_path / "picture.json") and (tmp_path / "picture.json").is_file()
    assert f"wrote {tmp_path / 'picture.png'} and {tmp_path / 'picture.json'}" in printed
    assert not (tmp_path / "picture").exists()
    with pytest.raises(ValueError, match=r"--explain_output .*\.v2.*\.png"):
        main(["--mode=explain", f"--dev_model_path={result['checkpoint']}", "--impression_id=2", data,
              f"--explain_output={tmp_path / 'picture.v2'}"])
    # its own earlier picture of the same checkpoint and impression is refreshed
    again = main(["--mode=explain", f"--dev_model_path={result['checkpoint']}", "--impression_id=2", data,
                  f"--explain_output={tmp_path / 'picture.png'}"])
    assert again["png"] == str(tmp_path / "picture.png")


def test_explain_picture_of_an_empty_history_has_no_warning_and_says_so(tmp_path, monkeypatch):
    import matplotlib.axes

    texts = []
    real_text = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **k: texts.append(s) or real_text(self, x, y, s, *a, **k))
    data = {"impression_id": "1", "split": "dev", "model": "M", "word_attention": "w", "history": [],
            "candidates": [{"news_id": "N1", "title": "a b", "label": 1, "score": 0.5, "tokens": ["a", "b"],
                            "weights": [0.5, 0.5]}],
            "user_attention": {"attention": {"axes": ["history"], "weights": []}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run_records.plot_explanation(data, tmp_path / "x.png")
    assert out.is_file()
    assert any("empty history" in t for t in texts)


# ----------------------------------------------------------------------------------------------------------
# §2 a full disk while saving
# ----------------------------------------------------------------------------------------------------------

def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_files(trained, tmp_path, monkeypatch, capsys):
    tmp, data, _, _ = trained
    real_save = torch.save

    def full_at_epoch_2(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_epoch_2)
    out_dir = tmp_path / "runs"
    rc = cli([*TRAIN, data, f"--output_dir={out_dir}", "--dev_criterion=auc"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "--output_dir" in lines[0], err
    run = out_dir / "demo" / "MHSA-MHSA" / "#1"
    assert str(run) in lines[0]
    assert torch.load(run / checkpoints.LAST_CHECKPOINT, weights_only=True)["epoch"] == 1
    assert torch.load(run / "MHSA-MHSA", weights_only=True)["epoch"] == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    resumed = main([*TRAIN, data, f"--output_dir={out_dir}", f"--resume={run}"])  # once there is room again
    assert resumed["history"][-1]["epoch"] == 2


# ----------------------------------------------------------------------------------------------------------
# §2 a failed run's #n
# ----------------------------------------------------------------------------------------------------------

def test_a_failed_start_frees_its_number_as_the_docs_say(trained, tmp_path, monkeypatch):
    tmp, data, _, _ = trained
    import trainer

    def fails(self, run, epoch):
        raise RuntimeError("boom before any step")

    with monkeypatch.context() as m:
        m.setattr(trainer.Trainer, "_train_epoch", fails)
        with pytest.raises(RuntimeError, match="boom"):
            main([*TRAIN, data, f"--output_dir={tmp_path}"])
    base = tmp_path / "demo" / "MHSA-MHSA"
    assert not (base / "#1").exists()
    assert Path(main([*TRAIN, data, f"--output_dir={tmp_path}", "--epoch=1"])["run_dir"]) == base / "#1"
    docs = (ROOT / "docs/training.md").read_text()
    assert "the run index is never reused)" not in docs
    assert "fails before its first optimizer step" in docs


# ----------------------------------------------------------------------------------------------------------
# §2 checkpoints that are not a fine-tuned model of this framework
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(trained):
    tmp, data, _, _ = trained
    result = main(["--mode=pretrain", "--dataset=demo", "--epoch=1", "--batch_size=50", "--max_steps_per_epoch=2",
                   "--pretrain_tasks=contrastive", *TINY_DEMO, *SMALL_MODEL, data, f"--output_dir={tmp / 'pre'}"])
    return Path(result["checkpoint"])


def test_a_pretraining_checkpoint_for_dev_test_or_resume_is_one_line(trained, pretrained, capsys):
    tmp, data, _, _ = trained
    for argv in (["--mode=dev", f"--dev_model_path={pretrained}"], ["--mode=test", f"--test_model_path={pretrained}"],
                 ["--mode=explain", f"--dev_model_path={pretrained}", "--impression_id=2"],
                 [*TRAIN, f"--resume={pretrained.parent}", f"--output_dir={tmp / 'pre'}"]):
        assert cli([*argv, data]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "is a pretraining checkpoint" in err and f"--init_from={pretrained}" in err, err
    assert not (pretrained.parent / "dev").exists()


def test_a_random_bytes_checkpoint_is_one_line_of_ours(trained, tmp_path, capsys):
    tmp, data, _, _ = trained
    junk = tmp_path / "M-U"
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    assert cli(["--mode=dev", f"--dev_model_path={junk}", data]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(junk) in err and "not a checkpoint" in err, err
    assert "issue" not in err and "weights_only" not in err


def test_a_checkpoint_of_another_architecture_names_the_settings(trained, tmp_path):
    tmp, data, result, _ = trained
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert ckpt["model_settings"]["news"]["head_num"] == 4
    del ckpt["config"]["head_num"]  # e.g. a file from a version that did not save it: the default (20) is built
    path = tmp_path / "MHSA-MHSA"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"--head_num: checkpoint 4, now 20"):
        main(["--mode=dev", f"--dev_model_path={path}", data])
