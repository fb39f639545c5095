"""demo_corpus.py, the demo generator (format, determinism, oracle), and prepare_MIND_dataset.py, the MIND protocols, which are
built here from tiny fake MIND zips (MIND rows may not be redistributed), plus the offline and download paths."""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import time
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

import demo_corpus
import prepare_MIND_dataset as pm
import scorer
from MIND_corpus import SPLITS
import util

from common import FileServer  # noqa: E402

TINY = dict(num_news=300, num_users=150, num_train_impressions=400, num_dev_impressions=120,
            num_test_impressions=120)
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
TIME_RE = re.compile(r"^(1[0-2]|[1-9])/([1-9]|[12]\d|3[01])/\d{4} (1[0-2]|[1-9]):[0-5]\d:[0-5]\d (AM|PM)$")


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------

def read_rows(path: Path, columns: int) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", f"{path} must end with a newline"
    rows = [line.split("\t") for line in lines[:-1]]
    for row in rows:
        assert len(row) == columns, (path, row[:3])
    return rows


def parse_impressions(cell: str) -> tuple[list[str], list[int]]:
    items = cell.split(" ")
    if all("-" in x for x in items):
        return [x.rsplit("-", 1)[0] for x in items], [int(x.rsplit("-", 1)[1]) for x in items]
    assert not any("-" in x for x in items)
    return items, []


def flat_split(root: Path, split: str):
    """Flat true probabilities, labels (from behaviors, or labels_hidden.tsv for test) and offsets."""
    behaviors = read_rows(root / split / "behaviors.tsv", 5)
    probs = {r[0]: [float(x) for x in r[1].split(" ")] for r in read_rows(root / split / "click_probabilities.tsv", 2)}
    hidden = {}
    if (root / split / "labels_hidden.tsv").exists():
        hidden = {r[0]: [int(x) for x in r[1].split(" ")] for r in read_rows(root / split / "labels_hidden.tsv", 2)}
    p, y, sizes, cands = [], [], [], []
    for row in behaviors:
        news, labels = parse_impressions(row[4])
        labels = labels or hidden[row[0]]
        assert len(probs[row[0]]) == len(news) == len(labels)
        p += probs[row[0]]
        y += labels
        sizes.append(len(news))
        cands += news
    return np.array(p), np.array(y), np.concatenate([[0], np.cumsum(sizes)]), cands, behaviors


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_corpus.generate_demo(tmp_path_factory.mktemp("demo") / "MIND-demo")  # default size (< 1 s)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return demo_corpus.generate_demo(tmp_path_factory.mktemp("tiny") / "MIND-demo", **TINY)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# Demo generator
# ----------------------------------------------------------------------------------------------------------

# sha256 (first 16 hex digits) of every file the generator wrote, with numpy 2.4.6, before it moved out of
# prepare_MIND_dataset.py into demo_corpus.py (and took scorer.py's AUC for oracle.json): the same bytes since.
DEMO_BYTES = {
    "default": {"dev/behaviors.tsv": "06312d649e4bcf70", "dev/click_probabilities.tsv": "1f8a85d23e9dd923",
                "dev/entity_embedding.vec": "b1f88f3903a53ff1", "dev/news.tsv": "a02627a708327f88",
                "dev/relation_embedding.vec": "f1ddd98a0780a9a6", "oracle.json": "5b893ac80d65f023",
                "test/behaviors.tsv": "1e4f803526f5ffe8", "test/click_probabilities.tsv": "f120b4cd2569e845",
                "test/entity_embedding.vec": "b1f88f3903a53ff1", "test/labels_hidden.tsv": "002bdea458013529",
                "test/news.tsv": "c45c0bb640ff6515", "test/relation_embedding.vec": "f1ddd98a0780a9a6",
                "train/behaviors.tsv": "51099bb4c774bcc9", "train/click_probabilities.tsv": "240d0f403f809aef",
                "train/entity_embedding.vec": "b1f88f3903a53ff1", "train/news.tsv": "f67548ea618d4f00",
                "train/relation_embedding.vec": "f1ddd98a0780a9a6"},
    # num_news=300, num_users=120, 300/80/80 impressions, seed 3, test_labels=False
    "tiny": {"dev/behaviors.tsv": "a47161ecb51ba6b0", "dev/click_probabilities.tsv": "0a7c4d8606fe6cb9",
             "dev/entity_embedding.vec": "3481203e90e54e58", "dev/news.tsv": "8c9878d26a179cb8",
             "dev/relation_embedding.vec": "52d571b1e057012d", "oracle.json": "2cbcc119ebbefbc9",
             "test/behaviors.tsv": "6fcb459440f2f430", "test/click_probabilities.tsv": "c2954a4fb3d45b0d",
             "test/entity_embedding.vec": "3481203e90e54e58", "test/labels_hidden.tsv": "feef2b74a1c2f11b",
             "test/news.tsv": "36947e6d7537d6ad", "test/relation_embedding.vec": "52d571b1e057012d",
             "train/behaviors.tsv": "697a332e96e5f5cd", "train/click_probabilities.tsv": "6e326ddbed42023a",
             "train/entity_embedding.vec": "2e580ff5f0d3853c", "train/news.tsv": "5d5431e5c2184c6e",
             "train/relation_embedding.vec": "52d571b1e057012d"},
}


