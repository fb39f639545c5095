"""Checkpoints and run folders: `<output_dir>/<dataset>/<model>/#<n>/`, the run lock, atomic saves, loading a
checkpoint or a run folder, and `--resume`."""
from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import time
import uuid
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
    """`<output_dir>/<dataset>/<model>/<prefix><n>/` with n one above every existing run of that prefix (never the
    index of a folder that exists; a run that failed before its first step and was removed frees its index, as
    docs/training.md says); `#` for training runs, `pretrain#` for pretraining runs (pretraining.py)."""
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
    """`<run>/.train.lock`, holding the owner's pid, host and a token, for the length of a training: a second
    training of the same run folder (two `--resume=auto` at once) stops with a message instead of both writing
    last.pt.

    The owner keeps the file open under an exclusive `flock` (released by the kernel when the process ends, however
    it ends), and every decision about the file (free, stale, taken over) is made while holding that flock: two
    processes taking over the same stale lock cannot both proceed. A file whose flock is free but which names a
    live process on this host, or a process on another host, is still held (a lock written by an older version,
    or a file system without flock); one naming a dead pid on this host is stale and taken over, with a note.
    `release` removes the file only while it is still this lock's own (same file, same token)."""

    def __init__(self, run_dir: Path, log: Callable = print):
        self.path = Path(run_dir) / LOCK_FILE
        self.log = log
        self.held = False
        self.token = uuid.uuid4().hex
        self._fd: int | None = None

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

    def _locked_message(self, owner: dict[str, Any] | None) -> str:
        owner = owner or {}
        return (f"{self.path.parent} is being trained by another process (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}, lock {self.path}); wait for it to end, or stop it first. If no such "
                f"process runs any more, delete {self.path}")

    def check(self) -> None:
        """Raise RunLocked if a live process holds the lock (without taking it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError:  # unreadable: only its owner, if readable, can say
            owner = self.owner()
            if owner is not None and self.alive(owner):
                raise RunLocked(self._locked_message(owner)) from None
            return
        try:
            if not _try_flock(fd, shared=True):
                raise RunLocked(self._locked_message(self.owner()))
        finally:
            os.close(fd)  # also drops the shared flock
        owner = self.owner()
        if owner is not None and self.alive(owner):
            raise RunLocked(self._locked_message(owner))

    def acquire(self) -> None:
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_flock(fd):
                current = self._is_current(fd)
                os.close(fd)
                if current:
                    raise RunLocked(self._locked_message(self.owner()))
                continue  # its owner is releasing it (the file is gone or new): try again
            if not self._is_current(fd):  # removed by its releasing owner between our open and flock
                os.close(fd)
                continue
            owner = self.owner()
            if owner and owner.get("token") != self.token:
                if self.alive(owner):
                    os.close(fd)
                    raise RunLocked(self._locked_message(owner))
                self.log(f"note: {self.path} was left by pid {owner.get('pid')}, which has ended; taking it over")
            self._write_owner(fd)
            self._fd, self.held = fd, True
            return
        raise RunLocked(f"could not take {self.path}: other processes keep creating and removing it")

    def _is_current(self, fd: int) -> bool:
        """Whether `fd` is still the file at `self.path` (not one unlinked, or replaced, since it was opened)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def _write_owner(self, fd: int) -> None:
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file if it is still this lock's (same file and token); another owner's is left alone."""
        if not self.held:
            return
        self.held = False
        fd, self._fd = self._fd, None
        try:
            if fd is not None and self._is_current(fd) and (self.owner() or {}).get("token") == self.token:
                os.unlink(self.path)  # while the flock is still held: nobody decides about the file meanwhile
        except FileNotFoundError:
            pass
        finally:
            if fd is not None:
                os.close(fd)


def _try_flock(fd: int, shared: bool = False) -> bool:
    """Take a non-blocking flock on `fd`: False when another open file holds a conflicting one. Where flock is not
    available (no fcntl, or a file system that refuses it) the pid/host protocol alone decides (True)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return True
        raise


