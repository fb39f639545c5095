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
    # with keep_scores (rank 0): flat float32 scores [sum of candidates] and the news vectors [N, D] (None for a
    # personalized news encoder), for --rerank and --beyond_embedding=model
    scores: np.ndarray | None = None
    news_vectors: np.ndarray | None = None


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
             tie_rank: np.ndarray | None = None, keep_scores: bool = False) -> EvalResult:
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
    scores = np.zeros(len(cands) if keep_scores else 0, dtype=np.float32)  # --rerank needs them after ranking
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
            if keep_scores:
                scores[starts[cols[0]] + cols[1]] = logits.float().cpu().numpy()[cols]
            tied[imp] = row_tied.cpu().numpy()
            nonfinite[imp] = row_nonfinite.cpu().numpy()
    raw.train(was_training)
    # Every candidate and impression belongs to exactly one rank's batches: the sum puts each rank's part in place.
    counts = _sum_over_ranks(torch.from_numpy(counts), rt, to_main_only=True).cpu().numpy()
    ranks, tied, nonfinite = counts[:len(cands)], counts[len(cands):len(cands) + n_imp], counts[len(cands) + n_imp:]
    kept_vectors = None
    if keep_scores:
        scores = _sum_over_ranks(torch.from_numpy(scores), rt, to_main_only=True).cpu().numpy()
        kept_vectors = news_vectors.float().cpu().numpy() if news_vectors.numel() else None
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
                      time.time() - t0, ties, per, scores if keep_scores and rt.is_main else None, kept_vectors)


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


# -- the records of --mode=dev / --mode=test --------------------------------------------------------------------

EVALUATION_FILES = ("metrics.json", significance.PER_IMPRESSION, "ranking.txt", "truth.txt", "prediction.txt",
                    "prediction.zip")


def evaluation_provenance(path: Path, ckpt: dict[str, Any], split: str, tie_break: str) -> dict[str, Any]:
    """What an evaluation's numbers come from: the checkpoint file (name, size, modification time), the epoch it
    holds, the split and the tie rule. Two evaluations with equal provenance give equal records."""
    st = Path(path).stat()
    return {"checkpoint": str(path), "checkpoint_name": Path(path).name, "epoch": ckpt.get("epoch"), "split": split,
            "tie_break": tie_break, "checkpoint_bytes": st.st_size, "checkpoint_mtime_ns": st.st_mtime_ns}


def _holds_only(folder: Path, provenance: dict[str, Any], trained_tie_break: str) -> bool:
    """Whether every evaluation record in `folder` comes from `provenance` (an absent or empty folder: True). A
    record of unknown provenance (files of an older version without it) counts as another's."""
    import json

    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    metrics, per = folder / "metrics.json", folder / significance.PER_IMPRESSION
    if metrics.exists():
        try:
            saved = json.loads(metrics.read_text()).get("provenance") or {}
        except (OSError, ValueError, AttributeError):
            return False
        if any(saved.get(k) != v for k, v in provenance.items() if k != "checkpoint"):
            return False
    if per.exists():  # training writes these at each new best epoch, without a metrics.json
        try:
            meta = significance.load_per_impression(per).meta
        except ValueError:
            return False
        if (Path(str(meta.get("checkpoint"))).name != provenance["checkpoint_name"]
                or meta.get("epoch") != provenance["epoch"] or meta.get("split") != provenance["split"]
                or meta.get("tie_break", trained_tie_break) != provenance["tie_break"]):
            return False
    elif not metrics.exists() and any((folder / name).exists() for name in EVALUATION_FILES):
        return False
    return True


def records_folder(path: Path, provenance: dict[str, Any], trained_tie_break: str) -> Path:
    """Where --mode=dev/test of checkpoint `path` writes: `<split>/` beside the run's best-model file,
    `<split>-<stem>/` beside any other checkpoint (`dev-last/` for last.pt), so an evaluation of another checkpoint
    never writes over the best epoch's records. A folder is reused only when all the records in it come from the
    same provenance (`evaluation_provenance`: refreshed with the same numbers); otherwise the first `<name>-2`,
    `<name>-3`, ... that is free or holds this provenance."""
    from checkpoints import records_name  # checkpoints imports torch and the run records; only needed here

    base = records_name(path, provenance["split"])
    if provenance.get("rerank"):  # a re-ranked evaluation (--rerank) beside the model's own: dev-mmr0.5/
        base += f"-{provenance['rerank']}"
    n = 1
    while True:
        folder = Path(path).parent / (base if n == 1 else f"{base}-{n}")
        if _holds_only(folder, provenance, trained_tie_break):
            return folder
        n += 1


