"""EB-NeRD (Ekstra Bladet News Recommendation Dataset, RecSys Challenge 2024) -> the MIND-format corpus.

Files (one bundle per size, unzipped into `<data_dir>/ebnerd_<size>/`): `articles.parquet`, and per split
(`train/`, `validation/`; the separate test set's `test/`) `behaviors.parquet` (one row per impression: the
articles in view, the clicked ones, user, time) and `history.parquet` (one row per user: the clicks before the
split's week, oldest first). Columns and the protocol: docs/data.md#eb-nerd.

Conversion streams: parquet files are read in record batches of `BATCH_ROWS` rows and each batch is written out as
tsv lines before the next is read; what outlives a batch is the article id array, the histories (flat int arrays,
the most recent `HISTORY_KEPT` clicks per user) and the original impression ids. Rows: 0-based, as pyarrow counts.
"""
from __future__ import annotations

import json
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from MIND_corpus import SENTIMENT_FILE, SPLITS, CorpusError, file_signature
from news_data.download import download as fetch_url  # `download` is the converters' switch
from news_data.download import unpack_atomically
from news_data.registry import MARKER, NewsDataset, SkipCounts, clean_text, read_marker, register, up_to_date
from util import atomic_write, replace_dir_atomically

# The organisers' links (given after registering at recsys.eb.dk).
URL = "https://ebnerd-dataset.s3.eu-west-1.amazonaws.com/{bundle}.zip"
ARTIFACT_URL = "https://ebnerd-dataset.s3.eu-west-1.amazonaws.com/artifacts/{folder}.zip"
ARTIFACTS_DIR = "ebnerd_artifacts"  # <data_dir>/ebnerd_artifacts/<folder>/ holds each unzipped artifact
# The organisers' precomputed article vectors: folder -> (parquet stem, vector column, width). Each parquet holds
# `article_id` and that one list<float32> column (the image embeddings' layout is not documented: not listed).
ARTIFACTS = {
    "Ekstra_Bladet_contrastive_vector": ("contrastive_vector", "contrastive_vector", 768),
    "Ekstra_Bladet_word2vec": ("document_vector", "document_vector", 300),
    "google_bert_base_multilingual_cased": ("bert_base_multilingual_cased", "google-bert/bert-base-multilingual-cased",
                                            768),
    "FacebookAI_xlm_roberta_base": ("xlm_roberta_base", "FacebookAI/xlm-roberta-base", 768),
}
BATCH_ROWS = 65_536
HISTORY_KEPT = 100  # most recent history clicks written per impression (--max_history_num keeps up to this many)
DEV_SECONDS = 24 * 3600  # dev = the train week's last day (as the organisers' NRMS example holds out)
IMPRESSION_IDS = "ebnerd_impression_ids.npy"  # per converted split: the original impression_id of row i (id i+1)
BEYOND_ACCURACY = "ebnerd_beyond_accuracy.npy"  # test: is_beyond_accuracy per row (all False where absent)

# column -> kind; what the converter reads (the files hold more; see docs/data.md)
ARTICLE_COLUMNS = {"article_id": "int", "title": "str", "category_str": "str", "subcategory": "list<int>"}  # + the
# --ebnerd_abstract column (ABSTRACT_COLUMNS) and the optional url
BEHAVIOR_COLUMNS = {"impression_id": "int", "user_id": "int", "impression_time": "timestamp",
                    "article_ids_inview": "list<int>"}
LABEL_COLUMN = ("article_ids_clicked", "list<int>")
HISTORY_COLUMNS = {"user_id": "int", "article_id_fixed": "list<int>"}
SENTIMENT_COLUMNS = {"sentiment_score": "float", "sentiment_label": "str"}  # optional: read when both are there
# sentiment_score is the organisers' classifier's confidence in sentiment_label (in [0, 1], never signed), so the
# signed polarity the beyond-accuracy metric reads is +score, -score or 0 by the label.
SENTIMENT_SIGN = {"Positive": 1.0, "Negative": -1.0, "Neutral": 0.0}
ABSTRACT_COLUMNS = ("subtitle", "body")  # --ebnerd_abstract: what becomes news.tsv's Abstract (default the first)
LANGUAGE = "dan"  # ISO 639-3, in the marker: the beyond-accuracy metrics never run VADER's English lexicon on it


