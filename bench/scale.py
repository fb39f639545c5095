"""Scale on one machine: generate a MIND-sized demo corpus, then preprocess it and start training in fresh
processes, reporting wall time and peak RSS of each stage (issue 5: MIND-large must stay under 8 GB of host RAM).

    python bench/scale.py --news 3000 --users 2000 --train_impressions 6000 --dev_impressions 1500   # quick check
    python bench/scale.py --preset small     # MIND-small-sized: 65k news, 50k users, 157k/73k impressions (~1 min)
    python bench/scale.py --preset large     # MIND-large-sized: 100k news, 1M users, 2.2M/376k/100k impressions
                                             # (~5 min, 1.8 GB of tsv, peak RSS under 4 GiB per stage)

Three child processes, each fresh so no stage's memory counts in the next:
  1. generate  the demo corpus into <data_dir>/MIND-demo (skipped when oracle.json already records these sizes;
               the default --data_dir, data/scale/<sizes>, is one folder per set of sizes, as an existing demo
               corpus is never replaced);
  2. first     the first `load_corpus` + train/dev behaviors (builds <data_dir>/cache), the model, the
               TrainDataset and a few optimizer steps (NRMS, MHSA-MHSA, small dims);
  3. cached    the same again, reading the cache built by 2.
Each stage prints one figure per line: `<stage> <figure>: <value>`. Peak RSS is the child's own
getrusage(RUSAGE_SELF).ru_maxrss (+ RUSAGE_CHILDREN, e.g. DataLoader workers; none here), cross-checked by the
parent's 0.2 s sampling of /proc/<pid>/status, which also stops a child that passes --rss_limit_gb (so a
too-hungry build cannot take the machine down) and reports that instead of a figure.
`--cleanup` deletes <data_dir> at the end (it is large at MIND-large size: 1.8 GB of tsv, 0.7 GB of cache).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    # MIND-small: 65,238 news, 50,000 users, 156,965 train / 73,152 dev impressions (~230k in all).
    "small": dict(news=65000, users=50000, train_impressions=156965, dev_impressions=73152, test_impressions=1000),
    # MIND-large: 161,013 news (104k in train), 1,000,000 users, 2,232,748 train / 376,471 dev / 2,370,727 test.
    # The test split is cut to 100k here: it is not read when training starts.
    "large": dict(news=100000, users=1000000, train_impressions=2232748, dev_impressions=376471,
                  test_impressions=100000),
}


def _rss_kib_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _peak_kib() -> tuple[int, int]:
    """(self, children) peak resident set size in KiB (ru_maxrss is KiB on Linux)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def _gib(kib: int) -> str:
    return f"{kib / 1024 ** 2:.2f} GiB"


def _say(stage: str, figure: str, value: str) -> None:
    print(f"{stage} {figure}: {value}", flush=True)


def _sizes(args) -> dict[str, int]:
    return dict(num_news=args.news, num_users=args.users, num_train_impressions=args.train_impressions,
                num_dev_impressions=args.dev_impressions, num_test_impressions=args.test_impressions)


def default_data_dir(args) -> str:
    """data/scale/<news>-<users>-<train>-<dev>-<test>: one folder per set of sizes (a demo corpus is never
    replaced by one of other sizes)."""
    return "data/scale/" + "-".join(str(v) for v in _sizes(args).values())


def demo_flags(args) -> list[str]:
    """main.py's --demo_* flags for these sizes (so load_corpus finds the generated corpus as it is)."""
    s = _sizes(args)
    return [f"--demo_news={s['num_news']}", f"--demo_users={s['num_users']}",
            f"--demo_train_impressions={s['num_train_impressions']}",
            f"--demo_dev_impressions={s['num_dev_impressions']}", f"--demo_test_impressions={s['num_test_impressions']}"]


# ----------------------------------------------------------------------------------------------------------
# Child stages
# ----------------------------------------------------------------------------------------------------------

def stage_generate(args) -> None:
    from demo_corpus import ensure_demo

    t0 = time.perf_counter()
    root = ensure_demo(args.data_dir, seed=0, **_sizes(args))
    dt = time.perf_counter() - t0
    mib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1024 ** 2
    _say("generate", "seconds", f"{dt:.1f}")
    _say("generate", "corpus on disk", f"{mib:,.0f} MiB ({root})")
    _say("generate", "peak RSS", _gib(sum(_peak_kib())))


