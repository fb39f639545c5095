"""Which model is really better: paired tests over impressions, intervals over seeds.

Two runs scored on the same impressions are compared impression by impression: the per-impression difference
`d_i = metric_B(i) - metric_A(i)` removes what is hard or easy about each impression (both runs share it), so
the test is sharper than an unpaired comparison of two means, the more so the more alike the runs rank. Over seeds, a model's runs give an
interval for its expected score (t-distribution), and two models trained with the same seeds are paired by seed.

- Records: training (at each new best dev epoch), `--mode=dev` and `--mode=test` write `per_impression.npz` (the
  model) and `per_impression_popularity.npz` (the popularity baseline every run prints) into `<run>/<split>/`,
  beside metrics.json: per scored impression its id, AUC, MRR, nDCG@5, nDCG@10, candidate and click counts.
- `paired_tests`: mean difference, paired-bootstrap percentile interval, sign-flip permutation p-value (both with
  a seeded number of resamples, in chunks of resamples so memory stays bounded) and the paired t-test beside.
- `holm`: Holm's step-down adjustment of a family of p-values.
- `compare_runs` / `compare_tables`: `--mode=compare`; `seed_differences`: the paired-by-seed part of
  `--mode=aggregate` (`run_records.aggregate_runs` adds the across-seed interval of each model).

Imports only util (and scipy where a distribution is needed).
"""
from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import run_records
import util
from scorer import METRIC_KEYS

PER_IMPRESSION = "per_impression.npz"
POPULARITY = "per_impression_popularity.npz"
POPULARITY_PREFIX = "popularity:"  # --runs popularity:PATH = the popularity baseline stored beside PATH
FORMAT = 1
CONFIDENCE = 0.95
NAMES = {"auc": "AUC", "mrr": "MRR", "ndcg5": "nDCG@5", "ndcg10": "nDCG@10"}
# Values a resampling chunk holds at once (chunk of resamples x impressions): ~ 64 MB of float64 per array.
CHUNK_VALUES = 8_000_000


# ----------------------------------------------------------------------------------------------------------
# Per-impression records
# ----------------------------------------------------------------------------------------------------------

@dataclass
class PerImpression:
    """One run's (or the popularity baseline's) metrics per scored impression, as read back from its file."""

    path: Path
    label: str
    impression_ids: np.ndarray  # [S] int64
    metrics: np.ndarray  # [S, 4] float64, columns in METRIC_KEYS order
    candidates: np.ndarray  # [S] int32, candidates of each impression
    clicks: np.ndarray  # [S] int32, clicked candidates of each impression
    meta: dict

    def means(self) -> dict[str, float]:
        return {k: float(self.metrics[:, j].mean()) if len(self.metrics) else float("nan")
                for j, k in enumerate(METRIC_KEYS)}


def write_per_impression(path, per: Mapping, impression_ids: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                         meta: Mapping) -> Path:
    """Write `scorer.per_impression_metrics`' result as a .npz (atomically; no pickled objects inside).

    Args:
        per: {index [S], auc/mrr/ndcg5/ndcg10 [S], skipped_single_class, skipped_empty}.
        impression_ids, offsets, labels: the split's arrays ([I], [I+1], flat [N]) the metrics were computed on.
        meta: what the scores come from (model, split, dataset, seed, run, checkpoint, ...), stored as JSON.
    """
    index = np.asarray(per["index"], dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    csum = np.concatenate([[0], np.cumsum(np.asarray(labels) == 1)])
    info = {"format": FORMAT, **meta, "skipped_single_class": int(per["skipped_single_class"]),
            "skipped_empty": int(per["skipped_empty"])}
    arrays = {"impression_id": np.asarray(impression_ids, dtype=np.int64)[index],
              **{k: np.asarray(per[k], dtype=np.float64) for k in METRIC_KEYS},
              "candidates": (offsets[index + 1] - offsets[index]).astype(np.int32),
              "clicks": (csum[offsets[index + 1]] - csum[offsets[index]]).astype(np.int32),
              "meta": np.array(json.dumps(info, default=str))}

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, **arrays)
    util.atomic_write(path, write)
    return Path(path)


