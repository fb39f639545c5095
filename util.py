"""What every module uses: atomic writes and folder checks (the umask's permissions), seeding, distributed helpers
(torchrun environment, collectives on objects, resumable RNG state).

Bottom of the import DAG: imports nothing local.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Ranking order
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Metrics, vectorised
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Leaderboard and truth files: `<ImpressionID> [v1,v2,...]`
# ----------------------------------------------------------------------------------------------------------

def _read_umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere reading it means setting it for an instant, which is
    why this runs once, at import, before any thread (TensorBoard's writer) could create a file meanwhile."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def sibling_dir(target: str | Path, kind: str) -> Path:
    """A new empty hidden folder `.<name>.<kind>-<random>` beside `target`, to build in and rename to `target`.
    mkdir, unlike mkdtemp's 0700, keeps the umask's permissions, which `target` inherits by the rename."""
    target = Path(target)
    path = target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    return path


class UnusableFolder(ValueError, OSError):
    """A folder chosen by a flag cannot be used (it is a file, or cannot be written). One line for the user; a
    ValueError too, so the command lines print it as a message, not a traceback."""


class RankStopped(Exception):
    """Under DDP, another rank stopped with an error at a point where the ranks meet: this rank stops too, with one
    line, instead of failing in (or waiting at) the next collective."""


def check_folder(path: str | Path, flag: str) -> Path:
    """`path` as a folder a run may create and write in: an UnusableFolder error naming `flag` when it, or the
    nearest existing folder above it, is a file (mkdir would fail with NotADirectoryError or FileExistsError)."""
    path = Path(path)
    for q in (path, *path.parents):
        if q.exists():
            if not q.is_dir():
                raise UnusableFolder(f"{flag}={path}: {q} is a file, not a folder; pass a folder")
            break
    return path


@contextlib.contextmanager
def writing_into(folder: str | Path, flag: str, what: str):
    """Turn an OSError raised while writing `what` into `folder` (read-only file system, no permission, disk full,
    a file where a folder should be) into one UnusableFolder line naming the folder, the flag that chose it and
    the fix. Wrap only writes: a reading error would be misnamed."""
    try:
        yield
    except UnusableFolder:
        raise
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise UnusableFolder(f"cannot write {what} in {folder}: {reason}{where}. Make the folder writable (and check "
                             f"its free space), or choose another with {flag}") from e


def umask_permissions(path: str | Path) -> None:
    """Give a mkstemp file (0600) the mode open() would have given it under the process umask, so checkpoints
    and run files renamed from it are readable by whoever the umask allows (colleagues on a shared cluster), as
    any other file the run writes."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None], *, durable: bool = False) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then os.replace it: a crash, a full disk or a kill
    never leaves half a file under the final name (the previous file, if any, stays). The one atomic-write
    primitive: text files, zips, npz records and checkpoints (checkpoints.atomic_torch_save) all go through it.

    `durable`: fsync the file before the rename, so that after a machine crash the name holds the new bytes,
    not an empty file (for checkpoints, which a resumed run relies on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        umask_permissions(tmp)
        write(tmp)
        if durable:
            with open(tmp, "rb") as f:  # fsync flushes the file's data whichever descriptor asks
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_lines_atomic(path, lines: Iterable[str]) -> None:
    """Write `lines` (each followed by a newline) to `path` through atomic_write."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
    atomic_write(path, write)


def replace_dir_atomically(target: Path, build: Callable[[Path], None],
                           keep_existing: Callable[[Path], bool] | None = None) -> None:
    """Run `build(tmp)` in a temp folder beside `target`, then rename it to `target`: a killed run leaves at
    most a hidden temp folder, never a half-written `target`.

    `keep_existing(target)`: asked once the build is done; True means that what is at `target` now is already
    what was built (another process sharing the filesystem got there first), so it stays and the build is
    dropped. Without it, `target` is replaced."""
    target = Path(target)
    tmp = sibling_dir(target, "tmp")
    try:
        build(tmp)
        if keep_existing is not None and keep_existing(target):
            return
        if target.exists():
            old = sibling_dir(target, "old")
            try:
                os.replace(target, old / "x")
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # a non-empty folder appeared there meanwhile: another process's rename won
            if keep_existing is None or not keep_existing(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left once renamed



# ----------------------------------------------------------------------------------------------------------
# GloVe
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Category names -> words -> GloVe
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (and every CUDA device when present)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun) and resumable RNG state
# ----------------------------------------------------------------------------------------------------------

def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain `python main.py`."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value != "" else default
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None

    world_size = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_rank = read("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world_size}")
    return rank, local_rank, world_size


def dist_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier(group=None) -> None:
    """A barrier when a process group is up; nothing in a single process."""
    import torch.distributed as dist

    if dist_active():
        dist.barrier(group=group)


def broadcast_object(obj, src: int = 0, group=None):
    """Rank `src`'s picklable `obj` on every rank (the value passed elsewhere is ignored)."""
    import torch.distributed as dist

    if not dist_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def on_main_rank(work: Callable[[], Any], is_main: bool, group, what: str):
    """`work()` on rank 0 only (writing a run's files), in place of a barrier after it: its failure (a full disk)
    reaches every rank, and the others stop with one RankStopped line naming `what` instead of a traceback from the
    next collective (or a wait until --dist_timeout). Rank 0 re-raises its own error. Returns work()'s value on
    rank 0, None elsewhere; in a single process, just work()."""
    result, failure = None, None
    if is_main:
        try:
            result = work()
        except Exception as e:  # re-raised below, once the other ranks know
            failure = e
    told = broadcast_object(None if failure is None else str(failure), group=group)
    if failure is not None:
        raise failure
    if told is not None:
        raise RankStopped(f"rank 0 stopped {what}: {told}")
    return result


def all_gather_object(obj, group=None) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in a single process."""
    import torch.distributed as dist

    if not dist_active():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


@contextlib.contextmanager
def first_then_others(is_first: bool, group=None):
    """Run the body on the `is_first` ranks, then on the others: e.g. one process per node builds the on-disk
    corpus cache while the others wait, then they all read it. Every rank enters the barrier exactly once."""
    if not is_first:
        barrier(group)
    yield
    if is_first:
        barrier(group)


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous [start, stop) of `rank` in n items split into `world_size` parts differing by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


def get_rng_state() -> dict:
    """Python, NumPy, torch and CUDA generator states as tensors and plain numbers, so a checkpoint holding
    them loads with `torch.load(weights_only=True)` (a numpy array or a Python tuple there would not)."""
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `get_rng_state` (CUDA states are restored only where CUDA is available now)."""
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another GPU count than when saved: restore what fits
            for i, s in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------------------
# Results over runs: mean ± std per model, as papers report 5- or 10-run averages
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Run records: train_log.jsonl, environment.json, TensorBoard, curves.png (issue 7)
# ----------------------------------------------------------------------------------------------------------

