"""Issue 22, section 2 (config, training loop, compare, aggregate): a config file is typed and checked like the
command line; a run never ends with a NaN or a "best" epoch that was never saved; compare and aggregate read and
name the right files and never pool different configurations."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from common import SMALL_MODEL, TINY_DEMO  # noqa: E402

from config import Config, build_parser
from main import cli, main

TRAIN = ["--mode=train", "--dataset=demo", "--epoch=1", "--batch_size=64", "--max_steps_per_epoch=3", *TINY_DEMO,
         *SMALL_MODEL]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    return err


# ----------------------------------------------------------------------------------------------------------
# --config_file: typed and checked exactly like the command line
# ----------------------------------------------------------------------------------------------------------

def _config_file(tmp_path: Path, **values) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return path


def _cli_with_file(tmp_path, capsys, **values) -> tuple[int, str]:
    path = _config_file(tmp_path, **values)
    code = cli([f"--config_file={path}", "--mode=aggregate", f"--output_dir={tmp_path / 'none'}"])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("key, value, says", [
    ("category_fusion", "false", "true or false"),  # a string is truthy: it turned fusion on
    ("progress", 0, "true or false"),
    ("batch_size", True, "an integer"),  # bool is an int in Python: it trained with batch 1
    ("epoch", 16.9, "an integer"),  # a traceback before
    ("epoch", "16", "an integer"),
    ("lr", "fast", "a number"),  # argparse's usage text before, without the file
    ("lr", True, "a number"),
    ("news_encoder", "NoSuchEncoder", "one of"),
    ("dev_criterion", 3, "one of"),
    ("epoch", None, "an integer"),
    ("KCNN_window_sizes", "1,2", "a list of integers"),
    ("runs", "a.npz", "a list of"),
])
def test_config_file_values_of_the_wrong_type_are_one_line_errors_naming_file_and_key(tmp_path, capsys, key, value,
                                                                                       says):
    code, err = _cli_with_file(tmp_path, capsys, **{key: value})
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert str(tmp_path / "config.json") in err and f'"{key}"' in err and says in err, err


@pytest.mark.parametrize("key, value, says", [
    ("batch_size", 0, "--batch_size must be >= 1"),
    ("lr", float("inf"), "finite"),  # JSON Infinity: Python's json reads it
    ("lr", float("nan"), "finite"),
    ("seed", -3, "--seed must be"),
])
def test_config_file_values_out_of_range_name_file_and_key(tmp_path, capsys, key, value, says):
    code, err = _cli_with_file(tmp_path, capsys, **{key: value})
    assert code == 2 and "\n" not in err, err
    assert str(tmp_path / "config.json") in err and f'"{key}"' in err and says in err, err


def test_config_file_unknown_key_names_it_and_the_closest_flag(tmp_path, capsys):
    code, err = _cli_with_file(tmp_path, capsys, batchsize=32)
    assert code == 2 and "\n" not in err, err
    assert '"batchsize"' in err and "--batch_size" in err and str(tmp_path / "config.json") in err


def test_config_file_values_of_the_right_type_are_taken_as_typed(tmp_path):
    path = _config_file(tmp_path, category_fusion=False, batch_size=32, lr=1, tensorboard=None, glove_path=None,
                        KCNN_window_sizes=[1, 3], dev_criterion="auc")
    cfg = Config.from_args([f"--config_file={path}"], file_values=json.loads(path.read_text()), file_name=str(path))
    assert cfg.category_fusion is False and cfg.batch_size == 32 and cfg.dev_criterion == "auc"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.KCNN_window_sizes == [1, 3] and cfg.tensorboard is None


def test_a_saved_config_json_is_accepted_as_it_is(tmp_path):
    """Every value a run writes into config.json (the parser's defaults with their types) passes the checks."""
    values = json.loads(Config.from_args([]).to_json())
    cfg = Config.from_args([], file_values=values, file_name="saved.json")
    assert {k: v for k, v in cfg.values.items() if k not in ("config_file", "resume", "seeds")} == \
        {k: v for k, v in values.items() if k not in ("config_file", "resume", "seeds")}


# ----------------------------------------------------------------------------------------------------------
# Command-line values: non-finite floats and seeds out of range are refused at parse time, naming the flag
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--lr=inf", "--lr=nan", "--weight_decay=inf", "--gradient_clip_norm=inf",
                                  "--plm_lr=inf", "--dropout_rate=nan", "--train_fraction=nan"])