def load_per_impression(path, label: str | None = None) -> PerImpression:
    """Read a file of `write_per_impression`; a wrong or damaged file is a ValueError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        need = {"impression_id", "candidates", "clicks", "meta", *METRIC_KEYS}
        if not need <= set(data):
            raise ValueError(f"missing {sorted(need - set(data))}")
        meta = json.loads(str(data["meta"]))
    except Exception as e:  # noqa: BLE001 - a cut zip raises BadZipFile, EOFError, zlib.error, ...: all mean damaged
        if isinstance(e, IsADirectoryError):
            raise ValueError(f"{path}: a folder, not a per-impression metrics file") from None
        raise ValueError(f"{path}: not a per-impression metrics file, or a damaged one ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no details'}); write it again with --mode=dev or "
                         f"--mode=test on that run's checkpoint") from None
    if label is None:
        label = meta.get("model", path.stem) + (f" {meta['run']}" if meta.get("run") else "")
    return PerImpression(path, label, data["impression_id"].astype(np.int64),
                         np.stack([data[k].astype(np.float64) for k in METRIC_KEYS], axis=1),
                         data["candidates"], data["clicks"], meta)


def resolve_run(spec: str, split: str) -> Path:
    """The per-impression file a `--runs` entry names: the .npz itself, a run folder, its `<split>/` folder or a
    checkpoint in it (-> `<run>/<split>/per_impression.npz`); `popularity:<any of these>` -> the popularity
    baseline's file in the same folder."""
    popular = spec.startswith(POPULARITY_PREFIX)
    path = Path(spec[len(POPULARITY_PREFIX):] if popular else spec)
    name = POPULARITY if popular else PER_IMPRESSION
    if path.is_file() and path.suffix == ".npz":
        return path
    if path.is_file():  # a checkpoint: its records lie in <run>/<split>/, or <run>/<split>-<stem>/ (not the best)
        folder = _checkpoint_records(spec, path, split, name)
    elif path.is_dir():  # a folder holding the records (a split folder), else a run folder: its <split>/
        folder = path if (path / name).exists() else path / split
    else:
        raise FileNotFoundError(f"--runs {spec}: no such file or folder (give a run folder, a checkpoint or a "
                                f"{PER_IMPRESSION} file)")
    found = folder / name
    if not found.is_file():
        raise FileNotFoundError(f"--runs {spec}: no {found}; write it with `python main.py --mode={split} "
                                f"--{split}_model_path=<checkpoint of that run>`")
    return found


def _checkpoint_records(spec: str, path: Path, split: str, name: str) -> Path:
    """The records folder of checkpoint `path` (`checkpoints.records_name`). An evaluation of a checkpoint other
    than the run's best-model file may lie in numbered folders (`dev-last-2/`, written beside another evaluation's
    records): unless the plain folder is the only one with records, the choice is the user's, never a guess."""
    from checkpoints import records_name

    base = records_name(path, split)
    if base == split:
        return path.parent / base
    found = sorted((f for f in path.parent.glob(f"{base}*") if (f / name).is_file()
                    and (f.name == base or f.name[len(base) + 1:].isdigit() and f.name[len(base)] == "-")),
                   key=lambda f: f.name)
    if found and [f.name for f in found] != [base]:
        raise FileNotFoundError(f"--runs {spec}: evaluations of {path.name} lie in "
                                f"{', '.join(f.name + '/' for f in found)} of {path.parent}; pass the one to compare "
                                f"(its folder or its {name})")
    return path.parent / base


def load_runs(specs: Sequence[str], split: str) -> list[PerImpression]:
    """Load every `--runs` entry; labels that would repeat get the entry's position appended."""
    runs = []
    for spec in specs:
        run = load_per_impression(resolve_run(spec, split))
        given = Path(spec[len(POPULARITY_PREFIX):] if spec.startswith(POPULARITY_PREFIX) else spec)
        if not given.suffix == ".npz" and run.meta.get("split") not in (None, split):
            # a folder or checkpoint stands for the split --split names; a file given by name holds what it holds
            raise ValueError(f"--runs {spec}: {run.path} holds {run.meta.get('split')} records, but --split={split}; "
                             f"give the run folder (its {split}/ records are read) or --split={run.meta.get('split')}")
        runs.append(run)
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for i, r in enumerate(runs):
        if counts[r.label] > 1:
            r.label = f"{r.label} [{i + 1}]"
    return runs