def stage_train(args, stage: str) -> None:
    import numpy as np
    import torch

    from config import Config
    from dataset import TrainDataset
    from devices import setup_runtime
    from main import load_corpus
    from model import Model
    from trainer import build_optimizer

    cfg = Config.from_args([
        "--dataset=demo", f"--data_dir={args.data_dir}", "--device=cpu", "--no-progress",
        "--news_encoder=MHSA", "--user_encoder=MHSA", "--word_embedding_dim=50", "--head_num=4", "--head_dim=16",
        "--attention_dim=32", f"--batch_size={args.batch_size}", *demo_flags(args)])
    rt = setup_runtime(cfg)
    log = (lambda *a, **k: print("   ", *a, **k, flush=True)) if args.verbose else (lambda *a, **k: None)

    def mark(what: str, t0: float) -> float:
        now = time.perf_counter()
        _say(stage, f"{what} seconds", f"{now - t0:.1f}  (RSS now {_gib(_rss_kib_now())}, peak so far "
                                       f"{_gib(_peak_kib()[0])})")
        return now

    t_start = t = time.perf_counter()
    corpus = load_corpus(cfg, log=log)
    t = mark("corpus (news, users, GloVe, entities)", t)
    train = corpus.behaviors("train")
    t = mark("train behaviors", t)
    dev = corpus.behaviors("dev")
    t = mark("dev behaviors", t)
    _say(stage, "preprocessing seconds", f"{t - t_start:.1f}  ({corpus.meta.news_num - 1:,} news, "
         f"{train['stats']['impressions']:,} train / {dev['stats']['impressions']:,} dev impressions, "
         f"{train['stats']['candidates']:,} train candidates)")

    torch.manual_seed(0)
    model = Model(cfg, corpus.meta, corpus.news).to(rt.device)
    data = TrainDataset(train, cfg.negative_sample_num, seed=0)
    opt = build_optimizer(model, cfg)
    t = mark("model + TrainDataset", t)
    model.train()
    rng = np.random.default_rng(0)
    for _ in range(args.train_steps):
        batch = data[rng.choice(len(data), cfg.batch_size, replace=False)].to(rt.device)
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = mark(f"{args.train_steps} optimizer steps (batch {cfg.batch_size}, {len(data):,} train samples)", t)
    own, children = _peak_kib()
    _say(stage, "total seconds", f"{t - t_start:.1f}")
    _say(stage, "peak RSS", f"{_gib(own + children)}  (self {_gib(own)}, children {_gib(children)}; "
         f"{own + children:,} KiB)")


# ----------------------------------------------------------------------------------------------------------
# Parent: run each stage in a fresh process and watch its memory
# ----------------------------------------------------------------------------------------------------------

def _proc_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 16 * 1024 ** 2


def run_child(stage: str, argv: list[str], limit_kib: int, script: Path | None = None) -> bool:
    """Run `<script> --_stage=<stage>` (default this file) in a fresh interpreter; False if it failed or was
    stopped."""
    t0 = time.perf_counter()
    script = Path(script or __file__).resolve()
    proc = subprocess.Popen([sys.executable, str(script), f"--_stage={stage}", *argv], cwd=ROOT)
    seen, stopped = 0, False
    while proc.poll() is None:
        seen = max(seen, _proc_rss_kib(proc.pid))
        if seen > limit_kib:
            proc.kill()  # this child only, by its pid
            stopped = True
            break
        time.sleep(0.2)
    proc.wait()
    dt = time.perf_counter() - t0
    if stopped:
        _say(stage, "STOPPED", f"RSS passed --rss_limit_gb ({_gib(seen)} > {_gib(limit_kib)}) after {dt:.1f}s")
        return False
    _say(stage, "wall seconds (process, incl. imports)", f"{dt:.1f}; sampled peak RSS {_gib(seen)}")
    if proc.returncode != 0:
        _say(stage, "FAILED", f"exit status {proc.returncode}")
        return False
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="MIND-small or MIND-large sizes (size flags override)")
    p.add_argument("--news", type=int)
    p.add_argument("--users", type=int)
    p.add_argument("--train_impressions", type=int)
    p.add_argument("--dev_impressions", type=int)
    p.add_argument("--test_impressions", type=int)
    p.add_argument("--data_dir", default=None,
                   help="corpus and cache go here (default data/scale/<sizes>, git-ignored under data/)")
    p.add_argument("--train_steps", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--rss_limit_gb", type=float, default=None,
                   help="stop a stage whose RSS passes this (GiB); default 85%% of MemAvailable at start, so the "
                        "kernel's OOM killer (which may pick another job) is not reached")
    p.add_argument("--stages", default="generate,first,cached", help="comma-separated subset to run")
    p.add_argument("--cleanup", action="store_true", help="delete --data_dir at the end")
    p.add_argument("--verbose", action="store_true", help="also print the corpus log lines")
    p.add_argument("--_stage", choices=["generate", "first", "cached"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = PRESETS.get(args.preset, dict(news=3000, users=2000, train_impressions=6000, dev_impressions=1500,
                                         test_impressions=500))
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.data_dir = args.data_dir or default_data_dir(args)

    if args._stage == "generate":
        return stage_generate(args)
    if args._stage in ("first", "cached"):
        return stage_train(args, args._stage)

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    print(f"sizes: {json.dumps(_sizes(args))}; data_dir {args.data_dir}; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs", flush=True)
    child_argv = [f"--{k}={getattr(args, k)}" for k in ("news", "users", "train_impressions", "dev_impressions",
                                                       "test_impressions", "data_dir", "train_steps",
                                                       "batch_size")] + (["--verbose"] if args.verbose else [])
    limit = int(args.rss_limit_gb * 1024 ** 2) if args.rss_limit_gb else int(0.85 * _mem_available_kib())
    print(f"RSS limit per stage: {_gib(limit)}", flush=True)
    cache = Path(args.data_dir) / "cache"
    ok = True
    for stage in stages:
        if stage == "first" and cache.exists():
            shutil.rmtree(cache)  # a first build must not find an earlier run's cache
        if not run_child(stage, child_argv, limit):
            ok = False
            break
    if args.cleanup:
        shutil.rmtree(args.data_dir, ignore_errors=True)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
