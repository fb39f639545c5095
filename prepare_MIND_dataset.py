"""Get MIND into `data/MIND-<dataset>/{train,dev,test}`, or generate the demo corpus.

    python prepare_MIND_dataset.py --dataset {small,200k,large,demo} [--data_dir data] [--no-download]

Protocols (REFERENCE.md §1; label them in every result table):
- small: train = a deterministic 95% of MINDsmall_train impressions, dev = the other 5% (a permutation seeded
  with 0 of the sorted impression ids), test = the official MINDsmall_dev.
- 200k: 200,000 users sampled from the sorted MIND-large train+dev user ids (numpy default_rng(0), without
  replacement); train = their MIND-large train impressions; their MIND-large dev impressions go alternately
  (in file order) to dev and test.
- large: the official train / dev / test (test has no labels: the leaderboard split).
- demo: a seeded MIND-format generator (`generate_demo`), written by this project; MIND's licence forbids
  redistributing real rows, so tests and the quick start use it.

Zips come from `data/` if the user put them there (e.g. from the gated Hugging Face dataset yjw1029/MIND), else
they are downloaded from the current official mirror (resumable, size-checked). Offline, preparation fails in
seconds and says where to put the zips.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

MIND_URL = "https://recodatasets.z20.web.core.windows.net/newsrec/"
ZIPS = {
    "small": ("MINDsmall_train.zip", "MINDsmall_dev.zip"),
    "200k": ("MINDlarge_train.zip", "MINDlarge_dev.zip"),
    "large": ("MINDlarge_train.zip", "MINDlarge_dev.zip", "MINDlarge_test.zip"),
}
SPLIT_FILES = ("news.tsv", "behaviors.tsv", "entity_embedding.vec", "relation_embedding.vec")
PROTOCOL_VERSION = 1
GENERATOR_VERSION = 2  # bump when the demo generator's output changes: ensure_demo then regenerates
DOWNLOAD_TIMEOUT_S = 10


# ==========================================================================================================
# Demo corpus
# ==========================================================================================================

# 17 MIND categories, their subcategories, and topical words (common English: GloVe covers them all).
CATEGORIES: dict[str, tuple[list[str], list[str]]] = {
    "news": (["newsus", "newsworld", "newspolitics", "newscrime"],
             "police court election senate president governor law report officials city state vote campaign "
             "investigation judge congress policy protest border security mayor federal community".split()),
    "sports": (["football_nfl", "basketball_nba", "baseball_mlb", "soccer"],
               "game team season coach players win score playoff league quarterback touchdown championship "
               "fans stadium injury draft basketball football baseball soccer goal victory defense".split()),
    "finance": (["markets", "finance-companies", "personalfinance", "finance-real-estate"],
                "stock market investors shares price company earnings bank money tax economy trade billion "
                "profit retirement savings credit mortgage interest rates growth sales deal".split()),
    "lifestyle": (["lifestylebuzz", "lifestyleroyals", "shop-holidays", "lifestyleparenting"],
                  "family home style wedding royal prince queen holiday gift fashion kids parents dress "
                  "love life friends beauty shopping christmas design house celebrate".split()),
    "health": (["wellness", "medical", "nutrition", "fitness"],
               "health doctors study cancer disease hospital patients diet weight sleep brain heart "
               "exercise risk symptoms treatment vaccine medicine research pain blood".split()),
    "foodanddrink": (["recipes", "restaurantsandnews", "foodnews"],
                     "recipe food dinner chicken cheese restaurant pizza cake chocolate cooking kitchen wine "
                     "coffee breakfast soup salad bread chef dessert taste menu".split()),
    "travel": (["travelnews", "traveltrip", "travelarticle"],
               "travel trip hotel flight airport beach island city vacation cruise tourists airline "
               "passengers destination park resort journey mountain tour visit".split()),
    "weather": (["weathertopstories", "weathernews"],
                "weather storm snow rain winds forecast hurricane temperatures cold heat flooding winter "
                "tornado ice clouds degrees warning thunderstorms freeze sunny".split()),
    "autos": (["autosnews", "autosenthusiasts", "autosreview"],
              "car cars truck vehicle engine ford toyota driver electric speed drive model tesla auto "
              "road highway motor wheels fuel sedan suv".split()),
    "video": (["news", "animals", "viral"],
              "video watch footage camera dog cat animals viral clip moment rescue funny caught shows "
              "baby bear amazing incredible filmed".split()),
    "music": (["musicnews", "celebrity", "music-awards"],
              "music song album singer band concert tour rock star rapper grammy songs guitar festival "
              "stage fans pop country record".split()),
    "movies": (["movienews", "movies-celebrity", "movies-gallery"],
               "movie film actor actress director box office star wars sequel trailer hollywood cinema "
               "role oscar premiere scene cast studio".split()),
    "tv": (["tvnews", "tv-celebrity", "tvreviews"],
           "show series episode season finale television netflix host network drama comedy cast "
           "characters premiere streaming viewers reality channel".split()),
    "entertainment": (["celebrity", "entertainment-celebrity", "awards"],
                      "celebrity star famous singer actress instagram photos red carpet awards party fans "
                      "couple rumors interview wedding divorce gala".split()),
    "kids": (["kids-animals", "kids-science"],
             "kids children school toys games learning science animals zoo puzzle fun students teacher "
             "playground books cartoon crafts".split()),
    "middleeast": (["middleeast-top-stories", "middleeast-news"],
                   "iran israel syria iraq saudi arabia oil military peace talks conflict region troops "
                   "government leaders minister sanctions ceasefire".split()),
    "northamerica": (["northamerica-news", "canada"],
                     "canada mexico ottawa toronto montreal canadian province trade border prime minister "
                     "quebec vancouver pipeline election parliament".split()),
}
FUNCTION_WORDS = ("the a of to in for on with and at after new how why what this is are from by over best top "
                  "first more says about will could as can you your here just big".split())
CATEGORY_WEIGHTS = np.array([12, 11, 6, 6, 4, 4, 3, 2, 3, 2, 2, 3, 3, 4, 1, 1, 1], dtype=np.float64)


def _fmt_time(seconds: np.ndarray, start: str) -> list[str]:
    base = pd.Timestamp(start)
    stamps = base + pd.to_timedelta(seconds, unit="s")
    return [f"{t.month}/{t.day}/{t.year} {(t.hour % 12) or 12}:{t.minute:02d}:{t.second:02d} "
            f"{'AM' if t.hour < 12 else 'PM'}" for t in stamps]


def _write_atomic_dir(target: Path, build) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def generate_demo(root, *, num_news: int = 3000, num_users: int = 2000, num_train_impressions: int = 6000,
                  num_dev_impressions: int = 1500, num_test_impressions: int = 1500, seed: int = 0,
                  test_labels: bool = True) -> Path:
    """Write a MIND-format corpus to `root/{train,dev,test}` plus `root/oracle.json`.

    Users have Dirichlet topic preferences and news a latent popularity; the click probability of a candidate
    is sigmoid(0.8 * log(17 * preference of its category) + 0.5 * popularity - 2), so both a content model
    and a popularity baseline can learn, the first more. `click_probabilities.tsv` holds the true
    probabilities; `oracle.json` the AUC of scoring with them. With `test_labels=False` the test behaviors
    carry no labels (like MIND-large) and the labels go to `test/labels_hidden.tsv`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    cats = list(CATEGORIES)
    n_cat = len(cats)

    # -- news ------------------------------------------------------------------------------------------
    news_cat = rng.choice(n_cat, size=num_news, p=CATEGORY_WEIGHTS / CATEGORY_WEIGHTS.sum())
    news_sub = np.array([rng.integers(len(CATEGORIES[cats[c]][0])) for c in news_cat]) if num_news else np.zeros(0, int)
    popularity = rng.normal(0, 1, num_news)
    title_len = rng.integers(6, 15, num_news)
    abstract_len = np.where(rng.random(num_news) < 0.1, 0, rng.integers(15, 41, num_news))
    topical_share = rng.uniform(0.45, 0.75, num_news)
    ends = np.array(["", "", ".", "!", "?"])
    end_of = ends[rng.integers(len(ends), size=num_news)]
    # Entities: the first five topical words of each category are named entities with a Wikidata-like id.
    entity_words = {}
    for c, name in enumerate(cats):
        for j, w in enumerate(CATEGORIES[name][1][:5]):
            entity_words.setdefault(w, f"Q{100 + c * 10 + j}")
    news_ids = [f"N{10001 + i}" for i in range(num_news)]

    def make_text(i: int, length: int, capital: bool, end: str) -> tuple[str, list[dict]]:
        topical = CATEGORIES[cats[news_cat[i]]][1]
        words = []
        for k in range(length):
            if rng.random() < topical_share[i]:
                words.append(topical[rng.integers(len(topical))])
            else:
                words.append(FUNCTION_WORDS[rng.integers(len(FUNCTION_WORDS))])
        if capital:
            words[0] = words[0].capitalize()
        text, entities, pos = "", {}, 0
        for k, w in enumerate(words):
            sep = "" if k == 0 else (", " if rng.random() < 0.06 else " ")
            text += sep
            pos = len(text)
            text += w
            if w.lower() in entity_words:
                e = entities.setdefault(w.lower(), {"Label": w.lower().title(), "Type": "O",
                                                    "WikidataId": entity_words[w.lower()],
                                                    "Confidence": 1.0, "OccurrenceOffsets": [], "SurfaceForms": []})
                e["OccurrenceOffsets"].append(pos)
                e["SurfaceForms"].append(w)
        return text + end, list(entities.values())

    news_rows = []
    for i in range(num_news):
        title, t_ent = make_text(i, int(title_len[i]), True, end_of[i])
        if abstract_len[i]:
            abstract, a_ent = make_text(i, int(abstract_len[i]), True, ".")
        else:
            abstract, a_ent = "", []
        sub = CATEGORIES[cats[news_cat[i]]][0][news_sub[i]]
        news_rows.append("\t".join([news_ids[i], cats[news_cat[i]], sub, title, abstract,
                                    f"https://assets.msn.com/labs/mind/{news_ids[i]}.html",
                                    json.dumps(t_ent) if t_ent else "[]", json.dumps(a_ent) if a_ent else "[]"]))

    # Publication periods: the first 70% of news exist during train, then dev-new, then test-new news.
    period_end = {"train": int(num_news * 0.7), "dev": int(num_news * 0.85), "test": num_news}
    pool_start = {"train": 0, "dev": int(num_news * 0.4), "test": int(num_news * 0.55)}

    # -- users -----------------------------------------------------------------------------------------
    prefs = rng.dirichlet(np.full(n_cat, 0.3), size=num_users)  # [users, categories]
    user_ids = np.array([f"U{100001 + u}" for u in range(num_users)])
    hist_len = np.where(rng.random(num_users) < 0.08, 0, rng.integers(1, 81, num_users))

    def sample_news(users: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """News in [lo, hi) for each user: category from the user's preferences, news by popularity."""
        out = np.zeros(len(users), dtype=np.int64)
        u = rng.random(len(users))
        cat = (prefs[users].cumsum(1) < u[:, None]).sum(1).clip(max=n_cat - 1)
        for c in range(n_cat):
            rows = np.flatnonzero(cat == c)
            pool = lo + np.flatnonzero(news_cat[lo:hi] == c)
            if len(pool) == 0:
                pool = np.arange(lo, hi)
            w = np.exp(popularity[pool])
            out[rows] = pool[np.searchsorted(np.cumsum(w) / w.sum(), rng.random(len(rows))).clip(max=len(pool) - 1)]
        return out

    hist_users = np.repeat(np.arange(num_users), hist_len)
    hist_news = sample_news(hist_users, 0, max(period_end["train"], 1))
    base_history = np.split(hist_news, np.cumsum(hist_len)[:-1]) if num_users else []

    def click_logit(users: np.ndarray, news: np.ndarray) -> np.ndarray:
        return 0.8 * np.log(n_cat * prefs[users, news_cat[news]] + 1e-3) + 0.5 * popularity[news] - 2.0

    # -- behaviors -------------------------------------------------------------------------------------
    def split(name: str, n_impr: int, start: str, extra_history: int, labelled: bool) -> dict:
        users = rng.integers(0, num_users, n_impr)
        counts = rng.integers(5, 41, n_impr)
        lo, hi = pool_start[name], max(period_end[name], pool_start[name] + 1)
        pool = np.arange(lo, hi)
        w = np.exp(0.5 * popularity[pool])
        rows = np.repeat(np.arange(n_impr), counts)
        cand = pool[np.searchsorted(np.cumsum(w) / w.sum(), rng.random(len(rows))).clip(max=len(pool) - 1)]
        # A news appears once per impression (as in MIND): drop repeated draws, keeping the first.
        _, first = np.unique(rows * num_news + cand, return_index=True)
        keep = np.zeros(len(rows), dtype=bool)
        keep[first] = True
        rows, cand = rows[keep], cand[keep]
        counts = np.bincount(rows, minlength=n_impr)
        flat_users = users[rows]
        prob = 1 / (1 + np.exp(-click_logit(flat_users, cand)))
        label = (rng.random(len(prob)) < prob).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        # At least one click and one non-click per impression (MIND impressions have both).
        for i in range(n_impr):
            a, b = offsets[i], offsets[i + 1]
            if label[a:b].sum() == 0:
                label[a + np.argmax(prob[a:b])] = 1
            if label[a:b].sum() == b - a:
                label[a + np.argmin(prob[a:b])] = 0
        seconds = np.sort(rng.integers(0, 86400 * (5 if name == "train" else 1), n_impr))
        times = _fmt_time(seconds, start)
        # History: the user's clicks before the period (dev/test users have read a few more news since).
        extra = {}
        lines, prob_lines, label_lines, referenced = [], [], [], set()
        for i in range(n_impr):
            u = int(users[i])
            hist = list(base_history[u])
            if extra_history and len(hist):
                if u not in extra:
                    k = int(rng.integers(0, extra_history + 1))
                    extra[u] = list(sample_news(np.full(k, u), 0, pool_start[name] + 1)) if k else []
                hist = hist + extra[u]
            a, b = offsets[i], offsets[i + 1]
            referenced.update(hist)
            referenced.update(cand[a:b].tolist())
            cells = [news_ids[n] + (f"-{label[j]}" if labelled else "") for j, n in zip(range(a, b), cand[a:b])]
            lines.append(f"{i + 1}\t{user_ids[u]}\t{times[i]}\t{' '.join(news_ids[n] for n in hist)}\t{' '.join(cells)}")
            prob_lines.append(f"{i + 1}\t" + " ".join(f"{p:.4f}" for p in prob[a:b]))
            label_lines.append(f"{i + 1}\t" + " ".join(str(x) for x in label[a:b]))
        return dict(lines=lines, prob_lines=prob_lines, label_lines=label_lines, referenced=sorted(referenced),
                    prob=prob, label=label, offsets=offsets)

    splits = {
        "train": split("train", num_train_impressions, "2019-11-09 00:00:00", 0, True),
        "dev": split("dev", num_dev_impressions, "2019-11-14 00:00:00", 3, True),
        "test": split("test", num_test_impressions, "2019-11-15 00:00:00", 6, test_labels),
    }

    # Entity and relation vectors: an entity lies near its category's centre (TransE-like, 100-d).
    centres = rng.normal(0, 0.3, (n_cat, 100))
    entity_lines = []
    for w, q in sorted(entity_words.items(), key=lambda kv: int(kv[1][1:])):
        c = next(i for i, name in enumerate(cats) if w in CATEGORIES[name][1][:5])
        vec = centres[c] + rng.normal(0, 0.1, 100)
        entity_lines.append(q + "\t" + "\t".join(f"{x:.6f}" for x in vec) + "\t")
    relation_lines = [f"P{31 + r}\t" + "\t".join(f"{x:.6f}" for x in rng.normal(0, 0.3, 100)) + "\t"
                      for r in range(5)]

    from util import compute_metrics_flat

    oracle = {"seed": seed, "sizes": dict(num_news=num_news, num_users=num_users,
                                          num_train_impressions=num_train_impressions,
                                          num_dev_impressions=num_dev_impressions,
                                          num_test_impressions=num_test_impressions),
              "test_labels": test_labels, "generator_version": GENERATOR_VERSION}
    for name, s in splits.items():
        m = compute_metrics_flat(s["prob"], s["label"], s["offsets"])
        oracle[f"{name}_auc"] = round(m["auc"], 6)
        oracle[f"{name}_mrr"] = round(m["mrr"], 6)
        oracle[f"{name}_ndcg10"] = round(m["ndcg10"], 6)

    def build(tmp: Path) -> None:
        for name, s in splits.items():
            d = tmp / name
            d.mkdir()
            rows = [news_rows[i] for i in sorted(set(s["referenced"]))]
            (d / "news.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
            (d / "behaviors.tsv").write_text("\n".join(s["lines"]) + "\n", encoding="utf-8")
            (d / "click_probabilities.tsv").write_text("\n".join(s["prob_lines"]) + "\n", encoding="utf-8")
            if name == "test" and not test_labels:
                (d / "labels_hidden.tsv").write_text("\n".join(s["label_lines"]) + "\n", encoding="utf-8")
            (d / "entity_embedding.vec").write_text("\n".join(entity_lines) + "\n", encoding="utf-8")
            (d / "relation_embedding.vec").write_text("\n".join(relation_lines) + "\n", encoding="utf-8")
        (tmp / "oracle.json").write_text(json.dumps(oracle, indent=2, sort_keys=True) + "\n")

    _write_atomic_dir(root, build)
    return root


def ensure_demo(data_dir="data", seed: int = 0, **sizes) -> Path:
    """`<data_dir>/MIND-demo`, generated unless it exists with the same sizes and seed."""
    root = Path(data_dir) / "MIND-demo"
    defaults = dict(num_news=3000, num_users=2000, num_train_impressions=6000, num_dev_impressions=1500,
                    num_test_impressions=1500)
    unknown = set(sizes) - set(defaults)
    if unknown:
        raise TypeError(f"ensure_demo: unknown size arguments {sorted(unknown)}")
    wanted = {**defaults, **sizes}
    marker = root / "oracle.json"
    if marker.exists():
        saved = json.loads(marker.read_text())
        if (saved.get("sizes") == wanted and saved.get("seed") == seed and saved.get("test_labels", True)
                and saved.get("generator_version") == GENERATOR_VERSION):
            return root
    t0 = time.time()
    generate_demo(root, seed=seed, **wanted)
    print(f"generated the demo corpus in {root} ({wanted['num_news']} news, {wanted['num_train_impressions']} "
          f"train impressions; {time.time() - t0:.1f}s)")
    return root


# ==========================================================================================================
# Real MIND
# ==========================================================================================================

def _missing_zip_message(name: str, data_dir: Path, reason: str) -> str:
    return (f"{reason}. Put {name} into {data_dir.resolve()}/ (from {MIND_URL}{name}, or the Hugging Face "
            f"dataset yjw1029/MIND after accepting its licence) and run this again.")


def obtain_zip(name: str, data_dir: Path, download: bool = True, base_url: str | None = None) -> Path:
    """A checked zip in `data_dir`: one the user put there, or a resumable download (`<name>.part`)."""
    data_dir = Path(data_dir)
    path = data_dir / name
    if path.exists():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a valid zip (truncated download?); delete it and run again")
        return path
    if not download:
        raise FileNotFoundError(_missing_zip_message(name, data_dir, f"{path} not found and --no-download given"))
    url = (base_url or MIND_URL) + name
    part = Path(str(path) + ".part")
    data_dir.mkdir(parents=True, exist_ok=True)
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            resumed = response.status == 206
            total = response.headers.get("Content-Length")
            total = int(total) + (done if resumed else 0) if total else None
            with open(part, "ab" if resumed else "wb") as f:
                got = done if resumed else 0
                last = time.time()
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    if time.time() - last > 5:
                        print(f"  {name}: {got / 2**20:,.0f} MiB" + (f" of {total / 2**20:,.0f}" if total else ""))
                        last = time.time()
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
        raise RuntimeError(_missing_zip_message(name, data_dir, f"could not download {url} ({e}); "
                                                f"a partial download in {part.name} resumes next time")) from None
    if total is not None and part.stat().st_size != total:
        raise RuntimeError(f"{url}: got {part.stat().st_size} bytes of {total}; run again to resume")
    if not zipfile.is_zipfile(part):
        raise RuntimeError(f"{url}: the download is not a zip; delete {part} and try again")
    os.replace(part, path)
    return path


def unpack(zip_path: Path, data_dir: Path) -> Path:
    """Unpack once into `<data_dir>/raw/<zip stem>/` (a marker file records completion)."""
    out = Path(data_dir) / "raw" / Path(zip_path).stem
    if (out / ".unpacked").exists():
        return out
    with zipfile.ZipFile(zip_path) as z:
        bad = z.testzip()
        if bad is not None:
            raise ValueError(f"{zip_path}: member {bad} is corrupt; delete the zip and download it again")
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=Path(data_dir)))
        z.extractall(tmp)
    # Some archives wrap the files in a folder: find the one holding behaviors.tsv.
    inner = next((p.parent for p in tmp.rglob("behaviors.tsv")), tmp)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(inner, out)
    shutil.rmtree(tmp, ignore_errors=True)
    (out / ".unpacked").write_text("ok\n")
    return out


