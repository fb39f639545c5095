"""One training loop for CPU, one GPU and torchrun DDP, plus the cached evaluation.

Legend: B batch, C candidates, N news in the corpus table, D news dim, I impressions of a split.

Nothing in here knows a model name: the model comes from the registries, owns its loss and returns a
`ModelOutput`; the loop only moves batches, steps the optimizer and evaluates.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm.auto import tqdm

import util
from dataset import Batch, EvalDataset, TrainDataset

CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------
# Devices and processes
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine; use --device=cpu or auto")
    return device


def setup_runtime(config) -> Runtime:
    """Single process unless torchrun set WORLD_SIZE > 1."""
    device = resolve_device(config.device)
    return Runtime(device=device)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------

def batch_ranks(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [B, C] -> 1-based ranks [B, C] (padded candidates get ranks after the real ones).

    Ties follow the official scorer's order `argsort(score)[::-1]`: among equal scores the higher index ranks
    first. Sorting the reversed row stably in descending order gives exactly that.
    """
    c = logits.shape[1]
    x = torch.nan_to_num(logits.float(), nan=float("-inf")).masked_fill(~mask, float("-inf"))
    order = torch.sort(x.flip(1), dim=1, descending=True, stable=True).indices  # positions in flipped rows
    order = c - 1 - order  # back to original positions, best first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, c + 1, device=logits.device).expand_as(order))
    return ranks


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    ranks: np.ndarray  # flat [sum of candidates] int32, 1-based, in behaviors.tsv candidate order
    offsets: np.ndarray  # [I+1]
    labels: np.ndarray  # flat int8 (-1 = unlabelled)
    impression_ids: np.ndarray  # [I]
    seconds: float = 0.0


@torch.no_grad()
def evaluate(model: nn.Module, beh: dict[str, Any], config, runtime: Runtime, desc: str = "eval") -> EvalResult:
    """Score every impression of a split: encode each needed news once, then users, then candidates."""
    t0 = time.time()
    raw = model.module if hasattr(model, "module") else model
    was_training = raw.training
    raw.eval()
    device = runtime.device
    offsets = np.asarray(beh["offsets"])
    hist = np.asarray(beh["histories"])
    cands = np.asarray(beh["candidates"])
    # Index 0 stands for news unknown to news.tsv in dev/test: encode it like in training.
    raw.build_frozen_cache(log=print if runtime.is_main else (lambda *a: None))
    needed = np.union1d(np.union1d(hist.ravel(), cands), [0])
    news_vectors = raw.encode_all_news(torch.from_numpy(needed.astype(np.int64)).to(device))
    data = EvalDataset(beh, config.eval_batch_size)
    loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=config.num_workers,
                        pin_memory=device.type == "cuda")
    ranks = np.zeros(len(cands), dtype=np.int32)
    show = config.progress and runtime.is_main
    for batch in tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True):
        batch = batch.to(device, non_blocking=True)
        logits = raw.score_cached(batch, news_vectors)
        r = batch_ranks(logits, batch.candidate_mask).cpu().numpy()
        mask = batch.candidate_mask.cpu().numpy()
        imp = batch.impression_index.cpu().numpy()
        starts = offsets[imp]
        cols = np.nonzero(mask)
        ranks[starts[cols[0]] + cols[1]] = r[cols]
    raw.train(was_training)
    labels = np.asarray(beh["labels"])
    metrics = metrics_from_ranks(ranks, labels, offsets)
    return EvalResult(metrics, ranks, offsets, labels, np.asarray(beh["impression_ids"]), time.time() - t0)


