"""Training step: end-to-end (the trainer's DataLoader -> device -> step) vs model-only (the same batches already
on the device, no loader), news deduplication on vs off, unique/total news per batch, and torch.compile vs eager,
each pair measured in the same run, interleaved (A, B, A, B, ...), medians reported. NRMS (MHSA-MHSA) by default.

    python bench/train.py     # NRMS, default demo corpus (3,000 news), batch 64, 1 thread (2.5 min, 2 busy CPU cores)

    python bench/train.py --compile= --rounds 9 --steps 20       # more samples, no torch.compile
    python bench/train.py --preset small --compile=              # unique/total on a MIND-small-sized corpus
    python bench/train.py --device cuda --threads 0 --workers 0,2,4

What is timed, per step (forward, backward, gradient clipping, Adam, learning-rate schedule, `loss.item()`,
exactly the trainer's inner loop):
- model-only: `--steps` batches built beforehand and moved to the device, then stepped;
- end-to-end, for each `--workers` value: a fresh `DataLoader` over the trainer's `GlobalBatchSampler`
  (`batch_size=None`, pinned memory on CUDA), like an epoch start, then the same `--steps` batches (same epoch, same
  sampler order) moved to the device and stepped. Ratio = end-to-end / model-only (issue 6 target <= 1.10). The
  loader's start-up (forking workers, first batch) is paid once per epoch and printed apart, with its share of an
  epoch of the corpus;
- building a batch in the main process alone (what `num_workers=0` adds to every step);
- without dedup: model-only, but every news reference of the batch (B*H history + B*C candidates) is encoded,
  instead of each unique news once (`Model._gather_news`);
- compiled: model-only through `torch.compile(model, dynamic=True)` (what `Trainer` does with `--compile`; same
  parameters); its first steps (compilation) are timed apart and not in the ratio.
Each round uses the batches of another epoch, so shapes vary as in training. Prints markdown tables; bench/README.md
records the figures with the machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config  # noqa: E402
from dataset import Batch, TrainDataset  # noqa: E402
from devices import setup_runtime  # noqa: E402
from main import load_corpus  # noqa: E402
from model import Model  # noqa: E402
from trainer import GlobalBatchSampler, build_optimizer, warmup_linear  # noqa: E402

# Generated corpus sizes. small = MIND-small (docs/MIND.md §1: 156,965 train / 73,152 dev impressions; 65k news
# over train + dev, as bench/scale.py --preset small).
PRESETS: dict[str, dict[str, int]] = {
    "demo": dict(news=3000, users=2000, train_impressions=6000, dev_impressions=1500),
    "small": dict(news=65000, users=50000, train_impressions=156965, dev_impressions=73152),
}
THREADS_HELP = ("torch CPU threads (0 = torch's default). Default 1: on this project's 2-core machine the other core "
                "runs a training job, and with 2 threads every parallel op waits for the busy core (measured: an Adam "
                "step of PLMNRMS took 1.0-1.5 s with 2 threads vs 0.02-0.05 s with 1)")


# ----------------------------------------------------------------------------------------------------------
# Helpers shared by bench/plm.py and bench/eval.py
# ----------------------------------------------------------------------------------------------------------

def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def demo_flags(sizes: dict[str, int]) -> list[str]:
    """main.py's --demo_* flags of a generated corpus of `sizes` (a PRESETS entry); 100 test impressions."""
    return [f"--demo_news={sizes['news']}", f"--demo_users={sizes['users']}",
            f"--demo_train_impressions={sizes['train_impressions']}",
            f"--demo_dev_impressions={sizes['dev_impressions']}", "--demo_test_impressions=100"]