def _read_lines(path: Path) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _write_split(out: Path, source: Path, behaviors: list[str] | None, news_source: Path | None = None) -> None:
    """One protocol split: behaviors (given lines or the source's), news and vectors from `news_source`."""
    out.mkdir(parents=True, exist_ok=True)
    news_source = news_source or source
    for name in ("news.tsv", "entity_embedding.vec", "relation_embedding.vec"):
        if (news_source / name).exists():
            shutil.copyfile(news_source / name, out / name)
    if behaviors is None:
        shutil.copyfile(source / "behaviors.tsv", out / "behaviors.tsv")
    else:
        (out / "behaviors.tsv").write_text("\n".join(behaviors) + ("\n" if behaviors else ""), encoding="utf-8")


def split_small(train_lines: list[str], dev_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """The `small` protocol's 95/5 split: a permutation (seeded) of the sorted impression ids picks dev."""
    ids = np.array([int(line.split("\t", 1)[0]) for line in train_lines], dtype=np.int64)
    order = np.sort(ids)
    perm = np.random.default_rng(seed).permutation(len(order))
    dev_ids = set(order[perm[: int(round(len(order) * dev_fraction))]].tolist())
    is_dev = np.array([i in dev_ids for i in ids.tolist()])
    return ([l for l, d in zip(train_lines, is_dev) if not d], [l for l, d in zip(train_lines, is_dev) if d])


def sample_users(train_lines: list[str], dev_lines: list[str], num_users: int = 200_000, seed: int = 0) -> set[str]:
    """The `200k` protocol's users: sorted unique ids of train+dev, seeded sample without replacement."""
    users = pd.Series([l.split("\t", 2)[1] for l in train_lines + dev_lines]).unique()
    users = np.sort(users.astype(str))
    if num_users > len(users):
        raise ValueError(f"asked for {num_users} users but MIND-large train+dev has {len(users)}")
    chosen = np.random.default_rng(seed).choice(len(users), size=num_users, replace=False)
    return set(users[chosen].tolist())


def prepare(dataset: str, data_dir="data", *, download: bool = True, num_users: int = 200_000,
            base_url: str | None = None) -> Path:
    """Build `<data_dir>/MIND-<dataset>/{train,dev,test}` (skipped if already built by this version)."""
    data_dir = Path(data_dir)
    if dataset == "demo":
        return ensure_demo(data_dir)
    if dataset not in ZIPS:
        raise ValueError(f"unknown --dataset {dataset!r}; choose from {sorted(ZIPS) + ['demo']}")
    target = data_dir / f"MIND-{dataset}"
    marker = {"protocol": dataset, "version": PROTOCOL_VERSION, "num_users": num_users if dataset == "200k" else None}
    if (target / ".prepared").exists() and json.loads((target / ".prepared").read_text()) == marker:
        print(f"{target} is ready")
        return target
    # Check every zip before any long work, so a missing one fails in seconds.
    if not download:
        missing = [z for z in ZIPS[dataset] if not (data_dir / z).exists()]
        if missing:
            raise FileNotFoundError(_missing_zip_message(", ".join(missing), data_dir, f"missing {', '.join(missing)}"))
    raw = {z.split("_")[1].split(".")[0]: unpack(obtain_zip(z, data_dir, download, base_url), data_dir)
           for z in ZIPS[dataset]}

    def build(tmp: Path) -> None:
        if dataset == "small":
            train, dev = split_small(_read_lines(raw["train"] / "behaviors.tsv"))
            _write_split(tmp / "train", raw["train"], train)
            _write_split(tmp / "dev", raw["train"], dev)
            _write_split(tmp / "test", raw["dev"], None)
        elif dataset == "200k":
            train_lines = _read_lines(raw["train"] / "behaviors.tsv")
            dev_lines = _read_lines(raw["dev"] / "behaviors.tsv")
            users = sample_users(train_lines, dev_lines, num_users)
            mine = [l for l in dev_lines if l.split("\t", 2)[1] in users]
            _write_split(tmp / "train", raw["train"], [l for l in train_lines if l.split("\t", 2)[1] in users])
            _write_split(tmp / "dev", raw["dev"], mine[0::2])
            _write_split(tmp / "test", raw["dev"], mine[1::2])
        else:
            for split in ("train", "dev", "test"):
                _write_split(tmp / split, raw[split], None)
        (tmp / ".prepared").write_text(json.dumps(marker))

    _write_atomic_dir(target, build)
    print(f"prepared {target}")
    return target


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["small", "200k", "large", "demo"], help="protocol to build")
    p.add_argument("--data_dir", default="data", help="where the zips are / go, and where MIND-<dataset>/ is built")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download missing zips (--no-download: only use zips already in --data_dir)")
    p.add_argument("--demo_news", type=int, default=3000, help="demo: number of news")
    p.add_argument("--demo_users", type=int, default=2000, help="demo: number of users")
    p.add_argument("--demo_train_impressions", type=int, default=6000, help="demo: train impressions")
    p.add_argument("--demo_dev_impressions", type=int, default=1500, help="demo: dev impressions")
    p.add_argument("--demo_test_impressions", type=int, default=1500, help="demo: test impressions")
    p.add_argument("--seed", type=int, default=0, help="demo generator seed")
    args = p.parse_args(argv)
    if args.dataset == "demo":
        return ensure_demo(args.data_dir, seed=args.seed, num_news=args.demo_news, num_users=args.demo_users,
                           num_train_impressions=args.demo_train_impressions,
                           num_dev_impressions=args.demo_dev_impressions,
                           num_test_impressions=args.demo_test_impressions)
    return prepare(args.dataset, args.data_dir, download=args.download)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
