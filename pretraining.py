"""Self-supervised pretraining of the news and user encoders on click sequences (train clicks included: below).

`--mode=pretrain --pretrain_tasks=contrastive,mip,...` trains any news encoder x user encoder pairing on users'
click sequences and saves the encoders in `<output_dir>/<dataset>/<news>-<user>/pretrain#<n>/`;
`--mode=train --init_from=<that checkpoint>` starts fine-tuning from its encoder weights (`load_pretrained_encoders`).

What it reads (nothing else): the train split's histories and clicked candidates (train labels: the news clicked
in each train impression, of --train_fraction's seeded share only, `dataset.train_share`), and the history column
of dev/test behaviours (known when predicting). Never a dev/test candidate or label, and never a train non-click
(`build_sequences`).

The objectives are registered in `PRETRAIN_TASKS`, each with its own settings class (its flags, weight included):
    contrastive   two views of a user's history (crop / mask / reorder) -> user vectors; InfoNCE against the other
                  users of the (global) batch, cosine similarity / --contrastive_temperature (CLUE-style)
    next_click    a history prefix -> user vector; InfoNCE (dot product) against the next clicked news of every
                  sequence in the batch (the contrastive task's next-click variant)
    mip           masked item prediction: masked history positions -> the masked news, a sampled softmax over the
                  masked news of the batch, from the user encoder's contextual outputs (`UserEncoder.contextual`)
                  where it has them, else from the user vector of the visible history
    map           masked attribute prediction: the category, subcategory (and entities) of the masked news, from the
                  same queries as mip
    aap           associated attribute prediction: the category, subcategory (and entities) of each visible history
                  news, from its own news vector
    sp            segment prediction: the user vector of a history without a contiguous segment scores the segment
                  (as a history) above a segment of another user (binary cross-entropy)

Every task returns a loss per sequence [B]; the model averages over this process's sequences, so the trainer's
per-rank weights make the DDP loss the global batch's mean. In-batch negatives are gathered across ranks with
gradients (`gather_rows`), so 2 processes compute what one process does with the same global batch; the filler row
of a rank with an empty share (`PretrainBatchSampler`, `PretrainBatch.real`) is no loss and no negative.

Legend: B sequences on this rank, G sequences of the global batch, H history slots, D news dim, M masked positions
on this rank, Mg masked positions of the global batch, U unique news of the batch, Cc / Cs / E categories /
subcategories / entities.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

import util
from checkpoints import save_checkpoint, settings_differences
from dataset import train_share_of
from layers import Registry
from model import Model, ModelOutput
from settings import Settings, setting
from trainer import GlobalBatchSampler, Trainer
from userEncoders import UserEncoder, UserInputs, get_user_encoder

if TYPE_CHECKING:
    from MIND_corpus import CorpusMeta

PRETRAIN_TASKS: Registry = Registry("pretraining task", "--pretrain_tasks")  # name -> PretrainTask subclass
register_task = PRETRAIN_TASKS.register
VIEWS = ("crop", "mask", "reorder")
PRETRAIN_RUN_PREFIX = "pretrain#"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def ratio(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def task_weight(v: float) -> str | None:
    return None if v > 0 else ("must be > 0: a task of weight 0 trains nothing (its loss times 0); leave the task out "
                               "of --pretrain_tasks instead")


def view_list(v: str) -> str | None:
    names = [n for n in str(v).split(",") if n.strip()]
    bad = [n for n in names if n not in VIEWS]
    if not names or bad:
        return f"must be a comma-separated list of {', '.join(VIEWS)}"
    return None


# ------------------------------------------------------------------------------------------------------------
# Settings: one class per task (its flags), plus the run-level pretraining flags in config.py
# ------------------------------------------------------------------------------------------------------------

@dataclass
class ContrastiveSettings(Settings):
    title: ClassVar[str] = "pretraining: contrastive (--pretrain_tasks contrastive)"
    contrastive_weight: float = setting(1.0, "weight of the contrastive loss", check=task_weight, architecture=False)
    contrastive_temperature: float = setting(0.1, "InfoNCE temperature on cosine similarities", check=positive,
                                             architecture=False)
    contrastive_views: str = setting("crop,mask,reorder", "augmentations a view picks from at random: crop (a random "
                                     "contiguous part), mask (drop random clicks), reorder (shuffle a random "
                                     "segment)", check=view_list, architecture=False)
    contrastive_crop_ratio: float = setting(0.6, "crop: share of the history kept", check=ratio, architecture=False)
    contrastive_mask_ratio: float = setting(0.3, "mask: share of the clicks dropped", check=ratio, architecture=False)
    contrastive_reorder_ratio: float = setting(0.3, "reorder: share of the history shuffled", check=ratio,
                                               architecture=False)


@dataclass
class NextClickSettings(Settings):
    title: ClassVar[str] = "pretraining: next click (--pretrain_tasks next_click)"
    next_click_weight: float = setting(1.0, "weight of the next-click InfoNCE loss", check=task_weight,
                                       architecture=False)


@dataclass
class MaskSettings(Settings):
    title: ClassVar[str] = "pretraining: masked positions (--pretrain_tasks mip / map)"
    pretrain_mask_ratio: float = setting(0.2, "share of history positions masked (at least one, never all)",
                                         check=ratio, architecture=False)


@dataclass
class MIPSettings(Settings):
    title: ClassVar[str] = "pretraining: masked item prediction (--pretrain_tasks mip)"
    mip_weight: float = setting(1.0, "weight of the masked item prediction loss", check=task_weight,
                                architecture=False)


@dataclass
class MAPSettings(Settings):
    title: ClassVar[str] = "pretraining: masked attribute prediction (--pretrain_tasks map)"
    map_weight: float = setting(1.0, "weight of the masked attribute prediction loss", check=task_weight,
                                architecture=False)


@dataclass
class AAPSettings(Settings):
    title: ClassVar[str] = "pretraining: associated attribute prediction (--pretrain_tasks aap)"
    aap_weight: float = setting(1.0, "weight of the associated attribute prediction loss", check=task_weight,
                                architecture=False)


@dataclass
class AttributeSettings(Settings):
    title: ClassVar[str] = "pretraining: attributes (--pretrain_tasks map / aap)"
    pretrain_entities: bool = setting(True, "also predict the news' title and abstract entities (multi-label), where "
                                      "the corpus has entities", architecture=False)


@dataclass
class SPSettings(Settings):
    title: ClassVar[str] = "pretraining: segment prediction (--pretrain_tasks sp)"
    sp_weight: float = setting(1.0, "weight of the segment prediction loss", check=task_weight, architecture=False)
    sp_max_ratio: float = setting(0.5, "longest segment, as a share of the history", check=ratio, architecture=False)


def task_settings_classes() -> tuple[type[Settings], ...]:
    """Every registered task's settings classes, without repeats (config.py makes their flags)."""
    seen: dict[type[Settings], None] = {}
    for cls in PRETRAIN_TASKS.values():
        for s in cls.settings:
            seen[s] = None
    return tuple(seen)