def _examples(ids: np.ndarray, n: int = 5) -> str:
    return ", ".join(str(int(i)) for i in ids[:n]) + (", ..." if len(ids) > n else "")


def align(runs: Sequence[PerImpression]) -> list[np.ndarray]:
    """The runs' metric arrays [S, 4], rows in one order (sorted impression id). Runs of another split, scored on
    other impressions, or whose impressions with the same ids differ (other candidates or clicks: another
    corpus) are refused with a ValueError naming the difference."""
    ref = runs[0]
    ref_order = np.argsort(ref.impression_ids, kind="stable")
    out = []
    for r in runs:
        if r.meta.get("split") != ref.meta.get("split"):
            raise ValueError(f"--runs: {r.label} ({r.path}) holds {r.meta.get('split')} metrics but {ref.label} "
                             f"({ref.path}) holds {ref.meta.get('split')} metrics; compare runs on one split")
        only_ref, only_r = np.setdiff1d(ref.impression_ids, r.impression_ids), np.setdiff1d(r.impression_ids,
                                                                                            ref.impression_ids)
        if len(only_ref) or len(only_r) or len(r.impression_ids) != len(ref.impression_ids):
            raise ValueError(
                f"--runs: {r.label} ({r.path}) was scored on other impressions than {ref.label} ({ref.path}): "
                f"{len(r.impression_ids)} vs {len(ref.impression_ids)} scored impressions; {len(only_ref)} only in "
                f"{ref.label} ({_examples(only_ref) or 'none'}), {len(only_r)} only in {r.label} "
                f"({_examples(only_r) or 'none'}). A paired test needs the same impressions: evaluate both "
                f"checkpoints on the same split of the same corpus")
        order = np.argsort(r.impression_ids, kind="stable")
        same = ((r.candidates[order] == ref.candidates[ref_order]) & (r.clicks[order] == ref.clicks[ref_order]))
        if not same.all():
            bad = r.impression_ids[order][~same]
            raise ValueError(f"--runs: {r.label} ({r.path}) and {ref.label} ({ref.path}) have the same impression "
                             f"ids but {len(bad)} impressions with other candidate or click counts "
                             f"({_examples(bad)}): they were scored on different corpora")
        out.append(r.metrics[order])
    return out


# ----------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------

