"""Issue 24, the rest: EB-NeRD's sentiment column feeding the beyond-accuracy sentiment metric (and VADER never run
on news that are not English), `--ebnerd_abstract` choosing the subtitle or the body, and the one download function
(news_data/download.py) every converter uses, served by a local HTTP server, including a resumed download."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import beyond_accuracy as ba
import prepare_MIND_dataset
from main import main
from MIND_corpus import SENTIMENT_FILE, Corpus, corpus_language
from news_data import adressa, ebnerd, get_dataset, xmind
from news_data.download import download
from news_data.ebnerd_synth import write_ebnerd

from common import SMALL_MODEL, FileServer  # noqa: E402

TINY = ["--epoch=1", "--batch_size=32", "--max_history_num=20", "--max_title_length=12", "--max_abstract_length=16",
        "--word_threshold=1", *SMALL_MODEL]


def _corpus(root: Path, data_dir: Path) -> Corpus:
    from config import Config

    config = Config.from_args([f"--data_dir={data_dir}", "--word_threshold=1"])
    return Corpus(config, root=root, need_glove=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    data = tmp_path_factory.mktemp("ebm") / "data"
    write_ebnerd(data / "ebnerd_demo", articles=150, users=60, train=200, validation=80, seed=5)
    return data


# ----------------------------------------------------------------------------------------------------------
# Sentiment
# ----------------------------------------------------------------------------------------------------------

def test_the_converter_writes_a_signed_polarity_from_label_and_score(bundle):
    root = get_dataset("ebnerd_demo").prepare(bundle, download=False)
    rows = pq.read_table(bundle / "ebnerd_demo" / "articles.parquet",
                         columns=["article_id", "sentiment_score", "sentiment_label"]).to_pylist()
    sign = {"Positive": 1.0, "Negative": -1.0, "Neutral": 0.0}
    expected = {str(r["article_id"]): sign[r["sentiment_label"]] * r["sentiment_score"] for r in rows}
    written = dict(line.split("\t") for line in (root / SENTIMENT_FILE).read_text().splitlines())
    assert written.keys() == expected.keys()
    for nid, value in written.items():
        assert float(value) == pytest.approx(expected[nid], abs=1e-6)
    assert corpus_language(root) == "dan"


def test_beyond_accuracy_reads_the_datasets_sentiment_not_vader(bundle):
    root = get_dataset("ebnerd_demo").prepare(bundle, download=False)
    corpus = _corpus(root, bundle)
    f = ba.news_features(corpus, np.zeros(len(corpus.news["category"])), ["sentiment"])
    assert f.sentiment_source.startswith(f"the dataset's sentiment column ({SENTIMENT_FILE}")
    written = dict(line.split("\t") for line in (root / SENTIMENT_FILE).read_text().splitlines())
    for i, nid in enumerate(corpus.meta.news_ids[1:], 1):
        assert f.sentiment[i] == pytest.approx(float(written[nid]))


def test_dev_mode_reports_the_sentiment_source(bundle, tmp_path):
    common = [f"--data_dir={bundle}", f"--output_dir={tmp_path / 'best_model'}"]
    ckpt = main(["--mode=train", "--dataset=ebnerd_demo", *TINY, *common])["checkpoint"]
    report = main(["--mode=dev", f"--dev_model_path={ckpt}", "--beyond_metrics=sentiment", *common])
    assert report["beyond"]["sentiment_source"].startswith("the dataset's sentiment column")
    assert -1 <= report["beyond"]["means"]["sentiment@5"] <= 1


def test_vader_is_not_run_on_danish_news_without_the_column(bundle):
    """Before: VADER's English lexicon scored the Danish titles and the table said 'VADER compound polarity'."""
    root = get_dataset("ebnerd_demo").prepare(bundle, download=False)
    corpus = _corpus(root, bundle)
    (root / SENTIMENT_FILE).rename(root / "moved.tsv")
    try:
        f = ba.news_features(corpus, np.zeros(len(corpus.news["category"])), ["sentiment"])
    finally:
        (root / "moved.tsv").rename(root / SENTIMENT_FILE)
    assert f.sentiment is None
    assert "VADER is an English lexicon" in f.sentiment_source and "dan" in f.sentiment_source
    res = ba.compute(np.array([1, 2]), {"offsets": np.array([0, 2]), "candidates": np.array([1, 2]),
                                        "labels": np.array([1, 0]), "history_row": np.array([0]),
                                        "histories": np.zeros((1, 1), np.int64)}, f, [1], ["sentiment"])
    assert res.info["not_computed"]["sentiment"].startswith("no sentiment of the news: none (VADER is an English")


