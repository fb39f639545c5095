"""MIND parsing, vocabulary, truncation, cache keys, bad input, negative sampling and batching."""
from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import MIND_corpus as mc
import demo_corpus
import scorer
from config import Config
from dataset import EvalDataset, TrainDataset, sample_negatives
from evaluation import batch_ranks
from MIND_corpus import Corpus, CorpusError, tokenize

VEC = "\t".join(["0.5"] * 100)


def news_row(nid, cat, sub, title, abstract="", title_entities="[]"):
    return f"{nid}\t{cat}\t{sub}\t{title}\t{abstract}\thttps://x/{nid}\t{title_entities}\t[]"


def write_split(root: Path, split: str, news: list[str], behaviors: list[str], vec: str = "") -> None:
    d = root / "MIND-demo" / split
    d.mkdir(parents=True, exist_ok=True)
    (d / "news.tsv").write_text("\n".join(news) + "\n", encoding="utf-8")
    (d / "behaviors.tsv").write_text("\n".join(behaviors) + "\n", encoding="utf-8")
    (d / "entity_embedding.vec").write_text(vec, encoding="utf-8")


ENT = json.dumps([{"Label": "Lakers", "Type": "O", "WikidataId": "Q121783", "Confidence": 1.0,
                   "OccurrenceOffsets": [4], "SurfaceForms": ["Lakers"]}])
NEWS = [
    news_row("N1", "sports", "basketball", "The Lakers win again!", "A game to remember, the fans say.", ENT),
    news_row("N2", "sports", "football", "The team wins the game", "Fans cheer the team"),
    news_row("N3", "finance", "markets", "Stock market falls; the fans worry?", ""),
    news_row("N4", "news", "newsus", "Storm hits the coast", "The storm game"),
    news_row("N5", "finance", "markets", "Stock prices rise", "market game team"),
]
TRAIN = [
    "1\tU1\t11/11/2019 9:05:58 AM\tN1 N2 N3 N4 N5\tN1-1 N2-0 N3-0",
    "2\tU2\t11/11/2019 9:06:58 AM\t\tN4-0 N5-1 N9-0",  # empty history; N9 unknown
    "3\tU1\t11/11/2019 9:07:58 AM\tN1 N2 N3 N4 N5\tN2-1 N3-0 N4-0 N5-0 N1-1",
    "4\tU3\t11/11/2019 9:08:58 AM\tN7 N2\tN1-1 N2-1",  # no negatives; N7 unknown in history
]
DEV = [
    "10\tU1\t11/12/2019 9:05:58 AM\tN1 N2\tN3-0 N4-1 N8-0",  # N8 only in dev news
    "11\tU99\t11/12/2019 9:05:58 AM\t\tN9-0 N5-1",  # unknown user, unknown candidate N9
]
DEV_NEWS = [news_row("N8", "news", "newsus", "Brand new words appear", "")]
TEST = ["20\tU2\t11/13/2019 9:05:58 AM\tN1\tN1 N8 N5"]


def make_corpus(tmp_path: Path, **over) -> Corpus:
    write_split(tmp_path, "train", NEWS, TRAIN, vec=f"Q121783\t{VEC}\t\n")
    write_split(tmp_path, "dev", NEWS + DEV_NEWS, DEV)
    write_split(tmp_path, "test", NEWS + DEV_NEWS, TEST)
    return load(tmp_path, **over)


def load(tmp_path: Path, **over) -> Corpus:
    flags = {"data_dir": str(tmp_path), "word_threshold": 2, "max_history_num": 3, "max_title_length": 6,
             "word_embedding_dim": 16, **over}
    cfg = Config.from_args([f"--{k}={v}" for k, v in flags.items()])
    return Corpus(cfg, need_glove=False, log=lambda *a: None)


def test_tokenizer_splits_words_and_punctuation_lowercase():
    assert tokenize("Hello, World! It's 3.5 | ok?") == ["hello", ",", "world", "!", "it", "s", "3", ".", "5", "|",
                                                       "ok", "?"]


