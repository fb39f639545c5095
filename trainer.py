"""One training loop for CPU, one GPU and torchrun DDP (AMP, gradient accumulation, resumable checkpoints). Devices
live in devices.py, the evaluation in evaluation.py, checkpoints and run folders in checkpoints.py.

Legend: B batch, C candidates, N news in the corpus table, D news dim, I impressions of a split, W world size.

Nothing in here knows a model name: the model comes from the registries, owns its loss and returns a
`ModelOutput`; the loop only moves batches, steps the optimizer and evaluates. DDP is a flag, not a copy of the
loop: `self.model` is the DDP wrapper when distributed, `self.raw` always the bare `Model`.
"""
from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

import run_records
import scorer
import util
from checkpoints import (
    CHECKPOINT_FORMAT,
    LAST_CHECKPOINT,
    START_FILES,
    RunLock,
    atomic_torch_save,
    load_state,
    new_run_dir,
    save_checkpoint,
)
from dataset import TrainDataset
from devices import Runtime
from evaluation import (
    evaluate,
    format_metrics,
    format_ties,
    popularity_for,
    tie_rank_for,
    write_records,
)

class TrainingInterrupted(Exception):
    """Ctrl-C during training. `run_dir` and `epoch` (the epoch last.pt holds, 0 = none) say what can be resumed;
    main adds the command that resumes (`command`)."""

    def __init__(self, run_dir: Path | None, epoch: int, text: str):
        super().__init__(text)
        self.run_dir, self.epoch, self.text = run_dir, epoch, text
        self.command: str | None = None

    def __str__(self) -> str:
        return self.text + (f"; resume with: {self.command}" if self.command and self.epoch > 0 else "")


class TrainingDiverged(ValueError):
    """The training loss (or the dev evaluation it leads to) is not finite: the run stops, naming the step and the
    flags that usually cause it; no such epoch is ever recorded as the best (a ValueError: main prints one line)."""


def divergence_hints(config, amp: str, plm: bool = False) -> str:
    """The flags that usually make a loss overflow, with their values in this run (`plm`: a PLM is trained)."""
    hints = [f"--lr={config.lr} (try a smaller one)"]
    if plm:
        hints.append(f"--plm_lr={config.plm_lr}")
    if amp in ("fp16", "bf16"):
        hints.append(f"--amp {amp} (try --amp=off)")
    if config.gradient_clip_norm == 0:
        hints.append("--gradient_clip_norm=0 (clipping is off)")
    return "; ".join(hints)


def usable_impressions(beh: dict[str, Any]) -> tuple[int, int, int]:
    """(impressions with a clicked and a non-clicked candidate, without any click, with unlabelled candidates):
    only the first kind gets an AUC, so a split without any cannot pick a best epoch."""
    labels, offsets = np.asarray(beh["labels"]), np.asarray(beh["offsets"])

    def per_impression(mask: np.ndarray) -> np.ndarray:
        csum = np.concatenate([[0], np.cumsum(mask)])
        return csum[offsets[1:]] - csum[offsets[:-1]]

    clicks, others, unlabelled = per_impression(labels == 1), per_impression(labels == 0), per_impression(labels < 0)
    return int(((clicks > 0) & (others > 0)).sum()), int((clicks == 0).sum()), int((unlabelled > 0).sum())


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


