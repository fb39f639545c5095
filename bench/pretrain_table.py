"""The table of bench/pretrain_demo.sh: per model and train fraction, dev metrics (best epoch of each run, as
--mode=aggregate reads them) from scratch and from pretraining, mean ± sample std over seeds, and the paired
difference pretrained − scratch by seed (mean ± std, and the paired t-test's p over the seeds).

    python bench/pretrain_table.py <OUT of bench/pretrain_demo.sh>
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_records import collect_runs  # noqa: E402

KEYS = ("auc", "mrr", "ndcg5", "ndcg10")


def main(out: str) -> None:
    root = Path(out)
    rows = ["| model | train impressions | arm | seeds | " + " | ".join(f"dev {k.upper() if k == 'auc' else k}"
                                                                        for k in KEYS) + " |",
            "|---|---|---|---|" + "---|" * len(KEYS)]
    for fraction, label in (("full", "all (100%)"), ("10pct", "10%")):
        arms = {arm: [r for r in collect_runs(root / f"{arm}-{fraction}") if "incomplete" not in r]
                for arm in ("scratch", "pretrained") if (root / f"{arm}-{fraction}").exists()}
        models = sorted({r["model"] for runs in arms.values() for r in runs})
        for model in models:
            by_seed = {arm: {r["seed"]: r for r in runs if r["model"] == model} for arm, runs in arms.items()}
            for arm, runs in by_seed.items():
                cells = []
                for k in KEYS:
                    v = np.array([r[f"dev_{k}"] for r in runs.values()]) * 100
                    cells.append(f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}")
                rows.append(f"| {model} | {label} | {arm} | {','.join(map(str, sorted(runs)))} | " + " | ".join(cells) + " |")
            seeds = sorted(set(by_seed.get("scratch", {})) & set(by_seed.get("pretrained", {})))
            if len(seeds) >= 1 and len(by_seed) == 2:
                cells = []
                for k in KEYS:
                    d = np.array([by_seed["pretrained"][s][f"dev_{k}"] - by_seed["scratch"][s][f"dev_{k}"]
                                  for s in seeds]) * 100
                    if len(d) > 1:
                        p = stats.ttest_1samp(d, 0.0).pvalue if d.std() > 0 else float("nan")
                        cells.append(f"{d.mean():+.2f} ± {d.std(ddof=1):.2f} (p={p:.3f})")
                    else:
                        cells.append(f"{d.mean():+.2f}")
                rows.append(f"| {model} | {label} | **pretrained − scratch** (paired by seed) | "
                            f"{','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    print("\ndev metrics in %, best epoch of each run (--dev_criterion avg); mean ± sample std over seeds; the paired "
          "row: per-seed difference, mean ± std, p of the paired t-test over the seeds")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/pretrain_table.py <OUT folder of bench/pretrain_demo.sh>")
    main(sys.argv[1])