# ----------------------------------------------------------------------------------------------------------
# Reading parquet strictly, in batches
# ----------------------------------------------------------------------------------------------------------

def _kind_ok(kind: str, t) -> bool:
    import pyarrow as pa

    if pa.types.is_null(t):  # an all-null column: its rows are checked one by one
        return True
    if kind == "int":
        return pa.types.is_integer(t)
    if kind == "str":
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    if kind == "bool":
        return pa.types.is_boolean(t) or pa.types.is_integer(t)
    if kind == "float":
        return pa.types.is_floating(t)
    if kind == "timestamp":
        return pa.types.is_timestamp(t)
    if kind == "list<int>":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
            pa.types.is_integer(t.value_type) or pa.types.is_null(t.value_type))
    raise AssertionError(kind)


def open_parquet(path: Path, columns: dict[str, str], what: str, optional: Sequence[str] = ()):
    """The ParquetFile, after checking that `columns` are there with the right kinds (errors name file, column and
    fix). `optional` columns are checked only when present."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: EB-NeRD's {what} file (unzip the bundle there, or run "
                                f"python prepare_MIND_dataset.py --dataset=ebnerd_<size>)")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]}); download it again")
    schema = pf.schema_arrow
    for column, kind in columns.items():
        if schema.get_field_index(column) < 0:
            if column in optional:
                continue
            raise CorpusError(f"{path}: column {column!r} is missing (has: {', '.join(schema.names)}); EB-NeRD's "
                              f"{what} file has {', '.join(c for c in columns if c not in optional)}: is it the "
                              f"right file? download the bundle again")
        t = schema.field(column).type
        if not _kind_ok(kind, t):
            raise CorpusError(f"{path}: column {column!r} is {t}, expected {kind}: EB-NeRD's {what} file has "
                              f"{kind} there; download the bundle again or fix the column's type")
    return pf


def iter_batches(pf, columns: Sequence[str], batch_rows: int = BATCH_ROWS) -> Iterator[tuple[int, object]]:
    """(first row, RecordBatch) over the file, `batch_rows` rows at a time."""
    row0 = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
        yield row0, batch
        row0 += batch.num_rows


def _ints(batch, column: str, path: Path, row0: int) -> np.ndarray:
    """[R] int64 of a non-null integer column; a null is an error naming its row."""
    col = batch.column(column)
    if col.null_count:
        row = row0 + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise CorpusError(f"{path}: row {row}: {column} is null; every row needs one (fix or drop that row)")
    return col.to_numpy(zero_copy_only=False).astype(np.int64)


def _lists(batch, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int> column as (lengths [R] int64, flat values [sum] int64); a null list has length 0, a null
    element inside a list is dropped."""
    import pyarrow.compute as pc

    col = batch.column(column)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(col)
    if flat.null_count:
        keep = flat.is_valid().to_numpy(zero_copy_only=False)
        row = np.repeat(np.arange(len(lengths)), lengths)
        lengths = np.bincount(row[keep], minlength=len(lengths)).astype(np.int64)
        flat = flat.filter(flat.is_valid())
    return lengths, flat.to_numpy(zero_copy_only=False).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Articles -> news.tsv
# ----------------------------------------------------------------------------------------------------------