def bench_config(data_dir: str, preset: str | dict[str, int], device: str, *flags: str) -> Config:
    """A Config on a generated demo corpus of `preset` size (a PRESETS name or its own sizes) in `data_dir`
    (git-ignored), no progress bars."""
    s = PRESETS[preset] if isinstance(preset, str) else preset
    return Config.from_args(["--dataset=demo", f"--data_dir={data_dir}", f"--device={device}", "--no-progress",
                             *demo_flags(s), *flags])


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def interleaved(measures: dict[str, Callable[[int], float]], rounds: int, log=print, first: int = 0,
                total: int | None = None) -> dict[str, list[float]]:
    """Run every measure once per round, in the given order (A, B, A, B, ...): load from other jobs on the
    machine then hits all of them alike. A measure takes the round number (from `first`) and returns seconds per
    unit; `total` is only for the progress line."""
    out: dict[str, list[float]] = {name: [] for name in measures}
    for r in range(first, first + rounds):
        for name, fn in measures.items():
            out[name].append(fn(r))
        log(f"  round {r + 1}/{total or first + rounds}: "
            + ", ".join(f"{n} {v[-1] * 1e3:,.1f} ms" for n, v in out.items()))
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(res: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a/b within each round: robust to load that changes between rounds."""
    return median([x / y for x, y in zip(res[a], res[b])])


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


# ----------------------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------------------

class Stepper:
    """The trainer's inner loop for one batch, on `module` (the model or its torch.compile wrapper)."""

    def __init__(self, model: Model, cfg: Config, rt):
        self.model, self.cfg, self.rt = model, cfg, rt
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_linear(10 ** 6, cfg.warmup_ratio))
        self.scaler = torch.amp.GradScaler("cuda", enabled=rt.amp == "fp16")

    def step(self, module: nn.Module, batch: Batch) -> float:
        with self.rt.autocast():
            out = module(batch)
        self.scaler.scale(out.loss).backward()
        if self.cfg.gradient_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.gradient_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.item()


def gather_every_reference(self: Model, batch: Batch):
    """`Model._gather_news` without deduplication: every history and candidate reference is encoded."""
    b, h = batch.history.shape
    c = batch.candidates.shape[1]
    ids = torch.cat([batch.history.reshape(-1), batch.candidates.reshape(-1)])  # [B*H + B*C]
    vectors, aux = self.news_encoder.forward_with_aux(self.news_features(ids))  # [B*H + B*C, D]
    return vectors[: b * h].view(b, h, -1), vectors[b * h:].view(b, c, -1), aux


@contextmanager
def without_dedup(model: Model) -> Iterator[None]:
    model._gather_news = types.MethodType(gather_every_reference, model)
    try:
        yield
    finally:
        del model._gather_news  # back to the class's method


