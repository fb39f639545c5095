"""--mode=tune (tuning.py): an Optuna study whose trials are ordinary run folders; resuming after Ctrl-C or a dead
worker, two workers on one SQLite study, pruning, and one-line errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

import scorer
import tuning
from main import cli, main
from trainer import Callback, TrainingInterrupted
from common import SMALL_MODEL, TINY_DEMO, torchrun  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dataset=demo", "--epoch=2", "--max_steps_per_epoch=2", "--batch_size=32", "--no-plot", "--no-tensorboard",
        *TINY_DEMO, *SMALL_MODEL]
SPACE = "lr: {low: 1e-4, high: 1e-2, log: true}\ndropout_rate: {low: 0.0, high: 0.4, step: 0.1}\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tune_data")


def _setup(tmp_path, data_dir, space: str = SPACE, name: str = "space.yaml", extra=()):
    (tmp_path / name).write_text(space)
    return ["--mode=tune", f"--tune_space={tmp_path / name}", f"--data_dir={data_dir}",
            f"--output_dir={tmp_path / 'out'}", *FAST, *extra]


def _study(tmp_path, name="space"):
    folder = tmp_path / "out" / "tune" / name
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}"), folder


def _run_folders(folder: Path) -> list[Path]:
    return sorted((folder / "demo" / "MHSA-MHSA").glob("#*"))


def test_study_runs_n_trials_as_ordinary_run_folders(tmp_path, data_dir, capsys):
    out = main(_setup(tmp_path, data_dir, extra=["--n_trials=3", "--tune_pruner=none"]))
    study, folder = _study(tmp_path)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    runs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert sorted(runs) == _run_folders(folder) and len(set(runs)) == 3
    for t, run in zip(trials, runs):
        saved = json.loads((run / "config.json").read_text())
        assert saved["lr"] == pytest.approx(t.params["lr"]) and saved["dropout_rate"] == pytest.approx(t.params["dropout_rate"])
        assert [json.loads(x)["epoch"] for x in (run / "dev_log.jsonl").read_text().splitlines()] == [1, 2]
        assert (run / "MHSA-MHSA").is_file() and (run / "dev" / "per_impression.npz").is_file()
        record = json.loads((run / tuning.TRIAL_FILE).read_text())
        assert record["trial"] == t.number and record["state"] == "complete" and record["value"] == pytest.approx(t.value)
    assert out["best"].number == study.best_trial.number
    assert f"--lr={study.best_trial.params['lr']}" in out["command"] and "--mode=train" in out["command"]
    assert sorted(Path(p).name for p in out["pictures"]) == sorted(f"{n}.png" for n in tuning.PICTURES)
    # the trials are ordinary runs: aggregate, dev and compare read them
    agg = main(["--mode=aggregate", f"--output_dir={folder}"])
    assert len([r for r in agg["records"] if "incomplete" not in r]) == 3
    best_run = Path(study.best_trial.user_attrs["run_dir"])
    dev = main(["--mode=dev", f"--dev_model_path={best_run / 'MHSA-MHSA'}", f"--data_dir={data_dir}", "--no-progress"])
    log = [json.loads(x) for x in (best_run / "dev_log.jsonl").read_text().splitlines()]
    best_epoch = max(log, key=lambda r: scorer.criterion_value(r, "avg"))
    assert dev["metrics"]["auc"] == pytest.approx(best_epoch["auc"], abs=1e-9)
    assert scorer.criterion_value(best_epoch, "avg") == pytest.approx(study.best_value)
    cmp = main(["--mode=compare", "--runs", *map(str, runs[:2]), "--resamples=50", f"--compare_output={tmp_path / 'c'}"])
    assert {(r["a"], r["b"]) for r in cmp["rows"]} == {("MHSA-MHSA #1", "MHSA-MHSA #2")}


class InterruptAt(Callback):
    """Ctrl-C at the start of epoch `epoch` of the `run`-th training run this process starts."""

    def __init__(self, run: int, epoch: int):
        self.run, self.epoch, self.started = run, epoch, 0

    def on_train_start(self, trainer, run) -> None:
        self.started += 1

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if self.started == self.run and epoch == self.epoch:
            raise KeyboardInterrupt


def test_interrupted_study_resumes_with_no_trial_lost_or_run_twice(tmp_path, data_dir, capsys):
    argv = _setup(tmp_path, data_dir, extra=["--n_trials=3", "--tune_pruner=none"])
    with pytest.raises(TrainingInterrupted) as e:
        main(argv, callbacks=[InterruptAt(run=2, epoch=2)])
    assert "python main.py --mode=tune" in str(e.value) and "--n_trials=3" in str(e.value)
    study, folder = _study(tmp_path)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "FAIL", "WAITING"]  # the interrupted trial queued its own retry
    interrupted = study.get_trials()[1]
    main(argv)  # the same command again
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    retry = trials[2]
    assert retry.user_attrs["retry_of"] == 1 and retry.params == interrupted.params
    assert retry.user_attrs["run_dir"] == interrupted.user_attrs["run_dir"] == retry.user_attrs["resume_run"]
    assert tuning.counted_trials(study) == 3
    runs = _run_folders(folder)
    assert len(runs) == 3  # one run folder per trial: the retry resumed the interrupted one
    resumed = Path(retry.user_attrs["run_dir"])
    assert [json.loads(x)["epoch"] for x in (resumed / "dev_log.jsonl").read_text().splitlines()] == [1, 2]
    assert retry.intermediate_values.keys() == {1, 2}


def test_a_trial_left_running_by_a_dead_worker_is_failed_and_queued_again(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(tuning, "HEARTBEAT_SECONDS", 1)
    argv = _setup(tmp_path, data_dir, extra=["--n_trials=2", "--tune_pruner=none"])
    folder = tmp_path / "out" / "tune" / "space"
    folder.mkdir(parents=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'study.db'}", heartbeat_interval=1, grace_period=4)
    study = optuna.create_study(study_name="space", storage=storage, direction="maximize")
    space = tuning.parse_space({"lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                "dropout_rate": {"low": 0.0, "high": 0.4, "step": 0.1}}, "x", __import__(
                                    "config").build_parser())
    study.set_user_attr("search_space", json.dumps(space, sort_keys=True))
    study.set_user_attr("metric", "avg")
    dead = study.ask()  # a worker that took a trial, beat once and died
    dead.suggest_float("lr", 1e-4, 1e-2, log=True)
    dead.suggest_float("dropout_rate", 0.0, 0.4, step=0.1)
    storage.record_heartbeat(dead._trial_id)
    time.sleep(5)
    main(argv)
    trials = study.get_trials()
    assert trials[0].state.name == "FAIL"
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params
    assert [t.state.name for t in trials[1:]] == ["COMPLETE", "COMPLETE"]
    assert len(_run_folders(folder)) == 2


def test_a_pruned_trial_stops_cleanly_and_is_recorded(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(tuning.PRUNERS, "median", lambda cfg: optuna.pruners.ThresholdPruner(lower=2.0))
    argv = _setup(tmp_path, data_dir, extra=["--n_trials=1", "--epoch=3"])
    with pytest.raises(ValueError, match="no trial completed"):
        main(argv)
    study, folder = _study(tmp_path)
    (trial,) = study.get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    run = Path(trial.user_attrs["run_dir"])
    assert json.loads((run / tuning.TRIAL_FILE).read_text())["state"] == "pruned"
    assert len((run / "dev_log.jsonl").read_text().splitlines()) == 1
    assert (run / "last.pt").is_file() and (run / "MHSA-MHSA").is_file()  # the epoch it did is kept
    assert not (run / ".train.lock").exists()


def test_two_workers_share_one_sqlite_study(tmp_path, data_dir):
    main(["--mode=train", f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'warm'}", *FAST, "--epoch=1",
          "--max_steps_per_epoch=1"])  # the demo corpus and its cache exist before the workers start
    argv = _setup(tmp_path, data_dir, extra=["--n_trials=4", "--tune_pruner=none"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "main.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert all("=== trial" in o for o in outputs), "each worker ran trials"
    study, folder = _study(tmp_path)
    trials = study.get_trials()
    # at least --n_trials; two workers that start their last trials together may each start one
    assert 4 <= len(trials) <= 5 and all(t.state.name == "COMPLETE" for t in trials)
    runs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(runs)) == len(trials) and sorted(map(Path, runs)) == _run_folders(folder)
    done_by = [int(line.split()[2].rstrip(":")) for o in outputs for line in o.splitlines()
               if line.startswith("=== trial")]
    assert sorted(done_by) == [t.number for t in trials]  # every trial run by exactly one worker


def test_grid_sampler_walks_the_grid_once(tmp_path, data_dir, capsys):
    space = "dropout_rate: {choices: [0.1, 0.3]}\nhead_num: {choices: [2, 4]}\n"
    main(_setup(tmp_path, data_dir, space, extra=["--n_trials=9", "--tune_sampler=grid", "--tune_pruner=none",
                                                  "--epoch=1"]))
    assert "the grid has 4 points" in capsys.readouterr().out
    study, _ = _study(tmp_path)
    assert sorted((t.params["dropout_rate"], t.params["head_num"]) for t in study.get_trials()) == [
        (0.1, 2), (0.1, 4), (0.3, 2), (0.3, 4)]


BAD_SPACES = {
    "empty": ("space.yaml", "", "space.yaml: empty"),
    "malformed JSON": ("space.json", '{"lr": {"low": 1e-4,', "space.json: not valid JSON (line 1"),
    "malformed YAML": ("space.yaml", "lr: {low: 1e-4\n", "space.yaml: not valid YAML"),
    "unknown flag": ("space.yaml", "learning_rate: {low: 1e-4, high: 1e-2}\n", "space.yaml: learning_rate: no such flag"),
    "range on a categorical flag": ("space.yaml", "user_encoder: {low: 1, high: 2}\n",
                                    "user_encoder: --user_encoder takes a value from a set"),
    "range on a switch": ("space.yaml", "use_category_glove: {low: 0, high: 1}\n", "use_category_glove: --use_category"),
    "bad choice": ("space.yaml", "user_encoder: {choices: [MHSA, NOPE]}\n", "'NOPE' is not a choice of --user_encoder"),
    "value refused by the flag": ("space.yaml", "dropout_rate: {low: 0.1, high: 1.5}\n",
                                  "dropout_rate: the value 1.5 is refused: --dropout_rate"),
    "not tunable": ("space.yaml", "output_dir: {choices: [a, b]}\n", "output_dir: says what to run or where"),
    "log with zero": ("space.yaml", "lr: {low: 0, high: 1e-2, log: true}\n", "lr: a log scale needs low > 0"),
    "not a mapping": ("space.yaml", "- lr\n", "expected a mapping of flag"),
}


@pytest.mark.parametrize("case", BAD_SPACES, ids=list(BAD_SPACES))
def test_bad_search_space_is_a_one_line_error_naming_the_file_and_key(case, tmp_path, data_dir, capsys):
    name, text, expected = BAD_SPACES[case]
    assert cli(_setup(tmp_path, data_dir, text, name=name)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tune_space ") and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "tune" / "space" / "study.db").exists() or case == "value refused by the flag"


@pytest.mark.parametrize("extra,expected", [
    (["--tune_metric=ndcg20"], "--tune_metric 'ndcg20' is not a dev metric; choose from auc, mrr"),
    (["--tune_storage=sqlite:////no/such/folder/study.db"], "--tune_storage sqlite:////no/such/folder/study.db: "
                                                            "cannot open the study storage"),
    (["--tune_storage=postgresql://u:p@127.0.0.1:9/db"], "--tune_storage postgresql://u:p@127.0.0.1:9/db: cannot open"),
    (["--tune_sampler=grid"], "--tune_sampler=grid: --tune_space"),
])
def test_bad_tuning_flags_are_one_line_errors(extra, expected, tmp_path, data_dir, capsys):
    assert cli(_setup(tmp_path, data_dir, extra=extra)) == 2
    err = capsys.readouterr().err.strip()
    # a flag's own check is one line under config.py's "invalid configuration:" heading, like every other flag's
    assert sum(expected in line for line in err.splitlines()) == 1 and len(err.splitlines()) <= 2, err


def test_a_study_created_with_another_space_is_refused(tmp_path, data_dir, capsys):
    assert cli(_setup(tmp_path, data_dir, extra=["--n_trials=1", "--epoch=1"])) == 0
    capsys.readouterr()
    other = "lr: {low: 1e-5, high: 1e-2, log: true}\ndropout_rate: {low: 0.0, high: 0.4, step: 0.1}\n"
    assert cli(_setup(tmp_path, data_dir, other, extra=["--n_trials=2", "--epoch=1"])) == 2
    err = capsys.readouterr().err.strip()
    assert "space.yaml: study 'space' was created with another search space (differs in: lr)" in err
    assert len(err.splitlines()) == 1
    assert cli(_setup(tmp_path, data_dir, extra=["--n_trials=2", "--epoch=1", "--tune_metric=auc"])) == 2
    assert "--tune_metric auc: study 'space' optimises avg" in capsys.readouterr().err


def test_mode_tune_needs_a_space_file(tmp_path, capsys):
    assert cli(["--mode=tune", f"--output_dir={tmp_path}"]) == 2
    assert "--mode=tune needs --tune_space=<file>" in capsys.readouterr().err


def test_a_trial_runs_as_a_torchrun_job_with_one_study_worker(tmp_path, data_dir):
    """torchrun --nproc_per_node=2 main.py --mode=tune: rank 0 alone talks to the study; every trial trains on both
    ranks (2 processes in its environment.json); the study holds each trial once."""
    main(["--mode=train", f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'warm'}", *FAST, "--epoch=1",
          "--max_steps_per_epoch=1"])  # the corpus cache exists before the ranks start
    argv = _setup(tmp_path, data_dir, extra=["--n_trials=2", "--tune_pruner=none"])
    proc = torchrun(argv, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("=== trial") == 2  # printed by rank 0 only
    study, folder = _study(tmp_path)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    runs = _run_folders(folder)
    assert sorted(Path(t.user_attrs["run_dir"]) for t in trials) == runs
    for run in runs:
        assert json.loads((run / "environment.json").read_text())["world_size"] == 2


def test_seeds_train_the_best_values_once_per_seed(tmp_path, data_dir):
    out = main(_setup(tmp_path, data_dir, extra=["--n_trials=1", "--epoch=1", "--tune_pruner=none", "--seeds=1,2"]))
    best = out["best"].params
    runs = [Path(r["run_dir"]) for r in out["seeds"]["runs"]]
    assert [p.parent.parent.parent for p in runs] == [Path(out["folder"]) / "best"] * 2
    for seed, run in zip((1, 2), runs):
        saved = json.loads((run / "config.json").read_text())
        assert saved["seed"] == seed and saved["lr"] == pytest.approx(best["lr"])
    assert len(out["seeds"]["records"]) == 2


def test_tuning_flags_without_mode_tune_are_an_error(tmp_path, capsys):
    assert cli(["--mode=train", "--n_trials=5", "--tune_sampler=random", f"--output_dir={tmp_path}"]) == 2
    assert "--n_trials, --tune_sampler: settings of --mode=tune; add --mode=tune or drop them" in capsys.readouterr().err


def test_a_trials_config_json_reruns_with_config_file(tmp_path, data_dir):
    """A trial's config.json holds the tuning flags' defaults: --config_file re-runs it as a plain training run."""
    main(_setup(tmp_path, data_dir, extra=["--n_trials=1", "--epoch=1", "--tune_pruner=none"]))
    study, folder = _study(tmp_path)
    run = Path(study.best_trial.user_attrs["run_dir"])
    again = main([f"--config_file={run / 'config.json'}", f"--output_dir={tmp_path / 'again'}"])
    assert json.loads((Path(again["run_dir"]) / "config.json").read_text())["lr"] == pytest.approx(
        study.best_trial.params["lr"])