def test_vocabulary_threshold_order_and_padding(tmp_path):
    c = make_corpus(tmp_path)
    vocab = c.meta.vocab
    assert vocab[:2] == ["<PAD>", "<UNK>"]
    # counted over train titles + abstracts only; "the" is the most frequent word
    assert vocab[2] == "the"
    assert "game" in vocab and "storm" in vocab  # 'storm' appears twice (title + abstract of N4)
    assert "lakers" not in vocab  # once only: below --word_threshold=2
    assert "brand" not in vocab  # dev-only news never feed the vocabulary
    idx = {w: i for i, w in enumerate(vocab)}
    n8 = c.news_index.get_loc("N8") + 1
    assert list(c.news["title"][n8][:4]) == [1, 1, 1, 1]  # unknown words -> <UNK>
    n1 = c.news_index.get_loc("N1") + 1
    # "The Lakers win again!": lakers, win, again and ! occur once in train -> <UNK>
    assert list(c.news["title"][n1][:5]) == [idx["the"], 1, 1, 1, 1]
    assert c.news["title"][n1][5] == 0  # padded
    assert c.meta.category_names[0] == "<PAD>" and c.meta.category_num == 4


def test_title_truncation_and_entity_alignment(tmp_path):
    c = make_corpus(tmp_path, max_title_length=2)
    n1 = c.news_index.get_loc("N1") + 1
    assert c.news["title"].shape[1] == 2
    # "The Lakers ...": 'Lakers' (char offset 4) is token 1; the entity id lands there and nowhere else
    ent = c.news["title_entity"][n1]
    assert ent[0] == 0 and ent[1] > 0
    assert c.meta.entity_num == 2
    assert np.allclose(c.meta.entity_embeddings[ent[1]], 0.5)


def test_history_keeps_most_recent_and_counts_unknowns(tmp_path):
    c = make_corpus(tmp_path)
    b = c.behaviors("train")
    idx = lambda n: c.news_index.get_loc(n) + 1  # noqa: E731
    hist0 = b["histories"][b["history_row"][0]]
    assert list(hist0) == [idx("N3"), idx("N4"), idx("N5")]  # most recent 3 of N1..N5, oldest first
    hist3 = b["histories"][b["history_row"][3]]
    assert list(hist3) == [idx("N2"), 0, 0]  # N7 unknown: dropped, counted
    assert b["stats"]["unknown_history_news"] == 1
    assert b["stats"]["empty_histories"] == 1
    assert b["stats"]["truncated_histories"] == 2
    # unknown train candidate N9 dropped from training, counted
    assert b["stats"]["unknown_candidate_news"] == 1
    assert list(np.diff(b["offsets"])) == [3, 2, 5, 2]
    assert b["stats"]["no_negative_impressions"] == 1


def test_dev_keeps_unknown_candidates_and_users(tmp_path):
    c = make_corpus(tmp_path)
    b = c.behaviors("dev")
    assert list(np.diff(b["offsets"])) == [3, 2]  # every candidate kept for the official scorer
    assert b["candidates"][3] == 0 and b["stats"]["unknown_candidate_news"] == 1
    assert list(b["user"]) == [c.user_ids.index("U1"), 0]
    assert b["candidates"][2] == c.news_index.get_loc("N8") + 1


def test_unlabelled_test_split(tmp_path):
    c = make_corpus(tmp_path)
    b = c.behaviors("test")
    assert not b["stats"]["labelled"]
    assert (b["labels"] == -1).all()
    assert list(b["impression_ids"]) == [20]


BAD_BEHAVIORS = [
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-0\textra", "expected 5 tab-separated columns"),
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1-1 N2-0", "expected 5 tab-separated columns"),
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-2", "N2-2"),
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2", "every candidate of a labelled file"),
    ("x5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-0", "not an integer"),
    ("5.5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-0", "not an integer"),
    ("1\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-0", "appears twice"),
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1\t ", "empty Impressions column"),
]


@pytest.mark.parametrize("bad_line, message", BAD_BEHAVIORS)
def test_malformed_behaviors_name_file_and_line(tmp_path, bad_line, message):
    write_split(tmp_path, "train", NEWS, TRAIN + [bad_line])
    with pytest.raises(CorpusError) as e:
        load(tmp_path).behaviors("train")
    assert "behaviors.tsv:5:" in str(e.value) and message in str(e.value)


