"""Batches: one `Batch` for training and evaluation, built from the cached corpus arrays.

Legend: B impressions (eval) or clicked samples (train) in the batch, H history length, C candidates
(1+K in training, the impression's count in evaluation, padded to the batch maximum), K negatives.

Batches carry news *indices* into the corpus news table; the model holds that table on its device and encodes
each unique news of the batch once. A batch is built by slicing numpy arrays for a whole index list at once
(`__getitem__` takes a list of sample indices and the DataLoader runs with `batch_size=None`), so there is no
per-sample Python loop and DataLoader workers only slice memory-mapped arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class Batch:
    """Everything a model sees. Bool masks: True = real item.

    user:             [B] long, user index (0 = unknown user)
    history:          [B, H] long, news indices of the clicked history, oldest first, left-aligned (0 = pad)
    history_mask:     [B, H] bool
    candidates:       [B, C] long, news indices of the candidates (0 = pad or news unknown to news.tsv)
    candidate_mask:   [B, C] bool
    target:           [B] long, position of the clicked candidate (training only; else None)
    labels:           [B, C] int8, 1/0 click labels, -1 = pad or unlabelled (evaluation only; else None)
    impression_index: [B] long, row of the impression in its split's behaviors arrays
    time:             [B] long, the impression's hour (hours since 1970-01-01; MIND_corpus.BAD_TIME where its Time
                      could not be read); None for arrays without a time column. Read by time-aware models (PP-Rec)
    """

    user: torch.Tensor
    history: torch.Tensor
    history_mask: torch.Tensor
    candidates: torch.Tensor
    candidate_mask: torch.Tensor
    target: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    impression_index: torch.Tensor | None = None
    time: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                        for f in fields(self) for v in [getattr(self, f.name)]})

    def pin_memory(self) -> "Batch":  # called by the DataLoader when pin_memory=True
        return Batch(**{f.name: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
                        for f in fields(self) for v in [getattr(self, f.name)]})

    def __len__(self) -> int:
        return self.user.shape[0]


def _history(beh: dict[str, Any], rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    hist = np.asarray(beh["histories"][beh["history_row"][rows]], dtype=np.int64)  # [B, H]
    history = torch.from_numpy(hist)
    return history, history != 0


def _time(beh: dict[str, Any], rows: np.ndarray) -> torch.Tensor | None:
    if "time" not in beh:
        return None
    return torch.from_numpy(np.asarray(beh["time"][rows], dtype=np.int64))


def sample_negatives(num_negatives: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For each sample choose min(n, k) distinct positions in range(n), vectorised (Floyd's algorithm).

    Returns positions [S, k] int64 and a bool mask [S, k] (False where n < k: fewer negatives than asked).
    """
    n = num_negatives.astype(np.int64)
    s = len(n)
    chosen = np.zeros((s, k), dtype=np.int64)
    full = n >= k
    # Floyd: for j = n-k .. n-1 draw t in [0, j]; if t was taken already, take j (which cannot be taken yet).
    for step in range(k):
        j = n - k + step
        t = np.floor(rng.random(s) * np.maximum(j + 1, 1)).astype(np.int64)
        taken = (chosen[:, :step] == t[:, None]).any(axis=1)
        chosen[:, step] = np.where(taken, j, t)
    # Fewer than k negatives: take them all, pad the rest (masked out of the softmax).
    short = np.tile(np.arange(k), (s, 1))
    chosen = np.where(full[:, None], chosen, short)
    mask = full[:, None] | (short < n[:, None])
    return np.where(mask, chosen, 0), mask


def train_share(impressions: int, fraction: float, seed: int) -> np.ndarray:
    """[I] bool: the train impressions `--train_fraction` keeps: all for fraction >= 1, else a seeded choice of
    round(fraction * I) of them (at least one). The one choice of the share: training (`TrainDataset`),
    pretraining (`pretraining.pretraining_sequences`) and the popularity tie-break and baseline
    (`evaluation.popularity_for`, `tie_rank_for`) read the train labels of these impressions only, so a
    few-label run never sees a label outside its share."""
    chosen = np.ones(impressions, dtype=bool)
    if fraction < 1 and impressions:
        chosen[:] = False
        kept = max(1, int(round(fraction * impressions)))
        chosen[np.random.default_rng([seed, 23]).permutation(impressions)[:kept]] = True
    return chosen


def train_share_of(config, train_beh: dict[str, Any]) -> np.ndarray:
    """`train_share` for a run's config (--train_fraction, --seed) and its train behaviour arrays."""
    return train_share(len(np.asarray(train_beh["offsets"])) - 1, config.train_fraction, config.seed)