def test_non_finite_float_flags_are_refused_naming_the_flag(flag):
    with pytest.raises(ValueError, match=f"{flag.split('=')[0]} must be a finite number"):
        Config.from_args(["--mode=train", "--news_encoder=PLMNRMS", flag])


@pytest.mark.parametrize("argv, flag", [(["--seed=4294967296"], "--seed"), (["--seeds=1,4294967296"], "--seeds"),
                                        (["--demo_seed=4294967296"], "--demo_seed")])
def test_seed_out_of_range_is_an_error_naming_the_flag(argv, flag):
    with pytest.raises(ValueError, match=f"{flag} must"):
        Config.from_args(["--mode=train", *argv])


# ----------------------------------------------------------------------------------------------------------
# Training: never a NaN or a never-saved "best" epoch
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The tiny demo corpus (generated once by a 1-step run)."""
    tmp = tmp_path_factory.mktemp("review22")
    main([*TRAIN, f"--data_dir={tmp / 'data'}", f"--output_dir={tmp / 'warmup'}", "--max_steps_per_epoch=1"])
    return tmp / "data"


def _runs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "runs").rglob("#*"))


def test_dev_split_without_clicks_is_an_error_before_any_run_folder(demo_data, tmp_path, monkeypatch, capsys):
    import MIND_corpus

    behaviors = MIND_corpus.Corpus.behaviors

    def no_dev_clicks(self, split):
        beh = behaviors(self, split)
        if split != "dev":
            return beh
        return {**beh, "labels": np.where(np.asarray(beh["labels"]) == 1, 0, beh["labels"]).astype(np.int8)}

    monkeypatch.setattr(MIND_corpus.Corpus, "behaviors", no_dev_clicks)
    code = cli([*TRAIN, f"--data_dir={demo_data}", f"--output_dir={tmp_path / 'runs'}"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "dev" in captured.err and "no epoch could be chosen as the best" in captured.err
    assert "\n" not in captured.err.strip()
    assert "best epoch" not in captured.out and "checkpoint:" not in captured.out
    assert _runs(tmp_path) == []


def _nan_loss_at(monkeypatch, call: int) -> None:
    from model import Model

    forward, calls = Model.forward, [0]

    def nan_at(self, batch):
        out = forward(self, batch)
        calls[0] += 1
        if calls[0] == call and self.training:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Model, "forward", nan_at)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_flags(demo_data, tmp_path, monkeypatch, capsys):
    """Epoch 1 (3 steps) trains; the loss of step 5 (epoch 2) is NaN: the run stops there, epoch 2 is never
    evaluated or "best", and last.pt still holds epoch 1."""
    _nan_loss_at(monkeypatch, 5)
    code = cli([*TRAIN, "--epoch=3", f"--data_dir={demo_data}", f"--output_dir={tmp_path / 'runs'}"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    err = captured.err.strip()
    assert "\n" not in err and "epoch 2, optimizer step 5" in err and "nan" in err and "--lr=" in err, err
    assert "epoch 2:" not in captured.out and captured.out.count("*best*") == 1
    (run,) = _runs(tmp_path)
    log = [json.loads(line) for line in (run / "dev_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
    import torch

    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_a_huge_learning_rate_never_gives_a_best_epoch(demo_data, tmp_path, capsys):
    code = cli([*TRAIN, "--lr=1e30", "--epoch=2", f"--data_dir={demo_data}", f"--output_dir={tmp_path / 'runs'}"])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    assert "*best*" not in captured.out and "--lr=1e+30" in captured.err, captured.err


def test_a_nan_dev_criterion_is_never_best(demo_data, tmp_path, monkeypatch, capsys):
    import scorer

    monkeypatch.setattr(scorer, "criterion_value", lambda metrics, name: float("nan"))
    code = cli([*TRAIN, f"--data_dir={demo_data}", f"--output_dir={tmp_path / 'runs'}"])
    captured = capsys.readouterr()
    assert code == 2 and "epoch 1: dev avg is nan" in captured.err, captured.err
    assert "*best*" not in captured.out and "checkpoint:" not in captured.out


def test_non_finite_dev_scores_are_never_best(demo_data, tmp_path, monkeypatch, capsys):
    """NaN scores are ranked last by the tie rule: the metrics would measure popularity, not the model."""
    import torch
    from model import Model

    score = Model.score_cached
    monkeypatch.setattr(Model, "score_cached", lambda self, batch, vectors: score(self, batch, vectors) * torch.nan)
    code = cli([*TRAIN, f"--data_dir={demo_data}", f"--output_dir={tmp_path / 'runs'}"])
    captured = capsys.readouterr()
    assert code == 2 and "non-finite dev scores" in captured.err, captured.err
    assert "*best*" not in captured.out


def test_a_run_without_a_best_epoch_fails_and_prints_no_checkpoint(demo_data, tmp_path, monkeypatch, capsys):
    import trainer

    decide = trainer.Trainer._decide
    monkeypatch.setattr(trainer.Trainer, "_decide", lambda self, run, result: {**decide(self, run, result),
                                                                               "improved": False})
    code = cli([*TRAIN, f"--data_dir={demo_data}", f"--output_dir={tmp_path / 'runs'}"])
    captured = capsys.readouterr()
    assert code == 2 and "no epoch of 1 was chosen as the best" in captured.err, captured.err
    assert "checkpoint:" not in captured.out


# ----------------------------------------------------------------------------------------------------------
# --mode=compare: damaged records, an output that is a file, the file a missing split names
# ----------------------------------------------------------------------------------------------------------

def _fake_records(run: Path, split: str = "dev", seed: int = 0) -> Path:
    import significance

    offsets = np.array([0, 2, 4, 6])
    labels = np.array([1, 0, 0, 1, 1, 0])
    per = {"index": np.arange(3), "auc": np.array([1.0, 0.0, 1.0]), "mrr": np.array([1.0, .5, 1.0]),
           "ndcg5": np.array([1.0, .6, 1.0]), "ndcg10": np.array([1.0, .6, 1.0]), "skipped_single_class": 0,
           "skipped_empty": 0}
    (run / split).mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text("{}")
    return significance.write_per_impression(run / split / "per_impression.npz", per, np.array([1, 2, 3]), offsets,
                                             labels, {"split": split, "dataset": "demo", "model": "M", "run": run.name,
                                                      "seed": seed})


def test_compare_a_truncated_records_file_is_one_line_naming_it(tmp_path, capsys):
    a = _fake_records(tmp_path / "#1")
    b = _fake_records(tmp_path / "#2", seed=1)
    b.write_bytes(b.read_bytes()[: len(b.read_bytes()) // 2])
    code = cli(["--mode=compare", "--runs", str(tmp_path / "#1"), str(tmp_path / "#2"),
                f"--output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(b) in err and "damaged" in err, err
    assert a.exists()


def test_compare_output_naming_an_existing_file_is_an_error(tmp_path, capsys):
    _fake_records(tmp_path / "#1")
    _fake_records(tmp_path / "#2", seed=1)
    taken = tmp_path / "results.txt"
    taken.write_text("mine\n")
    code = cli(["--mode=compare", "--runs", str(tmp_path / "#1"), str(tmp_path / "#2"), f"--compare_output={taken}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(taken) in err and "not a folder" in err, err
    assert taken.read_text() == "mine\n"


def test_compare_output_spelled_as_a_new_file_is_an_error_not_a_folder_of_that_name(tmp_path, capsys):
    """`--compare_output=results.md` (a path that does not exist yet) used to become a folder named results.md."""
    _fake_records(tmp_path / "#1")
    _fake_records(tmp_path / "#2", seed=1)
    wanted = tmp_path / "results.md"
    code = cli(["--mode=compare", "--runs", str(tmp_path / "#1"), str(tmp_path / "#2"), f"--compare_output={wanted}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(wanted) in err and "folder" in err, err
    assert not wanted.exists()


def test_compare_split_test_names_the_test_records_it_looked_for(tmp_path, capsys):
    _fake_records(tmp_path / "#1")  # dev records only
    _fake_records(tmp_path / "#2", seed=1)
    code = cli(["--mode=compare", "--split=test", "--runs", str(tmp_path / "#1"), str(tmp_path / "#2")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert str(tmp_path / "#1" / "test" / "per_impression.npz") in err and "--mode=test" in err, err


def test_compare_a_split_folder_of_the_other_split_is_refused(tmp_path, capsys):
    _fake_records(tmp_path / "#1")
    _fake_records(tmp_path / "#2", seed=1)
    code = cli(["--mode=compare", "--split=test", "--runs", str(tmp_path / "#1" / "dev"), str(tmp_path / "#2" / "dev")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "dev" in err and "--split=test" in err, err


# ----------------------------------------------------------------------------------------------------------
# --mode=aggregate: one row per configuration, never a pool of different ones; one run has no spread
# ----------------------------------------------------------------------------------------------------------

def _agg_run(root: Path, model: str, n: int, seed: int, auc: float, **config) -> None:
    run = root / "demo" / model / f"#{n}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seed": seed, "dev_criterion": "avg", "lr": 1e-4, "head_num": 4,
                                                 "output_dir": f"/somewhere/{n}", "device": "cpu", **config}))
    (run / "dev_log.jsonl").write_text(json.dumps({"epoch": 1, "auc": auc, "mrr": .3, "ndcg5": .3, "ndcg10": .4})
                                       + "\n")


def test_aggregate_groups_runs_by_configuration_not_by_model_name(tmp_path, capsys):
    _agg_run(tmp_path, "MHSA-MHSA", 1, 0, .60)
    _agg_run(tmp_path, "MHSA-MHSA", 2, 1, .62, output_dir="/elsewhere", device="cuda")  # same configuration
    _agg_run(tmp_path, "MHSA-MHSA", 3, 0, .70, lr=1e-3)  # another learning rate: not pooled
    _agg_run(tmp_path, "MHSA-MHSA", 4, 1, .72, lr=1e-3)
    result = main(["--mode=aggregate", f"--output_dir={tmp_path}"])
    out = capsys.readouterr().out
    rows = [line for line in result["markdown"].splitlines()
            if line.startswith("| demo") and line.split("|")[3].strip().isdigit()]  # the table, not the paired one
    assert len(rows) == 2, rows
    assert any("lr=0.0001" in r and "| 2 | 0,1 | 61.00 ± 1.41" in r for r in rows), rows
    assert any("lr=0.001" in r and "| 2 | 0,1 | 71.00 ± 1.41" in r for r in rows), rows
    assert "grouped by configuration" in out and "--lr" in out
    # paired by seed within a model name: the two configurations are the two "models" compared
    assert "aggregate_paired.tsv" in out


def test_aggregate_of_one_run_prints_n_1_and_no_spread(tmp_path):
    _agg_run(tmp_path, "NAML-ATT", 1, 0, .70)
    result = main(["--mode=aggregate", f"--output_dir={tmp_path}"])
    assert "± 0.00" not in result["markdown"] and "70.00 (n=1)" in result["markdown"]
    header, row = result["tsv"].splitlines()
    values = dict(zip(header.split("\t"), row.split("\t")))
    assert values["dev_auc_mean"] == "70.000000" and values["dev_auc_std"] == ""


# ----------------------------------------------------------------------------------------------------------
# --help names what the program does: per-dataset values of a flag's default
# ----------------------------------------------------------------------------------------------------------

def test_help_names_the_per_dataset_values_that_replace_a_default():
    """--plm_frozen_layers' help said 10/12 of the layers (5 of MiniLM's 6) while the demo uses 4: every flag a
    dataset sets where it is not typed names those values in its help, and they are the values the config takes."""
    from config import DATASET_SUGGESTIONS

    helps = {a.dest: a.help for a in build_parser()._actions}
    assert "demo 4" in helps["plm_frozen_layers"]
    for ds, values in DATASET_SUGGESTIONS.items():
        for flag, value in values.items():
            assert f"{ds} {value}" in helps[flag], flag
    cfg = Config.from_args(["--dataset=demo", "--news_encoder=PLMNRMS"])
    assert cfg.plm_frozen_layers == 4


# ----------------------------------------------------------------------------------------------------------
# Flags that do nothing in the mode used: a printed note naming them, from which modes read each flag
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, unread", [
    (["--mode=train", "--dev_model_path=x.pt", "--test_model_path=y.pt", "--impression_id=3"],
     ["dev_model_path", "impression_id", "test_model_path"]),
    (["--mode=dev", "--dev_model_path=x.pt", "--test_model_path=y.pt", "--lr=0.1", "--epoch=3", "--head_num=4"],
     ["epoch", "head_num", "lr", "test_model_path"]),
    (["--mode=test", "--test_model_path=y.pt", "--dev_model_path=x.pt", "--batch_size=8", "--dev_criterion=auc"],
     ["batch_size", "dev_criterion", "dev_model_path"]),
    (["--mode=pretrain", "--train_fraction=0.5", "--tie_break=position", "--dev_criterion=auc"],
     ["dev_criterion", "tie_break"]),  # --train_fraction is read by pretraining: no note
    (["--mode=aggregate", "--lr=0.1", "--dataset=small", "--output_dir=x"], ["lr"]),
    (["--mode=compare", "--runs", "a", "b", "--split=test", "--seed=3", "--device=cpu"], ["device"]),
    (["--mode=train", "--lr=0.1", "--seed=3", "--device=cpu", "--no-progress"], []),
])
def test_flags_a_mode_does_not_read_are_named_in_a_note(argv, unread):
    notes = Config.from_args(argv).unread_flags()
    assert [n.split()[0] for n in notes] == [f"--{f}" for f in unread], notes
    mode = argv[0].split("=")[1]
    assert all(f"does nothing in --mode={mode}" in n for n in notes)


def test_the_flags_evaluation_reads_are_those_it_takes_from_the_command_line():
    """main.EVAL_OVERRIDABLE (the flags dev/test/explain take over a checkpoint's config) and the modes declared
    beside each flag say the same thing, so the notes never call a flag they use unread (or the reverse)."""
    from config import flag_modes
    from main import EVAL_OVERRIDABLE

    read = {flag for flag, modes in flag_modes().items() if set(modes) & {"dev", "test", "explain"}}
    assert read - {"config_file"} == set(EVAL_OVERRIDABLE)


def test_main_prints_the_note_for_an_unread_flag(tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        main(["--mode=aggregate", f"--output_dir={tmp_path}", "--dev_model_path=x.pt"])
    assert "note: --dev_model_path does nothing in --mode=aggregate" in capsys.readouterr().out


def test_a_cross_flag_rule_broken_by_a_config_file_value_names_the_file(tmp_path):
    path = _config_file(tmp_path, news_encoder="NAML", category_fusion=True)  # NAML reads the categories itself
    with pytest.raises(ValueError, match=r'--category_fusion.*\n  \(from --config_file .*config.json: '
                                         r'"category_fusion", "news_encoder"\)'):
        Config.from_args([f"--config_file={path}"], file_values=json.loads(path.read_text()), file_name=str(path))


def test_under_ddp_every_rank_stops_when_one_ranks_loss_is_not_finite():
    """The stop is agreed through an all-reduce of a flag (no rank raises alone and leaves the others waiting): a
    rank whose own loss is finite stops too when the sum says another rank's was not."""
    from types import SimpleNamespace

    import trainer

    sent = []
    fake = SimpleNamespace(runtime=SimpleNamespace(distributed=True, amp="off"),
                           config=SimpleNamespace(lr=1e-4, gradient_clip_norm=4.0), raw=SimpleNamespace())
    fake._hints = lambda: trainer.divergence_hints(fake.config, "off")
    fake._global_sums = lambda values: (sent.append(values), [values[0] + 1.0])[1]  # the other rank: not finite
    state = trainer.TrainState(epoch=1, step=7)
    with pytest.raises(trainer.TrainingDiverged, match="epoch 2, optimizer step 8: the training loss is not finite "
                                                       "on another process"):
        trainer.Trainer._check_finite(fake, None, 2, state)
    assert sent == [[0.0]]
    fake._global_sums = lambda values: [values[0]]  # every rank finite: goes on
    trainer.Trainer._check_finite(fake, None, 2, state)
