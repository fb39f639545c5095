"""The demo corpus: a seeded MIND-format corpus made by this project's code (no MIND rows: MIND's licence forbids
redistributing them), used by the quick start, the tests and the size benchmarks.

`generate_demo(root, ...)` writes `root/{train,dev,test}` in the MIND format (docs/MIND.md §1); `ensure_demo(data_dir)`
is `<data_dir>/MIND-demo`, generated on first use and never replaced (main.py and prepare_MIND_dataset.py call it).

Extras (not in MIND): `<split>/click_probabilities.tsv` (`ImpressionID \\t p1 p2 ...`, the true click probability of
each candidate, in order), `test/labels_hidden.tsv` (`ImpressionID \\t 0 1 0 ...`, the test labels, written whether
or not behaviors.tsv carries them) and `oracle.json` (per split the mean per-impression AUC of scoring with the true
probabilities, and of the two ingredients alone; sizes; seed). A library module, apart from the MIND downloader and
protocol builder (prepare_MIND_dataset.py), which is a script.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from scorer import per_impression_metrics
from util import replace_dir_atomically

GENERATOR_VERSION = 3  # bump when the demo generator's output changes: ensure_demo then regenerates
WRITE_CHUNK = 100_000  # impressions whose text the demo generator makes and writes at a time
# The default demo (main.py's --demo_* defaults, prepare_MIND_dataset.py's, generate_demo's).
DEMO_SIZES = dict(num_news=3000, num_users=2000, num_train_impressions=6000, num_dev_impressions=1500,
                  num_test_impressions=1500)
DEMO_SEED = 0
SHOWN_PER_IMPRESSION = (5, 40)  # candidates an impression shows, at least and at most (distinct news)
MIN_DEMO_NEWS = SHOWN_PER_IMPRESSION[1]  # so that every impression can show its most


# ==========================================================================================================
# Demo corpus: vocabulary
# ==========================================================================================================

# The 17 MIND categories: subcategories, topical words (lower-case, common English, all in GloVe 6B) and named
# entities (Label, Type: P person, O organisation, G geo-political, C concept) that titles and abstracts mention.
CATEGORIES: dict[str, dict[str, list]] = {
    "news": dict(
        sub=["newsus", "newsworld", "newspolitics", "newscrime", "newsscienceandtechnology"],
        words="police court election senate president governor law report officials city state vote campaign "
              "investigation judge congress policy protest border security mayor federal community school "
              "shooting arrested charged trial lawmakers democrats republicans bill public county sheriff "
              "suspect witness impeachment hearing testimony".split(),
        entities=[("America", "G"), ("Washington", "G"), ("Congress", "O"), ("Texas", "G"),
                  ("California", "G"), ("Florida", "G"), ("Chicago", "G"), ("Pentagon", "O")]),
    "sports": dict(
        sub=["football_nfl", "basketball_nba", "baseball_mlb", "soccer", "golf", "icehockey_nhl"],
        words="game team season coach players win score playoff league quarterback touchdown championship "
              "fans stadium injury draft basketball football baseball soccer goal victory defense loss rookie "
              "trade contract record points yards pitcher inning hockey tournament veteran roster sideline "
              "halftime comeback".split(),
        entities=[("NFL", "O"), ("NBA", "O"), ("Patriots", "O"), ("Lakers", "O"), ("Yankees", "O"),
                  ("Cowboys", "O"), ("Packers", "O"), ("Steelers", "O")]),
    "finance": dict(
        sub=["markets", "finance-companies", "personalfinance", "finance-real-estate", "finance-retirement"],
        words="stock market investors shares price company earnings bank money tax economy trade billion "
              "profit retirement savings credit mortgage interest rates growth sales deal debt budget jobs "
              "wages income pension fund insurance loan prices quarter revenue layoffs recession dollar".split(),
        entities=[("Amazon", "O"), ("Apple", "O"), ("Google", "O"), ("Walmart", "O"), ("Boeing", "O"),
                  ("Microsoft", "O"), ("Nasdaq", "O")]),
    "lifestyle": dict(
        sub=["lifestylebuzz", "lifestyleroyals", "shop-holidays", "lifestyleparenting", "lifestylehomeandgarden"],
        words="family home style wedding royal prince queen holiday gift fashion kids parents dress love "
              "life friends beauty shopping christmas design house celebrate garden decor bride mother "
              "daughter baby tips ideas simple cozy modern kitchen living room".split(),
        entities=[("Meghan", "P"), ("Harry", "P"), ("Kate", "P"), ("William", "P"), ("Target", "O"),
                  ("Costco", "O")]),
    "health": dict(
        sub=["wellness", "medical", "nutrition", "fitness", "health-news"],
        words="health doctors study cancer disease hospital patients diet weight sleep brain heart exercise "
              "risk symptoms treatment vaccine medicine research pain blood stress anxiety depression "
              "diabetes flu virus protein vitamin muscle workout calories nurse surgery healthy".split(),
        entities=[("FDA", "O"), ("Medicare", "O"), ("Harvard", "O"), ("Stanford", "O"), ("Mayo", "O")]),
    "foodanddrink": dict(
        sub=["recipes", "restaurantsandnews", "foodnews", "cocktails"],
        words="recipe food dinner chicken cheese restaurant pizza cake chocolate cooking kitchen wine coffee "
              "breakfast soup salad bread chef dessert taste menu turkey pasta beef pie cookies sauce grill "
              "delicious sweet spicy bake flavor lunch beer cocktail".split(),
        entities=[("Starbucks", "O"), ("Chipotle", "O"), ("Thanksgiving", "C"), ("Italian", "C"),
                  ("Mexican", "C")]),
    "travel": dict(
        sub=["travelnews", "traveltrip", "travelarticle", "travel-points"],
        words="travel trip hotel flight airport beach island city vacation cruise tourists airline passengers "
              "destination park resort journey mountain tour visit adventure road lake desert camping "
              "luggage passport ship coast hiking trail towns scenic".split(),
        entities=[("Hawaii", "G"), ("Paris", "G"), ("London", "G"), ("Italy", "G"), ("Alaska", "G"),
                  ("Delta", "O")]),
    "weather": dict(
        sub=["weathertopstories", "weathernews"],
        words="weather storm snow rain winds forecast hurricane temperatures cold heat flooding winter tornado "
              "ice clouds degrees warning thunderstorms freeze sunny blizzard chilly frost humid showers "
              "drought wildfire damage power outages inches".split(),
        entities=[("Atlantic", "G"), ("Pacific", "G"), ("Midwest", "G"), ("Colorado", "G"),
                  ("Minnesota", "G")]),
    "autos": dict(
        sub=["autosnews", "autosenthusiasts", "autosreview", "autosclassics"],
        words="car cars truck vehicle engine driver electric speed drive model auto road highway motor wheels "
              "fuel sedan suv pickup horsepower battery recall crash dealer mileage luxury brakes classic "
              "racing garage parts".split(),
        entities=[("Ford", "O"), ("Toyota", "O"), ("Tesla", "O"), ("Honda", "O"), ("Chevrolet", "O"),
                  ("Jeep", "O"), ("BMW", "O"), ("Porsche", "O")]),
    "video": dict(
        sub=["news", "animals", "viral", "lifestyle"],
        words="video watch footage camera dog cat animals viral clip moment rescue funny caught shows baby "
              "bear amazing incredible filmed puppy kitten owner hilarious surprise reaction heartwarming "
              "wild deer dancing".split(),
        entities=[("YouTube", "O"), ("Facebook", "O"), ("Twitter", "O"), ("Australia", "G")]),
    "music": dict(
        sub=["musicnews", "celebrity", "music-awards"],
        words="music song album singer band concert tour rock star rapper songs guitar festival stage fans pop "
              "country record hit lyrics performance duet singles charts playlist jazz piano vocals".split(),
        entities=[("Grammy", "O"), ("Beyonce", "P"), ("Madonna", "P"), ("Nashville", "G"), ("Beatles", "O"),
                  ("Eminem", "P")]),
    "movies": dict(
        sub=["movienews", "movies-celebrity", "movies-gallery", "movies-reviews"],
        words="movie film actor actress director box office star sequel trailer cinema role premiere scene "
              "cast studio franchise screen horror comedy thriller villain hero audiences script".split(),
        entities=[("Hollywood", "G"), ("Disney", "O"), ("Marvel", "O"), ("Oscar", "O"), ("Batman", "C")]),
    "tv": dict(
        sub=["tvnews", "tv-celebrity", "tvreviews", "tv-recaps"],
        words="show series episode season finale television host network drama comedy cast characters premiere "
              "streaming viewers reality channel sitcom spinoff revival ratings contestants judges "
              "anchor".split(),
        entities=[("Netflix", "O"), ("HBO", "O"), ("NBC", "O"), ("CBS", "O"), ("Emmy", "O")]),
    "entertainment": dict(
        sub=["celebrity", "entertainment-celebrity", "awards", "humor"],
        words="celebrity star famous singer actress photos red carpet awards party fans couple rumors "
              "interview wedding divorce gala outfit glamorous birthday memoir tribute legend icon "
              "spotted".split(),
        entities=[("Kardashian", "P"), ("Oprah", "P"), ("Vegas", "G"), ("Broadway", "G"), ("Disney", "O")]),
    "kids": dict(
        sub=["kids-animals", "kids-science"],
        words="kids children school toys games learning science animals zoo puzzle fun students teacher "
              "playground books cartoon crafts dinosaurs space planets robots classroom homework".split(),
        entities=[("NASA", "O"), ("Lego", "O"), ("Pokemon", "O"), ("Sesame", "O")]),
    "middleeast": dict(
        sub=["middleeast-top-stories", "middleeast-news"],
        words="oil military peace talks conflict region troops government leaders minister sanctions ceasefire "
              "war refugees protests embassy diplomats missile attack kingdom".split(),
        entities=[("Iran", "G"), ("Israel", "G"), ("Syria", "G"), ("Iraq", "G"), ("Dubai", "G"),
                  ("Egypt", "G"), ("Lebanon", "G"), ("Turkey", "G")]),
    "northamerica": dict(
        sub=["northamerica-news", "canada"],
        words="canadian province trade border prime minister pipeline election parliament provincial premier "
              "liberal conservative hockey immigration tariffs ".split(),
        entities=[("Canada", "G"), ("Mexico", "G"), ("Toronto", "G"), ("Ottawa", "G"), ("Quebec", "G"),
                  ("Vancouver", "G"), ("Trudeau", "P")]),
}
FUNCTION_WORDS = ("the a of to in for on with and at after new how why what this is are from by over best top "
                  "first more says about will could as can you your here just big its that these who when "
                  "back out now than still may get make every".split())
# News supply per category, roughly MIND's shape (news and sports largest, kids and middleeast smallest).
CATEGORY_WEIGHTS = np.array([12, 11, 6, 6, 4, 4, 3, 2, 3, 2, 2, 3, 3, 4, 1, 1, 1], dtype=np.float64)
RELATIONS = ("P31", "P17", "P131", "P106", "P361", "P279", "P27", "P54")

# Click model: logit = CLICK_BIAS + AFFINITY_WEIGHT * log-lift of the user's preference for the news category
# + POPULARITY_WEIGHT * popularity + N(0, NOISE_SD). Tuned for an oracle AUC of about 0.82, with the affinity
# part alone at about 0.75 and popularity alone at about 0.64 (train click-through rates reach about 0.59 on dev,
# new news being unknown): content beats popularity, neither is trivial; about 10% of candidates are clicked.
CLICK_BIAS, AFFINITY_WEIGHT, POPULARITY_WEIGHT, NOISE_SD = -2.7, 0.9, 0.7, 0.6
PREFERENCE_CONCENTRATION = 3.0  # Dirichlet(3 * category shares): each user likes a few categories
EXPOSURE_WEIGHT = 0.5  # candidates are shown with probability ~ exp(0.5 * popularity)
# Time windows as fractions of the news list (news are in publication order): which news can be clicked in the
# history before train, shown in each split, or added to dev/test histories (read since the history was taken).
BASE_HISTORY_WINDOW = (0.0, 0.6)
SHOWN_WINDOW = {"train": (0.1, 0.8), "dev": (0.5, 0.9), "test": (0.6, 1.0)}
EXTRA_HISTORY = {"train": (0, (0.0, 0.0)), "dev": (3, (0.6, 0.8)), "test": (6, (0.6, 0.9))}  # (max count, window)
SPLIT_START = {"train": ("2019-11-09T00:00:00", 5), "dev": ("2019-11-14T00:00:00", 1),
               "test": ("2019-11-15T00:00:00", 1)}  # (first moment, days)


# ==========================================================================================================
# Demo corpus: vectorised helpers
# ==========================================================================================================

def _chunks(n: int, size: int = 1 << 22):
    """(start, end) of consecutive slices of range(n): elementwise work on MIND-large-sized arrays (50M
    candidates) runs slice by slice, so its float64 temporaries stay small."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _by_size(offsets: np.ndarray):
    """Yield `[G, n]` element indices of the segments with n elements, for every n (segments are contiguous),
    so per-segment sorts become row sorts of small 2-D arrays."""
    sizes = np.diff(offsets)
    for n in np.unique(sizes):
        if n > 0:
            rows = np.flatnonzero(sizes == n)
            yield rows, offsets[rows, None] + np.arange(n)