def task_flag_owners() -> dict[str, list[str]]:
    """flag -> the tasks that read it (for the error on a typed flag of a task not chosen)."""
    owners: dict[str, list[str]] = {}
    for name, cls in PRETRAIN_TASKS.items():
        for s in cls.settings:
            for flag in s.names():
                owners.setdefault(flag, []).append(name)
    return owners


def parse_tasks(text: str) -> list[str]:
    """'contrastive,mip' -> ['contrastive', 'mip']; unknown names are an error listing the registered ones."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise ValueError(f"--pretrain_tasks is empty; choose from {sorted(PRETRAIN_TASKS)}")
    for n in names:
        PRETRAIN_TASKS.lookup(n)
    if len(set(names)) != len(names):
        raise ValueError(f"--pretrain_tasks has repeated names: {text}")
    return names


# ------------------------------------------------------------------------------------------------------------
# Losses (pure functions; the tests check them against direct computations)
# ------------------------------------------------------------------------------------------------------------

def info_nce(queries: torch.Tensor, keys: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None,
             scale: float = 1.0) -> torch.Tensor:
    """Cross-entropy of each query against all keys, the right key being `target`.

    Args:
        queries: [B, D]; keys: [G, D]; target: [B] long (row of each query's positive key);
        exclude: [B, G] bool, True = a key left out of that query's softmax (a false negative); never the target.
        scale: multiplies the dot products (1 / temperature).
    Returns: [B] float32 losses.
    """
    logits = (queries.float() @ keys.float().t()) * scale  # [B, G]
    if exclude is not None:
        keep_target = F.one_hot(target, logits.shape[1]).bool()
        logits = logits.masked_fill(exclude & ~keep_target, float("-inf"))
    return F.cross_entropy(logits, target, reduction="none")


def per_sample_mean(values: torch.Tensor, row: torch.Tensor, batch: int) -> torch.Tensor:
    """values [M] of items belonging to sequences `row` [M] -> [B]: each sequence's mean (0 where it has none)."""
    total = torch.zeros(batch, dtype=torch.float32, device=values.device).index_add(0, row, values.float())
    count = torch.zeros(batch, dtype=torch.float32, device=values.device).index_add(
        0, row, torch.ones_like(values, dtype=torch.float32))
    return total / count.clamp(min=1)


# ------------------------------------------------------------------------------------------------------------
# Gathering across ranks with gradients
# ------------------------------------------------------------------------------------------------------------

_GATHER_GROUP: list = []  # the process group of the gathers (its own: never interleaved with DDP's all-reduces)


def _group():
    import torch.distributed as dist

    if not _GATHER_GROUP:
        _GATHER_GROUP.append(dist.new_group(backend=dist.get_backend()))
    return _GATHER_GROUP[0]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gradient of the gathered tensor over ranks (all-reduce, which gloo and
    NCCL both have) and keeps this rank's rows: each rank's rows get the gradient of every rank's loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: int, offset: int, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rows, ctx.offset, ctx.group = rows, offset, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.offset:ctx.offset + ctx.rows], None, None, None


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's rows x [n, ...] -> (every rank's rows in rank order [sum n, ...], offset of this rank's first row).

    Ranks may hold different row counts (padded for the collective, cut after). Gradients reach each rank's own
    rows from every rank's loss. Without torch.distributed (one process): (x, 0)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    group = _group()
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    rank, most = dist.get_rank(group), max(sizes)
    padded = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))]) if x.shape[0] < most else x
    if x.requires_grad:
        full = _GatherWithGrad.apply(padded, most, rank * most, group)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        full = torch.cat(parts)
    rows = torch.cat([full[r * most:r * most + s] for r, s in enumerate(sizes)])
    return rows, sum(sizes[:rank])


# ------------------------------------------------------------------------------------------------------------
# Sequences and views
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Sequences:
    """Click sequences: `news` [S, H] int64 news indices, oldest first, left-aligned (0 = pad); `user` [S];
    `counts`: where they came from (reported)."""

    news: np.ndarray
    user: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)


def build_sequences(train: dict[str, Any], history_only: list[tuple[str, dict[str, Any]]], max_history: int,
                    share: np.ndarray | None = None) -> Sequences:
    """The sequences pretraining may read: each train impression's history followed by its clicked candidates
    (train labels), and every history of the other splits' behaviours (the history column only: their candidates
    and labels are never read). The most recent `max_history` clicks are kept; empty and repeated sequences are
    dropped (counted).

    Args: train: the train split's behaviour arrays; history_only: (split name, arrays) of dev/test; share: [I]
    bool, the train impressions to read (`dataset.train_share`, --train_fraction; None: all). The others are not
    read at all, neither their clicks nor their history.
    """
    rows, users, counts = [], [], {}
    hist = np.asarray(train["histories"])[np.asarray(train["history_row"])]  # [I, H]
    labels, offsets = np.asarray(train["labels"]), np.asarray(train["offsets"])
    cands = np.asarray(train["candidates"])
    sizes = np.diff(offsets)
    share = np.ones(len(sizes), dtype=bool) if share is None else share
    imp_of = np.repeat(np.arange(len(sizes)), sizes)
    clicked = np.flatnonzero((labels == 1) & (cands > 0))
    click_news, click_imp = cands[clicked], imp_of[clicked]
    per_imp = np.split(click_news, np.searchsorted(click_imp, np.arange(1, len(sizes))))
    kept = np.flatnonzero(share)
    seq = np.zeros((len(kept), max_history), dtype=np.int64)
    for row, i in enumerate(kept):
        h = hist[i]
        items = np.concatenate([h[h > 0], per_imp[i]])[-max_history:]
        seq[row, :len(items)] = items
    rows.append(seq)
    users.append(np.asarray(train["user"], dtype=np.int64)[kept])
    counts["train impressions"] = len(kept)
    if len(kept) < len(sizes):
        counts["train impressions outside --train_fraction (not read)"] = len(sizes) - len(kept)
    for split, beh in history_only:
        used, first = np.unique(np.asarray(beh["history_row"]), return_index=True)
        h = np.asarray(beh["histories"])[used].astype(np.int64)
        out = np.zeros((len(h), max_history), dtype=np.int64)
        width = min(max_history, h.shape[1])
        # A history table may be wider or narrower than max_history: keep its most recent clicks.
        lengths = (h > 0).sum(1)
        for i, (row, n) in enumerate(zip(h, lengths)):
            items = row[:n][-width:]
            out[i, :len(items)] = items
        rows.append(out)
        users.append(np.asarray(beh["user"], dtype=np.int64)[first])
        counts[f"{split} histories"] = len(h)
    news, user = np.concatenate(rows), np.concatenate(users)
    nonempty = (news > 0).any(1)
    counts["empty (dropped)"] = int((~nonempty).sum())
    news, user = news[nonempty], user[nonempty]
    _, keep = np.unique(np.concatenate([news, user[:, None]], 1), axis=0, return_index=True)
    keep = np.sort(keep)
    counts["repeated (dropped)"] = len(news) - len(keep)
    return Sequences(news[keep], user[keep], counts)