def test_demo_bytes_are_those_of_the_generator_before_it_moved(demo, tmp_path):
    tiny = demo_corpus.generate_demo(tmp_path / "tiny", num_news=300, num_users=120, num_train_impressions=300,
                                     num_dev_impressions=80, num_test_impressions=80, seed=3, test_labels=False)
    for name, root in (("default", demo), ("tiny", tiny)):
        got = {k: hashlib.sha256(v).hexdigest()[:16] for k, v in files_of(root).items()}
        assert got == DEMO_BYTES[name], f"{name} demo: other bytes than before (numpy {np.__version__})"
    assert json.loads((demo / "oracle.json").read_text())["dev_auc"] == 0.815069


def test_demo_is_deterministic(tmp_path, tiny):
    again = demo_corpus.generate_demo(tmp_path / "again", **TINY)
    assert files_of(again) == files_of(tiny)
    other = demo_corpus.generate_demo(tmp_path / "other", **TINY, seed=1)
    assert files_of(other)["train/behaviors.tsv"] != files_of(tiny)["train/behaviors.tsv"]
    assert not list(tmp_path.glob(".*tmp*")), "temp folders are renamed or removed"


@pytest.mark.parametrize("test_labels", [True, False])
def test_demo_written_in_chunks_is_byte_identical(tmp_path, monkeypatch, test_labels):
    """The generator writes its text WRITE_CHUNK impressions at a time and does its elementwise maths in
    slices (so a MIND-large-sized corpus fits in memory); neither may change a byte of the output."""
    whole = demo_corpus.generate_demo(tmp_path / "whole", **TINY, test_labels=test_labels)  # one chunk at this size
    slices = demo_corpus._chunks
    monkeypatch.setattr(demo_corpus, "_chunks", lambda n, size=1 << 22: slices(n, min(size, 97)))
    monkeypatch.setattr(demo_corpus, "WRITE_CHUNK", 7)
    chunked = demo_corpus.generate_demo(tmp_path / "chunked", **TINY, test_labels=test_labels)
    assert files_of(chunked) == files_of(whole)


def test_demo_layout_and_news_format(demo):
    for split in SPLITS:
        for name in pm.SPLIT_FILES + ("click_probabilities.tsv",):
            assert (demo / split / name).is_file(), (split, name)
    assert (demo / "test" / "labels_hidden.tsv").is_file()
    categories, words = set(), set()
    for row in read_rows(demo / "train" / "news.tsv", 8):
        nid, cat, sub, title, abstract, url, title_ent, abstract_ent = row
        assert re.fullmatch(r"N\d+", nid) and url.startswith("https://") and sub
        categories.add(cat)
        assert title[0].isupper() and 6 <= len(title.split()) <= 14
        assert abstract == "" or 15 <= len(abstract.split()) <= 40
        json.loads(title_ent), json.loads(abstract_ent)
        words.update(re.findall(r"[a-z]+", (title + " " + abstract).lower()))
    assert categories == set(demo_corpus.CATEGORIES) and len(categories) == 17
    text = (demo / "train" / "news.tsv").read_text()
    assert all(ch in text for ch in ",.!?:"), "punctuation for the tokenizer"
    assert "\t\thttps://" in text, "some abstracts are empty"
    assert "\t[]\t[]\n" in text, "some news have no entities"
    assert len(words) > 300


