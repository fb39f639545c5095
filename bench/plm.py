"""PLM training speed: the frozen-layer cache and dynamic padding, each on vs off, measured in the same run.

    python bench/plm.py     # PLMNRMS-MHSA and PLMMiner-MINER, offline MiniLM, 4 of 6 frozen (6 min, 2 busy CPU cores)

    python bench/plm.py --models PLMMiner-MINER --rounds 5
    python bench/plm.py --device cuda --threads 0 --batch_size 64 --steps 10

For each model, four copies with the same initial weights train on the same batches (the trainer's step: forward,
backward, clipping, Adam, schedule), interleaved round by round (A, B, C, D, A, B, ...), medians reported:
- cache off, padding off: the PLM runs its 6 layers on every batch, titles padded to --plm_max_length (32);
- cache on, padding off:  the frozen bottom (embeddings + 4 layers) runs once per corpus, the top 2 on its cached
                          fp16 hidden states, still padded to 32;
- cache off, padding on:  the framework's dynamic padding: the batch's unique news encoded in
                          `length_buckets` (4) chunks of similar title length, each cut to its own longest title
                          (`Model._gather_news`, `Model.news_features`);
- cache on, padding on:   the framework's default. Target (issue 6): >= 3x the first, on CPU;
- with --one_cut (default): cache on, the batch's news in one chunk cut to the batch's longest title (what the
  framework did before length buckets), to show what the buckets add.
"Padding off" is a bench-only `Model` subclass that pads the PLM columns back to --plm_max_length (model.py has
no switch: dynamic padding is always on). The cache build (once per corpus) is timed apart, with its share of an
epoch. Before timing, with dropout off (model dropout 0, PLM in eval mode), the first `--loss_steps` optimizer
steps of "cache on, padding on" and "cache off, padding off" must give the same losses within `--rtol` (the
cache is fp16). A breakdown says where the uncached step's time goes (the frozen bottom's forward, which the
cache removes) and how many PLM tokens each padding mode computes, which bound the two speed-ups.
Prints markdown tables; bench/README.md records the figures with the machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import (  # noqa: E402
    THREADS_HELP,
    Stepper,
    bench_config,
    interleaved,
    machine,
    median,
    print_table,
    ratio,
    set_threads,
    synchronizer,
)

from dataset import Batch, TrainDataset  # noqa: E402
from devices import setup_runtime  # noqa: E402
from main import load_corpus  # noqa: E402
from model import Model  # noqa: E402
from trainer import GlobalBatchSampler  # noqa: E402

MODELS = {"PLMNRMS-MHSA": ("PLMNRMS", "MHSA", []), "PLMMiner-MINER": ("PLMMiner", "MINER", ["--use_category_glove"])}
VARIANTS = [("cache off, padding off", False, False), ("cache on, padding off", True, False),
            ("cache off, padding on", False, True), ("cache on, padding on", True, True)]
PROTOTYPE = ("cache on, one batch-wide cut (no length buckets)", True, "one cut")


def pad_columns(t: torch.Tensor, length: int) -> torch.Tensor:
    """[N, l] or [N, l, Hp] -> the same with zero columns up to `length` (PLM pad id, mask 0, cached zeros)."""
    if t.shape[1] >= length:
        return t
    return F.pad(t, (0, length - t.shape[1]) if t.dim() == 2 else (0, 0, 0, length - t.shape[1]))


class FullPaddingModel(Model):
    """Bench-only: dynamic padding off. Every PLM column is padded back to --plm_max_length after the trim, so the
    PLM computes exactly what it would without trimming (the trimmed columns are padding: id 0, mask 0)."""

    def news_features(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().news_features(index)
        length = self.news_plm_ids.shape[1]
        return {k: pad_columns(t, length) if k.startswith("plm") else t for k, t in out.items()}

    def prepare(self, *args, **kwargs) -> None:
        enc = self.news_encoder
        trimmed = enc.frozen_bottom
        length = self.news_plm_ids.shape[1]

        def full_length(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return trimmed(pad_columns(ids, length), pad_columns(mask, length))[:, : ids.shape[1]]

        enc.frozen_bottom = full_length
        try:
            super().prepare(*args, **kwargs)
        finally:
            del enc.frozen_bottom


@contextmanager
def dropout_off(model: Model) -> Iterator[None]:
    """Model dropout p=0 and the PLM in eval mode (its attention/hidden dropout): both paths become deterministic."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    plm = model.news_encoder.plm
    plm.eval()
    try:
        yield
    finally:
        for m, p in saved:
            m.p = p
        plm.train(model.training)


