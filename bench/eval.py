"""Dev evaluation speed on a MIND-small-sized generated dev split (73,152 impressions, ~59k news): the framework's
cached path (every news encoded once, then users, then candidates) vs per-candidate re-encoding (history and
candidate encoded again for every candidate, as several reference implementations do), and the full dev time.

    python bench/eval.py     # NRMS and PLMMiner-MINER (offline MiniLM, 4 of 6 frozen): 6 min on 2 busy CPU cores

    python bench/eval.py --models NRMS --rounds 5
    python bench/eval.py --models PLMMiner-MINER --plm_dev_fraction 1   # its full dev measured (9 min)
    python bench/eval.py --device cuda --threads 0 --plm_dev_fraction 1

Per model (random initial weights: speed does not depend on training):
1. interleaved rounds, each on a new random sample of dev impressions: the cached path (`evaluation.evaluate` on the
   sample: it encodes the news the sample needs once) vs per-candidate re-encoding of the same sample, batched by
   (impression, candidate) pairs with no padded candidates, and the largest logit difference between the two;
2. the cached path on the dev split (all of it, or a random `--*dev_fraction` of its impressions, then the full
   time is extrapolated: news encoding scales with the news the full dev needs, scoring with its candidates);
   PLM models first build the frozen-layer cache for the whole corpus (timed apart: `--mode=dev` pays it,
   training has it already).
Headline: full-dev seconds of per-candidate re-encoding (its measured seconds per candidate x the dev's candidates:
it shares no work between impressions, so this is linear) / full-dev seconds of the cached path (target >= 50x).
Both paths use the frozen-layer cache for PLM models, so the ratio is the gain of encoding each news once alone.
Prints markdown tables; bench/README.md records the figures with the machine.
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

from train import (  # noqa: E402
    PRESETS,
    THREADS_HELP,
    bench_config,
    interleaved,
    machine,
    median,
    print_table,
    ratio,
    set_threads,
    synchronizer,
)

from dataset import Batch, EvalDataset  # noqa: E402
from devices import setup_runtime  # noqa: E402
from evaluation import evaluate  # noqa: E402
from main import load_corpus  # noqa: E402
from model import Model  # noqa: E402

# name -> (news encoder, user encoder, flags, impressions per naive sample)
MODELS = {
    "NRMS": ("MHSA", "MHSA", [], 50),
    "PLMMiner-MINER": ("PLMMiner", "MINER", ["--plm_model_name=offline-minilm", "--plm_frozen_layers=4",
                                             "--use_category_glove"], 5),
}
PER_IMPRESSION = ("user", "impression_ids")  # behaviors arrays with one row per impression
PER_HISTORY = ("histories", "history_length")  # rows of the de-duplicated history table


def subset(beh: dict, rows: np.ndarray) -> dict:
    """The behaviors dict restricted to impression `rows` (sorted): flat candidate arrays and offsets rebuilt, and
    the history table cut to these impressions' rows (`evaluation.evaluate` encodes every news of the table)."""
    offsets = np.asarray(beh["offsets"])
    starts, ends = offsets[rows], offsets[rows + 1]
    flat = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(rows) else np.zeros(0, np.int64)
    sub = {**beh, **{k: np.asarray(beh[k])[rows] for k in PER_IMPRESSION}}
    history_row = np.asarray(beh["history_row"])[rows]
    sub.update({k: np.asarray(beh[k])[history_row] for k in PER_HISTORY if k in beh})
    sub["history_row"] = np.arange(len(rows))
    sub["offsets"] = np.concatenate([[0], np.cumsum(ends - starts)])
    sub["candidates"] = np.asarray(beh["candidates"])[flat]
    sub["labels"] = np.asarray(beh["labels"])[flat]
    sub["stats"] = {**beh["stats"], "impressions": len(rows), "candidates": len(flat)}
    return sub


