"""Adressa (Gulla et al., 2017: Adresseavisen's reading logs, Norwegian) -> the MIND-format corpus.

The logs are daily files of JSON lines, one page-view event each; an event that names an article (`id`, with a
`title` and `category1` "main|sub" somewhere in the logs) is a click by `userId` at `time` (Unix seconds). Adressa
has no impressions, so they are built as the literature does (newsreclib's Adressa pipeline, adapted from
Efficient-FedRec): see `ADRESSA_PROTOCOL` and docs/data.md#adressa. Negatives are sampled, so the scores are not
comparable with MIND's or EB-NeRD's.
"""
from __future__ import annotations

import json
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from MIND_corpus import SPLITS, CorpusError, file_signature
from news_data.download import download as fetch_url  # `download` is the converters' switch
from news_data.download import unpack_atomically
from news_data.registry import MARKER, NewsDataset, SkipCounts, clean_text, read_marker, register, up_to_date
from util import replace_dir_atomically

URL = "https://reclab.idi.ntnu.no/dataset/{name}.tar.gz"
LANGUAGE = "nor"  # ISO 639-3 (Norwegian), in the marker: the beyond-accuracy metrics never run VADER on it
# Periods are days (1-week set) or weeks counted from the first day (10-week set): periods 1..5 = history, 6 = train
# impressions, 7 and later = evaluation impressions, shuffled (seed 0) and split 20% dev / 80% test.
ADRESSA_PROTOCOL = dict(train_period=6, test_from=7, negatives=20, dev_share=0.2, seed=0)


@dataclass
class Events:
    """The clicks of the logs: user [E] int64, news [E] int64 (rows of `news`), day [E] int64 (1 = first file),
    time [E] int64; and the news table: id -> (title, category1, url)."""

    user: np.ndarray
    news: np.ndarray
    day: np.ndarray
    time: np.ndarray
    news_ids: list[str]
    news_meta: list[tuple[str, str, str]]
    users: list[str]


def read_events(files: list[Path], skips: SkipCounts) -> Events:
    """Stream the daily files (sorted by name: file k is day k). A line that is not a JSON object is an error naming
    file and line; an article event without userId or time is skipped and counted."""
    news_index: dict[str, int] = {}
    meta: dict[int, tuple[str, str, str]] = {}
    user_index: dict[str, int] = {}
    user, news, day, when = array("q"), array("q"), array("q"), array("q")  # 8 bytes per click, not a Python int
    for k, path in enumerate(files, 1):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{path}:{n}: not a JSON object ({err.msg}); Adressa's logs hold one event per "
                                      f"line: download the set again")
                if not isinstance(e, dict):
                    raise CorpusError(f"{path}:{n}: a JSON {type(e).__name__}, expected an object (one event)")
                nid = e.get("id")
                if not nid:
                    continue  # a page that is no article (front page, section pages): not a click
                i = news_index.setdefault(str(nid), len(news_index))
                if e.get("title") and e.get("category1") and i not in meta:
                    meta[i] = (clean_text(e["title"]), str(e["category1"]), clean_text(e.get("url")))
                if not e.get("userId") or not isinstance(e.get("time"), (int, float)):
                    skips.add("article events without userId or time (skipped)", 1)
                    continue
                user.append(user_index.setdefault(str(e["userId"]), len(user_index)))
                news.append(i)
                day.append(k)
                when.append(int(e["time"]))
    ids = list(news_index)
    return Events(np.array(user, np.int64), np.array(news, np.int64), np.array(day, np.int64),
                  np.array(when, np.int64), ids, [meta.get(i, ("", "", "")) for i in range(len(ids))],
                  list(user_index))


