"""The paper models on the demo corpus: each trains `--epoch` epochs (2 by default) and is scored on dev.

    python bench/zoo.py                         # every paper model, default demo, 2 epochs
    python bench/zoo.py --models NRMS,NAML      # a subset
    python bench/zoo.py --epoch 1 --extra=--max_steps_per_epoch=20   # a quick smoke run
    python bench/zoo.py --models NRMS --seeds 0,1,2 --extra=--category_fusion   # mean ± std over seeds

Prints a markdown table (dev AUC / MRR / nDCG@5 / nDCG@10 of the best epoch, mean train seconds per epoch,
trainable parameters; with `--seeds`, one run per seed and each metric as mean ± sample std over them) and the
same rows as TSV; README.md quotes the table measured on this project's machine. After training, each run's best
checkpoint is scored by `main.py --mode=dev` (the same dev split), whose beyond-accuracy metrics
(docs/beyond-accuracy.md, GloVe embedding, k = 5 and 10) fill a second table and TSV: `BEYOND_COLUMNS` at k = 10
in the markdown, every metric at both k in the TSV (`--no_beyond` skips this step).
Runs go to `--output_dir` (default `best_model/_bench/`, git-ignored), so they do not mix with your own runs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
from main import main  # noqa: E402

# name -> flags: the README's model table (config.PAPER_MODELS) without the two PLM rows (PLM-NRMS, MINER), with
# FIM's click predictor spelled out. The demo GloVe is the offline 50-d package; DKN's 100-d embeddings therefore
# start random (the corpus says so), as they would without GloVe 6B-100d. CAUM, MINS and PP-Rec use NRMS's news
# encoder, as their papers' are NRMS-like title encoders (their entity and abstract views are not built here).
PAPER_MODELS: dict[str, list[str]] = {
    name: [*flags, *(["--click_predictor=FIM"] if name == "FIM" else [])]
    for name, flags in config.PAPER_MODELS.items() if name not in ("PLM-NRMS", "MINER")}
KEYS = ("auc", "mrr", "ndcg5", "ndcg10")
# The beyond-accuracy columns of the README's table (k = 10); the TSV has every metric at k = 5 and 10.
BEYOND_COLUMNS = ("ild_category", "novelty", "calibration_js", "unexpectedness", "sentiment", "coverage", "gini",
                  "personalization")


def run(name: str, flags: list[str], args) -> dict:
    seeding = f"--seeds={','.join(map(str, args.seeds))}" if args.seeds else f"--seed={args.seed}"
    argv = ["--mode=train", "--dataset=demo", f"--epoch={args.epoch}", seeding, "--no-progress",
            f"--output_dir={args.output_dir}", f"--data_dir={args.data_dir}", *flags, *args.extra]
    out = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(out):
        result = main(argv)
    wall = time.time() - t0
    params = next((line.split(": ")[1].split(" ")[0] for line in out.getvalue().splitlines()
                   if line.startswith("model ") and "trainable parameters" in line), "?")
    runs = result["runs"] if args.seeds else [result]  # one result per seed
    history = [epoch for r in runs for epoch in r["history"]]
    per_epoch = sum(r["train_seconds"] for r in history) / max(1, len(history))
    values = {k: np.array([r["dev_metrics"][k] for r in runs]) for k in KEYS}
    beyond = {} if args.no_beyond else beyond_of(runs, args)
    return {"model": name, "flags": " ".join(flags), **{k: float(v.mean()) for k, v in values.items()},
            **{f"{k}_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
            "runs": len(runs), "best_epoch": [r["best_epoch"] for r in runs], "train_s_per_epoch": per_epoch,
            "wall_s": wall, "params": params, "beyond": beyond}


def beyond_of(runs: list[dict], args) -> dict[str, float]:
    """`--mode=dev` on each run's best checkpoint: the beyond-accuracy means (metric@k), averaged over the runs."""
    means: dict[str, list[float]] = {}
    for r in runs:
        with contextlib.redirect_stdout(io.StringIO()):
            report = main(["--mode=dev", f"--dev_model_path={r['checkpoint']}", "--no-progress",
                           f"--data_dir={args.data_dir}"])
        for key, value in report["beyond"]["means"].items():
            means.setdefault(key, []).append(value)
    return {key: float(np.mean(v)) for key, v in means.items()}


def cell(row: dict, key: str) -> str:
    """A metric as printed: the value, or mean ± std over seeds."""
    return f"{row[key]:.4f}" + (f" ± {row[key + '_std']:.4f}" if row["runs"] > 1 else "")


def main_cli(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(PAPER_MODELS), help="comma-separated names from the table")
    p.add_argument("--epoch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",") if x.strip()], default=None,
                   help="comma-separated seeds: one run per seed (main.py --seeds), metrics as mean ± std")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--output_dir", default="best_model/_bench")
    p.add_argument("--extra", action="append", default=[], help="a flag passed to every run (repeatable)")
    p.add_argument("--no_beyond", action="store_true", help="skip the beyond-accuracy dev evaluation of each run")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in PAPER_MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(PAPER_MODELS)}")
    rows = []
    for name in names:
        row = run(name, PAPER_MODELS[name], args)
        rows.append(row)
        print(f"{name}: dev AUC {cell(row, 'auc')} MRR {cell(row, 'mrr')} nDCG@5 {cell(row, 'ndcg5')} "
              f"nDCG@10 {cell(row, 'ndcg10')}; {row['train_s_per_epoch']:.1f} s/epoch", flush=True)
    print("\n| model | flags | runs | AUC | MRR | nDCG@5 | nDCG@10 | train s/epoch | parameters |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | `{r['flags']}` | {r['runs']} | " + " | ".join(cell(r, k) for k in KEYS)
              + f" | {r['train_s_per_epoch']:.1f} | {r['params']} |")
    print("\nmodel\truns\t" + "\t".join(f"{k}\t{k}_std" for k in KEYS) + "\ttrain_s_per_epoch")
    for r in rows:
        print(f"{r['model']}\t{r['runs']}\t" + "\t".join(f"{r[k]:.4f}\t{r[k + '_std']:.4f}" for k in KEYS)
              + f"\t{r['train_s_per_epoch']:.1f}")
    print_beyond(rows)
    return rows


def print_beyond(rows: list[dict]) -> None:
    """The beyond-accuracy table (k = 10) and every metric at every k as TSV."""
    rows = [r for r in rows if r["beyond"]]
    if not rows:
        return
    print("\n| model | " + " | ".join(f"{c}@10" for c in BEYOND_COLUMNS) + " |")
    print("|---|" + "---|" * len(BEYOND_COLUMNS))
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(f"{r['beyond'].get(c + '@10', float('nan')):.4f}"
                                             for c in BEYOND_COLUMNS) + " |")
    keys = sorted({k for r in rows for k in r["beyond"]})
    print("\nmodel\t" + "\t".join(keys))
    for r in rows:
        print(f"{r['model']}\t" + "\t".join(f"{r['beyond'].get(k, float('nan')):.4f}" for k in keys))


if __name__ == "__main__":
    main_cli()