def token_counts(model: Model, batches: list[Batch]) -> dict[str, float]:
    """PLM tokens per batch (unique news x columns): padded to max length, to the batch's longest title, real."""
    full, trimmed, bucketed, real = [], [], [], []
    for b in batches:
        ids = torch.unique(torch.cat([b.history.reshape(-1), b.candidates.reshape(-1)]))
        mask = model.news_plm_mask[ids.to(model.news_plm_mask.device)]
        lengths = mask.ne(0).sum(1)
        full.append(mask.shape[0] * mask.shape[1])
        trimmed.append(mask.shape[0] * int(lengths.max()))
        buckets = lengths.sort().values.tensor_split(model.news_encoder.length_buckets)
        bucketed.append(sum(len(p) * int(p.max()) for p in buckets))
        real.append(int(lengths.sum()))
    return {"full": float(np.mean(full)), "trimmed": float(np.mean(trimmed)), "bucketed": float(np.mean(bucketed)),
            "real": float(np.mean(real))}


def bench_model(name: str, args) -> dict:
    news_encoder, user_encoder, extra = MODELS[name]
    cfg = bench_config(args.data_dir, "demo", args.device, f"--news_encoder={news_encoder}",
                       f"--user_encoder={user_encoder}", f"--batch_size={args.batch_size}",
                       "--plm_model_name=offline-minilm", f"--plm_frozen_layers={args.frozen}", *extra,
                       *args.extra.split())
    rt = setup_runtime(cfg)
    corpus = load_corpus(cfg, log=lambda *a, **k: None)
    sync = synchronizer(rt.device)
    train = corpus.behaviors("train")
    data = TrainDataset(train, cfg.negative_sample_num, seed=cfg.seed)
    clicks_per_impression = len(data) / train["stats"]["impressions"]
    sampler = GlobalBatchSampler(len(data), cfg.batch_size, cfg.seed)

    models: dict[str, Model] = {}
    steppers: dict[str, Stepper] = {}
    cache_seconds: dict[str, float] = {}
    variants = VARIANTS + ([PROTOTYPE] if args.one_cut else [])
    for label, cache, padding in variants:
        cfg.values["plm_cache"] = cache  # read by the news encoder when it is built
        torch.manual_seed(0)
        cls = FullPaddingModel if padding is False else Model
        m = cls(cfg, corpus.meta, corpus.news).to(rt.device)
        if padding is not True:  # no padding work saved: one chunk of every unique news
            m.news_encoder.length_buckets = 1
        sync()
        t0 = time.perf_counter()
        m.prepare(log=lambda *a: None)
        sync()
        if cache:
            assert m.news_encoder.frozen_table is not None, f"{label}: the frozen-layer cache was not built"
            cache_seconds[label] = time.perf_counter() - t0
        m.train()
        models[label], steppers[label] = m, Stepper(m, cfg, rt)
    fast, slow = "cache on, padding on", "cache off, padding off"

    def epoch_batches(epoch: int, n: int) -> list[Batch]:
        data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        return [data[idx].to(rt.device) for idx in islice(sampler, n)]

    # -- loss check, dropout off: the two extremes must take the same first steps ----------------------------
    check = epoch_batches(0, args.loss_steps)
    losses: dict[str, list[float]] = {fast: [], slow: [], **({PROTOTYPE[0]: []} if args.one_cut else {})}
    for label in losses:
        with dropout_off(models[label]):
            for batch in check:
                losses[label].append(steppers[label].step(models[label], batch))
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[fast], losses[slow])]

    # -- timing --------------------------------------------------------------------------------------------
    per_round = {r: epoch_batches(r + 1, args.steps) for r in range(args.rounds)}

    def timed(label: str) -> Callable[[int], float]:
        def run(r: int) -> float:
            sync()
            t0 = time.perf_counter()
            for batch in per_round[r]:
                steppers[label].step(models[label], batch)
            sync()
            return (time.perf_counter() - t0) / len(per_round[r])
        return run

    print(f"{name}: interleaved rounds (seconds per step)", flush=True)
    res = interleaved({label: timed(label) for label, _, _ in variants}, args.rounds)
    med = {k: median(v) for k, v in res.items()}

    # -- where the uncached step's time goes: the PLM forward in training mode (dropout on, autograd on) over the
    # batch's unique news padded to max length, all layers (uncached) vs the top layers on the cache -------------
    plm_forward: dict[str, list[float]] = {slow: [], "cache on, padding off": []}
    for batch in [b for r in range(min(2, args.rounds)) for b in per_round[r]]:
        ids = torch.unique(torch.cat([batch.history.reshape(-1), batch.candidates.reshape(-1)]))
        for label in plm_forward:
            m = models[label]
            feats = m.news_features(ids)
            sync()
            t0 = time.perf_counter()
            m.news_encoder.hidden_states(feats)
            sync()
            plm_forward[label].append(time.perf_counter() - t0)
    tokens = token_counts(models[fast], [b for r in per_round for b in per_round[r]])
    return {"name": name, "cfg": cfg, "rt": rt, "med": med, "res": res, "cache_seconds": cache_seconds,
            "losses": losses, "rel": rel, "clicks": clicks_per_impression, "steps_per_epoch": len(sampler),
            "plm_forward": {k: median(v) for k, v in plm_forward.items()}, "tokens": tokens,
            "news": models[fast].news_num, "buckets": models[fast].news_encoder.length_buckets}


