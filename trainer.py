"""One training loop for CPU, one GPU and torchrun DDP (AMP, gradient accumulation, resumable checkpoints), plus
the cached evaluation, sharded across ranks under DDP.

Legend: B batch, C candidates, N news in the corpus table, D news dim, I impressions of a split, W world size.

Nothing in here knows a model name: the model comes from the registries, owns its loss and returns a
`ModelOutput`; the loop only moves batches, steps the optimizer and evaluates. DDP is a flag, not a copy of the
loop: `self.model` is the DDP wrapper when distributed, `self.raw` always the bare `Model`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

import significance
import util
from dataset import EvalDataset, TrainDataset

CHECKPOINT_FORMAT = 1
LAST_CHECKPOINT = "last.pt"  # training state of a run, rewritten every epoch (what --resume reads)
# Rank-0-only work (building the corpus cache, computing metrics, writing checkpoints) makes the other ranks wait
# on a gloo group with this long timeout; the default group keeps the short --dist_timeout, so a rank whose peer
# died inside a training collective fails fast.
RANK0_WORK_TIMEOUT = timedelta(hours=3)
# Test hook: "RANK:STEP" makes that rank die abruptly (os._exit, no cleanup) before optimizer step STEP + 1.
CRASH_ENV = "MIND_TEST_CRASH_AT"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# Devices and processes
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp: str = "off"  # resolved --amp: off | bf16 | fp16
    wait_group: Any = None  # gloo group with RANK0_WORK_TIMEOUT (None in a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Mixed precision for forward passes (training and evaluation); parameters stay fp32."""
        if self.amp == "off":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AMP_DTYPES[self.amp])


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`--device` -> torch.device; under torchrun (`local_rank` given) a CUDA process takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device=cpu or auto")
    if device.type == "cuda" and local_rank is not None:
        if device.index is not None:
            raise ValueError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; pass --device=cuda "
                             f"or auto (choose GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: start "
                             f"at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
    return device


def _cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 (Ampere or newer); emulated bf16 on older GPUs is slower than fp16 with loss scaling."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch without the keyword
            return torch.cuda.is_bf16_supported()


def resolve_amp(amp: str, device: torch.device, log: Callable = print) -> str:
    """`--amp` -> off | bf16 | fp16. auto: bf16 on GPUs with native bf16, fp16 on older GPUs, off elsewhere."""
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if _cuda_has_bf16(device) else "fp16"
        return "off"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"--amp=fp16 needs a CUDA device (fp16 training needs loss scaling, done by the CUDA "
                         f"GradScaler); on {device.type} use --amp=bf16 or --amp=off")
    if amp == "bf16" and device.type == "cuda" and not _cuda_has_bf16(device):
        raise ValueError(f"--amp=bf16: {torch.cuda.get_device_name(device)} has no native bf16; use --amp=fp16")
    if amp == "bf16" and device.type == "cpu":
        log("WARNING: --amp=bf16 on the CPU: allowed, but usually slower than fp32 on CPUs without native bf16 "
            "matrix units (the default on CPU is --amp=off)")
    return amp


def setup_runtime(config, log: Callable = print) -> Runtime:
    """Single process unless torchrun set WORLD_SIZE > 1; then one process per GPU (nccl) or CPU process (gloo).

    The rendezvous comes from torchrun's environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE): no port is fixed here.
    """
    rank, local_rank, world_size = util.dist_env()
    distributed = world_size > 1
    if distributed and config.mode == "train" and config.batch_size % world_size:
        lower = config.batch_size // world_size * world_size
        raise ValueError(f"--batch_size={config.batch_size} is the global batch (all {world_size} processes "
                         f"together) and must be divisible by the number of processes; use e.g. "
                         f"--batch_size={lower or world_size} or {lower + world_size}")
    device = resolve_device(config.device, local_rank if distributed else None)
    amp = resolve_amp(config.amp, device, log if rank == 0 else (lambda *a: None))
    rt = Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank, amp=amp)
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=config.dist_timeout),
                                device_id=device if device.type == "cuda" else None)
        rt.wait_group = dist.new_group(backend="gloo", timeout=RANK0_WORK_TIMEOUT)
        if rank == 0:
            log(f"distributed: {world_size} processes, backend {backend}, rank 0 on {device}")
    return rt


def shutdown_runtime(rt: Runtime) -> None:
    """Leave the process group after a normal end (after an error the process just exits: torchrun stops the rest)."""
    if rt.distributed and util.dist_active():
        import torch.distributed as dist

        util.barrier(rt.wait_group)
        dist.destroy_process_group()


def _crash_step(rank: int) -> int | None:
    value = os.environ.get(CRASH_ENV, "")
    if not value:
        return None
    who, _, step = value.partition(":")
    return int(step or 0) if int(who) == rank else None


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------