def test_non_utf8_and_bad_news_rows(tmp_path):
    write_split(tmp_path, "train", NEWS, TRAIN)
    path = tmp_path / "MIND-demo" / "train" / "news.tsv"
    path.write_bytes(path.read_bytes() + b"N6\tnews\tnewsus\tCaf\xe9 opens\t\thttp://x\t[]\t[]\n")
    with pytest.raises(CorpusError, match=r"news.tsv:6: not valid UTF-8"):
        load(tmp_path)
    write_split(tmp_path, "train", NEWS + ["N6\tnews\tnewsus\ttitle only"], TRAIN)
    with pytest.raises(CorpusError, match=r"news.tsv:6: expected 8 tab-separated columns"):
        load(tmp_path)
    write_split(tmp_path, "train", NEWS + [news_row("N6", "news", "x", "t", "", "[{bad json")], TRAIN)
    with pytest.raises(CorpusError, match=r"news.tsv:6: column TitleEntities is not valid JSON"):
        load(tmp_path)


def test_missing_corpus_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_MIND_dataset.py --dataset=small"):
        Corpus(Config.from_args([f"--data_dir={tmp_path}", "--dataset=small"]), need_glove=False, log=lambda *a: None)


def test_cache_reuse_and_keys(tmp_path):
    make_corpus(tmp_path).behaviors("train")
    cache = tmp_path / "cache"
    before = sorted(p.name for p in cache.iterdir())
    c = load(tmp_path)
    c.behaviors("train")
    assert sorted(p.name for p in cache.iterdir()) == before  # nothing rebuilt
    assert isinstance(c.news["title"], np.memmap)  # workers share pages
    # a history-length change rebuilds the behaviors only
    load(tmp_path, max_history_num=4).behaviors("train")
    after = sorted(p.name for p in cache.iterdir())
    new = set(after) - set(before)
    assert len(new) == 1 and next(iter(new)).startswith("behaviors-train-")
    # a vocabulary change rebuilds the news table (not the users)
    load(tmp_path, word_threshold=1)
    new = set(p.name for p in cache.iterdir()) - set(after)
    assert [n.split("-")[0] for n in sorted(new)] == ["entity", "news"]
    # an edited input file is noticed (size/mtime in the key)
    beh = tmp_path / "MIND-demo" / "train" / "behaviors.tsv"
    beh.write_text(beh.read_text() + "5\tU1\t11/11/2019 9:05:58 AM\t\tN1-1 N2-0\n")
    assert load(tmp_path).behaviors("train")["stats"]["impressions"] == 5


def test_sample_negatives_distinct_and_masked():
    rng = np.random.default_rng(0)
    n = np.array([10, 4, 2, 0, 7] * 200)
    pos, mask = sample_negatives(n, 4, rng)
    for row, m, k in zip(pos, mask, n):
        real = row[m]
        assert len(real) == min(k, 4) and len(set(real)) == len(real) and (real < max(k, 1)).all()
    # every position is drawn: uniform-ish over range(10)
    counts = np.bincount(pos[n == 10].ravel(), minlength=10)
    assert counts.min() > 0.5 * counts.mean()


def test_train_samples_negatives_from_same_impression(tmp_path):
    c = make_corpus(tmp_path)
    b = c.behaviors("train")
    data = TrainDataset(b, negative_sample_num=3, seed=1)
    # clicks: impr 1 (1), impr 2 (1), impr 3 (2); impr 4 has no negatives: skipped and counted
    assert len(data) == 4 and data.skipped_no_negative == 1
    targets = []
    for epoch in range(6):
        data.set_epoch(epoch)
        batch = data[list(range(len(data)))]
        for i in range(len(data)):
            imp = int(batch.impression_index[i])
            lo, hi = b["offsets"][imp], b["offsets"][imp + 1]
            pos_news = set(b["candidates"][lo:hi][b["labels"][lo:hi] == 1])
            neg_news = list(b["candidates"][lo:hi][b["labels"][lo:hi] == 0])
            cands, mask = batch.candidates[i], batch.candidate_mask[i]
            assert int(cands[batch.target[i]]) in pos_news and bool(mask[batch.target[i]])
            others = [int(x) for j, x in enumerate(cands) if mask[j] and j != batch.target[i]]
            assert sorted(others) == sorted(others) and all(o in neg_news for o in others)
            assert len(others) == min(3, len(neg_news))
            targets.append(int(batch.target[i]))
    assert len(set(targets)) > 1  # the positive is not always at one position
    data.set_epoch(3)
    a = data.candidates.copy()
    data.set_epoch(3)
    assert (a == data.candidates).all()  # deterministic per (seed, epoch): every DDP rank agrees


