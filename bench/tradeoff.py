"""The accuracy-diversity trade-off of one checkpoint: score the split once, then re-rank it (reranking.py) for each
lambda of each method and measure AUC / MRR / nDCG and ILD / calibration of the re-ranked lists; the points as a TSV
and the curves as a PNG (reranking.plot_tradeoff).

    python bench/tradeoff.py --checkpoint 'best_model/demo/MHSA-MHSA/#1'
    python bench/tradeoff.py --checkpoint 'best_model/demo/MHSA-MHSA/#1' --lambdas 0,0.5,1 --methods mmr
    python bench/tradeoff.py --checkpoint ... --extra=--beyond_embedding=model      # MMR on the model's own vectors

Writes <run>/tradeoff-<split>/tradeoff.tsv and tradeoff.png (or --output), refusing a folder that holds them.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import beyond_accuracy as ba  # noqa: E402
import reranking  # noqa: E402
import util  # noqa: E402
from checkpoints import load_checkpoint, load_state, resolve_checkpoint_path  # noqa: E402
from config import Config  # noqa: E402
from devices import setup_runtime  # noqa: E402
from evaluation import evaluate, tie_rank_for, train_popularity  # noqa: E402
from main import check_corpus, config_for_checkpoint, load_corpus  # noqa: E402
from model import Model  # noqa: E402


def scored(checkpoint: str, split: str, extra: list[str]):
    """(config, corpus, behaviors, EvalResult with scores, checkpoint path) of `checkpoint` on `split`."""
    flag = f"--{split}_model_path"
    config = Config.from_args([f"--mode={split}", f"{flag}={checkpoint}", "--no-progress", *extra])
    path = resolve_checkpoint_path(checkpoint, flag)
    ckpt = load_checkpoint(path)
    cfg = config_for_checkpoint(config, ckpt, path)
    rt = setup_runtime(cfg)
    corpus = load_corpus(cfg)
    check_corpus(ckpt, corpus, path)
    model = Model(cfg, corpus.meta, corpus.news)
    load_state(model, ckpt, path)
    model.to(rt.device)
    beh = corpus.behaviors(split)
    result = evaluate(model, beh, cfg, rt, desc=split, keep_scores=True,
                      tie_rank=tie_rank_for(cfg, corpus.behaviors("train"), model.news_num))
    return cfg, corpus, beh, result, path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run folder or checkpoint (as --dev_model_path takes)")
    p.add_argument("--split", default="dev", choices=("dev", "test"), help="a labelled split")
    p.add_argument("--methods", default="mmr,calibrated", help="comma-separated --rerank methods")
    p.add_argument("--lambdas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="comma-separated, in [0, 1]")
    p.add_argument("--k", type=int, default=10, help="top-k of the diversity and calibration metrics")
    p.add_argument("--output", default=None, help="folder (default <run>/tradeoff-<split>/)")
    p.add_argument("--extra", default="", help="more main.py flags, e.g. --extra=--beyond_embedding=model")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in reranking.METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad[0]!r}; choose from {', '.join(reranking.METHODS)}")
    lambdas = [float(v) for v in args.lambdas.split(",") if v]
    t0 = time.time()
    cfg, corpus, beh, result, path = scored(args.checkpoint, args.split, shlex.split(args.extra))
    if not result.metrics.get("labelled"):
        raise SystemExit(f"the {args.split} split has no labels: the trade-off needs accuracy metrics")
    out = Path(args.output) if args.output else path.parent / f"tradeoff-{args.split}"
    if (out / "tradeoff.tsv").exists() or (out / "tradeoff.png").exists():
        raise SystemExit(f"{out} already holds a trade-off; choose another --output (files are never replaced)")
    ba.check_k([args.k], result.offsets)
    clicks, _ = train_popularity(corpus.behaviors("train"), len(corpus.news["category"]))
    features = ba.news_features(corpus, clicks, ["ild_embedding"], cfg.beyond_embedding, result.news_vectors)
    rows = reranking.sweep(methods, lambdas, result.scores, result.ranks, beh, features, args.k)
    util.write_lines_atomic(out / "tradeoff.tsv", reranking.tradeoff_tsv(rows))
    reranking.plot_tradeoff(rows, out / "tradeoff.png", args.k,
                            f"{cfg.model_name} ({path.parent.name}), {args.split}: re-ranked, "
                            f"{features.embedding_source}")
    print("| method | lambda | AUC | nDCG@10 | " + " | ".join(f"{m}@{args.k}" for m in reranking.TRADEOFF_DIVERSITY)
          + " |")
    print("|---" * (4 + len(reranking.TRADEOFF_DIVERSITY)) + "|")
    for r in rows:
        print(f"| {r['method']} | {r['lambda']:g} | {r['auc']:.4f} | {r['ndcg10']:.4f} | "
              + " | ".join(f"{r[f'{m}@{args.k}']:.4f}" for m in reranking.TRADEOFF_DIVERSITY) + " |")
    print(f"\nwrote {out / 'tradeoff.tsv'} and {out / 'tradeoff.png'} ({time.time() - t0:.0f} s)")
    return {"rows": rows, "folder": str(out)}


if __name__ == "__main__":
    main()