def batch_ranks(logits: torch.Tensor, mask: torch.Tensor, tie_rank: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, C], mask [B, C] bool, tie_rank [B, C] long or None -> 1-based ranks [B, C] long.

    Order within a row: the real candidates with a finite score, best first; then the real candidates whose score
    is not finite (NaN or +-inf: no usable score, so ranked last; `evaluate` counts them); then the padded slots,
    so a real candidate never ranks after padding. Equal finite scores go by `tie_rank` (lower first: the news'
    training popularity rank, `popularity_rank`), then by the official scorer's order `argsort(score)[::-1]`
    (among equal scores the higher index first); with `tie_rank` None only the latter (--tie_break=position).
    """
    b, c = logits.shape
    x = logits.float()
    finite = torch.isfinite(x) & mask
    group = torch.where(mask, (~finite).long(), 2)  # 0 finite, 1 not finite, 2 padding
    key = torch.where(finite, x, torch.zeros_like(x))
    # Stable sorts from the least significant key to the most: index (descending), tie rank, score, group.
    order = torch.arange(c - 1, -1, -1, device=logits.device).expand(b, c)
    if tie_rank is not None:
        order = order.gather(1, torch.sort(tie_rank.gather(1, order), dim=1, stable=True).indices)
    order = order.gather(1, torch.sort(key.gather(1, order), dim=1, descending=True, stable=True).indices)
    order = order.gather(1, torch.sort(group.gather(1, order), dim=1, stable=True).indices)  # best first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, c + 1, device=logits.device).expand_as(order))
    return ranks


def tie_and_nonfinite_counts(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits, mask [B, C] -> (tied [B] bool: two real candidates share a finite score, so the tie rule of
    `batch_ranks` orders them; nonfinite [B] long: real candidates whose score is NaN or +-inf)."""
    x = logits.float()
    finite = torch.isfinite(x) & mask
    key = torch.where(finite, x, torch.full_like(x, float("inf")))  # sorted after every finite score
    sorted_key, order = torch.sort(key, dim=1)
    sorted_finite = finite.gather(1, order)
    tied = ((sorted_key[:, 1:] == sorted_key[:, :-1]) & sorted_finite[:, 1:] & sorted_finite[:, :-1]).any(1)
    return tied, (mask & ~finite).sum(1)


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # the same on every rank
    ranks: np.ndarray | None  # flat [sum of candidates] int32, 1-based, in behaviors.tsv order (rank 0 only)
    offsets: np.ndarray  # [I+1]
    labels: np.ndarray  # flat int8 (-1 = unlabelled)
    impression_ids: np.ndarray  # [I]
    seconds: float = 0.0
    # tie_break (popularity | position), tied_impressions, nonfinite_scores, nonfinite_impressions (up to 5 ids)
    ties: dict[str, Any] = field(default_factory=dict)
    # util.per_impression_metrics of the scored impressions (rank 0 of a labelled split; None otherwise)
    per_impression: dict[str, Any] | None = None


def _sum_over_ranks(t: torch.Tensor, rt: Runtime, to_main_only: bool = False) -> torch.Tensor:
    """Element-wise sum over ranks of tensors that are zero wherever another rank owns the entry: adding zeros
    is exact, so the result is bit-identical to one process computing everything."""
    if not rt.distributed:
        return t
    import torch.distributed as dist

    dtype = t.dtype
    # gloo lacks some reductions in half precision; widening is exact, and so is narrowing back.
    work = t.float() if t.is_floating_point() and dtype != torch.float32 else t
    work = work.to(rt.device).contiguous()
    if to_main_only:
        dist.reduce(work, dst=0, op=dist.ReduceOp.SUM)
    else:
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(dtype)


