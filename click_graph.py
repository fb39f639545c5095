"""GLORY's global click graph over news (Yang et al., "Going Beyond Local: Global Graph-Enhanced Personalized News
Recommendations", RecSys 2023): which news users clicked right before a news, as a top-k neighbour table.

Legend: N news (index 0 = padding), I impressions, R distinct histories, H history slots, k neighbours kept.

What it reads: the train split's history table only (`MIND_corpus` cache `behaviors-train`: the most recent
--max_history_num known clicks of each history, oldest first). Dev and test histories never add an edge: the graph is
what was known when the model was trained. Each user counts once, with the history of their first train impression
in file order (MIND repeats a user's history on each of their impressions; the official code keeps the first line of
each user). Every consecutive pair (a, b) of that history is a directed edge a -> b whose weight is the number of
users with that pair. Each news keeps its k in-neighbours (the a of its edges a -> b) of largest weight; ties go to
the smaller news index, so the table does not depend on the order edges were counted in. A news clicked twice in a
row adds no edge (a news is not its own neighbour).

`Corpus.add_click_graph(k)` caches the table on disk keyed by the train behaviours cache (the train file's path, size
and mtime, the news files, --max_history_num) and k, so a changed train file rebuilds it.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def first_history_of_each_user(user: np.ndarray, history_row: np.ndarray) -> np.ndarray:
    """[I] user ids and history rows of the impressions -> the history row of each user's first impression (in file
    order), one per distinct user id."""
    _, first = np.unique(np.asarray(user), return_index=True)
    return np.asarray(history_row)[np.sort(first)]


def build_click_graph(user: np.ndarray, history_row: np.ndarray, histories: np.ndarray, history_length: np.ndarray,
                      news_num: int, k: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The top-k in-neighbour table of the click graph.

    Args:
        user, history_row: [I] int, per train impression (the behaviours cache's columns).
        histories: [R, H] int news ids, left-aligned, 0 = padding; history_length: [R] real clicks of each row.
        news_num: N (rows of the table); k: neighbours kept per news.
    Returns:
        ({"click_graph": [N, 1 + k] int32, column 0 the news' own index (so an encoder that sees gathered rows knows
          which news they are), columns 1.. its in-neighbours by weight (0 = none);
          "click_weights": [N, k] float32, the edge weights (user counts) of those neighbours, 0 where none},
         stats: users, edges (distinct directed pairs), news_with_neighbours).
    """
    rows = first_history_of_each_user(user, history_row)
    hist = np.asarray(histories)[rows].astype(np.int64)  # [U, H]
    length = np.asarray(history_length)[rows].astype(np.int64)  # [U]
    h = hist.shape[1]
    src, dst = hist[:, :-1], hist[:, 1:]  # [U, H-1]: consecutive clicks
    valid = (np.arange(max(h - 1, 0))[None, :] < (length - 1)[:, None]) & (src != dst)
    key = dst[valid] * news_num + src[valid]
    pairs, counts = np.unique(key, return_counts=True)
    d, s = pairs // news_num, pairs % news_num
    order = np.lexsort((s, -counts, d))  # by news, then weight descending, then smaller neighbour first
    d, s, counts = d[order], s[order], counts[order]
    starts = np.searchsorted(d, d, side="left")  # first edge of each news' group
    rank = np.arange(len(d)) - starts
    keep = rank < k
    table = np.zeros((news_num, 1 + k), dtype=np.int32)
    table[:, 0] = np.arange(news_num)
    weights = np.zeros((news_num, k), dtype=np.float32)
    table[d[keep], 1 + rank[keep]] = s[keep]
    weights[d[keep], rank[keep]] = counts[keep]
    stats = dict(users=int(len(rows)), edges=int(len(pairs)), news_with_neighbours=int(len(np.unique(d))))
    return {"click_graph": table, "click_weights": weights}, stats
