"""xMIND (news_data/xmind.py): the generated demo's news in a made-up 'language', in xMIND's file format (a zip per
split holding a headerless nid/title/abstract tsv), drives prepare -> train -> dev -> test -> prediction.zip; the
impressions stay MIND's, the titles are the language's."""
from __future__ import annotations

import zipfile

import pytest

import demo_corpus
from config import Config
from main import main
from MIND_corpus import CorpusError
from news_data import get_dataset, xmind

from common import SMALL_MODEL  # noqa: E402

TINY = ["--epoch=1", "--batch_size=32", "--max_title_length=12", "--max_abstract_length=16", *SMALL_MODEL]
SIZES = dict(num_news=300, num_users=120, num_train_impressions=300, num_dev_impressions=80, num_test_impressions=80)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data = tmp_path_factory.mktemp("xm") / "data"
    demo_corpus.ensure_demo(data, **SIZES)
    xmind.write_demo_translations(data, "swh")
    return data


def test_train_dev_test_on_a_language(data, capsys):
    common = [f"--data_dir={data}", f"--output_dir={data.parent / 'best_model'}"]
    result = main(["--mode=train", "--dataset=xmind_demo", "--news_language=swh", *TINY, *common])
    out = capsys.readouterr().out
    assert "note: the news are in swh (xMIND)" in out and "--glove_path" in out  # GloVe says what it needs
    root = data / "MIND-xmind_demo-swh"
    for split in ("train", "dev", "test"):
        mind = data / "MIND-demo" / split / "behaviors.tsv"
        assert (root / split / "behaviors.tsv").read_bytes() == mind.read_bytes()
    english = {line.split("\t")[0]: line.split("\t")
               for line in (data / "MIND-demo" / "train" / "news.tsv").read_text().splitlines()}
    translated = {}
    for split in ("train", "dev", "test"):
        for _, nid, t, a in xmind.read_translations(xmind.language_file(data, "swh", "demo", split)):
            translated.setdefault(nid, (t, a))
    kept = 0
    for line in (root / "train" / "news.tsv").read_text().splitlines():
        f = line.split("\t")
        if f[0] in translated:
            assert (f[3], f[4]) == translated[f[0]] and f[3] != english[f[0]][3]
        else:
            kept += 1
            assert f[3] == english[f[0]][3]
        assert f[1:3] == english[f[0]][1:3] and f[6:] == ["[]", "[]"]
    assert kept > 0
    dev = main(["--mode=dev", f"--dev_model_path={result['checkpoint']}", *common])
    assert 0 <= dev["metrics"]["auc"] <= 1
    test = main(["--mode=test", f"--test_model_path={result['checkpoint']}", *common])
    with zipfile.ZipFile(test["prediction"]) as z:
        assert len(z.read("prediction.txt").decode().splitlines()) == SIZES["num_test_impressions"]


def test_the_language_is_required_and_checked():
    with pytest.raises(ValueError, match="--dataset=xmind_small needs --news_language, one of cmn, fin"):
        Config.from_args(["--dataset=xmind_small"])
    with pytest.raises(ValueError, match="got 'deu'"):
        Config.from_args(["--dataset=xmind_small", "--news_language=deu"])
    with pytest.raises(ValueError, match="--news_language=swh is for xMIND; --dataset=ebnerd_demo has one language"):
        Config.from_args(["--dataset=ebnerd_demo", "--news_language=swh"])
    assert Config.from_args(["--dataset=xmind_small", "--news_language=fin"]).news_language == "fin"


def test_language_files_missing_or_malformed(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="xMINDdemo_train.zip for fin"):
        get_dataset("xmind_demo").prepare(data, download=False, language="fin")
    bad = xmind.language_file(data, "tur", "demo", "train")
    bad.parent.mkdir(parents=True)
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("news.tsv", "N1\tonly a title\n")
    with pytest.raises(CorpusError, match=r"xMINDdemo_train.zip:news.tsv:1: expected 3 tab-separated columns"):
        list(xmind.read_translations(bad))
    with pytest.raises(FileNotFoundError, match="prepare_MIND_dataset.py --dataset=xmind_small --news_language=fin"):
        get_dataset("xmind_small").ensure(tmp_path, "fin")
