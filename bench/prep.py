"""Preprocessing at MIND-small size (issue 6): the first build of the corpus cache and its cached reload, each in
a fresh process, with wall time and peak RSS.

    python bench/prep.py                     # MIND-small-sized: 65k news, 50k users, 156,965 train / 73,152 dev
    python bench/prep.py --preset large      # MIND-large-sized (or any size flags of bench/scale.py)

Three child processes, each fresh (nothing cached in memory, imports counted in the wall time only):
  1. generate  bench/scale.py's stage: the demo corpus into <data_dir>/MIND-demo, skipped when oracle.json already
               records these sizes (a fresh clone generates it once);
  2. first     <data_dir>/cache removed, then `load_corpus` (news table, users, 50-d GloVe, entities) and the
               behaviors of every split: everything `main.py --mode=train` builds before its first step;
  3. cached    the same again, memory-mapping the cache that 2 built.
Each child prints `<stage> <figure>: <value>` lines: seconds per component, the total, and peak RSS
(getrusage: RUSAGE_SELF + RUSAGE_CHILDREN); the parent then prints first / cached. The corpus is shared with
bench/scale.py (same --data_dir and sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (bench/scale.py: presets, child runner, RSS helpers)


def stage_build(args, stage: str) -> None:
    """One preprocessing pass in this (fresh) process; figures printed and written to args._result."""
    from config import Config
    from main import load_corpus

    cfg = Config.from_args(["--dataset=demo", f"--data_dir={args.data_dir}", "--word_embedding_dim=50",
                            *scale.demo_flags(args)])
    log = (lambda *a, **k: print("   ", *a, **k, flush=True)) if args.verbose else (lambda *a, **k: None)
    t_start = t = time.perf_counter()
    corpus = load_corpus(cfg, log=log)
    result = {"corpus": time.perf_counter() - t}
    scale._say(stage, "corpus (news table, users, GloVe, entities) seconds", f"{result['corpus']:.2f}")
    candidates = 0
    for split in corpus.splits:
        t = time.perf_counter()
        b = corpus.behaviors(split)
        result[split] = time.perf_counter() - t
        candidates += b["stats"]["candidates"]
        scale._say(stage, f"{split} behaviors seconds", f"{result[split]:.2f}  ({b['stats']['impressions']:,} "
                   f"impressions, {b['stats']['candidates']:,} candidates)")
    result["total"] = time.perf_counter() - t_start
    own, children = scale._peak_kib()
    result["peak_kib"] = own + children
    cache = Path(args.data_dir) / "cache"
    mib = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1024 ** 2
    scale._say(stage, "preprocessing seconds", f"{result['total']:.2f}  ({corpus.meta.news_num - 1:,} news, "
               f"{candidates:,} candidates in {len(corpus.splits)} splits; cache {mib:,.0f} MiB)")
    scale._say(stage, "peak RSS", f"{scale._gib(own + children)}  (self {scale._gib(own)}, children "
               f"{scale._gib(children)}; {own + children:,} KiB)")
    Path(args._result).write_text(json.dumps(result))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(scale.PRESETS), default="small",
                   help="corpus sizes (bench/scale.py's presets; size flags override)")
    for name in ("news", "users", "train_impressions", "dev_impressions", "test_impressions"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--data_dir", default=None,
                   help="corpus and cache go here (default data/scale/<sizes>, as bench/scale.py; git-ignored)")
    p.add_argument("--rss_limit_gb", type=float, default=None,
                   help="stop a stage whose RSS passes this (GiB); default 85%% of MemAvailable at start")
    p.add_argument("--stages", default="generate,first,cached", help="comma-separated subset to run")
    p.add_argument("--verbose", action="store_true", help="also print the corpus log lines")
    p.add_argument("--_stage", choices=["first", "cached"], help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for k, v in scale.PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.data_dir = args.data_dir or scale.default_data_dir(args)
    if args._stage:
        return stage_build(args, args._stage)

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    print(f"sizes: {json.dumps(scale._sizes(args))}; data_dir {args.data_dir}; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs", flush=True)
    sizes = [f"--{k}={getattr(args, k)}" for k in ("news", "users", "train_impressions", "dev_impressions",
                                                    "test_impressions", "data_dir")]
    limit = int(args.rss_limit_gb * 1024 ** 2) if args.rss_limit_gb else int(0.85 * scale._mem_available_kib())
    print(f"RSS limit per stage: {scale._gib(limit)}", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            if stage == "generate":
                ok = scale.run_child("generate", sizes, limit, script=scale.__file__)
            else:
                if stage == "first":
                    shutil.rmtree(Path(args.data_dir) / "cache", ignore_errors=True)  # a first build finds no cache
                result = Path(tmp) / f"{stage}.json"
                ok = scale.run_child(stage, sizes + [f"--_result={result}"] + (["--verbose"] if args.verbose else []),
                                     limit, script=Path(__file__))
                if ok:
                    results[stage] = json.loads(result.read_text())
            if not ok:
                sys.exit(1)
    if "first" in results and "cached" in results:
        first, again = results["first"], results["cached"]
        scale._say("first / cached", "preprocessing seconds",
                   f"{first['total']:.2f} / {again['total']:.2f} = x{first['total'] / max(again['total'], 1e-9):.0f}")
        scale._say("first / cached", "peak RSS", f"{scale._gib(first['peak_kib'])} / {scale._gib(again['peak_kib'])}")


if __name__ == "__main__":
    main()
