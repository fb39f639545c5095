"""--tracker (trackers.py): MLflow (SQLite store) and W&B (offline files) written from the training callbacks and read
back: the config as parameters, metrics per step and per epoch, the run folder's files as artefacts, a resumed run
continuing the same tracked run."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from main import cli, main
from common import SMALL_MODEL, TINY_DEMO  # noqa: E402

FAST = ["--mode=train", "--dataset=demo", "--epoch=2", "--max_steps_per_epoch=2", "--log_every=1", "--batch_size=32",
        "--no-plot", *TINY_DEMO, *SMALL_MODEL]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trackers_data")


def _dev_log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "dev_log.jsonl").read_text().splitlines()]


def test_mlflow_run_holds_params_metrics_and_artefacts_and_resumes(tmp_path, data_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    common = [f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'out'}"]
    result = main([*FAST, *common, "--tracker=mlflow", "--lr=0.003"])
    run_dir = Path(result["run_dir"])
    assert not (run_dir / "tensorboard").exists()  # not in --tracker: not written
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("demo/MHSA-MHSA").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == str(run_dir.resolve())
    assert run.data.params["lr"] == "0.003" and run.data.params["news_encoder"] == "MHSA"
    auc = client.get_metric_history(run.info.run_id, "epoch/auc")
    assert [(m.step, m.value) for m in sorted(auc, key=lambda m: m.step)] == [
        (2 * r["epoch"], pytest.approx(r["auc"])) for r in _dev_log(run_dir)]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "step/loss")) == [1, 2, 3, 4]
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "dev_log.jsonl", "train_log.jsonl", "dev"} <= artefacts
    assert "last.pt" not in artefacts and "MHSA-MHSA" not in artefacts  # checkpoints stay in the run folder
    # --resume continues the same MLflow run
    main(["--mode=train", f"--resume={run_dir}", "--epoch=3", *common, "--no-progress", "--tracker=mlflow"])
    (again,) = client.search_runs([run.info.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch/auc")) == [2, 4, 6]


def _wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-style log blocks of 32 KiB
    whose records are (crc32 4, length 2, type 1, data); type 1 full, 2 first, 3 middle, 4 last."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pending = path.read_bytes(), [], b""
    assert data[:4] == b":W&B"
    block, pos = 32768, 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_files_hold_config_metrics_and_artefacts(tmp_path, data_dir, monkeypatch):
    import wandb

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login: offline
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    result = main([*FAST, f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'out'}", "--tracker=wandb,tensorboard",
                   "--lr=0.003"])
    wandb.teardown()  # the W&B service writes the rest of the log as it shuts down
    run_dir = Path(result["run_dir"])
    assert (run_dir / "tensorboard").is_dir()
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    records = _wandb_records(log)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "history" in kinds and "artifact" in kinds
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "mind-demo" and run.display_name == f"MHSA-MHSA {run_dir.name}"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lr"] == 0.003 and config["news_encoder"] == "MHSA"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    epochs = [h for h in history if "epoch/auc" in h]
    assert [(h["_step"], h["epoch/auc"]) for h in epochs] == [(2 * r["epoch"], pytest.approx(r["auc"]))
                                                               for r in _dev_log(run_dir)]
    assert sorted(h["_step"] for h in history if "step/loss" in h) == [1, 2, 3, 4]
    artefact = next(r.artifact for r in records if r.WhichOneof("record_type") == "artifact")
    assert {"config.json", "dev_log.jsonl", "train_log.jsonl", "dev/per_impression.npz"} <= {
        e.path for e in artefact.manifest.contents}
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"] == run.run_id


def test_tracker_flags_bad_input(tmp_path, capsys):
    assert cli(["--mode=train", "--tracker=mlflow,neptune", f"--output_dir={tmp_path}"]) == 2
    assert "--tracker has 'neptune'; choose from tensorboard, mlflow, wandb" in capsys.readouterr().err
    assert cli(["--mode=train", "--tracker=mlflow", "--tensorboard", f"--output_dir={tmp_path}"]) == 2
    assert "--tensorboard with --tracker=mlflow: add tensorboard to --tracker" in capsys.readouterr().err