def test_vader_is_not_run_on_adressa_or_xmind(tmp_path):
    data = tmp_path / "data"
    adressa.write_adressa_demo(data / "adressa" / "one_week", days=7, users=40, news=60, clicks_per_day=80)
    root = get_dataset("adressa_1w").prepare(data, download=False)
    assert corpus_language(root) == "nor"
    f = ba.news_features(_corpus(root, data), np.zeros(61), ["sentiment"])
    assert f.sentiment is None and "nor" in f.sentiment_source
    fake = tmp_path / "MIND-xmind_demo-swh"
    fake.mkdir()
    (fake / ".prepared").write_text(json.dumps({"language": "swh"}))
    assert corpus_language(fake) == "swh" and xmind.LANGUAGES  # xMIND's marker already names the language


def test_english_corpora_keep_vader(tmp_path):
    assert corpus_language(tmp_path) == "eng"  # no marker: a MIND folder (or the user's own): English
    (tmp_path / ".prepared").write_text(json.dumps({"protocol": 2}))
    assert corpus_language(tmp_path) == "eng"


# ----------------------------------------------------------------------------------------------------------
# --ebnerd_abstract
# ----------------------------------------------------------------------------------------------------------

def _abstracts(root: Path) -> dict[str, str]:
    return {p[0]: p[4] for p in (line.split("\t") for line in (root / "train" / "news.tsv").read_text().splitlines())}


def test_the_body_can_be_the_abstract_and_main_keeps_that_choice(tmp_path):
    data = tmp_path / "data"
    write_ebnerd(data / "ebnerd_demo", articles=60, users=20, train=50, validation=20, seed=6)
    rows = pq.read_table(data / "ebnerd_demo" / "articles.parquet", columns=["article_id", "subtitle", "body"])
    rows = rows.to_pylist()
    root = prepare_MIND_dataset.main(["--dataset=ebnerd_demo", f"--data_dir={data}", "--no-download",
                                      "--ebnerd_abstract=body"])
    assert _abstracts(root) == {str(r["article_id"]): " ".join(r["body"].split()) for r in rows}
    assert json.loads((root / ".prepared").read_text())["abstract"] == "body"
    stamp = (root / "train" / "news.tsv").stat().st_mtime_ns
    assert get_dataset("ebnerd_demo").ensure(data) == root  # main's call: the folder's own choice, no rebuild
    assert (root / "train" / "news.tsv").stat().st_mtime_ns == stamp
    prepare_MIND_dataset.main(["--dataset=ebnerd_demo", f"--data_dir={data}", "--no-download"])  # not typed: kept
    assert (root / "train" / "news.tsv").stat().st_mtime_ns == stamp
    prepare_MIND_dataset.main(["--dataset=ebnerd_demo", f"--data_dir={data}", "--no-download",
                               "--ebnerd_abstract=subtitle"])
    assert _abstracts(root) == {str(r["article_id"]): " ".join(r["subtitle"].split()) for r in rows}


def test_abstract_flag_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare_MIND_dataset.main(["--dataset=adressa_1w", f"--data_dir={tmp_path}", "--ebnerd_abstract=body"])
    assert "--ebnerd_abstract is for the EB-NeRD datasets" in capsys.readouterr().err
    data = tmp_path / "data"
    write_ebnerd(data / "ebnerd_demo", articles=40, users=20, train=40, validation=20, seed=7)
    path = data / "ebnerd_demo" / "articles.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["body"]), path)
    with pytest.raises(ebnerd.CorpusError, match="column 'body' is missing"):
        get_dataset("ebnerd_demo").prepare(data, download=False, abstract="body")
    assert get_dataset("ebnerd_demo").prepare(data, download=False).is_dir()  # the subtitle needs no body


# ----------------------------------------------------------------------------------------------------------
# Downloads: news_data/download.py, for every converter
# ----------------------------------------------------------------------------------------------------------

def _zip_bytes(folder: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    return buffer.getvalue()


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path):
    payload = _zip_bytes(Path(__file__).parent / "data")
    assert len(payload) > 4000
    with FileServer({"a.zip": payload}, cut=3000) as server:
        target = tmp_path / "a.zip"
        with pytest.raises(OSError, match="run again to resume"):
            download(server.url + "a.zip", target, log=lambda *a: None)
        part = tmp_path / "a.zip.part"
        assert not target.exists() and part.read_bytes() == payload[:3000]
        assert download(server.url + "a.zip", target, log=lambda *a: None) == target
        assert target.read_bytes() == payload and not part.exists()
        assert server.ranges == [None, "bytes=3000-"]


