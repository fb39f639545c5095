"""Time-aware news popularity (PP-Rec): click-through rates from the train split and each news' first exposure.

Legend: N news in the corpus table, E (news, hour) pairs with train impressions, B impressions, M news looked up
per impression (history or candidates).

Which signal may be computed from which split (docs/models.md, "PP-Rec: which popularity signals are legal"):

- CTR counts the clicks and impressions of the **train** split only (of the run's `--train_fraction` share, as
  `dataset.train_share` chooses it), per news and hour. At an impression of hour t it reads only the hours before t
  (`--pprec_ctr_window` of them, 0 = all): never the impression's own hour, so a training sample never sees its own
  label or a later click. Dev and test read the same train counts; their own labels are never read (test has none).
- The news' first exposure (the corpus format has no publication time: it is the proxy) is the earliest impression
  time at which the news is shown, over the impression lists of every split: what the system has shown is known at
  serving time, and no label is read. A candidate is shown at its own impression, so its first exposure is never later than
  the impression: the age reads nothing of the future.

The table is built once per run from the corpus (`time_popularity_for`) and held by the model as non-persistent
buffers (`PopularityLookup`), rebuilt from the corpus rather than saved in the checkpoint, as the news feature table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from dataset import train_share_of
from MIND_corpus import CorpusError
from userEncoders import get_user_encoder

if TYPE_CHECKING:
    from config import Config
    from MIND_corpus import Corpus

NEVER_SHOWN = np.iinfo(np.int64).max  # first exposure of a news no impression shows
CTR_SMOOTHING = 0.01  # PP-Rec's CTR = clicks / (impressions + 0.01): 0 for a news never shown, no division by zero


@dataclass
class PopularityTable:
    """Train counts per (news, hour), as cumulative sums over keys sorted by news then hour, and first exposures.

    keys [E] int64: news * stride + (hour - origin), sorted; impressions / clicks [E + 1] int64: counts of the keys
    before each position (exclusive prefix sums); first_seen [N] int64 hours (NEVER_SHOWN: never shown);
    window: hours of counts a lookup reads before the impression's hour (0 = every hour before it)."""

    keys: np.ndarray
    impressions: np.ndarray
    clicks: np.ndarray
    first_seen: np.ndarray
    origin: int
    stride: int
    window: int


def _checked_time(beh: dict[str, Any], reader: str) -> np.ndarray:
    """[I] int64 hours of a split's impressions; an unreadable Time is an error naming the file and its line."""
    stats = beh["stats"]
    if stats.get("bad_times"):
        line, text = stats["first_bad_time"]
        raise CorpusError(f"{beh['path']}:{line}: Time {text!r} is not 'M/D/YYYY h:mm:ss AM' (e.g. '11/15/2019 "
                          f"8:55:22 AM'), and {reader} reads the impression time "
                          f"({stats['bad_times']} lines of this file have such a Time): fix the file")
    return np.asarray(beh["time"], dtype=np.int64)


def _impression_of(beh: dict[str, Any]) -> np.ndarray:
    """[candidates] row of each candidate's impression."""
    sizes = np.diff(np.asarray(beh["offsets"]))
    return np.repeat(np.arange(len(sizes)), sizes)


def build_popularity(train: dict[str, Any], splits: list[dict[str, Any]], news_num: int, share: np.ndarray,
                     window: int, reader: str = "a time-aware model") -> PopularityTable:
    """The table from the train split's impressions in `share` [I] bool (their labels) and the impression lists of
    every split in `splits` (train included; no labels read), for a corpus of `news_num` news. `reader` names the
    model in the error on an unreadable Time."""
    time = _checked_time(train, reader)
    impression = _impression_of(train)
    news = np.asarray(train["candidates"], dtype=np.int64)
    labels = np.asarray(train["labels"])
    keep = share[impression] & (news > 0)  # index 0 is the padding / unknown news
    hours = time[impression[keep]]
    origin = int(time.min()) if len(time) else 0
    stride = int(time.max()) - origin + 2 if len(time) else 2  # hour offsets 0 .. max-origin, +1 for "after all"
    keys, inverse = np.unique(news[keep] * stride + (hours - origin), return_inverse=True)
    shown = np.bincount(inverse, minlength=len(keys))
    clicked = np.bincount(inverse, weights=labels[keep] == 1, minlength=len(keys)).astype(np.int64)
    first_seen = np.full(news_num, NEVER_SHOWN, dtype=np.int64)
    for beh in splits:
        split_time = _checked_time(beh, reader)
        cand = np.asarray(beh["candidates"], dtype=np.int64)
        np.minimum.at(first_seen, cand, split_time[_impression_of(beh)])
    first_seen[0] = NEVER_SHOWN
    prefix = lambda x: np.concatenate([[0], np.cumsum(x)]).astype(np.int64)  # noqa: E731
    return PopularityTable(keys=keys.astype(np.int64), impressions=prefix(shown), clicks=prefix(clicked),
                           first_seen=first_seen, origin=origin, stride=stride, window=int(window))


def time_popularity_for(config: "Config", corpus: "Corpus") -> PopularityTable | None:
    """The table a run's model needs (None when its user encoder reads no popularity): train counts of the run's
    train share, first exposures over every split of the corpus."""
    if not get_user_encoder(config.user_encoder).needs_popularity:
        return None
    train = corpus.behaviors("train")
    splits = [corpus.behaviors(s) for s in corpus.splits]
    return build_popularity(train, splits, len(next(iter(corpus.news.values()))), train_share_of(config, train),
                            config.pprec_ctr_window, f"--user_encoder={config.user_encoder}")


class PopularityLookup(nn.Module):
    """The table on the model's device: CTR and age of news at impression hours, vectorised (a binary search per
    lookup, no Python loop). Buffers are not persistent: rebuilt from the corpus, never saved."""

    def __init__(self, table: PopularityTable):
        super().__init__()
        for name in ("keys", "impressions", "clicks", "first_seen"):
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(getattr(table, name))), persistent=False)
        self.origin, self.stride, self.window = table.origin, table.stride, table.window

    def _counts_before(self, news: torch.Tensor, hour: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """news [B, M], hour [B, 1] -> impressions, clicks [B, M] of the train hours before `hour`."""
        offset = (hour - self.origin).clamp(0, self.stride - 1)  # before all hours: 0; after all: stride - 1
        at = torch.searchsorted(self.keys, news * self.stride + offset)
        start = torch.searchsorted(self.keys, news * self.stride)
        return self.impressions[at] - self.impressions[start], self.clicks[at] - self.clicks[start]

    def ctr(self, news: torch.Tensor, hour: torch.Tensor) -> torch.Tensor:
        """news [B, M] long, hour [B] long -> [B, M] float: clicks / (impressions + 0.01) over the train hours
        [hour - window, hour) (window 0: every train hour before `hour`)."""
        hour = hour.unsqueeze(1)
        shown, clicked = self._counts_before(news, hour)
        if self.window > 0:
            early_shown, early_clicked = self._counts_before(news, hour - self.window)
            shown, clicked = shown - early_shown, clicked - early_clicked
        return clicked.float() / (shown.float() + CTR_SMOOTHING)

    def age(self, news: torch.Tensor, hour: torch.Tensor) -> torch.Tensor:
        """news [B, M] long, hour [B] long -> [B, M] long: hours since the news' first exposure (0 if never shown)."""
        first = self.first_seen[news]
        return torch.where(first == NEVER_SHOWN, 0, hour.unsqueeze(1) - first).clamp(min=0)