def convert_articles(path: Path, out: Path, batch_rows: int = BATCH_ROWS, abstract: str = "subtitle") -> np.ndarray:
    """Write `out` (MIND news.tsv: id, category_str, first subcategory, title, abstract, url, no entities);
    returns the sorted article ids. The abstract is the `abstract` column (ABSTRACT_COLUMNS: the subtitle, or the
    body); the other columns are not used (docs/data.md#eb-nerd says which and why)."""
    read = {**ARTICLE_COLUMNS, abstract: "str", "url": "str"}
    pf = open_parquet(path, read, "articles", optional=("url",))
    has_url = pf.schema_arrow.get_field_index("url") >= 0
    columns = [*ARTICLE_COLUMNS, abstract, *(["url"] if has_url else [])]
    ids = []
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for row0, b in iter_batches(pf, columns, batch_rows):
            aid = _ints(b, "article_id", path, row0)
            lengths, sub = _lists(b, "subcategory")
            first = np.full(len(aid), -1, dtype=np.int64)
            has = lengths > 0
            first[has] = sub[(np.cumsum(lengths) - lengths)[has]]
            texts = [b.column(c).to_pylist() for c in ("title", abstract, "category_str")]
            urls = b.column("url").to_pylist() if has_url else [None] * len(aid)
            f.writelines(f"{a}\t{clean_text(cat)}\t{'' if s < 0 else s}\t{clean_text(t)}\t{clean_text(st)}\t"
                         f"{clean_text(u)}\t[]\t[]\n"
                         for a, s, t, st, cat, u in zip(aid.tolist(), first.tolist(), *texts, urls))
            ids.append(aid)
    if not ids or not sum(len(a) for a in ids):
        raise CorpusError(f"{path}: no articles (the file is empty); download the bundle again")
    return np.unique(np.concatenate(ids))