def generators(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(sign-flip generator, bootstrap generator): independent streams from one seed, so the p-value does not
    depend on how many bootstrap resamples were drawn, nor the interval on the permutations."""
    flip, boot = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(flip), np.random.default_rng(boot)


def sign_flip_means(d: np.ndarray, resamples: int, rng: np.random.Generator, chunk: int | None = None) -> np.ndarray:
    """Means of `d` [n, M] with each row's sign flipped at random, `resamples` times -> [resamples, M].

    Resample r uses raw 64-bit words r*W .. (r+1)*W - 1 of the generator (W = ceil(n / 64)); row i keeps its
    sign where bit i of `np.unpackbits(words.view(np.uint8))` is 1, so the result does not depend on `chunk`
    (resamples per block; the default bounds a block to CHUNK_VALUES values)."""
    n, m = d.shape
    words = -(-n // 64)
    chunk = chunk or max(1, CHUNK_VALUES // max(n, 1))
    total = d.sum(0)
    out = np.empty((resamples, m))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        raw = rng.bit_generator.random_raw(r * words)
        keep = np.unpackbits(raw.view(np.uint8)).reshape(r, words * 64)[:, :n]
        # kept rows count +d, flipped rows -d: sum = 2 * (sum of kept rows) - total
        out[start:start + r] = (2.0 * (keep.astype(np.float64) @ d) - total) / n
    return out


def bootstrap_means(d: np.ndarray, resamples: int, rng: np.random.Generator, chunk: int | None = None) -> np.ndarray:
    """Means of `d` [n, M] over n rows drawn with replacement, `resamples` times -> [resamples, M]. Resample r is
    row r of `rng.integers(0, n, size=(resamples, n))` (drawn in blocks of `chunk` rows: int64 draws, one stream
    whatever the block size). All columns share the same resamples."""
    n, m = d.shape
    chunk = chunk or max(1, CHUNK_VALUES // max(n, 1))
    out = np.empty((resamples, m))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(r, n))
        for i in range(r):  # how often each row was drawn, times the rows: faster than gathering [r, n, M]
            out[start + i] = np.bincount(idx[i], minlength=n) @ d
    return out / n


def paired_tests(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0,
                 confidence: float = CONFIDENCE, chunk: int | None = None) -> dict[str, np.ndarray]:
    """Paired comparison of B against A on the same impressions (rows), per column (metric).

    Args:
        a, b: [n, M] per-impression metrics, row i of both the same impression.
        resamples: bootstrap resamples and sign-flip permutations (each).
    Returns: {key: [M] float64} with
        diff: mean of d = b - a;
        ci_low, ci_high: percentile interval of the mean of d over paired-bootstrap resamples (impressions drawn
            with replacement, both runs' values of an impression kept together);
        p_perm: two-sided sign-flip permutation p-value, (1 + #{|permuted mean| >= |diff|}) / (1 + resamples):
            under "A and B are exchangeable on every impression" each d_i is as likely -d_i; never 0;
        t, p_t: the paired t-test (scipy.stats.ttest_rel); when every d_i is 0 (identical runs), t = 0, p_t = 1.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired_tests needs two equal non-empty [n, M] arrays, got {a.shape} and {b.shape}")
    d = b - a
    n = len(d)
    diff = d.mean(0)
    flip_rng, boot_rng = generators(seed)
    flips = sign_flip_means(d, resamples, flip_rng, chunk)
    # A permutation equal to the observed sign pattern must count: allow for rounding in the two sums.
    tol = 1e-12 * np.maximum(1.0, np.abs(diff))
    p_perm = (1 + (np.abs(flips) >= np.abs(diff) - tol).sum(0)) / (1 + resamples)
    boot = bootstrap_means(d, resamples, boot_rng, chunk)
    alpha = 1 - confidence
    ci_low, ci_high = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    constant = (d == d[:1]).all(0)  # ttest_rel is 0/0 there
    with np.errstate(divide="ignore", invalid="ignore"):
        t = stats.ttest_rel(b, a, axis=0)
    t_stat, p_t = np.asarray(t.statistic, dtype=np.float64), np.asarray(t.pvalue, dtype=np.float64)
    zero = constant & (diff == 0)
    t_stat, p_t = np.where(zero, 0.0, t_stat), np.where(zero, 1.0, p_t)
    return {"diff": diff, "ci_low": ci_low, "ci_high": ci_high, "p_perm": p_perm, "t": t_stat, "p_t": p_t,
            "n": np.full(d.shape[1], n)}


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment: sort the m p-values, multiply the k-th smallest (k from 0) by m - k, carry
    the running maximum so adjusted values never decrease, cap at 1; back in the input order. NaN stays NaN and
    is not counted in m."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


# ----------------------------------------------------------------------------------------------------------
# --mode=compare
# ----------------------------------------------------------------------------------------------------------

def pairs_of(count: int, all_pairs: bool) -> list[tuple[int, int]]:
    """(reference, other) index pairs: each run against the first, or every pair (i < j)."""
    return list(itertools.combinations(range(count), 2)) if all_pairs else [(0, j) for j in range(1, count)]


def compare_runs(runs: Sequence[PerImpression], all_pairs: bool = False, resamples: int = 10_000,
                 seed: int = 0) -> list[dict]:
    """One row per (pair, metric): the pair's means, B - A with interval and p-values, and the Holm-adjusted
    sign-flip p-value over the pairs of that metric (one family per metric). A pair's numbers do not depend on
    the other runs of the table (its resamples come from `seed` alone); only the Holm column does."""
    if len(runs) < 2:
        raise ValueError("--runs needs at least two runs to compare")
    values = align(runs)
    rows = []
    for i, j in pairs_of(len(runs), all_pairs):
        res = paired_tests(values[i], values[j], resamples=resamples, seed=seed)
        for col, key in enumerate(METRIC_KEYS):
            rows.append({"a": runs[i].label, "b": runs[j].label, "metric": key, "impressions": int(res["n"][col]),
                         "mean_a": float(values[i][:, col].mean()), "mean_b": float(values[j][:, col].mean()),
                         **{k: float(res[k][col]) for k in ("diff", "ci_low", "ci_high", "p_perm", "t", "p_t")}})
    for key in METRIC_KEYS:
        family = [r for r in rows if r["metric"] == key]
        for r, adjusted in zip(family, holm([r["p_perm"] for r in family])):
            r["p_holm"] = float(adjusted)
    return rows


def format_p(p: float) -> str:
    if np.isnan(p):
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def compare_tables(runs: Sequence[PerImpression], rows: Sequence[Mapping], resamples: int, seed: int) -> tuple[str, str]:
    """(markdown, tsv) of `compare_runs`: the runs with their means, then one line per pair and metric. Markdown
    in percentage points, TSV in the metrics' own scale at full precision."""
    md = [f"{len(runs)} runs, {rows[0]['impressions'] if rows else 0} impressions scored by all "
          f"({runs[0].meta.get('split')} split of {runs[0].meta.get('dataset')}):", "",
          "| run | seed | file | " + " | ".join(NAMES[k] for k in METRIC_KEYS) + " |", "|---" * 7 + "|"]
    for r in runs:
        means = r.means()
        run_seed = r.meta.get("seed")
        md.append(f"| {r.label} | {'—' if run_seed is None else run_seed} | `{r.path}` | "
                  + " | ".join(f"{100 * means[k]:.2f}" for k in METRIC_KEYS) + " |")
    md += ["", f"B − A in percentage points; 95% paired-bootstrap interval and sign-flip permutation p-value "
           f"({resamples} resamples each, seed {seed}); Holm over the {len(rows) // len(METRIC_KEYS)} comparison(s) "
           f"of each metric; paired t-test beside.", "",
           "| A | B | metric | A | B | B − A | 95% CI | p (sign-flip) | p Holm | p (t-test) |", "|---" * 10 + "|"]
    tsv = ["a\tb\tmetric\timpressions\tmean_a\tmean_b\tdiff\tci_low\tci_high\tp_perm\tp_holm\tt\tp_t\tresamples\tseed"]
    for r in rows:
        md.append(f"| {r['a']} | {r['b']} | {NAMES[r['metric']]} | {100 * r['mean_a']:.2f} | {100 * r['mean_b']:.2f} "
                  f"| {100 * r['diff']:+.2f} | [{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}] "
                  f"| {format_p(r['p_perm'])} | {format_p(r['p_holm'])} | {format_p(r['p_t'])} |")
        tsv.append("\t".join([r["a"], r["b"], r["metric"], str(r["impressions"])]
                             + [repr(r[k]) for k in ("mean_a", "mean_b", "diff", "ci_low", "ci_high", "p_perm",
                                                     "p_holm", "t", "p_t")] + [str(resamples), str(seed)]))
    return "\n".join(md), "\n".join(tsv)


def output_folder(requested: str | None, output_dir, dataset: str, stamp: str) -> Path:
    """Where compare writes: `requested` (refused when it already holds a compare table), else a new
    `<output_dir>/<dataset>/compare/<stamp>[-n]/`, never an existing folder."""
    if requested:
        folder = Path(requested)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"--compare_output {folder} is a file, not a folder; give a folder (compare writes "
                                  f"compare.md and compare.tsv into it and never overwrites a file)")
        if not folder.exists() and folder.suffix.lower() in (".md", ".tsv", ".txt", ".csv", ".json"):
            raise FileExistsError(f"--compare_output {folder} looks like a file name; it is the folder compare writes "
                                  f"compare.md and compare.tsv into: give a folder (e.g. {folder.with_suffix('')})")
        taken = [name for name in ("compare.md", "compare.tsv") if (folder / name).exists()]
        if taken:
            raise FileExistsError(f"--compare_output {folder} already holds {', '.join(taken)}; choose another "
                                  f"folder (compare never overwrites a file)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where a parent folder should be, no permission, ...
            raise FileExistsError(f"--compare_output {folder}: cannot make the folder ({e.strerror}: "
                                  f"{e.filename}); give another folder") from None
        return folder
    base = Path(output_dir) / dataset / "compare"
    base.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        folder = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------------------
# --mode=aggregate: two models paired by seed
# ----------------------------------------------------------------------------------------------------------

def seed_differences(records: Sequence[Mapping]) -> tuple[str, str, list[str]]:
    """For each dataset and each pair of models with at least two seeds in common, the per-seed difference B − A
    of every metric (dev; test where both runs of every shared seed have test metrics): mean ± sample std, the 95%
    t-interval of its mean (`run_records.t_interval`) and the paired t-test p-value over seeds.

    Records are `run_records.collect_runs`' (a model with two runs of one seed: the latest run is used, and noted).
    Returns (markdown, tsv, notes); empty tables when no two models share two seeds."""
    from scipy import stats

    by: dict[tuple[str, str], dict] = {}
    notes = []
    for r in records:
        if "incomplete" in r or r.get("seed") is None:
            continue
        group = r.get("group", r["model"])  # a model's configurations are compared like two models
        seeds = by.setdefault((r["dataset"], group), {})
        if r["seed"] in seeds:
            notes.append(f"{r['dataset']}/{group}: runs {seeds[r['seed']]['run']} and {r['run']} share seed "
                         f"{r['seed']}; the paired-by-seed table uses {r['run']}")
        seeds[r["seed"]] = r  # collect_runs lists runs in ascending order: the latest wins
    md = ["| dataset | A | B | seeds | metric | B − A (mean ± std) | 95% CI | p (paired t over seeds) |",
          "|---" * 8 + "|"]
    tsv = ["dataset\ta\tb\tseeds\tmetric\tdiff_mean\tdiff_std\tci_low\tci_high\tt\tp_t"]
    for (ds, model_a), (ds_b, model_b) in itertools.combinations(sorted(by), 2):
        if ds != ds_b:
            continue
        shared = sorted(set(by[(ds, model_a)]) & set(by[(ds, model_b)]), key=str)
        if len(shared) < 2:
            continue
        ra, rb = [by[(ds, model_a)][s] for s in shared], [by[(ds, model_b)][s] for s in shared]
        splits = ["dev"] + (["test"] if all("test_auc" in r for r in ra + rb) else [])
        for split in splits:
            for key in METRIC_KEYS:
                col = f"{split}_{key}"
                va = np.array([r[col] for r in ra]) * 100
                vb = np.array([r[col] for r in rb]) * 100
                d = vb - va
                low, high = run_records.t_interval(d)
                with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
                    # equal differences over every seed: scipy warns of precision loss; t is ±inf, p 0
                    warnings.simplefilter("ignore", RuntimeWarning)
                    t = stats.ttest_rel(vb, va)
                t_stat, p = (0.0, 1.0) if (d == 0).all() else (float(t.statistic), float(t.pvalue))
                seeds = ",".join(str(s) for s in shared)
                md.append(f"| {ds} | {model_a} | {model_b} | {seeds} | {split} {NAMES[key]} | {d.mean():+.2f} ± "
                          f"{d.std(ddof=1):.2f} | [{low:+.2f}, {high:+.2f}] | {format_p(p)} |")
                tsv.append(f"{ds}\t{model_a}\t{model_b}\t{seeds}\t{col}\t{d.mean():.6f}\t{d.std(ddof=1):.6f}\t"
                           f"{low:.6f}\t{high:.6f}\t{t_stat:.6f}\t{p:.6g}")
    if len(md) == 2:
        return "", "", notes
    return "\n".join(md), "\n".join(tsv), notes
