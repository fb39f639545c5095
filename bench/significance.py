"""How long `--mode=compare`'s statistics take at MIND-small dev size: one pair of runs, 73,152 impressions x 4
metrics, 10,000 sign-flip permutations + 10,000 paired-bootstrap resamples + the paired t-test
(`significance.paired_tests`), on generated per-impression metrics.

    python bench/significance.py                          # MIND-small dev size, 10,000 resamples
    python bench/significance.py --impressions 376471     # MIND-large dev size

Prints wall and process-CPU seconds of each part and of the whole, and the peak resident memory. On a machine whose
cores other jobs share, CPU seconds are the steadier figure (wall includes the time spent waiting for a core).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import significance  # noqa: E402


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main_cli(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impressions", type=int, default=73_152, help="impressions scored by both runs")
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n = args.impressions
    a = rng.random((n, 4))
    b = np.clip(a + rng.normal(0.003, 0.1, (n, 4)), 0, 1)  # B better by about 0.3 points, noisy per impression
    d = b - a
    flip_rng, boot_rng = significance.generators(args.seed)
    _, w_flip, c_flip = timed(significance.sign_flip_means, d, args.resamples, flip_rng)
    _, w_boot, c_boot = timed(significance.bootstrap_means, d, args.resamples, boot_rng)
    res, w_all, c_all = timed(significance.paired_tests, a, b, args.resamples, args.seed)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} impressions x 4 metrics, {args.resamples} resamples each; numpy {np.__version__}")
    print("| part | wall s | CPU s |\n|---|---|---|")
    print(f"| sign-flip permutations | {w_flip:.1f} | {c_flip:.1f} |")
    print(f"| paired bootstrap | {w_boot:.1f} | {c_boot:.1f} |")
    print(f"| paired_tests (both + t-test + percentiles) | {w_all:.1f} | {c_all:.1f} |")
    print(f"peak resident memory {peak_mb:.0f} MB; AUC difference {100 * res['diff'][0]:+.3f} points, 95% CI "
          f"[{100 * res['ci_low'][0]:+.3f}, {100 * res['ci_high'][0]:+.3f}], p {res['p_perm'][0]:.2g}")
    return {"wall": w_all, "cpu": c_all, "peak_mb": peak_mb}


if __name__ == "__main__":
    main_cli()