class TrainDataset(Dataset):
    """One sample per clicked candidate, with K negatives from the same impression re-drawn every epoch.

    `set_epoch(e)` redraws negatives with a generator seeded by (seed, e), so every DDP rank draws the same
    samples and a distributed sampler can split them. Impressions without negatives are skipped and counted.
    `fraction` < 1 keeps that share of the impressions (rounded, at least one), chosen by `seed`
    (`--train_fraction`: fine-tuning with fewer labels); `kept_impressions` says how many.
    """

    def __init__(self, beh: dict[str, Any], negative_sample_num: int, seed: int = 0, fraction: float = 1.0):
        self.beh = beh
        self.k = negative_sample_num
        self.seed = seed
        labels = np.asarray(beh["labels"])
        offsets = np.asarray(beh["offsets"])
        if (labels < 0).any():
            raise ValueError(f"{beh['path']}: the train split has unlabelled candidates; training needs "
                             f"'<NewsID>-0/1' labels")
        sizes = np.diff(offsets)
        impression_of = np.repeat(np.arange(len(sizes)), sizes)
        clicks = np.bincount(impression_of, weights=labels == 1, minlength=len(sizes)).astype(np.int64)
        negatives = sizes - clicks
        self.skipped_no_negative = int(((clicks > 0) & (negatives == 0)).sum())
        self.skipped_no_click = int((clicks == 0).sum())
        positive_flat = np.flatnonzero(labels == 1)
        chosen = train_share(len(sizes), fraction, seed)
        self.kept_impressions = int(chosen.sum())
        positive_flat = positive_flat[chosen[impression_of[positive_flat]]]
        keep = negatives[impression_of[positive_flat]] > 0
        self.positive_flat = positive_flat[keep]  # [S] flat index of each sample's clicked candidate
        self.sample_impression = impression_of[self.positive_flat]  # [S]
        # Negatives of each impression, contiguous: neg_start[i] .. neg_start[i] + negatives[i].
        neg_flat = np.flatnonzero(labels == 0)
        self.neg_news = np.asarray(beh["candidates"])[neg_flat]
        self.neg_start = np.concatenate([[0], np.cumsum(negatives)[:-1]])
        self.negatives = negatives
        self.skipped_clicks = int(len(positive_flat) - keep.sum())
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        imp = self.sample_impression
        pos, mask = sample_negatives(self.negatives[imp], self.k, rng)
        neg = self.neg_news[self.neg_start[imp][:, None] + pos]  # [S, K]
        cands = np.concatenate([np.asarray(self.beh["candidates"])[self.positive_flat][:, None], neg], 1)
        mask = np.concatenate([np.ones((len(imp), 1), dtype=bool), mask], 1)
        # Shuffle the positive's position so the model cannot learn "index 0 is the click".
        perm = np.argsort(rng.random(cands.shape), axis=1)
        self.candidates = np.take_along_axis(cands, perm, 1).astype(np.int64)
        self.candidate_mask = np.take_along_axis(mask, perm, 1)
        self.target = np.argmax(perm == 0, axis=1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.positive_flat)

    def __getitem__(self, idx) -> Batch:
        idx = np.asarray(idx, dtype=np.int64)
        imp = self.sample_impression[idx]
        history, history_mask = _history(self.beh, imp)
        return Batch(
            user=torch.from_numpy(np.asarray(self.beh["user"][imp], dtype=np.int64)),
            history=history, history_mask=history_mask,
            candidates=torch.from_numpy(self.candidates[idx]),
            candidate_mask=torch.from_numpy(self.candidate_mask[idx]),
            target=torch.from_numpy(self.target[idx]),
            impression_index=torch.from_numpy(imp), time=_time(self.beh, imp),
        )


class EvalDataset(Dataset):
    """One row per impression with all its candidates; batches group impressions of similar candidate count
    (less padding). Item i of this dataset is a whole batch: use it with `batch_size=None`."""

    def __init__(self, beh: dict[str, Any], batch_size: int, rank: int = 0, world_size: int = 1):
        self.beh = beh
        offsets = np.asarray(beh["offsets"])
        sizes = np.diff(offsets)
        order = np.argsort(sizes, kind="stable")
        order = order[sizes[order] > 0]
        self.batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        # DDP: each rank takes every world_size-th batch; the trainer gathers the scores.
        self.batches = self.batches[rank::world_size]
        self.skipped_empty = int((sizes == 0).sum())

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        imp = self.batches[i]
        offsets = np.asarray(self.beh["offsets"])
        starts, sizes = offsets[imp], offsets[imp + 1] - offsets[imp]
        c = int(sizes.max())
        col = np.arange(c)
        mask = col[None, :] < sizes[:, None]
        flat = np.where(mask, starts[:, None] + col[None, :], 0)
        cand = np.where(mask, np.asarray(self.beh["candidates"])[flat], 0).astype(np.int64)
        labels = np.where(mask, np.asarray(self.beh["labels"])[flat], -1).astype(np.int8)
        history, history_mask = _history(self.beh, imp)
        return Batch(
            user=torch.from_numpy(np.asarray(self.beh["user"][imp], dtype=np.int64)),
            history=history, history_mask=history_mask,
            candidates=torch.from_numpy(cand), candidate_mask=torch.from_numpy(mask),
            labels=torch.from_numpy(labels), impression_index=torch.from_numpy(imp.astype(np.int64)),
            time=_time(self.beh, imp),
        )