def article_sentiment(path: Path, skips: SkipCounts, batch_rows: int = BATCH_ROWS
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """(article ids, signed polarity in [-1, 1]) from articles.parquet's sentiment_label and sentiment_score, or None
    when the file lacks either column. An article whose label is null or not Positive/Negative/Neutral, or whose
    score is null or outside [0, 1], gets no polarity (counted)."""
    pf = open_parquet(path, {"article_id": "int", **SENTIMENT_COLUMNS}, "articles", optional=tuple(SENTIMENT_COLUMNS))
    if not all(pf.schema_arrow.get_field_index(c) >= 0 for c in SENTIMENT_COLUMNS):
        return None
    ids, polarity = [], []
    for row0, b in iter_batches(pf, ["article_id", *SENTIMENT_COLUMNS], batch_rows):
        aid = _ints(b, "article_id", path, row0)
        score = b.column("sentiment_score").to_numpy(zero_copy_only=False).astype(np.float64)  # a null is NaN
        sign = np.array([SENTIMENT_SIGN.get(v, np.nan) for v in b.column("sentiment_label").to_pylist()], np.float64)
        ok = np.isfinite(score) & (score >= 0) & (score <= 1) & np.isfinite(sign)
        skips.add(f"articles of {path.name} without a usable sentiment_label / sentiment_score (no sentiment)",
                  int((~ok).sum()))
        ids.append(aid[ok])
        polarity.append(sign[ok] * score[ok])
    return np.concatenate(ids), np.concatenate(polarity)


def write_sentiment(out: Path, files: Sequence[Path], skips: SkipCounts) -> None:
    """`out` (MIND_corpus.SENTIMENT_FILE): `<article_id>\t<polarity>` per article of `files` (the first file naming
    an article wins); not written when no file has the sentiment columns."""
    seen: dict[int, float] = {}
    for path in files:
        found = article_sentiment(path, skips)
        if found is not None:
            for a, v in zip(*(x.tolist() for x in found)):
                seen.setdefault(a, v)
    if seen:
        out.write_text("".join(f"{a}\t{v:.7g}\n" for a, v in seen.items()), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# History -> per-user click lists
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Histories:
    """Every user's most recent clicks: users [U] int64 sorted, offsets [U+1], values [sum] int32 (oldest first)."""

    users: np.ndarray
    offsets: np.ndarray
    values: np.ndarray

    def texts(self, user_ids: np.ndarray) -> tuple[np.ndarray, int]:
        """[R] object: the history text of each user ('' for a user without a history row) and how many had none."""
        pos = np.clip(np.searchsorted(self.users, user_ids), 0, max(len(self.users) - 1, 0))
        found = (self.users[pos] == user_ids) if len(self.users) else np.zeros(len(user_ids), bool)
        out = np.full(len(user_ids), "", dtype=object)
        uniq, inverse = np.unique(pos[found], return_inverse=True)
        text = np.array([" ".join(map(str, self.values[self.offsets[u]:self.offsets[u + 1]].tolist()))
                         for u in uniq.tolist()], dtype=object)
        out[found] = text[inverse] if len(uniq) else out[found]
        return out, int((~found).sum())


def read_histories(path: Path, kept: int = HISTORY_KEPT, batch_rows: int = BATCH_ROWS) -> Histories:
    pf = open_parquet(path, HISTORY_COLUMNS, "history")
    users, lengths, values = [], [], []
    for row0, b in iter_batches(pf, list(HISTORY_COLUMNS), batch_rows):
        users.append(_ints(b, "user_id", path, row0))
        n, flat = _lists(b, "article_id_fixed")
        keep = np.minimum(n, kept)  # the tail: the most recent clicks
        ends = np.cumsum(n)
        idx = np.repeat(ends - keep, keep) + (np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep))
        lengths.append(keep)
        values.append(flat[idx].astype(np.int32))  # article ids are int32: half the memory of the largest array
    users_a = np.concatenate(users) if users else np.zeros(0, np.int64)
    lengths_a = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    values_a = np.concatenate(values) if values else np.zeros(0, np.int32)
    order = np.argsort(users_a, kind="stable")
    dup = np.flatnonzero(users_a[order][1:] == users_a[order][:-1])
    if len(dup):
        u = users_a[order][dup[0]]
        rows = np.flatnonzero(users_a == u)[:2]
        raise CorpusError(f"{path}: user_id {u} has two rows ({rows[0]} and {rows[1]}); EB-NeRD's history file has "
                          f"one row per user: keep one")
    starts = np.cumsum(lengths_a) - lengths_a
    new_len = lengths_a[order]
    idx = np.repeat(starts[order], new_len) + (np.arange(int(new_len.sum())) - np.repeat(np.cumsum(new_len) - new_len,
                                                                                        new_len))
    return Histories(users_a[order], np.concatenate([[0], np.cumsum(new_len)]), values_a[idx])


# ----------------------------------------------------------------------------------------------------------
# Behaviors -> behaviors.tsv
# ----------------------------------------------------------------------------------------------------------

def _candidate_tokens(flat: np.ndarray, row: np.ndarray, clicked: tuple[np.ndarray, np.ndarray] | None,
                      skips: SkipCounts) -> list[str]:
    """'<id>-<label>' per in-view article (label 1 if it is among the row's clicked ones), or '<id>' unlabelled."""
    if clicked is None:
        return flat.astype(str).tolist()
    c_len, c_flat = clicked
    c_row = np.repeat(np.arange(len(c_len)), c_len)
    shift = np.int64(1) << 32  # article ids are int32
    label = np.isin(row * shift + flat, c_row * shift + c_flat)
    skips.add("clicked articles not in the impression's in-view list (ignored)",
              int((~np.isin(c_row * shift + c_flat, row * shift + flat)).sum()))
    return [f"{a}-{int(y)}" for a, y in zip(flat.tolist(), label.tolist())]


@dataclass
class SplitWriter:
    """One converted split's behaviors.tsv and its original impression ids."""

    folder: Path

    def __post_init__(self):
        self.file = open(self.folder / "behaviors.tsv", "w", encoding="utf-8", newline="\n")
        self.ids: list[np.ndarray] = []
        self.ba: list[np.ndarray] = []
        self.n = 0

    def write(self, users, times, histories, candidates, ids, ba) -> None:
        rows = range(self.n + 1, self.n + 1 + len(users))
        self.file.writelines(f"{r}\t{u}\t{t}\t{h}\t{c}\n" for r, u, t, h, c in
                             zip(rows, users.tolist(), times, histories.tolist(), candidates))
        self.ids.append(ids)
        self.ba.append(ba)
        self.n += len(users)

    def close(self) -> None:
        self.file.close()
        np.save(self.folder / IMPRESSION_IDS, np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64))
        np.save(self.folder / BEYOND_ACCURACY, np.concatenate(self.ba) if self.ba else np.zeros(0, bool))