def atomic_torch_save(obj: Any, path: Path, flag: str = "--output_dir") -> None:
    """torch.save through util.atomic_write (fsynced): an interrupted write (crash, full disk, kill) leaves the
    previous file under `path` intact, never half a checkpoint. A write that fails (disk full, quota, read-only file
    system) is one UnusableFolder line naming the folder and `flag`, the flag that chose it."""
    path = Path(path)

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    with util.writing_into(path.parent, flag, f"{path.name} (the previous {path.name}, if any, is kept)"):
        try:
            util.atomic_write(path, write, durable=True)
        except RuntimeError as e:  # torch's zip writer may report the failed write itself
            if "write" not in str(e).lower():
                raise
            raise OSError(str(e).splitlines()[0]) from e


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


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Best-model files in a run folder: `<news>-<user>` (named by its config.json when there is one)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        named = run_dir / f"{saved['news_encoder']}-{saved['user_encoder']}"
        if named.is_file():
            return [named]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sorted(p for p in run_dir.iterdir() if p.is_file() and "-" in p.name and p.suffix == "")


def is_best_model_file(path: Path) -> bool:
    """Whether `path` is its run's best-model file (`<news>-<user>`), not last.pt or another checkpoint."""
    path = Path(path)
    return path.name != LAST_CHECKPOINT and run_checkpoints(path.parent) == [path]


