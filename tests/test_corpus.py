"""MIND parsing, vocabulary, truncation, cache keys, bad input, negative sampling and batching."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from config import Config
from dataset import EvalDataset, TrainDataset, sample_negatives
from MIND_corpus import Corpus, CorpusError, tokenize
from trainer import batch_ranks
import util

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


@pytest.mark.parametrize("bad_line, message", [
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-0\textra", "expected 5 tab-separated columns"),
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1-1 N2-0", "expected 5 tab-separated columns"),
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-2", "N2-2"),
    ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2", "every candidate of a labelled file"),
    ("x5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-0", "not an integer"),
    ("1\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2-0", "appears twice"),
])
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
        assert list(ranks[row, :n]) == list(util.ranks_from_scores(scores[row, :n]))