def build_impressions(ev: Events, period_days: int, skips: SkipCounts) -> dict[str, list[tuple]]:
    """(user, time, history news rows, candidates [(news row, label)]) per split, by `ADRESSA_PROTOCOL`."""
    p = ADRESSA_PROTOCOL
    is_article = np.array([bool(m[0] and m[1]) for m in ev.news_meta])
    known = is_article[ev.news]
    skips.add("clicks on ids without a title and category1 in the logs (not articles; skipped)", int((~known).sum()))
    order = np.lexsort((ev.time, ev.user))[known[np.lexsort((ev.time, ev.user))]]
    period = (ev.day - 1) // period_days + 1
    articles = np.flatnonzero(is_article)
    rng = np.random.default_rng(p["seed"])
    out: dict[str, list[tuple]] = {"train": [], "eval": []}
    bounds = np.flatnonzero(np.diff(ev.user[order])) + 1
    for rows in np.split(order, bounds):
        if not len(rows):
            continue
        clicked = set(ev.news[rows].tolist())
        base = [int(x) for x in ev.news[rows[period[rows] < p["train_period"]]]]
        # train impressions see the history periods; evaluation impressions also the train period's clicks
        seen = {"train": base, "eval": base + [int(x) for x in ev.news[rows[period[rows] == p["train_period"]]]]}
        pool = None
        for r in rows[period[rows] >= p["train_period"]].tolist():
            split = "train" if period[r] == p["train_period"] else "eval"
            history = seen[split]
            if not history:
                skips.add("impressions with an empty history (dropped, as the protocol does)", 1)
            else:
                if pool is None:
                    pool = np.setdiff1d(articles, np.fromiter(clicked, np.int64), assume_unique=False)
                k = min(p["negatives"], len(pool))
                negatives = rng.choice(pool, k, replace=False).tolist() if k else []
                cands = [(int(ev.news[r]), 1)] + [(n, 0) for n in negatives]
                rng.shuffle(cands)
                out[split].append((ev.users[ev.user[r]], int(ev.time[r]), history, cands))
    return out


def write_split(folder: Path, rows: list[tuple], ev: Events) -> None:
    folder.mkdir(parents=True)
    rows = sorted(rows, key=lambda r: r[1])
    with open(folder / "behaviors.tsv", "w", encoding="utf-8", newline="\n") as f:
        for i, (user, t, history, cands) in enumerate(rows, 1):
            stamp = time.strftime("%m/%d/%Y %I:%M:%S %p", time.gmtime(t))
            f.write(f"{i}\t{user}\t{stamp}\t{' '.join(ev.news_ids[h] for h in history)}\t"
                    + " ".join(f"{ev.news_ids[n]}-{y}" for n, y in cands) + "\n")
    with open(folder / "news.tsv", "w", encoding="utf-8", newline="\n") as f:
        for nid, (title, category1, url) in zip(ev.news_ids, ev.news_meta):
            if title and category1:
                parts = category1.split("|")
                f.write(f"{nid}\t{parts[0]}\t{parts[-1]}\t{title}\t\t{url}\t[]\t[]\n")


class AdressaDataset(NewsDataset):
    """Adressa: impressions built from the event logs (`ADRESSA_PROTOCOL`), one period = `period_days` days."""

    family = "Adressa"

    def __init__(self, name: str, description: str, archive: str, period_days: int):
        super().__init__(name, description)
        self.archive, self.period_days = archive, period_days

    def word_vector_note(self, language):
        return ("Adressa's titles are in Norwegian: GloVe's English vectors fit few of its words; give Norwegian "
                "vectors as --glove_path (a text file: a word and its values per line, e.g. fastText's cc.no.300.vec "
                "without its first line), or use a PLM news encoder with a multilingual or Norwegian backbone")

    def raw_files(self, data_dir: Path, download: bool, log: Callable) -> list[Path]:
        folder = Path(data_dir) / "adressa" / self.archive
        if not folder.is_dir():
            tar = Path(data_dir) / "adressa" / f"{self.archive}.tar.gz"
            if not tar.is_file() and download:
                url = URL.format(name=self.archive)
                log(f"downloading {url} ...")
                fetch_url(url, tar, check_zip=False, log=log, hint=f"Put Adressa's {tar.name} in {tar.parent} "
                         f"yourself (reclab.idi.ntnu.no/dataset).")
            if not tar.is_file():
                raise FileNotFoundError(f"{folder} not found, nor {tar}: put Adressa's {self.archive}.tar.gz "
                                        f"(reclab.idi.ntnu.no/dataset) there, or run python prepare_MIND_dataset.py "
                                        f"--dataset={self.name}")
            log(f"unpacking {tar} ...")
            unpack_atomically(tar, folder)
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{folder} holds no daily event files; unpack {self.archive}.tar.gz there")
        return files

    def prepare(self, data_dir, *, download=True, language=None, log=print) -> Path:
        self.check_language(language)
        return self._convert(Path(data_dir), self.raw_files(Path(data_dir), download, log), log)

    def ensure(self, data_dir, language=None, log=print) -> Path:
        self.check_language(language)
        target = self.corpus_folder(data_dir)
        try:
            files = self.raw_files(Path(data_dir), False, log)
        except FileNotFoundError:
            if read_marker(target) is not None:
                return target
            raise
        return self._convert(Path(data_dir), files, log)

    def _convert(self, data_dir: Path, files: list[Path], log: Callable) -> Path:
        target = self.corpus_folder(data_dir)
        source = {"files": [file_signature(p) for p in files], "protocol": ADRESSA_PROTOCOL,
                  "period_days": self.period_days}
        if up_to_date(target, self.name, source=source, language=LANGUAGE):
            return target
        t0 = time.time()

        def build(tmp: Path) -> None:
            skips = SkipCounts()
            ev = read_events(files, skips)
            imp = build_impressions(ev, self.period_days, skips)
            rng = np.random.default_rng(ADRESSA_PROTOCOL["seed"])
            is_dev = np.zeros(len(imp["eval"]), bool)
            n_dev = int(round(ADRESSA_PROTOCOL["dev_share"] * len(imp["eval"])))
            is_dev[rng.permutation(len(imp["eval"]))[:n_dev]] = True
            splits = {"train": imp["train"], "dev": [r for r, d in zip(imp["eval"], is_dev) if d],
                      "test": [r for r, d in zip(imp["eval"], is_dev) if not d]}
            for split in SPLITS:
                if not splits[split]:
                    raise CorpusError(f"{files[0].parent}: the {split} split got no impressions from {len(files)} "
                                      f"daily files; the protocol needs {ADRESSA_PROTOCOL['test_from']} periods of "
                                      f"{self.period_days} day(s)")
                write_split(tmp / split, splits[split], ev)
            counts = {s: len(v) for s, v in splits.items()}
            log(f"Adressa ({self.name}): {counts['train']} train, {counts['dev']} dev, {counts['test']} test "
                f"impressions; {skips.describe()}")
            (tmp / MARKER).write_text(json.dumps({"source": source, "impressions": counts, "skipped": skips.counts,
                                                  "language": LANGUAGE}, sort_keys=True) + "\n")
        replace_dir_atomically(target, build)
        log(f"built {target} in {time.time() - t0:.1f}s")
        return target