def convert_behaviors(path: Path, histories: Histories, articles: np.ndarray, writers: dict[str, SplitWriter],
                      route: Callable[[np.ndarray], np.ndarray], labelled: bool, skips: SkipCounts,
                      batch_rows: int = BATCH_ROWS) -> None:
    """Stream one behaviors.parquet into the writers: `route(times)` gives each row's split index (into
    `writers`' order). `labelled`: the clicked column is required (train, validation); the test set has none."""
    import pandas as pd

    pf = open_parquet(path, {**BEHAVIOR_COLUMNS, LABEL_COLUMN[0]: LABEL_COLUMN[1], "is_beyond_accuracy": "bool"},
                      "behaviors", optional=(LABEL_COLUMN[0], "is_beyond_accuracy"))
    names = pf.schema_arrow.names
    if labelled and LABEL_COLUMN[0] not in names:
        raise CorpusError(f"{path}: no {LABEL_COLUMN[0]!r} column, so no labels; the train and validation weeks "
                          f"must have them (train, dev and the labelled test are made from them; only the official "
                          f"test set has none): download the bundle again")
    has_labels = LABEL_COLUMN[0] in names
    has_ba = "is_beyond_accuracy" in names
    columns = [*BEHAVIOR_COLUMNS, *([LABEL_COLUMN[0]] if has_labels else []),
               *(["is_beyond_accuracy"] if has_ba else [])]
    outs = list(writers.values())
    for row0, b in iter_batches(pf, columns, batch_rows):
        ids, users = _ints(b, "impression_id", path, row0), _ints(b, "user_id", path, row0)
        tcol = b.column("impression_time")
        if tcol.null_count:
            row = row0 + int(np.flatnonzero(tcol.is_null().to_numpy(zero_copy_only=False))[0])
            raise CorpusError(f"{path}: row {row}: impression_time is null; every impression has a time (fix or "
                              f"drop that row)")
        times = pd.DatetimeIndex(tcol.to_numpy(zero_copy_only=False).astype("datetime64[ns]"))
        lengths, flat = _lists(b, "article_ids_inview")
        ba = (b.column("is_beyond_accuracy").to_numpy(zero_copy_only=False).astype(bool) if has_ba
              else np.zeros(len(ids), bool))
        empty = lengths == 0
        skips.add(f"impressions with an empty in-view list ({path.parent.name}; skipped)", int(empty.sum()))
        skips.add("in-view articles not in articles.parquet (kept: the corpus reports them)",
                  int((~np.isin(flat, articles)).sum()))
        row = np.repeat(np.arange(len(ids)), lengths)
        tokens = _candidate_tokens(flat, row, _lists(b, LABEL_COLUMN[0]) if has_labels else None, skips)
        bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        candidates = np.array([" ".join(tokens[bounds[i]:bounds[i + 1]]) for i in range(len(ids))], dtype=object)
        hist, without = histories.texts(users)
        skips.add("impressions of users without a history row (empty history)", without)
        time_text = np.array(times.strftime("%m/%d/%Y %I:%M:%S %p"), dtype=object)
        split = route(times.asi8)  # ns since the epoch if len(ids) else np.zeros(0, np.int64)
        for k, writer in enumerate(outs):
            m = (split == k) & ~empty
            if m.any():
                writer.write(users[m], time_text[m].tolist(), hist[m], candidates[m].tolist(), ids[m], ba[m])


def last_day_cutoff(path: Path, seconds: int = DEV_SECONDS) -> int:
    """The impression_time (ns) from which a train-week row goes to dev: the latest time minus `seconds`."""
    pf = open_parquet(path, {"impression_time": "timestamp"}, "behaviors")
    latest = None
    for _, b in iter_batches(pf, ["impression_time"]):
        col = b.column("impression_time").cast("timestamp[ns]")
        t = col.to_numpy(zero_copy_only=False)
        t = t[~np.isnat(t)]
        if len(t):
            latest = t.max() if latest is None else max(latest, t.max())
    if latest is None:
        raise CorpusError(f"{path}: no impressions (the file is empty); download the bundle again")
    return int(latest.astype("datetime64[ns]").astype(np.int64)) - seconds * 10**9


# ----------------------------------------------------------------------------------------------------------
# The registered datasets
# ----------------------------------------------------------------------------------------------------------

