"""Evaluation and ranking: each news encoded once, users, then candidates from the cached vectors (sharded
across ranks under DDP); ranks with the tie-break and non-finite rules; metrics from the ranks; the popularity
baseline; per-impression records for --mode=compare.

Legend: B batch, C candidates, N news in the corpus table, D news dim, I impressions of a split, W world size."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import scorer
import significance
import util
from dataset import EvalDataset, train_share_of
from devices import Runtime, _sum_over_ranks


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
    # scorer.per_impression_metrics of the scored impressions (rank 0 of a labelled split; None otherwise)
    per_impression: dict[str, Any] | None = None


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
    raw.prepare(log=print if rt.is_main else (lambda *a: None))
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
    """`scorer.per_impression_metrics` on score = 1/rank, exactly what a submission is scored on; None when the
    split has no labels (MIND-large test)."""
    if len(labels) and (labels < 0).all():
        return None
    return scorer.per_impression_metrics(1.0 / ranks.astype(np.float64), labels.astype(np.int64), offsets)


def metrics_of(per: dict[str, Any] | None) -> dict[str, Any]:
    """The metrics dict of an evaluation from its per-impression metrics (None: an unlabelled split)."""
    return {"labelled": False} if per is None else {**scorer.mean_metrics(per), "labelled": True}


def train_popularity(train_beh: dict[str, Any], news_num: int,
                     share: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per news [N]: clicks and impressions (times shown) in the train split; with `share` ([I] bool,
    `dataset.train_share`) in those train impressions only."""
    cands, labels = np.asarray(train_beh["candidates"]), np.asarray(train_beh["labels"])
    if share is not None and not share.all():
        offsets = np.asarray(train_beh["offsets"])
        keep = np.repeat(share, np.diff(offsets))  # [N candidates] bool
        cands, labels = cands[keep], labels[keep]
    return np.bincount(cands, weights=labels == 1, minlength=news_num), np.bincount(cands, minlength=news_num)


def popularity_per_impression(train_beh: dict[str, Any], beh: dict[str, Any], news_num: int,
                              share: np.ndarray | None = None) -> dict[str, Any]:
    """The popularity baseline per impression (`scorer.per_impression_metrics`): a candidate scores its click count
    in train (impressions as tie-break), counted in the train impressions `share` (None: all)."""
    clicks, shown = train_popularity(train_beh, news_num, share)
    score = clicks + shown * 1e-6
    flat = score[np.asarray(beh["candidates"])]
    return scorer.per_impression_metrics(flat, np.asarray(beh["labels"]).astype(np.int64), np.asarray(beh["offsets"]))


def popularity_for(config, train_beh: dict[str, Any], beh: dict[str, Any], news_num: int) -> dict[str, Any]:
    """The popularity baseline of a run: counted in the train impressions its --train_fraction / --seed share
    reads, so a few-label run's baseline sees the labels the run saw, no more."""
    return popularity_per_impression(train_beh, beh, news_num, train_share_of(config, train_beh))


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


def popularity_rank(train_beh: dict[str, Any], news_num: int, share: np.ndarray | None = None) -> np.ndarray:
    """[N] int64, 0 = most popular: news ordered by train clicks, then train impressions (both descending), then
    news index, counted in the train impressions `share` (None: all). A total order of the news, so candidates with
    equal model scores are ordered by what they are, never by where they stand in the impression
    (--tie_break=popularity)."""
    clicks, shown = train_popularity(train_beh, news_num, share)
    order = np.lexsort((np.arange(news_num), -shown, -clicks))
    rank = np.empty(news_num, dtype=np.int64)
    rank[order] = np.arange(news_num)
    return rank


def tie_rank_for(config, train_beh: dict[str, Any], news_num: int) -> np.ndarray | None:
    """`--tie_break` -> the `tie_rank` argument of `evaluate`: popularity counted in the run's --train_fraction
    share of the train impressions (the labels the run trained on)."""
    if config.tie_break != "popularity":
        return None
    return popularity_rank(train_beh, news_num, train_share_of(config, train_beh))


def format_metrics(m: dict[str, Any]) -> str:
    if not m.get("labelled", True) or "auc" not in m:
        return "no labels"
    return (f"AUC {m['auc']:.4f}  MRR {m['mrr']:.4f}  nDCG@5 {m['ndcg5']:.4f}  nDCG@10 {m['ndcg10']:.4f}"
            f"  ({m['impressions']} impressions"
            + (f", {m['skipped_single_class']} single-class skipped" if m.get("skipped_single_class") else "")
            + ")")