def test_entity_offsets_point_at_the_label(demo):
    checked = 0
    for split in SPLITS:
        for row in read_rows(demo / split / "news.tsv", 8):
            for text, column in ((row[3], row[6]), (row[4], row[7])):
                for ent in json.loads(column):
                    assert set(ent) == {"Label", "Type", "WikidataId", "Confidence", "OccurrenceOffsets", "SurfaceForms"}
                    assert re.fullmatch(r"Q\d+", ent["WikidataId"]) and 0 < ent["Confidence"] <= 1
                    assert len(ent["OccurrenceOffsets"]) == len(ent["SurfaceForms"]) >= 1
                    for offset, form in zip(ent["OccurrenceOffsets"], ent["SurfaceForms"]):
                        assert text[offset:offset + len(ent["Label"])] == ent["Label"] == form
                        checked += 1
    assert checked > 1000


def test_entity_and_relation_vectors(demo):
    used = set()
    for row in read_rows(demo / "dev" / "news.tsv", 8):
        used |= {e["WikidataId"] for col in (row[6], row[7]) for e in json.loads(col)}
    for name in ("entity_embedding.vec", "relation_embedding.vec"):
        lines = (demo / "dev" / name).read_text().split("\n")[:-1]
        assert lines
        for line in lines:
            assert line.endswith("\t"), "MIND's vector lines end with a tab"
            parts = line[:-1].split("\t")
            assert len(parts) == 101
            np.asarray(parts[1:], dtype=np.float64)
        if name == "entity_embedding.vec":
            assert {line.split("\t", 1)[0] for line in lines} == used


def test_behaviors_format(demo):
    train_news = {r[0] for r in read_rows(demo / "train" / "news.tsv", 8)}
    last_time = None
    for split in SPLITS:
        news_ids = {r[0] for r in read_rows(demo / split / "news.tsv", 8)}
        rows = read_rows(demo / split / "behaviors.tsv", 5)
        referenced, history_lengths = set(), []
        for impression_id, user, stamp, history, impressions in rows:
            assert impression_id.isdigit() and re.fullmatch(r"U\d+", user) and TIME_RE.match(stamp)
            t = datetime.strptime(stamp, TIME_FORMAT)
            assert last_time is None or t >= last_time, "times increase, train before dev before test"
            last_time = t
            hist = history.split(" ") if history else []
            history_lengths.append(len(hist))
            assert len(set(hist)) == len(hist)
            news, labels = parse_impressions(impressions)
            assert 5 <= len(news) <= 40 and len(set(news)) == len(news)
            assert labels, "test is labelled by default"
            assert set(labels) <= {0, 1} and 0 < sum(labels) < len(labels)
            referenced |= set(hist) | set(news)
        assert referenced <= news_ids, f"{split}/news.tsv holds every news its behaviors reference"
        if split != "train":
            assert referenced - train_news, f"{split} shows news absent from train"
        lengths = np.array(history_lengths)
        assert (lengths == 0).any() and (lengths > 50).any() and lengths.max() <= 90
    ids = [int(r[0]) for r in read_rows(demo / "test" / "behaviors.tsv", 5)]
    assert ids == list(range(1, len(ids) + 1))


def test_unlabelled_test_split_changes_nothing_else(tmp_path, tiny):
    hidden = demo_corpus.generate_demo(tmp_path / "hidden", **TINY, test_labels=False)
    a, b = files_of(tiny), files_of(hidden)
    assert {k for k in a if a[k] != b[k]} == {"test/behaviors.tsv", "oracle.json"}
    labelled = read_rows(tiny / "test" / "behaviors.tsv", 5)
    unlabelled = read_rows(hidden / "test" / "behaviors.tsv", 5)
    truth = {r[0]: r[1] for r in read_rows(hidden / "test" / "labels_hidden.tsv", 2)}
    for x, y in zip(labelled, unlabelled):
        assert x[:4] == y[:4]
        assert "-" not in y[4]
        news, labels = parse_impressions(x[4])
        assert y[4].split(" ") == news and truth[x[0]] == " ".join(map(str, labels))
    oracle_a, oracle_b = (json.loads((r / "oracle.json").read_text()) for r in (tiny, hidden))
    assert oracle_b.pop("test_labels") is False and oracle_a.pop("test_labels") is True
    assert oracle_a == oracle_b


