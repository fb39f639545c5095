"""Experiment trackers (`--tracker=tensorboard,mlflow,wandb`): MLflow and Weights & Biases as training callbacks.

TensorBoard is written by the run's own recorder (run_records.py); the others are `trainer.Callback`s, so the loop
knows nothing of them. Each sends, from rank 0: the config as parameters, every train_log.jsonl record as metrics
(`step/...` every --log_every optimizer steps, `epoch/...` with the dev metrics after each epoch, keyed by the
optimizer step), and, when training ends, the run folder's small files as artefacts (config, logs, curves,
per-impression records; the checkpoints stay in the run folder, whose path is a tag of the tracked run). A resumed
run continues the same tracked run: the ids are kept in `<run>/trackers.json`.

MLflow: the store is MLFLOW_TRACKING_URI when set, else SQLite in `<output_dir>/mlflow.db` with artefacts in
`<output_dir>/mlartifacts/`; the experiment is MLFLOW_EXPERIMENT_NAME or `<dataset>/<model>`.
W&B: online when logged in (WANDB_API_KEY or `wandb login`), else offline (WANDB_MODE wins over both); its files go
to `<run>/wandb/` (`wandb sync` uploads an offline run later); the project is WANDB_PROJECT or `mind-<dataset>`.
"""
from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path
from typing import Any, Iterator

import util
from trainer import Callback

IDS_FILE = "trackers.json"  # in the run folder: tracker -> id of the tracked run, for --resume
SKIPPED = {"last.pt", IDS_FILE, ".train.lock"}  # not sent as artefacts (with the checkpoint and tracker folders)
SKIPPED_FOLDERS = {"tensorboard", "wandb"}


def names(config) -> list[str]:
    return [n.strip() for n in str(config.tracker).split(",") if n.strip()]


def for_run(config) -> list[Callback]:
    """The callbacks of the trackers --tracker names (TensorBoard needs none: the run's recorder writes it)."""
    chosen = names(config)
    return [cls() for name, cls in TRACKER_CALLBACKS.items() if name in chosen]


def flat_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A train_log.jsonl record as flat metric names: {"kind": "step", "lr": {"model": 1e-4}} -> step/lr/model."""
    out: dict[str, float] = {}
    prefix = record.get("kind", "step")

    def add(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                add(f"{name}/{key}", sub)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)

    for key, value in record.items():
        if key not in ("kind", "step"):
            add(f"{prefix}/{key}", value)
    return out


def artefact_files(run_dir: Path, checkpoint_name: str) -> Iterator[Path]:
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_file() and rel.parts[0] not in SKIPPED_FOLDERS and path.name not in SKIPPED \
                and rel != Path(checkpoint_name):
            yield path


class Tracker(Callback):
    """What the trackers share: rank 0 only, started with the run, ids kept for a resumed run, ended with it."""

    name = ""

    def __init__(self):
        self.run_dir: Path | None = None
        self.config = None

    def on_train_start(self, trainer, run) -> None:
        if not trainer.runtime.is_main:
            return
        self.run_dir, self.config = Path(run.run_dir), trainer.config
        ids_file = self.run_dir / IDS_FILE
        saved = json.loads(ids_file.read_text()).get(self.name) if ids_file.is_file() else None
        self.start(saved)

    def on_record(self, trainer, record: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        self.log(flat_metrics(record), int(record.get("step", 0)))
        if record.get("kind") == "epoch":  # a run with a finished epoch can be resumed: keep the id for it
            ids_file = self.run_dir / IDS_FILE
            ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
            if ids.get(self.name) != self.run_id():
                util.write_lines_atomic(ids_file, [json.dumps({**ids, self.name: self.run_id()})])

    def on_train_end(self, trainer, error: BaseException | None) -> None:
        if self.run_dir is None:
            return
        files = list(artefact_files(self.run_dir, self.config.model_name)) if self.run_dir.is_dir() else []
        status = "finished" if error is None else ("killed" if isinstance(error, KeyboardInterrupt) else "failed")
        self.finish(files, status)
        self.run_dir = None

    # what each tracker implements
    def start(self, saved_id: str | None) -> None:
        raise NotImplementedError

    def run_id(self) -> str:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, files: list[Path], status: str) -> None:
        raise NotImplementedError


class MLflowTracker(Tracker):
    name = "mlflow"

    def start(self, saved_id: str | None) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError("--tracker=mlflow needs MLflow: pip install mlflow-skinny") from None
        cfg = self.config
        out = Path(cfg.output_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        if saved_id:
            self.id = saved_id
            self.client.update_run(saved_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"{cfg.dataset}/{cfg.model_name}"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = None if "MLFLOW_TRACKING_URI" in os.environ else (out / "mlartifacts").as_uri()
            try:
                experiment_id = self.client.create_experiment(name, artifact_location=location)
            except Exception:  # another process created it meanwhile
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=f"{cfg.model_name} {self.run_dir.name}",
                                     tags={"run_dir": str(self.run_dir.resolve())})
        self.id = run.info.run_id
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in cfg.to_dict().items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.id, params=params[i:i + 100])

    def run_id(self) -> str:
        return self.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, files: list[Path], status: str) -> None:
        for path in files:
            parent = path.parent.relative_to(self.run_dir).as_posix()
            self.client.log_artifact(self.id, str(path), artifact_path=None if parent == "." else parent)
        self.client.set_terminated(self.id, status.upper())


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(Tracker):
    name = "wandb"

    def start(self, saved_id: str | None) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError("--tracker=wandb needs Weights & Biases: pip install wandb") from None
        cfg = self.config
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or f"mind-{cfg.dataset}",
                              name=f"{cfg.model_name} {self.run_dir.name}", dir=str(self.run_dir), mode=mode,
                              config=cfg.to_dict(), id=saved_id, resume="allow" if saved_id else None,
                              tags=[cfg.model_name], notes=str(self.run_dir.resolve()))

    def run_id(self) -> str:
        return self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, files: list[Path], status: str) -> None:
        import wandb

        if files:
            artefact = wandb.Artifact(f"run-{self.config.dataset}-{self.config.model_name}-{self.run_dir.name}"
                                      .replace("#", ""), type="run-folder")
            for path in files:
                artefact.add_file(str(path), name=path.relative_to(self.run_dir).as_posix())
            self.run.log_artifact(artefact)
        self.run.finish(exit_code=0 if status == "finished" else 1)


TRACKER_CALLBACKS: dict[str, type[Tracker]] = {"mlflow": MLflowTracker, "wandb": WandbTracker}
