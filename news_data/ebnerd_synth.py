"""A synthetic corpus in EB-NeRD's real file format (this project's code; no Ekstra Bladet rows), for the tests and
bench/ebnerd_scale.py: `articles.parquet`, `train/` and `validation/` `{behaviors,history}.parquet` with the
organisers' column names and dtypes, and optionally the test set (`test/`, no click columns, beyond-accuracy rows
with impression_id 0 sharing one in-view list), and an article-vector artifact in the organisers' layout
(`write_artifact`).

Users prefer one category; an impression shows `inview` random articles with one article of that category at a
random place, clicked with probability 0.8 (else a random one), and a second click now and then (EB-NeRD
impressions may have several). Titles draw words from a per-category pool, so a text model can learn. Rows are
made and written `WRITE_ROWS` at a time, so a million impressions need no more memory than a few thousand.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

WRITE_ROWS = 200_000
START = np.datetime64("2023-05-18T07:00:00", "us")  # the train week; history before it, validation/test after
WEEK = np.timedelta64(7 * 24 * 3600 * 10**6, "us")
CATEGORIES = ["nyheder", "sport", "underholdning", "krimi", "penge", "musik", "forbrug", "nationen"]
WORDS = ["kamp", "mål", "regering", "politi", "koncert", "skat", "bolig", "valg", "storm", "børn", "film", "pris",
         "sæson", "retten", "hjælp", "rekord", "fest", "ulykke", "aftale", "sommer", "bank", "sanger", "landshold",
         "kongehuset", "trafik", "læge", "skole", "vejret", "aktie", "liga", "dom", "brand"]


def _list_array(lengths: np.ndarray, values: np.ndarray, value_type):
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def write_articles(path: Path, n: int, rng: np.random.Generator) -> np.ndarray:
    """articles.parquet with EB-NeRD's 21 columns; returns each article's category index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cat = rng.integers(0, len(CATEGORIES), n)
    ids = np.arange(3_000_000, 3_000_000 + n, dtype=np.int32)
    per_cat = [WORDS[i::len(CATEGORIES)] + WORDS[(i + 3) % 8::len(CATEGORIES)] for i in range(len(CATEGORIES))]
    titles = [" ".join(rng.choice(per_cat[c], 5)).capitalize() for c in cat.tolist()]
    subtitles = [" ".join(rng.choice(WORDS, 8)) + "." for _ in range(n)]
    t = START - WEEK * 3 + (rng.integers(0, 4 * 7 * 24 * 3600, n) * 10**6).astype("timedelta64[us]")
    ones = np.ones(n, np.int64)
    table = pa.table({
        "article_id": pa.array(ids, pa.int32()), "title": titles, "subtitle": subtitles,
        "last_modified_time": pa.array(t, pa.timestamp("us")), "premium": pa.array(rng.random(n) < 0.2),
        "body": [s * 3 for s in subtitles], "published_time": pa.array(t, pa.timestamp("us")),
        "image_ids": _list_array(ones, rng.integers(1, 10**7, n), pa.int64()),
        "article_type": ["article_default"] * n, "url": [f"https://ekstrabladet.dk/a/{i}" for i in ids.tolist()],
        "ner_clusters": _list_array(ones, np.array(WORDS, dtype=object)[rng.integers(0, len(WORDS), n)], pa.string()),
        "entity_groups": _list_array(ones, np.array(["PER", "ORG", "LOC"], dtype=object)[rng.integers(0, 3, n)],
                                     pa.string()),
        "topics": _list_array(ones, np.array(CATEGORIES, dtype=object)[cat], pa.string()),
        "category": pa.array((cat + 100).astype(np.int16), pa.int16()),
        "subcategory": _list_array(ones, (cat * 10 + 200 + rng.integers(0, 3, n)).astype(np.int16), pa.int16()),
        "category_str": [CATEGORIES[c] for c in cat.tolist()],
        "total_inviews": pa.array(rng.integers(0, 10**5, n).astype(np.int32), pa.int32()),
        "total_pageviews": pa.array(rng.integers(0, 10**4, n).astype(np.int32), pa.int32()),
        "total_read_time": pa.array(rng.random(n).astype(np.float32) * 1000, pa.float32()),
        "sentiment_score": pa.array(rng.random(n).astype(np.float32), pa.float32()),
        "sentiment_label": np.array(["Negative", "Neutral", "Positive"], dtype=object)[rng.integers(0, 3, n)].tolist(),
    })
    pq.write_table(table, path)
    return cat


