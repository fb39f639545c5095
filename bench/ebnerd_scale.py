"""EB-NeRD preparation at growing sizes (issue 24): a synthetic bundle in EB-NeRD's parquet format
(news_data/ebnerd_synth.py), then its conversion to the MIND-format corpus (news_data/ebnerd.py, streamed) and the
first build of the corpus cache (`load_corpus` + every split's behaviors), each in a fresh process, with wall time
and peak RSS.

    python bench/ebnerd_scale.py                       # 10k, 100k and 1M train impressions
    python bench/ebnerd_scale.py --sizes 10000 --keep  # one size; keep the files under --work

Per size: train impressions N, validation N/2, users N/10 (at most 1.1M, EB-NeRD large's count), articles
N/50 (at least 2,000, at most 125,541), in-view lists 5-12 long (EB-NeRD's mean is about 11), histories up to 100
clicks. EB-NeRD large (train + validation) has about 24.6M impressions (38M with the test set): the figures show
how time and memory grow toward it. Each stage prints `<stage> seconds: ..., peak_rss_mib: ...`.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stage(args) -> None:
    """One stage in this fresh process: generate, convert or cache."""
    data = Path(args.work) / f"n{args.size}"
    t = time.perf_counter()
    if args.stage == "generate":
        from news_data.ebnerd_synth import write_ebnerd

        n = args.size
        write_ebnerd(data / "ebnerd_demo", articles=max(2000, min(125_541, n // 50)), users=min(1_100_000, n // 10),
                     train=n, validation=n // 2, history=100, seed=0)
    elif args.stage == "convert":
        from news_data import get_dataset

        get_dataset("ebnerd_demo").prepare(data, download=False, log=lambda *a, **k: None)
    else:
        from config import Config
        from main import load_corpus

        cfg = Config.from_args(["--dataset=ebnerd_demo", f"--data_dir={data}", "--word_embedding_dim=50",
                                "--news_encoder=CNN", "--user_encoder=ATT"])
        corpus = load_corpus(cfg, log=lambda *a, **k: None)
        corpus.behaviors("test")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"stage": args.stage, "size": args.size, "seconds": round(time.perf_counter() - t, 1),
                      "peak_rss_mib": round(rss)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="train impressions per corpus, comma-separated")
    p.add_argument("--work", default=None, help="folder for the corpora (default: a temp folder, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the corpora")
    p.add_argument("--stage", choices=("generate", "convert", "cache"), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        return stage(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="ebnerd_scale_"))
    rows = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            for name in ("generate", "convert", "cache"):
                out = subprocess.run([sys.executable, __file__, f"--stage={name}", f"--size={size}", f"--work={work}"],
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    sys.exit(f"{name} {size} failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
            folder = work / f"n{size}"
            sizes = {p.name: p.stat().st_size for p in (folder / "ebnerd_demo").rglob("*.parquet")}
            print(f"size {size}: parquet {sum(sizes.values()) / 2**20:.0f} MiB, converted tsv "
                  f"{sum(f.stat().st_size for f in (folder / 'MIND-ebnerd_demo').rglob('*.tsv')) / 2**20:.0f} MiB",
                  flush=True)
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("| train impressions | stage | seconds | peak RSS MiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']:,} | {r['stage']} | {r['seconds']} | {r['peak_rss_mib']} |")


if __name__ == "__main__":
    main()