def pretraining_sequences(config, corpus) -> Sequences:
    """The sequences of a pretraining run (`build_sequences`): the train impressions of the run's --train_fraction
    share (`dataset.train_share`, the share training with the same --seed reads), and with
    --pretrain_eval_histories the history column of dev/test."""
    train = corpus.behaviors("train")
    others = [(s, corpus.behaviors(s)) for s in ("dev", "test")
              if config.pretrain_eval_histories and s in corpus.splits]
    return build_sequences(train, others, config.max_history_num, train_share_of(config, train))


def holdout_split(seqs: Sequences, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the training and held-out sequences: the held-out ones are all sequences of a seeded `fraction` of
    the users (so no user is on both sides). fraction 0: nothing held out."""
    users = np.unique(seqs.user[seqs.user > 0])  # user 0 (unknown in train) is no one user: never held out
    if fraction <= 0 or len(users) < 2:
        return np.arange(len(seqs.user)), np.zeros(0, dtype=np.int64)
    n = min(len(users) - 1, max(1, int(round(fraction * len(users)))))
    held = np.random.default_rng([seed, 17]).choice(users, n, replace=False)
    out = np.isin(seqs.user, held)
    return np.flatnonzero(~out), np.flatnonzero(out)


def _compact(items: np.ndarray, h: int) -> np.ndarray:
    out = np.zeros(h, dtype=np.int64)
    out[:len(items)] = items
    return out


def make_view(items: np.ndarray, kind: str, rng: np.random.Generator, s: Any, h: int) -> np.ndarray:
    """One augmented view of a sequence `items` [L] (L >= 1) -> [H] left-aligned.

    crop: a random contiguous part of max(1, floor(L * crop_ratio)) clicks; mask: each click dropped with
    probability mask_ratio (at least one kept); reorder: a random contiguous part of max(1, floor(L *
    reorder_ratio)) clicks shuffled."""
    n = len(items)
    if kind == "crop":
        k = max(1, int(n * s.contrastive_crop_ratio))
        start = int(rng.integers(0, n - k + 1))
        return _compact(items[start:start + k], h)
    if kind == "mask":
        keep = rng.random(n) >= s.contrastive_mask_ratio
        if not keep.any():
            keep[int(rng.integers(0, n))] = True
        return _compact(items[keep], h)
    k = max(1, int(n * s.contrastive_reorder_ratio))
    start = int(rng.integers(0, n - k + 1))
    out = items.copy()
    out[start:start + k] = rng.permutation(out[start:start + k])
    return _compact(out, h)


# What each view kind holds (arrays per sequence, stacked into [B, ...] tensors of PretrainBatch.views):
#   pair:    view1 [H], view2 [H]                 (contrastive)
#   prefix:  prefix [H], next [] (0 = none)      (next_click; needs L >= 2)
#   masked:  masked [H] bool                      (mip, map; positions of the sequence masked; none when L < 2)
#   segment: context [H], segment [H]             (sp; the sequence without a segment, the segment; L >= 2)
def sequence_views(items: np.ndarray, kinds: set[str], rng: np.random.Generator, s: Any, h: int) -> dict[str, np.ndarray]:
    """The views `kinds` of one sequence `items` [L], drawn from `rng` in a fixed order of kinds (pair, prefix,
    masked, segment); kinds not asked for draw nothing."""
    n = len(items)
    out: dict[str, np.ndarray] = {}
    if "pair" in kinds:
        choices = [v for v in str(s.contrastive_views).split(",") if v]
        for name in ("view1", "view2"):
            out[name] = make_view(items, choices[int(rng.integers(0, len(choices)))], rng, s, h)
    if "prefix" in kinds:
        t = int(rng.integers(1, n)) if n >= 2 else 0
        out["prefix"] = _compact(items[:t], h)
        out["next"] = np.array(items[t] if n >= 2 else 0, dtype=np.int64)
    if "masked" in kinds:
        masked = np.zeros(h, dtype=bool)
        if n >= 2:
            pick = rng.random(n) < s.pretrain_mask_ratio
            if not pick.any():
                pick[int(rng.integers(0, n))] = True
            if pick.all():
                pick[int(rng.integers(0, n))] = False
            masked[:n] = pick
        out["masked"] = masked
    if "segment" in kinds:
        if n >= 2:
            k = int(rng.integers(1, max(1, min(n - 1, int(n * s.sp_max_ratio))) + 1))
            start = int(rng.integers(0, n - k + 1))
            out["context"] = _compact(np.concatenate([items[:start], items[start + k:]]), h)
            out["segment"] = _compact(items[start:start + k], h)
        else:
            out["context"] = out["segment"] = np.zeros(h, dtype=np.int64)
    return out


@dataclass
class PretrainBatch:
    """What the pretraining model sees (the pretraining counterpart of dataset.Batch). Bool masks: True = real.

    user:         [B] long, user index (0 = unknown user)
    history:      [B, H] long, the click sequence, oldest first, left-aligned (0 = pad)
    history_mask: [B, H] bool
    sample:       [B] long, row of the sequence in its dataset
    views:        name -> [B, H] long news indices (view1, view2, prefix, context, segment), [B] long (next),
                  [B, H] bool (masked); only those the chosen tasks need
    real:         [B] bool, False for the filler row of a rank whose share of the last global batch is empty (it
                  only keeps the rank in the collectives): no loss, no negative of any other row. None: all real
    """

    user: torch.Tensor
    history: torch.Tensor
    history_mask: torch.Tensor
    sample: torch.Tensor
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    real: torch.Tensor | None = None

    def _map(self, fn) -> "PretrainBatch":
        return PretrainBatch(**{f.name: fn(getattr(self, f.name)) for f in fields(self) if f.name not in ("views", "real")},
                             views={k: fn(v) for k, v in self.views.items()},
                             real=None if self.real is None else fn(self.real))

    def to(self, device, non_blocking: bool = False) -> "PretrainBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PretrainBatch":
        return self._map(lambda t: t.pin_memory())

    def real_rows(self) -> torch.Tensor:
        """[B] bool: the rows that are samples of the global batch."""
        return self.real if self.real is not None else torch.ones(len(self), dtype=torch.bool, device=self.user.device)

    def __len__(self) -> int:
        return self.user.shape[0]


class PretrainBatchSampler(GlobalBatchSampler):
    """`GlobalBatchSampler` whose items say whether they are real: (rows, True), or (one row, False) for the filler
    of a rank whose share of the last global batch is empty. The filler's loss has weight 0 already; marked, it is
    also kept out of the other ranks' negatives (the gathered keys), so W processes compute what one does."""

    def __iter__(self):
        for i, rows in enumerate(super().__iter__()):
            lo, hi = util.shard_bounds(self.global_size(i), self.world_size, self.rank)
            yield rows, hi > lo


class PretrainDataset(Dataset):
    """Click sequences with their views. Item `idx` (an index array, as `TrainDataset`) is a whole `PretrainBatch`.

    Each sequence's views come from a generator seeded by (seed, epoch, sequence row): the same views whatever
    the batch or the number of processes it lands in, so DDP ranks see what one process sees."""

    def __init__(self, seqs: Sequences, rows: np.ndarray, kinds: set[str], settings: Any, seed: int):
        self.news, self.user = seqs.news[rows], seqs.user[rows]
        self.kinds, self.settings, self.seed = set(kinds), settings, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.user)

    def __getitem__(self, idx) -> PretrainBatch:
        """idx: an index array, or (index array, real) from `PretrainBatchSampler` (real False: a filler row)."""
        real = True
        if isinstance(idx, tuple):
            idx, real = idx
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        news = self.news[idx]
        h = news.shape[1]
        views: dict[str, list[np.ndarray]] = {}
        for i, row in zip(idx, news):
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            for k, v in sequence_views(row[row > 0], self.kinds, rng, self.settings, h).items():
                views.setdefault(k, []).append(v)
        history = torch.from_numpy(news)
        return PretrainBatch(user=torch.from_numpy(self.user[idx]), history=history, history_mask=history > 0,
                             sample=torch.from_numpy(idx),
                             views={k: torch.from_numpy(np.stack(v)) for k, v in views.items()},
                             real=torch.full((len(idx),), bool(real)))