def write_history(path: Path, users: np.ndarray, pref: np.ndarray, by_cat: list[np.ndarray], n_articles: int,
                  rng: np.random.Generator, max_len: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lengths = rng.integers(1, max_len + 1, len(users))
    total = int(lengths.sum())
    row = np.repeat(np.arange(len(users)), lengths)
    counts = np.array([len(c) for c in by_cat])
    cat = pref[row]
    own = np.concatenate(by_cat)[(np.cumsum(counts) - counts)[cat] + (rng.random(total) * counts[cat]).astype(np.int64)]
    values = np.where(rng.random(total) < 0.7, own, rng.integers(0, n_articles, total)) + 3_000_000
    times = START - WEEK * 3 + np.sort(rng.integers(0, 21 * 24 * 3600, total)) * np.timedelta64(1, "s")
    pq.write_table(pa.table({
        "user_id": pa.array(users.astype(np.uint32), pa.uint32()),
        "impression_time_fixed": _list_array(lengths, times.astype("datetime64[us]"), pa.timestamp("us")),
        "scroll_percentage_fixed": _list_array(lengths, rng.random(total).astype(np.float32) * 100, pa.float32()),
        "article_id_fixed": _list_array(lengths, values.astype(np.int32), pa.int32()),
        "read_time_fixed": _list_array(lengths, rng.random(total).astype(np.float32) * 60, pa.float32()),
    }), path)


def _behavior_rows(n: int, first_id: int, start, users, pref, by_cat, n_articles, rng, inview: tuple[int, int],
                   test: bool) -> dict:
    import pyarrow as pa

    u = rng.integers(0, len(users), n)
    lengths = rng.integers(inview[0], inview[1] + 1, n)
    total = int(lengths.sum())
    values = rng.integers(0, n_articles, total)
    first = np.cumsum(lengths) - lengths
    place = first + (rng.random(n) * lengths).astype(np.int64)
    counts = np.array([len(c) for c in by_cat])
    cat = pref[u]
    offs = np.cumsum(counts) - counts
    flat_by_cat = np.concatenate(by_cat)
    values[place] = flat_by_cat[offs[cat] + (rng.random(n) * counts[cat]).astype(np.int64)]
    clicked = np.where(rng.random(n) < 0.8, place, first + (rng.random(n) * lengths).astype(np.int64))
    second = (rng.random(n) < 0.1) & (lengths > 1)
    other = first + (clicked - first + 1) % lengths
    c_len = 1 + second.astype(np.int64)
    c_vals = np.empty(int(c_len.sum()), np.int64)
    c_first = np.cumsum(c_len) - c_len
    c_vals[c_first] = values[clicked]
    c_vals[c_first[second] + 1] = values[other[second]]
    times = start + np.sort(rng.integers(0, 7 * 24 * 3600, n)) * np.timedelta64(1, "s")
    cols = {"impression_id": pa.array(np.arange(first_id, first_id + n).astype(np.uint32), pa.uint32()),
            "article_id": pa.array(np.where(rng.random(n) < 0.5, values[clicked] + 3_000_000, 0).astype(np.int32),
                                   pa.int32(), mask=rng.random(n) < 0.5),
            "impression_time": pa.array(times.astype("datetime64[us]"), pa.timestamp("us")),
            "read_time": pa.array(rng.random(n).astype(np.float32) * 60, pa.float32()),
            "scroll_percentage": pa.array(rng.random(n).astype(np.float32) * 100, pa.float32()),
            "device_type": pa.array(rng.integers(1, 4, n).astype(np.int8), pa.int8()),
            "article_ids_inview": _list_array(lengths, (values + 3_000_000).astype(np.int32), pa.int32()),
            "article_ids_clicked": _list_array(c_len, (c_vals + 3_000_000).astype(np.int32), pa.int32()),
            "user_id": pa.array(users[u].astype(np.uint32), pa.uint32()),
            "is_sso_user": pa.array(rng.random(n) < 0.5), "gender": pa.array(rng.integers(0, 2, n).astype(np.int8)),
            "postcode": pa.array(rng.integers(0, 5, n).astype(np.int8)),
            "age": pa.array((rng.integers(2, 9, n) * 10).astype(np.int8)),
            "is_subscriber": pa.array(rng.random(n) < 0.3),
            "session_id": pa.array(rng.integers(1, 10**6, n).astype(np.uint32), pa.uint32()),
            "next_read_time": pa.array(rng.random(n).astype(np.float32) * 60, pa.float32()),
            "next_scroll_percentage": pa.array(rng.random(n).astype(np.float32) * 100, pa.float32())}
    if test:  # the test set: no clicks, no read article, no next page; a beyond-accuracy flag instead
        for c in ("article_ids_clicked", "article_id", "next_read_time", "next_scroll_percentage"):
            del cols[c]
        cols["is_beyond_accuracy"] = pa.array(np.zeros(n, bool))
    return cols


def write_behaviors(path: Path, n: int, start, users, pref, by_cat, n_articles, rng, inview=(5, 12), test=False,
                    beyond_accuracy: int = 0, first_id: int = 1) -> None:
    """behaviors.parquet, `WRITE_ROWS` rows at a time; the test set ends with `beyond_accuracy` rows of
    impression_id 0 that share one in-view list (as the official test set's 200,000 do)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    done = 0
    while done < n or (writer is None):
        k = min(WRITE_ROWS, n - done)
        cols = _behavior_rows(k, first_id + done, start, users, pref, by_cat, n_articles, rng, inview, test)
        table = pa.table(cols)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        done += k
        if k == 0:
            break
    if test and beyond_accuracy:
        cols = _behavior_rows(beyond_accuracy, 0, start, users, pref, by_cat, n_articles, rng, inview, test)
        shown = rng.permutation(n_articles)[:min(n_articles, 25)] + 3_000_000
        cols["article_ids_inview"] = _list_array(np.full(beyond_accuracy, len(shown)),
                                                 np.tile(shown, beyond_accuracy).astype(np.int32), pa.int32())
        cols["impression_id"] = pa.array(np.zeros(beyond_accuracy, np.uint32), pa.uint32())
        cols["is_beyond_accuracy"] = pa.array(np.ones(beyond_accuracy, bool))
        writer.write_table(pa.table(cols).cast(writer.schema))
    writer.close()


def write_ebnerd(root: str | Path, *, articles: int = 400, users: int = 150, train: int = 400, validation: int = 150,
                 test: int = 0, beyond_accuracy: int = 0, seed: int = 0, history: int = 30,
                 inview: tuple[int, int] = (5, 12)) -> Path:
    """Write a bundle folder (`root/articles.parquet`, `root/{train,validation}/...`) and, with `test`, a test set
    folder beside it (`<root>_testset`-style: `root.parent / 'ebnerd_testset'`). Returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    cat = write_articles(root / "articles.parquet", articles, rng)
    by_cat = [np.flatnonzero(cat == c) if (cat == c).any() else np.array([0]) for c in range(len(CATEGORIES))]
    user_ids = rng.permutation(np.arange(10_000, 10_000 + 4 * users))[:users]
    pref = rng.integers(0, len(CATEGORIES), users)
    splits = [("train", train, START, False), ("validation", validation, START + WEEK, False)]
    for split, n, start, is_test in splits:
        (root / split).mkdir(exist_ok=True)
        write_history(root / split / "history.parquet", user_ids, pref, by_cat, articles, rng, history)
        write_behaviors(root / split / "behaviors.parquet", n, start, user_ids, pref, by_cat, articles, rng, inview,
                        first_id=1 + (0 if split == "train" else 10 * train))
    if test:
        tdir = root.parent / "ebnerd_testset"
        (tdir / "test").mkdir(parents=True, exist_ok=True)
        write_articles(tdir / "articles.parquet", articles, np.random.default_rng(seed))  # same articles
        write_history(tdir / "test" / "history.parquet", user_ids, pref, by_cat, articles, rng, history)
        write_behaviors(tdir / "test" / "behaviors.parquet", test, START + 2 * WEEK, user_ids, pref, by_cat, articles,
                        rng, inview, test=True, beyond_accuracy=beyond_accuracy, first_id=10 * (train + validation))
    return root


def write_artifact(articles: str | Path, out: str | Path, column: str = "contrastive_vector", dim: int = 16,
                   seed: int = 0, without: float = 0.1, foreign: int = 5) -> Path:
    """An article-vector artifact in the organisers' layout (`article_id` int32 and one list<float32> column named
    `column`) for the articles of `articles` (an articles.parquet): each vector is its category's direction plus
    noise, so a model can learn from it; a fraction `without` of the articles gets no row (the corpus must count
    them) and `foreign` rows name articles that do not exist (to be ignored). Returns `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    table = pq.read_table(articles, columns=["article_id", "category"])
    ids = table.column("article_id").to_numpy().astype(np.int64)
    cat = table.column("category").to_numpy().astype(np.int64) - 100
    keep = rng.random(len(ids)) >= without
    centre = rng.normal(size=(len(CATEGORIES), dim))
    vectors = centre[cat[keep]] + 0.5 * rng.normal(size=(int(keep.sum()), dim))
    extra = ids.max() + 1 + np.arange(foreign)  # no such article
    all_ids = np.concatenate([ids[keep], extra]).astype(np.int32)
    values = np.concatenate([vectors, rng.normal(size=(foreign, dim))]).astype(np.float32)
    order = rng.permutation(len(all_ids))  # the file's order is not the articles' order
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"article_id": pa.array(all_ids[order], pa.int32()),
                             column: _list_array(np.full(len(order), dim), values[order].reshape(-1), pa.float32())}),
                   out)
    return out
