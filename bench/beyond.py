"""What the beyond-accuracy metrics add to a dev evaluation, measured in the same run: a MIND-small-sized
generated dev split (73,152 impressions), NRMS with random initial weights (speed does not depend on training),
`evaluation.evaluate` (the plain evaluation --mode=dev runs) vs `evaluation.rerank_and_measure` with every metric at
k = 5 and 10 (what --mode=dev adds by default), and its parts: the news features (GloVe title vectors; VADER on the
titles of the news some top-k list holds) and the metrics themselves.

    python bench/beyond.py                      # small preset: ~ 3 min on 2 busy CPU cores (corpus built once)
    python bench/beyond.py --preset demo        # a quick check
    python bench/beyond.py --rounds 3

Rounds alternate plain evaluation and the metrics (A, B, A, B, ...), so load from other jobs hits both alike;
medians are reported. Target: the metrics add at most 10% to the evaluation. Prints a markdown table;
bench/README.md records the figures with the machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import PRESETS, THREADS_HELP, bench_config, machine, set_threads  # noqa: E402

import beyond_accuracy as ba  # noqa: E402
from devices import setup_runtime  # noqa: E402
from evaluation import evaluate, rerank_and_measure, tie_rank_for, train_popularity  # noqa: E402
from main import load_corpus  # noqa: E402
from model import Model  # noqa: E402


def parts(corpus, beh, train, ranks, ks) -> dict[str, float]:
    """Seconds of each part of the metrics: GloVe title vectors, VADER, the metrics."""
    clicks, _ = train_popularity(train, len(corpus.news["category"]))
    names = list(ba.METRICS)
    t0 = time.perf_counter()
    f = ba.news_features(corpus, clicks, [m for m in names if "sentiment" not in ba.METRICS[m].reads])
    t1 = time.perf_counter()
    needed = ba.needed_news(ranks, beh, ks)
    s = ba.news_features(corpus, clicks, ["sentiment"], sentiment_news=needed)
    f.sentiment = s.sentiment
    t2 = time.perf_counter()
    ba.compute(ranks, beh, f, ks, names)
    t3 = time.perf_counter()
    return {"glove": t1 - t0, "vader": t2 - t1, "vader_news": len(needed), "metrics": t3 - t2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="generated corpus size")
    p.add_argument("--data_dir", default=None, help="where the corpus is generated (default data/bench/perf-<preset>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
    args = p.parse_args()
    set_threads(args.threads)
    data_dir = args.data_dir or f"data/bench/perf-{args.preset}"
    config = bench_config(data_dir, args.preset, args.device, "--mode=dev", "--dev_model_path=unused")
    corpus = load_corpus(config)
    rt = setup_runtime(config)
    torch.manual_seed(0)
    model = Model(config, corpus.meta, corpus.news).to(rt.device)
    beh, train = corpus.behaviors("dev"), corpus.behaviors("train")
    tie = tie_rank_for(config, train, model.news_num)
    plain, extra, result = [], [], None
    for r in range(args.rounds):
        t0 = time.perf_counter()
        result = evaluate(model, beh, config, rt, desc="dev", tie_rank=tie)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rerank_and_measure(config, corpus, beh, result, train)
        extra.append(time.perf_counter() - t0)
        print(f"round {r + 1}: evaluation {plain[-1]:.1f} s, beyond-accuracy metrics {extra[-1]:.2f} s", flush=True)
    split = parts(corpus, beh, train, result.ranks, config.beyond_k)
    e, b = float(np.median(plain)), float(np.median(extra))
    print(f"\n{machine(rt.device)}; {len(beh['offsets']) - 1:,} dev impressions, {len(beh['candidates']):,} "
          f"candidates; k = {config.beyond_k}; every metric ({len(ba.METRICS)})\n")
    print("| plain evaluation | + beyond-accuracy metrics | share | GloVe title vectors | VADER (news) | metrics |")
    print("|---|---|---|---|---|---|")
    print(f"| {e:.1f} s | {b:.2f} s | **{100 * b / e:.1f}%** | {split['glove']:.2f} s | {split['vader']:.2f} s "
          f"({split['vader_news']:,}) | {split['metrics']:.2f} s |")


if __name__ == "__main__":
    main()
