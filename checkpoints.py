"""Checkpoints and run folders: `<output_dir>/<dataset>/<model>/#<n>/`, the run lock, atomic saves, loading a
checkpoint or a run folder, and `--resume`."""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import run_records
import util

CHECKPOINT_FORMAT = 1


LAST_CHECKPOINT = "last.pt"  # training state of a run, rewritten every epoch (what --resume reads)


def runs_base_dir(output_dir: str, dataset: str, model_name: str, keep: bool = True) -> Path:
    """`<output_dir>/<dataset>/<model>/`, created; a folder that cannot be created or written is a one-line error
    naming it (checked before any data is read, so a long data load never ends on an unwritable --output_dir).
    `keep=False` only checks: the folders it had to create are removed again (a run that then fails on its data
    leaves nothing behind)."""
    base = Path(output_dir) / dataset / model_name
    missing = [p for p in (base, *base.parents) if not p.exists()]
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=base, prefix=".write-test.", delete=True)
        probe.close()
    except OSError as e:
        raise ValueError(f"--output_dir {output_dir}: cannot write run folders under {base} "
                         f"({e.strerror or type(e).__name__}); pass a writable folder") from None
    if not keep:
        for folder in missing:  # deepest first; only the empty folders made here
            try:
                folder.rmdir()
            except OSError:
                break
    return base


def new_run_dir(output_dir: str, dataset: str, model_name: str, prefix: str = "#") -> Path:
    """`<output_dir>/<dataset>/<model>/<prefix><n>/` with n one above every existing run of that prefix (never
    reused); `#` for training runs, `pretrain#` for pretraining runs (pretraining.py)."""
    base = runs_base_dir(output_dir, dataset, model_name)
    cut = len(prefix)
    while True:
        taken = [int(p.name[cut:]) for p in base.iterdir() if p.name.startswith(prefix) and p.name[cut:].isdigit()]
        run = Path(base) / f"{prefix}{max(taken, default=0) + 1}"
        try:
            run.mkdir()  # atomic: two runs started together cannot get the same index
            return run
        except FileExistsError:
            continue


LOCK_FILE = ".train.lock"
# What a run folder holds before its first optimizer step: a run that fails there leaves nothing worth keeping.
# dev/ holds, by then, only the popularity baseline's per-impression records (written as training starts).
START_FILES = {"config.json", run_records.TRAIN_LOG, run_records.ENVIRONMENT, "tensorboard", LOCK_FILE, "dev",
               "wandb"}  # wandb: --tracker=wandb's files (trackers.py)


class RunLocked(ValueError):
    """Another live process trains in this run folder."""


class RunLock:
    """`<run>/.train.lock`, created with O_EXCL and holding the owner's pid and host, for the length of a training:
    a second training of the same run folder (two `--resume=auto` at once) stops with a message instead of both
    writing last.pt. A lock whose process is dead (same host) is stale and taken over, with a note."""

    def __init__(self, run_dir: Path, log: Callable = print):
        self.path = Path(run_dir) / LOCK_FILE
        self.log = log
        self.held = False

    def owner(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.path.read_text())
            return value if isinstance(value, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated as held

    @staticmethod
    def alive(owner: dict[str, Any]) -> bool:
        """False only when the owner is provably gone: a dead pid on this host."""
        pid, host = owner.get("pid"), owner.get("host")
        if not isinstance(pid, int) or host != socket.gethostname():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def check(self) -> None:
        """Raise RunLocked if a live process holds the lock (without taking it)."""
        owner = self.owner()
        if owner is not None and self.alive(owner):
            raise RunLocked(f"{self.path.parent} is being trained by another process (pid {owner.get('pid', '?')} on "
                            f"{owner.get('host', '?')}, lock {self.path}); wait for it to end, or stop it first. If "
                            f"no such process runs any more, delete {self.path}")

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released meanwhile: try again
                self.check()
                self.log(f"note: {self.path} was left by pid {owner.get('pid')}, which has ended; taking it over")
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            return
        self.check()
        raise RunLocked(f"could not take {self.path}: other processes keep creating it")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through util.atomic_write (fsynced): an interrupted write (crash, full disk, kill) leaves the
    previous file under `path` intact, never half a checkpoint."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    util.atomic_write(path, write, durable=True)


def save_checkpoint(path: Path, model: nn.Module, config, corpus_meta, extra: dict[str, Any]) -> None:
    raw = model.module if hasattr(model, "module") else model
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT,
        "model": raw.state_dict(),
        "config": config.to_dict(),
        # The components and the settings that define them (model.model_settings); `config` keeps every flag.
        "model_settings": raw.model_settings(),
        "corpus": corpus_meta.signature(),
        **extra,
    }, path)


