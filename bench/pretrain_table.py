"""The table of bench/pretrain_demo.sh and bench/pretrain_converged.sh: per model and train share, dev metrics
(best epoch of each run, as --mode=aggregate reads them) from scratch and from pretraining, mean ± sample std over
seeds, and the paired difference pretrained − scratch (and pretrained − equal, the scratch arm given the
pretraining's steps, where that arm was run) by seed (mean ± std, and the paired t-test's p over the seeds).

    python bench/pretrain_table.py <OUT of bench/pretrain_demo.sh or bench/pretrain_converged.sh>
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_records import collect_runs  # noqa: E402

KEYS = ("auc", "mrr", "ndcg5", "ndcg10")


SHARES = (("full", "all (100%)"), ("10pct", "10%"), ("few", "few (--train_fraction)"))
ARMS = (("scratch", "scratch"), ("equal", "scratch + the pretraining's steps"), ("pretrained", "pretrained"))
PAIRS = (("pretrained", "scratch"), ("pretrained", "equal"))


def paired_cells(a: dict, b: dict, seeds: list) -> list[str]:
    """Per metric: the per-seed difference a - b in points, mean ± std and the paired t-test's p over the seeds."""
    cells = []
    for k in KEYS:
        d = np.array([a[s][f"dev_{k}"] - b[s][f"dev_{k}"] for s in seeds]) * 100
        if len(d) > 1:
            p = stats.ttest_1samp(d, 0.0).pvalue if d.std() > 0 else float("nan")
            cells.append(f"{d.mean():+.2f} ± {d.std(ddof=1):.2f} (p={p:.3f})")
        else:
            cells.append(f"{d.mean():+.2f}")
    return cells


def main(out: str) -> None:
    root = Path(out)
    rows = ["| model | train impressions | arm | seeds | best epochs | "
            + " | ".join(f"dev {k.upper() if k == 'auc' else k}" for k in KEYS) + " |",
            "|---|---|---|---|---|" + "---|" * len(KEYS)]
    for share, label in SHARES:
        arms = {arm: [r for r in collect_runs(root / f"{arm}-{share}") if "incomplete" not in r]
                for arm, _ in ARMS if (root / f"{arm}-{share}").exists()}
        for model in sorted({r["model"] for runs in arms.values() for r in runs}):
            by_seed = {arm: {r["seed"]: r for r in runs if r["model"] == model} for arm, runs in arms.items()}
            for arm, name in ARMS:
                runs = by_seed.get(arm)
                if not runs:
                    continue
                cells = []
                for k in KEYS:
                    v = np.array([r[f"dev_{k}"] for r in runs.values()]) * 100
                    cells.append(f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}")
                epochs = ",".join(str(runs[s]["best_epoch"]) for s in sorted(runs))
                rows.append(f"| {model} | {label} | {name} | {','.join(map(str, sorted(runs)))} | {epochs} | "
                            + " | ".join(cells) + " |")
            for a, b in PAIRS:
                seeds = sorted(set(by_seed.get(a, {})) & set(by_seed.get(b, {})))
                if seeds:
                    rows.append(f"| {model} | {label} | **{a} − {b}** (paired by seed) | {','.join(map(str, seeds))} "
                                f"| | " + " | ".join(paired_cells(by_seed[a], by_seed[b], seeds)) + " |")
    print("\n".join(rows))
    print("\ndev metrics in %, best epoch of each run (--dev_criterion avg; best epochs: per seed); mean ± sample std "
          "over seeds; the paired rows: per-seed difference, mean ± std, p of the paired t-test over the seeds")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/pretrain_table.py <OUT folder of bench/pretrain_demo.sh>")
    main(sys.argv[1])