def metrics_from_ranks(ranks: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
    """Official-scorer metrics computed on score = 1/rank, exactly what a submission is scored on."""
    if len(labels) and (labels < 0).all():
        return {"labelled": False}
    metrics = util.compute_metrics_flat(1.0 / ranks.astype(np.float64), labels.astype(np.int64), offsets)
    metrics["labelled"] = True
    return metrics


def popularity_result(train_beh: dict[str, Any], beh: dict[str, Any], news_num: int) -> dict[str, Any]:
    """The popularity baseline: score a candidate by its click count in train (impressions as tie-break)."""
    cands, labels = np.asarray(train_beh["candidates"]), np.asarray(train_beh["labels"])
    clicks = np.bincount(cands, weights=labels == 1, minlength=news_num)
    shown = np.bincount(cands, minlength=news_num)
    score = clicks + shown * 1e-6
    flat = score[np.asarray(beh["candidates"])]
    return util.compute_metrics_flat(flat, np.asarray(beh["labels"]).astype(np.int64), np.asarray(beh["offsets"]))


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

def new_run_dir(output_dir: str, dataset: str, model_name: str) -> Path:
    """`<output_dir>/<dataset>/<model>/#<n>/` with n one above every existing run (never reused)."""
    base = Path(output_dir) / dataset / model_name
    base.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(p.name[1:]) for p in base.iterdir() if p.name.startswith("#") and p.name[1:].isdigit()]
        run = Path(base) / f"#{max(taken, default=0) + 1}"
        try:
            run.mkdir()  # atomic: two runs started together cannot get the same index
            return run
        except FileExistsError:
            continue


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: nn.Module, config, corpus_meta, extra: dict[str, Any]) -> None:
    raw = model.module if hasattr(model, "module") else model
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT,
        "model": raw.state_dict(),
        "config": config.to_dict(),
        "corpus": corpus_meta.signature(),
        **extra,
    }, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        candidates = [p for p in path.iterdir() if p.is_file() and "-" in p.name and p.suffix == ""]
        if len(candidates) == 1:
            path = candidates[0]
        else:
            raise FileNotFoundError(f"{path} is a folder; pass the checkpoint file inside it "
                                    f"(e.g. best_model/<dataset>/<news>-<user>/#1/<news>-<user>)")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found (expected best_model/<dataset>/<news>-<user>/#<run>/"
                                f"<news>-<user>)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise ValueError(f"{path} is not a checkpoint written by this framework ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by this framework (no model/config entries)")
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
    """Adam over trainable parameters; encoders may ask for their own lr group via `param_groups(config)`."""
    raw = model.module if hasattr(model, "module") else model
    groups, seen = [], set()
    for module in (raw.news_encoder, raw.user_encoder):
        for group in getattr(module, "param_groups", lambda c: [])(config):
            groups.append(group)
            seen.update(id(p) for p in group["params"])
    rest = [p for p in raw.parameters() if p.requires_grad and id(p) not in seen]
    groups.insert(0, {"params": rest, "lr": config.lr})
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(self, config, corpus, model: nn.Module, runtime: Runtime, log: Callable = print):
        self.config = config
        self.corpus = corpus
        self.runtime = runtime
        self.log = log if runtime.is_main else (lambda *a, **k: None)
        self.model = model.to(runtime.device)
        self.raw = model
        model.build_frozen_cache(log=self.log)

    def _loader(self, data: TrainDataset, epoch: int) -> DataLoader:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        sampler = BatchSampler(RandomSampler(data, generator=gen), cfg.batch_size // self.runtime.world_size, False)
        return DataLoader(data, sampler=sampler, batch_size=None, num_workers=cfg.num_workers,
                          pin_memory=self.runtime.device.type == "cuda")

    def train(self) -> TrainResult:
        cfg, rt = self.config, self.runtime
        train_beh = self.corpus.behaviors("train")
        dev_beh = self.corpus.behaviors("dev")
        data = TrainDataset(train_beh, cfg.negative_sample_num, seed=cfg.seed)
        if data.skipped_no_negative or data.skipped_no_click:
            self.log(f"train: {len(data)} samples; skipped {data.skipped_no_negative} impressions without "
                     f"negatives and {data.skipped_no_click} without clicks")
        pop = popularity_result(train_beh, dev_beh, self.raw.news_num)
        self.log(f"popularity baseline, dev: {format_metrics(pop)}")

        batches_per_epoch = math.ceil(len(data) / (cfg.batch_size // rt.world_size * rt.world_size))
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum_steps)
        if cfg.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
        total = steps_per_epoch * cfg.epoch
        optimizer = build_optimizer(self.model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total, cfg.warmup_ratio))

        run_dir = new_run_dir(cfg.output_dir, cfg.dataset, cfg.model_name) if rt.is_main else None
        checkpoint = run_dir / cfg.model_name if run_dir else None
        if rt.is_main:
            (run_dir / "config.json").write_text(cfg.to_json())
            self.log(f"run folder {run_dir}; {len(data)} train samples, {steps_per_epoch} steps/epoch, "
                     f"device {rt.device}")
        best, best_epoch, best_metrics, history, bad_epochs = -math.inf, 0, {}, [], 0
        show = cfg.progress and rt.is_main
        epoch_bar = tqdm(range(1, cfg.epoch + 1), desc="epochs", disable=not show, dynamic_ncols=True)
        for epoch in epoch_bar:
            t0 = time.time()
            data.set_epoch(epoch)
            self.model.train()
            loss_sum, loss_n, step = 0.0, 0, 0
            bar = tqdm(self._loader(data, epoch), total=min(batches_per_epoch, steps_per_epoch * cfg.grad_accum_steps),
                       desc=f"epoch {epoch}", leave=False, disable=not show, dynamic_ncols=True)
            optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(bar):
                batch = batch.to(rt.device, non_blocking=True)
                out = self.model(batch)
                (out.loss / cfg.grad_accum_steps).backward()
                loss_sum += out.loss.item()
                loss_n += 1
                if (i + 1) % cfg.grad_accum_steps == 0 or i + 1 == batches_per_epoch:
                    if cfg.gradient_clip_norm > 0:
                        nn.utils.clip_grad_norm_(self.model.parameters(), cfg.gradient_clip_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    bar.set_postfix(loss=f"{out.loss.item():.4f}", mean=f"{loss_sum / loss_n:.4f}",
                                    lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    if step >= steps_per_epoch:
                        break
            bar.close()
            train_seconds = time.time() - t0
            result = evaluate(self.model, dev_beh, cfg, rt, desc="dev")
            value = util.criterion_value(result.metrics, cfg.dev_criterion)
            record = {"epoch": epoch, "train_loss": loss_sum / max(loss_n, 1), "train_seconds": round(train_seconds, 2),
                      "dev_seconds": round(result.seconds, 2), **{k: v for k, v in result.metrics.items()}}
            history.append(record)
            improved = value > best
            if improved:
                best, best_epoch, best_metrics, bad_epochs = value, epoch, result.metrics, 0
            else:
                bad_epochs += 1
            if rt.is_main:
                with open(run_dir / "dev_log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if improved:
                    save_checkpoint(checkpoint, self.model, cfg, self.corpus.meta,
                                    {"epoch": epoch, "dev_metrics": result.metrics})
                self.log(f"epoch {epoch}: loss {record['train_loss']:.4f} ({train_seconds:.1f}s) | dev "
                         f"{format_metrics(result.metrics)}{'  *best*' if improved else ''}")
            epoch_bar.set_postfix(best=f"{best:.4f}", best_epoch=best_epoch)
            if bad_epochs >= cfg.early_stopping_epoch:
                self.log(f"early stopping: no dev improvement ({cfg.dev_criterion}) for {bad_epochs} epochs")
                break
        epoch_bar.close()
        self.log(f"best epoch {best_epoch}: dev {format_metrics(best_metrics)}\ncheckpoint: {checkpoint}")
        return TrainResult(run_dir, checkpoint, best_epoch, best_metrics, history)