def write_evaluation(folder: Path, result: "EvalResult", beh: dict[str, Any], popularity: dict[str, Any] | None,
                     report: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Write an evaluation of --mode=dev/test into `folder`: test/prediction.txt + prediction.zip or
    dev/ranking.txt, truth.txt (labelled splits), the per-impression records, and metrics.json (`report` with the
    paths added). Returns the report keys of the files written, in the order to print them."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    split = report["split"]
    ranks_list = np.split(result.ranks, result.offsets[1:-1])
    ids = result.impression_ids.tolist()
    if split == "test":
        scorer.write_prediction(folder / "prediction.txt", ids, [r.tolist() for r in ranks_list],
                                zip_path=folder / "prediction.zip")
        report["prediction"] = str(folder / "prediction.zip")
    else:
        scorer.write_prediction(folder / "ranking.txt", ids, [r.tolist() for r in ranks_list])
        report["ranking"] = str(folder / "ranking.txt")
    if result.metrics.get("labelled"):
        labels_list = np.split(result.labels, result.offsets[1:-1])
        scorer.write_truth(folder / "truth.txt", ids, [lab.tolist() for lab in labels_list])
        report["truth"] = str(folder / "truth.txt")
    if result.per_impression is not None:  # per-impression records for --mode=compare
        written = write_records(folder, result.per_impression, popularity, beh, meta)
        report["per_impression"], report["per_impression_popularity"] = map(str, written)
    report["metrics_json"] = str(folder / "metrics.json")
    util.write_lines_atomic(folder / "metrics.json", json.dumps(report, indent=2, default=str).splitlines())
    return [k for k in ("ranking", "truth", "per_impression", "per_impression_popularity", "metrics_json")
            if k in report]


def rerank_and_measure(config, corpus, beh: dict[str, Any], result: EvalResult,
                       train_beh: dict[str, Any]) -> Any:
    """On rank 0 after `evaluate`: --rerank (the result's ranks, per-impression and mean metrics replaced by the
    re-ranked ones, the tie counts kept) and the --beyond_metrics of the final ranks. Returns the
    `beyond_accuracy.BeyondResult`, or None when no beyond-accuracy metric was asked for."""
    import beyond_accuracy as ba
    import reranking

    names = ba.parse_metric_names(config.beyond_metrics)
    if names:
        ba.check_k(config.beyond_k, result.offsets)  # before any slow work
    if config.rerank == "none" and not names:
        return None
    # novelty and popularity bias count the clicks of the run's --train_fraction share, as the popularity baseline does
    clicks, _ = train_popularity(train_beh, len(corpus.news["category"]), train_share_of(config, train_beh))
    needs = [m for m in names if "sentiment" not in ba.METRICS[m].reads]
    if config.rerank == "mmr":
        needs.append("ild_embedding")
    features = ba.news_features(corpus, clicks, needs, config.beyond_embedding, result.news_vectors)
    if config.rerank != "none":
        result.ranks, counts = reranking.rerank(config.rerank, config.rerank_lambda, result.scores, result.ranks,
                                                beh, features)
        result.per_impression = per_impression_from_ranks(result.ranks, result.labels, result.offsets)
        result.metrics = {**metrics_of(result.per_impression), "rerank": config.rerank,
                          "rerank_lambda": config.rerank_lambda, **counts}
    if not names:
        return None
    if any("sentiment" in ba.METRICS[m].reads for m in names):
        full = ba.news_features(corpus, clicks, ["sentiment"],
                                sentiment_news=ba.needed_news(result.ranks, beh, config.beyond_k))
        features.sentiment, features.sentiment_source = full.sentiment, full.sentiment_source
    return ba.compute(result.ranks, beh, features, config.beyond_k, names)