# ------------------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------------------

class Context:
    """One batch's encoded news and the user vectors of its views, computed once and shared by the tasks.

    `news(ids)` maps news indices of any shape to their vectors [..., D] (every news of the batch encoded once);
    `user(name)` is the user vector [B, D] of view `name` (a [B, H] tensor of `batch.views`, or "history")."""

    def __init__(self, model: "PretrainModel", batch: PretrainBatch, unique: torch.Tensor, vectors: torch.Tensor):
        self.model, self.batch = model, batch
        self.unique, self.vectors = unique, vectors  # [U] sorted news indices, [U, D]
        self.cache: dict[str, Any] = {}  # user vectors by view, the masked queries: computed once per batch

    def news(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self.unique, ids.reshape(-1)).clamp(max=len(self.unique) - 1)
        return self.vectors[pos].view(*ids.shape, -1)

    def view(self, name: str) -> torch.Tensor:
        return self.batch.history if name == "history" else self.batch.views[name]

    def real(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> this rank's real rows [B] bool, the global batch's [G] bool (rank order, as `gather_rows`)."""
        if "real" not in self.cache:
            real = self.batch.real_rows()
            self.cache["real"] = (real, gather_rows(real)[0])
        return self.cache["real"]

    def user(self, name: str, mask: torch.Tensor | None = None) -> torch.Tensor:
        key = name if mask is None else f"{name}/masked"
        if key not in self.cache:
            ids = self.view(name)
            self.cache[key] = self.model.user_vectors(self.news(ids), ids > 0 if mask is None else mask, self.batch.user,
                                                      ids)
        return self.cache[key]


class PretrainTask(nn.Module):
    """Base class: `forward(ctx) -> [B]` loss per sequence (unweighted). `views`: the view kinds its batches need."""

    name = "base"
    settings: tuple[type[Settings], ...] = ()
    views: tuple[str, ...] = ()
    uses_contextual = False  # reads UserEncoder.contextual (mip / map: the mask vector)
    min_clicks = 1  # a sequence with fewer clicks gives this task no sample (loss 0)
    batch_negatives = False  # its only negatives are the other sequences of the batch

    def __init__(self, config, meta: "CorpusMeta", dim: int, news: dict[str, np.ndarray]):
        super().__init__()

    def weight(self, config) -> float:
        return float(getattr(config, f"{self.name}_weight"))


@register_task("contrastive")
class ContrastiveTask(PretrainTask):
    """Two views of each history -> normalised user vectors; symmetric InfoNCE against the other sequences of the
    global batch (sequences of the same user are not negatives)."""

    settings = (ContrastiveSettings,)
    views = ("pair",)
    batch_negatives = True

    def __init__(self, config, meta, dim, news):
        super().__init__(config, meta, dim, news)
        self.scale = 1.0 / config.contrastive_temperature

    def forward(self, ctx):
        """views view1 / view2 [B, H] -> [B]"""
        z1 = F.normalize(ctx.user("view1").float(), dim=-1)  # [B, D]
        z2 = F.normalize(ctx.user("view2").float(), dim=-1)
        k1, offset = gather_rows(z1)  # [G, D]
        k2, _ = gather_rows(z2)
        users, _ = gather_rows(ctx.batch.user)  # [G]
        real, greal = ctx.real()
        target = offset + torch.arange(len(z1), device=z1.device)
        same = (ctx.batch.user[:, None] == users[None, :]) & (ctx.batch.user[:, None] > 0)  # [B, G]
        exclude = same | ~greal[None, :]  # a filler row is no negative
        loss = 0.5 * (info_nce(z1, k2, target, exclude, self.scale) + info_nce(z2, k1, target, exclude, self.scale))
        return loss * real


@register_task("next_click")
class NextClickTask(PretrainTask):
    """A history prefix -> user vector; InfoNCE (dot product) against the next clicked news of every sequence of the
    global batch (the same news elsewhere is not a negative). Sequences of one click have no next click: loss 0,
    and their (empty) target is no candidate."""

    settings = (NextClickSettings,)
    views = ("prefix",)
    min_clicks = 2
    batch_negatives = True

    def forward(self, ctx):
        """views prefix [B, H], next [B] -> [B]"""
        nxt = ctx.batch.views["next"]  # [B]
        user = ctx.user("prefix")  # [B, D]
        keys, offset = gather_rows(ctx.news(nxt))  # [G, D]
        ids, _ = gather_rows(nxt)
        real, greal = ctx.real()
        target = offset + torch.arange(len(nxt), device=nxt.device)
        exclude = (nxt[:, None] == ids[None, :]) | (ids[None, :] == 0) | ~greal[None, :]  # [B, G]
        loss = info_nce(user, keys, target, exclude)
        return loss * ((nxt > 0) & real)


def masked_queries(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked positions of a batch and the vectors that predict them: contextual outputs at those positions
    (masked news replaced by a learned mask vector) or, for an encoder without contextual outputs, the user vector
    of the visible history repeated per masked position. Computed once per batch: mip and map share them.

    Returns: queries [M, D], the sequence (row) of each [M] long, the masked news [M] long."""
    if "masked" not in ctx.cache:
        model, batch = ctx.model, ctx.batch
        masked = batch.views["masked"] & batch.history_mask  # [B, H]
        rows, cols = masked.nonzero(as_tuple=True)
        if model.contextual:
            vectors = ctx.news(batch.history)  # [B, H, D]
            filled = torch.where(masked.unsqueeze(-1), model.mask_vector.to(vectors.dtype), vectors)
            inp = model.user_inputs(filled, batch.history_mask, batch.user, batch.history)
            queries = model.user_encoder.contextual(inp)[rows, cols]  # [M, D]
        else:
            queries = ctx.user("history", mask=batch.history_mask & ~masked)[rows]  # [M, D]
        ctx.cache["masked"] = (queries, rows, batch.history[rows, cols])
    return ctx.cache["masked"]


@register_task("mip")
class MIPTask(PretrainTask):
    """Masked item prediction: each masked position's query scores every masked news of the global batch (dot
    product); the right one is its own news (the same news at other positions is not a negative)."""

    settings = (MIPSettings, MaskSettings)
    views = ("masked",)
    uses_contextual = True
    min_clicks = 2

    def forward(self, ctx):
        """views masked [B, H] -> [B] (mean over each sequence's masked positions; 0 without any)"""
        queries, rows, news = masked_queries(ctx)
        keys, offset = gather_rows(ctx.news(news))  # [Mg, D]
        ids, _ = gather_rows(news)
        real, _ = ctx.real()
        kreal, _ = gather_rows(real[rows])  # [Mg]: positions of filler rows are no negatives
        target = offset + torch.arange(len(news), device=news.device)
        loss = info_nce(queries, keys, target, (news[:, None] == ids[None, :]) | ~kreal[None, :])
        return per_sample_mean(loss, rows, len(ctx.batch)) * real


class AttributeHeads(nn.Module):
    """Linear heads from a [*, D] vector to category and subcategory logits (and entity logits), and their loss
    against a news' attributes."""

    def __init__(self, config, meta, dim: int, with_entities: bool):
        super().__init__()
        self.category = nn.Linear(dim, meta.category_num)
        self.subcategory = nn.Linear(dim, meta.subcategory_num)
        self.entity = nn.Linear(dim, meta.entity_num) if with_entities else None

    def forward(self, x: torch.Tensor, news: torch.Tensor, model: "PretrainModel") -> torch.Tensor:
        """x [M, D], news [M] long -> [M]: CE(category) + CE(subcategory) (+ mean binary CE over the entities)."""
        x = x.float()
        loss = F.cross_entropy(self.category(x), model.attr_category[news], reduction="none")
        loss = loss + F.cross_entropy(self.subcategory(x), model.attr_subcategory[news], reduction="none")
        if self.entity is not None:
            ent = model.attr_entities[news]  # [M, Le] entity ids, 0 = none
            target = torch.zeros(len(news), self.entity.out_features, device=x.device).scatter_(1, ent, 1.0)
            target[:, 0] = 0.0
            logits = self.entity(x)[:, 1:]
            loss = loss + F.binary_cross_entropy_with_logits(logits, target[:, 1:], reduction="none").mean(1)
        return loss


def _with_entities(config, meta) -> bool:
    return bool(config.pretrain_entities) and meta.entity_num > 1


@register_task("map")
class MAPTask(PretrainTask):
    """Masked attribute prediction: the category, subcategory (and entities) of each masked news, from the same
    queries as mip (`masked_queries`)."""

    settings = (MAPSettings, MaskSettings, AttributeSettings)
    views = ("masked",)
    uses_contextual = True
    min_clicks = 2

    def __init__(self, config, meta, dim, news):
        super().__init__(config, meta, dim, news)
        self.heads = AttributeHeads(config, meta, dim, _with_entities(config, meta))

    def forward(self, ctx):
        """views masked [B, H] -> [B]"""
        queries, rows, news = masked_queries(ctx)
        return per_sample_mean(self.heads(queries, news, ctx.model), rows, len(ctx.batch)) * ctx.batch.real_rows()


@register_task("aap")
class AAPTask(PretrainTask):
    """Associated attribute prediction: the category, subcategory (and entities) of each history news from its own
    news vector."""

    settings = (AAPSettings, AttributeSettings)

    def __init__(self, config, meta, dim, news):
        super().__init__(config, meta, dim, news)
        self.heads = AttributeHeads(config, meta, dim, _with_entities(config, meta))

    def forward(self, ctx):
        """history [B, H] -> [B]"""
        rows, cols = ctx.batch.history_mask.nonzero(as_tuple=True)
        news = ctx.batch.history[rows, cols]
        return per_sample_mean(self.heads(ctx.news(news), news, ctx.model), rows, len(ctx.batch)) * ctx.batch.real_rows()


@register_task("sp")
class SPTask(PretrainTask):
    """Segment prediction: u = user vector of the history without a contiguous segment, p = user vector of that
    segment, n = that of the next sequence's segment in the global batch (cyclically, filler rows skipped); loss
    -log sigmoid(u.p) - log sigmoid(-u.n). Sequences of one click have no segment: loss 0 (and are no negative).
    Without another sequence in the global batch (a batch of one) a sequence would be its own negative: its loss is
    the positive term only, -log sigmoid(u.p); the next sequence without a segment likewise leaves no negative term."""

    settings = (SPSettings,)
    views = ("segment",)
    min_clicks = 2

    def forward(self, ctx):
        """views context / segment [B, H] -> [B]"""
        u, p = ctx.user("context").float(), ctx.user("segment").float()  # [B, D]
        real, greal = ctx.real()
        valid = (ctx.batch.views["segment"][:, 0] > 0) & real  # [B]
        keys, offset = gather_rows(p)  # [G, D]
        kvalid, _ = gather_rows(valid)
        me = offset + torch.arange(len(u), device=u.device)  # [B] rows in the global batch
        order = greal.nonzero().squeeze(1)  # [Gr] the real rows
        among = torch.cumsum(greal.long(), 0) - 1  # [G] each row's place among the real ones
        other = order[(among[me] + 1) % max(1, len(order))] if len(order) else me
        negative = kvalid[other] & (other != me)
        loss = -F.logsigmoid((u * p).sum(-1)) - F.logsigmoid(-(u * keys[other]).sum(-1)) * negative
        return loss * valid


def unusable_tasks(tasks: dict[str, PretrainTask], news: np.ndarray, batch_size: int) -> dict[str, str]:
    """The tasks whose loss would be 0 on every batch of these sequences `news` [S, H], for want of a usable sample:
    -> {task: why}. A task needs sequences of `min_clicks` clicks; one scored against the other sequences of its
    batch needs two such sequences and --batch_size >= 2."""
    lengths = (np.asarray(news) > 0).sum(1)
    out = {}
    for name, task in tasks.items():
        n = int((lengths >= task.min_clicks).sum())
        if n == 0:
            out[name] = f"{name} needs sequences of at least {task.min_clicks} clicks: none of the {len(lengths)} has"
        elif task.batch_negatives and (n < 2 or batch_size < 2):
            out[name] = (f"{name} scores a sequence against the other sequences of its batch: "
                         + ("--batch_size 1 leaves none" if batch_size < 2 else f"only 1 of the {len(lengths)} "
                            f"sequences has {task.min_clicks} clicks"))
    return out


# ------------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------------

class PretrainModel(Model):
    """The recommender's encoders (a `Model`: same names, so its news_encoder.* / user_encoder.* weights load into a
    fine-tuned model) plus the chosen tasks' heads. `forward(PretrainBatch) -> ModelOutput(logits [B, 0], loss, aux)`
    with each task's weighted loss in aux."""

    def __init__(self, config, meta: "CorpusMeta", news_table: dict[str, np.ndarray]):
        if get_user_encoder(config.user_encoder).needs_popularity:
            raise ValueError(f"--mode=pretrain: --user_encoder {config.user_encoder} scores candidates itself (the "
                             f"user vector mixed with each candidate's time-aware popularity) and returns no user "
                             f"vector, and that vector reads each clicked news' CTR at the impression's time, which "
                             f"pretraining's click sequences do not carry: pretrain another user encoder, or train "
                             f"{config.user_encoder} from scratch")
        super().__init__(config, meta, news_table)
        if self.news_encoder.personalized:
            raise ValueError(f"--mode=pretrain: --news_encoder {config.news_encoder} is personalized (its news vectors "
                             f"depend on the user); pretraining encodes each news once per batch: choose another")
        if self.news_encoder.pretrain_refusal:
            raise ValueError(f"--mode=pretrain: --news_encoder {config.news_encoder} cannot be pretrained: "
                             f"{self.news_encoder.pretrain_refusal}")
        user_cls = type(self.user_encoder)
        if not user_cls.returns_user_vectors(config):
            raise ValueError(f"--mode=pretrain: --user_encoder {config.user_encoder} scores candidates itself with "
                             f"these settings and returns no user vector; pretraining needs a user encoder (and "
                             f"settings) that return user vectors")
        self.task_names = parse_tasks(config.pretrain_tasks)
        dim = self.user_encoder.output_dim
        self.tasks = nn.ModuleDict({n: PRETRAIN_TASKS[n](config, meta, dim, news_table) for n in self.task_names})
        self.weights = {n: self.tasks[n].weight(config) for n in self.task_names}
        # The click predictor is not pretrained (fine-tuning starts it afresh): no gradient, so DDP needs no
        # find_unused_parameters for an mlp predictor.
        for p in self.click_predictor.parameters():
            p.requires_grad_(False)
        # An encoder with contextual outputs overrides UserEncoder.contextual (which returns None).
        self.contextual = (any(t.uses_contextual for t in self.tasks.values())
                           and type(self.user_encoder).contextual is not UserEncoder.contextual)
        if self.contextual:
            self.mask_vector = nn.Parameter(torch.randn(dim) * 0.02)  # stands in for a masked news (mip / map)
        if any(isinstance(t, (MAPTask, AAPTask)) for t in self.tasks.values()):
            self.register_buffer("attr_category", torch.from_numpy(np.array(news_table["category"])).long(),
                                 persistent=False)
            self.register_buffer("attr_subcategory", torch.from_numpy(np.array(news_table["subcategory"])).long(),
                                 persistent=False)
            if _with_entities(config, meta):
                ent = np.concatenate([np.asarray(news_table["title_entity"]), np.asarray(news_table["abstract_entity"])], 1)
                used = np.flatnonzero(ent.any(0))
                ent = ent[:, :used[-1] + 1] if len(used) else ent[:, :1]
                self.register_buffer("attr_entities", torch.from_numpy(ent.astype(np.int64)), persistent=False)
        self.category_lookup = self.user_encoder.needs_category

    def view_kinds(self) -> set[str]:
        return {k for t in self.tasks.values() for k in t.views}

    def user_inputs(self, vectors: torch.Tensor, mask: torch.Tensor, user: torch.Tensor, ids: torch.Tensor) -> UserInputs:
        """A user encoder's inputs for histories `ids` [B, H] encoded as `vectors` [B, H, D]. A candidate-aware
        encoder gets one candidate: the mean of the history's vectors (category 0), so it returns one vector."""
        inp = UserInputs(history=vectors, history_mask=mask, user_id=user)
        if self.user_encoder.candidate_aware:
            w = mask.unsqueeze(-1).to(vectors.dtype)
            probe = (vectors * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)  # [B, 1, D]
            inp.candidates, inp.candidate_mask = probe, torch.ones(len(ids), 1, dtype=torch.bool, device=ids.device)
        if self.category_lookup:
            inp.history_category = self.news_category[ids].long()
            inp.candidate_category = torch.zeros(len(ids), 1, dtype=torch.long, device=ids.device)
        return inp

    def user_vectors(self, vectors: torch.Tensor, mask: torch.Tensor, user: torch.Tensor,
                     ids: torch.Tensor) -> torch.Tensor:
        """vectors [B, H, D], mask [B, H], user [B], ids [B, H] -> user vectors [B, D]"""
        out = self.user_encoder(self.user_inputs(vectors, mask, user, ids))
        return out.user.reshape(len(ids), -1)

    def encode_batch(self, batch: PretrainBatch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Each unique news of the batch once -> sorted news indices [U], vectors [U, D], the news encoder's aux."""
        unique = torch.unique(batch.history)  # every view's news is a news of the sequence
        vectors, aux = self.news_encoder.encode(self.news_features(unique))
        return unique, vectors, aux

    def forward(self, batch: PretrainBatch) -> ModelOutput:
        """batch: PretrainBatch of B sequences -> ModelOutput(logits [B, 0], loss: sum of weighted task losses (means
        over this rank's sequences) + the news encoder's aux, aux: each task's weighted loss)."""
        unique, vectors, news_aux = self.encode_batch(batch)
        ctx = Context(self, batch, unique, vectors)
        aux = {name: self.weights[name] * task(ctx).mean() for name, task in self.tasks.items()}
        loss = sum(aux.values()) + sum(news_aux.values(), torch.zeros((), device=vectors.device))
        return ModelOutput(logits=vectors.new_zeros(len(batch), 0), loss=loss, aux={**news_aux, **aux})

    def model_settings(self) -> dict[str, Any]:
        return {**super().model_settings(), "pretrain_tasks": self.task_names}


# ------------------------------------------------------------------------------------------------------------
# The run: the training loop with pretraining's data, evaluation and saving
# ------------------------------------------------------------------------------------------------------------

@dataclass
class HeldOutResult:
    """The per-epoch evaluation of a pretraining run: the held-out sequences' loss."""

    metrics: dict[str, Any]  # heldout_loss, heldout (each task's weighted loss), heldout_sequences
    seconds: float
    ties: dict[str, Any] = field(default_factory=dict)  # none: nothing is ranked
    per_impression: Any = None


class PretrainTrainer(Trainer):
    """`Trainer`'s loop on click sequences: the training data is `PretrainDataset`, the evaluation after each epoch
    is the loss on the held-out users' sequences (fixed views, eval mode; no dev label is read), the best epoch the
    one with the lowest held-out loss, saved as `<news>-<user>` in a `pretrain#<n>` run folder with
    `pretrain_log.jsonl`."""

    run_prefix = PRETRAIN_RUN_PREFIX
    epoch_log = "pretrain_log.jsonl"
    batch_sampler = PretrainBatchSampler

    def _sequences(self) -> tuple[Sequences, np.ndarray, np.ndarray]:
        if not hasattr(self, "_seqs"):
            cfg = self.config
            seqs = pretraining_sequences(cfg, self.corpus)
            rows, held = holdout_split(seqs, cfg.pretrain_holdout, cfg.seed)
            self.log(f"pretraining sequences: {len(rows)} for training, {len(held)} held out (the users of "
                     f"--pretrain_holdout {cfg.pretrain_holdout}); from "
                     + ", ".join(f"{k} {v}" for k, v in seqs.counts.items()))
            self._seqs = (seqs, rows, held)
        return self._seqs

    def _training_data(self) -> PretrainDataset:
        seqs, rows, _ = self._sequences()
        if len(rows) == 0:
            raise ValueError(f"{self.corpus.root / 'train' / 'behaviors.tsv'}: no click sequence to pretrain on (every "
                             f"history is empty and no impression has a click)")
        bad = unusable_tasks(dict(self.raw.tasks), seqs.news[rows], self.config.batch_size)
        if bad:
            raise ValueError(f"--pretrain_tasks {self.config.pretrain_tasks}: a task would train on a loss of 0 for want "
                             f"of a usable sample among the {len(rows)} training sequences ({'; '.join(bad.values())}); "
                             f"leave out {','.join(bad)}")
        return PretrainDataset(seqs, rows, self.raw.view_kinds(), self.config, self.config.seed)

    def _evaluation_data(self) -> tuple[Any, Any, Any]:
        """The held-out sequences. Where no task has a usable sample among them the held-out loss would be 0 for
        want of samples, and every epoch its best: an error; a task without one is left out of it (a note)."""
        seqs, _, held = self._sequences()
        bad = unusable_tasks(dict(self.raw.tasks), seqs.news[held], self.config.batch_size) if len(held) else {}
        h = self.config.pretrain_holdout
        if bad and len(bad) == len(self.raw.tasks):
            raise ValueError(f"--pretrain_holdout {h}: the {len(held)} held-out sequences give no task a usable sample "
                             f"({'; '.join(bad.values())}), so the held-out loss would be 0 and every epoch its best; "
                             f"raise --pretrain_holdout, or pass --pretrain_holdout 0 (the last epoch is kept)")
        if bad:
            self.log(f"note: the held-out loss of {', '.join(bad)} is 0 for want of a usable held-out sample "
                     f"({'; '.join(bad.values())}); the held-out loss measures the other tasks")
        return PretrainDataset(seqs, held, self.raw.view_kinds(), self.config, self.config.seed), None, None

    @torch.no_grad()
    def _evaluate_epoch(self, run, epoch: int) -> HeldOutResult:
        """Mean loss over the held-out sequences, in global batches of --batch_size (in-batch negatives as in
        training), each weighted by its size; every rank takes part (its share of each batch)."""
        cfg, rt, data = self.config, self.runtime, run.dev_beh
        t0 = time.time()
        if len(data) == 0:
            return HeldOutResult({}, 0.0)
        was = self.raw.training
        self.raw.eval()
        sampler = PretrainBatchSampler(len(data), cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
        names = list(self.raw.task_names)
        sums = [0.0] * (1 + len(names))
        for i, idx in enumerate(sampler):
            batch = data[idx].to(rt.device)
            with rt.autocast():
                out = self.raw(batch)
            share = sampler.weight(i) / rt.world_size * sampler.global_size(i) / len(data)
            for j, value in enumerate([out.loss, *[out.aux[n] for n in names]]):
                sums[j] += float(value) * share
        self.raw.train(was)
        sums = self._global_sums(sums)
        metrics = {"heldout_loss": sums[0], "heldout": dict(zip(names, sums[1:])), "heldout_sequences": len(data)}
        return HeldOutResult(metrics, time.time() - t0)

    def _decide(self, run, result: HeldOutResult) -> dict[str, Any]:
        """Lower held-out loss is better (the same global sums on every rank); without held-out users every epoch
        is the best so far (the last one is kept)."""
        cfg, state = self.config, run.state
        loss = result.metrics.get("heldout_loss")
        value = -loss if loss is not None else float(state.epoch + 1)
        improved = value > state.best
        bad = 0 if improved else state.bad_epochs + 1
        decision = {"improved": improved, "value": value, "bad_epochs": bad, "stop": bad >= cfg.early_stopping_epoch,
                    "criterion": "held-out loss improvement"}
        return util.broadcast_object(decision, group=self.runtime.wait_group)

    def _epoch_record(self, epoch: int, stats: dict[str, Any], result: HeldOutResult) -> dict[str, Any]:
        return {"epoch": epoch, "train_loss": stats["loss"], "train": stats["aux"],
                "train_seconds": round(stats["seconds"], 2), "heldout_seconds": round(result.seconds, 2),
                **result.metrics}

    def _metrics_text(self, metrics: dict[str, Any]) -> str:
        if "heldout_loss" not in metrics:
            return "no held-out users (--pretrain_holdout 0): the last epoch is kept"
        return (f"held-out loss {metrics['heldout_loss']:.4f} ("
                + ", ".join(f"{k} {v:.4f}" for k, v in metrics["heldout"].items()) + ")")

    def _save_best(self, run, epoch: int, result: HeldOutResult) -> None:
        save_checkpoint(run.checkpoint, self.raw, self.config, self.corpus.meta,
                        {"epoch": epoch, "pretrain_metrics": result.metrics})


# ------------------------------------------------------------------------------------------------------------
# Fine-tuning from a pretraining checkpoint
# ------------------------------------------------------------------------------------------------------------

ENCODER_PREFIXES = ("news_encoder.", "user_encoder.")


@dataclass
class InitFromResult:
    """What `load_pretrained_encoders` did: the tensors loaded, and those of the checkpoint dropped (only with
    --init_from_partial)."""

    loaded: list[str]
    dropped: list[str]

    def describe(self) -> str:
        return (f"{len(self.loaded)} news/user encoder tensors loaded ({_by_module(self.loaded)})"
                + (f"; {len(self.dropped)} checkpoint tensors dropped (--init_from_partial): {_names(self.dropped)}"
                   if self.dropped else ""))


def _by_module(names: list[str]) -> str:
    """['news_encoder.mhsa.q.weight', ...] -> 'news_encoder.mhsa 8, ...': tensors per module (two name levels)."""
    counts: dict[str, int] = {}
    for n in names:
        key = ".".join(n.split(".")[:2])
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def load_pretrained_encoders(model: nn.Module, ckpt: dict[str, Any], path, architecture: set[str] | None = None,
                             partial: bool = False) -> InitFromResult:
    """Copy the news_encoder.* and user_encoder.* weights of a pretraining checkpoint into `model`; the click
    predictor and the pretraining heads are not loaded. A checkpoint of another architecture is an error naming
    the settings that differ (`architecture`: the flags that shape weights; others, such as dropout, may differ).
    An encoder tensor of the checkpoint that the model lacks (e.g. the LoRA adapters of a layer now frozen) is an
    error naming it, unless `partial` (--init_from_partial): then it is dropped and named in the result."""
    saved = ckpt.get("model_settings")
    if not isinstance(saved, dict):
        raise ValueError(f"--init_from {path}: the checkpoint records no model_settings; pass a checkpoint written by "
                         f"--mode=pretrain (best_model/<dataset>/<news>-<user>/pretrain#<n>/<news>-<user>)")
    diff = settings_differences(saved, model.model_settings(), with_click=False, other_class_by_name=True)
    if architecture is not None:
        diff = [d for d in diff if d.split(":")[0][2:] in architecture]
    if diff:
        raise ValueError(f"--init_from {path}: pretrained with other encoder settings: {'; '.join(diff)}. Fine-tune "
                         f"with the pretraining's settings (its config.json) or pretrain with these")
    state = {k: v for k, v in ckpt["model"].items() if k.startswith(ENCODER_PREFIXES)}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    # A PLM encoder's base-weights signature (plm_backbones.SIGNATURE_KEY) is checked when loading, if there: a
    # checkpoint written before signatures has none.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(".plm_weights_signature"))
    shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, now {tuple(own[k].shape)})" for k in own
              if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or shapes:
        raise ValueError(f"--init_from {path}: the encoder weights do not fit the model built ("
                         + "; ".join(([f"missing from the checkpoint: {_names(missing)}"] if missing else [])
                                     + ([f"other shapes: {_names(shapes)}"] if shapes else []))
                         + "); pretrain with the same encoders and settings")
    dropped = sorted(set(state) - set(own))
    if dropped and not partial:
        raise ValueError(f"--init_from {path}: {len(dropped)} encoder tensors of the checkpoint have no place in the "
                         f"model built and would be dropped: {_names(dropped)}. Fine-tune with the pretraining's "
                         f"settings (its config.json), or pass --init_from_partial to load the others without them")
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return InitFromResult(loaded=sorted(k for k in own if k in state), dropped=dropped)