def test_eval_batches_cover_every_impression_in_order(tmp_path):
    c = make_corpus(tmp_path)
    b = c.behaviors("dev")
    data = EvalDataset(b, batch_size=1)
    seen = {}
    for i in range(len(data)):
        batch = data[i]
        for row, imp in enumerate(batch.impression_index.tolist()):
            lo, hi = b["offsets"][imp], b["offsets"][imp + 1]
            n = int(batch.candidate_mask[row].sum())
            assert list(batch.candidates[row, :n]) == list(b["candidates"][lo:hi])
            assert list(batch.labels[row, :n]) == list(b["labels"][lo:hi])
            seen[imp] = True
    assert sorted(seen) == [0, 1]


def test_batch_ranks_follow_official_tie_rule():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(50, 9)).astype(np.float32)  # many ties
    sizes = rng.integers(1, 10, size=50)
    mask = np.arange(9)[None, :] < sizes[:, None]
    ranks = batch_ranks(torch.from_numpy(scores), torch.from_numpy(mask)).numpy()
    for row in range(50):
        n = sizes[row]
        assert list(ranks[row, :n]) == list(scorer.ranks_from_scores(scores[row, :n]))


# ----------------------------------------------------------------------------------------------------------
# The chunked, byte-level parsers agree with the simple definitions
# ----------------------------------------------------------------------------------------------------------