class Callback:
    """Hooks into the loop, for tests and extensions (nothing in the production loop needs one). Each runs on
    every rank; override what you need. `trainer.runtime.rank` tells the rank."""

    def on_train_start(self, trainer: "Trainer", run: "_Run") -> None:
        pass

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def on_step_start(self, trainer: "Trainer", step: int) -> None:
        """Before the micro-batches of optimizer step `step + 1` (`step` steps done so far)."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int, record: dict[str, Any]) -> None:
        pass

    def on_record(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        """Rank 0, after each record of train_log.jsonl ("kind": "step" every --log_every steps, "epoch")."""

    def on_train_end(self, trainer: "Trainer", error: BaseException | None) -> None:
        """Every rank, as training ends: `error` is None when it finished, else what ended it (Ctrl-C included)."""


@dataclass
class _Run:
    """What the epochs of one run share: set up by `Trainer._start`, read and updated by the epoch methods."""

    data: Any  # TrainDataset or another dataset of Batches (`set_epoch`, `__getitem__(indices)`)
    sampler: GlobalBatchSampler
    batches_per_epoch: int
    accum: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    run_dir: Path
    checkpoint: Path  # the best epoch's model
    last: Path  # last.pt, the resumable state
    state: TrainState
    recorder: Any  # run_records.RunRecorder on rank 0, None elsewhere
    dev_beh: Any  # what `_evaluate_epoch` reads: the dev split (a subclass may evaluate on other data)
    tie_rank: Any
    record_meta: dict[str, Any]
    impressions_per_sample: float
    show: bool  # progress bars drawn
    say: Callable[[str], None]
    epoch_bar: Any


class Trainer:
    """The loop of a run. A subclass changes what it trains on and how an epoch is judged and saved by overriding
    `_training_data`, `_evaluation_data`, `_evaluate_epoch`, `_decide`, `_epoch_record`, `_metrics_text` and
    `_save_best` (as pretraining.PretrainTrainer does), never the step loop.

    Args:
        resume: a loaded last.pt (`load_training_state`) to continue, with `resume_path` its file; the run goes on
            in that run folder.
        callbacks: `Callback`s called at the start of training, of each epoch and step, and at each epoch's end.
    """

    run_prefix = "#"  # run folders <output_dir>/<dataset>/<model>/<run_prefix><n>
    batch_sampler = GlobalBatchSampler  # a subclass may mark the filler of an empty shard (pretraining does)
    epoch_log = "dev_log.jsonl"  # one line per epoch (`_epoch_record`), in the run folder

    def __init__(self, config, corpus, model: nn.Module, runtime: Runtime, log: Callable = print,
                 resume: dict[str, Any] | None = None, resume_path: str | Path | None = None,
                 callbacks: Sequence[Callback] = ()):
        self.config = config
        self.corpus = corpus
        self.runtime = runtime
        self.callbacks = list(callbacks)
        self.log = log if runtime.is_main else (lambda *a, **k: None)
        self.raw = model.to(runtime.device)
        self.resume, self.resume_path = resume, resume_path
        if resume is not None:
            load_state(self.raw, resume, resume_path)
        model.prepare(log=self.log)
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
        run_dir = new_run_dir(cfg.output_dir, cfg.dataset, cfg.model_name, self.run_prefix) if rt.is_main else None
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

    def _record(self, run: "_Run", record: dict[str, Any]) -> None:
        """Rank 0: a train_log.jsonl record (and TensorBoard), then the callbacks' `on_record` (trackers.py)."""
        run.recorder.write(record)
        for cb in self.callbacks:
            cb.on_record(self, record)

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
            run_records.plot_curves(run_dir)
        except Exception as e:  # a picture must never end a training run
            self.log(f"WARNING: could not draw {run_dir / run_records.CURVES}: {type(e).__name__}: {e}")

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """`_train`, plus what surrounds a run: the run-folder lock, a clear end on Ctrl-C (`TrainingInterrupted`:
        which epoch last.pt holds and the run folder to resume), and the removal of a new run's folder when
        training fails before its first optimizer step (it then holds only start-up files)."""
        self._opened: tuple[Path, bool, RunLock | None] | None = None  # run folder, new run?, its lock
        self._state: TrainState | None = None
        self._first_step: int | None = None
        error: BaseException | None = None
        try:
            return self._train()
        except KeyboardInterrupt as e:
            error = e
            raise self._interrupted() from None
        except BaseException as e:
            error = e
            self._remove_failed_start()
            raise
        finally:
            if self._opened is not None and self._opened[2] is not None:
                self._opened[2].release()
            for cb in self.callbacks:
                cb.on_train_end(self, error)

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
            return TrainingInterrupted(run_dir, 0, "interrupted in epoch 1, before any epoch finished: nothing to "
                                       "resume" + (f" ({run_dir} removed)" if removed else f" ({run_dir} keeps the "
                                                    "logs of the interrupted epoch)"))
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
        """The loop: start (or resume), then per epoch train, evaluate, save; stop early when dev stalls."""
        run = self._start()
        for epoch in run.epoch_bar:
            if run.state.stopped_early:
                break
            for cb in self.callbacks:
                cb.on_epoch_start(self, epoch)
            stats = self._train_epoch(run, epoch)
            result = self._evaluate_epoch(run, epoch)
            decision = self._decide(run, result)
            self._save_epoch(run, epoch, stats, result, decision)
        return self._finish(run)

    # -- start ----------------------------------------------------------------------------------------------
    def _training_data(self) -> TrainDataset:
        """The samples of one epoch (a dataset whose `__getitem__(indices)` gives a Batch, `set_epoch(e)`)."""
        cfg = self.config
        train_beh = self.corpus.behaviors("train")
        data = TrainDataset(train_beh, cfg.negative_sample_num, seed=cfg.seed, fraction=cfg.train_fraction)
        if cfg.train_fraction < 1:
            self.log(f"train: --train_fraction {cfg.train_fraction}: {data.kept_impressions} of "
                     f"{len(train_beh['offsets']) - 1} impressions (chosen by --seed {cfg.seed})")
        if data.skipped_no_negative or data.skipped_no_click:
            self.log(f"train: {len(data)} samples; skipped {data.skipped_no_negative} impressions without "
                     f"negatives and {data.skipped_no_click} without clicks")
        if len(data) == 0:
            raise ValueError(f"{train_beh['path']}: no training sample: none of its {len(train_beh['offsets']) - 1} "
                             f"impressions has both a click and a negative ({data.skipped_no_negative} without "
                             f"negatives, {data.skipped_no_click} without clicks); training needs impressions "
                             f"with '<NewsID>-1' and '<NewsID>-0' candidates")
        return data

    def _evaluation_data(self) -> tuple[Any, Any, Any]:
        """What the per-epoch evaluation reads: the dev split, its tie rule, and (rank 0) the popularity baseline's
        per-impression records (None elsewhere: then none are written)."""
        cfg = self.config
        dev_beh = self.corpus.behaviors("dev")
        usable, no_click, unlabelled = usable_impressions(dev_beh)
        if usable == 0:  # every epoch's dev metrics would be NaN: none could be the best, nothing would be saved
            raise ValueError(f"{dev_beh['path']}: none of its {len(dev_beh['offsets']) - 1} impressions has both a "
                             f"clicked ('<NewsID>-1') and a non-clicked ('<NewsID>-0') candidate ({no_click} without "
                             f"clicks, {unlabelled} unlabelled): dev AUC/MRR/nDCG cannot be computed, so no epoch "
                             f"could be chosen as the best; training needs a labelled dev split")
        tie_rank = tie_rank_for(cfg, self.corpus.behaviors("train"), self.raw.news_num)
        pop = None
        if self.runtime.is_main:
            pop = popularity_for(cfg, self.corpus.behaviors("train"), dev_beh, self.raw.news_num)
            self.log(f"popularity baseline, dev: {format_metrics(scorer.mean_metrics(pop))}")
        return dev_beh, tie_rank, pop

    def _start(self) -> "_Run":
        """Everything a run needs before its first epoch: data and sampler, optimizer and schedule, the run folder
        (new or resumed) with its config and records, and the dev split with its popularity baseline."""
        cfg, rt = self.config, self.runtime
        data = self._training_data()
        dev_beh, tie_rank, pop = self._evaluation_data()

        sampler = self.batch_sampler(len(data), cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
        batches_per_epoch = len(sampler)
        accum = cfg.grad_accum_steps
        steps_per_epoch = math.ceil(batches_per_epoch / accum)
        if cfg.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
        optimizer = build_optimizer(self.raw, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(steps_per_epoch * cfg.epoch,
                                                                               cfg.warmup_ratio))
        scaler = torch.amp.GradScaler("cuda", enabled=rt.amp == "fp16")

        run_dir = self._open_run_dir()
        if self.resume is not None:
            state = self._restore(optimizer, scheduler, scaler)
        else:
            state = TrainState()
            if rt.distributed:  # distinct dropout streams per rank (the model was built from the same seed)
                torch.manual_seed(cfg.seed + rt.rank)
        self._state, self._first_step = state, state.step
        recorder = None
        # Per-impression records for --mode=compare, where --mode=dev writes them too: <run>/dev/.
        record_meta = {"split": "dev", "dataset": cfg.dataset, "corpus": str(self.corpus.root),
                       "tie_break": cfg.tie_break}
        if rt.is_main:
            (run_dir / "config.json").write_text(cfg.to_json())
            if pop is not None:
                write_records(run_dir / "dev", None, pop, dev_beh, record_meta)
            recorder = run_records.RunRecorder(run_dir, cfg.tensorboard, log=self.log,
                                               resumed_step=state.step if self.resume is not None else None)
            recorder.write_environment(run_records.environment_info(rt.device, rt.world_size, rt.amp))
            self.log(f"run folder {run_dir}; {len(data)} train samples, {steps_per_epoch} steps/epoch, device "
                     f"{rt.device}" + (f" x {rt.world_size} processes" if rt.distributed else "")
                     + f", amp {rt.amp}, batch {cfg.batch_size}"
                     + (f" ({cfg.batch_size // rt.world_size} per process)" if rt.distributed else "")
                     + (f" x {accum} accumulation steps" if accum > 1 else ""))
        if state.stopped_early or state.epoch >= cfg.epoch:
            self.log(f"nothing to do: the run stopped at epoch {state.epoch} of {cfg.epoch}"
                     + (" (early stopping)" if state.stopped_early else ""))
        show = cfg.progress and rt.is_main
        run = _Run(
            data=data, sampler=sampler, batches_per_epoch=batches_per_epoch, accum=accum,
            steps_per_epoch=steps_per_epoch, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            run_dir=run_dir, checkpoint=run_dir / cfg.model_name, last=run_dir / LAST_CHECKPOINT, state=state,
            recorder=recorder, dev_beh=dev_beh, tie_rank=tie_rank, record_meta=record_meta,
            # A training "impression" rate for the logs: samples/s times impressions per sample (an impression
            # with several clicks gives several samples).
            impressions_per_sample=(len(np.unique(data.sample_impression)) / max(1, len(data))
                                    if hasattr(data, "sample_impression") else 1.0),
            show=show,
            # While the epoch bar is drawn, lines go above it (tqdm.write), never glued to the end of the bar.
            say=(lambda text: tqdm.write(str(text))) if show else self.log,
            epoch_bar=tqdm(range(state.epoch + 1, cfg.epoch + 1), desc="epochs", disable=not show,
                           dynamic_ncols=True))
        for cb in self.callbacks:
            cb.on_train_start(self, run)
        return run

    # -- one epoch ------------------------------------------------------------------------------------------
    def _train_epoch(self, run: "_Run", epoch: int) -> dict[str, Any]:
        """One epoch of optimizer steps (at most --max_steps_per_epoch). Returns the epoch's global mean loss and
        auxiliary losses, its seconds and the samples it saw."""
        cfg, rt, state = self.config, self.runtime, run.state
        optimizer, scheduler, scaler, sampler = run.optimizer, run.scheduler, run.scaler, run.sampler
        t0 = time.time()
        run.data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        self.model.train()
        loader = DataLoader(run.data, sampler=sampler, batch_size=None, num_workers=cfg.num_workers,
                            pin_memory=rt.device.type == "cuda")
        loss_sum, loss_n, step = 0.0, 0, 0
        aux_sum: dict[str, torch.Tensor] = {}  # this epoch's auxiliary losses, summed like loss_sum
        window = _LogWindow()  # since the last train_log record
        accum, batches = run.accum, run.batches_per_epoch
        bar = tqdm(loader, total=min(batches, run.steps_per_epoch * accum), desc=f"epoch {epoch}",
                   leave=False, disable=not run.show, dynamic_ncols=True)
        optimizer.zero_grad(set_to_none=True)
        nonfinite = None  # this rank's first non-finite loss of the current optimizer step
        for i, batch in enumerate(bar):
            for cb in self.callbacks:
                cb.on_step_start(self, state.step)
            weight = sampler.weight(i)
            boundary = (i + 1) % accum == 0 or i + 1 == batches
            # The epoch's last window may hold fewer micro-batches: the step's gradient is their mean.
            held = min(accum, batches - i // accum * accum)
            batch = batch.to(rt.device, non_blocking=True)
            # No gradient all-reduce on accumulation micro-batches: DDP syncs on the step's last one.
            with (self.model.no_sync() if rt.distributed and not boundary else nullcontext()):
                with rt.autocast():
                    out = self.model(batch)
                scaler.scale(out.loss * (weight / held)).backward()
            loss = out.loss.item()
            if not math.isfinite(loss) and nonfinite is None:
                nonfinite = loss
            share = weight / rt.world_size  # this rank's share of the global batch's mean loss
            loss_sum += loss * share
            loss_n += 1
            for name, value in out.aux.items():
                aux_sum[name] = aux_sum.get(name, 0.0) + value.detach().float() * share
            window.add(loss * share, {k: v.detach().float() * share for k, v in out.aux.items()},
                       sampler.global_size(i))
            if not boundary:
                continue
            self._check_finite(nonfinite, epoch, state)  # before the step: NaN gradients never reach the weights
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
                if run.recorder is not None:
                    self._record(run, {"kind": "step", "epoch": epoch, "step": state.step, **stats,
                                       "lr": _group_lrs(optimizer),
                                       "impressions_per_s": stats["samples_per_s"] * run.impressions_per_sample})
                window = _LogWindow()
            bar.set_postfix(loss=f"{loss:.4f}", mean=f"{loss_sum * rt.world_size / loss_n:.4f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step >= run.steps_per_epoch:
                break
        bar.close()
        if step == 0:  # never an evaluation, a "best" epoch and a checkpoint of a model that did not train
            raise ValueError(f"epoch {epoch}: the training data loader gave no batch ({len(run.data)} samples, "
                             f"{batches} batches expected): nothing was trained, nothing saved")
        names = sorted(aux_sum)
        aux_means = dict(zip(names, self._global_sums([float(aux_sum[n]) for n in names]))) if names else {}
        seconds = time.time() - t0
        return {"loss": self._global_mean(loss_sum, loss_n),
                "aux": {k: v / max(loss_n, 1) for k, v in aux_means.items()},
                "seconds": seconds,
                "samples": sum(sampler.global_size(j) for j in range(min(loss_n, batches)))}

    def _hints(self) -> str:
        plm = getattr(getattr(self.raw, "news_encoder", None), "uses_plm", False)
        return divergence_hints(self.config, self.runtime.amp, plm)

    def _check_finite(self, loss: float | None, epoch: int, state: TrainState) -> None:
        """Stop at the first optimizer step whose loss is not finite on any rank (`loss`: this rank's, None when
        finite). Under DDP the ranks agree through one all-reduce of a flag per step, so all of them stop together."""
        if self.runtime.distributed:
            if self._global_sums([0.0 if loss is None else 1.0])[0] == 0:
                return
        elif loss is None:
            return
        kept = (f"{LAST_CHECKPOINT} holds epoch {state.epoch}" if state.epoch else "no epoch was finished")
        raise TrainingDiverged(f"epoch {epoch}, optimizer step {state.step + 1}: the training loss is "
                               f"{'not finite on another process' if loss is None else loss} (the model diverged); "
                               f"the run stops and this epoch is not saved ({kept}). Likely causes: "
                               f"{self._hints()}")

    def _evaluate_epoch(self, run: "_Run", epoch: int):
        """The dev evaluation after an epoch (every rank takes part; metrics on rank 0)."""
        return evaluate(self.raw, run.dev_beh, self.config, self.runtime, desc="dev", tie_rank=run.tie_rank)

    def _decide(self, run: "_Run", result) -> dict[str, Any]:
        """Best epoch and early stopping. Decisions are rank 0's, broadcast: no rank ever acts on its own view."""
        cfg, rt, state = self.config, self.runtime, run.state
        decision = None
        if rt.is_main:
            value = scorer.criterion_value(result.metrics, cfg.dev_criterion)
            improved = value > state.best
            bad = 0 if improved else state.bad_epochs + 1
            decision = {"improved": improved, "value": value, "bad_epochs": bad,
                        "stop": bad >= cfg.early_stopping_epoch, "error": self._dev_problem(state.epoch + 1, value,
                                                                                            result.ties)}
        decision = util.broadcast_object(decision, group=rt.wait_group)
        if decision["error"]:  # raised on every rank, after the broadcast: no rank waits for another
            raise TrainingDiverged(decision["error"])
        return decision

    def _dev_problem(self, epoch: int, value: float, ties: dict[str, Any]) -> str | None:
        """Why an epoch's dev evaluation cannot be judged (None: it can): a non-finite criterion, or non-finite
        scores, which are ranked last by the tie rule, so the metrics would measure the rule, not the model."""
        cfg = self.config
        if not math.isfinite(value):
            return (f"epoch {epoch}: dev {cfg.dev_criterion} is {value}, so the epoch cannot be compared; the run "
                    f"stops (likely causes: {self._hints()})")
        if ties and ties.get("nonfinite_scores"):
            return (f"epoch {epoch}: the model gave {ties['nonfinite_scores']} non-finite dev scores (e.g. impressions "
                    f"{', '.join(ties['nonfinite_impressions'])}): it diverged, and its metrics would rank those "
                    f"candidates by the tie rule, not by the model; the run stops (likely causes: "
                    f"{self._hints()})")
        return None

    def _epoch_record(self, epoch: int, stats: dict[str, Any], result) -> dict[str, Any]:
        """The epoch's line of `epoch_log` (and of the run's history)."""
        return {"epoch": epoch, "train_loss": stats["loss"], "train_seconds": round(stats["seconds"], 2),
                "dev_seconds": round(result.seconds, 2), **result.metrics,
                **{k: result.ties[k] for k in ("tie_break", "tied_impressions", "nonfinite_scores")}}

    def _metrics_text(self, metrics: dict[str, Any]) -> str:
        """What the printed lines say about an evaluation's metrics."""
        return f"dev {format_metrics(metrics)}"

    def _save_best(self, run: "_Run", epoch: int, result) -> None:
        """Rank 0, at a new best epoch: its checkpoint and the dev per-impression records."""
        cfg = self.config
        save_checkpoint(run.checkpoint, self.raw, cfg, self.corpus.meta, {"epoch": epoch, "dev_metrics": result.metrics})
        write_records(run.run_dir / "dev", result.per_impression, None, run.dev_beh,
                      {**run.record_meta, "model": cfg.model_name, "run": run.run_dir.name, "seed": cfg.seed,
                       "epoch": epoch, "checkpoint": str(run.checkpoint), "written_by": "training"})

    def _save_epoch(self, run: "_Run", epoch: int, stats: dict[str, Any], result, decision: dict[str, Any]) -> None:
        """Record the epoch, write the best checkpoint when dev improved and last.pt always (rank 0), then wait:
        checkpoints are written before any rank goes on."""
        cfg, rt, state = self.config, self.runtime, run.state
        record = self._epoch_record(epoch, stats, result)
        state.history.append(record)
        state.epoch, state.bad_epochs, state.stopped_early = epoch, decision["bad_epochs"], decision["stop"]
        if decision["improved"]:
            state.best, state.best_epoch, state.best_metrics = decision["value"], epoch, result.metrics
        # Taken after evaluation, the last use of the generators in this epoch, on every rank.
        rng = util.all_gather_object(util.get_rng_state(), group=rt.wait_group)
        # Checkpoints are written before anyone goes on; a rank-0 failure stops every rank with one line.
        util.on_main_rank(lambda: self._write_epoch(run, epoch, stats, result, decision, rng), rt.is_main,
                          rt.wait_group, "writing the run's records")
        run.epoch_bar.set_postfix(best=f"{state.best:.4f}", best_epoch=state.best_epoch)
        if state.stopped_early:
            what = decision.get("criterion", f"dev improvement ({cfg.dev_criterion})")
            run.say(f"early stopping: no {what} for {state.bad_epochs} epochs")
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch, record)

    def _write_epoch(self, run: "_Run", epoch: int, stats: dict[str, Any], result, decision: dict[str, Any],
                     rng: list) -> None:
        """Rank 0: the epoch's log lines, curves, the best checkpoint when dev improved, and last.pt."""
        cfg, state = self.config, run.state
        # A full disk or a read-only folder: one line naming the run folder; atomic writes keep the last files.
        with util.writing_into(run.run_dir, "--output_dir", "the run's records"):
            rate = stats["samples"] / stats["seconds"]
            util.write_lines_atomic(run.run_dir / self.epoch_log, [json.dumps(r) for r in state.history])
            self._record(run, {"kind": "epoch", "epoch": epoch, "step": state.step, "train_loss": stats["loss"],
                               "aux": stats["aux"], "lr": _group_lrs(run.optimizer),
                               "train_seconds": round(stats["seconds"], 2), "samples_per_s": rate,
                               "impressions_per_s": rate * run.impressions_per_sample,
                               "dev_seconds": round(result.seconds, 2), "criterion": decision["value"],
                               **{k: result.metrics[k] for k in scorer.METRIC_KEYS if k in result.metrics}})
            if cfg.plot:
                self._plot(run.run_dir)
            if decision["improved"]:
                self._save_best(run, epoch, result)
            self._save_last(run.last, run.optimizer, run.scheduler, run.scaler, state, rng)
            run.say(f"epoch {epoch}: loss {stats['loss']:.4f} ({stats['seconds']:.1f}s) | "
                    f"{self._metrics_text(result.metrics)}{'  *best*' if decision['improved'] else ''}")
            if result.ties and format_ties(result.ties, "dev"):
                run.say(format_ties(result.ties, "dev"))

    def _finish(self, run: "_Run") -> TrainResult:
        cfg, state = self.config, run.state
        run.epoch_bar.close()
        if state.best_epoch == 0:  # never print a checkpoint path that was not written
            raise ValueError(f"{run.run_dir}: no epoch of {state.epoch} was chosen as the best (the criterion never "
                             f"improved on {state.best}), so no checkpoint {run.checkpoint.name} was written")
        if run.recorder is not None:
            run.recorder.close()
            self.log(f"run records: {run.run_dir / run_records.TRAIN_LOG}, {run.run_dir / run_records.ENVIRONMENT}"
                     + (f", {run.run_dir / run_records.CURVES}" if cfg.plot else "")
                     + (f", {run.run_dir / 'tensorboard'}" if run.recorder.writer is not None else ""))
        self.log(f"best epoch {state.best_epoch}: {self._metrics_text(state.best_metrics)}\ncheckpoint: "
                 f"{run.checkpoint}\ntraining state: {run.last}")
        return TrainResult(run.run_dir, run.checkpoint, state.best_epoch, state.best_metrics, state.history)