def unique_stats(data: TrainDataset, sampler: GlobalBatchSampler, batches: int) -> dict[str, float]:
    """Per batch: unique news / news references (B*H + B*C, the padding news 0 included), over `batches` batches."""
    ratios, uniques, totals = [], [], []
    for idx in islice(sampler, batches):
        batch = data[idx]
        ids = torch.cat([batch.history.reshape(-1), batch.candidates.reshape(-1)])
        u = len(torch.unique(ids))
        ratios.append(u / len(ids))
        uniques.append(u)
        totals.append(len(ids))
    return {"ratio": float(np.mean(ratios)), "unique": float(np.mean(uniques)), "total": float(np.mean(totals)),
            "batches": len(ratios)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="generated corpus size")
    p.add_argument("--data_dir", default=None, help="where the corpus is generated (default data/bench/perf-<preset>)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--news_encoder", default="MHSA")
    p.add_argument("--user_encoder", default="MHSA")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="steps per timed block")
    p.add_argument("--dedup_steps", type=int, default=3, help="steps per timed block without dedup (slow)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    p.add_argument("--workers", default="0,1", help="comma-separated DataLoader num_workers values to time end-to-end")
    p.add_argument("--compile", default="True", type=lambda v: [x for x in v.split(",") if x],
                   help="torch.compile(model, dynamic=...) variants to time against eager: comma-separated from True "
                        "(what Trainer does with --compile) and None (torch's default); '' for none. Both in one run "
                        "share dynamo's per-function cache, so the second one's compilation times are not its own")
    p.add_argument("--compile_warmup", type=int, default=6,
                   help="compiled steps run (and timed apart) before the rounds")
    p.add_argument("--stat_batches", type=int, default=200, help="batches for the unique/total news statistics")
    p.add_argument("--extra", default="", help="more main.py flags, e.g. '--head_num=16'")
    args = p.parse_args(argv)
    if set(args.compile) - {"True", "None"}:
        p.error(f"--compile: {args.compile} has values other than True and None (e.g. --compile=True,None, or '')")
    set_threads(args.threads)
    data_dir = args.data_dir or f"data/bench/perf-{args.preset}"

    cfg = bench_config(data_dir, args.preset, args.device, f"--news_encoder={args.news_encoder}",
                       f"--user_encoder={args.user_encoder}", f"--batch_size={args.batch_size}", *args.extra.split())
    rt = setup_runtime(cfg)
    corpus = load_corpus(cfg)
    torch.manual_seed(0)
    model = Model(cfg, corpus.meta, corpus.news).to(rt.device)
    model.prepare()
    model.train()
    sync = synchronizer(rt.device)
    stepper = Stepper(model, cfg, rt)
    train = corpus.behaviors("train")
    data = TrainDataset(train, cfg.negative_sample_num, seed=cfg.seed)
    sampler = GlobalBatchSampler(len(data), cfg.batch_size, cfg.seed)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    print(f"device: {machine(rt.device)}; model {cfg.model_name}; corpus {args.preset} ({data_dir}): "
          f"{model.news_num} news, {len(data)} train samples; "
          f"batch {cfg.batch_size}; {args.rounds} rounds x {args.steps} steps per measure")

    def epoch_batches(r: int) -> list[Batch]:
        """The first `steps` batches of epoch r (the end-to-end loader yields the same ones), on the device."""
        data.set_epoch(r + 1)
        sampler.set_epoch(r + 1)
        return [data[idx].to(rt.device) for idx in islice(sampler, args.steps)]

    cached: dict[int, list[Batch]] = {}

    def batches_of(r: int) -> list[Batch]:
        if r not in cached:
            cached.clear()
            cached[r] = epoch_batches(r)
        return cached[r]

    def timed_steps(module: nn.Module, batches: list[Batch]) -> float:
        """Seconds per optimizer step over batches already on the device."""
        sync()
        t0 = time.perf_counter()
        for batch in batches:
            stepper.step(module, batch)
        sync()
        return (time.perf_counter() - t0) / len(batches)

    def model_only(module: nn.Module, r: int) -> float:
        return timed_steps(module, batches_of(r))

    startup: dict[int, list[float]] = {w: [] for w in workers}

    def end_to_end(num_workers: int, r: int) -> float:
        """Seconds per step after the first batch arrived; the loader's start-up (workers forked, first batch
        built) is kept apart in `startup`: it is paid once per epoch, not per step."""
        batches_of(r)  # sets the epoch of data and sampler (untimed), as the trainer does before its loader
        sync()
        t0 = time.perf_counter()
        loader = torch.utils.data.DataLoader(data, sampler=sampler, batch_size=None, num_workers=num_workers,
                                             pin_memory=rt.device.type == "cuda")
        it = iter(loader)
        first = next(it)
        t1 = time.perf_counter()
        stepper.step(model, first.to(rt.device, non_blocking=True))
        for batch in islice(it, args.steps - 1):
            stepper.step(model, batch.to(rt.device, non_blocking=True))
        sync()
        t2 = time.perf_counter()
        del it, loader  # workers stop here, outside the timed block
        startup[num_workers].append(t1 - t0)
        return (t2 - t1) / args.steps

    def loader_only(r: int) -> float:
        """Building a batch in the main process (what num_workers=0 adds to each step), no model."""
        data.set_epoch(r + 1)
        sampler.set_epoch(r + 1)
        t0 = time.perf_counter()
        n = 0
        for idx in islice(sampler, args.steps):
            data[idx].to(rt.device)
            n += 1
        sync()
        return (time.perf_counter() - t0) / n

    def no_dedup(r: int) -> float:
        """Fewer steps (`--dedup_steps`): this path is ~4x slower and its per-step time is what matters."""
        with without_dedup(model):
            return timed_steps(model, batches_of(r)[: args.dedup_steps])

    measures: dict[str, Callable[[int], float]] = {"model-only": lambda r: model_only(model, r)}
    for w in workers:
        measures[f"end-to-end, {w} workers"] = lambda r, w=w: end_to_end(w, r)
    measures["model-only, no dedup"] = no_dedup
    measures["loader only"] = loader_only

    compile_rows = []
    # dynamic=True is what Trainer does with --compile; None is torch's default (static shapes, then dynamic after
    # a recompilation).
    dynamics = {"True": True, "None": None}
    for flag in args.compile:
        compiled = torch.compile(model, dynamic=dynamics[flag])
        data.set_epoch(0)
        sampler.set_epoch(0)
        warm = [data[idx].to(rt.device) for idx in islice(sampler, args.compile_warmup)]
        times = []
        for batch in warm:
            sync()
            t0 = time.perf_counter()
            stepper.step(compiled, batch)
            sync()
            times.append(time.perf_counter() - t0)
        compile_rows.append([f"torch.compile(model, dynamic={flag}): compilation, first {len(times)} steps (new "
                             f"shapes each)", ", ".join(f"{t:.1f} s" for t in times)])
        measures[f"compiled, dynamic={flag}"] = lambda r, compiled=compiled: model_only(compiled, r)

    # Warm-up, untimed: one step of each path, so allocator and thread pools are in their steady state.
    stepper.step(model, batches_of(0)[0])
    print("interleaved rounds (seconds per step):")
    res = interleaved(measures, args.rounds)
    med = {k: median(v) for k, v in res.items()}
    base = med["model-only"]

    print(f"\n### Training step, {cfg.model_name}, batch {cfg.batch_size} ({machine(rt.device)})\n")
    rows = [["model-only (batches already on the device)", f"{base * 1e3:,.0f} ms", "1.00", "—"]]
    steps_per_epoch = len(sampler)
    for w in workers:
        key = f"end-to-end, {w} workers"
        up, q = median(startup[w]), ratio(res, key, "model-only")
        rows.append([f"end-to-end, DataLoader num_workers={w}", f"{med[key] * 1e3:,.0f} ms", f"{q:.3f}",
                     "target <= 1.10: " + ("met" if q <= 1.10 else f"MISSED by {(q - 1.10) * 100:.0f} points")
                     + f"; loader start-up + first batch {up * 1e3:,.0f} ms once per epoch "
                       f"(= {up / (steps_per_epoch * med[key]) * 100:.2f}% of a {steps_per_epoch}-step epoch)"])
    rows.append(["building one batch in the main process (no model)", f"{med['loader only'] * 1e3:,.1f} ms",
                 f"{med['loader only'] / base:.4f}", "what num_workers=0 adds to each step"])
    q = ratio(res, "model-only, no dedup", "model-only")
    rows.append(["model-only without news dedup (every reference encoded)",
                 f"{med['model-only, no dedup'] * 1e3:,.0f} ms", f"{q:.2f}", f"dedup speed-up x{q:.2f}"])
    for flag in args.compile:
        key = f"compiled, dynamic={flag}"
        q = ratio(res, key, "model-only")
        rows.append([f"model-only, torch.compile(model, dynamic={flag})" + (" (Trainer's --compile)" if flag == "True"
                                                                              else ""),
                     f"{med[key] * 1e3:,.0f} ms", f"{q:.2f}", f"compile speed-up x{1 / q:.2f}"])
    print_table(["step", "median time/step", "ratio to model-only (median of per-round ratios)", "note"], rows)
    for row in compile_rows:
        print(f"\n{row[0]}: {row[1]}")

    stats = unique_stats(data, sampler, args.stat_batches)
    print(f"\n### Unique news per batch ({args.preset} corpus, batch {cfg.batch_size}, {stats['batches']} batches)\n")
    print_table(["news references per batch (B*H + B*C)", "unique news per batch", "unique / total"],
                [[f"{stats['total']:,.0f}", f"{stats['unique']:,.0f}", f"{stats['ratio']:.3f}"]])


if __name__ == "__main__":
    main()