def test_oracle_matches_click_probabilities(demo):
    oracle = json.loads((demo / "oracle.json").read_text())
    assert oracle["seed"] == 0 and oracle["sizes"] == demo_corpus.DEMO_SIZES
    for split in SPLITS:
        p, y, offsets, _, _ = flat_split(demo, split)
        assert ((p > 0) & (p < 1)).all()
        recomputed = scorer.compute_metrics_flat(p, y, offsets)  # the project's official-metric implementation
        assert recomputed["skipped_single_class"] == 0
        assert recomputed["auc"] == pytest.approx(oracle[f"{split}_auc"], abs=2e-6)
        assert 0.75 <= oracle[f"{split}_auc"] <= 0.85
        assert 0.5 < oracle[f"{split}_popularity_auc"] < oracle[f"{split}_affinity_auc"] < oracle[f"{split}_auc"]
        # The probabilities are calibrated: the click rate follows them (labels were forced in a few impressions).
        assert abs(y.mean() - p.mean()) < 0.03


def test_popularity_scorer_beats_chance_but_not_the_oracle(demo):
    p_train, y_train, _, cand_train, _ = flat_split(demo, "train")
    clicks, shown = {}, {}
    for n, y in zip(cand_train, y_train):
        clicks[n] = clicks.get(n, 0) + int(y)
        shown[n] = shown.get(n, 0) + 1
    prior = y_train.mean()
    oracle = json.loads((demo / "oracle.json").read_text())
    for split in ("dev", "test"):
        _, y, offsets, cands, _ = flat_split(demo, split)
        score = np.array([(clicks.get(n, 0) + 10 * prior) / (shown.get(n, 0) + 10) for n in cands])
        auc = scorer.compute_metrics_flat(score, y, offsets)["auc"]
        assert 0.53 < auc < oracle[f"{split}_auc"] - 0.1, (split, auc)


def test_ensure_demo_reuses_and_never_replaces(tmp_path, capsys):
    root = demo_corpus.ensure_demo(tmp_path, **TINY)
    assert root == tmp_path / "MIND-demo" and "generated" in capsys.readouterr().out
    stamp = (root / "train" / "behaviors.tsv").stat().st_mtime_ns
    assert demo_corpus.ensure_demo(tmp_path, **TINY) == root
    assert capsys.readouterr().out == "" and (root / "train" / "behaviors.tsv").stat().st_mtime_ns == stamp
    # other settings: an error, and the corpus stays (it used to be replaced: data loss)
    with pytest.raises(demo_corpus.DemoMismatchError, match="--demo_train_impressions"):
        demo_corpus.ensure_demo(tmp_path, **{**TINY, "num_train_impressions": 200})
    with pytest.raises(demo_corpus.DemoMismatchError, match="--demo_seed"):
        demo_corpus.ensure_demo(tmp_path, **TINY, seed=2)
    assert (root / "train" / "behaviors.tsv").stat().st_mtime_ns == stamp
    assert len(read_rows(root / "train" / "behaviors.tsv", 5)) == TINY["num_train_impressions"]
    # settings left out (seed=None) take the corpus as it is
    assert demo_corpus.ensure_demo(tmp_path, seed=None, num_news=TINY["num_news"]) == root
    assert (root / "train" / "behaviors.tsv").stat().st_mtime_ns == stamp
    with pytest.raises(TypeError, match="unknown size"):
        demo_corpus.ensure_demo(tmp_path, news=3)


def test_ensure_demo_writes_beside_and_renames_so_racing_processes_keep_one_corpus(tmp_path, monkeypatch):
    """Two nodes of a multi-node run may generate the demo at once on a shared filesystem: the first rename wins,
    the other keeps that corpus and drops its (identical) copy, and no hidden temporary folder is left behind."""
    real = util.replace_dir_atomically
    builds, first = [], {}

    def racing(target, build, keep_existing=None):
        def build_while_another_process_finishes(tmp):
            builds.append(Path(tmp))
            build(tmp)
            if len(builds) == 1:
                assert not (tmp_path / "MIND-demo").exists()  # we are writing beside, not into, MIND-demo
                demo_corpus.ensure_demo(tmp_path, **TINY)  # the other process generates and renames into place first
                first["inode"] = (tmp_path / "MIND-demo" / "train" / "behaviors.tsv").stat().st_ino

        real(target, build_while_another_process_finishes, keep_existing)

    monkeypatch.setattr(demo_corpus, "replace_dir_atomically", racing)
    root = demo_corpus.ensure_demo(tmp_path, **TINY)
    assert len(builds) == 2 and all(p.parent == tmp_path and p.name.startswith(".MIND-demo.tmp-") for p in builds)
    assert (root / "train" / "behaviors.tsv").stat().st_ino == first["inode"]  # the first corpus stayed
    assert [p.name for p in tmp_path.iterdir()] == ["MIND-demo"]  # both temporary folders are gone
    assert demo_corpus._demo_matches(root, {**demo_corpus.DEMO_SIZES, **TINY}, 0)
    reference = demo_corpus.generate_demo(tmp_path / "ref", **TINY)
    for name in ("train/behaviors.tsv", "dev/news.tsv", "test/behaviors.tsv"):
        assert (root / name).read_bytes() == (reference / name).read_bytes()
    # a folder made by ensure_demo has the usual permissions (mkdtemp would have made it 0700)
    probe = tmp_path / "probe"
    probe.mkdir()
    assert root.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777