def needed_news(beh: dict) -> np.ndarray:
    """The news `evaluation.evaluate` encodes for these impressions (histories, candidates, the unknown news 0)."""
    hist = np.asarray(beh["histories"])[np.asarray(beh["history_row"])]
    return np.union1d(np.union1d(hist.ravel(), np.asarray(beh["candidates"])), [0])


def padded_tokens(lengths: np.ndarray, chunk: int) -> int:
    """Token slots computed when `lengths` (in encoding order) are encoded `chunk` at a time, each chunk cut to its
    longest sequence (what `Model.news_features` does)."""
    return int(sum(len(c) * int(c.max(initial=1)) for c in np.array_split(lengths, max(1, -(-len(lengths) // chunk)))))


def padding_report(model: Model, needed: np.ndarray) -> str:
    """Token slots of the dev's news encoding (chunks of `evaluation.encode_needed_news`) and of the frozen-layer cache
    build (chunks of 256 over the corpus), in index order as today vs sorted by length first (a proposal)."""
    if hasattr(model, "news_plm_mask"):
        lengths, what = model.news_plm_mask.ne(0).sum(1).cpu().numpy(), "PLM tokens"
    elif hasattr(model, "news_title"):
        lengths, what = model.news_title.ne(0).sum(1).cpu().numpy(), "title tokens"
    else:
        return ""
    chunk = max(1, min(2048, -(-len(needed) // 16)))  # as evaluation.encode_needed_news
    now, ordered = padded_tokens(lengths[needed], chunk), padded_tokens(np.sort(lengths[needed]), chunk)
    text = (f"{what} computed for the dev's {len(needed):,} news (chunks of {chunk}): {now:,} in index order (today), "
            f"{ordered:,} if sorted by length before chunking (x{now / ordered:.2f} fewer; real tokens "
            f"{int(lengths[needed].sum()):,})")
    if getattr(model.news_encoder, "has_frozen_cache", False):
        build_now, build_sorted = padded_tokens(lengths, 256), padded_tokens(np.sort(lengths), 256)
        text += (f"; frozen-layer cache build over all {len(lengths):,} news (chunks of 256): {build_now:,} vs "
                 f"{build_sorted:,} sorted (x{build_now / build_sorted:.2f} fewer)")
    return text


@torch.no_grad()
def per_candidate_scores(model: Model, batch: Batch, pairs: int = 256) -> torch.Tensor:
    """The reference implementations' evaluation: one sample per (impression, candidate) pair, whose history
    (H news, padding included) and candidate are encoded again and whose user is encoded again. Pairs are batched
    `pairs` at a time, padded candidates skipped. Same logits as the cached path, far more work."""
    b, c = batch.candidates.shape
    h = batch.history.shape[1]
    rows, cols = batch.candidate_mask.nonzero(as_tuple=True)  # [P] real pairs
    logits = torch.full((b, c), float("-inf"), device=batch.candidates.device)
    for s in range(0, len(rows), pairs):
        r, j = rows[s:s + pairs], cols[s:s + pairs]
        p = len(r)
        one = Batch(user=batch.user[r], history=batch.history[r], history_mask=batch.history_mask[r],
                    candidates=batch.candidates[r, j][:, None],
                    candidate_mask=torch.ones(p, 1, dtype=torch.bool, device=r.device))
        history = model.encode_news(one.history.reshape(-1)).view(p, h, -1)  # [P, H, D]
        candidate = model.encode_news(one.candidates[:, 0])[:, None]  # [P, 1, D]
        logits[r, j] = model.score(one, history, candidate)[0][:, 0]
    return logits


def bench_model(name: str, args) -> dict:
    news_encoder, user_encoder, flags, naive_default = MODELS[name]
    cfg = bench_config(args.data_dir, args.preset, args.device, f"--news_encoder={news_encoder}",
                       f"--user_encoder={user_encoder}", f"--eval_batch_size={args.eval_batch_size}", *flags,
                       *args.extra.split())
    rt = setup_runtime(cfg)
    corpus = load_corpus(cfg)
    dev = corpus.behaviors("dev")
    torch.manual_seed(0)
    model = Model(cfg, corpus.meta, corpus.news).to(rt.device).eval()
    sync = synchronizer(rt.device)
    n_imp = dev["stats"]["impressions"]
    n_cand = len(np.asarray(dev["candidates"]))
    print(f"{name}: dev {n_imp:,} impressions, {n_cand:,} candidates, {len(needed_news(dev)):,} news needed of "
          f"{model.news_num:,}; {machine(rt.device)}", flush=True)

    cache_s = None
    if getattr(model.news_encoder, "cache_frozen", False):
        sync()
        t0 = time.perf_counter()
        model.prepare()
        sync()
        cache_s = time.perf_counter() - t0

    # -- 1. cached vs per-candidate re-encoding on the same random samples, interleaved -------------------------
    n_sample = args.naive_impressions or naive_default
    rng = np.random.default_rng(0)
    samples = [subset(dev, np.sort(rng.choice(n_imp, n_sample, replace=False))) for _ in range(args.rounds)]
    diffs: list[float] = []

    def cached(r: int) -> float:
        sync()
        t0 = time.perf_counter()
        evaluate(model, samples[r], cfg, rt)
        sync()
        return (time.perf_counter() - t0) / samples[r]["stats"]["candidates"]

    def naive(r: int) -> float:
        data = EvalDataset(samples[r], cfg.eval_batch_size)
        batches = [data[i].to(rt.device) for i in range(len(data))]
        sync()
        t0 = time.perf_counter()
        logits = [per_candidate_scores(model, b) for b in batches]
        sync()
        dt = time.perf_counter() - t0
        # Same scores as the cached path (checked outside the timed block).
        table = model.encode_all_news(torch.from_numpy(needed_news(samples[r])).to(rt.device))
        diffs.append(max(float((lg - model.score_cached(b, table)).nan_to_num(0, 0, 0).abs().max())
                         for lg, b in zip(logits, batches)))
        return dt / samples[r]["stats"]["candidates"]

    evaluate(model, samples[0], cfg, rt)  # warm-up, untimed
    print(f"{name}: interleaved rounds on {n_sample} random dev impressions each (seconds per candidate), half "
          f"before and half after the dev run", flush=True)
    before = (args.rounds + 1) // 2

    def sample_rounds(first: int, count: int) -> dict[str, list[float]]:
        return interleaved({"cached": cached, "per-candidate": naive}, count, first=first, total=args.rounds,
                           log=lambda s: print(s.replace(" ms", " ms/candidate"), flush=True))

    res = sample_rounds(0, before)

    # -- 2. the cached path on the dev split -------------------------------------------------------------------
    fraction = args.plm_dev_fraction if cache_s is not None else args.dev_fraction
    if fraction >= 1:
        part = dev
    else:
        part = subset(dev, np.sort(rng.choice(n_imp, max(1, int(round(n_imp * fraction))), replace=False)))
    encode_s: list[float] = []
    encode_all_news = model.encode_all_news

    def timed_encode(*a, **k):  # the news-encoding share of the evaluation, timed inside the same pass
        sync()
        t = time.perf_counter()
        out = encode_all_news(*a, **k)
        sync()
        encode_s.append(time.perf_counter() - t)
        return out

    model.encode_all_news = timed_encode
    sync()
    t0 = time.perf_counter()
    evaluate(model, part, cfg, rt)
    sync()
    t_part = time.perf_counter() - t0
    del model.encode_all_news
    t_encode = sum(encode_s)
    t_score = t_part - t_encode
    need_part, need_full = needed_news(part), needed_news(dev)
    if fraction >= 1:
        t_full = t_part
        how = f"measured: news encoding {t_encode:.1f} s ({len(need_full):,} news), the rest {t_score:.1f} s"
    else:
        # News encoding scales with the news needed, the rest (users, scoring, metrics) with the candidates.
        t_full = t_encode * len(need_full) / len(need_part) + t_score * n_cand / part["stats"]["candidates"]
        how = (f"extrapolated from {part['stats']['impressions']:,} random impressions ({fraction:.0%}) in "
               f"{t_part:.1f} s: news encoding {t_encode:.1f} s for {len(need_part):,} news "
               f"(x{len(need_full) / len(need_part):.2f}"
               f" for the full dev), the rest {t_score:.1f} s (x{n_cand / part['stats']['candidates']:.2f})")
    tokens = padding_report(model, need_full)
    after = sample_rounds(before, args.rounds - before)
    res = {k: v + after[k] for k, v in res.items()}
    same_sample = ratio(res, "per-candidate", "cached")
    t_naive_full = median(res["per-candidate"]) * n_cand
    return {"name": name, "cfg": cfg, "rt": rt, "n_imp": n_imp, "n_cand": n_cand, "cache_s": cache_s,
            "n_sample": n_sample, "same_sample": same_sample, "res": res, "diff": max(diffs),
            "t_full": t_full, "how": how, "preset": args.preset, "tokens": tokens, "t_naive_full": t_naive_full,
            "news": model.news_num}


def report(r: dict) -> None:
    size = "MIND-small-sized" if r["preset"] == "small" else f"{r['preset']}-sized"
    print(f"\n### {r['name']}: dev evaluation, {size} generated dev ({r['n_imp']:,} impressions, {r['n_cand']:,} "
          f"candidates), eval batch {r['cfg'].eval_batch_size} ({machine(r['rt'].device)})\n")
    ratio = r["t_naive_full"] / r["t_full"]
    cached_ips = r["n_imp"] / r["t_full"]
    naive_ips = r["n_imp"] / r["t_naive_full"]
    rows = [
        ["cached path, full dev", f"{r['t_full']:,.1f} s", f"{cached_ips:,.0f}", r["how"]],
        ["per-candidate re-encoding, full dev", f"{r['t_naive_full']:,.0f} s", f"{naive_ips:,.2f}",
         f"{median(r['res']['per-candidate']) * 1e3:.2f} ms per candidate (median of {len(r['res']['per-candidate'])} "
         f"samples of {r['n_sample']} impressions) x {r['n_cand']:,} candidates"],
    ]
    if r["cache_s"] is not None:
        rows.append(["frozen-layer cache build (once per corpus; not in the rows above)", f"{r['cache_s']:,.1f} s",
                     "—",
                     f"all {r['news']:,} news of the corpus, as `--mode=dev` builds it"])
    print_table(["path", "time", "impressions/s", "how"], rows)
    print(f"\nspeed-up of the cached path on the full dev: x{ratio:,.0f} (target >= 50x: "
          + ("met" if ratio >= 50 else f"MISSED by {(50 - ratio) / 50 * 100:.0f}%") + ")")
    print(f"same-sample speed-up ({r['n_sample']} random impressions, where the cached path can share little): "
          f"x{r['same_sample']:.1f}; max |logit difference| between the paths {r['diff']:.1e}")
    if r["tokens"]:
        print(f"padding: {r['tokens']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="generated corpus size")
    p.add_argument("--data_dir", default=None, help="where the corpus is generated (default data/bench/perf-<preset>)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--eval_batch_size", type=int, default=128, help="impressions per evaluation batch")
    p.add_argument("--rounds", type=int, default=3, help="interleaved sample rounds; medians are reported")
    p.add_argument("--naive_impressions", type=int, default=0,
                   help="impressions per sample (0: " + ", ".join(f"{k} {v[3]}" for k, v in MODELS.items()) + ")")
    p.add_argument("--dev_fraction", type=float, default=1.0, help="share of dev impressions timed, non-PLM models")
    p.add_argument("--plm_dev_fraction", type=float, default=0.02,
                   help="share of dev impressions timed, PLM models (the full time is extrapolated below 1)")
    p.add_argument("--extra", default="", help="more main.py flags")
    args = p.parse_args(argv)
    set_threads(args.threads)
    args.data_dir = args.data_dir or f"data/bench/perf-{args.preset}"
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    for r in [bench_model(name, args) for name in names]:
        report(r)


if __name__ == "__main__":
    main()