class EbnerdDataset(NewsDataset):
    """EB-NeRD: train = the bundle's train week less its last day, dev = that last day, test = the bundle's
    validation week (labelled); `ebnerd_testset`: train/dev as `ebnerd_large`, test = the official test set
    (no labels, beyond-accuracy rows included), whose `predictions.zip` goes to the leaderboard."""

    family = "EB-NeRD"

    def __init__(self, name: str, description: str, bundle: str, test_bundle: str | None = None):
        super().__init__(name, description)
        self.bundle, self.test_bundle = bundle, test_bundle

    def word_vector_note(self, language):
        return ("EB-NeRD's articles are in Danish: GloVe's English vectors fit few of its words; give Danish vectors "
                "as --glove_path (a text file: a word and its values per line, e.g. fastText's cc.da.300.vec without "
                "its first line), or use a PLM news encoder with a multilingual or Danish backbone")

    def raw_files(self, data_dir: Path, download: bool, log: Callable) -> dict[str, Path]:
        base = fetch_bundle(Path(data_dir), self.bundle, download, log)
        files = {"articles": base / "articles.parquet"}
        for split in ("train", "validation"):
            for kind in ("behaviors", "history"):
                files[f"{split}_{kind}"] = base / split / f"{kind}.parquet"
        if self.test_bundle:
            test = fetch_bundle(Path(data_dir), self.test_bundle, download, log)
            files.update(test_articles=test / "articles.parquet", test_behaviors=test / "test" / "behaviors.parquet",
                         test_history=test / "test" / "history.parquet")
        for key, p in files.items():
            if not p.is_file():
                bundle = self.test_bundle if key.startswith("test_") else self.bundle
                raise FileNotFoundError(f"{p} not found (EB-NeRD's {bundle} bundle is incomplete): move "
                                        f"{Path(data_dir) / bundle} away and run this again to unzip {bundle}.zip "
                                        f"(delete the zip too to download it again)")
        return files

    def prepare(self, data_dir, *, download=True, language=None, log=print, abstract: str | None = None) -> Path:
        """`abstract`: the articles' column that becomes the Abstract (ABSTRACT_COLUMNS); None keeps the choice of
        the existing conversion (the subtitle for a new one)."""
        self.check_language(language)
        raw = self.raw_files(Path(data_dir), download, log)
        return self._convert(Path(data_dir), raw, log, self._abstract(data_dir, abstract))

    def ensure(self, data_dir, language=None, log=print) -> Path:
        """As `prepare` without downloading; keeps the existing conversion's --ebnerd_abstract choice."""
        self.check_language(language)
        target = self.corpus_folder(data_dir)
        try:
            raw = self.raw_files(Path(data_dir), download=False, log=log)
        except FileNotFoundError as e:
            if read_marker(target) is not None:
                return target  # converted earlier; the raw files were moved away since
            raise FileNotFoundError(f"{e}. Get EB-NeRD with: python prepare_MIND_dataset.py --dataset={self.name}")
        return self._convert(Path(data_dir), raw, log, self._abstract(data_dir, None))

    def _abstract(self, data_dir, abstract: str | None) -> str:
        if abstract is None:
            abstract = (read_marker(self.corpus_folder(data_dir)) or {}).get("abstract") or ABSTRACT_COLUMNS[0]
        if abstract not in ABSTRACT_COLUMNS:
            raise ValueError(f"--ebnerd_abstract={abstract}: choose from {', '.join(ABSTRACT_COLUMNS)}")
        return abstract

    def _convert(self, data_dir: Path, raw: dict[str, Path], log: Callable, abstract: str) -> Path:
        target = self.corpus_folder(data_dir)
        source = {k: file_signature(p) for k, p in raw.items()}
        if up_to_date(target, self.name, source=source, history_kept=HISTORY_KEPT, language=LANGUAGE,
                      abstract=abstract):
            return target
        t0 = time.time()
        log(f"converting EB-NeRD ({self.name}) into {target} (abstract: the {abstract}) ...")
        replace_dir_atomically(target, lambda tmp: build_corpus(tmp, raw, source, log, abstract))
        log(f"converted {target} in {time.time() - t0:.1f}s")
        return target

    def write_submission(self, root, out_dir, impression_ids, ranks_list) -> dict[str, str]:
        return write_predictions(Path(root) / "test", Path(out_dir), impression_ids, ranks_list)


