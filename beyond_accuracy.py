"""Beyond-accuracy metrics of the top-k of each ranking: diversity, novelty, popularity and category bias,
calibration, unexpectedness and serendipity, sentiment (per impression), and coverage, Gini of exposure and
personalization (over all impressions). Every formula, what is skipped and what is counted: docs/beyond-accuracy.md.

They are computed from the ranks the evaluation already has (the same ranks the accuracy metrics and the written
files use), vectorised over impressions in numpy. A value that cannot be computed for an impression (an empty
history, fewer than two news with a category, no label) is NaN there and counted, never a zero; a top-k news
without the category or text a metric reads is left out of that metric and counted.

Legend: I impressions of a split, k top-k size, N news in the corpus table (0 = padding / unknown news),
H history length, D embedding dim, G categories.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from settings import Settings, all_at_least_1, setting

CALIBRATION_ALPHA = 0.01  # Steck (2018): q~ = (1 - a) q + a p keeps KL(p || q~) finite
PERSONALIZATION_PAIRS = 20_000  # impression pairs sampled (seed PERSONALIZATION_SEED) when all pairs are more
PERSONALIZATION_SEED = 0
ROW_CHUNK = 16_384  # impressions per block of the embedding metrics: bounds [rows, k, D] to ~ 30 MB at k=10, D=50


@dataclass(frozen=True)
class Metric:
    reads: tuple[str, ...]  # news features: category, subcategory, embedding, sentiment; history; labels
    scope: str = "impression"  # "impression": a value per impression (records, paired tests); "global": one value
    doc: str = ""


METRICS: dict[str, Metric] = {
    "ild_category": Metric(("category",), doc="share of top-k pairs with different categories"),
    "ild_subcategory": Metric(("subcategory",), doc="share of top-k pairs with different subcategories"),
    "ild_embedding": Metric(("embedding",), doc="mean pairwise cosine distance of the top-k"),
    "novelty": Metric((), doc="mean -log2 of the top-k's smoothed train click share"),
    "popularity_bias": Metric(("history",), doc="novelty of the history minus novelty of the top-k (bits)"),
    "category_bias": Metric(("category", "history"), doc="top-k share minus history share of the user's main "
                            "category"),
    "calibration_kl": Metric(("category", "history"), doc="KL(p_history || (1-a) q_topk + a p_history), nats"),
    "calibration_js": Metric(("category", "history"), doc="Jensen-Shannon divergence of the two, bits"),
    "unexpectedness": Metric(("embedding", "history"), doc="mean cosine distance top-k x history"),
    "serendipity": Metric(("embedding", "history", "labels"), doc="clicked top-k news weighted by their distance "
                          "to the history, per top-k news"),
    "sentiment": Metric(("sentiment",), doc="mean sentiment of the top-k"),
    "sentiment_spread": Metric(("sentiment",), doc="std of the top-k's sentiment"),
    "coverage": Metric((), "global", "distinct top-k news / distinct candidate news"),
    "gini": Metric((), "global", "Gini of the top-k exposure over the candidate news"),
    "personalization": Metric((), "global", "1 - mean top-k overlap between impressions of different users"),
}
EMBEDDINGS = ("glove", "model")


def parse_metric_names(text: str) -> list[str]:
    """`--beyond_metrics`: 'all', 'none' or comma-separated names -> names in METRICS order."""
    words = [w.strip() for w in str(text).split(",") if w.strip()]
    if words == ["all"]:
        return list(METRICS)
    if words == ["none"] or not words:
        return []
    unknown = [w for w in words if w not in METRICS]
    if unknown:
        raise ValueError(f"--beyond_metrics: unknown metric {unknown[0]!r}; choose from all, none or "
                         f"{', '.join(METRICS)}")
    return [m for m in METRICS if m in words]


def _metric_names_error(text: str) -> str | None:
    try:
        parse_metric_names(text)
    except ValueError as e:
        return str(e).split(": ", 1)[1]
    return None


@dataclass
class BeyondSettings(Settings):
    """Beyond-accuracy metrics of --mode=dev/test and the re-ranking step between scores and ranks."""

    title: ClassVar[str] = "beyond accuracy"
    modes: ClassVar[tuple[str, ...]] = ("dev", "test")
    description: ClassVar[str] = ("--mode=dev/test: diversity, novelty, calibration, serendipity, coverage and "
                                  "sentiment of each ranking's top-k (docs/beyond-accuracy.md), and re-ranking")
    beyond_metrics: str = setting("all", "comma-separated beyond-accuracy metrics, 'all' or 'none': "
                                  + ", ".join(METRICS), check=_metric_names_error, architecture=False)
    beyond_k: list[int] = setting([5, 10], "top-k sizes of the beyond-accuracy metrics, e.g. 5,10",
                                  check=all_at_least_1, architecture=False)
    beyond_embedding: str = setting("glove", "news vectors of ild_embedding, unexpectedness and serendipity: glove "
                                    "(mean offline GloVe 6B 50-d vector of the title words, the same for every model) "
                                    "or model (the checkpoint's own news vectors)", choices=EMBEDDINGS,
                                    architecture=False)
    rerank: str = setting("none", "re-rank each impression's candidates after scoring: mmr (maximal marginal "
                          "relevance on the --beyond_embedding vectors) or calibrated (Steck 2018, categories)",
                          choices=("none", "mmr", "calibrated"), architecture=False)
    rerank_lambda: float = setting(0.0, "weight of the diversity (mmr) or calibration (calibrated) term against the "
                                   "relevance, in [0, 1]; 0 keeps the model's ranking",
                                   check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]", architecture=False)


# ----------------------------------------------------------------------------------------------------------
# News features
# ----------------------------------------------------------------------------------------------------------

@dataclass
class NewsFeatures:
    """What the metrics read of each news, by news index [N] (row 0: padding / unknown news)."""

    category: np.ndarray  # [N] int, 0 = none
    subcategory: np.ndarray  # [N] int, 0 = none
    clicks: np.ndarray  # [N] float, clicks in the train split
    embedding: np.ndarray | None = None  # [N, D] float32 unit rows; a zero row = no text (no vector)
    sentiment: np.ndarray | None = None  # [N] float in [-1, 1]; NaN = no text
    embedding_source: str = ""
    sentiment_source: str = ""

    def __post_init__(self) -> None:
        # Row 0 is padding or a news missing from news.tsv: it has no category, text or vector of its own (a model
        # encodes it like any news, but that vector describes nothing).
        self.category, self.subcategory = self.category.copy(), self.subcategory.copy()
        self.category[0] = self.subcategory[0] = 0
        if self.embedding is not None:
            self.embedding = self.embedding.copy()
            self.embedding[0] = 0
        if self.sentiment is not None:
            self.sentiment = np.asarray(self.sentiment, dtype=np.float64).copy()
            self.sentiment[0] = np.nan

    def novelty_bits(self) -> np.ndarray:
        """[N] -log2 p_j, p_j = (clicks_j + 1) / (total clicks + N - 1): add-one smoothing over the N - 1 news."""
        n = len(self.clicks) - 1
        p = (self.clicks + 1.0) / (self.clicks.sum() + max(n, 1))
        return -np.log2(p)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1; zero rows (and non-finite ones) stay zero, meaning 'no vector'."""
    v = np.asarray(vectors, dtype=np.float32)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    ok = np.isfinite(norm) & (norm > 0)
    return np.where(ok, v / np.where(ok, norm, 1), 0).astype(np.float32)