def test_the_zip_check_is_optional_and_a_failure_names_the_hint(tmp_path):
    with FileServer({"x.tar.gz": b"\x1f\x8b not a zip"}) as server:
        assert download(server.url + "x.tar.gz", tmp_path / "x.tar.gz", check_zip=False).read_bytes() == \
            b"\x1f\x8b not a zip"
        with pytest.raises(OSError, match="not a zip file"):
            download(server.url + "x.tar.gz", tmp_path / "y.zip")
        assert not (tmp_path / "y.zip").exists() and not (tmp_path / "y.zip.part").exists()
        with pytest.raises(OSError, match=r"could not download .*missing.zip \(HTTP Error 404.*\)\. Put it there"):
            download(server.url + "missing.zip", tmp_path / "m.zip", hint="Put it there.")


def test_every_converter_downloads_through_the_library(tmp_path, monkeypatch):
    import inspect

    for module in (ebnerd, xmind, adressa):
        assert module.fetch_url is download and "urlretrieve" not in inspect.getsource(module)
    import news_data.download as library

    assert prepare_MIND_dataset.download is library.download  # MIND's zips too; no module imports the script
    # EB-NeRD's bundle and Adressa's tar.gz, fetched from a local server by the converters themselves
    write_ebnerd(tmp_path / "staging" / "ebnerd_demo", articles=40, users=20, train=40, validation=20, seed=8)
    adressa.write_adressa_demo(tmp_path / "staging" / "one_week", days=7, users=30, news=50, clicks_per_day=60)
    import io
    import tarfile

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as t:
        t.add(tmp_path / "staging" / "one_week", arcname="one_week")
    files = {"ebnerd_demo.zip": _zip_bytes(tmp_path / "staging" / "ebnerd_demo"), "one_week.tar.gz": tar.getvalue()}
    with FileServer(files, cut=1000) as server:
        monkeypatch.setattr(ebnerd, "URL", server.url + "{bundle}.zip")
        monkeypatch.setattr(adressa, "URL", server.url + "{name}.tar.gz")
        data = tmp_path / "data"
        with pytest.raises(OSError, match=r"could not download .*ebnerd_demo.zip .*partial download .* resumes"):
            get_dataset("ebnerd_demo").prepare(data, download=True, log=lambda *a: None)
        assert get_dataset("ebnerd_demo").prepare(data, download=True, log=lambda *a: None).is_dir()
        assert get_dataset("adressa_1w").prepare(data, download=True, log=lambda *a: None).is_dir()
        assert server.ranges == [None, "bytes=1000-", None]


def test_an_unreachable_server_fails_fast_saying_where_to_put_the_file(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(ebnerd, "URL", "http://127.0.0.1:9/{bundle}.zip")
    t0 = time.time()
    with pytest.raises(OSError) as e:
        get_dataset("ebnerd_small").prepare(tmp_path, download=True, log=lambda *a: None)
    assert time.time() - t0 < 10
    assert f"Put EB-NeRD's ebnerd_small.zip (recsys.eb.dk) in {tmp_path} yourself" in str(e.value)


def _tar_gz(folder: Path, arcname: str) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        t.add(folder, arcname=arcname)
    return buffer.getvalue()


@pytest.mark.parametrize("layout", ["flat", "nested", "nested twice"])
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_unpacks_into_its_folder_whole_with_or_without_its_top_folder(tmp_path, kind, layout):
    from news_data.download import unpack_atomically

    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "articles.parquet").write_bytes(b"a")
    (src / "train" / "behaviors.parquet").write_bytes(b"b")
    if layout == "nested twice":  # the archive's folder holds a folder of its own name: only the outer one is dropped
        (src / "bundle").mkdir()
        (src / "bundle" / "x").write_bytes(b"c")
    archive = tmp_path / f"bundle.{kind}"
    top = "" if layout == "flat" else "bundle"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            for p in sorted(src.rglob("*")):
                if p.is_file():
                    z.write(p, "/".join(filter(None, [top, p.relative_to(src).as_posix()])))
    else:
        archive.write_bytes(_tar_gz(src, top or "."))
    target = tmp_path / "data" / "bundle"
    unpack_atomically(archive, target)
    got = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert got == (["articles.parquet", "bundle/x", "train/behaviors.parquet"] if layout == "nested twice"
                   else ["articles.parquet", "train/behaviors.parquet"])
    assert [p.name for p in target.parent.iterdir()] == ["bundle"]  # no temp folder left