def build_corpus(tmp: Path, raw: dict[str, Path], source: dict, log: Callable, abstract: str = "subtitle") -> None:
    """train/dev from the train week (dev = its last day), test from validation (or the test set)."""
    skips = SkipCounts()
    for split in SPLITS:
        (tmp / split).mkdir(parents=True)
    articles = convert_articles(raw["articles"], tmp / "train" / "news.tsv", abstract=abstract)
    shutil.copyfile(tmp / "train" / "news.tsv", tmp / "dev" / "news.tsv")
    cutoff = last_day_cutoff(raw["train_behaviors"])
    writers = {s: SplitWriter(tmp / s) for s in ("train", "dev")}
    convert_behaviors(raw["train_behaviors"], read_histories(raw["train_history"]), articles, writers,
                      lambda t: (t >= cutoff).astype(np.int64), labelled=True, skips=skips)
    for w in writers.values():
        w.close()
    test_kind = "test" if "test_behaviors" in raw else "validation"
    if test_kind == "test":
        articles = convert_articles(raw["test_articles"], tmp / "test" / "news.tsv", abstract=abstract)
    else:
        shutil.copyfile(tmp / "train" / "news.tsv", tmp / "test" / "news.tsv")
    test = {"test": SplitWriter(tmp / "test")}
    convert_behaviors(raw[f"{test_kind}_behaviors"], read_histories(raw[f"{test_kind}_history"]), articles, test,
                      lambda t: np.zeros(len(t), np.int64), labelled=test_kind == "validation", skips=skips)
    test["test"].close()
    write_sentiment(tmp / SENTIMENT_FILE, [raw["articles"], *([raw["test_articles"]] if test_kind == "test" else [])],
                    skips)
    counts = {s: int(len(np.load(tmp / s / IMPRESSION_IDS))) for s in SPLITS}
    for split, n in counts.items():
        if n == 0:
            raise CorpusError(f"{tmp.name}: the {split} split got no impressions from "
                              f"{raw['train_behaviors'] if split != 'test' else raw[test_kind + '_behaviors']}"
                              f"; check the file")
    log(f"EB-NeRD: {counts['train']} train, {counts['dev']} dev, {counts['test']} test impressions ({test_kind}); "
        f"{skips.describe()}")
    (tmp / MARKER).write_text(json.dumps({"source": source, "impressions": counts, "skipped": skips.counts,
                                          "history_kept": HISTORY_KEPT, "test": test_kind, "language": LANGUAGE,
                                          "abstract": abstract},
                                         sort_keys=True) + "\n")


def _ensure_zip(zip_path: Path, url: str, download: bool, log: Callable, missing: str, hint: str) -> None:
    """`zip_path` as the organisers publish it: there already, or downloaded from `url` when `download` (else a
    FileNotFoundError saying `missing`); then says it is unzipping it."""
    if not zip_path.is_file():
        if not download:
            raise FileNotFoundError(missing)
        log(f"downloading {url} ...")
        fetch_url(url, zip_path, log=log, hint=hint)
    log(f"unzipping {zip_path} ...")


def fetch_bundle(data_dir: Path, bundle: str, download: bool, log: Callable) -> Path:
    """`<data_dir>/<bundle>/` with articles.parquet (or the test set's test/ folder), unzipped from
    `<data_dir>/<bundle>.zip` (downloaded first with `download`) when missing."""
    folder = data_dir / bundle
    if (folder / "articles.parquet").is_file():
        return folder
    nested = folder / bundle  # a zip whose members start with the bundle's folder
    if (nested / "articles.parquet").is_file():
        return nested
    if folder.exists():  # the user's files, or a half unzip by hand: never unzipped over
        raise FileExistsError(f"{folder} exists but holds no articles.parquet (nor {nested.name}/articles.parquet): "
                              f"unzip EB-NeRD's {bundle}.zip there completely, or move the folder away and run this "
                              f"again to unzip it")
    zip_path = data_dir / f"{bundle}.zip"
    _ensure_zip(zip_path, URL.format(bundle=bundle), download, log,
                missing=f"{folder / 'articles.parquet'} not found, nor {zip_path}: put EB-NeRD's {bundle}.zip "
                        f"(recsys.eb.dk) in {data_dir}",
                hint=f"Put EB-NeRD's {bundle}.zip (recsys.eb.dk) in {data_dir} yourself.")
    return unpack_atomically(zip_path, folder)