def test_cli_demo(tmp_path):
    root = pm.main(["--dataset", "demo", "--data_dir", str(tmp_path), "--demo_news", "200", "--demo_users", "50",
                    "--demo_train_impressions", "60", "--demo_dev_impressions", "20", "--demo_test_impressions",
                    "20", "--seed", "4"])
    oracle = json.loads((root / "oracle.json").read_text())
    assert oracle["seed"] == 4 and oracle["sizes"]["num_news"] == 200
    assert len(read_rows(root / "dev" / "behaviors.tsv", 5)) == 20


# ----------------------------------------------------------------------------------------------------------
# Real MIND protocols on fake zips
# ----------------------------------------------------------------------------------------------------------

def make_zip(path: Path, split_dir: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name in pm.SPLIT_FILES:
            z.write(split_dir / name, prefix + name)
    return path


@pytest.fixture(scope="module")
def fake_large(tmp_path_factory) -> Path:
    """A demo with an unlabelled test split, standing in for MIND-large."""
    return demo_corpus.generate_demo(tmp_path_factory.mktemp("large") / "src", **TINY, test_labels=False)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def test_prepare_small_from_manual_zips(tmp_path, tiny, capsys):
    data = tmp_path / "data"
    data.mkdir()
    make_zip(data / "MINDsmall_train.zip", tiny / "train")
    make_zip(data / "MINDsmall_dev.zip", tiny / "dev", prefix="MINDsmall_dev/")  # files inside a folder
    out = pm.prepare("small", data, download=False)
    assert out == data / "MIND-small"
    source = lines(tiny / "train" / "behaviors.tsv")
    train, dev = lines(out / "train" / "behaviors.tsv"), lines(out / "dev" / "behaviors.tsv")
    assert sorted(train + dev) == sorted(source) and not set(train) & set(dev)
    assert len(dev) == round(0.05 * len(source))
    assert train == [x for x in source if x not in set(dev)], "file order is kept"
    ids = sorted(int(x.split("\t")[0]) for x in source)
    expected = {ids[i] for i in np.random.default_rng(0).permutation(len(ids))[:len(dev)]}
    assert {int(x.split("\t")[0]) for x in dev} == expected
    assert (out / "test" / "behaviors.tsv").read_bytes() == (tiny / "dev" / "behaviors.tsv").read_bytes()
    for name in ("news.tsv", "entity_embedding.vec", "relation_embedding.vec"):
        assert (out / "train" / name).read_bytes() == (tiny / "train" / name).read_bytes()
        assert (out / "dev" / name).read_bytes() == (tiny / "train" / name).read_bytes()
        assert (out / "test" / name).read_bytes() == (tiny / "dev" / name).read_bytes()
    assert (data / "raw" / "MINDsmall_train" / ".unpacked").exists()

    # Deterministic across runs (another folder), and not rebuilt when ready.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("MINDsmall_train.zip", "MINDsmall_dev.zip"):
        (other / name).write_bytes((data / name).read_bytes())
    again = pm.prepare("small", other, download=False)
    assert files_of(again) == files_of(out)
    capsys.readouterr()
    stamp = (out / ".prepared").stat().st_mtime_ns
    pm.prepare("small", data, download=False)
    assert "is ready" in capsys.readouterr().out and (out / ".prepared").stat().st_mtime_ns == stamp
    # Once unpacked, the zips are no longer needed.
    for name in ("MINDsmall_train.zip", "MINDsmall_dev.zip"):
        (other / name).unlink()
    shutil.rmtree(again)  # (a folder without its .prepared marker is the user's own: never rebuilt over)
    assert files_of(pm.prepare("small", other, download=False)) == files_of(out)


def test_prepare_200k_samples_users_and_alternates(tmp_path, fake_large):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        make_zip(data / f"MINDlarge_{split}.zip", fake_large / split)
    out = pm.prepare("200k", data, download=False, num_users=5)
    src_train, src_dev = lines(fake_large / "train" / "behaviors.tsv"), lines(fake_large / "dev" / "behaviors.tsv")
    all_users = sorted({x.split("\t")[1] for x in src_train + src_dev})
    chosen = {all_users[i] for i in np.random.default_rng(0).choice(len(all_users), 5, replace=False)}
    assert lines(out / "train" / "behaviors.tsv") == [x for x in src_train if x.split("\t")[1] in chosen]
    mine = [x for x in src_dev if x.split("\t")[1] in chosen]
    assert mine, "the sample has dev impressions"
    assert lines(out / "dev" / "behaviors.tsv") == mine[0::2]
    assert lines(out / "test" / "behaviors.tsv") == mine[1::2]
    assert (out / "train" / "news.tsv").read_bytes() == (fake_large / "train" / "news.tsv").read_bytes()
    assert (out / "test" / "news.tsv").read_bytes() == (fake_large / "dev" / "news.tsv").read_bytes()
    assert json.loads((out / ".prepared").read_text())["num_users"] == 5
    with pytest.raises(ValueError, match="only"):
        pm.prepare("200k", data, download=False, num_users=10 ** 6)


def test_prepare_large_copies_official_splits(tmp_path, fake_large):
    data = tmp_path / "data"
    data.mkdir()
    for split in SPLITS:
        make_zip(data / f"MINDlarge_{split}.zip", fake_large / split)
    out = pm.main(["--dataset", "large", "--data_dir", str(data), "--no-download"])
    for split in SPLITS:
        for name in pm.SPLIT_FILES:
            assert (out / split / name).read_bytes() == (fake_large / split / name).read_bytes()
    assert "-" not in lines(out / "test" / "behaviors.tsv")[0].split("\t")[4]


def test_missing_zips_without_download_fail_fast_and_say_where(tmp_path):
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as err:
        pm.prepare("200k", tmp_path, download=False)
    message = str(err.value)
    assert time.time() - t0 < 5
    for text in ("MINDlarge_train.zip", "MINDlarge_dev.zip", str(tmp_path.resolve()), pm.MIND_URL, "yjw1029/MIND"):
        assert text in message
    assert not (tmp_path / "MIND-200k").exists()


def test_broken_zip_is_reported(tmp_path):
    (tmp_path / "MINDsmall_train.zip").write_bytes(b"not a zip")
    (tmp_path / "MINDsmall_dev.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a valid zip"):
        pm.prepare("small", tmp_path, download=False)


def test_unreachable_mirror_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "MIND_URL", "http://127.0.0.1:9/")
    t0 = time.time()
    with pytest.raises(pm.MINDNotFoundError) as err:
        pm.prepare("small", tmp_path, download=True)
    assert time.time() - t0 < 10
    message = str(err.value)
    for text in ("MINDsmall_train.zip", str(tmp_path.resolve()), "http://127.0.0.1:9/MINDsmall_train.zip",
                 "yjw1029/MIND"):
        assert text in message
    assert not (tmp_path / "MINDsmall_train.zip").exists()


def test_download_resumes_a_partial_file(tmp_path, tiny):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name in pm.SPLIT_FILES:
            z.write(tiny / "dev" / name, name)
    payload = buffer.getvalue()
    with FileServer({"MINDsmall_dev.zip": payload}) as server:
        (tmp_path / "MINDsmall_dev.zip.part").write_bytes(payload[:1000])
        path = pm.obtain_zip("MINDsmall_dev.zip", tmp_path, base_url=server.url)
        assert path.read_bytes() == payload and server.ranges == ["bytes=1000-"]
        assert not (tmp_path / "MINDsmall_dev.zip.part").exists()
        fresh = tmp_path / "fresh"
        assert pm.obtain_zip("MINDsmall_dev.zip", fresh, base_url=server.url).read_bytes() == payload
        assert server.ranges[-1] is None