def glove_title_vectors(title_tokens: np.ndarray, vocab: Sequence[str]) -> np.ndarray:
    """[N, L] title word ids -> [N, 50] unit mean vectors of the title words found in the offline GloVe 6B 50-d
    (words outside the vocabulary, <UNK>, carry no vector); a title with none found gets a zero row."""
    from glove_vectors import lookup_found

    from scipy import sparse

    table, found = lookup_found(vocab, 50)  # [V, 50], [V] bool
    ids = np.asarray(title_tokens)
    rows, cols = np.nonzero(found[ids])
    words = sparse.csr_matrix((np.ones(len(rows)), (rows, ids[rows, cols])), shape=(len(ids), len(vocab)))
    total = words @ table.astype(np.float64)  # [N, 50] sum of the found words' vectors
    return unit_rows(total / np.maximum(np.asarray(words.sum(1)), 1))


def vader_sentiment(texts: Sequence[str], which: np.ndarray) -> np.ndarray:
    """VADER compound polarity [-1, 1] of `texts[j]` for each j in `which`; NaN elsewhere and for empty texts."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError("--beyond_metrics sentiment needs the vaderSentiment package (pip install -r "
                          "requirements.txt), or leave sentiment out of --beyond_metrics") from None
    analyzer = SentimentIntensityAnalyzer()
    out = np.full(len(texts), np.nan)
    for j in np.asarray(which, dtype=np.int64):
        text = texts[j]
        if text and text.strip():
            out[j] = analyzer.polarity_scores(text)["compound"]
    return out


def news_features(corpus, clicks: np.ndarray, names: Sequence[str], embedding: str = "glove",
                  model_vectors: np.ndarray | None = None, sentiment_news: np.ndarray | None = None) -> NewsFeatures:
    """The features `names` read, from a corpus (`MIND_corpus.Corpus`). A category or subcategory with an empty
    name counts as none. Sentiment: the corpus's own `sentiment` column when it has one, else VADER on the titles
    of `sentiment_news` (the news the top-k lists hold: VADER is the slow part)."""
    reads = {r for m in names for r in METRICS[m].reads}
    cat = np.asarray(corpus.news["category"]).astype(np.int64)
    sub = np.asarray(corpus.news["subcategory"]).astype(np.int64)
    cat_names, sub_names = corpus.meta.category_names, corpus.meta.subcategory_names
    cat = np.where(np.array([not str(s).strip() for s in cat_names])[cat], 0, cat)
    sub = np.where(np.array([not str(s).strip() for s in sub_names])[sub], 0, sub)
    emb, emb_source, senti, senti_source = None, "", None, ""
    if "embedding" in reads:
        if embedding == "model":
            if model_vectors is None or len(model_vectors) != len(cat):
                raise ValueError("--beyond_embedding=model: this model has no table of news vectors (a personalized "
                                 "news encoder encodes news per user); use --beyond_embedding=glove")
            emb, emb_source = unit_rows(model_vectors), "the model's news vectors"
        else:
            from glove_vectors import GloveUnavailable

            try:
                emb = glove_title_vectors(corpus.news["title"], corpus.meta.vocab)
                emb_source = "mean GloVe 6B 50-d vector of the title words"
            except GloveUnavailable as e:  # the package is optional: the other metrics go on, this one is reported
                emb_source = f"none ({e})"
    if "sentiment" in reads:
        senti, senti_source = news_sentiment(corpus, len(cat), sentiment_news)
    return NewsFeatures(cat, sub, np.asarray(clicks, dtype=np.float64), emb, senti, emb_source, senti_source)


def news_sentiment(corpus, n: int, which: np.ndarray | None) -> tuple[np.ndarray | None, str]:
    """([N] polarity, its source): the corpus's own sentiment (a `sentiment` news column, or the converter's
    SENTIMENT_FILE beside the splits: EB-NeRD's labels), else VADER on the titles of `which` (all news when None),
    but only for English news: VADER is an English lexicon, and on Danish or Norwegian words it finds almost
    nothing and calls them neutral, so another language gives (None, the reason) and the metric is not computed."""
    import pandas as pd

    from MIND_corpus import ENGLISH, SENTIMENT_FILE, corpus_language

    own = corpus.news.get("sentiment") if hasattr(corpus.news, "get") else None
    if own is not None:
        return np.asarray(own, dtype=np.float64), "the dataset's sentiment column"
    root = getattr(corpus, "root", None)
    path = Path(root) / SENTIMENT_FILE if root is not None else None
    if path is not None and path.is_file():
        table = pd.read_csv(path, sep="\t", header=None, names=["nid", "polarity"], dtype={"nid": str},
                            keep_default_na=False)
        rows = corpus.news_index.get_indexer(table["nid"]) + 1  # news index: row 0 is padding (-1 + 1: unknown)
        out = np.full(n, np.nan)
        known = rows > 0
        out[rows[known]] = pd.to_numeric(table["polarity"], errors="coerce").to_numpy()[known]
        return out, (f"the dataset's sentiment column ({SENTIMENT_FILE} beside the corpus: "
                     f"{int(np.isfinite(out).sum())} of {n - 1} news)")
    language = corpus_language(root) if root is not None else ENGLISH
    if language != ENGLISH:
        return None, (f"none (VADER is an English lexicon and the news are in {language}; the corpus has no "
                      f"{SENTIMENT_FILE} of its own)")
    which = np.arange(n) if which is None else which
    return vader_sentiment(corpus.news_texts("title"), which), "VADER compound polarity of the title"


# ----------------------------------------------------------------------------------------------------------
# Top-k lists
# ----------------------------------------------------------------------------------------------------------

def top_k(ranks: np.ndarray, candidates: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    """Flat 1-based ranks, candidates [sum n], offsets [I+1] -> [I, k] news indices best first, -1 where an
    impression has fewer than k candidates."""
    sizes = np.diff(offsets)
    imp = np.repeat(np.arange(len(sizes)), sizes)
    r = np.asarray(ranks, dtype=np.int64)
    sel = r <= k
    out = np.full((len(sizes), k), -1, dtype=np.int64)
    out[imp[sel], r[sel] - 1] = np.asarray(candidates, dtype=np.int64)[sel]
    return out


def check_k(ks: Sequence[int], offsets: np.ndarray) -> None:
    """k <= 0, or k larger than every impression (every 'top-k' would be the whole list): an error naming the flag."""
    sizes = np.diff(offsets)
    longest = int(sizes.max()) if len(sizes) else 0
    bad = [k for k in ks if k <= 0 or k > longest]
    if bad:
        raise ValueError(f"--beyond_k {bad[0]}: must be between 1 and {longest}, the most candidates an impression "
                         f"of this split has")


def _pair_mean(values: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over ordered pairs i != j of `values` [R, k, k] where both news are `known` [R, k] -> (mean [R],
    NaN where fewer than two known; known count [R])."""
    k = known.shape[1]
    pairs = known[:, :, None] & known[:, None, :] & ~np.eye(k, dtype=bool)
    n = pairs.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (values * pairs).sum((1, 2)) / np.maximum(n, 1), np.nan), known.sum(1)