def artifact_folder(data_dir: str | Path, folder: str) -> Path:
    return Path(data_dir) / ARTIFACTS_DIR / folder


def _artifact_parquet(folder: Path, stem: str) -> Path | None:
    found = sorted(folder.rglob("*.parquet"))
    named = [p for p in found if p.stem == stem]
    return (named or found or [None])[0]


def fetch_artifact(data_dir: str | Path, folder: str, download_missing: bool = True, log: Callable = print) -> Path:
    """The parquet of one of the organisers' article-vector artifacts (`ARTIFACTS`), unzipped into
    `<data_dir>/ebnerd_artifacts/<folder>/` from `<folder>.zip` beside it (downloaded first when missing and
    `download_missing`). Its vectors feed --news_encoder=Vectors --news_vectors=<the parquet>."""
    if folder not in ARTIFACTS:
        raise ValueError(f"--ebnerd_artifact={folder}: not one of EB-NeRD's article-vector artifacts; choose from "
                         f"{', '.join(ARTIFACTS)}")
    out = artifact_folder(data_dir, folder)
    stem = ARTIFACTS[folder][0]
    if out.is_dir() and (found := _artifact_parquet(out, stem)) is not None:
        return found
    if out.exists():  # something else is there: never replaced
        raise FileExistsError(f"{out} exists but holds no .parquet file: move it away, then run this again")
    zip_path = out.with_name(f"{folder}.zip")
    _ensure_zip(zip_path, ARTIFACT_URL.format(folder=folder), download_missing, log,
                missing=f"{zip_path} not found (nor {out}/{stem}.parquet): put EB-NeRD's artifact "
                        f"artifacts/{folder}.zip (recsys.eb.dk) there, or drop --no-download",
                hint=f"Put EB-NeRD's artifacts/{folder}.zip (recsys.eb.dk) in {zip_path.parent} yourself.")
    unpack_atomically(zip_path, out)
    found = _artifact_parquet(out, stem)
    if found is None:
        raise CorpusError(f"{zip_path}: no .parquet file inside; download it again")
    return found


def write_predictions(test_dir: Path, out_dir: Path, impression_ids: Sequence[int],
                      ranks_list: Sequence[Sequence[int]]) -> dict[str, str]:
    """EB-NeRD's submission: `predictions.txt` (`<impression_id> [r1,r2,...]`, one line per test row in the test
    file's order; beyond-accuracy rows all have impression_id 0, hence the order, not the id, says which is which),
    zipped alone as `predictions.zip`."""
    from scorer import format_prediction_line

    original = np.load(test_dir / IMPRESSION_IDS)
    rows = np.asarray(impression_ids, dtype=np.int64) - 1  # converted ImpressionID = row + 1
    if len(rows) != len(original) or not np.array_equal(np.sort(rows), np.arange(len(original))):
        raise ValueError(f"{len(rows)} ranked impressions do not match the {len(original)} rows of "
                         f"{test_dir / 'behaviors.tsv'}: the EB-NeRD submission needs every test row once")
    order = np.argsort(rows, kind="stable")
    lines = [format_prediction_line(int(original[rows[i]]), ranks_list[i]) for i in order.tolist()]
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    txt, zpath = out_dir / "predictions.txt", out_dir / "predictions.zip"
    atomic_write(txt, lambda tmp: Path(tmp).write_bytes(text))

    def write_zip(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("predictions.txt", text)
    atomic_write(zpath, write_zip)
    return {"submission": str(zpath)}


for _size, _text in (("demo", "EB-NeRD demo (~5k users)"), ("small", "EB-NeRD small (~50k users)"),
                     ("large", "EB-NeRD large (~1M users)")):
    register(EbnerdDataset(f"ebnerd_{_size}", _text, f"ebnerd_{_size}"))
register(EbnerdDataset("ebnerd_testset", "EB-NeRD large + the official test set (leaderboard)", "ebnerd_large",
                       "ebnerd_testset"))
