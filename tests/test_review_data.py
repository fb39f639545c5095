"""Data-layer cases of issue 22's review: each a one-line error naming the file, line or flag, or a counted note in
the log (docs/data.md, "Bad input")."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import demo_corpus
import glove_vectors
from MIND_corpus import Corpus, CorpusError
from test_bad_input import DEV, NEWS, TRAIN, VEC, corpus, flags, news_row, write_corpus

ROOT = Path(__file__).resolve().parents[1]
ENT = json.dumps([{"WikidataId": "Q1", "OccurrenceOffsets": [4], "SurfaceForms": ["Lakers"]}])
NEWS_WITH_ENTITY = NEWS + [news_row("N6", title="The Lakers", ents=ENT)]


# ==========================================================================================================
# entity_embedding.vec
# ==========================================================================================================

def test_a_bom_on_entity_embedding_vec_keeps_the_first_entity(tmp_path):
    """The BOM used to become part of the first WikidataId ('\\ufeffQ1'), so Q1 silently got a zero vector."""
    write_corpus(tmp_path, news=NEWS_WITH_ENTITY)
    for split in ("train", "dev"):  # (each split's file would give Q1 its vector)
        path = tmp_path / "MIND-small" / split / "entity_embedding.vec"
        path.write_bytes(b"\xef\xbb\xbf" + f"Q1\t{VEC}\t\n".encode())
    c = corpus(tmp_path)
    assert c.entity_stats["found"] == 1 and c.entity_stats["missing"] == 0
    np.testing.assert_array_equal(c.meta.entity_embeddings[1], 0.5)


# ==========================================================================================================
# Blank lines: one rule for every MIND file
# ==========================================================================================================

def _append(path: Path, text: bytes) -> None:
    path.write_bytes(path.read_bytes() + text)


@pytest.mark.parametrize("name", ["news.tsv", "behaviors.tsv", "entity_embedding.vec"])
@pytest.mark.parametrize("ending", [b"\n", b"\n\n\n", b"\r\n", b"  \n"])
def test_blank_lines_at_the_end_of_a_file_are_skipped(tmp_path, name, ending):
    write_corpus(tmp_path / "a", news=NEWS_WITH_ENTITY)
    clean = corpus(tmp_path / "a")
    write_corpus(tmp_path / "b", news=NEWS_WITH_ENTITY)
    for split in ("train", "dev"):
        _append(tmp_path / "b" / "MIND-small" / split / name, ending)
    c = corpus(tmp_path / "b")
    assert c.news_meta["news_ids"] == clean.news_meta["news_ids"]
    np.testing.assert_array_equal(c.meta.entity_embeddings, clean.meta.entity_embeddings)
    for split in ("train", "dev"):
        a, b = clean.behaviors(split), c.behaviors(split)
        np.testing.assert_array_equal(a["candidates"], b["candidates"])
        assert a["stats"] == b["stats"]


@pytest.mark.parametrize("name, rows", [
    ("news.tsv", NEWS_WITH_ENTITY), ("behaviors.tsv", TRAIN), ("entity_embedding.vec", [f"Q1\t{VEC}", f"Q2\t{VEC}"]),
])
@pytest.mark.parametrize("blank", ["", "  ", "\r"])
def test_a_blank_line_inside_a_file_is_an_error_naming_the_line(tmp_path, name, rows, blank):
    write_corpus(tmp_path, news=NEWS_WITH_ENTITY)
    path = tmp_path / "MIND-small" / "train" / name
    path.write_text(rows[0] + "\n" + blank + "\n" + "\n".join(rows[1:]) + "\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{re.escape(str(path))}:2: a blank line inside the file \(blank lines "
                                          rf"are skipped only at its end\); delete it"):
        corpus(tmp_path).behaviors("train")


def test_blank_lines_at_the_end_across_chunks(tmp_path, monkeypatch):
    """Blank lines that fill a whole chunk of behaviors.tsv at the end are skipped; before data they are an error."""
    import MIND_corpus as mc

    monkeypatch.setattr(mc, "CHUNK_LINES", 2)
    write_corpus(tmp_path / "a")
    clean = corpus(tmp_path / "a").behaviors("train")
    write_corpus(tmp_path / "b", train=TRAIN + ["", "", "", "", ""])
    got = corpus(tmp_path / "b").behaviors("train")
    np.testing.assert_array_equal(got["candidates"], clean["candidates"])
    write_corpus(tmp_path / "c", train=TRAIN[:2] + ["", ""] + TRAIN[2:])
    with pytest.raises(CorpusError, match=r"behaviors.tsv:3: a blank line inside the file"):
        corpus(tmp_path / "c").behaviors("train")


# ==========================================================================================================
# behaviors.tsv: a candidate listed twice with both labels
# ==========================================================================================================

@pytest.mark.parametrize("split", ["train", "dev"])
@pytest.mark.parametrize("impressions", ["N1-1 N2-0 N1-0", "N1-0 N3-0 N1-1", "N77-1 N2-0 N77-0"])
def test_a_candidate_listed_twice_with_both_labels_is_an_error(tmp_path, split, impressions):
    """The official scorer ranks positions, not news: the same news gets the same score at both positions, so the
    pair is a tie whatever the model does, and training would ask for the news to be clicked and not clicked."""
    line = f"7\tU1\tt\tN1\t{impressions}"
    write_corpus(tmp_path, train=TRAIN + [line] if split == "train" else TRAIN,
                 dev=DEV + [line] if split == "dev" else DEV)
    nid = impressions.split("-")[0]
    path = tmp_path / "MIND-small" / split / "behaviors.tsv"
    with pytest.raises(CorpusError, match=rf"{re.escape(str(path))}:4: candidate {nid} is listed twice with "
                                          rf"both labels \({nid}-1 and {nid}-0\)"):
        corpus(tmp_path).behaviors(split)


def test_a_candidate_listed_twice_with_the_same_label_is_accepted(tmp_path):
    write_corpus(tmp_path, train=TRAIN + ["7\tU1\tt\tN1\tN1-1 N2-0 N2-0"])
    assert corpus(tmp_path).behaviors("train")["stats"]["impressions"] == 4


# ==========================================================================================================
# The vocabulary, the entity file, GloVe
# ==========================================================================================================

def test_a_vocabulary_emptied_by_word_threshold_names_the_flag(tmp_path):
    write_corpus(tmp_path)
    with pytest.raises(CorpusError, match=r"--word_threshold=1000: no word of the train titles and abstracts appears "
                                          r"1000 times \(the most frequent, 'the', appears \d+ times\)"):
        corpus(tmp_path, word_threshold=1000)


def test_kcnn_without_an_entity_file_is_told_what_it_means(tmp_path):
    write_corpus(tmp_path, news=NEWS_WITH_ENTITY)
    for split in ("train", "dev"):
        (tmp_path / "MIND-small" / split / "entity_embedding.vec").unlink()
    lines = []
    Corpus(_config(tmp_path), need_glove=False, need_entities=True, log=lines.append)
    warning = [line for line in lines if line.startswith("WARNING")]
    root = tmp_path / "MIND-small"
    assert warning == [f"WARNING: no entity_embedding.vec in {root}/train or {root}/dev: the 1 entities of news.tsv "
                       f"get zero vectors, so the news encoder sees no entity (KCNN works from the words alone); put "
                       f"MIND's entity_embedding.vec beside each news.tsv"]
    quiet = []
    Corpus(_config(tmp_path), need_glove=False, log=quiet.append)  # an encoder without entities: no warning
    assert not any(line.startswith("WARNING") for line in quiet)
    assert "1 entities (no entity_embedding.vec: zero vectors)" in quiet[-1]


def test_main_asks_the_corpus_for_entities_for_kcnn(tmp_path):
    from config import Config
    from main import load_corpus

    write_corpus(tmp_path, news=NEWS_WITH_ENTITY)
    for split in ("train", "dev"):
        (tmp_path / "MIND-small" / split / "entity_embedding.vec").unlink()
    lines = []
    cfg = Config.from_args(flags(tmp_path, news_encoder="KCNN", user_encoder="ATT", word_embedding_dim=100,
                                 mode="train"))
    load_corpus(cfg, log=lines.append)
    assert any(line.startswith("WARNING: no entity_embedding.vec") for line in lines)


def _config(data: Path, **over):
    from config import Config

    return Config.from_args(flags(data, **over))


def _glove(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "glove.test.4d.txt"
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = ["the 0.1 0.2 0.3 0.4", "team 1 1 1 1", "wins 2 2 2 2", "game 3 3 3 3", "fans 4 4 4 4"]


def test_glove_rows_of_another_width_are_counted_and_reported(tmp_path):
    path = _glove(tmp_path, GOOD[:2] + ["lakers 0.5 0.5 0.5", "coast 0.5 0.5 0.5 0.5 0.5"] + GOOD[2:])
    report = {}
    matrix, found = glove_vectors.load_glove(["<PAD>", "<UNK>", "the", "lakers", "coast", "game"], 4, str(path),
                                             report=report)
    assert found == 2  # the, game
    assert report == dict(rows=7, kept=5, other_width=2, other_width_example=(3, 3), blank=0)
    write_corpus(tmp_path)
    lines = []
    Corpus(_config(tmp_path, glove_path=path, word_embedding_dim=4), log=lines.append)
    glove = [line for line in lines if line.startswith("GloVe")]
    size = path.stat().st_size
    assert glove == [f"GloVe: 5/{len(corpus(tmp_path).meta.vocab) - 2} vocabulary words found in {path} ({size} bytes, "
                     f"7 rows: 5 of 4 values; 2 rows of another width dropped, the first at line 3 with 3 values)"]


def test_a_glove_file_with_no_row_of_the_width_is_an_error_naming_file_and_width(tmp_path):
    path = _glove(tmp_path, ["the 0.1 0.2 0.3", "team 1 1 1", "wins 2 2 2"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: the GloVe vectors have 3 dimensions, but dim=4"):
        glove_vectors.load_glove(["<PAD>", "<UNK>", "the"], 4, str(path))


def test_glove_with_every_row_dropped_after_the_head_is_an_error(tmp_path, monkeypatch):
    """The first rows decide the file's width; should no row at all be usable, that is an error, not a random
    matrix."""
    monkeypatch.setattr(glove_vectors, "_trailing_floats", lambda line: 4)  # the head check passes
    path = _glove(tmp_path, ["the 0.1 0.2", "team 1 1"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: no row of 4 values \(2 rows of another width\)"):
        glove_vectors.load_glove(["<PAD>", "<UNK>", "the"], 4, str(path))


def test_the_glove_log_line_names_the_file_not_a_cache_key(tmp_path):
    path = _glove(tmp_path, GOOD)
    write_corpus(tmp_path)
    for attempt in ("built", "cache"):
        lines = []
        Corpus(_config(tmp_path, glove_path=path, word_embedding_dim=4), log=lines.append)
        glove = next(line for line in lines if line.startswith("GloVe"))
        assert f"in {path} ({path.stat().st_size} bytes, 5 rows: 5 of 4 values" in glove, attempt
        assert "[" not in glove and not re.search(r"\b\d{12,}\b", glove), glove  # no file signature, no mtime
        assert glove.endswith("from the cache)") == (attempt == "cache")


# ==========================================================================================================
# Split files that are folders
# ==========================================================================================================

@pytest.mark.parametrize("split, name", [("train", "news.tsv"), ("dev", "news.tsv"), ("train", "behaviors.tsv"),
                                         ("dev", "behaviors.tsv"), ("train", "entity_embedding.vec")])
def test_a_split_file_that_is_a_folder_is_one_line(tmp_path, split, name):
    write_corpus(tmp_path)
    path = tmp_path / "MIND-small" / split / name
    path.unlink()
    path.mkdir()
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))} is a folder, not a file; MIND's {split}/{name} "
                                          rf"is a [^:]*: move the folder away and put the file there$"):
        c = corpus(tmp_path)
        c.behaviors(split)


def test_a_news_tsv_folder_on_the_command_line(tmp_path):
    write_corpus(tmp_path)
    path = tmp_path / "MIND-small" / "train" / "news.tsv"
    path.unlink()
    path.mkdir()
    proc = subprocess.run([sys.executable, "main.py", *flags(tmp_path), "--mode=train", "--epoch=1", "--no-progress",
                           f"--output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path} is a folder, not a file")


# ==========================================================================================================
# How many news: generated, written, loaded
# ==========================================================================================================

TINY = dict(num_news=200, num_users=60, num_train_impressions=80, num_dev_impressions=20, num_test_impressions=20)


def test_the_demo_says_how_many_of_its_news_the_splits_use(tmp_path, capsys):
    root = demo_corpus.ensure_demo(tmp_path, **TINY)
    written = set()
    for split in ("train", "dev", "test"):
        written |= {line.split("\t")[0] for line in (root / split / "news.tsv").read_text().splitlines()}
    out = capsys.readouterr().out
    unused = 200 - len(written)
    assert unused > 0  # news neither shown in an impression nor clicked in a shown user's history
    assert (f"(200 news drawn, {len(written)} of them in the splits' news.tsv: the other {unused} are neither shown "
            f"nor in the history of a user shown") in out


def test_the_corpus_line_says_where_its_news_count_comes_from(tmp_path):
    write_corpus(tmp_path, test=DEV, news=NEWS + [NEWS[1]])  # one duplicate row in each file
    lines = []
    corpus(tmp_path, log=lines.append)
    assert re.search(r": 5 news \(distinct NewsIDs of 3 news.tsv files of 6/6/6 rows \(train/dev/test\): a news in "
                     r"several files is read once\)", lines[-1]), lines[-1]


def test_caches_of_the_older_readers_are_not_reused(tmp_path, monkeypatch):
    """An entity matrix cached by the reader that let a BOM zero the first entity (or behaviors cached before
    contradictory labels were checked) is rebuilt, not loaded."""
    import MIND_corpus as mc

    write_corpus(tmp_path, news=NEWS_WITH_ENTITY)
    monkeypatch.setattr(mc, "ENTITY_READER_VERSION", 1)
    monkeypatch.setattr(mc, "BEHAVIORS_READER_VERSION", 1)
    corpus(tmp_path).behaviors("train")
    before = {p.name for p in (tmp_path / "cache").iterdir()}
    monkeypatch.undo()
    corpus(tmp_path).behaviors("train")
    rebuilt = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir() if p.name not in before)
    assert rebuilt == ["behaviors-train", "entity"], rebuilt


def test_glove_blank_lines_inside_are_counted_and_at_the_end_skipped(tmp_path):
    path = _glove(tmp_path, GOOD[:2] + [""] + GOOD[2:] + ["", ""])
    report = {}
    _, found = glove_vectors.load_glove(["<PAD>", "<UNK>", "the", "fans"], 4, str(path), report=report)
    assert found == 2 and report == dict(rows=5, kept=5, other_width=0, other_width_example=None, blank=1)
