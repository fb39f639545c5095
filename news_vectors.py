"""Fixed per-news vectors from a file, mapped onto the corpus's news index (what `--news_encoder=Vectors` reads).

The file is a parquet table of two columns: the news id (integer or string; it is matched as text against the
NewsID column of news.tsv, so EB-NeRD's `article_id` 3001234 matches the converted corpus's news `3001234`) and one
list<float> column holding the vector. That is the layout of the artifacts the EB-NeRD organisers publish
(`FacebookAI_xlm_roberta_base/xlm_roberta_base.parquet`: `article_id` and `FacebookAI/xlm-roberta-base`, 768-d);
a MIND user writes one with the NewsIDs (`N12345`) as strings. docs/data.md#precomputed-news-vectors.

Legend: N news of the corpus (row 0: padding), V vector width, R rows of the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from MIND_corpus import CorpusError

FLAG = "--news_vectors"


@dataclass
class VectorTable:
    """vectors [N, V] float32 (a zero row where a news has none), has_vector [N] bool (row 0, padding: False), and
    what the mapping found, for the log line."""

    vectors: np.ndarray
    has_vector: np.ndarray
    path: str
    id_column: str
    vector_column: str
    rows: int  # rows of the file
    unmatched: int  # rows whose id is no news of the corpus (ignored)
    null_vectors: int  # rows without a vector (their news count as without one)

    @property
    def missing(self) -> int:
        """News of the corpus (padding row excluded) without a vector."""
        return int((~self.has_vector[1:]).sum())

    def describe(self) -> str:
        n = len(self.has_vector) - 1
        text = (f"news vectors {self.path} ({self.vector_column!r}, {self.vectors.shape[1]}-d): {n - self.missing} of "
                f"{n} news have one; {self.missing} without one get the learned 'missing' input")
        if self.unmatched:
            text += f"; {self.unmatched} rows for news not in this corpus (ignored)"
        if self.null_vectors:
            text += f"; {self.null_vectors} rows with a null vector (counted as without one)"
        return text


def _columns(schema, path: Path) -> tuple[str, str]:
    """(id column, vector column) of a two-column schema; anything else is an error naming the file."""
    import pyarrow as pa

    def is_vector(t) -> bool:
        return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
            pa.types.is_floating(t.value_type))

    def is_id(t) -> bool:
        return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)

    described = ", ".join(f"{f.name!r} ({f.type})" for f in schema)
    expected = ("a news vector file has two columns: the news id (integer or string) and the vector (a list of "
                "floats), as EB-NeRD's artifacts do")
    if len(schema) != 2:
        raise CorpusError(f"{FLAG}={path}: {len(schema)} columns ({described}); {expected}")
    vec = [f.name for f in schema if is_vector(f.type)]
    ids = [f.name for f in schema if is_id(f.type)]
    if len(vec) != 1 or len(ids) != 1:
        raise CorpusError(f"{FLAG}={path}: columns {described}; {expected}")
    return ids[0], vec[0]


def _read(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir():
        inside = sorted(str(p) for p in path.rglob("*.parquet"))[:3]
        raise CorpusError(f"{FLAG}={path} is a folder; give the parquet file of vectors"
                          + (f" (inside: {', '.join(inside)})" if inside else ""))
    if not path.is_file():
        raise FileNotFoundError(f"{FLAG}={path}: no such file; give a parquet file of news vectors (EB-NeRD's: "
                                f"python prepare_MIND_dataset.py --dataset=ebnerd_<size> --ebnerd_artifact=<folder>)")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{FLAG}={path}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def _flat_vectors(column, path: Path, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """A list<float> column -> (values [R, V] float32, valid [R] bool, width V). Rows of another width than the
    first non-null one, and NaN or infinite values, are errors naming the row (0-based, as pyarrow counts)."""
    import pyarrow.compute as pc

    column = column.combine_chunks()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if not valid.any():
        raise CorpusError(f"{FLAG}={path}: every vector of {name!r} is null")
    width = int(lengths[valid][0])
    bad = np.flatnonzero(valid & (lengths != width))
    if len(bad) or width == 0:
        row = int(bad[0]) if len(bad) else int(np.flatnonzero(valid)[0])
        raise CorpusError(f"{FLAG}={path}: row {row}: a vector of {int(lengths[row])} values, but the first vector "
                          f"has {width}; every vector of {name!r} must have the same number of values (and at least "
                          f"one)")
    flat = pc.list_flatten(column)
    if flat.null_count:
        row = int(np.repeat(np.arange(len(lengths)), lengths)[np.flatnonzero(
            flat.is_null().to_numpy(zero_copy_only=False))[0]])
        raise CorpusError(f"{FLAG}={path}: row {row}: a null value inside the vector; fix or drop that row")
    values = np.zeros((len(valid), width), np.float32)
    values[valid] = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
    finite = np.isfinite(values).all(1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise CorpusError(f"{FLAG}={path}: row {row}: NaN or infinite values in the vector (or beyond float32's "
                          f"range); every score of that news would be NaN: fix or drop that row")
    return values, valid, width


def read_vector_table(path: str | Path, news_ids: Sequence[str]) -> VectorTable:
    """The vectors of `path` for each corpus news (`news_ids[i]`: the NewsID of news index i; index 0 padding).

    An id listed twice and a file whose ids match no news of the corpus are errors (the wrong file, or ids of
    another dataset); rows for news the corpus lacks (the artifacts cover every article of EB-NeRD large) are
    counted and ignored; news without a row, or with a null vector, are counted and get no vector."""
    path = Path(path)
    table = _read(path)
    id_col, vec_col = _columns(table.schema, path)
    if table.num_rows == 0:
        raise CorpusError(f"{FLAG}={path}: no rows (the file is empty)")
    ids_arr = table.column(id_col)
    if ids_arr.null_count:
        row = int(np.flatnonzero(ids_arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise CorpusError(f"{FLAG}={path}: row {row}: {id_col} is null; every row needs a news id")
    ids = np.array([str(v) for v in ids_arr.to_pylist()], dtype=object)
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        rows = np.flatnonzero(ids == dup)[:2].tolist()
        raise CorpusError(f"{FLAG}={path}: news id {dup} appears in rows {rows[0]} and {rows[1]}; one vector per news")
    values, valid, width = _flat_vectors(table.column(vec_col), path, vec_col)
    index = {nid: i for i, nid in enumerate(news_ids) if i > 0}
    pos = np.array([index.get(nid, -1) for nid in ids.tolist()], dtype=np.int64)
    matched = pos >= 0
    if not matched.any():
        sample = ", ".join(ids[:3].tolist())
        corpus = ", ".join(list(news_ids[1:4]))
        raise CorpusError(f"{FLAG}={path}: none of its {len(ids)} news ids ({sample}, ...) is a news of this corpus "
                          f"({corpus}, ...): a vector file of another dataset?")
    vectors = np.zeros((len(news_ids), width), np.float32)
    has = np.zeros(len(news_ids), bool)
    take = matched & valid
    vectors[pos[take]] = values[take]
    has[pos[take]] = True
    return VectorTable(vectors, has, str(path), id_col, vec_col, rows=len(ids), unmatched=int((~matched).sum()),
                       null_vectors=int((~valid).sum()))
