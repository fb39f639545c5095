"""Run records and results over runs: train_log.jsonl, environment.json, TensorBoard, curves.png, the explain
picture, and the mean ± std (with t intervals) of every model's runs for --mode=aggregate."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scorer import METRIC_KEYS, criterion_value
from util import write_lines_atomic


def collect_runs(output_dir, dataset: str | None = None) -> list[dict]:
    """One record per run folder `<output_dir>/<dataset>/<model>/#<n>/` that has a dev log: dataset, model,
    run, seed, the best epoch's dev metrics by the run's own `--dev_criterion`, and the test metrics if
    `--mode=test` was run on it with labels. Runs without a finished epoch are counted as incomplete."""
    import json

    records, incomplete = [], []
    root = Path(output_dir)
    datasets = [root / dataset] if dataset else sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []
    for ds in datasets:
        for model_dir in sorted(p for p in ds.iterdir() if p.is_dir()) if ds.exists() else []:
            for run in sorted((p for p in model_dir.iterdir() if p.name.startswith("#")),
                              key=lambda p: int(p.name[1:]) if p.name[1:].isdigit() else 0):
                log, cfg_path = run / "dev_log.jsonl", run / "config.json"
                lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
                lines = [r for r in lines if all(k in r for k in METRIC_KEYS)]
                if not lines or not cfg_path.exists():
                    incomplete.append(str(run))
                    continue
                cfg = json.loads(cfg_path.read_text())
                criterion = cfg.get("dev_criterion", "avg")
                best = max(lines, key=lambda r: criterion_value(r, criterion))
                rec = {"dataset": ds.name, "model": model_dir.name, "run": run.name, "seed": cfg.get("seed"),
                       "best_epoch": best.get("epoch"), **{f"dev_{k}": float(best[k]) for k in METRIC_KEYS},
                       "configuration": configuration(cfg)}
                test = run / "test" / "metrics.json"
                if test.exists():
                    m = json.loads(test.read_text()).get("metrics", {})
                    if m.get("labelled") and all(k in m for k in METRIC_KEYS):
                        rec.update({f"test_{k}": float(m[k]) for k in METRIC_KEYS})
                records.append(rec)
    label_configurations(records)
    return records if not incomplete else records + [{"incomplete": r} for r in incomplete]


# Settings of a run's config.json that do not make it another experiment: the seed (runs over seeds are what the
# mean ± std is taken over), where files are read and written, and how the run was run or shown (device, processes,
# progress, logging, the evaluation batch, torch.compile), plus the flags of the other modes.
NOT_CONFIGURATION = frozenset({
    "seed", "seeds", "output_dir", "data_dir", "cache_dir", "config_file", "resume", "mode", "device", "num_workers",
    "progress", "log_every", "tensorboard", "plot", "dist_timeout", "find_unused_parameters", "eval_batch_size",
    "compile", "dev_model_path", "test_model_path", "impression_id", "explain_output", "runs", "split", "all_pairs",
    "resamples", "compare_output"})


def configuration(config: Mapping) -> dict:
    """What makes runs one experiment: a run's config.json less `NOT_CONFIGURATION`."""
    return {k: v for k, v in config.items() if k not in NOT_CONFIGURATION}


def _text(value) -> str:
    return "(not recorded)" if value is _MISSING else json.dumps(value) if not isinstance(value, str) else value


_MISSING = object()


def label_configurations(records: list[dict]) -> dict[tuple[str, str], list[str]]:
    """Give each record its `group`: the model name, or, where runs of one dataset and model differ in their
    configuration, the model name plus the settings that tell its configurations apart (`model [lr=0.001]`).
    Returns {(dataset, model): the differing settings} for the models with several configurations."""
    by: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by.setdefault((r["dataset"], r["model"]), []).append(r)
    differing = {}
    for key, runs in by.items():
        names = sorted({k for r in runs for k in r.get("configuration", {})})
        diff = [k for k in names if len({_text(r["configuration"].get(k, _MISSING)) for r in runs}) > 1]
        for r in runs:
            cfg = r.get("configuration", {})
            r["group"] = key[1] + (" [" + ", ".join(f"{k}={_text(cfg.get(k, _MISSING))}" for k in diff) + "]"
                                   if diff else "")
        if diff:
            differing[key] = diff
    return differing


