"""Spine throughput: train impressions/s, dev impressions/s, and the cached evaluation's speed-up over
per-candidate re-encoding, measured in the same run on a generated MIND-format corpus.

    python bench/bench_spine.py                       # default demo size
    python bench/bench_spine.py --news 65000 --train_impressions 230000 --dev_impressions 20000   # MIND-small-sized
    python bench/bench_spine.py --device cuda

Prints one line per figure; bench/README.md records the figures measured (with the machine named).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config  # noqa: E402
from dataset import EvalDataset, TrainDataset  # noqa: E402
from MIND_corpus import Corpus  # noqa: E402
from model import Model  # noqa: E402
from prepare_MIND_dataset import ensure_demo  # noqa: E402
from trainer import batch_ranks, build_optimizer, evaluate, setup_runtime  # noqa: E402
from userEncoders import UserInputs  # noqa: E402


@torch.no_grad()
def per_candidate_scores(model: Model, batch) -> torch.Tensor:
    """The naive evaluation several reference implementations use: for every candidate, encode the history
    news and the candidate again and run the user encoder again. Same scores, far more work."""
    b, c = batch.candidates.shape
    h = batch.history.shape[1]
    logits = torch.full((b, c), float("-inf"), device=batch.candidates.device)
    for j in range(c):
        history = model.encode_news(batch.history.reshape(-1)).view(b, h, -1)
        cand = model.encode_news(batch.candidates[:, j])  # [B, D]
        out = model.user_encoder(UserInputs(history=history, history_mask=batch.history_mask, user_id=batch.user,
                                            candidates=cand[:, None], candidate_mask=batch.candidate_mask[:, j:j + 1]))
        user = out.user if out.user.dim() == 2 else out.user[:, 0]
        logits[:, j] = (user * cand).sum(-1)
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
    args = p.parse_args(argv)

    root = ensure_demo(args.data_dir, num_news=args.news, num_users=args.users,
                       num_train_impressions=args.train_impressions, num_dev_impressions=args.dev_impressions,
                       num_test_impressions=100, seed=0)
    cfg = Config.from_args(["--dataset=demo", f"--data_dir={args.data_dir}", f"--device={args.device}",
                            f"--news_encoder={args.news_encoder}", f"--user_encoder={args.user_encoder}",
                            f"--batch_size={args.batch_size}", "--no-progress", "--word_embedding_dim=50"])
    rt = setup_runtime(cfg)
    corpus = Corpus(cfg, root=root)
    torch.manual_seed(0)
    model = Model(cfg, corpus.meta, corpus.news).to(rt.device)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    print(f"device: {rt.device} ({torch.cuda.get_device_name(rt.device) if rt.device.type == 'cuda' else 'CPU, '
          f'{torch.get_num_threads()} threads'}); model {cfg.model_name}; torch {torch.__version__}")

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
    naive_ranks = np.zeros_like(cached.ranks)
    for i in range(len(eval_data)):
        batch = eval_data[i].to(rt.device)
        logits = per_candidate_scores(model, batch)
        r = batch_ranks(logits, batch.candidate_mask).cpu().numpy()
        for row, imp in enumerate(batch.impression_index.tolist()):
            k = int(batch.candidate_mask[row].sum())
            naive_ranks[offsets[imp]:offsets[imp] + k] = r[row, :k]
    sync()
    t_naive = time.perf_counter() - t0
    print(f"eval on {n} dev impressions: cached {n / t_cached:,.0f} impressions/s, per-candidate re-encoding "
          f"{n / t_naive:,.0f} impressions/s -> speed-up x{t_naive / t_cached:.1f} "
          f"(same ranks from both paths: {bool((naive_ranks == cached.ranks).all())})")


if __name__ == "__main__":
    main()
