"""How different are a trained MINER's K interest vectors? (the README's MINER notes quote this script)

    python bench/miner_interests.py best_model/demo/MHSA-MINER/#1/MHSA-MINER
    python bench/miner_interests.py <checkpoint> --users 500 --data_dir data

For `--users` random dev users with at least 3 history news it prints, without the category bias (which is the
same for every code, so it cannot make the interests differ):
- the mean K x K cosine of the interest vectors (the disagreement regulariser's quantity: 1/K for orthogonal
  interests, 1 for identical ones), and the same for K history news picked at random (what peaked attention
  on single items would give);
- the poly attention's entropy over the history / log H (1 = uniform attention);
- the standard deviation of the logits across a user's history (averaged over codes), as the model uses them.
Legend: H history length, K interests, D news vector size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints import load_checkpoint, load_state  # noqa: E402
from config import Config  # noqa: E402
from main import config_for_checkpoint, load_corpus  # noqa: E402
from model import Model  # noqa: E402
from userEncoders import MINERUserEncoder  # noqa: E402


def mean_cosine(v: torch.Tensor) -> float:
    """v [K, D] -> mean of the K x K cosine matrix (diagonal included), as MINERUserEncoder.disagreement."""
    return MINERUserEncoder.disagreement(v[None, None])[0, 0].item()


@torch.no_grad()
def measure(path: str, users: int, seed: int, extra: list[str]) -> dict[str, float]:
    ckpt = load_checkpoint(path)
    cfg = config_for_checkpoint(Config.from_args(["--mode=dev", f"--dev_model_path={path}", *extra]), ckpt, path)
    if cfg.user_encoder != "MINER":
        raise ValueError(f"{path}: a {cfg.user_encoder} user encoder, not MINER")
    corpus = load_corpus(cfg, log=lambda *a, **k: None)
    model = Model(cfg, corpus.meta, corpus.news)
    load_state(model, ckpt, path)
    model.eval()
    miner = model.user_encoder
    hist = np.asarray(corpus.behaviors("dev")["histories"])  # [impressions, H], 0 = padding
    rng = np.random.default_rng(seed)
    rows = [i for i in rng.permutation(len(hist)) if (hist[i] > 0).sum() >= 3][:users]
    needed = np.union1d(hist[rows].ravel(), [0])
    table = model.encode_all_news(torch.from_numpy(needed.astype(np.int64)))  # [N, D]
    interest, single, entropy, spread = [], [], [], []
    for i in rows:
        h = table[torch.from_numpy(hist[i][hist[i] > 0].astype(np.int64))]  # [H, D]
        logits = torch.tanh(miner.project(h)) @ miner.codes.t() * miner.logit_scale  # [H, K]
        alpha = torch.softmax(logits, dim=0)  # over the history
        interest.append(mean_cosine(alpha.t() @ h))  # interests [K, D]
        single.append(mean_cosine(h[torch.from_numpy(rng.integers(0, len(h), miner.k))]))
        entropy.append((-(alpha * alpha.clamp_min(1e-12).log()).sum(0).mean() / np.log(len(h))).item())
        spread.append(logits.std(0).mean().item())
    return {"users": len(rows), "K": miner.k, "scale": cfg.poly_attention_scale,
            "interests_mean_cosine": float(np.mean(interest)), "random_items_mean_cosine": float(np.mean(single)),
            "attention_entropy_over_log_H": float(np.mean(entropy)), "logit_std_over_history": float(np.mean(spread))}


def main_cli(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a MINER run's best-model file (as for --dev_model_path)")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=None, help="where the run's corpus is, when not where it was trained")
    args = p.parse_args(argv)
    extra = [f"--data_dir={args.data_dir}"] if args.data_dir else []
    r = measure(args.checkpoint, args.users, args.seed, extra)
    print(f"{args.checkpoint} (--poly_attention_scale={r['scale']}, K={r['K']}, {r['users']} dev users):\n"
          f"  interests: mean K x K cosine {r['interests_mean_cosine']:.3f} "
          f"(K random history news: {r['random_items_mean_cosine']:.3f})\n"
          f"  poly attention entropy / log H {r['attention_entropy_over_log_H']:.3f} (1 = uniform); "
          f"logit std across the history {r['logit_std_over_history']:.3f}")
    return r


if __name__ == "__main__":
    main_cli()