def t_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the mean of `values` (e.g. one model's runs over seeds): mean ± t * s / sqrt(n),
    t the `(1 + confidence) / 2` quantile of Student's t with n - 1 degrees of freedom (scipy.stats.t), s the
    sample std. (nan, nan) for fewer than two values."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / np.sqrt(n)
    return float(values.mean() - half), float(values.mean() + half)


def aggregate_runs(records: Sequence[Mapping]) -> tuple[str, str]:
    """Records of `collect_runs` -> (markdown, tsv): per dataset and configuration (`group`: the model name, plus
    the settings that tell its configurations apart where runs of one model differ), the number of runs and mean
    ± std (sample std, ddof=1) of each dev metric, and of each test metric where every run has one, with the 95%
    t-interval of the mean over runs (`t_interval`). A single run has no spread: its cell says `(n=1)` and the
    TSV leaves std and interval empty. Metrics in percent, as in papers."""
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for r in records:
        if "incomplete" not in r:
            groups.setdefault((r["dataset"], r.get("group", r["model"])), []).append(r)
    splits = ["dev"] + (["test"] if any("test_auc" in r for r in records) else [])
    cols = [f"{s}_{k}" for s in splits for k in METRIC_KEYS]
    names = {"auc": "AUC", "mrr": "MRR", "ndcg5": "nDCG@5", "ndcg10": "nDCG@10"}
    head = [f"{s} {names[k]}" for s in splits for k in METRIC_KEYS]
    md = ["| dataset | model | runs | seeds | " + " | ".join(head) + " |", "|---" * (4 + len(head)) + "|"]
    tsv = ["dataset\tmodel\truns\tseeds\t" + "\t".join(f"{c}_mean\t{c}_std\t{c}_ci_low\t{c}_ci_high" for c in cols)]
    for (ds, model), runs in sorted(groups.items()):
        cells_md, cells_tsv = [], []
        for c in cols:
            values = np.array([r[c] for r in runs if c in r], dtype=np.float64) * 100
            if len(values) < len(runs):  # a metric some runs lack is not averaged over the others
                cells_md.append("—")
                cells_tsv.append("\t\t\t")
                continue
            mean = values.mean()
            if len(values) == 1:  # one run: no spread to print (a "± 0.00" would claim one)
                cells_md.append(f"{mean:.2f} (n=1)")
                cells_tsv.append(f"{mean:.6f}\t\t\t")
                continue
            std = values.std(ddof=1)
            low, high = t_interval(values)
            cells_md.append(f"{mean:.2f} ± {std:.2f} [{low:.2f}, {high:.2f}]")
            cells_tsv.append(f"{mean:.6f}\t{std:.6f}\t{low:.6f}\t{high:.6f}")
        seeds = ",".join(str(r.get("seed")) for r in runs)
        md.append(f"| {ds} | {model} | {len(runs)} | {seeds} | " + " | ".join(cells_md) + " |")
        tsv.append(f"{ds}\t{model}\t{len(runs)}\t{seeds}\t" + "\t".join(cells_tsv))
    return "\n".join(md), "\n".join(tsv)


TRAIN_LOG = "train_log.jsonl"  # one JSON object a line: {"kind": "step" | "epoch", ...}


ENVIRONMENT = "environment.json"


CURVES = "curves.png"


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def git_commit(folder) -> dict:
    """{"commit": sha, "dirty": bool} of the git checkout holding `folder`, or {} outside git / without git."""
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=10)
        return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def environment_info(device=None, world_size: int = 1, amp: str = "off", argv: Sequence[str] | None = None) -> dict:
    """What a run ran on: versions, device, processes, git commit of this code, command line."""
    import platform
    import socket
    import sys
    import time

    import torch

    info: dict = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "numpy": np.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "device": str(device) if device is not None else None, "world_size": world_size, "amp": amp,
        "cpu_threads": torch.get_num_threads(), "argv": list(sys.argv if argv is None else argv),
    }
    for name in ("transformers", "pandas", "tensorboard"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device is not None and getattr(device, "type", None) == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    info["git"] = git_commit(Path(__file__).resolve().parent)
    return info


class RunRecorder:
    """The records of one training run (rank 0 only): `train_log.jsonl` (appended, so a resumed run continues
    it), `environment.json`, and TensorBoard scalars under `<run>/tensorboard` when enabled.

    Args:
        run_dir: the run folder.
        tensorboard: True / False, or None = on when the package is installed.
        resumed_step: for a resumed run, the optimizer step it resumes at: the log keeps the records up to it, and
            the environment is written beside the first one.
    """

    def __init__(self, run_dir, tensorboard: bool | None = None, resumed_step: int | None = None, log=print):
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / TRAIN_LOG
        if resumed_step is None:
            self.log_path.unlink(missing_ok=True)
        elif self.log_path.exists():
            # Records written after the saved state (the interrupted epoch's steps) are redone by the resumed run.
            kept = [r for r in read_jsonl(self.log_path) if r.get("step", 0) <= resumed_step]
            import json

            write_lines_atomic(self.log_path, [json.dumps(r) for r in kept])
        if tensorboard is None:
            tensorboard = tensorboard_available()
        elif tensorboard and not tensorboard_available():
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or drop the flag: it is on by default only when the package is installed)")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            log(f"TensorBoard: tensorboard --logdir {self.run_dir / 'tensorboard'}")

    def write_environment(self, info: dict) -> Path:
        path = self.run_dir / ENVIRONMENT
        if path.exists():  # a resumed run: keep the first, add this one beside it
            n = 1
            while (self.run_dir / f"environment.resume{n}.json").exists():
                n += 1
            path = self.run_dir / f"environment.resume{n}.json"
        import json

        path.write_text(json.dumps(info, indent=2, default=str))
        return path

    def write(self, record: dict) -> None:
        """Append one record (a line of JSON) and mirror its numbers to TensorBoard at its `step`."""
        import json

        with open(self.log_path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.writer is None:
            return
        step = int(record.get("step", 0))
        prefix = "train" if record.get("kind") == "step" else "epoch"
        for key, value in record.items():
            if key in ("kind", "step", "epoch", "time"):
                continue
            if isinstance(value, Mapping):
                for sub, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.writer.add_scalar(f"{prefix}/{key}/{sub}", v, step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                group = "dev" if key in METRIC_KEYS or key == "criterion" else prefix
                self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_jsonl(path) -> list[dict]:
    import json

    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir, out=None) -> Path:
    """`<run>/curves.png`: the training loss (each logged step and each epoch's mean, with auxiliary losses) and
    the dev metrics per epoch, from train_log.jsonl (dev_log.jsonl when a run predates it)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / TRAIN_LOG)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"] or read_jsonl(run_dir / "dev_log.jsonl")
    if not epochs and not steps:
        raise FileNotFoundError(f"{run_dir}: no {TRAIN_LOG} or dev_log.jsonl records to plot")
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 3.6))
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6, label="loss (logged steps)")
        for name in sorted({k for r in steps for k in r.get("aux", {})}):
            pts = [(r["step"], r["aux"][name]) for r in steps if name in r.get("aux", {})]
            ax_loss.plot(*zip(*pts), lw=1, ls="--", label=name)
    with_step = [r for r in epochs if "step" in r]
    if with_step:
        ax_loss.plot([r["step"] for r in with_step], [r["train_loss"] for r in with_step], "o-", label="epoch mean")
        ax_loss.set_xlabel("optimizer step")
    elif epochs:
        ax_loss.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="epoch mean")
        ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=7)
    ax_loss.grid(alpha=0.3)
    names = {"auc": "AUC", "mrr": "MRR", "ndcg5": "nDCG@5", "ndcg10": "nDCG@10"}
    for key in METRIC_KEYS:
        pts = [(r["epoch"], r[key]) for r in epochs if key in r]
        if pts:
            ax_dev.plot(*zip(*pts), "o-", label=names[key])
    ax_dev.set_xlabel("epoch")
    ax_dev.set_title("dev metrics")
    if epochs:
        ax_dev.set_xticks([r["epoch"] for r in epochs])
    if ax_dev.lines:  # a pretraining run has no dev metrics
        ax_dev.legend(fontsize=7)
    ax_dev.grid(alpha=0.3)
    fig.suptitle(run_dir.parent.name + " " + run_dir.name, fontsize=9)
    fig.tight_layout()
    out = Path(out) if out else run_dir / CURVES
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _short(text: str, n: int = 42) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _word_panel(ax, items: list[dict], title: str) -> None:
    """Rows = news, cells = their tokens coloured by attention weight (the words written in the cells)."""
    import matplotlib.pyplot as plt

    if not items:  # an impression with an empty history: nothing to draw (an empty image warns in matplotlib)
        _empty_panel(ax, title)
        return
    width = max((len(it.get("tokens", [])) for it in items), default=1) or 1
    grid = np.full((len(items), width), np.nan)
    for r, it in enumerate(items):
        w = it.get("weights", [])
        grid[r, : len(w)] = w
    ax.imshow(grid, aspect="auto", cmap=plt.cm.Oranges, vmin=0, vmax=np.nanmax(grid) if np.isfinite(grid).any() else 1)
    for r, it in enumerate(items):
        for j, token in enumerate(it.get("tokens", [])):
            ax.text(j, r, _short(token, 12), ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([it.get("row_label", "") for it in items], fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9, loc="left")


def _empty_panel(ax, title: str) -> None:
    ax.text(0.5, 0.5, "empty history: this impression's user has no clicked news to show", ha="center",
            va="center", fontsize=8, transform=ax.transAxes)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, loc="left")


def plot_explanation(data: Mapping, out, max_history: int = 12, max_candidates: int = 12) -> Path:
    """Draw `explain_mode.explain_impression`'s result: word attention over the most recent clicked titles and over the
    candidates (clicked ones first), then each attention map of the user encoder with its axes labelled by
    titles. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = list(data["history"])
    shown_h = list(range(max(0, len(history) - max_history), len(history)))  # the most recent clicks
    cands = list(data["candidates"])
    order = sorted(range(len(cands)), key=lambda j: (-cands[j]["label"], -cands[j]["score"]))[:max_candidates]
    hist_rows = [{**history[p], "row_label": f"h{p + 1}"} for p in shown_h]
    cand_rows = [{**cands[j], "row_label": f"{'✓ ' if cands[j]['label'] == 1 else ''}c{j + 1} {cands[j]['score']:+.2f}"}
                 for j in order]
    maps = data.get("user_attention", {})
    has_words = any("weights" in it for it in history + cands)
    panels = (2 if has_words else 0) + len(maps)
    heights = ([max(2.0, 0.28 * len(hist_rows) + 0.8), max(2.0, 0.28 * len(cand_rows) + 0.8)] if has_words else [])
    for m in maps.values():
        shape = np.asarray(m["weights"]).shape
        heights.append(2.2 if len(shape) == 1 else max(2.2, 0.22 * min(shape[0], 40) + 1.6))
    # constrained layout: each panel gets the room its own labels need (tight_layout gives all the largest gap)
    fig, axes = plt.subplots(panels or 1, 1, figsize=(13, sum(heights) + 1.2 if heights else 3), layout="constrained",
                             gridspec_kw={"height_ratios": heights} if heights else None, squeeze=False)
    axes = list(axes[:, 0])
    if has_words:
        _word_panel(axes.pop(0), hist_rows, f"word attention over the {len(hist_rows)} most recent clicked titles "
                    f"(of {len(history)}), newest last [{data.get('word_attention')}]")
        _word_panel(axes.pop(0), cand_rows, "word attention over the candidates (✓ clicked; model score)")

    def labels_for(axis: str, n: int) -> list[str]:
        if axis == "history":
            return [f"h{p + 1} {_short(history[p]['title'], 30)}" for p in range(n)]
        if axis == "candidate":
            return [f"{'✓ ' if cands[j]['label'] == 1 else ''}c{j + 1} {_short(cands[j]['title'], 30)}" for j in range(n)]
        return [f"{axis} {k + 1}" for k in range(n)]

    for name, m in maps.items():
        ax = axes.pop(0)
        w, ax_names = np.asarray(m["weights"], dtype=float), list(m["axes"])
        if w.size == 0:  # attention over an empty history
            _empty_panel(ax, f"user encoder: {name} ({' x '.join(m['axes'])})")
            continue
        note = ""
        if w.ndim > 2 and "candidate" in ax_names:
            # One candidate's view: the clicked candidate the model scores highest (else the top-scored one).
            pick = order[0] if order else 0
            w = np.take(w, pick, axis=ax_names.index("candidate"))
            ax_names.remove("candidate")
            note = f" for candidate c{pick + 1}"
        if w.ndim == 1:
            ax.bar(range(len(w)), w, color="tab:orange")
            ax.set_xticks(range(len(w)))
            ax.set_xticklabels(labels_for(ax_names[0], len(w)), rotation=75, ha="right", fontsize=6)
            ax.set_ylabel("weight", fontsize=7)
        else:
            # Rows: interests / archives / candidates / clusters; columns: history when present.
            if "history" in ax_names and ax_names.index("history") == 0:
                w, ax_names = w.T, ax_names[::-1]
            im = ax.imshow(w, aspect="auto", cmap="viridis")
            fig.colorbar(im, ax=ax, fraction=0.02, pad=0.005)
            ax.set_yticks(range(w.shape[0]))
            ax.set_yticklabels(labels_for(ax_names[0], w.shape[0]), fontsize=6 if w.shape[0] <= 40 else 4)
            ax.set_xticks(range(w.shape[1]))
            ax.set_xticklabels(labels_for(ax_names[1], w.shape[1]), rotation=75, ha="right", fontsize=6)
        ax.set_title(f"user encoder: {name} ({' x '.join(m['axes'])}){note}", fontsize=9, loc="left")
    fig.suptitle(f"{data['model']}: {data['split']} impression {data['impression_id']}", fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