def _mean_auc(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> float | None:
    """Mean per-impression AUC (the official metric, scorer.py) over two-class impressions, rounded to 6 digits;
    None (JSON null) if there are none."""
    aucs = per_impression_metrics(scores, labels, offsets)["auc"]
    return round(float(aucs.mean()), 6) if len(aucs) else None


class _WindowSampler:
    """Weighted draws of news restricted to a publication window [lo, hi), optionally to one category.

    News are kept sorted by (category, index) with a running sum of weights, so the news of category c
    published in [lo, hi) are one contiguous slice and a draw is one `searchsorted`.
    """

    def __init__(self, category: np.ndarray, weights: np.ndarray, n_categories: int):
        self.n, self.k = len(category), n_categories
        self.key = category.astype(np.int64) * self.n + np.arange(self.n)
        self.order = np.argsort(self.key, kind="stable")
        self.key = self.key[self.order]
        self.cum = np.concatenate([[0.0], np.cumsum(weights[self.order])])

    def bounds(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """[K] start and end positions (in sorted order) of each category's slice of the window."""
        base = np.arange(self.k, dtype=np.int64) * self.n
        return np.searchsorted(self.key, base + lo), np.searchsorted(self.key, base + hi)

    def mass(self, lo: int, hi: int) -> np.ndarray:
        """[K] total weight of each category inside the window."""
        a, b = self.bounds(lo, hi)
        return self.cum[b] - self.cum[a]

    def draw(self, rng: np.random.Generator, categories: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """One news index per entry of `categories` (each category must have news in the window)."""
        bound_a, bound_b = self.bounds(lo, hi)
        u = rng.random(len(categories))
        out = np.empty(len(categories), dtype=np.int64)
        for s, e in _chunks(len(categories)):  # elementwise: chunks bound the temporaries, not the values
            a, b = bound_a[categories[s:e]], bound_b[categories[s:e]]
            target = self.cum[a] + u[s:e] * (self.cum[b] - self.cum[a])
            pos = np.clip(np.searchsorted(self.cum, target, side="right") - 1, a, b - 1)
            out[s:e] = self.order[pos]
        return out


def _draw_distinct(rng: np.random.Generator, offsets: np.ndarray, draw: Callable[[np.ndarray], np.ndarray],
                   max_rounds: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Fill slots with `draw(slot_ids)` and redraw slots that repeat a news of the same row (impression or
    history: row i is slots `[offsets[i], offsets[i+1])`); slots still repeating after `max_rounds` (a row asking
    for more news than its pool has) are dropped. Returns (news per slot, keep mask)."""
    values = draw(np.arange(int(offsets[-1])))
    groups = list(_by_size(offsets))
    dup = np.zeros(len(values), dtype=bool)
    for round_ in range(max_rounds + 1):
        dup[:] = False
        for _, idx in groups:
            order = np.argsort(values[idx], axis=1, kind="stable")  # equal news keep slot order
            slot = np.take_along_axis(idx, order, axis=1)
            v = values[slot]
            dup[slot[:, 1:][v[:, 1:] == v[:, :-1]]] = True
        redo = np.flatnonzero(dup)
        if len(redo) == 0 or round_ == max_rounds:
            break
        values[redo] = draw(redo)
        # Later rounds only need the rows that changed.
        changed = np.zeros(len(offsets) - 1, dtype=bool)
        changed[np.searchsorted(offsets, redo, side="right") - 1] = True
        groups = [(rows[changed[rows]], idx[changed[rows]]) for rows, idx in groups if changed[rows].any()]
    return values, ~dup


def _categorical_rows(rng: np.random.Generator, probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One category per slot, drawn from `probs[rows[slot]]` ([R, K] rows summing to 1), vectorised: row r's
    cumulative distribution is shifted to [r, r+1] so one `searchsorted` serves all rows."""
    k = probs.shape[1]
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    flat = (cdf + np.arange(len(probs))[:, None]).ravel()
    pos = np.searchsorted(flat, rows + rng.random(len(rows)) * (1 - 1e-12), side="right")
    return np.clip(pos - rows * k, 0, k - 1)


def _segment_pick(rng: np.random.Generator, weights: np.ndarray, offsets: np.ndarray,
                  segments: np.ndarray) -> np.ndarray:
    """For each segment i in `segments`, one element index in `[offsets[i], offsets[i+1])` drawn with
    probability ~ `weights` (Gumbel-max)."""
    picked = np.zeros(len(segments), dtype=np.int64)
    sub = np.concatenate([[0], np.cumsum(np.diff(offsets)[segments])])
    if len(segments) == 0:
        return picked
    elem = np.repeat(offsets[segments] - sub[:-1], np.diff(sub)) + np.arange(sub[-1])
    u = rng.random(len(elem))
    key = np.log(np.maximum(weights[elem], 1e-300)) - np.log(-np.log(u * (1 - 1e-12) + 1e-300))
    seg = np.repeat(np.arange(len(segments)), np.diff(sub))
    order = np.lexsort((key, seg))
    last = np.zeros(len(segments), dtype=np.int64)
    last[seg[order]] = elem[order]  # later (larger key) writes win
    return last


def _mind_times(start: str, seconds: np.ndarray) -> list[str]:
    """MIND timestamps like '11/15/2019 8:55:22 AM' for `start` + seconds."""
    t = pd.DatetimeIndex(np.datetime64(start, "s") + np.asarray(seconds, dtype="timedelta64[s]"))
    hour = t.hour.to_numpy()
    h12 = np.where(hour % 12 == 0, 12, hour % 12)
    return [f"{mo}/{d}/{y} {h}:{mi:02d}:{s:02d} {'AM' if hh < 12 else 'PM'}"
            for mo, d, y, h, mi, s, hh in zip(t.month.tolist(), t.day.tolist(), t.year.tolist(), h12.tolist(),
                                              t.minute.tolist(), t.second.tolist(), hour.tolist())]


def _segment_join(tokens: np.ndarray, offsets: np.ndarray, sep: str = " ") -> list[str]:
    """`sep.join(tokens[offsets[i]:offsets[i+1]])` for every segment i."""
    tok = tokens.tolist()
    bounds = offsets.tolist()
    return [sep.join(tok[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


# ==========================================================================================================
# Demo corpus: news text
# ==========================================================================================================

class _Vocabulary:
    """Flat arrays over CATEGORIES: word strings, per-category slices of topical words and of entities."""

    def __init__(self):
        cats = list(CATEGORIES)
        words = list(FUNCTION_WORDS)
        self.n_function = len(words)
        self.topic_start, self.topic_size = [], []
        for name in cats:
            self.topic_start.append(len(words))
            self.topic_size.append(len(CATEGORIES[name]["words"]))
            words += CATEGORIES[name]["words"]
        # Entities: unique labels (one WikidataId each, even when two categories share one), then per category
        # a slice of a flat list of entity ids.
        self.entity_label, self.entity_type, self.entity_categories = [], [], []
        index: dict[str, int] = {}
        flat, self.entity_start, self.entity_size = [], [], []
        for c, name in enumerate(cats):
            self.entity_start.append(len(flat))
            self.entity_size.append(len(CATEGORIES[name]["entities"]))
            for label, kind in CATEGORIES[name]["entities"]:
                if label not in index:
                    index[label] = len(self.entity_label)
                    self.entity_label.append(label)
                    self.entity_type.append(kind)
                    self.entity_categories.append([])
                self.entity_categories[index[label]].append(c)
                flat.append(index[label])
        self.entity_flat = np.array(flat, dtype=np.int64)
        self.entity_word_start = len(words)
        words += self.entity_label
        self.words = np.array(words, dtype=object)
        self.capitalised = np.array([w[:1].upper() + w[1:] for w in words], dtype=object)
        self.length = np.array([len(w) for w in words], dtype=np.int64)
        self.topic_start = np.array(self.topic_start)
        self.topic_size = np.array(self.topic_size)
        self.entity_start = np.array(self.entity_start)
        self.entity_size = np.array(self.entity_size)
        # Fake but stable Wikidata ids: Q followed by a number unique to the label.
        self.wikidata = [f"Q{1000 + 7919 * i}" for i in range(len(self.entity_label))]


SUFFIXES = np.array(["", ",", ".", ":", "!", "?"], dtype=object)
SUFFIX_LEN = np.array([len(s) for s in SUFFIXES])


def _make_texts(rng: np.random.Generator, vocab: _Vocabulary, category: np.ndarray, lengths: np.ndarray,
                topical_share: np.ndarray, entity_share: np.ndarray, is_title: bool
                ) -> tuple[list[str], list[str]]:
    """Titles (or abstracts) for all news at once, and their entity JSON.

    Each word is an entity of the news' category (probability `entity_share`), a topical word of the category
    (`topical_share`) or a function word. Titles: capitalised first word, sometimes a colon after the 2nd or 3rd
    word, commas, and an optional final ! ? or . ; abstracts: sentences ending with '.', each capitalised.
    Entity occurrences are recorded with their character offsets in the final text.
    """
    n = len(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    row = np.repeat(np.arange(n), lengths)
    pos = np.arange(total) - offsets[row]
    last = pos == lengths[row] - 1
    cat = category[row]

    u = rng.random(total)
    kind = np.where(u < entity_share[row], 2, np.where(u < entity_share[row] + topical_share[row], 1, 0))
    function_word = rng.integers(0, vocab.n_function, total)
    topical_word = vocab.topic_start[cat] + (rng.random(total) * vocab.topic_size[cat]).astype(np.int64)
    entity = vocab.entity_flat[vocab.entity_start[cat] + (rng.random(total) * vocab.entity_size[cat]).astype(np.int64)]
    word = np.select([kind == 0, kind == 1], [function_word, topical_word], vocab.entity_word_start + entity)

    suffix = np.where(~last & (rng.random(total) < 0.05), 1, 0)  # commas
    capital = pos == 0
    if is_title:
        colon_at = rng.integers(1, 3, n)
        with_colon = (rng.random(n) < 0.08) & (lengths > 4)
        suffix = np.where(with_colon[row] & (pos == colon_at[row]), 3, suffix)
        end = rng.choice(np.array([0, 0, 0, 0, 0, 0, 2, 4, 5]), n)
        suffix = np.where(last, end[row], suffix)
    else:
        stop = ~last & (pos >= 3) & (rng.random(total) < 1 / 12)  # sentence ends inside the abstract
        suffix = np.where(stop, 2, suffix)
        suffix = np.where(last, 2, suffix)
        capital[1:] |= stop[:-1]
    tokens = np.where(capital, vocab.capitalised[word], vocab.words[word]) + SUFFIXES[suffix]
    # Character offset of each token: tokens are joined with one space.
    width = vocab.length[word] + SUFFIX_LEN[suffix] + 1
    start = np.cumsum(width) - width
    start = start - start[offsets[row]]
    texts = _segment_join(tokens, offsets)

    # Entity JSON: one object per (news, entity) with all its offsets, entities ordered by first occurrence.
    entity_json = ["[]"] * n
    occ = np.flatnonzero(kind == 2)
    if len(occ):
        occ_row, occ_entity, occ_start = row[occ], entity[occ], start[occ]
        order = np.lexsort((occ_start, occ_row))
        confidence = np.round(rng.uniform(0.85, 1.0, len(vocab.entity_label)), 3)
        current_row, items = -1, {}
        for r, e, s in zip(occ_row[order].tolist(), occ_entity[order].tolist(), occ_start[order].tolist()):
            if r != current_row:
                if items:
                    entity_json[current_row] = json.dumps(list(items.values()))
                current_row, items = r, {}
            if e not in items:
                label = vocab.entity_label[e]
                items[e] = {"Label": label, "Type": vocab.entity_type[e], "WikidataId": vocab.wikidata[e],
                            "Confidence": float(confidence[e]), "OccurrenceOffsets": [], "SurfaceForms": []}
            items[e]["OccurrenceOffsets"].append(s)
            items[e]["SurfaceForms"].append(vocab.entity_label[e])
        if items:
            entity_json[current_row] = json.dumps(list(items.values()))
    return texts, entity_json


# ==========================================================================================================
# Demo corpus: the generator
# ==========================================================================================================

def generate_demo(root, *, num_news: int = DEMO_SIZES["num_news"], num_users: int = DEMO_SIZES["num_users"],
                  num_train_impressions: int = DEMO_SIZES["num_train_impressions"],
                  num_dev_impressions: int = DEMO_SIZES["num_dev_impressions"],
                  num_test_impressions: int = DEMO_SIZES["num_test_impressions"], seed: int = DEMO_SEED,
                  test_labels: bool = True, keep_existing: Callable[[Path], bool] | None = None) -> Path:
    """Write a MIND-format corpus to `root/{train,dev,test}` plus `root/oracle.json`; returns `root`.

    The world: news in publication order, each with a category (17 MIND categories), a subcategory and a latent
    popularity ~ N(0, 1); users with Dirichlet preferences over categories. A candidate's click probability is
    sigmoid(CLICK_BIAS + AFFINITY_WEIGHT * log-lift of the user's preference for its category
    + POPULARITY_WEIGHT * popularity + N(0, NOISE_SD)), rounded to 5 decimals (the value written to
    click_probabilities.tsv and used for the labels). Histories are drawn from the same model (category by the
    user's preference, news by popularity) without repeats; about 7% of users have an empty history. Each
    impression shows 5..40 distinct news of its split's window, weighted by exp(EXPOSURE_WEIGHT * popularity);
    labels are Bernoulli draws, then an impression without a click gets one (drawn by probability) and one
    without a non-click loses one, so every impression has both classes. dev and test show news published
    after train (absent from train/news.tsv), and their histories gained a few recent clicks.

    The bytes written depend only on the arguments and the numpy version (one seeded numpy Generator, no
    set/dict-order or hash() dependence, fixed float formats), not on the machine or the run. Memory: each
    split is drawn whole (numbers only), then its text is made and written WRITE_CHUNK impressions at a time,
    and the next split is drawn after that, so a MIND-large-sized corpus never holds a split's text in memory
    (chunked and whole writes give the same bytes: tests/test_prepare.py).
    `test_labels=False` writes the test candidates without labels, like MIND-large's test split; the labels are
    in `test/labels_hidden.tsv` either way, and nothing else changes. The corpus is written beside `root` and
    renamed into place; `keep_existing(root)` True keeps a corpus another process put there meanwhile.
    """
    root = Path(root)
    for name, value in dict(num_news=num_news, num_users=num_users).items():
        if value < 1:
            raise ValueError(f"generate_demo: {name} must be >= 1, got {value}")
    if num_news < MIN_DEMO_NEWS:
        raise ValueError(f"generate_demo: num_news must be >= {MIN_DEMO_NEWS} (every split shows up to "
                         f"{MIN_DEMO_NEWS} news), got {num_news}")
    world = _DemoWorld(np.random.default_rng(seed), num_news, num_users)
    sizes = dict(num_news=num_news, num_users=num_users, num_train_impressions=num_train_impressions,
                 num_dev_impressions=num_dev_impressions, num_test_impressions=num_test_impressions)
    oracle = {"seed": seed, "sizes": sizes, "test_labels": test_labels, "generator_version": GENERATOR_VERSION,
              "click_model": dict(bias=CLICK_BIAS, affinity_weight=AFFINITY_WEIGHT,
                                  popularity_weight=POPULARITY_WEIGHT, noise_sd=NOISE_SD)}

    def build(tmp: Path) -> None:
        # The splits are drawn (and their behaviors written) in this order, then the entity vectors: the order
        # of the random draws, hence the bytes, is that of the reference generator.
        splits = {}
        for name, n_impr, labelled in (("train", num_train_impressions, True),
                                       ("dev", num_dev_impressions, True),
                                       ("test", num_test_impressions, test_labels)):
            (tmp / name).mkdir()
            splits[name] = world.make_split(name, n_impr, labelled, tmp / name)
        world.write_news_and_vectors(tmp, splits)
        for s in splits.values():
            oracle.update(s["metrics"])
        (tmp / "oracle.json").write_text(json.dumps(oracle, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    replace_dir_atomically(root, build, keep_existing)
    return root


def _vec_lines(names: list[str], vectors: np.ndarray) -> str:
    """entity_embedding.vec / relation_embedding.vec rows as MIND writes them (a tab after the last value)."""
    return "".join(name + "\t" + "\t".join(f"{x:.6f}" for x in v) + "\t\n" for name, v in zip(names, vectors))


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in lines))


# Number formats of the behaviors' extra files: click probabilities x 1e5 as text, labels as suffixes and digits.
_PROB_TEXT = np.array([f"{i / 1e5:.5f}" for i in range(100001)], dtype=object)
_LABEL_SUFFIX = np.array(["-0", "-1"], dtype=object)
_DIGITS = np.array(["0", "1"], dtype=object)


class _DemoWorld:
    """The demo's world (`generate_demo`'s docstring): news, users and their base histories, drawn at construction;
    then each split's impressions (`make_split`) and the entity vectors (`write_news_and_vectors`). Every draw
    comes from one seeded Generator, in the reference generator's order, so the bytes depend only on the seed,
    the sizes and numpy's version (tests/test_prepare.py records them)."""

    def __init__(self, rng: np.random.Generator, num_news: int, num_users: int):
        self.rng, self.num_news, self.num_users = rng, num_news, num_users
        self.vocab = _Vocabulary()
        self.cats = list(CATEGORIES)
        self.n_cat = len(self.cats)
        self.shares = CATEGORY_WEIGHTS / CATEGORY_WEIGHTS.sum()
        self._draw_news()
        self._draw_users()
        self.base_news, self.base_off = self.histories(self.hist_len, BASE_HISTORY_WINDOW)
        self.base_strings = np.array(_segment_join(self.news_id[self.base_news], self.base_off), dtype=object)
        self.activity_cdf = np.cumsum(self.activity) / self.activity.sum()

    def _draw_news(self) -> None:
        """Category, subcategory, latent popularity, texts with entities and ids of every news; its news.tsv row."""
        rng, num_news, vocab, cats = self.rng, self.num_news, self.vocab, self.cats
        category = rng.choice(self.n_cat, size=num_news, p=self.shares)
        n_sub = np.array([len(CATEGORIES[c]["sub"]) for c in cats])
        subcategory = (rng.random(num_news) * n_sub[category]).astype(np.int64)
        popularity = rng.normal(0.0, 1.0, num_news)
        topical_share = rng.uniform(0.45, 0.7, num_news)
        entity_share = np.where(rng.random(num_news) < 0.2, 0.0, rng.uniform(0.03, 0.12, num_news))
        title_len = rng.integers(6, 15, num_news)
        abstract_len = np.where(rng.random(num_news) < 0.08, 0, rng.integers(15, 41, num_news))
        titles, title_entities = _make_texts(rng, vocab, category, title_len, topical_share, entity_share, True)
        abstracts, abstract_entities = _make_texts(rng, vocab, category, abstract_len, topical_share, entity_share,
                                                   False)
        news_number = rng.choice(9 * num_news, num_news, replace=False)  # ids unrelated to publication order
        news_id = np.array([f"N{10000 + k}" for k in news_number.tolist()], dtype=object)
        sub_names = [CATEGORIES[c]["sub"] for c in cats]
        self.news_lines = np.array([
            f"{nid}\t{cats[c]}\t{sub_names[c][s]}\t{t}\t{a}\thttps://assets.msn.com/labs/mind/{nid}.html\t{te}\t{ae}"
            for nid, c, s, t, a, te, ae in zip(news_id.tolist(), category.tolist(), subcategory.tolist(), titles,
                                               abstracts, title_entities, abstract_entities)], dtype=object)
        self.category, self.popularity, self.news_id = category, popularity, news_id

    def _draw_users(self) -> None:
        """Preferences over categories, ids, activity and history lengths of every user; the history samplers."""
        rng, num_users = self.rng, self.num_users
        prefs = rng.dirichlet(PREFERENCE_CONCENTRATION * self.shares, size=num_users)  # [U, K]
        self.lift = np.log((prefs + 0.01) / (self.shares + 0.01))  # [U, K] what a content model can learn from histories
        user_number = rng.choice(9 * num_users, num_users, replace=False)
        self.user_id = np.array([f"U{10000 + k}" for k in user_number.tolist()], dtype=object)
        self.activity = rng.lognormal(0.0, 0.8, num_users)
        hist_len = np.clip(np.rint(rng.lognormal(np.log(18.0), 0.9, num_users)), 1, 80).astype(np.int64)
        hist_len[rng.random(num_users) < 0.07] = 0
        self.hist_len = hist_len
        # History clicks ~ exposure x click probability: category ~ preference lift x news mass in the window,
        # news within the category ~ exp((exposure + popularity weight) * popularity).
        popularity = self.popularity
        self.hist_sampler = _WindowSampler(self.category, np.exp((EXPOSURE_WEIGHT + POPULARITY_WEIGHT) * popularity),
                                           self.n_cat)
        self.show_sampler = _WindowSampler(np.zeros(self.num_news, dtype=np.int64),
                                           np.exp(EXPOSURE_WEIGHT * popularity), 1)
        self.user_category_weight = np.exp(AFFINITY_WEIGHT * self.lift)

    def window(self, frac: tuple[float, float]) -> tuple[int, int]:
        lo, hi = int(frac[0] * self.num_news), int(frac[1] * self.num_news)
        return lo, max(hi, lo + 1)

    def histories(self, lengths: np.ndarray, frac: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        """Distinct clicked news per user from a window: (flat news, offsets [U+1])."""
        rng, num_users = self.rng, self.num_users
        lo, hi = self.window(frac)
        mass = self.hist_sampler.mass(lo, hi)
        probs = self.user_category_weight * mass
        probs = np.where(probs.sum(1, keepdims=True) > 0, probs, 1.0) * (mass > 0)
        rows = np.repeat(np.arange(num_users), lengths)
        cat_of = _categorical_rows(rng, probs / probs.sum(1, keepdims=True), rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        news, keep = _draw_distinct(rng, offsets, lambda slots: self.hist_sampler.draw(rng, cat_of[slots], lo, hi))
        news, rows = news[keep], rows[keep]
        return news, np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=num_users))])

    def make_split(self, name: str, n_impr: int, labelled: bool, folder: Path) -> dict:
        """Draw one split and write its behaviors.tsv and click_probabilities.tsv (and, for test,
        labels_hidden.tsv) into `folder`. Every random draw is made for the whole split, in a fixed order;
        only the text is made and written `WRITE_CHUNK` impressions at a time (a MIND-large-sized split's
        strings would take several GB at once). Returns the news the split references and its oracle metrics."""
        hist_strings, parts = self._split_histories(name)
        s = self._draw_impressions(name, n_impr)
        self._write_behaviors(name, s, hist_strings, labelled, folder)
        return self._summary(name, s, parts)

    def _split_histories(self, name: str) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """Each user's history text in this split (dev and test add a few recent clicks) and its parts
        ((flat news, offsets) of the base and of the added clicks)."""
        n_extra, extra_window = EXTRA_HISTORY[name]
        hist_strings, parts = self.base_strings, [(self.base_news, self.base_off)]
        if n_extra:
            extra_len = np.where(self.hist_len > 0, self.rng.integers(0, n_extra + 1, self.num_users), 0)
            extra_news, extra_off = self.histories(extra_len, extra_window)
            extra_strings = np.array(_segment_join(self.news_id[extra_news], extra_off), dtype=object)
            both = (self.base_strings != "") & (extra_strings != "")
            hist_strings = self.base_strings + np.where(both, " ", "") + extra_strings
            parts.append((extra_news, extra_off))
        return hist_strings, parts

    def _draw_impressions(self, name: str, n_impr: int) -> dict:
        """Users, candidates, click probabilities and labels of the split's impressions (numbers only), and their
        times. Every impression gets both classes: a click drawn ~ prob where none, a non-click ~ (1 - prob) where
        all."""
        rng, num_users = self.rng, self.num_users
        lo, hi = self.window(SHOWN_WINDOW[name])
        users = np.minimum(np.searchsorted(self.activity_cdf, rng.random(n_impr), side="right"), num_users - 1)
        counts = np.minimum(rng.integers(SHOWN_PER_IMPRESSION[0], SHOWN_PER_IMPRESSION[1] + 1, n_impr), hi - lo)
        rows = np.repeat(np.arange(n_impr, dtype=np.int32), counts)  # [candidates] impression of each
        cand, keep = _draw_distinct(rng, np.concatenate([[0], np.cumsum(counts)]), lambda slots: self.show_sampler.draw(
            rng, np.zeros(len(slots), dtype=np.int8), lo, hi))
        cand, rows = cand[keep], rows[keep]
        del keep
        counts = np.bincount(rows, minlength=n_impr)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        n_cand = len(cand)
        affinity = np.empty(n_cand)
        for a, b in _chunks(n_cand):
            affinity[a:b] = self.lift[users[rows[a:b]], self.category[cand[a:b]]]
        noise = rng.normal(0.0, NOISE_SD, n_cand)
        prob_code = np.empty(n_cand, dtype=np.int32)  # click probability x 1e5, in 1..99999
        for a, b in _chunks(n_cand):  # elementwise, in the reference order of operations
            logit = (CLICK_BIAS + AFFINITY_WEIGHT * affinity[a:b] + POPULARITY_WEIGHT * self.popularity[cand[a:b]]
                     + noise[a:b])
            prob_code[a:b] = np.clip(np.rint(1e5 / (1 + np.exp(-logit))), 1, 99999)
        del noise
        prob = prob_code / 1e5
        label = (rng.random(n_cand) < prob).astype(np.int8)
        clicks = np.bincount(rows[label == 1], minlength=n_impr)
        no_click = np.flatnonzero(clicks == 0)
        label[_segment_pick(rng, prob, offsets, no_click)] = 1
        clicks = np.bincount(rows[label == 1], minlength=n_impr)
        all_click = np.flatnonzero(clicks == counts)
        label[_segment_pick(rng, 1 - prob, offsets, all_click)] = 0
        del rows, clicks
        start, days = SPLIT_START[name]
        seconds = np.sort(rng.integers(0, 86400 * days, n_impr))
        return dict(n_impr=n_impr, users=users, cand=cand, offsets=offsets, affinity=affinity, prob_code=prob_code,
                    prob=prob, label=label, times_from=start, seconds=seconds)

    def _write_behaviors(self, name: str, s: dict, hist_strings: np.ndarray, labelled: bool, folder: Path) -> None:
        """behaviors.tsv, click_probabilities.tsv (and labels_hidden.tsv for test), `WRITE_CHUNK` impressions at
        a time."""
        files = {"behaviors": folder / "behaviors.tsv", "probs": folder / "click_probabilities.tsv"}
        if name == "test":
            files["labels"] = folder / "labels_hidden.tsv"
        offsets, users, label = s["offsets"], s["users"], s["label"]
        handles = {k: open(p, "w", encoding="utf-8", newline="\n") for k, p in files.items()}
        try:
            for a, b in _chunks(s["n_impr"], WRITE_CHUNK):
                lo_c, hi_c = int(offsets[a]), int(offsets[b])
                off = offsets[a:b + 1] - lo_c
                c = s["cand"][lo_c:hi_c]
                cells = self.news_id[c] + _LABEL_SUFFIX[label[lo_c:hi_c]] if labelled else self.news_id[c]
                ids = range(a + 1, b + 1)
                times = _mind_times(s["times_from"], s["seconds"][a:b])
                handles["behaviors"].write("".join(
                    f"{i}\t{u}\t{t}\t{h}\t{x}\n" for i, u, t, h, x in
                    zip(ids, self.user_id[users[a:b]].tolist(), times, hist_strings[users[a:b]].tolist(),
                        _segment_join(cells, off))))
                handles["probs"].write("".join(
                    f"{i}\t{p}\n" for i, p in zip(ids, _segment_join(_PROB_TEXT[s["prob_code"][lo_c:hi_c]], off))))
                if "labels" in handles:
                    handles["labels"].write("".join(
                        f"{i}\t{p}\n" for i, p in zip(ids, _segment_join(_DIGITS[label[lo_c:hi_c]], off))))
        finally:
            for f in handles.values():
                f.close()

    def _summary(self, name: str, s: dict, parts: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        """The news the split references (its candidates and the history news of the users it shows: only these
        go into its news.tsv) and its oracle metrics."""
        num_users, cand, label, offsets = self.num_users, s["cand"], s["label"], s["offsets"]
        shown_users = np.zeros(num_users, dtype=bool)
        shown_users[s["users"]] = True
        referenced = np.zeros(self.num_news, dtype=bool)
        referenced[cand] = True
        for flat, off in parts:
            per_user = np.repeat(np.arange(num_users), np.diff(off))
            referenced[flat[shown_users[per_user]]] = True
        metrics = {f"{name}_auc": _mean_auc(s["prob"], label, offsets),
                   f"{name}_affinity_auc": _mean_auc(s["affinity"], label, offsets),
                   f"{name}_popularity_auc": _mean_auc(self.popularity[cand], label, offsets),
                   f"{name}_impressions": int(s["n_impr"]), f"{name}_candidates": int(len(cand)),
                   f"{name}_clicks": int(label.sum())}
        return dict(news=np.flatnonzero(referenced), metrics=metrics)

    def write_news_and_vectors(self, tmp: Path, splits: dict[str, dict]) -> None:
        """Each split's news.tsv (the news it references), entity_embedding.vec (the entities they mention, as in
        MIND each split has its own file) and relation_embedding.vec. Entity and relation vectors are TransE-like,
        100-d: an entity lies near its categories' centre."""
        rng, vocab = self.rng, self.vocab
        centres = rng.normal(0.0, 0.3, (self.n_cat, 100))
        noise = rng.normal(0.0, 0.1, (len(vocab.entity_label), 100))
        entity_vectors = np.stack([centres[c].mean(0) for c in vocab.entity_categories]) + noise
        relation_vectors = rng.normal(0.0, 0.3, (len(RELATIONS), 100))
        relation_text = _vec_lines(list(RELATIONS), relation_vectors)
        wikidata = np.array(vocab.wikidata, dtype=object)
        entity_pattern = {e: f'"WikidataId": "{q}"' for e, q in enumerate(vocab.wikidata)}
        for name, s in splits.items():
            d = tmp / name
            news_rows = self.news_lines[s["news"]].tolist()
            _write_lines(d / "news.tsv", news_rows)
            blob = "\n".join(news_rows)
            used = [e for e in range(len(wikidata)) if entity_pattern[e] in blob]
            del blob
            with open(d / "entity_embedding.vec", "w", encoding="utf-8", newline="\n") as f:
                f.write(_vec_lines(wikidata[used].tolist(), entity_vectors[used]))
            with open(d / "relation_embedding.vec", "w", encoding="utf-8", newline="\n") as f:
                f.write(relation_text)


def news_in_splits(root) -> set[str]:
    """The NewsIDs of a corpus' train/dev/test news.tsv together: the news a reader of the corpus loads. A demo
    split's news.tsv lists only the news it shows or that the users it shows clicked, so news drawn but used by no
    split are in none (the default demo: 2993 of its 3000)."""
    ids: set[str] = set()
    for split in ("train", "dev", "test"):
        path = Path(root) / split / "news.tsv"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                ids.update(line.split("\t", 1)[0] for line in f if line.strip())
    return ids


def _demo_matches(root: Path, wanted: dict, seed: int) -> bool:
    """Whether `root/oracle.json` records these sizes, seed and generator version (and a labelled test split)."""
    saved = demo_settings(root)
    return (saved is not None and saved.get("sizes") == wanted and saved.get("seed") == seed
            and saved.get("test_labels") is True and saved.get("generator_version") == GENERATOR_VERSION)


# main.py's flag for each demo setting (prepare_MIND_dataset.py takes the same names): messages name these.
DEMO_FLAG_NAMES = dict(num_news="demo_news", num_users="demo_users", num_train_impressions="demo_train_impressions",
                       num_dev_impressions="demo_dev_impressions", num_test_impressions="demo_test_impressions",
                       seed="demo_seed")
DEMO_FLAGS = {name: f"--{flag}" for name, flag in DEMO_FLAG_NAMES.items()}


def demo_settings(root) -> dict | None:
    """What `root/oracle.json` records (sizes, seed, test_labels, generator_version), or None when `root` holds no
    demo corpus (no oracle.json, or one that is not a JSON object)."""
    try:
        saved = json.loads((Path(root) / "oracle.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def _flags(settings: dict) -> str:
    return " ".join(f"{DEMO_FLAGS[k]}={settings[k]}" for k in DEMO_FLAGS if k in settings)


class DemoMismatchError(ValueError):
    """The data folder already holds a demo corpus (or other files) that this request would replace."""


def _set_old_generator_aside(root: Path, version) -> Path:
    """Move a demo corpus made by an older generator to `<root>.generator-v<version>[-n]` (nothing is deleted)."""
    n, aside = 1, root.with_name(f"{root.name}.generator-v{version}")
    while aside.exists():
        n += 1
        aside = root.with_name(f"{root.name}.generator-v{version}-{n}")
    try:
        os.replace(root, aside)
    except FileNotFoundError:  # another process moved it first
        pass
    return aside


def ensure_demo(data_dir="data", *, seed: int | None = DEMO_SEED, **sizes) -> Path:
    """`<data_dir>/MIND-demo`, made by `generate_demo` unless it is there already. Never replaces a corpus made
    with other settings.

    Args:
        data_dir: the folder holding MIND-demo/.
        seed, sizes: the settings asked for (`generate_demo`'s size keywords). Those given must match an existing
            corpus; seed=None and sizes left out accept what an existing corpus has (main.py passes only the
            --demo_* flags the user typed), and take the defaults (DEMO_SIZES, seed 0) when it is generated.
    Returns:
        The corpus folder. Its settings are in `demo_settings(root)`.
    Raises:
        DemoMismatchError: MIND-demo holds a corpus made with other settings, or files that are no demo corpus
            (it is left as it is; the message names both settings and how to proceed).

    A corpus made by an older generator version with the asked settings is moved aside to
    `MIND-demo.generator-v<old>` (printed) and the current generator writes a new one. The corpus is written to
    a hidden sibling folder and renamed into place, so a reader never sees half a corpus, and processes
    generating it at once (one per node of a multi-node run on a shared filesystem) do not interleave their
    writes: the first rename wins and the others drop their identical copies."""
    unknown = set(sizes) - set(DEMO_SIZES)
    if unknown:
        raise TypeError(f"ensure_demo: unknown size arguments {sorted(unknown)}; expected some of {sorted(DEMO_SIZES)}")
    asked = {k: int(v) for k, v in sizes.items()}
    if seed is not None:
        asked["seed"] = int(seed)
    root = Path(data_dir) / "MIND-demo"
    if root.exists() and not root.is_dir():
        raise DemoMismatchError(f"{root} is a file, not a corpus folder; move it away or pass another --data_dir")
    saved = demo_settings(root)
    if saved is not None:
        have = {**saved.get("sizes", {}), "seed": saved.get("seed")}
        differ = [k for k in asked if have.get(k) != asked[k]]
        if saved.get("test_labels") is not True:
            differ.append("test labels")
        if differ:
            raise DemoMismatchError(
                f"{root} holds a demo corpus made with {_flags(have)}"
                + ("" if saved.get("test_labels") is True else " and an unlabelled test split")
                + f"; this run asks for {_flags({**have, **asked})} (different: "
                + ", ".join(DEMO_FLAGS.get(k, k) for k in differ) + "). It was left as it is. To use it, "
                "type its values (or leave the --demo_* flags out: main.py then takes the corpus as it is); to "
                "keep both, pass another --data_dir; to replace it, delete the folder first")
        if saved.get("generator_version") == GENERATOR_VERSION:
            return root
        aside = _set_old_generator_aside(root, saved.get("generator_version"))
        print(f"{root} was made by demo generator version {saved.get('generator_version')}, this code writes "
              f"version {GENERATOR_VERSION}: moved it to {aside}, generating a new one with the same settings")
        asked = have
    elif root.is_dir() and any(root.iterdir()):
        raise DemoMismatchError(f"{root} holds files but no demo corpus (no valid oracle.json): it was left as it "
                                f"is. Pass another --data_dir, or move the folder away to have the demo generated")
    wanted = {**DEMO_SIZES, **{k: v for k, v in asked.items() if k != "seed"}}
    seed = asked.get("seed", DEMO_SEED)
    t0 = time.time()

    def keep_existing(r: Path) -> bool:
        """Once generated: True if another process put the same corpus there meanwhile (ours is dropped); an
        error, never a replacement, if what appeared there is anything else."""
        if _demo_matches(r, wanted, seed):
            return True
        if r.exists() and (not r.is_dir() or any(r.iterdir())):
            raise DemoMismatchError(f"{r} appeared while the demo was generated, with other settings or files; it "
                                    f"was left as it is. Pass another --data_dir")
        return False

    generate_demo(root, seed=seed, keep_existing=keep_existing, **wanted)
    written = len(news_in_splits(root))
    print(f"generated the demo corpus {root} ({wanted['num_news']} news drawn, {written} of them in the splits' "
          f"news.tsv: the other {wanted['num_news'] - written} are neither shown nor in the history of a user shown in "
          f"any split; {wanted['num_users']} users, "
          f"{wanted['num_train_impressions']}/{wanted['num_dev_impressions']}/{wanted['num_test_impressions']} "
          f"train/dev/test impressions, seed {seed}) in {time.time() - t0:.1f}s")
    return root
