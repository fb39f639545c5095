"""Spine throughput: train impressions/s, dev impressions/s, and the cached evaluation's speed-up over
per-candidate re-encoding, measured in the same run on a generated MIND-format corpus.

    python bench/bench_spine.py                       # default demo size
    python bench/bench_spine.py --news 65000 --train_impressions 230000 --dev_impressions 20000   # MIND-small-sized
    python bench/bench_spine.py --device cuda
    python bench/bench_spine.py --news_encoder=PLMMiner --user_encoder=MINER --train_steps=5 --naive_impressions=20

Prints one line per figure; bench/README.md records the figures measured (with the machine named).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config  # noqa: E402
from dataset import EvalDataset, TrainDataset  # noqa: E402
from devices import setup_runtime  # noqa: E402
from evaluation import evaluate  # noqa: E402
from main import load_corpus  # noqa: E402
from model import Model  # noqa: E402
from trainer import build_optimizer  # noqa: E402


@torch.no_grad()
def per_candidate_scores(model: Model, batch) -> torch.Tensor:
    """The naive evaluation several reference implementations use: for every candidate, encode the history
    news and the candidate again and run the user encoder again. Same scores, far more work."""
    b, c = batch.candidates.shape
    h = batch.history.shape[1]
    logits = torch.full((b, c), float("-inf"), device=batch.candidates.device)
    for j in range(c):
        one = replace(batch, candidates=batch.candidates[:, j:j + 1], candidate_mask=batch.candidate_mask[:, j:j + 1])
        history = model.encode_news(batch.history.reshape(-1)).view(b, h, -1)  # [B, H, D]
        cand = model.encode_news(batch.candidates[:, j])[:, None]  # [B, 1, D]
        logits[:, j] = model.score(one, history, cand)[0][:, 0]
    return logits.masked_fill(~batch.candidate_mask, float("-inf"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--news", type=int, default=3000)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--train_impressions", type=int, default=6000)
    p.add_argument("--dev_impressions", type=int, default=1500)
    p.add_argument("--data_dir", default="data/bench")
    p.add_argument("--device", default="auto")
    p.add_argument("--news_encoder", default="MHSA")
    p.add_argument("--user_encoder", default="MHSA")
    p.add_argument("--train_steps", type=int, default=30, help="optimizer steps timed (after 3 warm-up steps)")
    p.add_argument("--naive_impressions", type=int, default=200, help="dev impressions scored by both paths")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--extra", default="", help="more main.py flags, e.g. '--use_category_glove --plm_pooling=cls'")
    args = p.parse_args(argv)

    cfg = Config.from_args(["--dataset=demo", f"--data_dir={args.data_dir}", f"--device={args.device}",
                            f"--news_encoder={args.news_encoder}", f"--user_encoder={args.user_encoder}",
                            f"--batch_size={args.batch_size}", "--no-progress", "--word_embedding_dim=50",
                            f"--demo_news={args.news}", f"--demo_users={args.users}",
                            f"--demo_train_impressions={args.train_impressions}",
                            f"--demo_dev_impressions={args.dev_impressions}", "--demo_test_impressions=100",
                            *args.extra.split()])
    rt = setup_runtime(cfg)
    corpus = load_corpus(cfg)
    torch.manual_seed(0)
    model = Model(cfg, corpus.meta, corpus.news).to(rt.device)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    where = (torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"device: {rt.device} ({where}); model {cfg.model_name}; torch {torch.__version__}")

    # -- training throughput -----------------------------------------------------------------------------
    train = corpus.behaviors("train")
    data = TrainDataset(train, cfg.negative_sample_num, seed=0)
    clicks_per_impression = len(data) / train["stats"]["impressions"]
    opt = build_optimizer(model, cfg)
    model.train()
    rng = np.random.default_rng(0)
    steps = [rng.choice(len(data), cfg.batch_size, replace=False) for _ in range(args.train_steps + 3)]
    for i, idx in enumerate(steps):
        if i == 3:
            sync()
            t0 = time.perf_counter()
        batch = data[idx].to(rt.device)
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync()
    dt = time.perf_counter() - t0
    samples_s = args.train_steps * cfg.batch_size / dt
    print(f"train: {samples_s:,.0f} samples/s (clicked items with {cfg.negative_sample_num} negatives) = "
          f"{samples_s / clicks_per_impression:,.0f} train impressions/s "
          f"({clicks_per_impression:.2f} clicks per impression), batch {cfg.batch_size}")

    # -- dev throughput (the cached path: every news encoded once) -----------------------------------------
    dev = corpus.behaviors("dev")
    evaluate(model, dev, cfg, rt)  # warm-up
    result = evaluate(model, dev, cfg, rt)
    print(f"dev: {dev['stats']['impressions'] / result.seconds:,.0f} impressions/s "
          f"({dev['stats']['impressions']} impressions, {result.seconds:.2f}s incl. encoding all news once)")

    # -- cached vs per-candidate re-encoding on the same impressions ------------------------------------------
    model.eval()
    n = min(args.naive_impressions, dev["stats"]["impressions"])
    sub = {**dev}
    offsets = np.asarray(dev["offsets"])
    sub["offsets"] = offsets[: n + 1]
    sub["impression_ids"] = np.asarray(dev["impression_ids"])[:n]
    sub["candidates"] = np.asarray(dev["candidates"])[: offsets[n]]
    sub["labels"] = np.asarray(dev["labels"])[: offsets[n]]
    sync()
    t0 = time.perf_counter()
    cached = evaluate(model, sub, cfg, rt)
    sync()
    t_cached = time.perf_counter() - t0
    eval_data = EvalDataset(sub, cfg.eval_batch_size)
    sync()
    t0 = time.perf_counter()
    naive_logits = []
    for i in range(len(eval_data)):
        batch = eval_data[i].to(rt.device)
        naive_logits.append(per_candidate_scores(model, batch))
    sync()
    t_naive = time.perf_counter() - t0
    # Both paths must give the same scores (up to float rounding); checked outside the timed loops.
    table = model.encode_all_news(torch.arange(model.news_num, device=rt.device))
    diff = max(float((logits - model.score_cached(eval_data[i].to(rt.device), table)).nan_to_num(0, 0, 0).abs().max())
               for i, logits in enumerate(naive_logits))
    print(f"eval on {n} dev impressions: cached {n / t_cached:,.0f} impressions/s, per-candidate re-encoding "
          f"{n / t_naive:,.0f} impressions/s -> speed-up x{t_naive / t_cached:.1f} "
          f"(max |logit difference| between the paths {diff:.1e})")


if __name__ == "__main__":
    main()