def write_adressa_demo(folder: str | Path, *, days: int = 7, users: int = 80, news: int = 200,
                       clicks_per_day: int = 250, seed: int = 0) -> Path:
    """Daily files of JSON-lines events in Adressa's format (this project's code, no Adresseavisen rows): users
    prefer a category; some events are front-page views without an article id, as in the real logs."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cats = ["nyheter|trondheim", "sport|fotball", "kultur|musikk", "pluss|okonomi", "100sport|ski"]
    words = ["kamp", "byen", "politiet", "valg", "konsert", "skatt", "bolig", "storm", "barn", "skole", "rekord",
             "ulykke", "avtale", "sommer", "bank", "lag", "trener", "brann", "vei", "helse"]
    cat = rng.integers(0, len(cats), news)
    ids = [f"{rng.integers(0, 2**63):016x}{i:04x}" for i in range(news)]
    titles = [" ".join(rng.choice(words[c * 4:c * 4 + 4] + words[-4:], 5)).capitalize() for c in cat.tolist()]
    pref = rng.integers(0, len(cats), users)
    start = 1483228800  # 2017-01-01 00:00 UTC, the first day of the real logs
    for d in range(days):
        lines = []
        for _ in range(clicks_per_day):
            u = int(rng.integers(0, users))
            same = np.flatnonzero(cat == pref[u])
            a = int(rng.choice(same) if rng.random() < 0.8 and len(same) else rng.integers(0, news))
            t = start + d * 86400 + int(rng.integers(0, 86400))
            e = {"eventId": int(rng.integers(0, 2**31)), "city": "trondheim", "activeTime": int(rng.integers(5, 200)),
                 "url": f"http://adressa.no/{ids[a]}", "region": "sor-trondelag", "time": t, "userId": f"cx:{u:06d}",
                 "deviceType": "Mobile", "country": "no", "os": "Android", "id": ids[a], "title": titles[a],
                 "category1": cats[cat[a]], "publishtime": "2017-01-01T00:00:00.000Z"}
            lines.append(json.dumps(e, ensure_ascii=False))
            if rng.random() < 0.1:  # a front-page view: no article
                lines.append(json.dumps({"eventId": 1, "time": t, "userId": f"cx:{u:06d}", "url": "http://adressa.no"}))
        (folder / f"201701{d + 1:02d}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


register(AdressaDataset("adressa_1w", "Adressa one week (days as periods)", "one_week", 1))
register(AdressaDataset("adressa_10w", "Adressa ten weeks (weeks as periods)", "three_month", 7))