def encode_needed_news(raw: nn.Module, needed: np.ndarray, rt: Runtime) -> torch.Tensor:
    """Encode the news in `needed` (sorted indices) once; under DDP each rank encodes every W-th chunk and the
    table [N, D] is summed over ranks. Chunks depend only on `needed`, never on W, so every news is encoded in
    the same company (and with the same padding) as in one process: identical vectors, identical metrics."""
    chunk = max(1, min(2048, -(-len(needed) // 16)))  # >= 16 chunks, so small splits still spread over ranks
    # Chunks of similar text length carry little padding (each is cut to its own longest text); the order depends
    # only on `needed` and the news table, so it is the same on every rank.
    needed = needed[raw.length_order(torch.from_numpy(needed.astype(np.int64)).to(rt.device)).cpu().numpy()]
    chunks = [needed[i:i + chunk] for i in range(0, len(needed), chunk)]
    mine = chunks[rt.rank::rt.world_size]
    if mine:
        index = torch.from_numpy(np.concatenate(mine).astype(np.int64)).to(rt.device)
        table = raw.encode_all_news(index, chunk=chunk)  # re-chunks `index` at the same boundaries
    else:  # fewer chunks than ranks: contribute zeros of the right shape and dtype
        table = raw.encode_all_news(torch.zeros(1, dtype=torch.long, device=rt.device), chunk=chunk).zero_()
    if table.numel() == 0:  # personalized news encoders encode per batch
        return table
    return _sum_over_ranks(table, rt)


@torch.no_grad()
def evaluate(model: nn.Module, beh: dict[str, Any], config, runtime: Runtime, desc: str = "eval",
             tie_rank: np.ndarray | None = None) -> EvalResult:
    """Score every impression of a split: encode each needed news once, then users, then candidates.

    `tie_rank` [N] long orders candidates with equal scores (`popularity_rank`; None: the official scorer's order,
    --tie_break=position); the ranks carry that order, and the metrics are computed from the ranks, so the
    written files and the printed metrics agree. Under DDP every rank must call this (it holds collectives): news
    encoding and impression batches are split across ranks, ranks are summed to rank 0, which computes the
    metrics; the metrics are broadcast back."""
    t0 = time.time()
    rt = runtime
    raw = model.module if hasattr(model, "module") else model
    was_training = raw.training
    raw.eval()
    device = rt.device
    offsets = np.asarray(beh["offsets"])
    hist = np.asarray(beh["histories"])
    cands = np.asarray(beh["candidates"])
    # Index 0 stands for news unknown to news.tsv in dev/test: encode it like in training.
    raw.build_frozen_cache(log=print if rt.is_main else (lambda *a: None))
    needed = np.union1d(np.union1d(hist.ravel(), cands), [0])
    n_imp = len(offsets) - 1
    # ranks [sum of candidates], then per impression: tied scores (0/1), non-finite scores (count); one reduce.
    counts = np.zeros(len(cands) + 2 * n_imp, dtype=np.int32)
    ranks, tied, nonfinite = counts[:len(cands)], counts[len(cands):len(cands) + n_imp], counts[len(cands) + n_imp:]
    tie_table = torch.from_numpy(np.asarray(tie_rank, dtype=np.int64)).to(device) if tie_rank is not None else None
    with rt.autocast():
        news_vectors = encode_needed_news(raw, needed, rt)
        # Each rank takes every W-th batch; batches are the same as in one process (identical logits).
        data = EvalDataset(beh, config.eval_batch_size, rank=rt.rank, world_size=rt.world_size)
        loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=config.num_workers,
                            pin_memory=device.type == "cuda")
        show = config.progress and rt.is_main
        for batch in tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True):
            batch = batch.to(device, non_blocking=True)
            logits = raw.score_cached(batch, news_vectors)
            r = batch_ranks(logits, batch.candidate_mask,
                            tie_table[batch.candidates] if tie_table is not None else None).cpu().numpy()
            row_tied, row_nonfinite = tie_and_nonfinite_counts(logits, batch.candidate_mask)
            mask = batch.candidate_mask.cpu().numpy()
            imp = batch.impression_index.cpu().numpy()
            starts = offsets[imp]
            cols = np.nonzero(mask)
            ranks[starts[cols[0]] + cols[1]] = r[cols]
            tied[imp] = row_tied.cpu().numpy()
            nonfinite[imp] = row_nonfinite.cpu().numpy()
    raw.train(was_training)
    # Every candidate and impression belongs to exactly one rank's batches: the sum puts each rank's part in place.
    counts = _sum_over_ranks(torch.from_numpy(counts), rt, to_main_only=True).cpu().numpy()
    ranks, tied, nonfinite = counts[:len(cands)], counts[len(cands):len(cands) + n_imp], counts[len(cands) + n_imp:]
    labels = np.asarray(beh["labels"])
    ties, per = None, None
    if rt.is_main:
        ids = np.asarray(beh["impression_ids"])
        ties = {"tie_break": "popularity" if tie_rank is not None else "position",
                "tied_impressions": int((tied > 0).sum()), "nonfinite_scores": int(nonfinite.sum()),
                "nonfinite_impressions": [str(i) for i in ids[nonfinite > 0][:5]]}
        per = per_impression_from_ranks(ranks, labels, offsets)
    metrics = metrics_of(per) if rt.is_main else None
    metrics, ties = util.broadcast_object((metrics, ties), group=rt.wait_group)  # rank 0 may take a while
    return EvalResult(metrics, ranks if rt.is_main else None, offsets, labels, np.asarray(beh["impression_ids"]),
                      time.time() - t0, ties, per)


def format_ties(ties: dict[str, Any], split: str) -> str:
    """One line on the tie and non-finite-score rules of an evaluation, or "" when neither applied."""
    parts = []
    if ties.get("tied_impressions"):
        rule = ("the news' training popularity" if ties["tie_break"] == "popularity"
                else "position (the official scorer's order)")
        parts.append(f"{ties['tied_impressions']} impressions with tied scores, ordered by {rule} (--tie_break)")
    if ties.get("nonfinite_scores"):
        parts.append(f"WARNING: {ties['nonfinite_scores']} non-finite (NaN/inf) scores, ranked last in their "
                     f"impressions (e.g. {', '.join(ties['nonfinite_impressions'])}); the model may have diverged")
    return f"{split}: " + "; ".join(parts) if parts else ""


def per_impression_from_ranks(ranks: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> dict[str, Any] | None:
    """`util.per_impression_metrics` on score = 1/rank, exactly what a submission is scored on; None when the
    split has no labels (MIND-large test)."""
    if len(labels) and (labels < 0).all():
        return None
    return util.per_impression_metrics(1.0 / ranks.astype(np.float64), labels.astype(np.int64), offsets)


def metrics_from_ranks(ranks: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
    """Official-scorer metrics computed on score = 1/rank, exactly what a submission is scored on."""
    return metrics_of(per_impression_from_ranks(ranks, labels, offsets))


def metrics_of(per: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics dict of an evaluation from its per-impression metrics (None: an unlabelled split)."""
    return {"labelled": False} if per is None else {**util.mean_metrics(per), "labelled": True}


def train_popularity(train_beh: dict[str, Any], news_num: int) -> tuple[np.ndarray, np.ndarray]:
    """Per news [N]: clicks and impressions (times shown) in the train split."""
    cands, labels = np.asarray(train_beh["candidates"]), np.asarray(train_beh["labels"])
    return np.bincount(cands, weights=labels == 1, minlength=news_num), np.bincount(cands, minlength=news_num)


def popularity_per_impression(train_beh: dict[str, Any], beh: dict[str, Any], news_num: int) -> dict[str, Any]:
    """The popularity baseline per impression (`util.per_impression_metrics`): a candidate scores its click count
    in train (impressions as tie-break)."""
    clicks, shown = train_popularity(train_beh, news_num)
    score = clicks + shown * 1e-6
    flat = score[np.asarray(beh["candidates"])]
    return util.per_impression_metrics(flat, np.asarray(beh["labels"]).astype(np.int64), np.asarray(beh["offsets"]))


def popularity_result(train_beh: dict[str, Any], beh: dict[str, Any], news_num: int) -> dict[str, Any]:
    """The popularity baseline's metrics (means of `popularity_per_impression`)."""
    return util.mean_metrics(popularity_per_impression(train_beh, beh, news_num))


def write_records(folder: Path, per: dict[str, Any] | None, popularity: dict[str, Any] | None, beh: dict[str, Any],
                  meta: dict[str, Any]) -> list[Path]:
    """Write the per-impression records of a split (`significance.write_per_impression`) into `folder`: the
    model's (`per`) as per_impression.npz, the popularity baseline's as per_impression_popularity.npz (model
    "popularity"); either may be None. `meta` says what was scored (model, run, seed, split, ...)."""
    written = []
    for name, values, extra in ((significance.PER_IMPRESSION, per, {}),
                                (significance.POPULARITY, popularity,
                                 {"model": "popularity", "run": None, "seed": None, "epoch": None, "checkpoint": None})):
        if values is not None:
            written.append(significance.write_per_impression(folder / name, values, beh["impression_ids"],
                                                             beh["offsets"], beh["labels"], {**meta, **extra}))
    return written


def popularity_rank(train_beh: dict[str, Any], news_num: int) -> np.ndarray:
    """[N] int64, 0 = most popular: news ordered by train clicks, then train impressions (both descending), then
    news index. A total order of the news, so candidates with equal model scores are ordered by what they are,
    never by where they stand in the impression (--tie_break=popularity)."""
    clicks, shown = train_popularity(train_beh, news_num)
    order = np.lexsort((np.arange(news_num), -shown, -clicks))
    rank = np.empty(news_num, dtype=np.int64)
    rank[order] = np.arange(news_num)
    return rank


def tie_rank_for(config, train_beh: dict[str, Any], news_num: int) -> np.ndarray | None:
    """`--tie_break` -> the `tie_rank` argument of `evaluate`."""
    return popularity_rank(train_beh, news_num) if config.tie_break == "popularity" else None


def format_metrics(m: dict[str, Any]) -> str:
    if not m.get("labelled", True) or "auc" not in m:
        return "no labels"
    return (f"AUC {m['auc']:.4f}  MRR {m['mrr']:.4f}  nDCG@5 {m['ndcg5']:.4f}  nDCG@10 {m['ndcg10']:.4f}"
            f"  ({m['impressions']} impressions"
            + (f", {m['skipped_single_class']} single-class skipped" if m.get("skipped_single_class") else "")
            + ")")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and run folders
# ----------------------------------------------------------------------------------------------------------

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


def new_run_dir(output_dir: str, dataset: str, model_name: str) -> Path:
    """`<output_dir>/<dataset>/<model>/#<n>/` with n one above every existing run (never reused)."""
    base = runs_base_dir(output_dir, dataset, model_name)
    while True:
        taken = [int(p.name[1:]) for p in base.iterdir() if p.name.startswith("#") and p.name[1:].isdigit()]
        run = Path(base) / f"#{max(taken, default=0) + 1}"
        try:
            run.mkdir()  # atomic: two runs started together cannot get the same index
            return run
        except FileExistsError:
            continue


# What a run folder holds before its first optimizer step: a run that fails there leaves nothing worth keeping.
LOCK_FILE = ".train.lock"
START_FILES = {"config.json", util.TRAIN_LOG, util.ENVIRONMENT, "tensorboard", LOCK_FILE}


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


class TrainingInterrupted(Exception):
    """Ctrl-C during training. `run_dir` and `epoch` (the epoch last.pt holds, 0 = none) say what can be resumed;
    main adds the command that resumes (`command`)."""

    def __init__(self, run_dir: Path | None, epoch: int, text: str):
        super().__init__(text)
        self.run_dir, self.epoch, self.text = run_dir, epoch, text
        self.command: str | None = None

    def __str__(self) -> str:
        return self.text + (f"; resume with: {self.command}" if self.command and self.epoch > 0 else "")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then os.replace: an interrupted write (crash, full
    disk, kill) leaves the previous file under `path` intact, never half a checkpoint."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        util.umask_permissions(tmp)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def warmup_linear(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def build_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    """Adam over trainable parameters; encoders may ask for their own lr group via `param_groups()`."""
    raw = model.module if hasattr(model, "module") else model
    groups, seen = [], set()
    for module in (raw.news_encoder, raw.user_encoder):
        for group in module.param_groups():
            groups.append(group)
            seen.update(id(p) for p in group["params"])
    rest = [p for p in raw.parameters() if p.requires_grad and id(p) not in seen]
    groups.insert(0, {"params": rest, "lr": config.lr, "name": "model"})  # names label the logged lr
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)


class GlobalBatchSampler(Sampler):
    """DistributedSampler's role for batch samplers: global batches of `batch_size` samples in an order seeded by
    (seed, epoch), the same on every rank whatever the world size, each split into W contiguous parts.

    Yields this rank's part of each global batch (an index array for `TrainDataset[...]`). Sharding each global
    batch, rather than the dataset, is what makes W processes step exactly like one process with the same
    global batch; `weight(i)` rescales a rank's mean loss when the last batch does not split evenly. A rank whose
    part is empty (last batch smaller than W) gets one sample with weight 0, so it still joins the all-reduce.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def global_size(self, i: int) -> int:
        return min(self.batch_size, self.n - i * self.batch_size)

    def weight(self, i: int) -> float:
        """Factor on this rank's mean loss of batch i so that DDP's average of gradients over ranks equals the
        gradient of the mean loss over the whole global batch: n_rank * W / n_global."""
        n = self.global_size(i)
        lo, hi = util.shard_bounds(n, self.world_size, self.rank)
        return (hi - lo) * self.world_size / n

    def __iter__(self) -> Iterator[np.ndarray]:
        order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(self.n)
        for i in range(len(self)):
            batch = order[i * self.batch_size:i * self.batch_size + self.global_size(i)]
            lo, hi = util.shard_bounds(len(batch), self.world_size, self.rank)
            yield batch[lo:hi] if hi > lo else batch[:1]


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainState:
    """What a resumed run needs besides model/optimizer/scheduler/scaler/RNG (all saved in last.pt)."""

    epoch: int = 0  # last finished epoch
    step: int = 0  # optimizer steps so far
    best: float = -math.inf
    best_epoch: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(optimizer.param_groups)}


class _LogWindow:
    """Loss, auxiliary losses and samples since the last train_log record (this rank's shares)."""

    def __init__(self):
        self.t0, self.loss, self.n, self.samples = time.time(), 0.0, 0, 0
        self.aux: dict[str, torch.Tensor] = {}

    def add(self, loss_share: float, aux_shares: dict[str, torch.Tensor], global_samples: int) -> None:
        self.loss += loss_share
        self.n += 1
        self.samples += global_samples
        for k, v in aux_shares.items():
            self.aux[k] = self.aux.get(k, 0.0) + v

    def reduce(self, global_sums: Callable[[list[float]], list[float]]) -> dict[str, Any]:
        """Global means over the window (`global_sums` adds the ranks' shares); samples/s of the whole job."""
        names = sorted(self.aux)
        sums = global_sums([self.loss, *[float(self.aux[k]) for k in names]])
        n = max(self.n, 1)
        return {"loss": sums[0] / n, "aux": {k: v / n for k, v in zip(names, sums[1:])},
                "samples_per_s": self.samples / max(time.time() - self.t0, 1e-9)}


class Trainer:
    """Args:
        resume: a loaded last.pt (`load_training_state`) to continue, with `resume_path` its file; the run goes on
            in that run folder.
    """

    def __init__(self, config, corpus, model: nn.Module, runtime: Runtime, log: Callable = print,
                 resume: dict[str, Any] | None = None, resume_path: str | Path | None = None):
        self.config = config
        self.corpus = corpus
        self.runtime = runtime
        self.log = log if runtime.is_main else (lambda *a, **k: None)
        self.raw = model.to(runtime.device)
        self.resume, self.resume_path = resume, resume_path
        if resume is not None:
            load_state(self.raw, resume, resume_path)
        model.build_frozen_cache(log=self.log)
        self.model = self.raw
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Ranks get here at different times (PLM loading, frozen-layer cache): wait on the long timeout, so
            # DDP's own start-up collectives on the default group do not time out.
            util.barrier(runtime.wait_group)
            with warnings.catch_warnings():
                # broadcast_buffers=False: the buffers are the news feature table and the frozen PLM cache,
                # identical on every rank and large; the replacement flag would still broadcast them once.
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.model = DDP(self.raw, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                                 broadcast_buffers=False, find_unused_parameters=config.find_unused_parameters)
        if config.compile:
            # Training steps only (evaluation runs the bare model): batches vary in shape (unique news, dynamic
            # padding), so dynamic shapes avoid a recompilation per batch. bench/train.py measures the effect.
            self.model = torch.compile(self.model, dynamic=True)

    # -- pieces ---------------------------------------------------------------------------------------------
    def _run_dir(self) -> Path:
        cfg, rt = self.config, self.runtime
        if self.resume is not None:
            return Path(self.resume_path).parent
        run_dir = new_run_dir(cfg.output_dir, cfg.dataset, cfg.model_name) if rt.is_main else None
        return Path(util.broadcast_object(str(run_dir) if run_dir else None, group=rt.wait_group))

    def _restore(self, optimizer, scheduler, scaler) -> TrainState:
        """Continue a saved run: optimizer, scheduler, scaler, counters and every generator where it stopped."""
        ckpt, rt, cfg = self.resume, self.runtime, self.config
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**{k: ckpt[k] for k in TrainState.__dataclass_fields__ if k in ckpt})
        rng = ckpt["rng"]
        if len(rng) == rt.world_size:
            util.set_rng_state(rng[rt.rank])
        else:  # another world size: data order and negatives do not depend on it, only dropout streams
            torch.manual_seed(cfg.seed + 7919 * state.epoch + rt.rank)
            self.log(f"note: resumed with {rt.world_size} processes, saved with {len(rng)}: dropout streams re-seeded")
        self.log(f"resumed {self.resume_path}: epoch {state.epoch} done, {state.step} optimizer steps, best "
                 f"{cfg.dev_criterion} {state.best:.4f} at epoch {state.best_epoch}")
        return state

    def _save_last(self, path: Path, optimizer, scheduler, scaler, state: TrainState, rng: list) -> None:
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT,
            "model": self.raw.state_dict(),
            "config": self.config.to_dict(),
            "corpus": self.corpus.meta.signature(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,  # one entry per rank
            "world_size": self.runtime.world_size,
            **state.to_dict(),
        }, path)

    def _global_mean(self, total: float, count: int) -> float:
        return self._global_sums([total])[0] / max(count, 1)

    def _global_sums(self, values: list[float]) -> list[float]:
        """Sum a few floats over ranks (one all-reduce); identity in one process."""
        if not self.runtime.distributed or not values:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.runtime.device)
        dist.all_reduce(t)
        return t.tolist()

    def _plot(self, run_dir: Path) -> None:
        try:
            util.plot_curves(run_dir)
        except Exception as e:  # a picture must never end a training run
            self.log(f"WARNING: could not draw {run_dir / util.CURVES}: {type(e).__name__}: {e}")

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """`_train`, plus what surrounds a run: the run-folder lock, a clear end on Ctrl-C (`TrainingInterrupted`:
        which epoch last.pt holds and the run folder to resume), and the removal of a new run's folder when
        training fails before its first optimizer step (it then holds only start-up files)."""
        self._opened: tuple[Path, bool, RunLock | None] | None = None  # run folder, new run?, its lock
        self._state: TrainState | None = None
        self._first_step: int | None = None
        try:
            return self._train()
        except KeyboardInterrupt:
            raise self._interrupted() from None
        except BaseException:
            self._remove_failed_start()
            raise
        finally:
            if self._opened is not None and self._opened[2] is not None:
                self._opened[2].release()

    def _made_no_step(self) -> bool:
        return self._state is None or self._first_step is None or self._state.step == self._first_step

    def _remove_failed_start(self) -> bool:
        """Remove a new run's folder that holds only this run's start-up files, when no optimizer step was made."""
        if self._opened is None or not self._opened[1] or not self.runtime.is_main or not self._made_no_step():
            return False
        run_dir = self._opened[0]
        if not run_dir.is_dir() or any(p.name not in START_FILES for p in run_dir.iterdir()):
            return False
        if self._opened[2] is not None:
            self._opened[2].release()
        shutil.rmtree(run_dir, ignore_errors=True)
        self.log(f"removed {run_dir}: the run failed before its first optimizer step")
        return True

    def _interrupted(self) -> "TrainingInterrupted":
        state = self._state
        if self._opened is None or state is None:
            return TrainingInterrupted(None, 0, "interrupted before training began: nothing was written")
        run_dir = self._opened[0]
        if state.epoch == 0:
            removed = self._remove_failed_start()
            return TrainingInterrupted(run_dir, 0, f"interrupted in epoch 1, before any epoch finished: nothing to "
                                       f"resume" + (f" ({run_dir} removed)" if removed else f" ({run_dir} keeps the "
                                                    f"logs of the interrupted epoch)"))
        return TrainingInterrupted(run_dir, state.epoch, f"interrupted in epoch {state.epoch + 1}: epoch "
                                   f"{state.epoch} is saved in {run_dir / LAST_CHECKPOINT}")

    def _open_run_dir(self) -> Path:
        """The run folder (a new `#n`, or the resumed run's), locked by rank 0 for the length of the training."""
        run_dir = self._run_dir()
        lock = None
        if self.runtime.is_main:
            lock = RunLock(run_dir, log=self.log)
            self._opened = (run_dir, self.resume is None, lock)
            lock.acquire()
        else:
            self._opened = (run_dir, self.resume is None, None)
        return run_dir

    def _train(self) -> TrainResult:
        cfg, rt = self.config, self.runtime
        train_beh = self.corpus.behaviors("train")
        dev_beh = self.corpus.behaviors("dev")
        data = TrainDataset(train_beh, cfg.negative_sample_num, seed=cfg.seed)
        if data.skipped_no_negative or data.skipped_no_click:
            self.log(f"train: {len(data)} samples; skipped {data.skipped_no_negative} impressions without "
                     f"negatives and {data.skipped_no_click} without clicks")
        if len(data) == 0:
            raise ValueError(f"{train_beh['path']}: no training sample: none of its {len(train_beh['offsets']) - 1} "
                             f"impressions has both a click and a negative ({data.skipped_no_negative} without "
                             f"negatives, {data.skipped_no_click} without clicks); training needs impressions "
                             f"with '<NewsID>-1' and '<NewsID>-0' candidates")
        tie_rank = tie_rank_for(cfg, train_beh, self.raw.news_num)
        if rt.is_main:
            pop = popularity_per_impression(train_beh, dev_beh, self.raw.news_num)
            self.log(f"popularity baseline, dev: {format_metrics(util.mean_metrics(pop))}")

        sampler = GlobalBatchSampler(len(data), cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
        batches_per_epoch = len(sampler)
        accum = cfg.grad_accum_steps
        steps_per_epoch = math.ceil(batches_per_epoch / accum)
        if cfg.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
        total = steps_per_epoch * cfg.epoch
        optimizer = build_optimizer(self.raw, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total, cfg.warmup_ratio))
        scaler = torch.amp.GradScaler("cuda", enabled=rt.amp == "fp16")

        run_dir = self._open_run_dir()
        checkpoint, last = run_dir / cfg.model_name, run_dir / LAST_CHECKPOINT
        if self.resume is not None:
            state = self._restore(optimizer, scheduler, scaler)
        else:
            state = TrainState()
            if rt.distributed:  # distinct dropout streams per rank (the model was built from the same seed)
                torch.manual_seed(cfg.seed + rt.rank)
        self._state, self._first_step = state, state.step
        recorder = None
        if rt.is_main:
            (run_dir / "config.json").write_text(cfg.to_json())
            # Per-impression records for --mode=compare, where --mode=dev writes them too: <run>/dev/.
            record_meta = {"split": "dev", "dataset": cfg.dataset, "corpus": str(self.corpus.root)}
            write_records(run_dir / "dev", None, pop, dev_beh, record_meta)
            recorder = util.RunRecorder(run_dir, cfg.tensorboard, log=self.log,
                                        resumed_step=state.step if self.resume is not None else None)
            recorder.write_environment(util.environment_info(rt.device, rt.world_size, rt.amp))
            self.log(f"run folder {run_dir}; {len(data)} train samples, {steps_per_epoch} steps/epoch, device "
                     f"{rt.device}" + (f" x {rt.world_size} processes" if rt.distributed else "")
                     + f", amp {rt.amp}, batch {cfg.batch_size}"
                     + (f" ({cfg.batch_size // rt.world_size} per process)" if rt.distributed else "")
                     + (f" x {accum} accumulation steps" if accum > 1 else ""))
        # A training "impression" rate for the logs: samples/s times impressions per sample (an impression with
        # several clicks gives several samples).
        impressions_per_sample = len(np.unique(data.sample_impression)) / max(1, len(data))
        if state.stopped_early or state.epoch >= cfg.epoch:
            self.log(f"nothing to do: the run stopped at epoch {state.epoch} of {cfg.epoch}"
                     + (" (early stopping)" if state.stopped_early else ""))
        crash_at = _crash_step(rt.rank)
        show = cfg.progress and rt.is_main
        # While the epoch bar is drawn, lines go above it (tqdm.write), never glued to the end of the bar.
        say = (lambda text: tqdm.write(str(text))) if show else self.log
        epoch_bar = tqdm(range(state.epoch + 1, cfg.epoch + 1), desc="epochs", disable=not show, dynamic_ncols=True)
        for epoch in epoch_bar:
            if state.stopped_early:
                break
            t0 = time.time()
            data.set_epoch(epoch)
            sampler.set_epoch(epoch)
            self.model.train()
            loader = DataLoader(data, sampler=sampler, batch_size=None, num_workers=cfg.num_workers,
                                pin_memory=rt.device.type == "cuda")
            loss_sum, loss_n, step = 0.0, 0, 0
            aux_sum: dict[str, torch.Tensor] = {}  # this epoch's auxiliary losses, summed like loss_sum
            window = _LogWindow()  # since the last train_log record
            bar = tqdm(loader, total=min(batches_per_epoch, steps_per_epoch * accum), desc=f"epoch {epoch}",
                       leave=False, disable=not show, dynamic_ncols=True)
            optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(bar):
                if crash_at is not None and state.step >= crash_at:
                    print(f"rank {rt.rank}: {CRASH_ENV} set, dying at step {state.step}", file=sys.stderr, flush=True)
                    os._exit(13)
                weight = sampler.weight(i)
                boundary = (i + 1) % accum == 0 or i + 1 == batches_per_epoch
                # The epoch's last window may hold fewer micro-batches: the step's gradient is their mean.
                held = min(accum, batches_per_epoch - i // accum * accum)
                batch = batch.to(rt.device, non_blocking=True)
                # No gradient all-reduce on accumulation micro-batches: DDP syncs on the step's last one.
                with (self.model.no_sync() if rt.distributed and not boundary else nullcontext()):
                    with rt.autocast():
                        out = self.model(batch)
                    scaler.scale(out.loss * (weight / held)).backward()
                loss = out.loss.item()
                loss_sum += loss * weight / rt.world_size  # this rank's share of the global batch's mean loss
                loss_n += 1
                share = weight / rt.world_size
                for name, value in out.aux.items():
                    aux_sum[name] = aux_sum.get(name, 0.0) + value.detach().float() * share
                window.add(loss * share, {k: v.detach().float() * share for k, v in out.aux.items()},
                           sampler.global_size(i))
                if boundary:
                    if cfg.gradient_clip_norm > 0:
                        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                        nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.gradient_clip_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    state.step += 1
                    if state.step % cfg.log_every == 0:  # the same steps on every rank: the reduce is safe
                        stats = window.reduce(self._global_sums)
                        if recorder is not None:
                            recorder.write({"kind": "step", "epoch": epoch, "step": state.step, **stats,
                                            "lr": _group_lrs(optimizer),
                                            "impressions_per_s": stats["samples_per_s"] * impressions_per_sample})
                        window = _LogWindow()
                    bar.set_postfix(loss=f"{loss:.4f}", mean=f"{loss_sum * rt.world_size / loss_n:.4f}",
                                    lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    if step >= steps_per_epoch:
                        break
            bar.close()
            if step == 0:  # never an evaluation, a "best" epoch and a checkpoint of a model that did not train
                raise ValueError(f"epoch {epoch}: the training data loader gave no batch ({len(data)} samples, "
                                 f"{batches_per_epoch} batches expected): nothing was trained, nothing saved")
            train_loss = self._global_mean(loss_sum, loss_n)
            names = sorted(aux_sum)
            aux_means = dict(zip(names, self._global_sums([float(aux_sum[n]) for n in names]))) if names else {}
            aux_means = {k: v / max(loss_n, 1) for k, v in aux_means.items()}
            train_seconds = time.time() - t0
            samples = sum(sampler.global_size(j) for j in range(min(loss_n, batches_per_epoch)))
            result = evaluate(self.raw, dev_beh, cfg, rt, desc="dev", tie_rank=tie_rank)

            # Decisions are rank 0's, broadcast: no rank ever acts on its own view.
            decision = None
            if rt.is_main:
                value = util.criterion_value(result.metrics, cfg.dev_criterion)
                improved = value > state.best
                bad = 0 if improved else state.bad_epochs + 1
                decision = {"improved": improved, "value": value, "bad_epochs": bad,
                            "stop": bad >= cfg.early_stopping_epoch}
            decision = util.broadcast_object(decision, group=rt.wait_group)
            record = {"epoch": epoch, "train_loss": train_loss, "train_seconds": round(train_seconds, 2),
                      "dev_seconds": round(result.seconds, 2), **result.metrics,
                      **{k: result.ties[k] for k in ("tie_break", "tied_impressions", "nonfinite_scores")}}
            state.history.append(record)
            state.epoch, state.bad_epochs, state.stopped_early = epoch, decision["bad_epochs"], decision["stop"]
            if decision["improved"]:
                state.best, state.best_epoch, state.best_metrics = decision["value"], epoch, result.metrics
            # Taken after evaluation, the last use of the generators in this epoch, on every rank.
            rng = util.all_gather_object(util.get_rng_state(), group=rt.wait_group)
            if rt.is_main:
                util.write_lines_atomic(run_dir / "dev_log.jsonl", [json.dumps(r) for r in state.history])
                recorder.write({"kind": "epoch", "epoch": epoch, "step": state.step, "train_loss": train_loss,
                                "aux": aux_means, "lr": _group_lrs(optimizer),
                                "train_seconds": round(train_seconds, 2), "samples_per_s": samples / train_seconds,
                                "impressions_per_s": samples / train_seconds * impressions_per_sample,
                                "dev_seconds": round(result.seconds, 2), "criterion": decision["value"],
                                **{k: result.metrics[k] for k in util.METRIC_KEYS if k in result.metrics}})
                if cfg.plot:
                    self._plot(run_dir)
                if decision["improved"]:
                    save_checkpoint(checkpoint, self.raw, cfg, self.corpus.meta,
                                    {"epoch": epoch, "dev_metrics": result.metrics})
                    write_records(run_dir / "dev", result.per_impression, None, dev_beh,
                                  {**record_meta, "model": cfg.model_name, "run": run_dir.name, "seed": cfg.seed,
                                   "epoch": epoch, "checkpoint": str(checkpoint), "written_by": "training"})
                self._save_last(last, optimizer, scheduler, scaler, state, rng)
                say(f"epoch {epoch}: loss {train_loss:.4f} ({train_seconds:.1f}s) | dev "
                    f"{format_metrics(result.metrics)}{'  *best*' if decision['improved'] else ''}")
                if format_ties(result.ties, "dev"):
                    say(format_ties(result.ties, "dev"))
            util.barrier(rt.wait_group)  # checkpoints written before anyone goes on
            epoch_bar.set_postfix(best=f"{state.best:.4f}", best_epoch=state.best_epoch)
            if state.stopped_early:
                say(f"early stopping: no dev improvement ({cfg.dev_criterion}) for {state.bad_epochs} epochs")
        epoch_bar.close()
        if recorder is not None:
            recorder.close()
            self.log(f"run records: {run_dir / util.TRAIN_LOG}, {run_dir / util.ENVIRONMENT}"
                     + (f", {run_dir / util.CURVES}" if cfg.plot else "")
                     + (f", {run_dir / 'tensorboard'}" if recorder.writer is not None else ""))
        self.log(f"best epoch {state.best_epoch}: dev {format_metrics(state.best_metrics)}\ncheckpoint: {checkpoint}"
                 f"\ntraining state: {last}")
        return TrainResult(run_dir, checkpoint, state.best_epoch, state.best_metrics, state.history)


# ----------------------------------------------------------------------------------------------------------
# Explain mode: what a trained model attends to in one impression (issue 7)
# ----------------------------------------------------------------------------------------------------------

NEWS_TSV_COLUMNS = {"title": 3, "abstract": 4}  # text columns of news.tsv


def news_texts(root: Path, news_ids: set[str], column: str) -> dict[str, str]:
    """The `column` text (title / abstract) of `news_ids` from the splits' news.tsv under `root`."""
    found: dict[str, str] = {}
    col = NEWS_TSV_COLUMNS[column]
    for split in ("train", "dev", "test"):
        path = root / split / "news.tsv"
        if not path.exists() or len(found) == len(news_ids):
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                nid, _, rest = line.partition("\t")
                if nid in news_ids and nid not in found:
                    parts = line.rstrip("\n").split("\t")
                    found[nid] = parts[col] if len(parts) > col else ""
    return found


def find_impression(beh: dict[str, Any], impression_id: str) -> int:
    """Row of `impression_id` in a split's behaviors arrays; a clear error with examples when absent."""
    ids = np.asarray(beh["impression_ids"])
    rows = np.flatnonzero(ids.astype(str) == str(impression_id))
    if len(rows) == 0:
        sizes = np.diff(np.asarray(beh["offsets"]))
        raise ValueError(f"impression {impression_id!r} is not in {beh['path']} (column 1); "
                         f"for example: {', '.join(map(str, ids[sizes > 0][:5]))}")
    return int(rows[0])


@torch.no_grad()
def explain_impression(model: nn.Module, corpus, impression_id: str, split: str = "dev") -> dict[str, Any]:
    """Run one impression through `model` (eval mode) and collect what it attended to.

    Returns a dict for `util.plot_explanation`: the history and candidate titles, labels and scores, each news'
    word (token) attention from the news encoder (`layers.AttentionRecorder`), and the user encoder's own
    attention maps (`UserOutput.attention`) with the names of their axes (`attention_axes`)."""
    from layers import AttentionRecorder

    beh = corpus.behaviors(split)
    row = find_impression(beh, impression_id)
    data = EvalDataset(beh, 1)
    data.batches = [np.array([row])]
    device = next(model.parameters()).device
    batch = data[0].to(device)
    model.eval()
    model.build_frozen_cache(log=lambda *a: None)
    h, c = batch.history.shape[1], batch.candidates.shape[1]
    ids = torch.cat([batch.history[0], batch.candidates[0]])  # [H + C]
    user_ids = batch.user.expand(len(ids)) if model.news_encoder.personalized else None
    with AttentionRecorder(model) as rec:
        feats = model.news_features(ids)
        vectors = model.news_encoder.encode(feats, user_id=user_ids)[0]  # [H + C, D]
        news_maps = dict(rec.maps)
        rec.clear()
        logits, out = model.score(batch, vectors[:h].unsqueeze(0), vectors[h:].unsqueeze(0))
    # Word attention: a news-encoder map over this batch's token positions of the text the encoder reads.
    text_key = next((k for k in ("title", "plm_ids", "abstract") if k in feats), None)
    width = feats[text_key].shape[1] if text_key else -1
    candidates_maps = [(k, w) for k, (w, axes) in news_maps.items()
                       if k.startswith("news_encoder.") and w.dim() == 2 and w.shape == (h + c, width)]
    word_key, word_weights = next(((k, w) for k, w in candidates_maps if "title" in k),
                                  candidates_maps[0] if candidates_maps else (None, None))
    news_ids = corpus.news_meta["news_ids"]
    index = ids.cpu().numpy()
    column = "abstract" if text_key == "abstract" else "title"
    texts = news_texts(corpus.root, {news_ids[i] for i in index if i > 0}, column)
    tokens: list[list[str]] = []
    if text_key == "plm_ids":
        from transformers import AutoTokenizer

        from newsEncoders import resolve_plm_path

        tok = AutoTokenizer.from_pretrained(resolve_plm_path(model.config.plm_model_name))
        for r in feats["plm_ids"].cpu().numpy():
            tokens.append(tok.convert_ids_to_tokens([int(t) for t in r]))
    elif text_key is not None:
        from MIND_corpus import tokenize

        vocab = corpus.meta.vocab
        for i, r in zip(index, feats[text_key].cpu().numpy()):
            words = tokenize(texts.get(news_ids[i], ""))
            # The text's own words where they line up with the ids (out-of-vocabulary words keep their spelling).
            tokens.append([words[j] if j < len(words) else vocab[t] for j, t in enumerate(r)])
    hist_mask = batch.history_mask[0].cpu().numpy()
    cand_mask = batch.candidate_mask[0].cpu().numpy()
    labels = batch.labels[0].cpu().numpy()
    n_hist = int(hist_mask.sum())

    def news(pos: int) -> dict[str, Any]:
        i = int(index[pos])
        entry = {"news_id": news_ids[i] if i > 0 else "(unknown)", "title": texts.get(news_ids[i], "") if i > 0 else ""}
        if word_weights is not None:
            length = int((feats[text_key][pos] != 0).sum()) if text_key != "plm_ids" else int(feats["plm_mask"][pos].sum())
            entry["tokens"] = tokens[pos][:length]
            entry["weights"] = word_weights[pos, :length].tolist()
        return entry

    axes_of = type(model.user_encoder).attention_axes
    user_maps = {}
    for name, weights in out.attention.items():
        axes = axes_of.get(name)
        if axes is None or weights.dim() != len(axes):
            continue  # an attention without declared axes cannot be labelled: left out of the picture
        w = weights.detach().float().cpu()[0]  # drop the impression axis
        axes = axes[1:]
        w = w.narrow(axes.index("history"), 0, n_hist) if "history" in axes else w
        user_maps[name] = {"axes": list(axes), "weights": w.tolist()}
    return {
        "impression_id": str(impression_id), "split": split, "model": model.config.model_name,
        "word_attention": word_key, "history": [news(p) for p in range(n_hist)],
        "candidates": [{**news(h + j), "label": int(labels[j]), "score": float(logits[0, j])}
                       for j in range(c) if cand_mask[j]],
        "user_attention": user_maps,
    }