def test_an_interrupted_unpack_leaves_no_half_folder_and_the_next_run_unpacks_it(tmp_path, monkeypatch):
    """EB-NeRD's bundle and Adressa's tar.gz were unpacked in place: a kill in the middle left a folder that a later
    run took for the data (Adressa: a week of which some days were missing, converted without a word)."""
    write_ebnerd(tmp_path / "staging" / "ebnerd_demo", articles=40, users=20, train=40, validation=20, seed=8)
    adressa.write_adressa_demo(tmp_path / "staging" / "one_week", days=7, users=30, news=50, clicks_per_day=60)
    data = tmp_path / "data"
    (data / "adressa").mkdir(parents=True)
    (data / "ebnerd_demo.zip").write_bytes(_zip_bytes(tmp_path / "staging" / "ebnerd_demo"))
    (data / "adressa" / "one_week.tar.gz").write_bytes(_tar_gz(tmp_path / "staging" / "one_week", "one_week"))
    import tarfile

    calls: list = []

    def cut(real):  # a Ctrl-C after two members
        def extract(self, member, *args, **kwargs):
            if calls.append(member) or len(calls) > 2:
                raise KeyboardInterrupt
            return real(self, member, *args, **kwargs)
        return extract

    for cls, method in ((zipfile.ZipFile, "_extract_member"), (tarfile.TarFile, "_extract_one")):
        monkeypatch.setattr(cls, method, cut(getattr(cls, method)))
    for name, folder in (("ebnerd_demo", data / "ebnerd_demo"), ("adressa_1w", data / "adressa" / "one_week")):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            get_dataset(name).prepare(data, download=False, log=lambda *a: None)
        assert len(calls) == 3 and not folder.exists()
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # the temp folder is gone too
    monkeypatch.undo()
    for name in ("ebnerd_demo", "adressa_1w"):
        assert get_dataset(name).prepare(data, download=False, log=lambda *a: None).is_dir()


def test_a_bundle_folder_without_articles_is_never_unpacked_over(tmp_path):
    write_ebnerd(tmp_path / "staging" / "ebnerd_demo", articles=40, users=20, train=40, validation=20, seed=8)
    (tmp_path / "ebnerd_demo.zip").write_bytes(_zip_bytes(tmp_path / "staging" / "ebnerd_demo"))
    (tmp_path / "ebnerd_demo").mkdir()
    (tmp_path / "ebnerd_demo" / "mine.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match=r"ebnerd_demo exists but holds no articles.parquet.*move the folder away"):
        get_dataset("ebnerd_demo").prepare(tmp_path, download=False, log=lambda *a: None)
    assert [p.name for p in (tmp_path / "ebnerd_demo").iterdir()] == ["mine.txt"]
    (tmp_path / "ebnerd_demo" / "articles.parquet").write_bytes(b"")  # a hand unzip cut short: no behaviors
    with pytest.raises(FileNotFoundError, match=r"behaviors.parquet not found \(EB-NeRD's ebnerd_demo bundle is "
                                                r"incomplete\): move .*ebnerd_demo away and run this again"):
        get_dataset("ebnerd_demo").prepare(tmp_path, download=False, log=lambda *a: None)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_truncated_archive_is_one_line_naming_it(tmp_path, kind):
    import subprocess
    import sys

    src = tmp_path / "staging" / "one_week"
    write_ebnerd(tmp_path / "staging" / "ebnerd_demo", articles=40, users=20, train=40, validation=20, seed=8)
    adressa.write_adressa_demo(src, days=7, users=30, news=50, clicks_per_day=60)
    data = tmp_path / "data"
    (data / "adressa").mkdir(parents=True)
    if kind == "zip":
        archive, dataset = data / "ebnerd_demo.zip", "ebnerd_demo"
        whole = _zip_bytes(tmp_path / "staging" / "ebnerd_demo")
    else:
        archive, dataset = data / "adressa" / "one_week.tar.gz", "adressa_1w"
        whole = _tar_gz(src, "one_week")
    archive.write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    proc = subprocess.run([sys.executable, "prepare_MIND_dataset.py", f"--dataset={dataset}", f"--data_dir={data}",
                           "--no-download"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{archive} cannot be unpacked" in proc.stderr and "Delete it and run this again" in proc.stderr
    assert sorted(p.name for p in archive.parent.iterdir()) == sorted([archive.name] + (["adressa"] if kind == "zip"
                                                                                          else []))  # no half folder