def _run_checkpoints(run_dir: Path) -> list[Path]:
    """Best-model files in a run folder: `<news>-<user>` (named by its config.json when there is one)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        named = run_dir / f"{saved['news_encoder']}-{saved['user_encoder']}"
        if named.is_file():
            return [named]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sorted(p for p in run_dir.iterdir() if p.is_file() and "-" in p.name and p.suffix == "")


def resolve_checkpoint_path(value: str | Path, flag: str = "checkpoint", log: Callable = print) -> Path:
    """`--dev_model_path` / `--test_model_path` -> the checkpoint file. A run folder (`.../<news>-<user>/#1`) stands
    for the one checkpoint inside it (said in a note); a folder of runs, a folder without a checkpoint or a missing
    path is an error showing the path to pass. Outputs (dev/, test/) go beside the file: the run's own folder."""
    path = Path(value)
    example = "best_model/<dataset>/<news>-<user>/#<run>/<news>-<user>"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found ({flag}; expected {example})")
    if not path.is_dir():
        return path
    found = _run_checkpoints(path)
    if len(found) == 1:
        log(f"note: {flag} {value} is a run folder: using its checkpoint {found[0]}")
        return found[0]
    runs = sorted((p for p in path.glob("#*") if p.is_dir() and p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
    inside = [c for r in runs for c in _run_checkpoints(r)]
    if inside:
        raise FileNotFoundError(f"{flag} {value} is a folder of runs ({', '.join(r.name for r in runs)}); pass one "
                                f"run's checkpoint, e.g. {inside[-1]}")
    what = f"holds {len(found)} candidate files ({', '.join(p.name for p in found)})" if found else "holds no checkpoint"
    raise FileNotFoundError(f"{flag} {value} is a folder that {what}; pass the checkpoint file itself ({example})")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise ValueError(f"{path} is not a checkpoint written by this framework ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by this framework (no model/config entries)")
    return ckpt


def resolve_resume(value: str | None, output_dir: str, dataset: str, model_name: str) -> Path | None:
    """`--resume` -> the last.pt to continue from. A run folder or a last.pt file; `auto` = the highest-numbered run
    of <output_dir>/<dataset>/<model>/ that has a last.pt (None when there is none: a new run starts)."""
    if not value:
        return None
    if value == "auto":
        base = Path(output_dir) / dataset / model_name
        runs = [p for p in base.glob("#*") if p.name[1:].isdigit() and (p / LAST_CHECKPOINT).is_file()]
        return max(runs, key=lambda p: int(p.name[1:])) / LAST_CHECKPOINT if runs else None
    path = Path(value)
    if path.is_dir():
        path = path / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"--resume {value}: {path} not found (pass a run folder such as "
                                f"best_model/<dataset>/<news>-<user>/#<run>, its {LAST_CHECKPOINT}, or auto)")
    return path


def load_training_state(path: str | Path) -> dict[str, Any]:
    """A run's last.pt (weights_only; memory-mapped, so ranks loading it together share the pages)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise ValueError(f"{path} is not a training-state checkpoint of this framework "
                         f"({type(e).__name__}: {e})") from None
    needed = {"model", "config", "optimizer", "scheduler", "epoch", "step", "rng"}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        raise ValueError(f"{path} is not a training-state checkpoint of this framework (needs {sorted(needed)}; "
                         f"the best-model file beside it holds weights only)")
    return ckpt


def load_state(model: nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Load weights with an error that says which architecture the checkpoint belongs to."""
    raw = model.module if hasattr(model, "module") else model
    result = raw.load_state_dict(ckpt["model"], strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {result.unexpected_keys[:5]}")
    if problems:
        saved = ckpt["config"]
        raise ValueError(f"{path}: checkpoint of {saved.get('news_encoder')}-{saved.get('user_encoder')} does not "
                         f"fit the model built ({'; '.join(problems)})")