def report(r: dict, args) -> bool:
    cfg, med = r["cfg"], r["med"]
    slow, fast = "cache off, padding off", "cache on, padding on"
    base = med[slow]
    print(f"\n### {r['name']}: offline MiniLM, {args.frozen} of 6 layers frozen, batch {cfg.batch_size} "
          f"({machine(r['rt'].device)})\n")
    rows = []
    for label, cache, padding in VARIANTS + ([PROTOTYPE] if PROTOTYPE[0] in med else []):
        t = med[label]
        imp_s = cfg.batch_size / t / r["clicks"]
        rows.append([label, f"{t:.2f} s", f"{imp_s:.2f}", f"x{ratio(r['res'], slow, label):.2f}"])
    print_table(["variant", "median step", "train impressions/s",
                 "speed-up vs cache off, padding off (median of per-round ratios)"], rows)
    both = ratio(r["res"], slow, fast)
    print(f"\ncache + padding together: x{both:.2f} (target >= 3x: "
          + ("met" if both >= 3 else f"MISSED by {(3 - both) / 3 * 100:.0f}%: x{both:.2f} of x3") + ")")
    epoch_s = r["steps_per_epoch"] * med[fast]
    for label, s in r["cache_seconds"].items():
        print(f"frozen-layer cache build ({label}, {r['news']} news, once per corpus): {s:.1f} s "
              f"= {s / epoch_s * 100:.1f}% of one epoch ({r['steps_per_epoch']} steps) of '{fast}'")
    if PROTOTYPE[0] in r["losses"]:
        proto = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"][PROTOTYPE[0]], r["losses"][fast]))
        print(f"one batch-wide cut, dropout off: first {len(r['rel'])} losses within {proto:.1e} (relative) of '{fast}'")
    ok = max(r["rel"]) <= args.rtol
    print(f"first {len(r['rel'])} losses, dropout off: {fast} "
          + ", ".join(f"{x:.5f}" for x in r["losses"][fast]) + f" vs {slow} "
          + ", ".join(f"{x:.5f}" for x in r["losses"][slow])
          + f"; max relative difference {max(r['rel']):.1e} "
          + f"(tolerance {args.rtol:g}: {'equal' if ok else 'DIFFERENT'})")
    tok = r["tokens"]
    full, top = r["plm_forward"]["cache off, padding off"], r["plm_forward"]["cache on, padding off"]
    share = (full - top) / base
    print(f"where the time goes: the PLM forward in training mode over a batch's unique news (padded to "
          f"{cfg.plm_max_length}) takes {full:.2f} s with all layers and {top:.2f} s with the top layers on the cache: "
          f"the cache removes {full - top:.2f} s of the {base:.2f} s uncached, fully padded step ({share * 100:.0f}%; "
          f"the frozen layers' backward is skipped either way), so the cache alone can give about "
          f"x{1 / max(1 - share, 1e-9):.2f}. PLM tokens per batch: {tok['full']:,.0f} padded to {cfg.plm_max_length}, "
          f"{tok['trimmed']:,.0f} trimmed to the batch's longest title (x{tok['full'] / tok['trimmed']:.2f} fewer), "
          f"{tok['bucketed']:,.0f} in {r['buckets']} length buckets "
          f"(x{tok['full'] / tok['bucketed']:.2f} "
          f"fewer), {tok['real']:,.0f} real (x{tok['full'] / tok['real']:.2f} fewer: the bound if each title were "
          f"padded only to its own length)")
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--data_dir", default="data/bench/perf-demo", help="where the default demo corpus is generated")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--frozen", type=int, default=4, help="--plm_frozen_layers (MiniLM has 6)")
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    p.add_argument("--loss_steps", type=int, default=2, help="optimizer steps compared with dropout off")
    p.add_argument("--rtol", type=float, default=1e-2, help="relative tolerance of the loss comparison")
    p.add_argument("--one_cut", action=argparse.BooleanOptionalAction, default=True,
                   help="also time cache on with one batch-wide cut instead of length buckets (what the buckets add)")
    p.add_argument("--extra", default="", help="more main.py flags")
    args = p.parse_args(argv)
    set_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    print(f"{args.rounds} rounds x {args.steps} steps per variant, batch {args.batch_size}; same batches and initial "
          f"weights for every variant", flush=True)
    results = [bench_model(name, args) for name in names]
    ok = all([report(r, args) for r in results])
    if not ok:
        sys.exit("the cached and uncached losses differ beyond the tolerance")


if __name__ == "__main__":
    main()