def records_name(path: Path, split: str) -> str:
    """The records folder of an evaluation of checkpoint `path` (beside it): `<split>` for the run's best-model
    file, `<split>-<stem>` for any other (`dev-last` for last.pt); evaluation.records_folder numbers it `-2`, `-3`,
    ... beside another evaluation's records."""
    return split if is_best_model_file(path) else f"{split}-{Path(path).stem}"


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
    found = run_checkpoints(path)
    if len(found) == 1:
        log(f"note: {flag} {value} is a run folder: using its checkpoint {found[0]}")
        return found[0]
    runs = sorted((p for p in path.glob("#*") if p.is_dir() and p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
    inside = [c for r in runs for c in run_checkpoints(r)]
    if inside:
        raise FileNotFoundError(f"{flag} {value} is a folder of runs ({', '.join(r.name for r in runs)}); pass one "
                                f"run's checkpoint, e.g. {inside[-1]}")
    what = f"holds {len(found)} candidate files ({', '.join(p.name for p in found)})" if found else "holds no checkpoint"
    raise FileNotFoundError(f"{flag} {value} is a folder that {what}; pass the checkpoint file itself ({example})")


def _torch_load(path: Path, what: str, **kwargs) -> Any:
    """torch.load(weights_only=True) with one line of ours for a file torch cannot read (random bytes, a truncated
    file, a pickle of other objects): torch's own text asks the user to file a torch issue, which is not the fix."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        text = str(e)
        if "WeightsUnpickler error:" in text:  # the weights-only lecture around the one line that matters
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        reason = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)[:120]
        raise ValueError(f"{path} is not {what} written by this framework (torch cannot read it: {reason}); pass "
                         f"a run's <news>-<user> file, or its {LAST_CHECKPOINT} for --resume") from None


def is_pretraining(ckpt: dict[str, Any]) -> bool:
    """A checkpoint (or last.pt) of a --mode=pretrain run."""
    return (ckpt.get("config", {}).get("mode") == "pretrain" or "pretrain_metrics" in ckpt
            or "pretrain_tasks" in (ckpt.get("model_settings") or {}))


def refuse_pretraining(ckpt: dict[str, Any], path: Path, flag: str) -> None:
    """A pretraining checkpoint given where a fine-tuned model is needed (dev, test, explain, --resume): one line
    naming it and the way on (--init_from), instead of a state-dict mismatch, or an evaluation of encoders whose
    click predictor was never trained."""
    if not is_pretraining(ckpt):
        return
    path = Path(path)
    best = run_checkpoints(path.parent) if path.name == LAST_CHECKPOINT else [path]
    tasks = (ckpt.get("model_settings") or {}).get("pretrain_tasks") or ckpt["config"].get("pretrain_tasks")
    tasks = ",".join(tasks) if isinstance(tasks, list) else tasks
    raise ValueError(f"{flag} {path} is a pretraining checkpoint (--mode=pretrain"
                     + (f", --pretrain_tasks={tasks}" if tasks else "") + f"), not a trained recommender: fine-tune "
                     f"it with --mode=train --init_from={best[0] if best else path}, then use that run's checkpoint")


def load_checkpoint(path: str | Path, fine_tuned_for: str | None = None) -> dict[str, Any]:
    """A model checkpoint (weights_only). `fine_tuned_for`: the flag that asks for a trained recommender
    (`--dev_model_path`, ...): a pretraining checkpoint is then an error naming it."""
    path = resolve_checkpoint_path(path)
    ckpt = _torch_load(path, "a checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by this framework (no model/config entries)")
    if fine_tuned_for:
        refuse_pretraining(ckpt, path, fine_tuned_for)
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
    path = Path(path)
    ckpt = _torch_load(path, "a training-state checkpoint", mmap=True)
    if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:
        refuse_pretraining(ckpt, path, "--resume")
    needed = {"model", "config", "optimizer", "scheduler", "epoch", "step", "rng"}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        raise ValueError(f"{path} is not a training-state checkpoint of this framework (needs {sorted(needed)}; "
                         f"the best-model file beside it holds weights only)")
    return ckpt


def settings_differences(saved: dict[str, Any], now: dict[str, Any], *, with_click: bool = True,
                         other_class_by_name: bool = False) -> list[str]:
    """Settings that differ between two `model_settings` dicts (a checkpoint's and the model built now), one line per
    flag (a flag shared by the news and user encoders once), the encoder classes first, then the flags sorted:
    ['--head_num: checkpoint 4, now 20', ...]. A flag one side lacks shows as `not a setting`.

    with_click: compare the click predictor and its settings too (False where it is not loaded: --init_from).
    other_class_by_name: an encoder of another class is reported by its name alone (its settings are another
    class's, so listing them says nothing more)."""
    classes = ("news_encoder", "user_encoder") + (("click_predictor",) if with_click else ())
    head: dict[str, str] = {}
    skipped = set()
    for key in classes:
        if saved.get(key) != now.get(key):
            head[key] = f"--{key}: checkpoint {saved.get(key)}, now {now.get(key)}"
            if other_class_by_name:
                skipped.add(key.split("_")[0])  # news / user / click
    shown = (lambda d, f: repr(d[f]) if f in d else "not a setting")
    flags: dict[str, str] = {}
    for group in ("shared", "news", "user") + (("click",) if with_click else ()):
        if group in skipped:
            continue
        a, b = saved.get(group) or {}, now.get(group) or {}
        for flag in sorted(set(a) | set(b)):
            if flag in flags or ((flag in a) == (flag in b) and a.get(flag) == b.get(flag)):
                continue
            flags[flag] = f"--{flag}: checkpoint {shown(a, flag)}, now {shown(b, flag)}"
    return list(head.values()) + [flags[k] for k in sorted(flags)]


def load_state(model: nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Load weights; weights of another architecture are one error naming the settings that differ between the
    checkpoint and the model built (else the tensors that do not fit)."""
    raw = model.module if hasattr(model, "module") else model
    problems = []
    try:
        result = raw.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:  # tensors of another shape
        sizes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        problems.append(f"{len(sizes)} tensors of another shape ({sizes[0] if sizes else str(e).splitlines()[0]})")
    else:
        if result.missing_keys:
            problems.append(f"missing {result.missing_keys[:5]}")
        if result.unexpected_keys:
            problems.append(f"unexpected {result.unexpected_keys[:5]}")
    if not problems:
        return
    from config import architecture_flags  # config imports pretraining, which imports this module

    saved = ckpt["config"]
    differing = settings_differences(ckpt.get("model_settings") or {}, raw.model_settings()) \
        if ckpt.get("model_settings") and hasattr(raw, "model_settings") else []
    unrecorded = sorted(f"--{f}" for f in architecture_flags(raw.config.values) if f not in saved) \
        if hasattr(raw, "config") else []
    what = (f"settings differ: {'; '.join(differing)}" if differing else "; ".join(problems))
    raise ValueError(f"{path}: checkpoint of {saved.get('news_encoder')}-{saved.get('user_encoder')} does not fit the "
                     f"model built from its config ({what})"
                     + (f"; its config lacks {', '.join(unrecorded)} (the defaults were used)" if unrecorded else "")
                     + ". It was written by another version of the framework or edited: train it again, or "
                     "evaluate it with the version that wrote it")