def reference_behaviors(path: Path, split: str, news_ids: list[str], users: list[str], max_history: int):
    """behaviors.tsv parsed one line and one candidate at a time with str methods: the definition that
    `build_behaviors`' chunked byte-level parsing must reproduce exactly."""
    text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":
        lines.pop()
    rows = [line.split("\t") for line in lines]
    news = {n: i + 1 for i, n in enumerate(news_ids)}
    user_id = {u: i + 1 for i, u in enumerate(users)}
    labelled = any("-" in token for row in rows for token in row[4].split())
    history_of: dict[str, int] = {}
    histories, known_lengths = [], []
    out = {k: [] for k in ("impression_ids", "user", "user_key", "time", "history_row", "candidates", "labels",
                           "sizes")}
    stats = Counter()
    for impression, user, stamp, history, impressions in rows:
        out["impression_ids"].append(int(impression))
        out["user"].append(user_id.get(user, 0))
        out["user_key"].append(int(pd.util.hash_array(np.array([user], dtype=object))[0].astype(np.uint64)
                                   .view(np.int64)))  # one id string at a time
        try:  # hours since 1970-01-01, floored (the time PP-Rec reads)
            out["time"].append(int((datetime.strptime(stamp, mc.TIME_FORMAT) - datetime(1970, 1, 1)).total_seconds())
                               // 3600)
        except ValueError:
            out["time"].append(mc.BAD_TIME)
            stats["bad_times"] += 1
        key = history.strip()
        if key not in history_of:
            history_of[key] = len(histories)
            ids = [news.get(token, 0) for token in key.split()]
            stats["unknown_history_news"] += ids.count(0)
            known = [i for i in ids if i]
            histories.append(known[len(known) - min(len(known), max_history):])  # most recent, oldest first
            known_lengths.append(len(known))
        out["history_row"].append(history_of[key])
        size = 0
        for token in impressions.split():
            nid, label = (token.rpartition("-")[0], int(token.rpartition("-")[2])) if labelled else (token, -1)
            stats["candidates"] += 1
            stats["unknown_candidate_news"] += nid not in news
            if nid in news or split != "train":
                out["candidates"].append(news.get(nid, 0))
                out["labels"].append(label)
                size += 1
        out["sizes"].append(size)
    table = np.zeros((len(histories), max_history), dtype=np.int32)
    for i, h in enumerate(histories):
        table[i, :len(h)] = h
    arrays = dict(impression_ids=np.array(out["impression_ids"], dtype=np.int64),
                  user=np.array(out["user"], dtype=np.int32), user_key=np.array(out["user_key"], dtype=np.int64),
                  time=np.array(out["time"], dtype=np.int32),
                  history_row=np.array(out["history_row"], dtype=np.int32), histories=table,
                  history_length=np.array([len(h) for h in histories], dtype=np.int16),
                  candidates=np.array(out["candidates"], dtype=np.int32),
                  labels=np.array(out["labels"], dtype=np.int8),
                  offsets=np.concatenate([[0], np.cumsum(out["sizes"])]).astype(np.int64))
    stats["labelled"] = labelled
    stats["truncated_histories"] = sum(known_lengths[r] > max_history for r in out["history_row"])
    stats["empty_histories"] = sum(len(histories[r]) == 0 for r in out["history_row"])
    return arrays, stats


def assert_same_arrays(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (what, k)
        assert np.array_equal(got[k], want[k]), (what, k)


# Lines that stress the byte-level parser: several spaces and tabs-free whitespace between ids, leading and
# trailing spaces in a history (the same history as line 1 once stripped), CRLF, a non-ASCII and a 9-byte id
# (the wide-id lookup), an id longer than any news id, an unknown user, a label-looking news id ("N-1-0").
ODD_NEWS = NEWS + [news_row("Nü7", "news", "newsus", "Umlaut id"), news_row("N-1", "news", "newsus", "Dash id")]
ODD_TRAIN = TRAIN + [
    "5\tU1\t11/11/2019 9:05:58 AM\t  N1 N2 N3 N4 N5 \tN1-1   N2-0\x0bN3-0",
    "6\tU4\t11/11/2019 9:05:58 AM\tNü7\tNü7-1 N-1-0 N123456789-0\r",
    "7\tU2\t11/11/2019 9:05:58 AM\tN1\tN5-0 N4-1",
]


@pytest.mark.parametrize("long_id", [False, True])
def test_chunked_behaviors_equal_reference_parser(tmp_path, long_id):
    news = ODD_NEWS + ([news_row("N12345678", "news", "newsus", "Wide id")] if long_id else [])
    write_split(tmp_path, "train", news, ODD_TRAIN)
    write_split(tmp_path, "dev", news + DEV_NEWS, DEV)
    write_split(tmp_path, "test", news + DEV_NEWS, TEST)
    root = tmp_path / "MIND-demo"
    # a BOM and no final newline must not change a thing
    path = root / "train" / "behaviors.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().rstrip(b"\n"))
    news_ids = [line.split("\t")[0] for line in news + DEV_NEWS]
    users = ["U1", "U2", "U3", "U4"]
    for split in ("train", "dev", "test"):
        file = root / split / "behaviors.tsv"
        want, want_stats = reference_behaviors(file, split, news_ids, users, max_history=3)
        for chunk_lines in (1, 2, 3, mc.CHUNK_LINES):
            got, stats = mc.build_behaviors(file, split, pd.Index(news_ids), pd.Index(users), 3, chunk_lines)
            assert_same_arrays(got, want, f"{split}, {chunk_lines} lines per chunk")
            for key, value in want_stats.items():
                assert stats[key] == value, (split, chunk_lines, key)
    got, _ = mc.build_behaviors(root / "train" / "behaviors.tsv", "train", pd.Index(news_ids), pd.Index(users), 3)
    row = lambda n: news_ids.index(n) + 1  # noqa: E731
    assert list(got["candidates"][got["offsets"][5]:got["offsets"][6]]) == [row("Nü7"), row("N-1")]


def test_chunked_behaviors_equal_reference_on_generated_corpus(tmp_path):
    root = demo_corpus.generate_demo(tmp_path / "MIND-demo", num_news=200, num_users=60, num_train_impressions=150,
                            num_dev_impressions=40, num_test_impressions=30, test_labels=False)
    all_news = list(dict.fromkeys(line.split("\t")[0] for s in ("train", "dev", "test")
                                  for line in (root / s / "news.tsv").read_text().splitlines()))
    news_ids = [n for i, n in enumerate(all_news) if i % 4]  # a quarter unknown: dropped / kept and counted
    users = sorted({line.split("\t")[1] for line in (root / "train" / "behaviors.tsv").read_text().splitlines()})
    for split in ("train", "dev", "test"):
        file = root / split / "behaviors.tsv"
        want, want_stats = reference_behaviors(file, split, news_ids, users, max_history=20)
        whole, whole_stats = mc.build_behaviors(file, split, pd.Index(news_ids), pd.Index(users), 20)
        assert_same_arrays(whole, want, split)
        assert whole_stats["unknown_candidate_news"] > 0 and whole_stats["unknown_history_news"] > 0
        assert whole_stats["truncated_histories"] > 0 and whole_stats["labelled"] == (split != "test")
        chunked, chunked_stats = mc.build_behaviors(file, split, pd.Index(news_ids), pd.Index(users), 20, 2)
        assert_same_arrays(chunked, whole, split)
        assert chunked_stats == whole_stats
        for key, value in want_stats.items():
            assert whole_stats[key] == value, (split, key)
    assert mc.Corpus._build_users(root / "train" / "behaviors.tsv")[1]["users"] == [""] + users


@pytest.mark.parametrize("chunk_lines", [1, 2, 3, 100_000])
@pytest.mark.parametrize("bad_line, message", BAD_BEHAVIORS)
def test_malformed_line_is_named_across_chunks(tmp_path, bad_line, message, chunk_lines):
    """The bad line is line 3 of 6: in the first, second or third chunk depending on the chunk size."""
    path = tmp_path / "behaviors.tsv"
    path.write_text("\n".join(TRAIN[:2] + [bad_line] + TRAIN[2:]) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError) as e:
        mc.build_behaviors(path, "train", pd.Index(["N1", "N2"]), pd.Index(["U1"]), 3, chunk_lines)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("chunk_lines", [1, 2, 100_000])
def test_errors_found_in_later_chunks(tmp_path, chunk_lines):
    news, users = pd.Index(["N1", "N2", "N3"]), pd.Index(["U1"])
    path = tmp_path / "behaviors.tsv"
    # labels appear on line 3 after unlabelled lines: the first bad candidate is line 1's first one
    path.write_text("1\tU1\tt\t\tN1 N2\n2\tU1\tt\t\tN3\n3\tU1\tt\t\tN1-1 N2-0\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"behaviors.tsv:1: candidate 'N1': expected '<NewsID>-0'"):
        mc.build_behaviors(path, "test", news, users, 3, chunk_lines)
    # non-UTF-8 on line 4: the line and the byte offset in the file
    good = b"1\tU1\tt\t\tN1-1\n2\tU1\tt\t\tN2-0 N1-1\n3\tU1\tt\tN1\tN3-1\n"
    path.write_bytes(good + b"4\tU1\tt\t\tN\xe91-1\n5\tU1\tt\t\tN1-1\n")
    with pytest.raises(CorpusError, match=rf"behaviors.tsv:4: not valid UTF-8 \(.* at byte {len(good) + 9}\)"):
        mc.build_behaviors(path, "dev", news, users, 3, chunk_lines)
    # column counts: the first bad line, and how many there are in the whole file
    path.write_text("1\tU1\tt\t\tN1-1\n2\tU1\tt\tN1-1\n3\tU1\tt\t\tN1-1\n\n5\tU1\tt\t\tN1-1\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"behaviors.tsv:2: expected 5 tab-separated columns .* found 4; "
                                          r"2 bad lines in total"):
        mc.build_behaviors(path, "dev", news, users, 3, chunk_lines)
    # a duplicate id far from the first one
    path.write_text("".join(f"{i}\tU1\tt\t\tN1-1\n" for i in (7, 8, 9, 10, 8)), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"behaviors.tsv:5: ImpressionID 8 appears twice"):
        mc.build_behaviors(path, "dev", news, users, 3, chunk_lines)


def test_empty_behaviors_file_gives_empty_arrays(tmp_path):
    path = tmp_path / "behaviors.tsv"
    path.write_text("")
    arrays, stats = mc.build_behaviors(path, "dev", pd.Index(["N1"]), pd.Index(["U1"]), 3)
    assert stats["impressions"] == 0 and len(arrays["offsets"]) == 1 and arrays["histories"].shape == (0, 3)


@pytest.mark.parametrize("gather", [0.0, 1.0])  # usecols by one split of the chunk, or by gathering bytes
def test_read_tsv_chunks_crlf_and_bom(tmp_path, monkeypatch, gather):
    monkeypatch.setattr(mc, "_GATHER_FRACTION", gather)
    lf = tmp_path / "lf.tsv"
    lf.write_text("a\tb\tc\nd\u00e9\t\t\n\tf\t\u65e5\r\r\n", encoding="utf-8")
    crlf = tmp_path / "crlf.tsv"  # with a BOM and no final newline
    crlf.write_bytes("\ufeffa\tb\tc\r\nd\u00e9\t\t\r\n\tf\t\u65e5\r\r".encode("utf-8"))
    want = [["a", "b", "c"], ["d\u00e9", "", ""], ["", "f", "\u65e5\r"]]  # one "\r" is part of the line end
    for path in (lf, crlf):
        assert mc.read_tsv(path, ("x", "y", "z")).to_numpy().tolist() == want
        for chunk_lines in (1, 2, 3):
            for usecols in (None, (0,), (2,), (0, 2)):
                chunks = list(mc.iter_tsv(path, ("x", "y", "z"), chunk_lines, usecols))
                assert [c.first_line for c in chunks] == list(range(1, 4, chunk_lines))
                got = np.concatenate([c.fields for c in chunks]).tolist()
                assert got == [[v if usecols is None or j in usecols else None for j, v in enumerate(row)]
                               for row in want], (path.name, chunk_lines, usecols)


TRICKY_TEXTS = [
    "", "   ", "!!", "Hello, World! It's 3.5 | ok?", "ΟΔΟΣ.Α ΟΔΟΣ", "İstanbul'da ŞEHİR", "Straße ẞ café naïve",
    "A\u0301ccent e\u0301 x", "tab-free\rcarriage", "ǅungla ǈ", "日本語のテキスト、です。", "ʰΣ ΑΣʰ", "under_score 1_000",
]


def test_vectorised_tokenizer_equals_tokenize_with_spans(monkeypatch):
    monkeypatch.setattr(mc, "_TEXT_BATCH", 3)  # batch boundaries inside the list
    texts = TRICKY_TEXTS * 2
    tok = mc._tokenize_texts(texts)
    for t, text in enumerate(texts):
        words, spans = mc.tokenize_with_spans(text)
        lo, hi = tok.first[t], tok.first[t + 1]
        assert [tok.words[c] for c in tok.code[lo:hi]] == words, text
        assert list(zip(tok.start[lo:hi].tolist(), tok.end[lo:hi].tolist())) == spans, text


def entity(wid, offsets, forms=None, label="Lakers"):
    return {"Label": label, "Type": "O", "WikidataId": wid, "Confidence": 1.0, "OccurrenceOffsets": offsets,
            "SurfaceForms": forms if forms is not None else [label] * len(offsets)}


def reference_news(files: dict[str, Path], threshold: int, max_title: int, max_abstract: int):
    """The news table one news, token and entity occurrence at a time (the definition `build_news` vectorises)."""
    rows, seen = [], set()
    for split, path in files.items():
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
            row = line.split("\t")
            if row[0] not in seen:
                seen.add(row[0])
                rows.append((split, row))
    toks = [(mc.tokenize_with_spans(row[3]), mc.tokenize_with_spans(row[4])) for _, row in rows]
    counts = Counter(w for (split, _), (t, a) in zip(rows, toks) if split == "train" for w in t[0] + a[0])
    vocab = ["<PAD>", "<UNK>"] + sorted((w for w, c in counts.items() if c >= threshold), key=lambda w: (-counts[w], w))
    index = {w: i for i, w in enumerate(vocab)}
    n = len(rows) + 1
    out = dict(title=np.zeros((n, max_title), np.int32), abstract=np.zeros((n, max_abstract), np.int32),
               title_entity=np.zeros((n, max_title), np.int32),
               abstract_entity=np.zeros((n, max_abstract), np.int32))
    entities: dict[str, int] = {}
    for i, ((_, row), texts) in enumerate(zip(rows, toks)):
        for (words, spans), column, name, max_len in ((texts[0], 6, "title", max_title),
                                                      (texts[1], 7, "abstract", max_abstract)):
            ids = [index.get(w, 1) for w in words[:max_len]]
            out[name][i + 1, :len(ids)] = ids
            for ent in json.loads(row[column] or "[]"):
                if not ent.get("WikidataId"):
                    continue
                eid = entities.setdefault(ent["WikidataId"], len(entities) + 1)
                forms = ent.get("SurfaceForms") or []
                for j, offset in enumerate(ent.get("OccurrenceOffsets") or []):
                    start = int(offset)
                    end = start + max(len(forms[j]) if j < len(forms) else len(ent.get("Label") or ""), 1)
                    for t, (s, e) in enumerate(spans[:max_len]):
                        if s < end and e > start:
                            out[name + "_entity"][i + 1, t] = eid
    return out, vocab, ["<PAD>"] + list(entities)


def test_vectorised_news_table_equals_reference(tmp_path):
    root = demo_corpus.generate_demo(tmp_path / "MIND-demo", num_news=150, num_users=40, num_train_impressions=60,
                            num_dev_impressions=20, num_test_impressions=20)
    odd = [  # overlapping occurrences (the later wins), offsets past the text or negative, forms missing,
             # no WikidataId, no occurrences (still numbered), tokens past the title length, Unicode texts
        news_row("X1", "news", "newsus", "The Lakers beat the Lakers again and again and again", "Lakers!",
                 json.dumps([entity("Q1", [4, 500, -3]), entity("Q2", [4], ["Lak"]), entity("", [0]),
                             entity("Q3", []), entity("Q4", [40, 47], [])])),
        news_row("X2", "sports", "nba", "ΟΔΟΣ.Α İstanbul Straße", "ǅungla ǈ naïve Lakers",
                 json.dumps([entity("Q4", [7], ["İstanbul"])])),
    ]
    for s in ("train", "dev"):
        path = root / s / "news.tsv"
        path.write_text(path.read_text(encoding="utf-8") + "\n".join(odd) + "\n", encoding="utf-8")
    files = {s: root / s / "news.tsv" for s in ("train", "dev", "test")}
    for threshold, max_title, max_abstract in ((1, 6, 20), (3, 32, 128)):
        arrays, meta = mc.build_news(files, threshold, max_title, max_abstract)
        want, vocab, entities = reference_news(files, threshold, max_title, max_abstract)
        assert meta["vocab"] == vocab and meta["entities"] == entities
        for name, value in want.items():
            assert np.array_equal(arrays[name], value), (name, threshold)
        assert (arrays["title_entity"] > 0).sum() > 50 and (arrays["abstract_entity"] > 0).sum() > 50


def test_cache_built_with_relative_data_dir_reads_with_absolute_one(tmp_path, monkeypatch):
    """The corpus cache is keyed by each file's resolved path, so one cache serves `--data_dir=data` and
    `--data_dir=/abs/.../data`; the news row counts of its log line must be found under either spelling (they
    were stored under the spelling of the first build: a KeyError on the second)."""
    demo_corpus.generate_demo(tmp_path / "data" / "MIND-demo", num_news=120, num_users=30, num_train_impressions=40,
                              num_dev_impressions=15, num_test_impressions=10)
    monkeypatch.chdir(tmp_path)
    for data_dir in ("data", str(tmp_path / "data")):
        logs = []
        Corpus(Config.from_args(["--dataset=demo", f"--data_dir={data_dir}"]), need_glove=False, log=logs.append)
        assert any("news (distinct NewsIDs of 3 news.tsv files" in line for line in logs), (data_dir, logs)