def ild_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[R, k] category ids (0 = none, -1 = empty slot) -> (share of pairs with different ids [R], known [R, k])."""
    known = labels > 0
    return _pair_mean(labels[:, :, None] != labels[:, None, :], known)[0], known


def ild_vectors(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[R, k, D] unit vectors (zero = none) -> (mean pairwise cosine distance [R], known [R, k])."""
    known = np.abs(vectors).sum(-1) > 0
    sim = np.matmul(vectors, vectors.transpose(0, 2, 1))  # [R, k, k]
    return _pair_mean(1.0 - sim, known)[0], known


def distributions(labels: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """[R, m] category ids (<= 0: none) -> (share of each category [R, G] (rows of zeros where none), known [R])."""
    rows = np.repeat(np.arange(len(labels)), labels.shape[1])
    flat = labels.ravel()
    ok = flat > 0
    counts = np.bincount(rows[ok] * groups + flat[ok], minlength=len(labels) * groups).reshape(len(labels), groups)
    total = counts.sum(1)
    return counts / np.maximum(total, 1)[:, None], total


def kl_calibration(p: np.ndarray, q: np.ndarray, alpha: float = CALIBRATION_ALPHA) -> np.ndarray:
    """Steck's miscalibration: sum_g p log(p / q~), q~ = (1 - alpha) q + alpha p, natural log; rows [R, G]."""
    q_s = (1 - alpha) * q + alpha * p
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / np.where(q_s > 0, q_s, 1)), 0.0)
    return terms.sum(1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits (0 .. 1) between the rows of p and q [R, G]."""
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, p * np.log2(p / np.where(m > 0, m, 1)), 0.0).sum(1)
        b = np.where(q > 0, q * np.log2(q / np.where(m > 0, m, 1)), 0.0).sum(1)
    return (a + b) / 2


def gini(exposure: np.ndarray) -> float:
    """Gini of exposure counts over n items: sum_j (2j - n - 1) e_(j) / (n sum e), e sorted ascending, j from 1
    (no n / (n - 1) correction); NaN when nothing is exposed."""
    e = np.sort(np.asarray(exposure, dtype=np.float64))
    n, total = len(e), e.sum()
    if n == 0 or total == 0:
        return float("nan")
    return float(((2 * np.arange(1, n + 1) - n - 1) * e).sum() / (n * total))


def coverage(top: np.ndarray, candidates: np.ndarray | None = None, catalogue: np.ndarray | None = None
             ) -> tuple[float, np.ndarray, np.ndarray]:
    """(distinct top-k news / distinct candidate news, the catalogue [M], each one's top-k slots [M]); the unknown
    news (index 0) is no item of the catalogue. `catalogue` (sorted distinct candidates > 0) saves the np.unique."""
    if catalogue is None:
        catalogue = np.unique(np.asarray(candidates))
        catalogue = catalogue[catalogue > 0]
    shown = top[top > 0]
    exposure = np.bincount(np.searchsorted(catalogue, shown), minlength=len(catalogue))
    return (float((exposure > 0).sum() / len(catalogue)) if len(catalogue) else float("nan")), catalogue, exposure


def personalization(top: np.ndarray, users: np.ndarray | None, pairs: int = PERSONALIZATION_PAIRS,
                    seed: int = PERSONALIZATION_SEED) -> tuple[float, int]:
    """1 - mean overlap |A ∩ B| / sqrt(|A| |B|) of the top-k news of impression pairs of different users (`users`: the
    split's per-impression user keys; given train user indices instead (arrays without keys), an index of 0,
    unknown to train, counts as different from every user); every pair when there are at most `pairs`,
    else `pairs` drawn with `seed`. Returns (value, pairs used)."""
    rows = np.flatnonzero((top > 0).any(1))
    n = len(rows)
    if n < 2:
        return float("nan"), 0
    if n * (n - 1) // 2 <= pairs:
        a, b = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        a, b = rng.integers(0, n, pairs), rng.integers(0, n - 1, pairs)
        b = b + (b >= a)  # b != a
    a, b = rows[a], rows[b]
    if users is not None:
        u = np.asarray(users)
        keep = (u[a] != u[b]) | (u[a] == 0)
        a, b = a[keep], b[keep]
    if not len(a):
        return float("nan"), 0
    ta, tb = top[a], top[b]
    shared = ((ta[:, :, None] == tb[:, None, :]) & (ta[:, :, None] > 0)).sum((1, 2))
    size = np.sqrt((ta > 0).sum(1) * (tb > 0).sum(1))
    return float(1.0 - (shared / size).mean()), len(a)


# ----------------------------------------------------------------------------------------------------------
# All metrics of a split
# ----------------------------------------------------------------------------------------------------------

@dataclass
class BeyondResult:
    """The beyond-accuracy metrics of one ranking of a split."""

    values: dict[str, np.ndarray] = field(default_factory=dict)  # "name@k" -> [I] float64, NaN: not computed
    means: dict[str, float] = field(default_factory=dict)  # "name@k" -> mean over the impressions computed
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # "name@k" -> scored, skipped, missing_news
    info: dict[str, Any] = field(default_factory=dict)  # k sizes, impressions shorter than k, sources, notes

    def summary(self) -> dict[str, Any]:
        """What metrics.json keeps: means, counts and info."""
        return {"means": self.means, "counts": self.counts, **self.info}


@dataclass
class HistorySummary:
    """What the metrics read of each row of the de-duplicated history table [U] (computed once per row, not per
    impression: MIND repeats a user's history in each of their impressions)."""

    length: np.ndarray  # [U] news in the history
    novelty: np.ndarray  # [U] mean -log2 p of its news
    p: np.ndarray | None = None  # [U, G] category distribution; zero rows: no news with a category
    p_n: np.ndarray | None = None  # [U] news with a category
    mean_vec: np.ndarray | None = None  # [U, D] mean of its news' unit vectors
    n_vec: np.ndarray | None = None  # [U] news with a vector


def summarize_histories(histories: np.ndarray, f: NewsFeatures, groups: int, need: set[str]) -> HistorySummary:
    """histories [U, H] news indices (0 = none) -> HistorySummary. The sums over each history's news are one sparse
    [U, N] x [N, ...] product (no [U, H, D] array)."""
    from scipy import sparse

    h = np.asarray(histories)
    rows, cols = np.nonzero(h > 0)
    news = h[rows, cols].astype(np.int64)
    counts = sparse.csr_matrix((np.ones(len(news)), (rows, news)), shape=(len(h), len(f.category)))
    n = np.asarray(counts.sum(1)).ravel()
    out = HistorySummary(n, (counts @ f.novelty_bits()) / np.maximum(n, 1))
    if "category" in need:
        cat = sparse.csr_matrix((np.ones(len(f.category)), (np.arange(len(f.category)), f.category)),
                                shape=(len(f.category), groups))
        per = np.asarray((counts @ cat).todense())  # [U, G], column 0: news without a category
        per[:, 0] = 0
        out.p_n = per.sum(1)
        out.p = per / np.maximum(out.p_n, 1)[:, None]
    if "embedding" in need and f.embedding is not None:
        has = (np.abs(f.embedding).sum(1) > 0).astype(np.float64)
        out.n_vec = counts @ has
        out.mean_vec = (counts @ f.embedding.astype(np.float64)) / np.maximum(out.n_vec, 1)[:, None]
    return out


def _block(top: np.ndarray, h: HistorySummary, clicked: np.ndarray | None, f: NewsFeatures, names: set[str]
           ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per-impression metrics of a block of R impressions: top [R, k] news (-1 empty), h the summaries of their
    histories ([R] rows), clicked [R, k] 0/1 (-1 empty) or None -> ({name: [R]}, {name: top-k news without the
    feature read})."""
    out: dict[str, np.ndarray] = {}
    missing: dict[str, int] = {}
    slot = top >= 0
    t = np.where(slot, top, 0)
    nan = np.full(len(top), np.nan)
    for name, table in (("ild_category", f.category), ("ild_subcategory", f.subcategory)):
        if name in names:
            labels = np.where(slot, table[t], -1)
            out[name], known = ild_labels(labels)
            missing[name] = int((slot & ~known).sum())
    top_nov = np.where(slot, f.novelty_bits()[t], 0).sum(1) / np.maximum(slot.sum(1), 1)
    if "novelty" in names:
        out["novelty"] = np.where(slot.any(1), top_nov, np.nan)
    if "popularity_bias" in names:
        out["popularity_bias"] = np.where((h.length > 0) & slot.any(1), h.novelty - top_nov, np.nan)
    calib = names & {"category_bias", "calibration_kl", "calibration_js"}
    if calib:
        q, q_n = distributions(np.where(slot, f.category[t], 0), h.p.shape[1])
        ok = (h.p_n > 0) & (q_n > 0)
        main = h.p.argmax(1)
        rows = np.arange(len(q))
        values = {"category_bias": q[rows, main] - h.p[rows, main], "calibration_kl": kl_calibration(h.p, q),
                  "calibration_js": js_divergence(h.p, q)}
        for name in calib:
            out[name] = np.where(ok, values[name], np.nan)
            missing[name] = int((slot & (f.category[t] == 0)).sum())
    if f.embedding is not None and names & {"ild_embedding", "unexpectedness", "serendipity"}:
        vec = f.embedding[t] * slot[:, :, None]  # [R, k, D]
        known = np.abs(vec).sum(-1) > 0  # [R, k]
        if "ild_embedding" in names:
            out["ild_embedding"] = ild_vectors(vec)[0]
            missing["ild_embedding"] = int((slot & ~known).sum())
        if names & {"unexpectedness", "serendipity"}:
            # mean over the history of 1 - cos = 1 - v_j . (mean of the history's unit vectors)
            dist = np.where(known, 1.0 - np.einsum("rkd,rd->rk", vec, h.mean_vec), 0.0)  # [R, k]
            ok = (h.n_vec > 0) & known.any(1)
            n_known = np.maximum(known.sum(1), 1)
            if "unexpectedness" in names:
                out["unexpectedness"] = np.where(ok, dist.sum(1) / n_known, np.nan)
                missing["unexpectedness"] = int((slot & ~known).sum())
            if "serendipity" in names:
                value = (dist * (clicked == 1)).sum(1) / n_known if clicked is not None else nan
                out["serendipity"] = np.where(ok, value, np.nan)
                missing["serendipity"] = int((slot & ~known).sum())
    if f.sentiment is not None and names & {"sentiment", "sentiment_spread"}:
        s = np.where(slot, f.sentiment[t], np.nan)
        known = ~np.isnan(s)
        n = known.sum(1)
        mean = np.where(known, s, 0).sum(1) / np.maximum(n, 1)
        spread = np.sqrt(np.where(known, (s - mean[:, None]) ** 2, 0).sum(1) / np.maximum(n, 1))
        for name, value, least in (("sentiment", mean, 1), ("sentiment_spread", spread, 2)):
            if name in names:
                out[name] = np.where(n >= least, value, np.nan)
                missing[name] = int((slot & ~known).sum())
    return out, missing


def compute(ranks: np.ndarray, beh: Mapping[str, Any], features: NewsFeatures, ks: Sequence[int],
            names: Sequence[str]) -> BeyondResult:
    """Every metric of `names` at every k of `ks` for the ranking `ranks` (flat, 1-based, behaviors order) of the
    split `beh` (offsets, candidates, labels, histories, history_row, user)."""
    offsets = np.asarray(beh["offsets"])
    check_k(ks, offsets)
    cands, labels = np.asarray(beh["candidates"]), np.asarray(beh["labels"])
    hist_rows = np.asarray(beh["history_row"])
    histories = np.asarray(beh["histories"])
    labelled = bool(len(labels)) and bool((labels >= 0).all())
    why = {"labels": None if labelled else "needs labels",
           "embedding": None if features.embedding is not None else f"no news vectors: {features.embedding_source}",
           "sentiment": None if features.sentiment is not None else "no sentiment of the news" + (
               f": {features.sentiment_source}" if features.sentiment_source else "")}
    not_computed = {m: next(why[r] for r in METRICS[m].reads if why.get(r)) for m in names
                    if any(why.get(r) for r in METRICS[m].reads)}
    chosen = [m for m in names if m not in not_computed]
    local = {m for m in chosen if METRICS[m].scope == "impression"}
    groups = int(max(features.category.max(), 0)) + 1
    res = BeyondResult(info={"k": list(ks), "metrics": chosen, "impressions": len(offsets) - 1,
                             "embedding": features.embedding_source, "sentiment_source": features.sentiment_source,
                             "not_computed": not_computed})
    nonempty = np.diff(offsets) > 0
    need = {r for m in local for r in METRICS[m].reads}
    summary = summarize_histories(histories, features, groups, need)
    catalogue = np.unique(cands)
    catalogue = catalogue[catalogue > 0]
    for k in ks:
        top = top_k(ranks, cands, offsets, k)
        clicked = top_k(ranks, labels, offsets, k) if labelled else None
        res.info[f"shorter_than_{k}"] = int((nonempty & (np.diff(offsets) < k)).sum())
        parts: dict[str, list[np.ndarray]] = {}
        missing: dict[str, int] = {}
        for start in range(0, len(top), ROW_CHUNK):
            rows = slice(start, start + ROW_CHUNK)
            h = HistorySummary(**{k: (v[hist_rows[rows]] if v is not None else None)
                                  for k, v in vars(summary).items()})
            out, miss = _block(top[rows], h, clicked[rows] if clicked is not None else None, features, local)
            for name, v in out.items():
                parts.setdefault(name, []).append(v)
            for name, m in miss.items():
                missing[name] = missing.get(name, 0) + m
        for name in (m for m in chosen if m in parts):
            key = f"{name}@{k}"
            v = np.concatenate(parts[name])
            res.values[key] = v
            scored = int(np.isfinite(v).sum())
            res.means[key] = float(np.nanmean(v)) if scored else float("nan")
            res.counts[key] = {"scored": scored, "skipped": int(nonempty.sum()) - scored,
                               "missing_news": missing.get(name, 0)}
        # user_key tells apart the users unknown to train (all user index 0); arrays without it (built by hand, as
        # the toy cases are) give the user index
        _global_metrics(res, top, catalogue, beh["user_key"] if "user_key" in beh else beh.get("user"), chosen, k)
    return res


def _global_metrics(res: BeyondResult, top: np.ndarray, catalogue: np.ndarray, users, chosen: Sequence[str],
                    k: int) -> None:
    if "coverage" in chosen or "gini" in chosen:
        cov, _, exposure = coverage(top, catalogue=catalogue)
        if "coverage" in chosen:
            res.means[f"coverage@{k}"] = cov
        if "gini" in chosen:
            res.means[f"gini@{k}"] = gini(exposure)
    if "personalization" in chosen:
        value, pairs = personalization(top, users)
        res.means[f"personalization@{k}"] = value
        res.counts[f"personalization@{k}"] = {"scored": pairs, "skipped": 0, "missing_news": 0}


def needed_news(ranks: np.ndarray, beh: Mapping[str, Any], ks: Sequence[int]) -> np.ndarray:
    """The news some top-k list holds (largest k): the only ones whose sentiment is needed."""
    top = top_k(ranks, beh["candidates"], beh["offsets"], max(ks))
    return np.unique(top[top > 0])


def format_table(res: BeyondResult) -> str:
    """The second table of --mode=dev/test: one row per metric, one column per k, then what was skipped."""
    ks = res.info["k"]
    names = [m for m in res.info["metrics"] if any(f"{m}@{k}" in res.means for k in ks)]
    lines = [f"| metric | {' | '.join(f'@{k}' for k in ks)} | skipped (impressions) | top-k news without the "
             f"feature |", "|---" * (len(ks) + 3) + "|"]
    for m in names:
        cells = [f"{res.means[f'{m}@{k}']:.4f}" if f"{m}@{k}" in res.means else "—" for k in ks]
        counts = [res.counts.get(f"{m}@{k}", {}) for k in ks]
        skipped = "/".join(str(c.get("skipped", 0)) for c in counts) if METRICS[m].scope == "impression" else "—"
        missing = "/".join(str(c.get("missing_news", 0)) for c in counts) if METRICS[m].scope == "impression" \
            else "—"
        lines.append(f"| {m} | {' | '.join(cells)} | {skipped} | {missing} |")
    notes = ["impressions shorter than k (their whole list is the top-k): "
             + ", ".join(f"@{k} {res.info.get(f'shorter_than_{k}', 0)}" for k in ks)]
    if res.info.get("not_computed"):
        notes.append("not computed: " + ", ".join(f"{m} ({why})" for m, why in res.info["not_computed"].items()))
    if res.info.get("embedding"):
        notes.append(f"embedding: {res.info['embedding']}")
    if res.info.get("sentiment_source"):
        notes.append(f"sentiment: {res.info['sentiment_source']}")
    return "\n".join(lines + ["", "; ".join(notes)])


# ----------------------------------------------------------------------------------------------------------
# Records: per impression beside per_impression.npz; --mode=compare and --mode=aggregate read them
# ----------------------------------------------------------------------------------------------------------

RECORDS = "per_impression_beyond.npz"


def write_records(folder, res: BeyondResult, beh: Mapping[str, Any], meta: Mapping[str, Any]):
    """`<folder>/per_impression_beyond.npz` (atomic; no pickles): every impression of the split (its id, candidate
    and click counts) and one float64 column per "name@k" (NaN where not computed), with `meta` and the summary
    as JSON. Unlike per_impression.npz it keeps the impressions without two classes: these metrics need no label."""
    import json
    from pathlib import Path

    import util

    offsets = np.asarray(beh["offsets"], dtype=np.int64)
    labels = np.asarray(beh["labels"])
    csum = np.concatenate([[0], np.cumsum(labels == 1)])
    arrays = {"impression_id": np.asarray(beh["impression_ids"], dtype=np.int64),
              "candidates": np.diff(offsets).astype(np.int32),
              "clicks": (csum[offsets[1:]] - csum[offsets[:-1]]).astype(np.int32),
              **{f"metric:{key}": np.asarray(v, dtype=np.float64) for key, v in res.values.items()},
              "meta": np.array(json.dumps({**meta, **res.summary()}, default=str))}
    path = Path(folder) / RECORDS

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, **arrays)
    util.atomic_write(path, write)
    return path


def load_records(path) -> dict[str, Any]:
    """A file of `write_records` -> {impression_id, candidates, clicks, metrics: {name@k: [I]}, meta}; a wrong or
    damaged file is a ValueError naming it."""
    import json

    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a {RECORDS} file ({type(e).__name__}: {e})") from None
    return {"impression_id": data["impression_id"], "candidates": data["candidates"], "clicks": data["clicks"],
            "metrics": {k[len("metric:"):]: data[k] for k in data if k.startswith("metric:")}, "meta": meta,
            "path": str(path)}


def compare_records(runs: Sequence, all_pairs: bool, resamples: int, seed: int) -> tuple[str, str, list[str]]:
    """The beyond-accuracy part of --mode=compare: for the `significance.PerImpression` runs whose folder holds a
    per_impression_beyond.npz, paired tests per metric over the impressions where both runs have a value (a
    metric skipped for one run's top-k is skipped for the pair), Holm over the pairs of each metric.
    Returns (markdown, tsv, notes); empty tables when fewer than two runs have the records."""
    import significance as sig

    notes, recs = [], []
    for r in runs:
        path = r.path.parent / RECORDS
        if r.path.name == sig.PER_IMPRESSION and path.is_file():
            recs.append((r.label, load_records(path)))
        else:
            notes.append(f"{r.label}: no {path.name} beside {r.path} (written by --mode=dev/test with "
                         f"--beyond_metrics): left out of the beyond-accuracy comparison")
    if len(recs) < 2:
        return "", "", notes
    order = [np.argsort(rec["impression_id"], kind="stable") for _, rec in recs]
    ids = [rec["impression_id"][o] for (_, rec), o in zip(recs, order)]
    for (label, rec), i in zip(recs[1:], ids[1:]):
        if len(i) != len(ids[0]) or (i != ids[0]).any():
            raise ValueError(f"--runs: {label} ({rec['path']}) holds beyond-accuracy records of other impressions "
                             f"than {recs[0][0]} ({recs[0][1]['path']}); compare runs on one split of one corpus")
    keys = [k for k in recs[0][1]["metrics"] if all(k in rec["metrics"] for _, rec in recs)]
    rows = []
    for a, b in sig.pairs_of(len(recs), all_pairs):
        for key in keys:
            va, vb = recs[a][1]["metrics"][key][order[a]], recs[b][1]["metrics"][key][order[b]]
            both = np.isfinite(va) & np.isfinite(vb)
            if not both.any():
                continue
            res = sig.paired_tests(va[both], vb[both], resamples=resamples, seed=seed)
            rows.append({"a": recs[a][0], "b": recs[b][0], "metric": key, "impressions": int(both.sum()),
                         "mean_a": float(va[both].mean()), "mean_b": float(vb[both].mean()),
                         **{k: float(res[k][0]) for k in ("diff", "ci_low", "ci_high", "p_perm", "t", "p_t")}})
    for key in keys:
        family = [r for r in rows if r["metric"] == key]
        for r, adjusted in zip(family, sig.holm([r["p_perm"] for r in family])):
            r["p_holm"] = float(adjusted)
    md = ["| A | B | metric | impressions | A | B | B − A | 95% CI | p (sign-flip) | p Holm | p (t-test) |",
          "|---" * 11 + "|"]
    tsv = ["a\tb\tmetric\timpressions\tmean_a\tmean_b\tdiff\tci_low\tci_high\tp_perm\tp_holm\tt\tp_t"]
    for r in rows:
        md.append(f"| {r['a']} | {r['b']} | {r['metric']} | {r['impressions']} | {r['mean_a']:.4f} | "
                  f"{r['mean_b']:.4f} | {r['diff']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
                  f"{sig.format_p(r['p_perm'])} | {sig.format_p(r['p_holm'])} | {sig.format_p(r['p_t'])} |")
        tsv.append("\t".join([r["a"], r["b"], r["metric"], str(r["impressions"])] + [repr(r[k]) for k in (
            "mean_a", "mean_b", "diff", "ci_low", "ci_high", "p_perm", "p_holm", "t", "p_t")]))
    return "\n".join(md), "\n".join(tsv), notes


def aggregate_table(records: Sequence[Mapping], output_dir) -> tuple[str, str]:
    """The beyond-accuracy part of --mode=aggregate: for each dataset and model of `run_records.collect_runs`'
    records, the mean ± sample std [95% t-interval] over runs of each "split name@k" that --mode=dev / --mode=test
    wrote into `<run>/<split>/metrics.json` (a metric some runs lack is shown as —). Empty when no run has them."""
    import json
    from pathlib import Path

    from run_records import t_interval

    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in records:
        if "incomplete" in r:
            continue
        values: dict[str, float] = {}
        for split in ("dev", "test"):
            path = Path(output_dir) / r["dataset"] / r["model"] / r["run"] / split / "metrics.json"
            if path.is_file():
                means = json.loads(path.read_text()).get("beyond", {}).get("means", {})
                values.update({f"{split} {k}": float(v) for k, v in means.items()})
        groups.setdefault((r["dataset"], r["model"]), []).append(values)
    cols = sorted({c for runs in groups.values() for v in runs for c in v})
    if not cols:
        return "", ""
    md = ["| dataset | model | runs | metric | mean ± std [95% CI] |", "|---" * 5 + "|"]
    tsv = ["dataset\tmodel\truns\tmetric\tmean\tstd\tci_low\tci_high"]
    for (ds, model), runs in sorted(groups.items()):
        for c in cols:
            v = np.array([r[c] for r in runs if c in r], dtype=np.float64)
            if len(v) < len(runs) or not len(v):
                continue
            std = v.std(ddof=1) if len(v) > 1 else 0.0
            low, high = t_interval(v)
            md.append(f"| {ds} | {model} | {len(v)} | {c} | {v.mean():.4f} ± {std:.4f}"
                      + (f" [{low:.4f}, {high:.4f}]" if len(v) > 1 else "") + " |")
            tsv.append(f"{ds}\t{model}\t{len(v)}\t{c}\t{v.mean():.6f}\t{std:.6f}\t{low:.6f}\t{high:.6f}")
    return "\n".join(md), "\n".join(tsv)
